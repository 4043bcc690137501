"""Training M+ / MemoryLLM on the mplus kernels (issue 12; SPEC.md §4.7, §7; the paper's App. D).

The paper's two-chunk step: chunk 1 (the context) is injected with its gradients kept, then the language-model loss
is taken on chunk 2 (the target) through the memory that injection made, plus the retriever's BCE loss (M+ only).
Here it is :func:`training_step`, built from the model's own layers and the differentiable mplus ops
(``memory_attention`` and ``merge_attention_states`` have FlashAttention-2-style backwards; ``retriever_scores``
recomputes its sigmoids in the backward), so no ``[memory ; chunk]`` concatenation or score matrix is ever kept:

* the injection runs the update forward (SPEC.md §4.2) under the encoder adapter with gradients on; its delta rows
  enter a *functional* copy of the short-term memory (survivors in order, then the new rows: what the in-place
  update makes), so chunk 2's gradients reach the encoder adapter through the memory;
* chunk 2 runs the generation forward (SPEC.md §5) under the decoder adapter: per layer, it retrieves K0 long-term
  rows (discrete, no gradient; M+ only), recomputes the K/V of every memory row from its hidden state (the decoder
  adapter is being trained, so cached K/V would be stale) and attends [BOS ; long-term ; short-term ; itself];
* the retriever's loss (SPEC.md §7.1–7.3): the decoder retriever's queries are ``query_proj`` of chunk 2's
  normalised tokens, the encoder retriever's are ``encoder_query_proj`` of the newest delta rows, the keys
  ``key_proj`` of the short-term rows, all on detached inputs (the retriever's gradients never reach the LLM);
  positives are the rows that hold the document (tracked through the drops, :func:`track_document`), negatives the
  rest;
* with ``commit=True`` (default) the injections are then written into the memory state through the model's own
  all-or-nothing update (:func:`mplus.update.commit_update`; the same victims, so the state holds exactly the
  functional memory the loss saw; the dropped rows go to the long-term memory as in inference). The target's
  retrieval sees what inference would after those injections: the store, its cache, the rows the step dropped,
  minus what the merges the step triggers evict.
  The memory is never left half-changed: a step that fails before its commit leaves the state (and its drop
  generator) as it was.

Trainable: every LoRA adapter (both) and the retriever projectors; everything else frozen (:func:`prepare`). The
optimiser's parameter groups follow the official rule (:func:`param_groups`, SPEC.md §7.3).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from mplus_kernels import draw_victims
from mplus_kernels.retrieval.scores import retriever_bce_loss, retriever_scores

from .distributed import (
    TrainingCheckpoint,
    load_training_checkpoint,
    memory_buffer_names,
    rank_memory,
    rank_seed,
    save_training_checkpoint,
)
from .fsdp import materialize, shard
from .llama import check_ids
from .lora import DECODER
from .memory.state import MemoryState
from .model import MPlusForCausalLM
from .segments import layer_segments
from .update import check_victims, commit_update, encode

__all__ = [
    "Step", "StepOutput", "TrainingCheckpoint", "load_training_checkpoint", "materialize", "param_groups", "prepare",
    "rank_memory", "rank_seed", "save_training_checkpoint", "shard", "track_document", "trainable", "training_step",
]  # fmt: skip

SELECTOR_KEYS = ("query_proj", "key_proj")  # the official selector group (matches encoder_query_proj too)


def trainable(name: str) -> bool:
    """Whether the parameter ``name`` is trained: LoRA factors of either adapter, and the retriever projectors."""
    return ".lora_A." in name or ".lora_B." in name or any(key in name for key in SELECTOR_KEYS)


def prepare(model: MPlusForCausalLM) -> list[str]:
    """Make ``model`` trainable as the paper trains it, and return the names of its trainable parameters.

    Every LoRA factor and retriever projector requires a gradient, every other parameter is frozen; the model goes
    to train mode (LoRA dropout on: ``model.eval()`` turns it off again); the model's default memory state takes
    training ages (SPEC.md §4.7: every short-term age advances on every update, one clock for the short-term rows,
    the cache and the long-term rows; ``memory.stm.age_mode = "training"`` does the same for another state).
    """
    if not isinstance(model, MPlusForCausalLM):
        raise TypeError(f"prepare: model must be an MPlusForCausalLM, got {type(model).__name__}")
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(trainable(name))
        if p.requires_grad:
            names.append(name)
    model.train()
    model.memory.stm.age_mode = "training"
    return names


def param_groups(model: nn.Module, lr: float, selector_lr: float = 1e-4, weight_decay: float = 0.0) -> list[dict]:
    """AdamW parameter groups of the official training (SPEC.md §7.3): every trainable parameter whose name holds
    ``query_proj`` or ``key_proj`` (the retriever projectors, ``encoder_query_proj`` included) at ``selector_lr``,
    the rest (the LoRA adapters) at ``lr``. Frozen parameters are left out."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("param_groups: the model has no trainable parameter (call mplus.training.prepare(model))")
    selector = [p for n, p in params if any(key in n for key in SELECTOR_KEYS)]
    rest = [p for n, p in params if not any(key in n for key in SELECTOR_KEYS)]
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
    if selector:
        groups.append({"params": selector, "lr": selector_lr, "weight_decay": weight_decay, "name": "selector"})
    return groups


