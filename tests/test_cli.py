"""Issue 20: the ``mplus`` command line, end to end on the real model (SmolLM2-135M-Instruct, built into an M+ with
``from_base``) with its own tokenizer: generate with injections and a saved memory, a chat session over stdin, info,
bench, and the errors a user can make."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _real_model import base_folder, require_real_model

from mplus import MemoryState, cli

SMALL = ["--max-length", "256", "--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def model_dir() -> str:
    require_real_model()
    return base_folder()


@pytest.fixture(scope="module")
def document(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("docs") / "lighthouse.txt"
    path.write_text("The Lighthouse of Alexandria stood on the island of Pharos. " * 20)
    return str(path)


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The installed console script (``mplus``, from setup.py's entry point) in a fresh process."""
    exe = os.path.join(os.path.dirname(sys.executable), "mplus")
    return subprocess.run([exe, *args], input=stdin, capture_output=True, text=True, timeout=600)


def test_generate_injects_answers_and_saves_the_memory(model_dir, document, tmp_path, capsys):
    state_file = str(tmp_path / "memory.safetensors")
    argv = ["generate", "--model", model_dir, "--inject", document, "--prompt", "Where did it stand?", *SMALL]
    assert cli.main([*argv, "--save-memory", state_file]) == 0
    out, err = capsys.readouterr()
    assert out.strip(), "the answer is streamed to stdout"
    assert "injected" in err and "memory saved" in err
    saved = MemoryState.load(state_file)
    assert saved.stm.age.max() > 0 or saved.version == 0  # a real state file
    # the same run again from the saved memory (no injection) answers with the same tokens as a run that injected
    assert cli.main(["generate", "--model", model_dir, "--memory", state_file, "--prompt", "Where did it stand?",
                     *SMALL]) == 0  # fmt: skip
    assert capsys.readouterr().out == out


def test_a_missing_memory_file_is_an_error_unless_it_is_to_be_created(model_dir, tmp_path, capsys):
    missing = str(tmp_path / "nothing.safetensors")
    assert cli.main(["generate", "--model", model_dir, "--memory", missing, "--prompt", "hi", *SMALL]) == 2
    assert "no such memory state" in capsys.readouterr().err
    assert not os.path.exists(missing)
    argv = ["generate", "--model", model_dir, "--memory", missing, "--save-memory", missing, "--prompt", "hi", *SMALL]
    assert cli.main(argv) == 0
    assert os.path.exists(missing)


def test_a_missing_inject_file_is_an_error(model_dir, tmp_path, capsys):
    argv = ["generate", "--model", model_dir, "--inject", str(tmp_path / "absent.txt"), "--prompt", "hi", *SMALL]
    assert cli.main(argv) == 2
    assert "absent.txt" in capsys.readouterr().err


def test_chat_over_stdin_with_commands(model_dir, document, tmp_path):
    """The console script itself, as a user types: a message, an injection, a save, an unknown command, quit."""
    state_file = str(tmp_path / "chat.safetensors")
    stdin = (f"Hello!\n/inject {document}\n/save {state_file}\n/frobnicate\nWhat stood on Pharos?\n/memory off\n"
             "What stood on Pharos?\n/quit\n")
    run = _run("chat", "--model", model_dir, *SMALL, stdin=stdin)
    assert run.returncode == 0, run.stderr
    assert "injected" in run.stdout and f"memory saved to {state_file}" in run.stdout
    assert "unknown command /frobnicate" in run.stdout
    assert "without the memory (bypassed)" in run.stdout
    assert os.path.exists(state_file)
    loaded = MemoryState.load(state_file)
    assert loaded.version == 0 and torch.isfinite(loaded.stm.hidden).all()


def test_info_and_bench_and_version(model_dir, capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mplus ") and "cpp ISA level" in out
    assert cli.main(["bench", "--model", model_dir, "--prompt-tokens", "16", "--new-tokens", "2", "--max-length",
                     "128"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert all(step in table for step in ("inject", "prefill", "decode"))
    run = _run("--version")
    assert run.returncode == 0 and run.stdout.startswith("mplus ")
