"""The harness that checks GPU code without a GPU, and the package's own tooling.

* every Triton kernel compiles ahead of time for sm_80 and sm_90a without spills or over-limit shared memory;
* ``python -m mplus_kernels.info`` reports the build;
* the tolerance helpers and the peak-memory meter detect what they claim to detect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mplus_kernels.testing import assert_close, assert_equal, assert_within_reference_error, measure_peak_memory

ROOT = Path(__file__).resolve().parents[1]


def _env_without_interpreter() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.fixture(scope="module")
def compile_results():
    proc = subprocess.run(
        [sys.executable, "-m", "mplus_kernels.compile_check", "--json"],
        capture_output=True,
        text=True,
        env=_env_without_interpreter(),
        cwd=ROOT,
        timeout=1200,
    )
    try:
        results = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"compile_check printed no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.returncode, results


def test_every_triton_kernel_compiles_for_sm80_and_sm90a(compile_results):
    code, results = compile_results
    failures = [r for r in results if not r["ok"]]
    assert not failures, "\n".join(f"{r['kernel']} on {r['target']}: {r}" for r in failures)
    assert code == 0
    per_kernel: dict[str, set] = {}
    for r in results:
        per_kernel.setdefault(r["kernel"], set()).add(r["target"])
        assert r["registers"] and r["registers"] <= 255, r
    assert per_kernel, "no Triton kernel was compiled"
    assert all(len(targets) == 2 for targets in per_kernel.values()), per_kernel


COVERAGE = """
import importlib, json
from triton.runtime.jit import JITFunction
from mplus_kernels import compile_check

out = {}
for family in compile_check.OP_FAMILIES:
    module = importlib.import_module(f"mplus_kernels.{family}.triton_impl")
    # launched kernels (``*_kernel``); jit helpers they call are compiled inside them
    defined = {name for name, obj in vars(module).items() if isinstance(obj, JITFunction) and name.endswith("_kernel")}
    specced = {spec.fn.__name__ for spec in module.compile_specs()}
    out[family] = {"defined": sorted(defined), "missing": sorted(defined - specced)}
print(json.dumps(out))
"""


def test_compile_check_covers_every_launcher_kernel(tmp_path):
    """Each launched jit kernel of a triton_impl module appears in its compile_specs(). Run without the interpreter:
    under it, kernels are not JITFunctions and there would be nothing to check."""
    script = tmp_path / "coverage.py"
    script.write_text(COVERAGE)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=_env_without_interpreter(), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for family, r in result.items():
        assert r["defined"], f"{family}: no jit kernel found in its triton_impl module"
        assert not r["missing"], f"{family}: kernels without a compile spec: {r['missing']}"


HOG = """
import json, dataclasses
import triton
import triton.language as tl
from mplus_kernels import compile_check

@triton.jit
def _hog(x_ptr, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    p = x_ptr + o[:, None] * BLOCK + o[None, :]
    b = tl.load(p)
    b = tl.cumsum(b, 0) * tl.cumsum(b, 1)
    tl.store(p, b)

spec = compile_check.KernelSpec("hog", _hog, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 128}, num_warps=2)
r = compile_check.compile_one(spec, 80)
print(json.dumps(dataclasses.asdict(r) | {"ok": r.ok}))
"""


def test_compile_check_flags_spills(tmp_path):
    """A kernel that must spill (a 128×128 fp32 tile live in two warps) compiles but is reported as not ok."""
    script = tmp_path / "hog.py"
    script.write_text(HOG)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=_env_without_interpreter(), timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["error"] is None, result
    assert result["spill_stores"] > 0 and not result["ok"], result


# ---------------------------------------------------------------------------------------------------------------------
def test_info_reports_backends():
    proc = subprocess.run([sys.executable, "-m", "mplus_kernels.info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"torch {torch.__version__}" in out
    assert "cpp (CPU kernels, mplus_kernels._C): built" in out
    assert "memory_update_" in out
    assert "avx512_bf16=" in out


def test_assert_helpers_detect_mismatches():
    a = torch.zeros(4, 3)
    b = a.clone()
    b[2, 1] = 1e-3
    assert_close(a, a)
    with pytest.raises(AssertionError, match=r"1 of 12 elements differ.*\(2, 1\)"):
        assert_close(b, a)
    with pytest.raises(AssertionError, match="must match exactly"):
        assert_equal(b, a)
    with pytest.raises(AssertionError, match="shape"):
        assert_close(a[:2], a)
    ref, lowp = torch.zeros(5), torch.full((5,), 0.01)
    assert_within_reference_error(torch.full((5,), 0.015), ref, lowp, atol_floor=0)
    with pytest.raises(AssertionError, match="exceeds 2.0×"):
        assert_within_reference_error(torch.full((5,), 0.03), ref, lowp, atol_floor=0)


def test_peak_memory_meter_sees_allocations():
    measure_peak_memory(lambda: torch.zeros(16).sum())  # a process's first op allocates torch's pools (~2.5 MiB)
    _, small = measure_peak_memory(lambda: torch.zeros(16).sum())
    _, big = measure_peak_memory(lambda: torch.ones(8 * 2**20).sum())  # 32 MiB, touched
    assert small < 2**20
    assert 31 * 2**20 <= big <= 40 * 2**20, big
