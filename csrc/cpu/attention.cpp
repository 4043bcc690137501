// Memory attention and the exact merge of partial attentions on the CPU (DESIGN.md §2.1, SPEC.md §3.1, P8/P9/P15):
// the ops' argument checks, and the call into the kernels of the active ISA level (attention_impl.h, isa.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "attention_problem.h"
#include "isa.h"

namespace mplus {

#define MPLUS_DECLARE_ATTENTION(level)                                  \
  namespace level {                                                     \
  void attention_kernel(const attn::Problem& P, c10::ScalarType dtype); \
  void merge_kernel(const attn::MergeProblem& P);                       \
  void rotate_kernel(const attn::RotateProblem& P);                     \
  }
MPLUS_DECLARE_ATTENTION(baseline)
MPLUS_DECLARE_ATTENTION(avx2)
MPLUS_DECLARE_ATTENTION(avx512)
MPLUS_DECLARE_ATTENTION(avx512_bf16)
MPLUS_DECLARE_ATTENTION(amx)
#undef MPLUS_DECLARE_ATTENTION

namespace {

using at::Tensor;
using attn::Problem;
using attn::View;

constexpr float kLog2e = 1.4426950408889634f;
const IsaTable<void (*)(const Problem&, c10::ScalarType)> kAttention = MPLUS_ISA_TABLE(attention_kernel);
const IsaTable<void (*)(const attn::MergeProblem&)> kMerge = MPLUS_ISA_TABLE(merge_kernel);
const IsaTable<void (*)(const attn::RotateProblem&)> kRotate = MPLUS_ISA_TABLE(rotate_kernel);

View view_of(const Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// ---------------------------------------------------------------------------------------------------------------------
// ops
// ---------------------------------------------------------------------------------------------------------------------

// Argument checks raise ValueError (TORCH_CHECK_VALUE) or, for a wrong dtype, TypeError (TORCH_CHECK_TYPE), like
// the Python wrappers, and name the argument: a raw torch.ops call fails the same way a wrapper call does.
void check_defined(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK_TYPE(t.defined(), op, ": ", name, " must be a tensor, got None");
}

// A [B, T, H, D] operand of q's dtype; H < 0: any head count.
void check_operand(const char* name, const Tensor& t, const Tensor& q, int64_t B, int64_t H, int64_t D) {
  check_defined("memory_attention", name, t);
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.dim() == 4, "memory_attention: ", name, " must be a 4-D CPU tensor, got ",
                    t.sizes(), " on ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), "memory_attention: ", name, " has dtype ", t.scalar_type(),
                   ", expected q's dtype ", q.scalar_type());
  TORCH_CHECK_VALUE(t.size(0) == B && (H < 0 || t.size(2) == H) && t.size(3) == D, "memory_attention: ", name,
                    " has shape ", t.sizes(), ", expected [", B, ", T, ", H < 0 ? "Hkv" : std::to_string(H), ", ", D,
                    "]");
}

// The RoPE tables of head dim D: CPU float32 [P, D/2], rope_sin shaped like rope_cos.
void check_rope_tables(const char* op, const Tensor& rope_cos, const Tensor& rope_sin, int64_t D) {
  for (const auto& [name, t] : {std::pair{"rope_cos", &rope_cos}, std::pair{"rope_sin", &rope_sin}}) {
    check_defined(op, name, *t);
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(1) == D / 2 && t->device().is_cpu() &&
                          t->sizes() == rope_cos.sizes(),
                      op, ": ", name, " must be a CPU float32 [P, D/2=", D / 2, "] tensor shaped like rope_cos, got ",
                      t->scalar_type(), " ", t->sizes(), " on ", t->device());
  }
}

// Kernels read rows through strides but need each row (the last dim) dense; other layouts get a dense copy.
Tensor dense_rows(const Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

std::tuple<Tensor, Tensor> memory_attention_cpu(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                const std::optional<Tensor>& mem_k, const std::optional<Tensor>& mem_v,
                                                const std::optional<Tensor>& mem_pos,
                                                const std::optional<Tensor>& rope_cos,
                                                const std::optional<Tensor>& rope_sin, double softmax_scale,
                                                bool causal, const std::optional<Tensor>& kv_len,
                                                const std::optional<Tensor>& kv_start) {
  check_defined("memory_attention", "q", q_in);
  TORCH_CHECK_VALUE(q_in.device().is_cpu() && q_in.dim() == 4, "memory_attention: q must be a 4-D CPU tensor, got ",
                    q_in.sizes(), " on ", q_in.device());
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "memory_attention: q must be float32, bfloat16 or float16, got ", dtype);
  const int64_t B = q_in.size(0), Tq = q_in.size(1), Hq = q_in.size(2), D = q_in.size(3);
  TORCH_CHECK_VALUE(D <= 1024, "memory_attention: head dim ", D, " of q ", q_in.sizes(),
                    " is above the supported 1024");
  check_operand("k", k_in, q_in, B, -1, D);
  const int64_t Hkv = k_in.size(2);
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, "memory_attention: Hq=", Hq, " (q ", q_in.sizes(),
                    ") must be a multiple of Hkv=", Hkv, " (k ", k_in.sizes(), ")");
  check_operand("v", v_in, q_in, B, Hkv, D);
  TORCH_CHECK_VALUE(v_in.size(1) == k_in.size(1), "memory_attention: k ", k_in.sizes(), " and v ", v_in.sizes(),
                    " must have the same length");
  TORCH_CHECK_VALUE(mem_k.has_value() == mem_v.has_value(),
                    "memory_attention: give both mem_k and mem_v or neither (got only ",
                    mem_k.has_value() ? "mem_k" : "mem_v", ")");
  int64_t M = 0;
  if (mem_k.has_value()) {
    check_operand("mem_k", *mem_k, q_in, B, Hkv, D);
    check_operand("mem_v", *mem_v, q_in, B, Hkv, D);
    M = mem_k->size(1);
    TORCH_CHECK_VALUE(mem_v->size(1) == M, "memory_attention: mem_k ", mem_k->sizes(), " and mem_v ", mem_v->sizes(),
                      " must have the same length");
  }
  const Tensor q = dense_rows(q_in), k = dense_rows(k_in), v = dense_rows(v_in);
  Tensor mk, mv, pos, cos, sin;
  Problem P{B, Tq, k.size(1), M, Hq, Hkv, Hq / Hkv, D, view_of(q), view_of(k), view_of(v), {}, {},
            nullptr, nullptr, nullptr, 0, static_cast<float>(softmax_scale) * kLog2e, causal, nullptr, nullptr};
  if (mem_k.has_value()) {
    mk = dense_rows(*mem_k);
    mv = dense_rows(*mem_v);
    P.mk = view_of(mk);
    P.mv = view_of(mv);
  }
  if (mem_pos.has_value() && M > 0) {
    check_defined("memory_attention", "mem_pos", *mem_pos);
    TORCH_CHECK_VALUE(mem_pos->scalar_type() == at::kInt && mem_pos->dim() == 1 && mem_pos->size(0) == M &&
                          mem_pos->device().is_cpu(),
                      "memory_attention: mem_pos must be a CPU int32 [M=", M, "] tensor, got ",
                      mem_pos->scalar_type(), " ", mem_pos->sizes(), " on ", mem_pos->device());
    TORCH_CHECK_VALUE(D % 2 == 0, "memory_attention: RoPE (mem_pos given) needs an even head dim, got ", D);
    TORCH_CHECK_VALUE(rope_cos.has_value() && rope_sin.has_value(),
                      "memory_attention: mem_pos needs rope_cos/rope_sin");
    check_rope_tables("memory_attention", *rope_cos, *rope_sin, D);
    pos = mem_pos->contiguous();
    cos = rope_cos->contiguous();
    sin = rope_sin->contiguous();
    P.pos = pos.data_ptr<int32_t>();
    const int64_t rows = cos.size(0);
    const bool in_range = std::all_of(P.pos, P.pos + M, [&](int32_t p) { return p >= 0 && p < rows; });
    TORCH_CHECK_VALUE(in_range, "memory_attention: mem_pos values must lie in [0, ", rows,
                      ") (the rows of rope_cos/rope_sin)");
    P.cos = cos.data_ptr<float>();
    P.sin = sin.data_ptr<float>();
    P.rope_ld = D / 2;
  }
  // Per-row valid chunk keys: what the kernels index the cache with, so every value is checked here.
  const int64_t Tk = k.size(1);
  Tensor len_t, start_t;
  for (const auto& [name, t, dst] :
       {std::tuple{"kv_len", &kv_len, &len_t}, std::tuple{"kv_start", &kv_start, &start_t}}) {
    if (!t->has_value()) continue;
    const Tensor& x = **t;
    check_defined("memory_attention", name, x);
    TORCH_CHECK_VALUE(x.scalar_type() == at::kInt && x.dim() == 1 && x.size(0) == B && x.device().is_cpu(),
                      "memory_attention: ", name, " must be a CPU int32 [B=", B, "] tensor, got ", x.scalar_type(),
                      " ", x.sizes(), " on ", x.device());
    *dst = x.contiguous();
  }
  if (len_t.defined()) P.kv_len = len_t.data_ptr<int32_t>();
  if (start_t.defined()) P.kv_start = start_t.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t lo = P.chunk_begin(b), hi = P.chunk_end(b);
    TORCH_CHECK_VALUE(0 <= lo && lo <= hi && hi <= Tk, "memory_attention: batch row ", b,
                      " needs 0 <= kv_start <= kv_len <= Tk=", Tk, ", got kv_start=", lo, ", kv_len=", hi);
  }
  Tensor out = at::empty({B, Tq, Hq, D}, q.options());
  Tensor lse = at::empty({B, Hq, Tq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  P.out = out.data_ptr();
  P.lse = lse.data_ptr<float>();

  require_active_isa("memory_attention");
  kAttention.active()(P, dtype);
  return {out, lse};
}

std::tuple<Tensor, Tensor> merge_attention_states_cpu(const Tensor& out_a_in, const Tensor& lse_a,
                                                      const Tensor& out_b_in, const Tensor& lse_b) {
  const std::pair<const char*, const Tensor*> args[] = {
      {"out_a", &out_a_in}, {"lse_a", &lse_a}, {"out_b", &out_b_in}, {"lse_b", &lse_b}};
  for (const auto& [name, t] : args) {
    check_defined("merge_attention_states", name, *t);
    TORCH_CHECK_VALUE(t->device().is_cpu(), "merge_attention_states: ", name, " must be a CPU tensor, got ",
                      t->device());
  }
  TORCH_CHECK_VALUE(out_a_in.dim() == 4 && out_b_in.sizes() == out_a_in.sizes(), "merge_attention_states: out_a ",
                    out_a_in.sizes(), " and out_b ", out_b_in.sizes(), " must be [B, T, H, D] of the same shape");
  const int64_t B = out_a_in.size(0), T = out_a_in.size(1), H = out_a_in.size(2), D = out_a_in.size(3);
  for (const auto& [name, t] : {args[0], args[2]}) {
    const auto dt = t->scalar_type();
    TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "merge_attention_states: ", name,
                     " must be float32, bfloat16 or float16, got ", dt);
  }
  for (const auto& [name, t] : {args[1], args[3]}) {
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->dim() == 3 && t->size(0) == B && t->size(1) == H &&
                          t->size(2) == T,
                      "merge_attention_states: ", name, " must be float32 [B=", B, ", H=", H, ", T=", T, "], got ",
                      t->scalar_type(), " ", t->sizes());
  }
  const Tensor out_a = dense_rows(out_a_in), out_b = dense_rows(out_b_in);
  Tensor out = at::empty({B, T, H, D}, out_a.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor lse = at::empty({B, H, T}, lse_a.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  attn::MergeProblem P{B, T, H, D,
                       static_cast<const char*>(out_a.data_ptr()), static_cast<const char*>(out_b.data_ptr()),
                       {out_a.stride(0), out_a.stride(1), out_a.stride(2)},
                       {out_b.stride(0), out_b.stride(1), out_b.stride(2)},
                       out_a.scalar_type(), out_b.scalar_type(),
                       lse_a.data_ptr<float>(), lse_b.data_ptr<float>(),
                       {lse_a.stride(0), lse_a.stride(1), lse_a.stride(2)},
                       {lse_b.stride(0), lse_b.stride(1), lse_b.stride(2)},
                       static_cast<char*>(out.data_ptr()), lse.data_ptr<float>()};
  kMerge.active()(P);
  return {out, lse};
}

Tensor rotate_keys_cpu(const Tensor& k_in, const Tensor& positions, const Tensor& rope_cos, const Tensor& rope_sin) {
  check_defined("rotate_keys", "k", k_in);
  TORCH_CHECK_VALUE(k_in.device().is_cpu() && k_in.dim() == 4, "rotate_keys: k must be a 4-D CPU tensor [B, N, H, D], "
                    "got ", k_in.sizes(), " on ", k_in.device());
  const auto dtype = k_in.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "rotate_keys: k must be float32, bfloat16 or float16, got ", dtype);
  const int64_t B = k_in.size(0), N = k_in.size(1), H = k_in.size(2), D = k_in.size(3);
  TORCH_CHECK_VALUE(D % 2 == 0, "rotate_keys: k ", k_in.sizes(),
                    " must have an even head dim (RoPE mixes d and d + D/2)");
  check_defined("rotate_keys", "positions", positions);
  TORCH_CHECK_VALUE(positions.scalar_type() == at::kInt && positions.dim() == 1 && positions.size(0) == N &&
                        positions.device().is_cpu(),
                    "rotate_keys: positions must be a CPU int32 [N=", N, "] tensor, got ", positions.scalar_type(), " ",
                    positions.sizes(), " on ", positions.device());
  check_rope_tables("rotate_keys", rope_cos, rope_sin, D);
  const Tensor pos = positions.contiguous(), cos = rope_cos.contiguous(), sin = rope_sin.contiguous();
  const int32_t* p = pos.data_ptr<int32_t>();
  const int64_t rows = cos.size(0);
  for (int64_t n = 0; n < N; ++n) {  // every row the kernel indexes the tables with, before anything is written
    TORCH_CHECK_VALUE(p[n] >= 0 && p[n] < rows, "rotate_keys: positions[", n, "]=", p[n], " is outside [0, ", rows,
                      ") (the rows of rope_cos/rope_sin)");
  }
  const Tensor k = dense_rows(k_in);
  Tensor out = at::empty({B, N, H, D}, k.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  kRotate.active()(attn::RotateProblem{B, N, H, D, view_of(k), dtype, p, cos.data_ptr<float>(),
                                       sin.data_ptr<float>(), out.data_ptr()});
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mplus, CPU, m) {
  m.impl("rotate_keys", &rotate_keys_cpu);
  m.impl("memory_attention", &memory_attention_cpu);
  m.impl("merge_attention_states", &merge_attention_states_cpu);
}

}  // namespace mplus
