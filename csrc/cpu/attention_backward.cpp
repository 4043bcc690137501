// The backward of memory attention on the CPU (issue 12; DESIGN.md §6), FlashAttention-2 style: the probabilities
// are recomputed from the saved LSE (p = exp(scale · q·k − lse)), so no [Tq, M + Tk] matrix exists. The recurrence
// is mplus_kernels/attention/backward.py's (the reference these gradients are tested against):
//   Δ = rowsum(dO ∘ O),  dV += pᵀ·dO,  dP = dO·Vᵀ,  dS = p ∘ (dP − Δ + dlse),  dK += scale·dSᵀ·Q,  dQ += scale·dS·K
// Memory keys are rotated by RoPE at their positions before use, and their gradient rotated back at the end
// (dk = dk_rot·cos − rotate_half(dk_rot·sin)). Visibility is the forward's exact rule (csrc/torch_bindings.cpp).
//
// This file checks the arguments, makes fp32 copies of the operands (none for fp32 inputs with dense rows), computes
// the per-query constants (Δ, dlse), rotates the memory keys, calls the two-pass kernel of the active ISA level
// (attention_backward_impl.h, isa.h), rotates the memory keys' gradient back and casts each gradient to its input's
// dtype.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "attention_backward_problem.h"
#include "isa.h"

namespace mplus {

namespace baseline {
void attention_backward_kernel(const attn::BackwardProblem& P);
}
namespace avx2 {
void attention_backward_kernel(const attn::BackwardProblem& P);
}
namespace avx512 {
void attention_backward_kernel(const attn::BackwardProblem& P);
}
namespace avx512_bf16 {
void attention_backward_kernel(const attn::BackwardProblem& P);
}
namespace amx {
void attention_backward_kernel(const attn::BackwardProblem& P);
}

namespace {

using at::Tensor;

constexpr const char* kOp = "memory_attention_backward";
const IsaTable<void (*)(const attn::BackwardProblem&)> kBackward = MPLUS_ISA_TABLE(attention_backward_kernel);

// Δ's row sums, once per query (the kernels' dot products live in the ISA region).
float row_dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

attn::Rows rows_of(const Tensor& t) { return {t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)}; }

// ---------------------------------------------------------------------------------------------------------------------
// the op: argument checks (ValueError / TypeError naming the argument, before any work), fp32 copies, the kernel
// ---------------------------------------------------------------------------------------------------------------------

void check_defined(const char* name, const Tensor& t) {
  TORCH_CHECK_TYPE(t.defined(), kOp, ": ", name, " must be a tensor, got None");
}

// A [B, T, H, D] operand of q's dtype; H < 0: any head count; T < 0: any length.
void check_operand(const char* name, const Tensor& t, const Tensor& q, int64_t B, int64_t T, int64_t H, int64_t D) {
  check_defined(name, t);
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.dim() == 4, kOp, ": ", name, " must be a 4-D CPU tensor, got ", t.sizes(),
                    " on ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), kOp, ": ", name, " has dtype ", t.scalar_type(),
                   ", expected q's dtype ", q.scalar_type());
  TORCH_CHECK_VALUE(t.size(0) == B && (T < 0 || t.size(1) == T) && (H < 0 || t.size(2) == H) && t.size(3) == D, kOp,
                    ": ", name, " has shape ", t.sizes(), ", expected [", B, ", ", T < 0 ? "T" : std::to_string(T),
                    ", ", H < 0 ? "Hkv" : std::to_string(H), ", ", D, "]");
}

// A [B, Hq, Tq] float32 CPU tensor (lse, grad_lse).
void check_lse(const char* name, const Tensor& t, int64_t B, int64_t Hq, int64_t Tq) {
  check_defined(name, t);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, kOp, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.dim() == 3 && t.size(0) == B && t.size(1) == Hq && t.size(2) == Tq, kOp,
                    ": ", name, " must be a CPU [B=", B, ", Hq=", Hq, ", Tq=", Tq, "] tensor, got ", t.sizes(), " on ",
                    t.device());
}

