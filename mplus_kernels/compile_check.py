"""Ahead-of-time compilation of every Triton kernel for real GPUs, on a machine without one.

``python -m mplus_kernels.compile_check [--json]`` compiles each launch configuration that the launchers can use
(each op family's ``triton_impl.compile_specs()``, and those of the other modules listed in ``SPEC_MODULES``) for
``GPUTarget("cuda", 80, 32)`` (A100) and ``GPUTarget("cuda", 90, 32)`` (H100, sm_90a), then reads the resource usage
of the cubin with the ``ptxas`` that ships in the triton wheel: registers per thread, spill stores/loads, and shared
memory. It exits non-zero when a kernel spills or needs more shared memory than the target has, or fails to compile.

Must run with ``TRITON_INTERPRET`` unset: the interpreter replaces ``@triton.jit`` functions by Python ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

OP_FAMILIES = ("memory_update", "attention", "retrieval", "gather")
# modules of a family that define kernels, each with a compile_specs() (default: the family's triton_impl only)
SPEC_MODULES = {
    "attention": ("triton_impl", "triton_backward", "triton_rotate"),
    "retrieval": ("triton_impl", "triton_scores"),
}

# Opt-in shared memory per block (bytes) and registers per SM.
TARGETS = {
    80: {"name": "sm_80 (A100)", "arch": "sm_80", "max_shared": 166912},
    90: {"name": "sm_90a (H100)", "arch": "sm_90a", "max_shared": 232448},
}


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One launch configuration of one Triton kernel."""

    name: str
    fn: Any  # a triton.JITFunction
    signature: dict[str, str]  # argument name -> Triton type ("*fp16", "i32", "constexpr", ...)
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2


@dataclasses.dataclass
class CompileResult:
    kernel: str
    target: str
    num_warps: int
    num_stages: int
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared_bytes: int | None = None
    max_shared: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and not self.spill_stores
            and not self.spill_loads
            and (self.shared_bytes or 0) <= self.max_shared
        )


def all_specs(families: tuple[str, ...] = OP_FAMILIES) -> list[KernelSpec]:
    specs: list[KernelSpec] = []
    for family in families:
        for module in SPEC_MODULES.get(family, ("triton_impl",)):
            specs.extend(importlib.import_module(f"mplus_kernels.{family}.{module}").compile_specs())
    return specs


def _ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def compile_one(spec: KernelSpec, cc: int) -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = TARGETS[cc]
    result = CompileResult(spec.name, target["name"], spec.num_warps, spec.num_stages, max_shared=target["max_shared"])
    try:
        src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs)
        compiled = triton.compile(
            src, target=GPUTarget("cuda", cc, 32), options={"num_warps": spec.num_warps, "num_stages": spec.num_stages}
        )
        result.shared_bytes = int(compiled.metadata.shared)
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            proc = subprocess.run(
                [_ptxas(), f"-arch={target['arch']}", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                capture_output=True,
                text=True,
            )
        if proc.returncode != 0:
            result.error = f"ptxas failed: {proc.stderr.strip()}"
            return result
        for field, pattern in _PTXAS_RE.items():
            found = pattern.findall(proc.stderr)
            setattr(result, field, max(int(x) for x in found) if found else 0)
    except Exception as exc:  # reported per kernel; the run fails at the end
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def run(families: tuple[str, ...] = OP_FAMILIES) -> list[CompileResult]:
    from . import _config

    if _config.triton_interpret():
        raise RuntimeError("compile_check needs compiled Triton kernels: run it with TRITON_INTERPRET unset")
    return [compile_one(spec, cc) for spec in all_specs(families) for cc in TARGETS]


def format_table(results: list[CompileResult]) -> str:
    head = f"{'kernel':40} {'target':15} {'warps':>5} {'stages':>6} {'regs':>5} {'spill':>7} {'smem':>8}  status"
    lines = [head, "-" * len(head)]
    for r in results:
        spill = f"{r.spill_stores or 0}/{r.spill_loads or 0}"
        status = "ok" if r.ok else (r.error or "SPILLS or SHARED MEMORY OVER LIMIT")
        lines.append(
            f"{r.kernel:40} {r.target:15} {r.num_warps:>5} {r.num_stages:>6} {r.registers or 0:>5} {spill:>7} "
            f"{r.shared_bytes or 0:>8}  {status}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--family", action="append", choices=OP_FAMILIES, help="only these op families")
    args = parser.parse_args(argv)
    results = run(tuple(args.family) if args.family else OP_FAMILIES)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) | {"ok": r.ok} for r in results], indent=1))
    else:
        print(format_table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
