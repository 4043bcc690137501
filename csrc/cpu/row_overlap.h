// Memory-overlap checks for the raw ops that write rows (DESIGN.md §2.5): shared by memory_update.cpp and gather.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

namespace mplus {

// The rows of one argument as a kernel addresses them: up to two leading dims, row (a, b) is the bytes
// [base + a·s0 + b·s1, + row). Strides of size-1 dims are irrelevant and set to 0.
struct RowSet {
  int64_t base, n0, n1, s0, s1, row;
};

// `leading` = 1 or 2 leading dims; the rest of the tensor is one row of `row_elems` elements.
inline RowSet row_set(const at::Tensor& t, int leading, int64_t row_elems) {
  const int64_t es = static_cast<int64_t>(t.element_size());
  const int64_t n1 = leading > 1 ? t.size(1) : 1;
  const int64_t base = t.numel() > 0 ? static_cast<int64_t>(reinterpret_cast<intptr_t>(t.data_ptr())) : 0;
  const int64_t s0 = t.size(0) > 1 ? t.stride(0) * es : 0;
  const int64_t s1 = n1 > 1 ? t.stride(1) * es : 0;
  return {base, t.size(0), n1, s0, s1, row_elems * es};
}

inline int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

// Whether some row of `a` and some row of `b` share a byte. Exact, in O(n0), when the two step alike (equal byte
// strides on every leading dim both span: views of one buffer, e.g. dropped = a slice of the slots); otherwise only
// their byte spans are compared, and intersecting spans with unlike strides count as "not shown to overlap" (as
// ATen's overlap check answers "too hard"). Row (l, r) of a starts at A + l·s0 + r·s1, row (l', r') of b at
// B + l'·s0 + r'·s1; they overlap iff -row_b < (B - A) + dl·s0 + dr·s1 < row_a, dl = l' - l, dr = r' - r.
inline bool rows_overlap(const RowSet& a, const RowSet& b) {
  if (a.row == 0 || b.row == 0 || a.n0 * a.n1 == 0 || b.n0 * b.n1 == 0) return false;
  const int64_t a_end = a.base + (a.n0 - 1) * a.s0 + (a.n1 - 1) * a.s1 + a.row;
  const int64_t b_end = b.base + (b.n0 - 1) * b.s0 + (b.n1 - 1) * b.s1 + b.row;
  if (a_end <= b.base || b_end <= a.base) return false;
  if ((a.n0 > 1 && b.n0 > 1 && a.s0 != b.s0) || (a.n1 > 1 && b.n1 > 1 && a.s1 != b.s1)) return false;
  const int64_t s0 = a.n0 > 1 ? a.s0 : b.s0;
  const int64_t s1 = a.n1 > 1 ? a.s1 : b.s1;
  for (int64_t dl = -(a.n0 - 1); dl <= b.n0 - 1; ++dl) {
    const int64_t x = b.base - a.base + dl * s0;
    if (s1 == 0) {
      if (-b.row < x && x < a.row) return true;
      continue;
    }
    // integers dr with -row_b - x < dr·s1 < row_a - x, within [-(a.n1 - 1), b.n1 - 1]
    const int64_t lo = std::max(floor_div(-b.row - x, s1) + 1, -(a.n1 - 1));
    const int64_t hi = std::min(-floor_div(x - a.row, s1) - 1, b.n1 - 1);
    if (lo <= hi) return true;
  }
  return false;
}

}  // namespace mplus
