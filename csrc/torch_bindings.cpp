// The one schema block of the `mplus` op namespace (STYLE.md habit 3). Kernels register their implementations
// elsewhere (csrc/cpu/*.cpp: TORCH_LIBRARY_IMPL(mplus, CPU, m); Triton kernels: from Python for CUDA).
// Every op here has a fake kernel in mplus_kernels/<family>/op.py so torch.compile can trace it.
#include <Python.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "cpu/isa.h"

namespace {

// _C.cpu_isa() -> str: the ISA level the CPU kernels use now (csrc/cpu/isa.h).
PyObject* py_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(mplus::isa_name(mplus::active_isa())); }

// _C.set_cpu_isa(name): use that level from now on; ValueError for an unknown or unsupported one.
PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  if (name == nullptr) {
    PyErr_SetString(PyExc_TypeError, "set_cpu_isa: expected a str naming an ISA level");
    return nullptr;
  }
  try {
    mplus::set_active_isa(mplus::isa_from_name(name));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
  Py_RETURN_NONE;
}

// _C.cpu_isa_levels() -> list[tuple[str, bool]]: every level, lowest first, and whether this CPU can run it.
PyObject* py_cpu_isa_levels(PyObject*, PyObject*) {
  PyObject* out = PyList_New(mplus::kNumIsa);
  for (int i = 0; i < mplus::kNumIsa; ++i) {
    const auto isa = static_cast<mplus::Isa>(i);
    PyList_SET_ITEM(out, i, Py_BuildValue("(sO)", mplus::isa_name(isa), mplus::isa_supported(isa) ? Py_True : Py_False));
  }
  return out;
}

