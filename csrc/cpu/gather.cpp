// Row gather from two sources into one output (long-term-memory retrieval, DESIGN.md §2.4):
// out[r] = index[r] < Na ? src_a[index[r]] : src_b[index[r] - Na]. Rows are moved with memcpy by all threads;
// the destination is a reusable staging buffer (pinned when CUDA is present), so nothing is allocated here.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstring>

namespace mplus {
namespace {

using at::Tensor;

int64_t dense_row_bytes(const char* what, const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "gather_rows_: ", what, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() >= 1, "gather_rows_: ", what, " must have a row dimension, got ", t.sizes());
  int64_t expected = 1;
  for (int64_t dim = t.dim() - 1; dim >= 1; --dim) {
    TORCH_CHECK(t.size(dim) == 1 || t.stride(dim) == expected, "gather_rows_: ", what,
                " must have contiguous rows, got strides ", t.strides());
    expected *= t.size(dim);
  }
  return expected * static_cast<int64_t>(t.element_size());
}

void gather_rows_cpu(const Tensor& out, const Tensor& src_a, const Tensor& src_b, const Tensor& index) {
  const int64_t row = dense_row_bytes("out", out);
  TORCH_CHECK(dense_row_bytes("src_a", src_a) == row && dense_row_bytes("src_b", src_b) == row,
              "gather_rows_: src_a ", src_a.sizes(), " and src_b ", src_b.sizes(), " rows must match out ",
              out.sizes());
  TORCH_CHECK(src_a.scalar_type() == out.scalar_type() && src_b.scalar_type() == out.scalar_type(),
              "gather_rows_: dtypes differ: out ", out.scalar_type(), ", src_a ", src_a.scalar_type(), ", src_b ",
              src_b.scalar_type());
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong && index.is_contiguous() &&
                  index.device().is_cpu() && index.size(0) == out.size(0),
              "gather_rows_: index must be a contiguous CPU int64 [", out.size(0), "] tensor, got ",
              index.scalar_type(), " ", index.sizes());
  const int64_t n_a = src_a.size(0), total = n_a + src_b.size(0), rows = out.size(0);
  if (rows == 0 || row == 0) return;
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(idx[r] >= 0 && idx[r] < total, "gather_rows_: index[", r, "]=", idx[r], " out of range [0, ",
                total, ")");
  }
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
