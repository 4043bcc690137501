// Random-drop short-term-memory update on the CPU (DESIGN.md §2.2, SPEC.md §4.3).
//
// The memory is a pool of N slots per layer. An update writes the K new rows into the K victims' slots (after
// copying the victims' rows out) and renumbers the logical positions so that survivors keep their relative order
// and the new rows come last: O(K·row) bytes moved and O(N) integer work per layer, nothing reallocated.
// The raw op checks everything it indexes with before writing anything (DESIGN.md §2.5): victims sorted, distinct
// and in range, pos/order inverse permutations (O(N) per layer, like the renumbering), written rows disjoint.
// A rejected call raises ValueError (TORCH_CHECK_VALUE; TypeError for a wrong dtype or None), as the wrapper does.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "row_overlap.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace mplus {
namespace {

using at::Tensor;
using at::TensorList;

// A tensor whose dims >= 2 form one dense row: element (a, b, ...) lives at a*stride(0) + b*stride(1) + offset.
bool rows_are_dense(const Tensor& t) {
  if (t.numel() == 0) return true;  // no element is addressed (and torch gives empty views any strides)
  int64_t expected = 1;
  for (int64_t dim = t.dim() - 1; dim >= 2; --dim) {
    if (t.size(dim) != 1 && t.stride(dim) != expected) return false;
    expected *= t.size(dim);
  }
  return true;
}

int64_t row_elems(const Tensor& t) {
  int64_t row = 1;
  for (int64_t dim = 2; dim < t.dim(); ++dim) row *= t.size(dim);
  return row;
}

// Whether the L·N (or L·K) rows of a dense-row tensor occupy pairwise disjoint memory: the leading dims of size > 1,
// innermost (smallest stride) first, each step at least the extent of everything inside it. Rejects expand()ed
// (stride-0) and other self-overlapping views; accepts any non-overlapping layout, including layer/slot-interleaved
// ones ([N, L, F] storage viewed as [L, N, F]).
bool rows_are_disjoint(const Tensor& t) {
  const int64_t row = row_elems(t);
  if (row == 0 || t.size(0) == 0 || t.size(1) == 0) return true;  // no rows (torch gives empty views any strides)
  std::array<std::pair<int64_t, int64_t>, 2> dims{};  // (stride, size) of dims 0 and 1 when size > 1
  int n = 0;
  for (int64_t dim = 0; dim < 2; ++dim) {
    if (t.size(dim) > 1) dims[n++] = {t.stride(dim), t.size(dim)};
  }
  if (n == 2 && dims[1].first < dims[0].first) std::swap(dims[0], dims[1]);
  int64_t extent = row;
  for (int i = 0; i < n; ++i) {
    if (dims[i].first < extent) return false;
    extent += (dims[i].second - 1) * dims[i].first;
  }
  return true;
}

void check_rows(const char* what, size_t i, const Tensor& t, int64_t L, int64_t rows, const Tensor& like,
                bool written) {
  TORCH_CHECK_TYPE(t.defined(), "memory_update_: ", what, "[", i, "] must be a tensor, got None");
  TORCH_CHECK_VALUE(t.device().is_cpu(), "memory_update_: ", what, "[", i, "] must be a CPU tensor, got ",
                    t.device());
  TORCH_CHECK_VALUE(t.dim() == like.dim() && t.size(0) == L && t.size(1) == rows,
                    "memory_update_: ", what, "[", i, "] has shape ", t.sizes(), ", expected [", L, ", ", rows,
                    ", ...] matching slots[", i, "] ", like.sizes());
  for (int64_t dim = 2; dim < t.dim(); ++dim) {
    TORCH_CHECK_VALUE(t.size(dim) == like.size(dim), "memory_update_: ", what, "[", i, "] has shape ", t.sizes(),
                      ", its trailing dims must equal those of slots[", i, "] ", like.sizes());
  }
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), "memory_update_: ", what, "[", i, "] has dtype ",
                   t.scalar_type(), ", expected ", like.scalar_type());
  TORCH_CHECK_VALUE(rows_are_dense(t), "memory_update_: ", what, "[", i, "] ", t.sizes(), " with strides ",
                    t.strides(), " must have dense rows (dims >= 2 contiguous)");
  // Written tensors only: rows read from new_rows may alias (the STM passes new ages as an expand() over layers).
  TORCH_CHECK_VALUE(!written || rows_are_disjoint(t), "memory_update_: ", what, "[", i, "] ", t.sizes(),
                    " with strides ", t.strides(), " has overlapping rows (an expand()ed or stride-0 view?); every "
                    "written [layer, row] needs its own memory: a stride >= the row size of ", row_elems(t),
                    " elements along dims 0 and 1");
}

