// Retriever scores for training on the CPU (issue 12, item 2; SPEC.md §7.1, §7.3): the ops' argument checks, the
// fp32 kernels of the active ISA level (retriever_scores_impl.h, isa.h) and a scalar fp64 path for fp64 inputs.
//
//   retriever_scores(queries [L, T, ds], keys [L, N, ds]) -> w [L, N], w[l, n] = mean_t sigmoid(q[l, t] . k[l, n]),
//     fp32 (fp64 for fp64 inputs);
//   retriever_scores_backward(grad [L, N], queries, keys) -> (dqueries [L, T, ds], dkeys [L, N, ds]) in the inputs'
//     dtype, with s' = s(1 - s): dq_t = (1/T) sum_n g_n s'(q_t . k_n) k_n, dk_n = (g_n/T) sum_t s'(q_t . k_n) q_t.
//
// Neither builds the [L, T, N] matrix (retriever_scores_impl.h says how). bf16 / fp16 inputs are widened to fp32
// (exact) and accumulate in fp32; fp64 inputs (gradcheck) take the fp64 path below, which accumulates in fp64 and
// recomputes each dot product where it needs it (it is for checking, not for speed). Every sum runs in an order fixed
// by the shapes: the results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "isa.h"
#include "retriever_scores_problem.h"

namespace mplus {

#define MPLUS_DECLARE_RETRIEVER_SCORES(level)              \
  namespace level {                                        \
  void retriever_scores_forward(const rsc::Problem& P);    \
  void retriever_scores_backward(const rsc::Problem& P);   \
  }
MPLUS_DECLARE_RETRIEVER_SCORES(baseline)
MPLUS_DECLARE_RETRIEVER_SCORES(avx2)
MPLUS_DECLARE_RETRIEVER_SCORES(avx512)
MPLUS_DECLARE_RETRIEVER_SCORES(avx512_bf16)
#undef MPLUS_DECLARE_RETRIEVER_SCORES

namespace {

using at::Tensor;

constexpr const char* kForwardOp = "retriever_scores";
constexpr const char* kBackwardOp = "retriever_scores_backward";
const IsaTable<void (*)(const rsc::Problem&)> kForward = MPLUS_ISA_TABLE_BF16(retriever_scores_forward);
const IsaTable<void (*)(const rsc::Problem&)> kBackward = MPLUS_ISA_TABLE_BF16(retriever_scores_backward);

// ---------------------------------------------------------------------------------------------------------------------
// argument checks (ValueError / TypeError naming the argument, its shape and what was expected; before any work)
// ---------------------------------------------------------------------------------------------------------------------

// queries [L, T >= 1, ds] and keys [L, N, ds], CPU, one dtype of fp32 / bf16 / fp16 / fp64.
void check_inputs(const char* op, const Tensor& queries, const Tensor& keys) {
  TORCH_CHECK_TYPE(queries.defined(), op, ": queries must be a tensor, got None");
  TORCH_CHECK_TYPE(keys.defined(), op, ": keys must be a tensor, got None");
  TORCH_CHECK_VALUE(queries.device().is_cpu(), op, ": queries must be a CPU tensor, got one on ", queries.device());
  TORCH_CHECK_VALUE(queries.dim() == 3, op, ": queries must be a 3-D [L, T, ds] tensor, got ", queries.dim(), "-D ",
                    queries.sizes());
  TORCH_CHECK_VALUE(queries.size(1) >= 1, op, ": queries ", queries.sizes(),
                    " hold no query (T = 0): the mean over queries is undefined");
  const auto dtype = queries.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble, op,
                   ": queries must be float32, bfloat16, float16 or float64, got ", dtype);
  TORCH_CHECK_VALUE(keys.device().is_cpu(), op, ": keys must be a CPU tensor, got one on ", keys.device());
  TORCH_CHECK_VALUE(keys.dim() == 3 && keys.size(0) == queries.size(0) && keys.size(2) == queries.size(2), op,
                    ": keys must be [L=", queries.size(0), ", N, ds=", queries.size(2), "] like queries ",
                    queries.sizes(), ", got ", keys.sizes());
  TORCH_CHECK_TYPE(keys.scalar_type() == dtype, op, ": keys have dtype ", keys.scalar_type(), ", queries have ", dtype,
                   "; they must match");
}

at::ScalarType score_dtype(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

// The kernels read rows with unit stride along ds (any layer and row strides); copy only when that is not so.
Tensor unit_ds(const Tensor& t) { return t.size(2) <= 1 || t.stride(2) == 1 ? t : t.contiguous(); }

rsc::Problem make_problem(const Tensor& q, const Tensor& k) {
  rsc::Problem P;
  P.dtype = q.scalar_type();
  P.L = q.size(0);
  P.T = q.size(1);
  P.N = k.size(1);
  P.ds = q.size(2);
  P.q = {q.data_ptr(), q.stride(0), q.stride(1)};
  P.k = {k.data_ptr(), k.stride(0), k.stride(1)};
  return P;
}

// ---------------------------------------------------------------------------------------------------------------------
// fp64: plain loops, fp64 throughout (sigmoid of |x| so that exp never overflows)
// ---------------------------------------------------------------------------------------------------------------------
double dot64(const double* a, const double* b, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}
double sigmoid64(double x) {
  const double e = std::exp(-std::fabs(x));
  return x >= 0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
}
double sigmoid_grad64(double x) {
  const double e = std::exp(-std::fabs(x));
  return e / ((1.0 + e) * (1.0 + e));
}

struct Rows64 {
  const double* data;
  int64_t layer, row;
  const double* at(int64_t l, int64_t r) const { return data + l * layer + r * row; }
};
Rows64 rows64(const Tensor& t) { return {t.data_ptr<double>(), t.stride(0), t.stride(1)}; }

void forward_f64(const Tensor& queries, const Tensor& keys, Tensor& w) {
  const Rows64 q = rows64(queries), k = rows64(keys);
  const int64_t T = queries.size(1), N = keys.size(1), ds = queries.size(2);
  double* out = w.data_ptr<double>();
  at::parallel_for(0, queries.size(0) * N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t l = i / N, n = i % N;
      double s = 0.0;
      for (int64_t t = 0; t < T; ++t) s += sigmoid64(dot64(q.at(l, t), k.at(l, n), ds));
      out[i] = s / static_cast<double>(T);
    }
  });
}

