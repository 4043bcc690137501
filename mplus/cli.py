"""``mplus``: M+ from the command line, text in and text out (``python -m mplus`` is the same).

::

    mplus generate --model PATH_OR_ID [--inject FILE ...] --prompt TEXT [--memory STATE] [--save-memory STATE]
    mplus chat     --model PATH_OR_ID [--memory STATE] [--save-memory STATE]     (/inject FILE, /save PATH, /quit ...)
    mplus info     [--model PATH_OR_ID]
    mplus bench    --model PATH_OR_ID [--prompt-tokens N] [--new-tokens N]

``--model`` names an mplus / official M+ checkpoint (a folder or a Hub id: ``from_pretrained``) or a plain Llama
checkpoint (a folder, a Hub id, or a GGUF file with ``--gguf-file``), from which an M+ (``--kind mplus``, default) or
a MemoryLLM (``--kind memoryllm``) is built (``from_base``). Its tokenizer is the checkpoint's own
(``mplus.load_tokenizer``). ``--memory STATE`` reads a memory state file (``MemoryState.save``); a file that does not
exist is an error unless ``--save-memory`` names where the new memory goes. Injections show a progress bar.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import torch
from transformers import TextStreamer

from mplus_kernels.info import report

from . import __version__
from .base import load_tokenizer
from .memory.state import MemoryState
from .model import MPlusForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHAT_HELP = """commands:
  /inject FILE   write a text file into the memory (progress bar)
  /save PATH     save the memory state to PATH
  /load PATH     continue with the memory state in PATH
  /new           forget the conversation (the memory stays)
  /memory off|on answer without the memory (the base model, from_base's LoRA at zero) or through it
  /help          this text
  /quit          leave (also Ctrl-D)
anything else is a message to the model."""


class CliError(Exception):
    """A mistake on the command line: printed as one line, exit status 2."""


def _is_mplus_checkpoint(path: str) -> bool:
    """Whether ``path`` (a folder) holds an mplus / official M+ checkpoint: its config has the memory fields."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        fields = json.load(f)
    return fields.get("model_type") == "mplus" or {"num_tokens", "num_blocks"} <= set(fields)


def load_model(
    model: str, *, gguf_file: str | None = None, kind: str = "mplus", dtype: torch.dtype = torch.float32,
    max_length: int = 2048, device: str | None = None, quiet: bool = False,
) -> tuple[MPlusForCausalLM, object]:
    """The model ``model`` names (an mplus / official checkpoint: ``from_pretrained``; a plain Llama folder, Hub id or
    GGUF file: ``from_base`` as ``kind``) and its tokenizer (``None`` when the checkpoint ships none: the golden
    checkpoints). What ``mplus generate/chat`` and :mod:`mplus.serve` load."""
    source = "from_pretrained" if gguf_file is None and _is_mplus_checkpoint(model) else "from_base"
    if not quiet:
        print(f"mplus: loading {model}{f' ({gguf_file})' if gguf_file else ''} ({source})", file=sys.stderr)
    if source == "from_pretrained":
        m = MPlusForCausalLM.from_pretrained(model, dtype=dtype, max_length=max_length, device=device)
    else:
        m = MPlusForCausalLM.from_base(model, kind=kind, gguf_file=gguf_file, dtype=dtype, max_length=max_length)
        if device is not None:
            m = m.to(device)
    try:
        tokenizer = load_tokenizer(model, gguf_file=gguf_file)
    except ValueError:
        if source == "from_base":
            raise  # a base checkpoint always ships its tokenizer
        tokenizer = None
    return m, tokenizer


def open_model(args: argparse.Namespace) -> tuple[MPlusForCausalLM, object]:
    """The model and its tokenizer that ``--model`` (``--gguf-file``, ``--kind``, ``--dtype``, ``--max-length``)
    names."""
    model, tokenizer = load_model(
        args.model, gguf_file=args.gguf_file, kind=args.kind, dtype=DTYPES[args.dtype], max_length=args.max_length
    )
    if tokenizer is None:
        raise CliError(f"--model {args.model}: the checkpoint ships no tokenizer, and mplus {args.command} reads text")
    return model, tokenizer


def open_memory(model: MPlusForCausalLM, path: str | None, save_to: str | None) -> MemoryState:
    """The memory a run works on: the state file ``path``, or a new state (a copy of the model's memory)."""
    if path is None:
        return model.new_memory(seed=0)
    if not os.path.exists(path):
        if save_to is None:
            raise CliError(f"--memory {path}: no such memory state (to start one there, add --save-memory {path})")
        print(f"mplus: {path} does not exist yet: a new memory, saved there", file=sys.stderr)
        return model.new_memory(seed=0)
    return MemoryState.load(path, like=model).to(model.compute_device)


def inject_file(model: MPlusForCausalLM, tokenizer, state: MemoryState, path: str) -> int:
    """Write the text of ``path`` into ``state`` (chunked as the official evaluation chunks, with a progress bar);
    returns its length in tokens."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise CliError(f"--inject {path}: {exc.strerror or exc}") from None
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise CliError(f"--inject {path}: the file holds no text")
    model.inject(ids, memory=state, progress=True)
    return ids.shape[1]


def _prompt_ids(tokenizer, messages: list[dict[str, str]], raw: bool) -> torch.Tensor:
    if raw or not getattr(tokenizer, "chat_template", None):
        return tokenizer(messages[-1]["content"], return_tensors="pt").input_ids
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    return out if isinstance(out, torch.Tensor) else out["input_ids"]


def reply(model: MPlusForCausalLM, tokenizer, state: MemoryState, messages: list[dict[str, str]], args) -> str:
    """Generate the model's answer to ``messages`` over ``state``, streamed to stdout; returns the answer's text."""
    ids = _prompt_ids(tokenizer, messages, args.raw)
    room = model.max_length - args.max_new_tokens
    if ids.shape[1] > room:
        raise CliError(
            f"the prompt is {ids.shape[1]} tokens; with --max-new-tokens {args.max_new_tokens} at most {room} fit "
            f"--max-length {model.max_length} (raise --max-length, or /new to drop the conversation)"
        )
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = model.generate(
        ids, memory=state, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def cmd_generate(args) -> None:
    model, tokenizer = open_model(args)
    state = open_memory(model, args.memory, args.save_memory)
    for path in args.inject or []:
        n = inject_file(model, tokenizer, state, path)
        print(f"mplus: injected {path} ({n} tokens)", file=sys.stderr)
    reply(model, tokenizer, state, [{"role": "user", "content": args.prompt}], args)
    if args.save_memory:
        state.save(args.save_memory)
        print(f"mplus: memory saved to {args.save_memory}", file=sys.stderr)


def cmd_chat(args, lines: Sequence[str] | None = None) -> None:
    """The chat loop over stdin (or ``lines``, for tests): messages and /commands, one per line."""
    model, tokenizer = open_model(args)
    state = open_memory(model, args.memory, args.save_memory)
    messages: list[dict[str, str]] = []
    source = iter(lines) if lines is not None else None
    print(f"mplus chat ({model.config.num_hidden_layers} layers, memory of {state.stm.size} rows per layer): /help")
    while True:
        try:
            line = next(source) if source is not None else input("> ")
        except (EOFError, StopIteration):
            break
        line = line.strip()
        if not line:
            continue
        command, _, arg = line.partition(" ")
        try:
            if command == "/quit":
                break
            elif command == "/help":
                print(CHAT_HELP)
            elif command == "/inject":
                print(f"injected {arg} ({inject_file(model, tokenizer, state, arg)} tokens)")
            elif command == "/save":
                state.save(arg or args.save_memory)
                print(f"memory saved to {arg or args.save_memory}")
            elif command == "/load":
                state = MemoryState.load(arg, like=model).to(model.compute_device)
                print(f"memory loaded from {arg}")
            elif command == "/memory" and arg in ("on", "off"):
                model.use_memory = arg == "on"
                print(f"answers {'through the memory' if model.use_memory else 'without the memory (bypassed)'}")
            elif command == "/new":
                messages = []
                print("conversation cleared (the memory stays)")
            elif command.startswith("/"):
                print(f"unknown command {command}: /help lists them")
            else:
                messages.append({"role": "user", "content": line})
                messages.append({"role": "assistant", "content": reply(model, tokenizer, state, messages, args)})
        except (CliError, ValueError, OSError) as exc:  # the session goes on; the memory is as it was
            print(f"error: {exc}")
    if args.save_memory:
        state.save(args.save_memory)
        print(f"memory saved to {args.save_memory}")


def cmd_info(args) -> None:
    print(f"mplus {__version__}")
    print(report())
    if args.model:
        model, _ = open_model(args)
        cfg, mem = model.config, model.memory
        print(f"model: {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, heads {cfg.num_attention_heads}/"
              f"{cfg.num_key_value_heads}, vocab {cfg.vocab_size}, {'M+' if cfg.has_ltm else 'MemoryLLM'}")  # fmt: skip
        print(f"memory: {mem.stm.size} short-term rows per layer (K={cfg.num_tokens} per injection), "
              f"{'K0=' + str(cfg.num_ltm_tokens) + ' retrieved' if cfg.has_ltm else 'no long-term store'}; "
              f"{sum(mem.nbytes().values()) / 2**20:.1f} MiB")  # fmt: skip


def cmd_bench(args) -> None:
    """Wall-clock tokens/s of an inject, a prefill and greedy decode steps of the model on this machine (random ids;
    ``make bench`` measures the kernels themselves)."""
    model, _ = open_model(args)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = lambda n: torch.randint(0, vocab, (1, n), generator=gen).to(model.compute_device)  # noqa: E731
    rows = []
    with torch.inference_mode():
        state = model.new_memory(seed=0)
        t = time.perf_counter()
        model.inject(ids(args.prompt_tokens), memory=state, progress=False)
        rows.append(("inject", args.prompt_tokens, time.perf_counter() - t))
        t = time.perf_counter()
        out = model(ids(args.prompt_tokens), memory=state)
        rows.append(("prefill", args.prompt_tokens, time.perf_counter() - t))
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(args.new_tokens):
            token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
        rows.append(("decode", args.new_tokens, time.perf_counter() - t))
    print(f"{'step':<8} {'tokens':>7} {'seconds':>9} {'tokens/s':>10}")
    for name, n, s in rows:
        print(f"{name:<8} {n:>7} {s:>9.3f} {n / s:>10.1f}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mplus", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"mplus {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(q: argparse.ArgumentParser, required: bool = True) -> None:
        q.add_argument("--model", required=required, help="mplus checkpoint or Llama checkpoint (folder or Hub id)")
        q.add_argument("--gguf-file", help="a GGUF file inside --model's folder (a Llama to build M+ from)")
        q.add_argument("--kind", choices=["mplus", "memoryllm"], default="mplus", help="built from a Llama: which")
        q.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
        q.add_argument("--max-length", type=int, default=2048, help="longest prompt + answer (tokens)")

    def text_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--memory", help="memory state file to read (MemoryState.save)")
        q.add_argument("--save-memory", help="save the memory state here at the end")
        q.add_argument("--max-new-tokens", type=int, default=128)
        q.add_argument("--raw", action="store_true", help="the prompt as is, without the chat template")

    g = sub.add_parser("generate", help="inject files, then answer one prompt")
    model_args(g)
    text_args(g)
    g.add_argument("--inject", nargs="+", metavar="FILE", help="text files written into the memory first")
    g.add_argument("--prompt", required=True)
    c = sub.add_parser("chat", help="a conversation over a memory (/help inside)")
    model_args(c)
    text_args(c)
    i = sub.add_parser("info", help="versions, backends, CPU features (and a model's sizes)")
    model_args(i, required=False)
    b = sub.add_parser("bench", help="tokens/s of inject, prefill and decode of a model here")
    model_args(b)
    b.add_argument("--prompt-tokens", type=int, default=256)
    b.add_argument("--new-tokens", type=int, default=32)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        {"generate": cmd_generate, "chat": cmd_chat, "info": cmd_info, "bench": cmd_bench}[args.command](args)
    except CliError as exc:
        print(f"mplus {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