def track_document(indicator: Tensor, victims: Tensor, *, new: bool = True) -> Tensor:
    """SPEC.md §7.2: where a document's rows sit after one short-term update. ``indicator [L, N]`` bool (logical
    positions holding the document), ``victims [L, K]`` (the logical positions dropped) → ``[L, N]``: the survivors'
    flags in their order, then the K new rows, flagged when ``new`` (the injected chunk is the document's) and not
    otherwise (an unrelated chunk between the document and its question: the revisit case)."""
    keep = _survivors(indicator.shape[1], victims.to(indicator.device))
    fresh = torch.full(victims.shape, new, dtype=torch.bool, device=indicator.device)
    return torch.cat([indicator.gather(1, keep), fresh], 1)


def _survivors(n: int, victims: Tensor) -> Tensor:
    """``[L, N - K]`` int64: the logical positions that survive dropping ``victims [L, K]``, ascending (no host
    sync: a stable sort of the keep mask)."""
    keep = torch.ones(victims.shape[0], n, dtype=torch.bool, device=victims.device)
    keep.scatter_(1, victims.long(), False)
    return torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, : n - victims.shape[1]]


@dataclasses.dataclass
class StepOutput:
    """What :func:`training_step` computed. ``loss`` = ``lm_loss`` + the retriever losses (unweighted, as the
    official training adds them); call ``loss.backward()``."""

    loss: Tensor
    lm_loss: Tensor
    retriever_loss: Tensor | None  # the decoder retriever's BCE (None: not computed)
    encoder_retriever_loss: Tensor | None  # the encoder retriever's BCE (None: not computed)
    logits: Tensor  # [1, T, vocab] fp32 of the target chunk
    positives: Tensor  # [L, N] bool: the logical short-term rows holding the document after its injection
    victims: list[Tensor]  # per injected context: the logical positions dropped [L, K] (on the host)
    deltas: list[Tensor]  # per injected context: its delta rows [L, K, d] (detached)


def unwrap_model(model: Any, what: str) -> tuple[MPlusForCausalLM, MemoryState | None, dict]:
    """``model`` as ``training_step`` takes it: an :class:`MPlusForCausalLM` (its own memory), or a :class:`Step`
    (its model, its memory and its default keyword arguments). A DDP-wrapped module is refused: its gradients are
    averaged only when the step runs through its ``forward``."""
    if isinstance(model, MPlusForCausalLM):
        return model, None, {}
    if isinstance(model, Step):
        return model.model, model.memory, model.defaults
    inner = getattr(model, "module", None)
    if isinstance(model, DistributedDataParallel) or isinstance(inner, nn.Module):
        raise TypeError(
            f"{what}: model is a {type(model).__name__} wrapping a {type(inner).__name__}; a wrapped model trains "
            "through its forward: wrap a training.Step(model) and call it, "
            "ddp = DistributedDataParallel(training.Step(model)); out = ddp(context, target)"
        )
    raise TypeError(f"{what}: model must be an MPlusForCausalLM or a training.Step, got {type(model).__name__}")