// An argument's rows with its name, for the aliasing messages.
struct NamedRows {
  std::string name;
  const Tensor* t;
  RowSet rows;
};

NamedRows named_rows(std::string name, const Tensor& t) {
  return {std::move(name), &t, row_set(t, t.dim() > 1 ? 2 : 1, t.dim() > 1 ? row_elems(t) : 1)};
}

// victims[l] strictly ascending in [0, N): the schema contract (sorted, distinct), and what keeps every row move and
// the renumbering sweep inside the layer. O(L·K).
void check_victims(const int64_t* vic, int64_t L, int64_t N, int64_t K) {
  for (int64_t l = 0; l < L; ++l) {
    const int64_t* V = vic + l * K;
    for (int64_t i = 0; i < K; ++i) {
      TORCH_CHECK_VALUE(V[i] >= 0 && V[i] < N, "memory_update_: victims [", L, ", ", K, "] has victims[", l, ", ", i,
                        "]=", V[i], ", expected logical positions in [0, N=", N, ")");
      TORCH_CHECK_VALUE(i == 0 || V[i] > V[i - 1], "memory_update_: victims [", L, ", ", K, "] of layer ", l,
                        " must be strictly ascending (sorted, distinct), got victims[", l, ", ", i - 1, "]=",
                        V[i - 1], " then victims[", l, ", ", i, "]=", V[i]);
    }
  }
}

// order[l] a permutation of [0, N) and pos[l] its inverse: for every p, order[p] = s in [0, N) and pos[s] = p. This
// makes order injective (two p with one s would need two values of pos[s]), hence a permutation, and pos its inverse
// (so pos is in range too). O(L·N) reads, the same order as the renumbering sweep; layers in parallel, the first bad
// layer reported (deterministic message).
void check_permutations(const int32_t* pos_p, const int32_t* ord_p, int64_t L, int64_t N) {
  std::vector<int64_t> bad(static_cast<size_t>(L), -1);  // per layer: first logical position that fails
  at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      const int32_t* P = pos_p + l * N;
      const int32_t* O = ord_p + l * N;
      for (int64_t p = 0; p < N; ++p) {
        const int32_t s = O[p];
        if (s < 0 || s >= N || P[s] != p) {
          bad[l] = p;
          break;
        }
      }
    }
  });
  for (int64_t l = 0; l < L; ++l) {
    const int64_t p = bad[l];
    if (p < 0) continue;
    const int32_t s = ord_p[l * N + p];
    TORCH_CHECK_VALUE(s >= 0 && s < N, "memory_update_: order [", L, ", ", N, "] has order[", l, ", ", p, "]=", s,
                      ", expected slot ids in [0, N=", N, ")");
    TORCH_CHECK_VALUE(false, "memory_update_: pos and order [", L, ", ", N, "] must be inverse permutations per ",
                      "layer, but order[", l, ", ", p, "]=", s, " while pos[", l, ", ", s, "]=", pos_p[l * N + s],
                      " (expected ", p, ")");
  }
}

