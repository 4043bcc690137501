"""Issue 20: every script in examples/ runs, on the real model (SmolLM2-135M-Instruct, converted once per session),
and checks what it shows (each script asserts its own claim: a mixed batch equals each user's run, a reloaded memory
answers alike, training lowers the loss)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
from _real_model import base_folder, require_real_model

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
RUNS = {
    "quick_start.py": [],
    "memory_per_user.py": [],
    "train_from_base.py": ["--steps", "4", "--chunk", "24"],
}


def test_every_example_is_run_here():
    assert sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")) == sorted(RUNS)


@pytest.mark.parametrize("script", sorted(RUNS))
def test_example_runs(script, tmp_path):
    require_real_model()
    cmd = [sys.executable, str(EXAMPLES / script), "--model", base_folder(), *RUNS[script]]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"{script} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert run.stdout.strip()
