// Random-drop short-term-memory update on the CPU (DESIGN.md §2.2, SPEC.md §4.3).
//
// The memory is a pool of N slots per layer. An update writes the K new rows into the K victims' slots (after
// copying the victims' rows out) and renumbers the logical positions so that survivors keep their relative order
// and the new rows come last: O(K·row) bytes moved and O(N) integer work per layer, nothing reallocated.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

namespace mplus {
namespace {

using at::Tensor;
using at::TensorList;

// A tensor whose dims >= 2 form one dense row: element (a, b, ...) lives at a*stride(0) + b*stride(1) + offset.
bool rows_are_dense(const Tensor& t) {
  int64_t expected = 1;
  for (int64_t dim = t.dim() - 1; dim >= 2; --dim) {
    if (t.size(dim) != 1 && t.stride(dim) != expected) return false;
    expected *= t.size(dim);
  }
  return true;
}

void check_rows(const char* what, size_t i, const Tensor& t, int64_t L, int64_t rows, const Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), "memory_update_: ", what, "[", i, "] must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == like.dim() && t.size(0) == L && t.size(1) == rows,
              "memory_update_: ", what, "[", i, "] has shape ", t.sizes(), ", expected [", L, ", ", rows,
              ", ...] matching slots[", i, "] ", like.sizes());
  for (int64_t dim = 2; dim < t.dim(); ++dim) {
    TORCH_CHECK(t.size(dim) == like.size(dim), "memory_update_: ", what, "[", i, "] has shape ", t.sizes(),
                ", its trailing dims must equal those of slots[", i, "] ", like.sizes());
  }
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "memory_update_: ", what, "[", i, "] has dtype ",
              t.scalar_type(), ", expected ", like.scalar_type());
  TORCH_CHECK(rows_are_dense(t), "memory_update_: ", what, "[", i, "] must have dense rows (dims >= 2 contiguous)");
}

void memory_update_cpu(const Tensor& pos, const Tensor& order, const Tensor& victims, TensorList slots,
                       TensorList new_rows, TensorList dropped) {
  // Cheap structural checks only: the Python wrapper validates values (range, duplicates) before calling.
  TORCH_CHECK(pos.dim() == 2 && pos.scalar_type() == at::kInt && pos.is_contiguous() && pos.device().is_cpu(),
              "memory_update_: pos must be a contiguous CPU int32 [L, N] tensor, got ", pos.scalar_type(), " ",
              pos.sizes());
  TORCH_CHECK(order.sizes() == pos.sizes() && order.scalar_type() == at::kInt && order.is_contiguous() &&
                  order.device().is_cpu(),
              "memory_update_: order must be a contiguous CPU int32 tensor shaped like pos ", pos.sizes());
  const int64_t L = pos.size(0);
  const int64_t N = pos.size(1);
  TORCH_CHECK(victims.dim() == 2 && victims.size(0) == L && victims.scalar_type() == at::kLong &&
                  victims.is_contiguous() && victims.device().is_cpu(),
              "memory_update_: victims must be a contiguous CPU int64 [L=", L, ", K] tensor, got ",
              victims.scalar_type(), " ", victims.sizes());
  const int64_t K = victims.size(1);
  TORCH_CHECK(K <= N, "memory_update_: K=", K, " victims per layer exceed the N=", N, " slots");
  TORCH_CHECK(new_rows.size() == slots.size() && dropped.size() == slots.size(),
              "memory_update_: slots, new_rows and dropped must have the same length, got ", slots.size(), ", ",
              new_rows.size(), ", ", dropped.size());
  for (const auto i : c10::irange(slots.size())) {
    TORCH_CHECK(slots[i].dim() >= 2, "memory_update_: slots[", i, "] must be [L, N, ...], got ", slots[i].sizes());
    check_rows("slots", i, slots[i], L, N, slots[i]);
    check_rows("new_rows", i, new_rows[i], L, K, slots[i]);
    check_rows("dropped", i, dropped[i], L, K, slots[i]);
  }
  if (L == 0 || K == 0) return;

  const int64_t* vic = victims.data_ptr<int64_t>();
  int32_t* pos_p = pos.data_ptr<int32_t>();
  int32_t* ord_p = order.data_ptr<int32_t>();

  // 1. The victims' slots, read before `order` is renumbered (L·K ints).
  std::vector<int32_t> victim_slot(static_cast<size_t>(L * K));
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t i = 0; i < K; ++i) victim_slot[l * K + i] = ord_p[l * N + vic[l * K + i]];
  }

  // 2. Row moves: dropped[l, i] <- slot row; slot row <- new_rows[l, i]. Each (l, i) owns a distinct slot.
  struct RowView {
    char* slot;
    const char* fresh;
    char* out;
    int64_t bytes, s0, s1, n0, n1, o0, o1;  // row size and byte strides of dims 0 and 1
  };
  std::vector<RowView> views;
  views.reserve(slots.size());
  for (const auto i : c10::irange(slots.size())) {
    const int64_t es = static_cast<int64_t>(slots[i].element_size());
    int64_t row = 1;
    for (int64_t dim = 2; dim < slots[i].dim(); ++dim) row *= slots[i].size(dim);
    views.push_back({static_cast<char*>(slots[i].data_ptr()), static_cast<const char*>(new_rows[i].data_ptr()),
                     static_cast<char*>(dropped[i].data_ptr()), row * es, slots[i].stride(0) * es,
                     slots[i].stride(1) * es, new_rows[i].stride(0) * es, new_rows[i].stride(1) * es,
                     dropped[i].stride(0) * es, dropped[i].stride(1) * es});
  }
  int64_t bytes_per_item = 0;
  for (const auto& v : views) bytes_per_item += 2 * v.bytes;
  // ~256 KiB of copies per task: enough to amortise scheduling, small enough to split across cores.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(bytes_per_item, 1));
  at::parallel_for(0, L * K, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t l = item / K, i = item % K;
      const int64_t s = victim_slot[item];
      for (const auto& v : views) {
        char* slot_row = v.slot + l * v.s0 + s * v.s1;
        std::memcpy(v.out + l * v.o0 + i * v.o1, slot_row, v.bytes);
        std::memcpy(slot_row, v.fresh + l * v.n0 + i * v.n1, v.bytes);
      }
    }
  });

  // 3. Renumber, one sweep over the logical order per layer: a survivor at logical p moves to p - (victims
  // before p); the i-th victim's slot (now holding new row i) takes position N - K + i. order[] is rewritten in
  // place: each write goes to an index <= the one just read.
  at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      int32_t* P = pos_p + l * N;
      int32_t* O = ord_p + l * N;
      const int64_t* V = vic + l * K;
      int64_t j = 0;
      for (int64_t p = 0; p < N; ++p) {
        if (j < K && V[j] == p) {
          ++j;
          continue;
        }
        const int32_t s = O[p];
        const int64_t np = p - j;
        P[s] = static_cast<int32_t>(np);
        O[np] = s;
      }
      for (int64_t i = 0; i < K; ++i) {
        const int32_t s = victim_slot[l * K + i];
        P[s] = static_cast<int32_t>(N - K + i);
        O[N - K + i] = s;
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mplus, CPU, m) { m.impl("memory_update_", &memory_update_cpu); }

}  // namespace mplus