void memory_update_cpu(const Tensor& pos, const Tensor& order, const Tensor& victims, TensorList slots,
                       TensorList new_rows, TensorList dropped) {
  // Everything the kernel indexes with is checked before anything is written (DESIGN.md §2.5), so a rejected call
  // leaves every tensor as it was: structure first, then the values of victims, order and pos (they are on the host).
  for (const auto& [name, t] : {std::pair{"pos", &pos}, std::pair{"order", &order}, std::pair{"victims", &victims}}) {
    TORCH_CHECK_TYPE(t->defined(), "memory_update_: ", name, " must be a tensor, got None");
  }
  TORCH_CHECK_VALUE(pos.dim() == 2 && pos.scalar_type() == at::kInt && pos.is_contiguous() && pos.device().is_cpu(),
                    "memory_update_: pos must be a contiguous CPU int32 [L, N] tensor, got ", pos.scalar_type(), " ",
                    pos.sizes(), " on ", pos.device());
  TORCH_CHECK_VALUE(order.sizes() == pos.sizes() && order.scalar_type() == at::kInt && order.is_contiguous() &&
                        order.device().is_cpu(),
                    "memory_update_: order must be a contiguous CPU int32 tensor shaped like pos ", pos.sizes(),
                    ", got ", order.scalar_type(), " ", order.sizes(), " on ", order.device());
  const int64_t L = pos.size(0);
  const int64_t N = pos.size(1);
  TORCH_CHECK_VALUE(N <= std::numeric_limits<int32_t>::max(), "memory_update_: N=", N,
                    " slots do not fit the int32 positions of pos/order");
  TORCH_CHECK_VALUE(victims.dim() == 2 && victims.size(0) == L && victims.scalar_type() == at::kLong &&
                        victims.is_contiguous() && victims.device().is_cpu(),
                    "memory_update_: victims must be a contiguous CPU int64 [L=", L, ", K] tensor, got ",
                    victims.scalar_type(), " ", victims.sizes(), " on ", victims.device());
  const int64_t K = victims.size(1);
  TORCH_CHECK_VALUE(K <= N, "memory_update_: K=", K, " victims per layer exceed the N=", N, " slots");
  TORCH_CHECK_VALUE(new_rows.size() == slots.size() && dropped.size() == slots.size(),
                    "memory_update_: slots, new_rows and dropped must have the same length, got ", slots.size(), ", ",
                    new_rows.size(), ", ", dropped.size());
  std::vector<NamedRows> written{named_rows("pos", pos), named_rows("order", order)};
  std::vector<NamedRows> read_only{named_rows("victims", victims)};
  for (const auto i : c10::irange(slots.size())) {
    TORCH_CHECK_TYPE(slots[i].defined(), "memory_update_: slots[", i, "] must be a tensor, got None");
    TORCH_CHECK_VALUE(slots[i].dim() >= 2, "memory_update_: slots[", i, "] must be [L, N, ...], got ",
                      slots[i].sizes());
    check_rows("slots", i, slots[i], L, N, slots[i], /*written=*/true);
    check_rows("new_rows", i, new_rows[i], L, K, slots[i], /*written=*/false);
    check_rows("dropped", i, dropped[i], L, K, slots[i], /*written=*/true);
    const std::string idx = "[" + std::to_string(i) + "]";
    written.push_back(named_rows("slots" + idx, slots[i]));
    written.push_back(named_rows("dropped" + idx, dropped[i]));
    read_only.push_back(named_rows("new_rows" + idx, new_rows[i]));
  }
  // Rows the op writes must not alias any other row it reads or writes (a row would be copied over one still to be
  // read, or the renumbering would read a position already overwritten). Pairs, O(L) each.
  for (size_t w = 0; w < written.size(); ++w) {
    auto check_pair = [&](const NamedRows& x) {
      const NamedRows& y = written[w];
      TORCH_CHECK_VALUE(!rows_overlap(y.rows, x.rows), "memory_update_: ", y.name, " ", y.t->sizes(), " (strides ",
                        y.t->strides(), ") and ", x.name, " ", x.t->sizes(), " (strides ", x.t->strides(),
                        ") share memory; a tensor the op writes must not alias another argument");
    };
    for (size_t o = w + 1; o < written.size(); ++o) check_pair(written[o]);
    for (const NamedRows& r : read_only) check_pair(r);
  }
  if (L * N == 0) return;

  const int64_t* vic = victims.data_ptr<int64_t>();
  int32_t* pos_p = pos.data_ptr<int32_t>();
  int32_t* ord_p = order.data_ptr<int32_t>();
  check_victims(vic, L, N, K);
  check_permutations(pos_p, ord_p, L, N);  // also when K = 0: a corrupted state is reported, not carried on
  if (K == 0) return;

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