// fp32 with dense rows (no copy for an fp32 input whose rows are dense).
Tensor fp32_rows(const Tensor& t) {
  Tensor f = t.to(at::kFloat);
  return f.size(-1) <= 1 || f.stride(-1) == 1 ? f : f.contiguous();
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> memory_attention_backward_cpu(
    const Tensor& grad_out, const std::optional<Tensor>& grad_lse, const Tensor& q_in, const Tensor& k_in,
    const Tensor& v_in, const std::optional<Tensor>& mem_k, const std::optional<Tensor>& mem_v,
    const std::optional<Tensor>& mem_pos, const std::optional<Tensor>& rope_cos, const std::optional<Tensor>& rope_sin,
    const Tensor& out_in, const Tensor& lse_in, double softmax_scale, bool causal, const std::optional<Tensor>& kv_len,
    const std::optional<Tensor>& kv_start) {
  check_defined("q", q_in);
  TORCH_CHECK_VALUE(q_in.device().is_cpu() && q_in.dim() == 4, kOp, ": q must be a 4-D CPU tensor, got ", q_in.sizes(),
                    " on ", q_in.device());
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, kOp,
                   ": q must be float32, bfloat16 or float16, got ", dtype);
  const int64_t B = q_in.size(0), Tq = q_in.size(1), Hq = q_in.size(2), D = q_in.size(3);
  check_operand("k", k_in, q_in, B, -1, -1, D);
  const int64_t Tk = k_in.size(1), Hkv = k_in.size(2);
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, kOp, ": Hq=", Hq, " (q ", q_in.sizes(), ") must be a multiple of Hkv=",
                    Hkv, " (k ", k_in.sizes(), ")");
  check_operand("v", v_in, q_in, B, Tk, Hkv, D);
  check_operand("grad_out", grad_out, q_in, B, Tq, Hq, D);
  check_operand("out", out_in, q_in, B, Tq, Hq, D);
  check_lse("lse", lse_in, B, Hq, Tq);
  if (grad_lse.has_value()) check_lse("grad_lse", *grad_lse, B, Hq, Tq);
  TORCH_CHECK_VALUE(mem_k.has_value() == mem_v.has_value(), kOp, ": give both mem_k and mem_v or neither (got only ",
                    mem_k.has_value() ? "mem_k" : "mem_v", ")");
  int64_t M = 0;
  if (mem_k.has_value()) {
    check_operand("mem_k", *mem_k, q_in, B, -1, Hkv, D);
    M = mem_k->size(1);
    check_operand("mem_v", *mem_v, q_in, B, M, Hkv, D);
  }
  const bool rope = mem_pos.has_value() && M > 0;
  Tensor pos, cos, sin;
  if (rope) {
    check_defined("mem_pos", *mem_pos);
    TORCH_CHECK_VALUE(mem_pos->scalar_type() == at::kInt && mem_pos->dim() == 1 && mem_pos->size(0) == M &&
                          mem_pos->device().is_cpu(),
                      kOp, ": mem_pos must be a CPU int32 [M=", M, "] tensor, got ", mem_pos->scalar_type(), " ",
                      mem_pos->sizes(), " on ", mem_pos->device());
    TORCH_CHECK_VALUE(D % 2 == 0, kOp, ": RoPE (mem_pos given) needs an even head dim, got ", D);
    TORCH_CHECK_VALUE(rope_cos.has_value() && rope_sin.has_value(), kOp, ": mem_pos needs rope_cos/rope_sin");
    for (const auto& [name, t] : {std::pair{"rope_cos", &*rope_cos}, std::pair{"rope_sin", &*rope_sin}}) {
      check_defined(name, *t);
      TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(1) == D / 2 &&
                            t->device().is_cpu() && t->sizes() == rope_cos->sizes(),
                        kOp, ": ", name, " must be a CPU float32 [P, D/2=", D / 2,
                        "] tensor shaped like rope_cos, got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
    }
    pos = mem_pos->contiguous();
    cos = rope_cos->contiguous();
    sin = rope_sin->contiguous();
    const int32_t* p = pos.data_ptr<int32_t>();
    const int64_t rows = cos.size(0);
    TORCH_CHECK_VALUE(std::all_of(p, p + M, [&](int32_t x) { return x >= 0 && x < rows; }), kOp,
                      ": mem_pos values must lie in [0, ", rows, ") (the rows of rope_cos/rope_sin)");
  }
  Tensor len_t, start_t;
  for (const auto& [name, t, dst] :
       {std::tuple{"kv_len", &kv_len, &len_t}, std::tuple{"kv_start", &kv_start, &start_t}}) {
    if (!t->has_value()) continue;
    const Tensor& x = **t;
    check_defined(name, x);
    TORCH_CHECK_VALUE(x.scalar_type() == at::kInt && x.dim() == 1 && x.size(0) == B && x.device().is_cpu(), kOp, ": ",
                      name, " must be a CPU int32 [B=", B, "] tensor, got ", x.scalar_type(), " ", x.sizes(), " on ",
                      x.device());
    *dst = x.contiguous();
  }
  const int32_t* lens = len_t.defined() ? len_t.data_ptr<int32_t>() : nullptr;
  const int32_t* starts = start_t.defined() ? start_t.data_ptr<int32_t>() : nullptr;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t lo = starts != nullptr ? starts[b] : 0, hi = lens != nullptr ? lens[b] : Tk;
    TORCH_CHECK_VALUE(0 <= lo && lo <= hi && hi <= Tk, kOp, ": batch row ", b, " needs 0 <= kv_start <= kv_len <= Tk=",
                      Tk, ", got kv_start=", lo, ", kv_len=", hi);
  }

  // ---- fp32 operands; the per-query constants lse (+inf: the query saw no key) and dlse − Δ
  const Tensor q = fp32_rows(q_in), k = fp32_rows(k_in), v = fp32_rows(v_in), dout = fp32_rows(grad_out);
  const Tensor o = fp32_rows(out_in);
  const Tensor lse_src = lse_in.contiguous();
  Tensor lse = at::empty({B, Hq, Tq}, q.options());
  Tensor coef = grad_lse.has_value() ? grad_lse->to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous()
                                     : at::zeros({B, Hq, Tq}, q.options());
  {
    const float* ls = lse_src.data_ptr<float>();
    float *ld = lse.data_ptr<float>(), *cd = coef.data_ptr<float>();
    at::parallel_for(0, B * Hq * Tq, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / (Hq * Tq), hq = r / Tq % Hq, t = r % Tq;
        const float l = ls[r];
        const bool empty = std::isinf(l) && l < 0;
        ld[r] = empty ? std::numeric_limits<float>::infinity() : l;
        const float* orow = o.data_ptr<float>() + b * o.stride(0) + t * o.stride(1) + hq * o.stride(2);
        const float* drow = dout.data_ptr<float>() + b * dout.stride(0) + t * dout.stride(1) + hq * dout.stride(2);
        cd[r] = empty ? 0.f : cd[r] - row_dot(drow, orow, D);
      }
    });
  }
  // memory keys rotated once, [B, M, Hkv, D] fp32
  Tensor mkr, mv;
  if (M > 0) {
    mv = fp32_rows(*mem_v);
    const Tensor mk = fp32_rows(*mem_k);
    if (rope) {
      mkr = at::empty({B, M, Hkv, D}, q.options());
      const int32_t* p = pos.data_ptr<int32_t>();
      const float *c = cos.data_ptr<float>(), *s = sin.data_ptr<float>();
      const int64_t half = D / 2;
      float* dst = mkr.data_ptr<float>();
      const attn::Rows src = rows_of(mk);
      at::parallel_for(0, B * M * Hkv, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t b = r / (M * Hkv), j = r / Hkv % M, h = r % Hkv;
          const float *x = src.row(b, j, h), *cj = c + p[j] * half, *sj = s + p[j] * half;
          float* y = dst + r * D;
          for (int64_t i = 0; i < half; ++i) {
            y[i] = x[i] * cj[i] - x[i + half] * sj[i];
            y[i + half] = x[i + half] * cj[i] + x[i] * sj[i];
          }
        }
      });
    } else {
      mkr = mk;
    }
  }

  Tensor dq = at::empty({B, Tq, Hq, D}, q.options());
  Tensor dk = at::zeros({B, Tk, Hkv, D}, q.options()), dv = at::zeros({B, Tk, Hkv, D}, q.options());
  Tensor dmk = at::empty({B, M, Hkv, D}, q.options()), dmv = at::empty({B, M, Hkv, D}, q.options());
  attn::BackwardProblem P{B, Tq, Tk, M, Hq, Hkv, Hq / Hkv, D, rows_of(q), rows_of(k), rows_of(v), {}, rows_of(dout),
                          {}, lse.data_ptr<float>(), coef.data_ptr<float>(), static_cast<float>(softmax_scale), causal,
                          lens, starts, dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(),
                          dmk.data_ptr<float>(), dmv.data_ptr<float>()};
  if (M > 0) {
    P.mk = rows_of(mkr);
    P.mv = rows_of(mv);
  }
  P.bf16 = dtype == at::kBFloat16;
  P.mk_rotated = rope;
  if (dq.numel() > 0) {
    require_active_isa(kOp);
    kBackward.active()(P);
  } else {  // no query (Tq = 0): every gradient is 0 (dq is empty)
    dmk.zero_();
    dmv.zero_();
  }

  // ---- the inverse rotation of the memory keys' gradient: dk = dk_rot·cos − rotate_half(dk_rot·sin)
  if (rope) {
    const int32_t* p = pos.data_ptr<int32_t>();
    const float *c = cos.data_ptr<float>(), *s = sin.data_ptr<float>();
    const int64_t half = D / 2;
    float* g = dmk.data_ptr<float>();
    at::parallel_for(0, B * M * Hkv, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t j = r / Hkv % M;
        const float *cj = c + p[j] * half, *sj = s + p[j] * half;
        float* y = g + r * D;
        for (int64_t i = 0; i < half; ++i) {
          const float a = y[i], b2 = y[i + half];
          y[i] = a * cj[i] + b2 * sj[i];
          y[i + half] = b2 * cj[i] - a * sj[i];
        }
      }
    });
  }
  const auto like = [](const Tensor& g, at::ScalarType t) { return t == at::kFloat ? g : g.to(t); };
  return {like(dq, dtype), like(dk, dtype), like(dv, dtype), like(dmk, dtype), like(dmv, dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(mplus, CPU, m) { m.impl("memory_attention_backward", &memory_attention_backward_cpu); }

}  // namespace mplus
