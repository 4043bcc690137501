"""Issue 20: every script in examples/ runs, on the real model (SmolLM2-135M-Instruct, converted once per session),
and checks what it shows (each script asserts its own claim: a mixed batch equals each user's run, a reloaded memory
answers alike, training lowers the loss; the DDP one is launched with torchrun on 2 processes and writes its
checkpoint)."""

from __future__ import annotations

import pathlib
import subprocess
import sys
from pydoc_data.topics import topics

import pytest
from _ranks import free_port
from _real_model import base_folder, require_real_model

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
RUNS = {
    "quick_start.py": [],
    "memory_per_user.py": [],
    "train_from_base.py": ["--steps", "4", "--chunk", "24"],
    "train_ddp.py": ["--steps", "2", "--files", "text.txt"],
}
TORCHRUN = {"train_ddp.py"}  # launched as the user launches it: torchrun, 2 processes (gloo, loopback)


def test_every_example_is_run_here():
    assert sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")) == sorted(RUNS)


@pytest.mark.parametrize("script", sorted(RUNS))
def test_example_runs(script, tmp_path):
    require_real_model()
    cmd = [sys.executable, str(EXAMPLES / script), "--model", base_folder(), *RUNS[script]]
    if script in TORCHRUN:
        (tmp_path / "text.txt").write_text(" ".join(topics[name] for name in sorted(topics)[:6]))
        launch = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
        cmd = [sys.executable, *launch, "--master-port", str(free_port()), *cmd[1:]]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"{script} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert run.stdout.strip()
    if script in TORCHRUN:  # every rank's part of the checkpoint, and the marker written last
        written = sorted(p.name for p in (tmp_path / "mplus-ddp-run" / "step-000002").iterdir())
        assert written == [
            "checkpoint.json", "memory-rank0.safetensors", "memory-rank1.safetensors", "rng-rank0.pt", "rng-rank1.pt",
            "weights",
        ]  # fmt: skip
