"""The benchmark records say where they were measured, and ``make bench``'s expected total covers what it runs.

* Every record of the committed results (``docs/bench/*.json``: ``results.json``, what the README's numbers come from,
  and ``levels.json``, every ISA level side by side) names the
  machine (``machine``: host, cores, memory), the CPU kind (``cpu``: model name and vector extensions) and the ISA
  level the C++ kernels ran at (``cpu_isa``) — what ``benchmarks/conftest.py`` writes into every record (issue 22).
* Every pattern of the quick subset (``benchmarks/conftest.py``'s ``QUICK``) selects a benchmark, and
  ``benchmarks/expected_s.json`` has a time for every benchmark of both runs, so the expected total printed at the start
  of ``make bench`` / ``make bench-full`` counts everything that runs.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "bench" / "results.json"
RECORDS = sorted((ROOT / "docs" / "bench").glob("*.json"))
EXPECTED = ROOT / "benchmarks" / "expected_s.json"
REQUIRED = ("machine", "cpu", "cpu_isa")


def records_missing_machine(data: dict) -> list[str]:
    """``"<benchmark>: <field>, ..."`` for every record of a pytest-benchmark JSON document lacking a non-empty
    machine field."""
    problems = []
    for record in data.get("benchmarks", []):
        info = record.get("extra_info", {})
        missing = [f for f in REQUIRED if not isinstance(info.get(f), str) or not info[f].strip()]
        if missing:
            problems.append(f"{record.get('fullname', record.get('name', '?'))}: {', '.join(missing)}")
    return problems


def test_the_check_reads_records():
    good = {"machine": "vm: 2 cpus, 23.5 GiB, Linux x86_64", "cpu": "AMD EPYC (avx2; no amx)", "cpu_isa": "avx512"}
    data = {"benchmarks": [{"fullname": "a", "extra_info": good}, {"fullname": "b", "extra_info": {"cpu_isa": "x"}}]}
    assert records_missing_machine(data) == ["b: machine, cpu"]


@pytest.mark.parametrize("path", RECORDS, ids=lambda p: p.name)
def test_committed_records_name_machine_cpu_and_isa(path):
    assert RESULTS in RECORDS, f"{RESULTS.relative_to(ROOT)} is missing"
    data = json.loads(path.read_text())
    assert data.get("benchmarks"), f"{path} holds no benchmark records"
    problems = records_missing_machine(data)
    assert not problems, (
        f"{len(problems)} of {len(data['benchmarks'])} records in {path.relative_to(ROOT)} lack "
        f"{'/'.join(REQUIRED)} (regenerate with make bench / make bench-full): " + "; ".join(problems[:5])
    )


def _collected(*args: str) -> list[str]:
    """``<file>::<test id>`` of every benchmark pytest collects with ``args``."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return [line.rpartition("/")[2] for line in out.stdout.splitlines() if "::" in line]


def _bench_conftest():
    """benchmarks/conftest.py as a module of its own (``conftest`` in ``sys.modules`` is this suite's)."""
    spec = importlib.util.spec_from_file_location("mplus_bench_conftest", ROOT / "benchmarks" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_subset_and_expected_times_cover_the_runs():
    bench = _bench_conftest()
    full, quick = _collected(), _collected("--bench-quick")
    assert quick == [k for k in full if bench.quick_selected(k)]
    unused = [p for p in bench.QUICK if not any(bench.matches(k, p) for k in full)]
    assert not unused, f"QUICK patterns that select no benchmark: {unused}"
    table = json.loads(EXPECTED.read_text())
    for mode, keys in (("full", full), ("quick", quick)):
        times = {**table.get("full", {}), **table.get(mode, {})}
        missing = [k for k in keys if k not in times]
        assert not missing, f"{EXPECTED.name} has no {mode} time for {missing[:10]} ({len(missing)} in all)"
