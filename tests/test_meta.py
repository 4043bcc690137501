"""The model on the meta device, the stand-in for a GPU (DESIGN.md §5): ``model.to("meta")`` moves everything the
hot path reads, leaves the long-term rows on the host, and inject, prefill (retrieval, zero-copy gather, attention,
LSE merge) and decode run with the fused kernels — a tensor left behind would raise a device mismatch, and a host
read of a device value raises (meta tensors have no data).

Also: what lives where after ``.to(dtype)`` / ``.to(device)``, and ``from_pretrained``'s Hugging Face spellings.
"""

from __future__ import annotations

import pytest
import torch
from _golden import GOLDEN

from mplus.model import MPlusForCausalLM
from mplus_kernels.testing import assert_equal

MODEL_DIR = str(GOLDEN / "model")


def _model(**kw) -> MPlusForCausalLM:
    return MPlusForCausalLM.from_pretrained(MODEL_DIR, max_length=64, **kw)


def _placement(model: MPlusForCausalLM) -> dict[str, tuple[torch.device, torch.dtype]]:
    """Every tensor of the model and its memory, by name, with its device and dtype."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    out = {n.removeprefix("memory."): (t.device, t.dtype) for n, t in tensors}  # the default state: model.memory
    out = {n: where for n, where in out.items() if not n.startswith("ltm.")}  # the store's buffers, named below
    ltm = model.ltm
    for name in ("hidden", "keys", "age", "rf"):
        for layer, t in enumerate(getattr(ltm, name)):
            out[f"ltm.{name}.{layer}"] = (t.device, t.dtype)
    for layer, pair in enumerate(ltm.kv):
        out[f"ltm.k.{layer}"], out[f"ltm.v.{layer}"] = ((t.device, t.dtype) for t in pair)
    for name in ("cache_hidden", "cache_keys", "cache_age"):
        out[f"ltm.{name}"] = (getattr(ltm, name).device, getattr(ltm, name).dtype)
    out["ltm.cache_kv.k"], out["ltm.cache_kv.v"] = ((t.device, t.dtype) for t in ltm.cache_kv)
    return out


HOST = ("ltm.hidden.", "ltm.rf.", "ltm.k.", "ltm.v.", "ltm.cache_hidden", "ltm.cache_kv.")
FLOAT64 = ("stm.age", "ltm.age.", "ltm.rf.", "ltm.cache_age")
FP32 = ("inv_freq", "rope_cos", "rope_sin")
INT32 = ("stm.pos", "stm.order")


def _expected(name: str, device: str, dtype: torch.dtype) -> tuple[torch.device, torch.dtype]:
    where = torch.device("cpu") if name.startswith(HOST) else torch.device(device)
    if name.startswith(FLOAT64):
        return where, torch.float64
    if name.startswith(FP32):
        return where, torch.float32
    if name.startswith(INT32):
        return where, torch.int32
    return where, dtype


@pytest.mark.parametrize(
    ("device", "dtype"), [("meta", torch.float32), ("cpu", torch.bfloat16), ("meta", torch.float16)]
)
def test_state_follows_the_model(device, dtype):
    """Hot-path state follows ``.to``; long-term rows and recall frequencies stay on the host; a dtype cast leaves
    ages float64, positions int32 and RoPE tables fp32."""
    model = _model().to(dtype).to(device)
    placement = _placement(model)
    assert len(placement) > 60
    wrong = {n: got for n, got in placement.items() if got != _expected(n, device, dtype)}
    assert not wrong, f"misplaced after .to({dtype}).to({device!r}): {wrong}"
    assert model.ltm.key_device.type == device


def test_cast_keeps_ages_exact():
    model = _model()
    model.stm.age += 0.1  # not representable in bf16
    ages = model.stm.age.clone(), model.ltm.age[0].clone()
    model.to(torch.bfloat16)
    assert_equal(model.stm.age, ages[0], name="STM ages after a bf16 cast")
    assert_equal(model.ltm.age[0], ages[1], name="LTM ages after a bf16 cast")


def test_from_pretrained_hugging_face_spellings():
    a = _model(torch_dtype=torch.bfloat16, device_map="cpu")
    assert a.lm_head.weight.dtype == torch.bfloat16 and a.stm.hidden.dtype == torch.bfloat16
    b = _model(dtype="float16", device_map={"": "meta"})
    assert b.lm_head.weight.dtype == torch.float16 and b.stm.k.device.type == "meta"
    c = _model(device="meta")
    assert c.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    with pytest.raises(ValueError, match="splits the model across devices"):
        _model(device_map={"model.layers.0": "cpu", "lm_head": "cpu"})
    with pytest.raises(ValueError, match="disagree"):
        _model(dtype=torch.float16, torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="not both"):
        _model(device="cpu", device_map="cpu")


@pytest.mark.parametrize("semantics", ["fast", "reference"])
def test_inject_prefill_decode_on_meta(semantics):
    """Five injections (two merges into the long-term memory), a prefill that retrieves from it, and decode steps, all
    with fused kernels on meta. Long-term rows stay on the host throughout."""
    model = _model(semantics=semantics).to("meta")
    cfg = model.config
    sizes = list(model.ltm.size)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        model.inject(torch.randint(0, cfg.vocab_size, (1, 20), generator=gen))
    assert model.ltm.size != sizes or model.ltm.cache_len, "the injections reached the long-term memory"
    assert model.ltm.hidden[0].device.type == "cpu" and model.ltm.kv[0][0].device.type == "cpu"
    prompt = torch.randint(0, cfg.vocab_size, (1, 7), generator=gen)
    out = model(prompt)
    assert out.logits.device.type == "meta" and out.logits.shape == (1, 7, cfg.vocab_size)
    cache = out.past_key_values
    assert all(r.device.type == "meta" and r.numel() == cfg.num_ltm_tokens for r in cache.retrieved)
    token = out.logits[:, -1:].argmax(-1)  # a device token: decode never reads it on the host
    for step in range(3):
        out = model(token, past_key_values=cache)
        token = out.logits[:, -1:].argmax(-1)
        assert cache.length == 8 + step
    assert token.device.type == "meta"


def test_meta_run_cannot_hide_a_host_read(monkeypatch):
    """The proxy is able to fail: a host read of a device value in the hot path raises on meta."""
    model = _model().to("meta")
    from mplus.memory import ltm as ltm_module

    original = ltm_module.LongTermMemory.retrieve

    def reads_index_on_host(self, *args, **kwargs):
        got = original(self, *args, **kwargs)
        got.index.tolist()  # what a CPU-side gather after retrieval would do
        return got

    monkeypatch.setattr(ltm_module.LongTermMemory, "retrieve", reads_index_on_host)
    with pytest.raises(Exception, match="meta"):
        model(torch.tensor([[1, 2, 3]]))


def test_official_memory_loads_on_meta():
    """``load_official_memory`` into a meta model: the checkpoint's rows go to the device for their K/V, which land in
    the host store without a host read of a device value (a ``.cpu()`` of the meta K/V raised before)."""
    from _golden import load_state

    from mplus.checkpoint import load_official_memory

    model = _model().to("meta")
    state = load_state(4)
    load_official_memory(model, state)
    assert model.ltm.size == [state[f"ltm.{layer}"].shape[0] for layer in range(3)]
    assert model.stm.k.device.type == "meta" and model.ltm.kv[0][0].device.type == "cpu"
    model(torch.tensor([[1, 2, 3]], device="meta"))


def test_a_training_step_runs_on_meta_with_no_host_read():
    """Issue 12: the training step (both passes, retrieval over the store and the step's own dropped rows, the
    retriever scores and loss, checkpointed layers) and its backward on the GPU stand-in: a tensor left on the host
    would raise a device mismatch, a host read of a device value would raise."""
    from mplus import training

    model = _model()
    training.prepare(model)
    model.eval()
    model.inject(torch.randint(0, 100, (1, 20)))
    model.to("meta")
    ctx, target = torch.randint(0, 100, (1, 20), device="meta"), torch.randint(0, 100, (1, 10), device="meta")
    out = training.training_step(model, [ctx, ctx], target, checkpointing=True, grad="all")
    assert out.loss.device.type == "meta" and out.loss.shape == ()
    out.loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.device.type == "meta" for p in trained)
