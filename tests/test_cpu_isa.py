"""Runtime ISA dispatch of the C++ CPU kernels (csrc/cpu/isa.h): the levels, their detection (CPU flags, the OS's AMX
permission), switching them, MPLUS_CPU_ISA, and that the built extension runs on any x86-64 CPU (only the
ISA-specific kernels use AVX instructions, only the bf16 levels' the AVX512_BF16 ones).

The kernels' own parity and bad-input tests run once per level (the ``cpu_isa`` fixture in conftest.py, used by
tests/test_attention_cpu.py, tests/test_retrieval.py, ...): a level this CPU lacks is reported as skipped, with the
feature it lacks. tests/test_cpu_isa_bf16.py holds the tests of the bf16 levels' own kernels.
"""

from __future__ import annotations

import math
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mplus_kernels as mk
from mplus_kernels import _backend, _config
from mplus_kernels.testing import assert_equal

if not _backend.cpp_available():  # a missing build is a failure, not a skip
    raise ImportError(f"the C++ extension did not load: {_backend.cpp_import_error()}")

X86 = platform.machine().lower() in ("x86_64", "amd64")
ROOT = Path(__file__).resolve().parents[1]


def _attention_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 40, 8, 64, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(1, 40, 2, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    mk_, mv = (torch.randn(1, 300, 2, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    return q, k, v, mk_, mv, None, None, None, 1 / math.sqrt(64), True


def test_levels_are_listed_lowest_first_and_the_best_is_active():
    levels = mk.cpu_isa_levels()
    assert [name for name, _ in levels] == list(_config.CPU_ISA_LEVELS)
    assert levels[0] == ("baseline", True)
    supported = mk.supported_cpu_isas()
    if X86:
        flags = _cpu_flags()
        avx512 = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl"}
        assert ("avx2" in supported) == (flags >= {"avx2", "fma", "f16c"})
        assert ("avx512" in supported) == (flags >= avx512)
        assert ("avx512_bf16" in supported) == (flags >= avx512 | {"avx512_bf16"})
        if not flags >= avx512 | {"avx512_bf16", "amx_tile", "amx_bf16"}:
            assert "amx" not in supported
        elif "amx" not in supported:  # the CPU has it: only the OS or torch's brgemm may be missing, and say so
            assert re.search(r"OS|oneDNN|brgemm", mk.cpu_isa_missing("amx")), mk.cpu_isa_missing("amx")
    else:
        assert supported == ["baseline"]
    env = {k: v for k, v in os.environ.items() if k != "MPLUS_CPU_ISA"}
    fresh = _python("import mplus_kernels as mk; print(mk.cpu_isa())", env)
    assert fresh == supported[-1]


def test_a_lacking_level_names_what_is_missing():
    for level, ok in mk.cpu_isa_levels():
        missing = mk.cpu_isa_missing(level)
        if ok:
            assert missing is None, (level, missing)
        else:
            assert missing, level
            flags = _cpu_flags() if X86 else None
            if flags is None:
                assert "x86-64" in missing, missing
            elif level in ("avx512_bf16", "amx") and "avx512_bf16" not in flags:
                assert "avx512" in missing, missing  # the feature itself, or the level below
            elif level == "amx" and not flags >= {"amx_tile", "amx_bf16"}:
                assert "amx_tile" in missing, missing
    with pytest.raises(ValueError, match="not one of"):
        mk.cpu_isa_missing("sse9")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo to compare the detected features with")
    match = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(match.group(1).split()) if match else set()


def _python(code: str, env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc.stdout.strip()


@pytest.mark.parametrize("level", _config.CPU_ISA_LEVELS)
def test_each_level_runs_and_agrees_with_the_others(level):
    if level not in mk.supported_cpu_isas():
        pytest.skip(f"{level} not run: {mk.cpu_isa_missing(level)}")
    args = _attention_case()
    with mk.use_cpu_isa("baseline"):
        base, base_lse = torch.ops.mplus.memory_attention(*args)
    with mk.use_cpu_isa(level):
        assert mk.cpu_isa() == level
        out, lse = torch.ops.mplus.memory_attention(*args)
    ref, ref_lse = mk.memory_attention_reference(*(a.float() if torch.is_tensor(a) else a for a in args[:5]), *args[5:])
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.float(), base.float(), atol=1e-2, rtol=1e-2)  # one bf16 rounding apart at most


def test_switching_level_is_validated_and_restored():
    before = mk.cpu_isa()
    with pytest.raises(ValueError, match="not one of auto, baseline, avx2, avx512, avx512_bf16, amx"):
        mk.set_cpu_isa("avx9000")
    with pytest.raises(TypeError, match="must be a str"):
        mk.set_cpu_isa(2)
    assert mk.cpu_isa() == before
    with pytest.raises(RuntimeError, match="boom"), mk.use_cpu_isa("baseline"):
        assert mk.cpu_isa() == "baseline"
        raise RuntimeError("boom")
    assert mk.cpu_isa() == before
    mk.set_cpu_isa("auto")
    assert mk.cpu_isa() == mk.supported_cpu_isas()[-1]
    mk.set_cpu_isa(before)


def test_a_level_the_cpu_lacks_is_refused():
    lacking = [name for name, ok in mk.cpu_isa_levels() if not ok]
    if not lacking:
        pytest.skip("this CPU runs every level")
    before = mk.cpu_isa()
    with pytest.raises(ValueError, match=f"'{lacking[0]}' is not supported by this CPU") as err:
        mk.set_cpu_isa(lacking[0])
    assert mk.cpu_isa_missing(lacking[0]) in str(err.value)  # the refusal says what is missing
    assert mk.cpu_isa() == before
    env = {**os.environ, "MPLUS_CPU_ISA": lacking[0]}
    proc = subprocess.run([sys.executable, "-c", "import mplus_kernels"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and f"MPLUS_CPU_ISA={lacking[0]}" in proc.stderr


def test_env_var_picks_the_level_at_import():
    code = (
        "import torch, mplus_kernels as mk, tests.test_cpu_isa as t; "
        "out, _ = torch.ops.mplus.memory_attention(*t._attention_case()); "
        "print(mk.cpu_isa(), out.view(torch.int16).long().sum().item())"
    )
    env = {**os.environ, "MPLUS_CPU_ISA": "baseline", "PYTHONPATH": str(ROOT)}
    level, checksum = _python(code, env).split()
    assert level == "baseline"
    with mk.use_cpu_isa("baseline"):
        out, _ = torch.ops.mplus.memory_attention(*_attention_case())
    assert int(checksum) == out.view(torch.int16).long().sum().item()  # the same kernel ran there
    bad = subprocess.run(
        [sys.executable, "-c", "import mplus_kernels"],
        env={**os.environ, "MPLUS_CPU_ISA": "sse9"},
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "MPLUS_CPU_ISA='sse9' is not one of" in bad.stderr


def test_results_of_one_level_do_not_change_with_the_active_level_of_another_call():
    """The level is read per call: switching between calls gives each level's own, repeatable bits."""
    args = _attention_case(seed=3)
    outs = {}
    for level in mk.supported_cpu_isas() * 2:
        with mk.use_cpu_isa(level):
            out, _ = torch.ops.mplus.memory_attention(*args)
        if level in outs:
            assert_equal(out, outs[level], name=f"second call at {level}")
        outs[level] = out


@pytest.mark.skipif(not X86, reason="the ISA variants exist on x86-64 only")
def test_only_the_isa_kernels_use_avx_instructions():
    """Built without -march: every function of the extension outside the ISA namespaces (mplus::avx2, mplus::avx512,
    mplus::avx512_bf16, mplus::amx) is plain x86-64 (no VEX/EVEX instruction, no ymm/zmm/mask register), mplus::avx2
    uses no AVX-512 state, and only the two bf16 levels use AVX512_BF16 instructions (vdpbf16ps, vcvtneps2bf16). This
    is what lets the extension load and run on any x86-64 CPU; a -march=native build fails it with hundreds of
    functions. (The amx level's tiles are oneDNN's JIT code, called through libtorch: none is in this library.)"""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    from mplus_kernels import _C

    text = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", "-C", _C.__file__], capture_output=True, text=True, check=True
    ).stdout
    outside, avx2_with_512, bf16_outside = set(), set(), set()
    function = ""
    for line in text.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        insn = parts[1]
        uses_avx = insn.startswith("v") or re.search(r"%[yz]mm|%k[0-7]\b", insn) is not None
        if not uses_avx:
            continue
        if not re.search(r"mplus::(avx2|avx512|avx512_bf16|amx)::", function):
            outside.add(function)
        elif "mplus::avx2::" in function and re.search(r"%zmm|%k[0-7]\b", insn):
            avx2_with_512.add(function)
        if re.match(r"v(dpbf16ps|cvtne2?ps2bf16)", insn) and not re.search(r"mplus::(avx512_bf16|amx)::", function):
            bf16_outside.add(function)
    assert not outside, f"{len(outside)} functions outside the ISA kernels use AVX, e.g. {sorted(outside)[:3]}"
    assert not avx2_with_512, f"AVX2 kernels use AVX-512 registers: {sorted(avx2_with_512)[:3]}"
    assert not bf16_outside, f"functions below the bf16 levels use AVX512_BF16: {sorted(bf16_outside)[:3]}"


def test_info_prints_the_active_level_and_what_each_lacking_level_lacks():
    out = _python("import mplus_kernels.info as i; print(i.report())", dict(os.environ))
    assert f"cpp ISA level: {mk.cpu_isa()}" in out
    for level, ok in mk.cpu_isa_levels():
        if not ok:  # visibly not run, with the reason
            assert f"{level} [not run here: {mk.cpu_isa_missing(level)}]" in out


def test_amx_level_needs_onednn():
    """The amx level runs its bf16 products on oneDNN (ATen's brgemm): with oneDNN switched off, a call at that level
    says so instead of running something else, and the level reports it as missing."""
    if "amx" not in mk.supported_cpu_isas():
        pytest.skip(f"amx not run: {mk.cpu_isa_missing('amx')}")
    q = torch.randn(1, 40, 4, 64).to(torch.bfloat16)
    k, v = (torch.randn(1, 40, 1, 64).to(torch.bfloat16) for _ in range(2))
    with mk.use_cpu_isa("amx"):
        with torch.backends.mkldnn.flags(enabled=False):
            assert "oneDNN is switched off" in (mk.cpu_isa_missing("amx") or "")
            with pytest.raises(RuntimeError, match=r"torch.backends.mkldnn.enabled = False"):
                torch.ops.mplus.memory_attention(q, k, v, None, None, None, None, None, 0.125, True)
        out, _ = torch.ops.mplus.memory_attention(q, k, v, None, None, None, None, None, 0.125, True)
    assert torch.isfinite(out).all()