class Step(nn.Module):
    """:func:`mplus.training.training_step` as a module, what DDP wraps and :func:`shard` shards (docs/training.md):
    ``Step(model)(context, target, **kw)`` is ``training_step(model, context, target, memory=memory, **defaults,
    **kw)`` and returns its :class:`~mplus.training.StepOutput` (DDP finds the tensors of a dataclass output).

    Args:
        model: the :class:`MPlusForCausalLM` (prepared: :func:`mplus.training.prepare`); a submodule, so DDP
            averages its trained parameters' gradients.
        memory: the state trained on (default: the model's own; under DDP, :func:`rank_memory`). Never broadcast:
            its buffers (and the model's default memory's) are in DDP's ignore list (module docstring).
        **defaults: keyword arguments of every step (``retriever_loss``, ``checkpointing``, ``autocast``, ...);
            a call's own keywords override them.
    """

    def __init__(self, model: MPlusForCausalLM, *, memory: MemoryState | None = None, **defaults: Any) -> None:
        super().__init__()
        if isinstance(model, Step):
            raise TypeError(
                f"Step: model is already a training.Step (of a {type(model.model).__name__}): wrap the model once"
            )
        if not isinstance(model, MPlusForCausalLM):
            inner = getattr(model, "module", None)
            got = type(model).__name__ + (f" wrapping a {type(inner).__name__}" if isinstance(inner, nn.Module) else "")
            raise TypeError(
                f"Step: model must be an MPlusForCausalLM, got {got}; wrap the Step instead: "
                "DistributedDataParallel(training.Step(model))"
            )
        for key in ("memory", "context", "target"):
            if key in defaults:
                raise TypeError(f"Step: {key} is not a step default")
        self.model = model
        # a plain attribute, not a submodule: DDP never sees a state given here (nn.Module.__setattr__ would register)
        object.__setattr__(self, "memory", model.resolve_memory(memory, "Step", inject=True))
        self.defaults = defaults
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, memory_buffer_names(self))

    def forward(self, context: Tensor | list[Tensor], target: Tensor, **step_kwargs: Any):
        if "memory" in step_kwargs:
            raise TypeError("Step.forward: memory is fixed by the Step (Step(model, memory=state))")
        return training_step(self.model, context, target, memory=self.memory, **{**self.defaults, **step_kwargs})

    def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with the model's parameters as the step's forward sees them. Unsharded, a plain
        call; under :func:`shard`, through an FSDP forward method of the root, so the root's parameters are whole and
        every layer unshards in its own forward — what anything but the step needs on a sharded model, e.g.
        ``step.run(model.inject, ids, memory=step.memory)`` (and :func:`materialize`'s memory load) — then the root's
        parameters go back to their shards (an optimiser built after it takes the shards). A sharded model called
        outside it fails (``aten.embedding got mixed torch.Tensor and DTensor``), or, before the first step, makes a
        layer FSDP's root. Every rank calls it alike (the unsharding is collective)."""
        out = self._run(fn, *args, **kwargs)
        if isinstance(self, FSDPModule):
            self.reshard()
        return out

    def _run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:  # the root's FSDP forward method
        return fn(*args, **kwargs)


def training_step(
    model: MPlusForCausalLM | Step,
    context: Tensor | Sequence[Tensor],
    target: Tensor,
    *,
    memory: MemoryState | None = None,
    retriever_loss: bool | None = None,
    checkpointing: bool = False,
    autocast: torch.dtype | None = None,
    commit: bool = True,
    victims: Sequence[Tensor] | None = None,
    document: Tensor | None = None,
    grad: Literal["last", "all"] = "last",
    prompt_length: int | None = None,
) -> StepOutput:
    """One training step's forward: inject ``context`` (``[1, T]``, or a list of chunks: the earlier ones are
    injected without gradients, the paper's multi-chunk training, the last with them), then the language-model loss
    on ``target [1, T2]`` through the resulting memory, plus the retriever's loss. Returns a :class:`StepOutput`;
    the caller runs ``out.loss.backward()`` and the optimiser step.

    ``model`` may be a :class:`Step` (its model and memory; its defaults apply through its forward only); a
    DDP-wrapped module is refused (call it instead: its forward runs the step, :mod:`mplus.distributed`).

    Args:
        memory: the :class:`MemoryState` trained on (default: the model's own, or the Step's); its short-term memory
            must keep training ages (:func:`prepare`).
        retriever_loss: add the decoder and encoder retrievers' BCE (SPEC.md §7.3). Default: when the model has a
            long-term memory (M+). ``True`` on a config without one (MemoryLLM) is an error.
        checkpointing: recompute each layer in the backward pass instead of keeping its activations (per layer,
            both passes).
        autocast: e.g. ``torch.bfloat16``: run the forward under ``torch.autocast`` of the model's device type.
        commit: write the injections into ``memory`` (the same drops the loss saw). ``False``: the memory is only
            read, and the step's drops are drawn and forgotten (the generator is restored).
        victims: per context, the logical positions ``[L, K]`` to drop (default: drawn from the state's generator
            as inference draws them).
        document: the revisit case (SPEC.md §7.2): ``[L, N]`` bool, where the target's document sits in the
            short-term memory before this step (a ``positives`` of an earlier step, tracked since with
            :func:`track_document`); the contexts are then unrelated chunks (their rows are negatives). Default: the
            document is this step's context (its rows are the positives).
        grad: ``"last"``: only the last context chunk's injection keeps gradients (the paper's two-chunk and
            multi-chunk training); ``"all"``: every chunk's.
        prompt_length: the first ``prompt_length`` target tokens are the prompt that retrieves: they alone are the
            decoder retriever's queries, for the long-term retrieval and for its loss (SPEC.md §7.1's random
            retriever length, with the length given). The step then computes what inference computes for a
            prefill of ``target[:, :prompt_length]`` followed by the rest through its cache. Default: the whole
            target (one prefill).
    """
    model, own, _ = unwrap_model(model, "training_step")
    memory = own if memory is None else memory
    cfg = model.config
    contexts = [context] if isinstance(context, Tensor) else list(context)
    if not contexts:
        raise ValueError("training_step: context holds no chunk (give a [1, T] tensor or a list of them)")
    for i, ids in enumerate(contexts):
        what = f"training_step: context[{i}]" if len(contexts) > 1 else "training_step: context"
        check_ids(ids, cfg.vocab_size, what)
    check_ids(target, cfg.vocab_size, "training_step: target")
    if target.shape[1] < 2:
        raise ValueError(f"training_step: target {list(target.shape)} needs at least 2 tokens (next-token loss)")
    if retriever_loss is None:
        retriever_loss = cfg.has_ltm
    elif not isinstance(retriever_loss, bool):
        raise TypeError(f"training_step: retriever_loss must be a bool or None, got {type(retriever_loss).__name__}")
    if retriever_loss and not cfg.has_ltm:
        raise ValueError(
            "training_step: retriever_loss=True, but this config has no long-term memory and no retriever "
            "(MemoryLLM: num_ltm_blocks=0 or add_selector=False); leave retriever_loss unset or False"
        )
    if autocast is not None and not isinstance(autocast, torch.dtype):
        raise TypeError(
            f"training_step: autocast must be a torch.dtype (e.g. torch.bfloat16) or None, got {autocast!r}"
        )
    if grad not in ("last", "all"):
        raise ValueError(f"training_step: grad={grad!r}, expected 'last' or 'all'")
    if prompt_length is None:
        prompt_length = target.shape[1]
    elif isinstance(prompt_length, bool) or not isinstance(prompt_length, int):
        raise TypeError(f"training_step: prompt_length must be an int or None, got {type(prompt_length).__name__}")
    elif not 1 <= prompt_length <= target.shape[1]:
        raise ValueError(
            f"training_step: prompt_length={prompt_length}, expected 1..{target.shape[1]} (the target's length)"
        )
    shape = (cfg.num_hidden_layers, cfg.stm_size)
    if victims is not None:
        victims = list(victims)
        if len(victims) != len(contexts):
            raise ValueError(f"training_step: victims lists {len(victims)} entries for {len(contexts)} context chunks")
        drops = (shape[0], cfg.num_tokens)  # [L, K]
        victims = [check_victims(v, drops, shape[1], f"training_step: victims[{i}]") for i, v in enumerate(victims)]
    if document is not None and (
        not isinstance(document, Tensor) or document.dtype != torch.bool or tuple(document.shape) != shape
    ):
        got = f"{document.dtype} {list(document.shape)}" if isinstance(document, Tensor) else type(document).__name__
        raise ValueError(f"training_step: document must be a bool tensor [L, N] = {list(shape)}, got {got}")
    mem = model.resolve_memory(memory, "training_step", inject=True)
    if mem.stm.age_mode != "training":
        raise ValueError(
            "training_step: memory keeps reference (inference) ages; training uses the training ages of SPEC.md §4.7: "
            "call mplus.training.prepare(model), or set memory.stm.age_mode = 'training'"
        )
    limit = model.rope_cos.shape[0] - cfg.num_tokens - 1
    for name, length in [("context", max(c.shape[1] for c in contexts)), ("target", target.shape[1])]:
        if length > (limit if name == "context" else model.max_length):
            raise ValueError(
                f"training_step: a {name} chunk of {length} tokens exceeds max_length={model.max_length} "
                "(split it, or load the model with a larger max_length)"
            )
    device = model.compute_device
    run_layer = _checkpointed if checkpointing else None
    amp = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with mem.lock.write() if commit else mem.lock.read():
        rng, committed = mem.rng_state(), 0
        try:
            with amp:
                out = _forward(
                    model,
                    mem,
                    contexts,
                    target.to(device),
                    retriever_loss,
                    run_layer,
                    victims,
                    document,
                    grad,
                    prompt_length,
                )
            if commit:
                with torch.no_grad():
                    for delta, drop in zip(out.deltas, out.victims):
                        commit_update(model, mem, delta, drop)
                        committed += 1
        except BaseException as exc:
            if committed:  # each chunk's commit is all-or-nothing; the generator stays past the step's draws
                exc.add_note(
                    f"training_step: committing context chunk {committed} of {len(contexts)} failed with the memory as "
                    f"it was before it; the {committed} chunk(s) before it are committed"
                )
            else:
                mem.set_rng_state(rng)
            raise
        if not commit:
            mem.set_rng_state(rng)
    return out


def _exact(device: torch.device):
    """Autocast off (the retrieval runs in the store's dtype) where it is on."""
    if device.type == "meta" or not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def _rows(t: Tensor, at: Tensor) -> Tensor:
    """``t [L, N, d]`` rows at ``at [L, R]`` per layer → ``[L, R, d]`` (differentiable)."""
    return t.gather(1, at[..., None].expand(-1, -1, t.shape[2]))


def _checkpointed(fn: Callable, *args):
    return checkpoint(fn, *args, use_reentrant=False)


def _forward(
    model, mem, contexts, target, retriever_loss, run_layer, victims, document, grad, prompt_length
) -> StepOutput:
    cfg = model.config
    n, k = cfg.stm_size, cfg.num_tokens
    device = model.compute_device
    hidden = mem.stm.logical("hidden").to(device)  # [L, N, d]: a copy, detached from the state
    ages = mem.stm.logical("age").to(device)  # [L, N] float64, advanced as the training-age update advances them
    fresh = document is None
    positives = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=device) if fresh else document.to(device)
    drops, deltas, dropped_hidden, dropped_age = [], [], [], []
    new_ages = torch.arange(k - 1, -1, -1, dtype=ages.dtype, device=device)
    j = len(contexts)
    for i, ids in enumerate(contexts):
        keep_grad = grad == "all" or i == j - 1
        host_drop = victims[i] if victims is not None else draw_victims(hidden.shape[0], n, k, mem.generator)
        drop = host_drop.to(device)
        gone, keep = drop.long().sort(1).values, _survivors(n, drop)  # ascending: the order the store gets them in
        with torch.set_grad_enabled(keep_grad and torch.is_grad_enabled()):
            tails = lambda layer_idx, h=hidden: h[layer_idx, n - k :]  # noqa: E731
            delta, _ = encode(model, ids.to(device), tails, run_layer)
            dropped_hidden.append(_rows(hidden, gone))
            hidden = torch.cat([_rows(hidden, keep), delta.to(hidden.dtype)], 1)
        ages = ages + k  # SPEC §4.7: every short-term age advances by 1 + max(new ages) before the drop
        # the rows this step drops are long-term candidates of the target (inference: they are in the cache), aged
        # by the injections after theirs; the store's own rows by all of them (age_offset below)
        dropped_age.append(ages.gather(1, gone) + k * (j - 1 - i))
        ages = torch.cat([ages.gather(1, keep), new_ages.expand(ages.shape[0], k)], 1)
        positives = track_document(positives, drop, new=fresh)
        drops.append(host_drop)  # on the host: the commit reads no device value
        deltas.append(delta.detach().to(hidden.dtype))
    extra_hidden, extra_age = torch.cat(dropped_hidden, 1), torch.cat(dropped_age, 1)
    # merges the injections trigger (at the commit) may evict long-term rows: the target does not see those either
    alive = mem.ltm.after_pushes(j) if mem.ltm is not None else None
    dropped = (extra_hidden, extra_age, k * j)
    logits, queries = _decode(model, mem, hidden, target, retriever_loss, run_layer, dropped, alive, prompt_length)
    lm_loss = nn.functional.cross_entropy(logits[0, :-1], target[0, 1:])
    dec_loss = enc_loss = None
    loss = lm_loss
    if retriever_loss:
        keys, enc_queries = [], []
        for layer_idx, layer in enumerate(model.layers):
            rows = layer.input_layernorm(hidden[layer_idx]).detach()  # retriever inputs are detached (SPEC §7.1)
            keys.append(layer.self_attn.key_proj(rows))
            if cfg.add_encoder_retriever:
                enc_queries.append(layer.self_attn.encoder_query_proj(rows[n - k :]))
        keys = torch.stack(keys)
        dtype = keys.dtype
        dec_loss = retriever_bce_loss(retriever_scores(torch.stack(queries).to(dtype), keys), positives)
        loss = loss + dec_loss
        if enc_queries:
            enc_loss = retriever_bce_loss(retriever_scores(torch.stack(enc_queries).to(dtype), keys), positives)
            loss = loss + enc_loss
    return StepOutput(loss, lm_loss, dec_loss, enc_loss, logits, positives, drops, deltas)