void backward_f64(const Tensor& grad, const Tensor& queries, const Tensor& keys, Tensor& dq, Tensor& dk) {
  const Rows64 q = rows64(queries), k = rows64(keys);
  const int64_t L = queries.size(0), T = queries.size(1), N = keys.size(1), ds = queries.size(2);
  const double* g = grad.data_ptr<double>();
  const double t_count = static_cast<double>(T);
  double *dq_out = dq.data_ptr<double>(), *dk_out = dk.data_ptr<double>();
  at::parallel_for(0, L * N, 4, [&](int64_t begin, int64_t end) {  // dk, per (layer, key)
    std::vector<double> acc(ds);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t l = i / N, n = i % N;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t t = 0; t < T; ++t) {
        const double sp = sigmoid_grad64(dot64(q.at(l, t), k.at(l, n), ds));
        for (int64_t d = 0; d < ds; ++d) acc[d] += sp * q.at(l, t)[d];
      }
      const double scale = g[i] / t_count;
      for (int64_t d = 0; d < ds; ++d) dk_out[i * ds + d] = acc[d] * scale;
    }
  });
  at::parallel_for(0, L * T, 4, [&](int64_t begin, int64_t end) {  // dq, per (layer, query)
    std::vector<double> acc(ds);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t l = i / T, t = i % T;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t n = 0; n < N; ++n) {
        const double c = g[l * N + n] * sigmoid_grad64(dot64(q.at(l, t), k.at(l, n), ds));
        for (int64_t d = 0; d < ds; ++d) acc[d] += c * k.at(l, n)[d];
      }
      for (int64_t d = 0; d < ds; ++d) dq_out[i * ds + d] = acc[d] / t_count;
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------------
// the ops
// ---------------------------------------------------------------------------------------------------------------------
Tensor retriever_scores_cpu(const Tensor& queries, const Tensor& keys) {
  check_inputs(kForwardOp, queries, keys);
  const int64_t L = queries.size(0), N = keys.size(1), ds = queries.size(2);
  const auto dtype = queries.scalar_type();
  Tensor w = at::empty({L, N}, queries.options().dtype(score_dtype(dtype)));
  if (L * N == 0) return w;
  if (ds == 0) return w.fill_(0.5);  // every q . k = 0
  const Tensor q = unit_ds(queries), k = unit_ds(keys);
  if (dtype == at::kDouble) {
    forward_f64(q, k, w);
    return w;
  }
  rsc::Problem P = make_problem(q, k);
  P.w = w.data_ptr<float>();
  kForward.active()(P);
  return w;
}

std::tuple<Tensor, Tensor> retriever_scores_backward_cpu(const Tensor& grad, const Tensor& queries,
                                                         const Tensor& keys) {
  check_inputs(kBackwardOp, queries, keys);
  const int64_t L = queries.size(0), N = keys.size(1), ds = queries.size(2);
  const auto dtype = queries.scalar_type();
  TORCH_CHECK_TYPE(grad.defined(), kBackwardOp, ": grad must be a tensor, got None");
  TORCH_CHECK_VALUE(grad.device().is_cpu() && grad.dim() == 2 && grad.size(0) == L && grad.size(1) == N, kBackwardOp,
                    ": grad must be a CPU [L=", L, ", N=", N, "] tensor (the gradient of the scores), got ",
                    grad.sizes(), " on ", grad.device());
  TORCH_CHECK_TYPE(grad.scalar_type() == score_dtype(dtype), kBackwardOp, ": grad must be ", score_dtype(dtype),
                   " (the scores' dtype for ", dtype, " inputs), got ", grad.scalar_type());
  Tensor dq = at::empty(queries.sizes(), queries.options());
  Tensor dk = at::empty(keys.sizes(), keys.options());
  if (L * N * ds == 0) {  // no key or no feature: dq is 0, dk is empty
    dq.zero_();
    return {dq, dk};
  }
  const Tensor q = unit_ds(queries), k = unit_ds(keys), g = grad.contiguous();
  if (dtype == at::kDouble) {
    backward_f64(g, q, k, dq, dk);
    return {dq, dk};
  }
  rsc::Problem P = make_problem(q, k);
  P.grad = g.data_ptr<float>();
  P.dq = dq.data_ptr();
  P.dk = dk.data_ptr();
  kBackward.active()(P);
  return {dq, dk};
}

}  // namespace

TORCH_LIBRARY_IMPL(mplus, CPU, m) {
  m.impl("retriever_scores", &retriever_scores_cpu);
  m.impl("retriever_scores_backward", &retriever_scores_backward_cpu);
}

}  // namespace mplus
