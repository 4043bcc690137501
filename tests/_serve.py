"""What the serving tests share: the golden model, documents, and the single-process replay they compare with."""

from __future__ import annotations

import torch

from mplus import MPlusForCausalLM
from mplus.memory.serialization import state_tensors
from mplus.memory.state import MemoryState
from tests._golden import GOLDEN

MODEL = str(GOLDEN / "model")
MAX_LENGTH = 96


def golden() -> MPlusForCausalLM:
    return MPlusForCausalLM.from_pretrained(MODEL, max_length=MAX_LENGTH).eval()


def documents(n: int, seed: int, vocab: int = 256, length: int = 20) -> list[list[int]]:
    """``n`` documents of token ids (``length`` each, or of lengths 16..40 when ``length`` is 0)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [length or int(torch.randint(16, 41, (1,), generator=g)) for _ in range(n)]
    return [torch.randint(0, vocab, (s,), generator=g).tolist() for s in sizes]


def replay(model: MPlusForCausalLM, seed: int, docs: list[list[int]]) -> MemoryState:
    """A state made in this process, serially: the model's memory with its own generator (``seed``), then ``docs``
    injected in order — what every served history must equal."""
    state = model.new_memory(seed=seed)
    for doc in docs:
        model.inject(torch.tensor([doc], device=model.compute_device), memory=state, progress=False)
    return state


def assert_same_state(got: MemoryState, want: MemoryState) -> None:
    """Bit for bit: every tensor of the memory file, the drop generator's state included."""
    a, b = state_tensors(got), state_tensors(want)
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not differ, f"states differ in {differ}"


def greedy(model: MPlusForCausalLM, state: MemoryState, prompt: list[int], n: int) -> list[int]:
    """The single-process answer: greedy ``generate`` of ``prompt`` alone over ``state``, its new tokens."""
    ids = torch.tensor([prompt], device=model.compute_device)
    out = model.generate(ids, memory=state, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()