def _decode(model, mem, hidden: Tensor, target: Tensor, retriever_loss: bool, run_layer, dropped, alive, prompt: int):
    """The generation forward of ``target [1, T]`` over the functional short-term memory ``hidden [L, N, d]``
    (logical order) and the state's long-term store, differentiable in every memory row's K/V. ``dropped`` =
    ``(hidden [L, E, d], age [L, E], age_offset)``: the rows the step dropped, retrieved with the store's; ``alive``:
    per layer, the candidates left after the merges the step triggers (``LongTermMemory.after_pushes``); ``prompt``:
    how many leading target tokens retrieve. Returns the fp32 logits and, per layer, the decoder retriever's queries
    ``[prompt, ds]`` (with gradients when ``retriever_loss``)."""
    cfg = model.config
    k0, n, t = cfg.num_ltm_tokens, cfg.stm_size, target.shape[1]
    device = model.compute_device
    pos = model.rope.chunk(cfg.memory_prefix_len, t)
    stm_pos = torch.arange(1 + k0, 1 + k0 + n, dtype=torch.int32, device=device)
    queries = []

    def decode_layer(layer_idx: int, h: Tensor, stm_rows: Tensor, ltm_rows: Tensor | None) -> Tensor:
        layer = model.layers[layer_idx]
        with model.adapters.use(DECODER):  # set inside: a checkpointed layer recomputes in the backward pass
            mk, mv = layer.memory_kv(stm_rows)
            bos = model.bos_embedding[layer_idx]
            prefix = layer.memory_kv(bos if ltm_rows is None else torch.cat([bos, ltm_rows.to(bos.dtype)]))
            segments = layer_segments((mk, mv, stm_pos), prefix, model.rope_cos, model.rope_sin)  # as a prefill builds
            return layer(h, pos, segments, None)

    with model.adapters.use(DECODER):
        h = model.model.embed_tokens(target)
        for layer_idx, layer in enumerate(model.layers):
            ltm_rows = None
            if cfg.has_ltm:
                xn = layer.input_layernorm(h[0, :prompt]).detach()
                with torch.set_grad_enabled(retriever_loss and torch.is_grad_enabled()):
                    q = layer.self_attn.query_proj(xn)
                queries.append(q)
                with torch.no_grad(), _exact(device):  # discrete: no gradient
                    rows = dropped[0][layer_idx]
                    extra_keys = layer.retriever_keys(rows).to(mem.ltm.keys[0].dtype)
                extra = (extra_keys, dropped[1][layer_idx], rows)
                with _exact(device):
                    got = mem.ltm.retrieve(
                        layer_idx, q.detach().to(extra_keys.dtype), mode=model.semantics, backend=model.backend,
                        extra=extra, age_offset=dropped[2], alive=alive[layer_idx] if alive else None,
                    )  # fmt: skip
                ltm_rows = got.hidden if got.index.numel() else None
            args = (layer_idx, h, hidden[layer_idx], ltm_rows)
            h = decode_layer(*args) if run_layer is None else run_layer(decode_layer, *args)
        logits = model.lm_head(model.model.norm(h)).float()
    return logits, queries
