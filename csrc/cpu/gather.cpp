// Row gather from two sources into one output (long-term-memory retrieval, DESIGN.md §2.4):
// out[r] = index[r] < Na ? src_a[index[r]] : src_b[index[r] - Na]. Rows are moved with memcpy by all threads;
// the destination is a reusable staging buffer (pinned when CUDA is present), so nothing is allocated here.
// The raw op checks what it indexes with (DESIGN.md §2.5): every index in [0, Na + Nb), shapes and dtypes, dense
// rows, out's rows disjoint and not sharing memory with a source — all before the first row is written.
// A rejected call raises ValueError (TORCH_CHECK_VALUE; TypeError for a wrong dtype or None), as the wrapper does.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "row_overlap.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace mplus {
namespace {

using at::Tensor;

// Elements of one row (dims >= 1), which must be contiguous: element (r, ...) lives at r * stride(0) + offset.
int64_t dense_row_elems(const char* what, const Tensor& t) {
  TORCH_CHECK_TYPE(t.defined(), "gather_rows_: ", what, " must be a tensor, got None");
  TORCH_CHECK_VALUE(t.device().is_cpu(), "gather_rows_: ", what, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() >= 1, "gather_rows_: ", what, " must have a row dimension, got ", t.sizes());
  int64_t expected = 1;
  for (int64_t dim = t.dim() - 1; dim >= 1; --dim) {
    // (an empty tensor addresses nothing, and torch gives empty views any strides)
    TORCH_CHECK_VALUE(t.numel() == 0 || t.size(dim) == 1 || t.stride(dim) == expected, "gather_rows_: ", what, " ",
                      t.sizes(), " must have contiguous rows (dims >= 1), got strides ", t.strides());
    expected *= t.size(dim);
  }
  return expected;
}

void check_source(const char* what, const Tensor& src, const Tensor& out, int64_t row_elems) {
  dense_row_elems(what, src);
  TORCH_CHECK_VALUE(src.dim() == out.dim() && src.sizes().slice(1) == out.sizes().slice(1), "gather_rows_: ", what,
                    " ", src.sizes(), " must be [N, *F] with the row shape of out ", out.sizes());
  TORCH_CHECK_TYPE(src.scalar_type() == out.scalar_type(), "gather_rows_: ", what, " has dtype ", src.scalar_type(),
                   ", out has ", out.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(!rows_overlap(row_set(out, 1, row_elems), row_set(src, 1, row_elems)), "gather_rows_: out ",
                    out.sizes(), " (strides ", out.strides(), ") and ", what, " ", src.sizes(), " (strides ",
                    src.strides(), ") share memory; out must be a separate buffer");
}

void gather_rows_cpu(const Tensor& out, const Tensor& src_a, const Tensor& src_b, const Tensor& index) {
  const int64_t row_elems = dense_row_elems("out", out);
  // out is written: two rows at one address (an expand()ed or stride-0 out) would race and keep only one of them.
  TORCH_CHECK_VALUE(out.size(0) <= 1 || row_elems == 0 || out.stride(0) >= row_elems, "gather_rows_: out ",
                    out.sizes(), " with strides ", out.strides(), " has overlapping rows (an expand()ed or stride-0 "
                    "view?); expected a row stride >= the row size of ", row_elems, " elements");
  check_source("src_a", src_a, out, row_elems);
  check_source("src_b", src_b, out, row_elems);
  TORCH_CHECK_TYPE(index.defined(), "gather_rows_: index must be a tensor, got None");
  TORCH_CHECK_VALUE(index.dim() == 1 && index.scalar_type() == at::kLong && index.is_contiguous() &&
                        index.device().is_cpu() && index.size(0) == out.size(0),
                    "gather_rows_: index must be a contiguous CPU int64 [R=", out.size(0), "] tensor, got ",
                    index.scalar_type(), " ", index.sizes(), " on ", index.device());
  const int64_t n_a = src_a.size(0), total = n_a + src_b.size(0), rows = out.size(0);
  if (rows == 0) return;
  // Every index is checked, also for zero-byte rows (nothing would be read, but the call is still malformed).
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_VALUE(idx[r] >= 0 && idx[r] < total, "gather_rows_: index [", rows, "] has index[", r, "]=",
                      idx[r], ", expected rows of [src_a; src_b] in [0, Na + Nb = ", n_a, " + ", total - n_a, " = ",
                      total, ")");
  }
  const int64_t row = row_elems * static_cast<int64_t>(out.element_size());
  if (row == 0) return;
  const char* a = static_cast<const char*>(src_a.data_ptr());
  const char* b = static_cast<const char*>(src_b.data_ptr());
  char* o = static_cast<char*>(out.data_ptr());
  const int64_t sa = src_a.stride(0) * src_a.element_size(), sb = src_b.stride(0) * src_b.element_size();
  const int64_t so = out.stride(0) * out.element_size();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / row);  // ~64 KiB per task
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = idx[r];
      const char* src = i < n_a ? a + i * sa : b + (i - n_a) * sb;
      std::memcpy(o + r * so, src, row);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mplus, CPU, m) { m.impl("gather_rows_", &gather_rows_cpu); }

}  // namespace mplus
