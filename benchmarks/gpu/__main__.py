"""``python -m benchmarks.gpu [--family F ...] [--out results.jsonl] [--budget-s S] [--quick]`` (repository root).

Runs the chosen families one after the other in this process, each within its share of the budget, appending one
JSON line per result to ``--out`` (so a run killed from outside keeps what it measured). Exit status 0 unless CUDA
is missing; failed cases are recorded, not raised. ``make gpu-check`` runs each family in its own process.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

FAMILIES = ("attention", "memory_update", "retrieval", "gather", "training")
# seconds each family may use on an H100/H200 (attention: most of it is FlexAttention's compilation)
BUDGET_S = {"attention": 80.0, "memory_update": 20.0, "retrieval": 35.0, "gather": 30.0, "training": 40.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", action="append", choices=FAMILIES, help="only these families (repeatable)")
    parser.add_argument("--out", help="append JSON lines here")
    parser.add_argument("--budget-s", type=float, help="seconds for all chosen families together (split by share)")
    parser.add_argument("--quick", action="store_true", help="fewer timed repetitions")
    args = parser.parse_args(argv)

    os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels only (before triton is imported)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    from ._harness import Recorder

    families = tuple(args.family) if args.family else FAMILIES
    share = sum(BUDGET_S[f] for f in families)
    total = args.budget_s if args.budget_s is not None else share
    for family in families:
        t0 = time.perf_counter()
        rec = Recorder(family, args.out, total * BUDGET_S[family] / share, quick=args.quick)
        try:
            importlib.import_module(f"benchmarks.gpu.{family}").run(rec)
        except Exception as exc:  # a family that cannot even start: recorded, the next one runs
            rec.note(family, error=f"{type(exc).__name__}: {exc}")
        rec.note(family, info="family done", wall_s=round(time.perf_counter() - t0, 2))
        del rec
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