// _C.cpu_isa_missing(name) -> str: why this CPU / OS / torch cannot run that level ("" when it can).
PyObject* py_cpu_isa_missing(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  if (name == nullptr) {
    PyErr_SetString(PyExc_TypeError, "cpu_isa_missing: expected a str naming an ISA level");
    return nullptr;
  }
  try {
    return PyUnicode_FromString(mplus::isa_missing(mplus::isa_from_name(name)).c_str());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "The ISA level the CPU kernels use now."},
    {"set_cpu_isa", py_set_cpu_isa, METH_O, "Make the CPU kernels use this ISA level (it must be supported)."},
    {"cpu_isa_levels", py_cpu_isa_levels, METH_NOARGS, "[(level, supported by this CPU)], lowest level first."},
    {"cpu_isa_missing", py_cpu_isa_missing, METH_O, "Why this CPU cannot run the level ('' when it can)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
// `import mplus_kernels._C` loads this library, which runs the static op registrations below and in csrc/cpu.
// Ops are reached through torch.ops.mplus; the module itself only carries the CPU ISA level functions above.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(mplus, m) {
  // --- memory update (random drop), mplus_kernels/memory_update -------------------------------------------------
  // pos/order [L, N] int32 (slot -> logical position, logical position -> slot); victims [L, K] int64 logical
  // positions, sorted ascending and distinct per layer; slots[i] [L, N, *F_i] per-slot state (hidden, K/V, ages);
  // new_rows[i] [L, K, *F_i]; dropped[i] [L, K, *F_i] receives the victims' old rows in ascending logical order.
  m.def(
      "memory_update_(Tensor(a!) pos, Tensor(b!) order, Tensor victims, Tensor(c!)[] slots, Tensor[] new_rows, "
      "Tensor(d!)[] dropped) -> ()");

  // --- memory attention, mplus_kernels/attention -------------------------------------------------------------------
  // q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D] (chunk, rotated); mem_k, mem_v [B, M, Hkv, D] (memory, mem_k before RoPE);
  // mem_pos [M] int32 rows in [0, P) of rope_cos/rope_sin [P, D/2] fp32 (mem_pos None: mem_k used as given);
  // kv_len, kv_start [B] int32 per-row valid chunk keys (static cache; None: Tk and 0), 0 <= kv_start <= kv_len <= Tk.
  // Memory is fully visible to every query; query t of row b sees chunk key j iff kv_start[b] <= j < kv_len[b] and
  // (when `causal`) j <= t + kv_len[b] - Tq (bottom-right, aligned to the row's end). Returns out [B, Tq, Hq, D]
  // (q's dtype), lse [B, Hq, Tq] fp32 natural log; queries that see no key: out 0, lse -inf.
  m.def(
      "memory_attention(Tensor q, Tensor k, Tensor v, Tensor? mem_k, Tensor? mem_v, Tensor? mem_pos, "
      "Tensor? rope_cos, Tensor? rope_sin, float softmax_scale, bool causal, Tensor? kv_len=None, "
      "Tensor? kv_start=None) -> (Tensor out, Tensor lse)");
  // Its backward (FlashAttention-2 recompute from the saved lse; mplus_kernels/attention/backward.py is the
  // reference): grad_out [B, Tq, Hq, D] (q's dtype), grad_lse [B, Hq, Tq] fp32 (None: 0), out/lse the forward's
  // outputs; the other arguments as in memory_attention. Returns the gradients in their inputs' dtypes; an absent
  // memory gets dmem_k, dmem_v of shape [B, 0, Hkv, D]. Chunk keys outside [kv_start, kv_len) get gradient 0.
  m.def(
      "memory_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor? mem_k, "
      "Tensor? mem_v, Tensor? mem_pos, Tensor? rope_cos, Tensor? rope_sin, Tensor out, Tensor lse, "
      "float softmax_scale, bool causal, Tensor? kv_len, Tensor? kv_start) -> (Tensor dq, Tensor dk, Tensor dv, "
      "Tensor dmem_k, Tensor dmem_v)");
  // out_a, out_b [B, T, H, D]; lse_a, lse_b [B, H, T] fp32 -> exact merge over disjoint key sets.
  m.def("merge_attention_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> (Tensor out, Tensor lse)");
  // k [B, N, H, D] keys before RoPE (fp32 / bf16 / fp16); positions [N] int32 rows of rope_cos/rope_sin [P, D/2] fp32
  // -> [B, N, H, D] contiguous in k's dtype: each row rotated as the attention kernels rotate memory keys (fp32
  // products, rotate_half's convention), rounded once to k's dtype. What a generation's decode steps read instead
  // of rotating the same memory keys at every step (mplus/segments.py: MemoryKV.rotated).
  m.def("rotate_keys(Tensor k, Tensor positions, Tensor rope_cos, Tensor rope_sin) -> Tensor");

  // --- retriever scoring + top-K, mplus_kernels/retrieval --------------------------------------------------------
  // queries [T, ds]; keys [S1, ds]; keys2 [S2, ds] (optional second range, indices continue after S1).
  // score(s) = mean_t sigmoid(q_t . k_s) in fp32; returns the top min(k, S1+S2): indices int64 ascending, and
  // their scores fp32; ties at the boundary go to the lower index.
  m.def("retrieve_topk(Tensor queries, Tensor keys, Tensor? keys2, int k) -> (Tensor indices, Tensor scores)");
  // Retriever scores for training (SPEC.md §7.1, §7.3; mplus_kernels/retrieval/scores.py): queries [L, T, ds]
  // (T >= 1), keys [L, N, ds], one dtype of fp32 / bf16 / fp16 / fp64 -> w [L, N] = mean_t sigmoid(q_t . k_n), fp32
  // (fp64 for fp64 inputs). Never builds the [L, T, N] matrix.
  m.def("retriever_scores(Tensor queries, Tensor keys) -> Tensor");
  // Its backward, recomputing the dot products: grad [L, N] (w's dtype) -> dqueries [L, T, ds], dkeys [L, N, ds] in
  // the inputs' dtype; with s' = s(1 - s), dq_t = (1/T) sum_n g_n s'(q_t . k_n) k_n, dk_n = (g_n/T) sum_t s' q_t.
  m.def("retriever_scores_backward(Tensor grad, Tensor queries, Tensor keys) -> (Tensor dqueries, Tensor dkeys)");

  // --- long-term-memory row gather, mplus_kernels/gather -------------------------------------------------------
  // out [R, *F] (dense rows); src_a [Na, *F], src_b [Nb, *F]; index [R] int64 in [0, Na + Nb):
  // out[r] = src_a[index[r]] if index[r] < Na else src_b[index[r] - Na].
  m.def("gather_rows_(Tensor(a!) out, Tensor src_a, Tensor src_b, Tensor index) -> ()");
}
