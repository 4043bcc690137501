"""``make gpu-check`` (``python3 -m tools.gpu_check``): validate mplus on a machine with an NVIDIA GPU, in < 10 min.

Made for a bare, offline machine with its own python3, torch (CUDA build), triton and transformers: nothing is
downloaded and no virtual environment is created. Phases, in order (``--only``/``--skip-*`` choose):

| phase     | what                                                                              | bound (default)  |
|-----------|-----------------------------------------------------------------------------------|------------------|
| (refuse)  | exit 2 with a message when ``torch.cuda.is_available()`` is False                 | —                |
| `build`   | ``mplus_kernels._C`` built in place, offline; skipped when newer than its sources | 240 s            |
| `env`     | GPU, SMs, memory, driver, torch/triton/CUDA/transformers versions, mplus backends  | 30 s             |
| `tests`   | the CUDA test files (:data:`CUDA_TESTS`: the ops and model, distributed training  | 210 s + 150 s    |
|           | over NCCL) on the GPU (TRITON_INTERPRET unset), then the rest of the suite as on  |                  |
|           | the CPU machines (Triton on CPU tensors under the interpreter)                     |                  |
| `compile` | ``python -m mplus_kernels.compile_check --json`` (sm_80/sm_90a, ptxas resources); | 240 s            |
|           | runs on the CPU *while the tests run* (``--serial`` to wait)                     |                  |
| `bench`   | ``python -m benchmarks.gpu``, one process per family, each within its budget      | 230 s in all     |

Every phase runs in a subprocess with a time limit (on expiry: SIGINT, so pytest still prints its summary, then
SIGKILL), and every phase's timeout is also clipped to ``--budget-s`` (default 570 s) minus what the later phases
need at least. Results: ``<out>/gpu_check.json`` (everything), ``<out>/gpu_check.md`` (the report, also printed),
and each phase's log. Exit status: 0 when the tests and the compile check passed, 1 when either failed or timed out
(or the build failed), 2 without a GPU or on bad arguments. Benchmark errors are reported, never fatal.

A bare machine without pytest: ``make gpu-check-wheels`` (on a machine with PyPI) fills ``gpu-check-wheels/`` with
pytest's pure-Python wheels; copied along, they are unpacked under ``<out>/_pydeps`` and put on ``PYTHONPATH``.

A cheap rerun: ``--only bench``, ``--only tests --pytest-args "-k attention"``, ``--bench-family gather``.

A tool of this repository, not part of the package (it drives a checkout: its tests, benchmarks and ``setup.py``),
so it lives in ``tools/`` and is not in the wheel. Run it from the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # tools/gpu_check/__init__.py -> the checkout
PHASES = ("build", "env", "tests", "compile", "bench")
BENCH_FAMILIES = ("attention", "memory_update", "retrieval", "gather", "training")
# the CUDA test files, run on the GPU with TRITON_INTERPRET unset (the rest of the suite runs as on the CPU machines)
CUDA_TESTS = ("tests/test_cuda.py", "tests/test_distributed_cuda.py")
# tests_cuda: 150 s for tests/test_cuda.py, 60 s for the distributed one (a spawned process: CUDA, NCCL, 4 steps)
TIMEOUTS = {"build": 240.0, "env": 30.0, "tests_cuda": 210.0, "tests_suite": 150.0, "compile": 240.0, "bench": 230.0}
# least time a later phase needs; an earlier phase's timeout is clipped so the later ones keep this much
MIN_S = {"build": 0.0, "env": 10.0, "tests": 60.0, "compile": 0.0, "bench": 90.0}
COMPILE_CHECK_TEST = "tests/test_toolchain.py::test_every_triton_kernel_compiles_for_sm80_and_sm90a"
GRACE_S = 20.0  # after SIGINT, before SIGKILL
TEST_COUNT_RE = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)")


# ---------------------------------------------------------------------------------------------------- subprocesses
@dataclasses.dataclass
class Run:
    cmd: list[str]
    log: str
    returncode: int | None = None
    seconds: float = 0.0
    timed_out: bool = False
    timeout_s: float = 0.0

    def text(self) -> str:
        try:
            return Path(self.log).read_text(errors="replace")
        except OSError:
            return ""

    def summary(self) -> dict[str, Any]:
        return {
            "cmd": shlex.join(self.cmd),
            "log": self.log,
            "returncode": self.returncode,
            "seconds": round(self.seconds, 1),
            "timed_out": self.timed_out,
            "timeout_s": round(self.timeout_s, 1),
        }


class Proc:
    """A subprocess in its own process group, its output in ``log``, stopped at ``timeout_s``."""

    def __init__(self, cmd: list[str], log: Path, timeout_s: float, env: dict[str, str] | None = None) -> None:
        self.run = Run(cmd, str(log), timeout_s=max(1.0, timeout_s))
        self._t0 = time.monotonic()
        self._file = open(log, "w")  # noqa: SIM115 - closed in wait()
        self._file.write(f"$ {shlex.join(cmd)}\n")
        self._file.flush()
        self._p = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=self._file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

    def wait(self) -> Run:
        left = self.run.timeout_s - (time.monotonic() - self._t0)
        try:
            self.run.returncode = self._p.wait(timeout=max(0.1, left))
        except subprocess.TimeoutExpired:
            self.run.timed_out = True
            self._signal(signal.SIGINT)  # pytest prints its summary on KeyboardInterrupt
            try:
                self.run.returncode = self._p.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.run.returncode = self._p.wait()
        self.run.seconds = time.monotonic() - self._t0
        self._file.close()
        return self.run

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._p.pid, sig)  # the group this Proc started (start_new_session), nothing else


EXTRA_PATHS: list[str] = []  # pure-Python packages unpacked from --wheelhouse (pytest on a bare machine)


def _env(interpret: bool | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *EXTRA_PATHS, *filter(None, [env.get("PYTHONPATH")])])
    env["PIP_NO_INDEX"] = "1"  # nothing a phase runs may reach a package index
    env.setdefault("PYTHONUNBUFFERED", "1")
    if interpret is True:
        env["TRITON_INTERPRET"] = "1"
    elif interpret is False:
        env.pop("TRITON_INTERPRET", None)
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------------- the check
class GpuCheck:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.py = args.python or sys.executable
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + args.budget_s
        self.results: dict[str, Any] = {
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "argv": sys.argv[1:],
            "python": self.py,
            "root": str(ROOT),
            "phases": {},
        }
        self.failed: list[str] = []

    # ------------------------------------------------------------------------------------------------ budget
    def timeout(self, cap: float, later: tuple[str, ...]) -> float:
        reserve = sum(MIN_S[p] for p in later if p in self.args.phases)
        return max(5.0, min(cap, self.deadline - time.monotonic() - reserve))

    def phase(self, name: str, status: str, seconds: float, **info: Any) -> None:
        self.results["phases"][name] = {"status": status, "seconds": round(seconds, 1), **info}
        print(f"gpu-check: {name}: {status} ({seconds:.0f} s)", flush=True)

    def later(self, name: str) -> tuple[str, ...]:
        order = ("build", "env", "tests", "bench")  # compile runs alongside the tests
        return order[order.index(name) + 1 :] if name in order else ()

    # ------------------------------------------------------------------------------------------------ build
    def so_path(self) -> Path:
        suffix = subprocess.run(
            [self.py, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"],
            capture_output=True, text=True, timeout=30,
        ).stdout.strip() or sysconfig.get_config_var("EXT_SUFFIX")  # fmt: skip
        return ROOT / "mplus_kernels" / f"_C{suffix}"

    def build_needed(self) -> tuple[bool, str]:
        so = self.so_path()
        if not so.exists():
            return True, f"{so.name} not built"
        sources = [ROOT / "setup.py", *ROOT.glob("csrc/**/*")]
        newest = max((p.stat().st_mtime for p in sources if p.is_file()), default=0.0)
        if newest > so.stat().st_mtime:
            return True, f"sources newer than {so.name}"
        probe = subprocess.run(
            [self.py, "-c", "import mplus_kernels._C"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60
        )
        if probe.returncode != 0:
            return True, f"{so.name} does not load: {probe.stderr.strip().splitlines()[-1:]}"
        return False, f"{so.name} is newer than its sources and loads"

    def _module_version(self, module: str) -> str | None:
        code = f"import {module} as m; print(getattr(m, '__version__', 'present'))"
        r = subprocess.run([self.py, "-c", code], capture_output=True, text=True, timeout=60)
        return r.stdout.strip() if r.returncode == 0 else None

    def build(self) -> None:
        t0 = time.monotonic()
        needed, why = self.build_needed()
        if not needed and not self.args.rebuild:
            self.phase("build", "up to date", time.monotonic() - t0, reason=why)
            return
        tools = {m: self._module_version(m) for m in ("pip", "setuptools", "wheel", "ninja")}
        tools["ninja (binary)"] = shutil.which("ninja")
        setuptools_v = tuple(int(x) for x in re.findall(r"\d+", tools["setuptools"] or "0")[:2])
        attempts: list[tuple[str, list[str], dict[str, str]]] = []
        jobs = {"MAX_JOBS": str(os.cpu_count() or 4)}
        # pip's editable install needs PEP 660 in setuptools (>= 64) and bdist_wheel (built in from 70.1, else wheel)
        editable = setuptools_v >= (64,) and (setuptools_v >= (70, 1) or bool(tools["wheel"]))
        if tools["pip"] and tools["setuptools"] and editable:
            pip = [self.py, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation", "-e", str(ROOT)]
            attempts.append(("pip install -e (offline)", pip, _env(**jobs)))
        if tools["setuptools"]:
            inplace = [self.py, "setup.py", "build_ext", "--inplace"]
            attempts.append(("setup.py build_ext --inplace", inplace, _env(**jobs)))
        runs = []
        for label, cmd, env in attempts:
            timeout = self.timeout(TIMEOUTS["build"], self.later("build")) - (time.monotonic() - t0)
            if timeout < 10:
                break
            run = Proc(cmd, self.out / f"build-{len(runs) + 1}.log", timeout, env).wait()
            runs.append({"how": label, **run.summary()})
            loads = run.returncode == 0 and not self.build_needed()[0]
            if loads:
                status = "built" + (f" with {label}" if label != attempts[0][0] else "")
                self.phase("build", status, time.monotonic() - t0, reason=why, tools=tools, attempts=runs)
                return
        self.failed.append("build")
        hint = "" if tools["setuptools"] else " (setuptools is not installed: it is needed to build the extension)"
        self.phase("build", "FAILED" + hint, time.monotonic() - t0, reason=why, tools=tools, attempts=runs)

    # ------------------------------------------------------------------------------------------------ env
    def env(self) -> None:
        t0 = time.monotonic()
        timeout = self.timeout(TIMEOUTS["env"], self.later("env"))
        run = Proc([self.py, "-m", "tools.gpu_check", "--probe-env"], self.out / "env.log", timeout, _env()).wait()
        text = run.text()
        info = _first_json(text, "{")
        info = info if isinstance(info, dict) else {}
        self.results["env"] = info
        status = "ok" if run.returncode == 0 and info else "FAILED (see env.log)"
        self.phase("env", status, time.monotonic() - t0, run=run.summary())
        if info:
            print(format_env(info), flush=True)

    # ------------------------------------------------------------------------------------------------ tests
    def ensure_pytest(self) -> str | None:
        """None when ``pytest`` imports in the phases' python, else why not. A bare machine may lack it: then the
        pure-Python wheels of ``--wheelhouse`` (``make gpu-check-wheels`` on a machine with PyPI) are unpacked
        under the results directory and put on ``PYTHONPATH`` — nothing is installed into the machine's python."""
        probe = [self.py, "-c", "import pytest"]
        if subprocess.run(probe, env=_env(), capture_output=True, timeout=60).returncode == 0:
            return None
        house = Path(self.args.wheelhouse).resolve()
        wheels = sorted(house.glob("*-py3-none-any.whl")) if house.is_dir() else []
        if not wheels:
            return (
                f"pytest is not installed for {self.py} and {house} holds no wheels: run `make gpu-check-wheels` on a "
                "machine with PyPI access and copy that folder here (or install pytest)"
            )
        target = self.out / "_pydeps"
        shutil.rmtree(target, ignore_errors=True)
        used = []
        for wheel in wheels:  # a pure-Python wheel is a zip of importable packages
            name = wheel.name.split("-")[0].lower()  # pytest, pluggy, iniconfig, packaging, pygments: = import name
            have = [self.py, "-c", f"import {name}"]
            if name != "pytest" and subprocess.run(have, capture_output=True, timeout=60).returncode == 0:
                continue  # the machine's own copy wins (PYTHONPATH would shadow it)
            with zipfile.ZipFile(wheel) as z:
                z.extractall(target)
            used.append(wheel.name)
        EXTRA_PATHS.insert(0, str(target))
        r = subprocess.run(probe, env=_env(), capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            return f"pytest does not import even from the wheels of {house}: {r.stderr.strip()[-300:]}"
        self.results["pytest_from_wheels"] = used
        print(f"gpu-check: pytest from {house} ({', '.join(used)})", flush=True)
        return None

    def tests(self, compile_proc: Proc | None) -> None:
        t0 = time.monotonic()
        missing = self.ensure_pytest()
        if missing:
            self.failed.append("tests")
            self.results["tests"] = {}
            self.phase("tests", f"NOT RUN: {missing}", time.monotonic() - t0)
            if compile_proc is not None:
                self.finish_compile(compile_proc)
            return
        extra = shlex.split(self.args.pytest_args or "")
        common = ["-q", "-p", "no:cacheprovider", "--durations=10", *extra]
        sub: dict[str, Any] = {}
        cuda_cmd = [self.py, "-m", "pytest", *CUDA_TESTS, *common]
        suite_cmd = [self.py, "-m", "pytest", "tests", *(f"--ignore={path}" for path in CUDA_TESTS), *common]
        if "compile" in self.args.phases:  # the compile phase runs the same compile check (2+ min): not twice
            suite_cmd.insert(4, f"--deselect={COMPILE_CHECK_TEST}")
        interpret = self.args.suite_mode == "interpret"
        plan = [("cuda", cuda_cmd, False, TIMEOUTS["tests_cuda"])]
        if not self.args.cuda_tests_only:
            plan.append(("suite", suite_cmd, interpret, TIMEOUTS["tests_suite"]))
        for i, (name, cmd, interp, cap) in enumerate(plan):
            cap = self.args.tests_timeout or cap
            # the suite's share of the remaining time leaves the benchmarks their minimum
            timeout = self.timeout(cap, self.later("tests"))
            if i == 0 and len(plan) > 1:
                timeout = min(timeout, max(30.0, self.deadline - time.monotonic() - MIN_S["bench"] - 60.0))
            run = Proc(cmd, self.out / f"tests-{name}.log", timeout, _env(interpret=interp)).wait()
            sub[name] = {
                **run.summary(),
                "triton_interpret": interp,
                **parse_pytest(run.text()),
            }
        ok = all(s["returncode"] == 0 and not s["timed_out"] for s in sub.values())
        if not ok:
            self.failed.append("tests")
        status = "passed" if ok else "FAILED" + (" (timed out)" if any(s["timed_out"] for s in sub.values()) else "")
        self.results["tests"] = sub
        self.phase("tests", status, time.monotonic() - t0)
        if compile_proc is not None:
            self.finish_compile(compile_proc)

    # ------------------------------------------------------------------------------------------------ compile
    def start_compile(self) -> Proc:
        self._compile_t0 = time.monotonic()
        cmd = [self.py, "-m", "mplus_kernels.compile_check", "--json"]
        timeout = self.args.compile_timeout or TIMEOUTS["compile"]
        if "tests" not in self.args.phases or self.args.serial:
            timeout = self.timeout(timeout, ("bench",))
        return Proc(cmd, self.out / "compile_check.log", timeout, _env(interpret=False))

    def finish_compile(self, proc: Proc) -> None:
        run = proc.wait()
        text = run.text()
        results = _first_json(text, "[")
        results = results if isinstance(results, list) else []
        bad = [r for r in results if not r.get("ok")]
        with open(self.out / "compile_check.json", "w") as f:
            json.dump(results, f, indent=1)
        ok = run.returncode == 0 and not run.timed_out and results and not bad
        if not ok:
            self.failed.append("compile")
        self.results["compile_check"] = {
            **run.summary(),
            "kernels": len(results),
            "ok": sum(1 for r in results if r.get("ok")),
            "failures": bad,
            "results": results,
        }
        if ok:
            status = f"{len(results)} launch configurations ok"
        elif run.timed_out:
            status = "FAILED (timed out)"
        elif not results:
            status = "FAILED (no results: see compile_check.log)"
        else:
            status = f"FAILED ({len(bad)} of {len(results)})"
        self.phase("compile", status, time.monotonic() - self._compile_t0)

    # ------------------------------------------------------------------------------------------------ bench
    def bench(self) -> None:
        t0 = time.monotonic()
        families = self.args.bench_family or list(BENCH_FAMILIES)
        path = self.out / "bench.jsonl"
        path.unlink(missing_ok=True)
        share = {"attention": 80.0, "memory_update": 20.0, "retrieval": 35.0, "gather": 30.0, "training": 40.0}
        runs = []
        for i, family in enumerate(families):
            cap = self.args.bench_timeout or TIMEOUTS["bench"]
            left = min(cap - (time.monotonic() - t0), self.deadline - time.monotonic())
            rest = sum(share[f] for f in families[i:])
            budget = max(5.0, left * share[family] / rest - 12.0)  # 12 s: start-up of torch + CUDA in the process
            if left < 15:
                runs.append({"family": family, "skipped": f"bench budget spent ({left:.0f} s left)"})
                continue
            cmd = [self.py, "-m", "benchmarks.gpu", "--family", family, "--out", str(path), "--budget-s"]
            cmd.append(f"{budget:.0f}")
            if self.args.quick:
                cmd.append("--quick")
            run = Proc(cmd, self.out / f"bench-{family}.log", budget + 45.0, _env(interpret=False)).wait()
            runs.append({"family": family, **run.summary()})
        records = []
        if path.exists():
            for line in path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    records.append(json.loads(line))
        self.results["bench"] = {"runs": runs, "records": records}
        errors = sum(1 for r in records if r.get("error"))
        timed = sum(1 for r in records if "median_ms" in r)
        status = f"{timed} timings, {errors} errors" + (
            ", some families stopped early" if any(r.get("timed_out") or r.get("returncode") for r in runs) else ""
        )
        self.phase("bench", status, time.monotonic() - t0)

    # ------------------------------------------------------------------------------------------------ all
    def run_all(self) -> int:
        phases = self.args.phases
        if "build" in phases:
            self.build()
        if "env" in phases:
            self.env()
        compile_proc = None
        if "compile" in phases and "tests" in phases and not self.args.serial:
            compile_proc = self.start_compile()  # CPU-only work, alongside the GPU tests
        if "tests" in phases:
            self.tests(compile_proc)
        elif "compile" in phases:
            self.finish_compile(self.start_compile())
        if "compile" in phases and "tests" in phases and self.args.serial:
            self.finish_compile(self.start_compile())
        if "bench" in phases:
            self.bench()
        self.results["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        self.results["failed"] = self.failed
        self.results["status"] = "FAILED" if self.failed else "passed"
        with open(self.out / "gpu_check.json", "w") as f:
            json.dump(self.results, f, indent=1, default=str)
        report = format_report(self.results)
        (self.out / "gpu_check.md").write_text(report)
        print("\n" + report, flush=True)
        print(f"gpu-check: {self.results['status']}; results in {self.out}/gpu_check.{{json,md}}", flush=True)
        return 1 if self.failed else 0


# ---------------------------------------------------------------------------------------------------- parsing
def _first_json(text: str, opener: str) -> Any:
    """The first JSON value that starts a line with ``opener`` in a log (warnings may come before or after it)."""
    decoder = json.JSONDecoder()
    for line_start in [0, *(m.end() for m in re.finditer("\n", text))]:
        if text.startswith(opener, line_start):
            with contextlib.suppress(json.JSONDecodeError):
                return decoder.raw_decode(text, line_start)[0]
    return None


def parse_pytest(text: str) -> dict[str, Any]:
    counts: dict[str, int] = {}
    summary = ""
    for line in text.splitlines()[::-1]:
        if TEST_COUNT_RE.search(line) and (" in " in line or "Interrupted" in line or line.startswith("=")):
            summary = line.strip("= ").strip()
            for n, what in TEST_COUNT_RE.findall(line):
                counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
            break
    failures = [ln.strip() for ln in text.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    return {"summary": summary, "counts": counts, "failures": failures[:200]}


# ---------------------------------------------------------------------------------------------------- environment
def probe_env() -> dict[str, Any]:
    """Run inside the machine's python (a subprocess of the check, after the build)."""
    import platform

    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
    }
    for module in ("triton", "transformers", "flash_attn", "numpy", "safetensors", "setuptools", "ninja", "pytest"):
        try:
            info[module] = __import__(module).__version__
        except Exception as exc:  # absent, or present and broken: both worth a line
            info[module] = f"not importable ({type(exc).__name__})"
    info["gpus"] = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        info["gpus"].append(
            {
                "name": p.name,
                "capability": f"{p.major}.{p.minor}",
                "sms": p.multi_processor_count,
                "memory_gib": round(p.total_memory / 2**30, 1),
                "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
            }
        )
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            q = "name,driver_version,memory.total,clocks.max.sm,power.limit"
            r = subprocess.run([smi, f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True,
                               timeout=15)  # fmt: skip
            info["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            info["nvidia_smi"] = f"failed: {exc}"
    nvcc = shutil.which("nvcc")
    if nvcc:
        r = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=15)
        info["nvcc"] = (r.stdout.strip().splitlines() or [""])[-1]
    import mplus
    from mplus_kernels import info as mk_info

    info["mplus_path"] = str(Path(mplus.__file__).parent)
    info["mplus_backends"] = mk_info.report()
    return info


def format_env(info: dict[str, Any]) -> str:
    gpus = "; ".join(
        f"{g['name']} (sm_{g['capability'].replace('.', '')}, {g['sms']} SMs, {g['memory_gib']} GiB, "
        f"L2 {g['l2_mib']} MiB)"
        for g in info.get("gpus", [])
    )
    rows = [
        ("GPU", gpus or "none"),
        ("driver (nvidia-smi)", info.get("nvidia_smi", "-")),
        ("python", f"{info.get('python')} on {info.get('platform')}, {info.get('cpus')} CPUs"),
        ("torch", f"{info.get('torch')} (CUDA {info.get('torch_cuda')}, cuDNN {info.get('cudnn')})"),
        ("triton", info.get("triton")),
        ("transformers", info.get("transformers")),
        ("flash-attn", info.get("flash_attn")),
        ("nvcc", info.get("nvcc", "not found")),
        ("setuptools / ninja", f"{info.get('setuptools')} / {info.get('ninja')}"),
        ("mplus", info.get("mplus_path")),
    ]
    lines = ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    backends = info.get("mplus_backends")
    if backends:
        lines += ["", "```", backends, "```"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- report
def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def _bench_table(records: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    groups: dict[str, list[dict[str, Any]]] = {}
    notes = []
    for r in records:
        if r.get("note"):
            if r.get("error") or (r.get("info") and r.get("info") != "family done"):
                notes.append(f"* {r['group']}: {r.get('error') or r.get('info')}")
            continue
        groups.setdefault(r["group"], []).append(r)
    for group, rows in groups.items():
        mplus = next((r for r in rows if r["provider"].startswith("mplus") and "median_ms" in r), None)
        shape = rows[0].get("shape", "")
        lines += [
            "",
            f"**{group}** ({shape}, {rows[0].get('dtype', '')})",
            "",
            "| provider | median | mplus speed-up | TFLOP/s | GB/s | peak extra | setup | notes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if "median_ms" not in r:
                why = r.get("error") or r.get("skipped") or "?"
                lines.append(f"| {r['provider']} | - | - | - | - | - | - | {why[:300].replace('|', '/')} |")
                continue
            speed = "-"
            if mplus is not None and not r["provider"].startswith("mplus"):
                speed = f"{r['median_ms'] / mplus['median_ms']:.2f}×"
            notes_r = []
            for key in ("max_abs_diff_vs_mplus", "selection_overlap_vs_mplus", "matches_mplus"):
                if key in r:
                    value = f"{r[key]:.3g}" if isinstance(r[key], float) else str(r[key])
                    notes_r.append(f"{key.replace('_', ' ')}: {value}")
            cells = [
                r["provider"],
                f"{r['median_ms']:.3f} ms",
                speed,
                f"{r['tflops']:.1f}" if "tflops" in r else "-",
                f"{r['gbps']:.0f}" if "gbps" in r else "-",
                _bytes(r.get("peak_extra_bytes")),
                f"{r.get('setup_s', 0):.1f} s",
                "; ".join(notes_r),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", *notes]
    return lines


def format_report(res: dict[str, Any]) -> str:
    lines = [f"# mplus gpu-check: {res.get('status', '?')}", "", f"{res.get('started')} → {res.get('finished')}", ""]
    lines += ["| phase | status | time |", "|---|---|---|"]
    for name, p in res["phases"].items():
        lines.append(f"| {name} | {p['status']} | {p['seconds']:.0f} s |")
    if res.get("env"):
        lines += ["", "## Environment", "", format_env(res["env"])]
    build = res["phases"].get("build")
    if build and build.get("attempts"):
        lines += ["", "## Build", ""]
        for a in build["attempts"]:
            lines.append(f"* {a['how']}: exit {a['returncode']} in {a['seconds']:.0f} s (`{a['log']}`)")
        lines.append(f"* tools: {build.get('tools')}")
    if res.get("tests"):
        lines += ["", "## Tests", ""]
        for name, t in res["tests"].items():
            mode = "TRITON_INTERPRET=1" if t["triton_interpret"] else "compiled Triton"
            extra = " — TIMED OUT" if t["timed_out"] else ""
            lines.append(f"* **{name}** ({mode}): {t['summary'] or 'no summary'}{extra} (`{t['log']}`)")
            lines += [f"  * {f[:300]}" for f in t["failures"][:40]]
            if len(t["failures"]) > 40:
                lines.append(f"  * … {len(t['failures']) - 40} more in the log")
    cc = res.get("compile_check")
    if cc:
        lines += ["", "## Compile check", "", f"{cc['ok']} of {cc['kernels']} launch configurations ok "
                  f"({cc['seconds']:.0f} s, `{cc['log']}`)"]  # fmt: skip
        if cc["failures"]:
            lines += ["", "| kernel | target | warps | stages | regs | spill st/ld | smem | error |", "|---" * 8 + "|"]
            for r in cc["failures"][:40]:
                lines.append(
                    f"| {r['kernel']} | {r['target']} | {r['num_warps']} | {r['num_stages']} | {r.get('registers')} | "
                    f"{r.get('spill_stores')}/{r.get('spill_loads')} | {r.get('shared_bytes')} | "
                    f"{(r.get('error') or 'spills or shared memory over the limit')[:200]} |"
                )
    bench = res.get("bench")
    if bench:
        lines += [
            "",
            "## Benchmarks",
            "",
            "CUDA events, L2 flushed before each call, median; speed-up = the provider's time / mplus's time; "
            "peak extra = max_memory_allocated above the start of one call.",
        ]
        for r in bench["runs"]:
            if r.get("skipped"):
                lines.append(f"* {r['family']}: {r['skipped']}")
            elif r.get("timed_out") or r.get("returncode"):
                late = ", timed out" if r.get("timed_out") else ""
                lines.append(f"* {r['family']}: stopped (exit {r.get('returncode')}{late}; `{r['log']}`)")
        lines += _bench_table(bench["records"])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- main
def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m tools.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", choices=PHASES, help="run only these phases (repeatable)")
    for phase in PHASES:
        p.add_argument(f"--skip-{phase}", action="store_true", help=f"skip the {phase} phase")
    p.add_argument("--out", default="gpu-check-results", help="results directory (default: %(default)s)")
    p.add_argument("--python", help="interpreter for the phases (default: this one)")
    p.add_argument("--budget-s", type=float, default=570.0, help="wall-clock budget of the whole run")
    p.add_argument("--rebuild", action="store_true", help="build the extension even when it is up to date")
    p.add_argument("--serial", action="store_true", help="run the compile check after the tests, not alongside")
    p.add_argument("--suite-mode", choices=("interpret", "compiled"), default="interpret",
                   help="TRITON_INTERPRET for the suite beyond the CUDA test files (default: %(default)s, as the "
                        "suite drives Triton on CPU tensors)")  # fmt: skip
    p.add_argument("--cuda-tests-only", action="store_true", help=f"tests: only {', '.join(CUDA_TESTS)}")
    p.add_argument("--pytest-args", help='extra pytest arguments, e.g. "-k attention -x"')
    p.add_argument("--tests-timeout", type=float, help="seconds per test run (default 210 on CUDA, 150 the suite)")
    p.add_argument("--compile-timeout", type=float, help="seconds (default 240)")
    p.add_argument("--bench-timeout", type=float, help="seconds for all benchmark families (default 230)")
    p.add_argument("--bench-family", action="append", choices=BENCH_FAMILIES, help="only these benchmark families")
    p.add_argument("--quick", action="store_true", help="benchmarks: fewer repetitions")
    p.add_argument(
        "--wheelhouse",
        default=str(ROOT / "gpu-check-wheels"),
        help="pure-Python wheels (pytest and its deps) to use when pytest is missing (default: %(default)s)",
    )
    p.add_argument("--probe-env", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    chosen = args.only or list(PHASES)
    args.phases = tuple(ph for ph in PHASES if ph in chosen and not getattr(args, f"skip_{ph}"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.probe_env:
        print(json.dumps(probe_env(), indent=1, default=str))
        return 0
    import torch

    if not torch.cuda.is_available():
        cuda = torch.version.cuda
        why = "a CPU-only build of torch" if cuda is None else f"torch built for CUDA {cuda} sees no usable GPU"
        print(
            f"gpu-check: no GPU: torch.cuda.is_available() is False ({why}; torch {torch.__version__}).\n"
            "gpu-check runs the tests on CUDA, the compile check and the GPU benchmarks, so it needs a machine with an "
            "NVIDIA GPU and a CUDA build of torch. Nothing was run.\n"
            "Without a GPU, `make test` checks the GPU code through the Triton interpreter and the compile check.",
            file=sys.stderr,
        )
        return 2
    return GpuCheck(args).run_all()
