"""``MPlusForCausalLM``: a thin M+ / MemoryLLM on Llama (SPEC.md §3–5; docs/architecture.md §2, §5).

The network is :mod:`mplus.llama`; the memory a :class:`~mplus.memory.state.MemoryState` (``model.memory`` by
default, or any state a call names). ``inject`` writes a context into memory (SPEC.md §4, :mod:`mplus.update`);
``forward`` / ``generate`` read it (SPEC.md §5, :mod:`mplus.generation`): per layer the prompt retrieves K0
long-term rows at the prefill and attends [BOS ; long-term rows ; short-term rows ; itself] as memory segments
(:mod:`mplus.segments`) merged through their LSE, never concatenated. ``semantics="reference"`` reproduces the
official implementation (small-LTM repeat rule, bf16-rounded RoPE ``inv_freq``), ``"fast"`` (default) takes the
documented fixes; ``kernels="reference"`` runs every op on its pure-PyTorch reference.
"""

from __future__ import annotations

import os
import threading
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from mplus_kernels import _backend

from . import update
from ._placement import FixedDtypeBuffers, leave_out_of_state_dict
from ._sync import MemoryLock
from .attention import rope_tables
from .base import from_base as _from_base
from .checkpoint import load_checkpoint, save_checkpoint
from .config import MPlusConfig
from .generation import (
    MPlusCache,
    MPlusGenerationMixin,
    StaleCacheError,
    check_cache,
    check_labels,
    forward_keywords,
    left_padding,
    prefill_segments,
    read_locks,
    same_states,
    settle_segments,
)
from .llama import MPlusModel, RopeRows, check_ids
from .lora import DECODER, ENCODER, AdapterState, LoRALinear
from .memory import ShortTermMemory
from .memory.ltm import LongTermMemory
from .memory.state import MemoryState
from .memory.transfer import TransferEngine
from .retriever import Projector
from .update import CHUNK_SIZE, MIN_CHUNK, split_chunks

# names other modules and user code import from here (kept since the model was one file)
__all__ = [
    "CHUNK_SIZE",
    "DECODER",
    "ENCODER",
    "MIN_CHUNK",
    "MPlusCache",
    "MPlusForCausalLM",
    "StaleCacheError",
    "split_chunks",
]

Semantics = Literal["fast", "reference"]
_TRANSFER_LOCK = threading.Lock()


class MPlusForCausalLM(FixedDtypeBuffers, PreTrainedModel, MPlusGenerationMixin):
    """M+ (or MemoryLLM) on Llama. Build with :meth:`from_pretrained` from an official checkpoint directory, or with
    :meth:`from_base` from a pretrained Llama (a new, untrained M+).

    Args:
        config: :class:`MPlusConfig`.
        semantics: ``"fast"`` (default) or ``"reference"`` (official quirks; see the module docstring).
        kernels: ``"fused"`` (mplus kernels, backend ``auto``) or ``"reference"`` (pure PyTorch everywhere).
        dtype: parameter and memory dtype. max_length: longest prompt + generated tokens of one ``generate`` call.
        ltm_capacity: rows per layer reserved in the long-term store (grows beyond on demand).
    """

    config_class = MPlusConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    fixed_dtype_buffers = ("inv_freq", "rope_cos", "rope_sin")  # fp32 whatever the model dtype (kernels take fp32)

    def __init__(
        self,
        config: MPlusConfig,
        *,
        semantics: Semantics = "fast",
        kernels: Literal["fused", "reference"] = "fused",
        dtype: torch.dtype = torch.float32,
        max_length: int = 2048,
        ltm_capacity: int = 0,
    ) -> None:
        super().__init__(config)
        if not isinstance(max_length, int) or max_length <= 0:
            raise ValueError(f"MPlusForCausalLM: max_length={max_length!r} must be an int > 0 (prompt + new tokens)")
        if semantics not in ("fast", "reference") or kernels not in ("fused", "reference"):
            raise ValueError(f"semantics={semantics!r} (fast|reference), kernels={kernels!r} (fused|reference)")
        if not config.add_bos_embedding:
            raise ValueError("MPlusForCausalLM: configs without add_bos_embedding are not supported")
        self.semantics, self.kernels, self.max_length = semantics, kernels, max_length
        self.backend = "reference" if kernels == "reference" else None
        self.adapters = AdapterState(DECODER)
        names = [ENCODER, DECODER] if config.add_decoder_lora else [ENCODER]
        r, alpha = config.lora_config["r"], config.lora_config["lora_alpha"]
        dropout = config.lora_config.get("lora_dropout", 0.0)  # active in training mode only
        lora = lambda lin: LoRALinear(lin, names, r, alpha, self.adapters, dropout)  # noqa: E731
        L, N, d = config.num_hidden_layers, config.stm_size, config.hidden_size  # noqa: N806
        self.model = MPlusModel(config, lora, dtype, self.backend, Projector)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False, dtype=dtype)
        self.bos_embedding = nn.Parameter(torch.zeros(L, 1, d, dtype=dtype), requires_grad=False)
        self.new_memory_positional_emb = nn.Parameter(torch.zeros(1, 1, d, dtype=dtype), requires_grad=False)
        kv_shape = (config.num_key_value_heads, config.head_dim)
        stm = ShortTermMemory(torch.zeros(L, N, d, dtype=dtype), kv_shape=kv_shape, kv_dtype=dtype)
        ltm = None
        if config.has_ltm:
            ltm = LongTermMemory(
                L,
                d,
                config.selector_hidden_dim,
                num_tokens=config.num_tokens,
                update_ltm_frequency=config.update_ltm_frequency,
                num_retrieved=config.num_ltm_tokens,
                decay_frequency=config.decay_frequency,
                initial_rf=config.initial_rf_when_moving_stm_to_ltm,
                dtype=dtype,
                capacity=ltm_capacity,
                kv_shape=kv_shape,
                kv_dtype=dtype,
            )
        # the default memory state: the checkpoint's memory loads here; it follows model.to(...)
        self.memory = MemoryState(stm, ltm)
        # False: generation bypasses the memory (no memory segments, positions from 0: the base Llama; from_base's
        # LoRA B = 0 then reproduces the base model). Read at each prefill; the cache keeps it for its decode steps
        self.use_memory = True
        # True: a prefill keeps its memory segments with their keys rotated once (MemoryKV.rotated), so that decode
        # steps read the keys as a plain Llama's KV cache holds them (no per-step RoPE, no RoPE-table reads), for one
        # rotated copy of the short-term keys per layer while the generation lives. Read at each prefill
        self.rotate_decode_memory = True
        self._set_rope()
        # the model's state_dict holds its weights: the memory is user data, saved per state (MemoryState.save)
        leave_out_of_state_dict(self, "memory")
        self.eval()  # an inference model until mplus.training.prepare (train mode turns LoRA dropout on)

    def _set_rope(self) -> None:
        """The RoPE buffers (fp32, in no checkpoint): made at construction and again after :meth:`to_empty`."""
        inv_freq = self.config.rope_inv_freq().to(self.lm_head.weight.device)
        if self.semantics == "reference" and self.lm_head.weight.dtype == torch.bfloat16 and self.config.has_ltm:
            # M+'s README has model.to(bf16) round inv_freq (SPEC §3.2); MemoryLLM keeps it fp32 (SPEC §10)
            inv_freq = inv_freq.to(torch.bfloat16).float()
        cos, sin = rope_tables(inv_freq, self.config.memory_prefix_len + self.max_length)
        for name, t in [("inv_freq", inv_freq), ("rope_cos", cos), ("rope_sin", sin)]:
            self.register_buffer(name, t, persistent=False)

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> MPlusForCausalLM:
        """``nn.Module.to_empty``, then the RoPE tables are computed anew: a model built under
        ``torch.device("meta")`` materialises on ``device``; its weights and memory come from a load."""
        super().to_empty(device=device, recurse=recurse)
        self._set_rope()
        return self

    def set_kernels(self, kernels: Literal["fused", "reference"]) -> None:
        """Switch every op of the model between the mplus kernels and their pure-PyTorch references."""
        if kernels not in ("fused", "reference"):
            raise ValueError(f"set_kernels: kernels={kernels!r}, expected 'fused' or 'reference'")
        self.kernels, self.backend = kernels, ("reference" if kernels == "reference" else None)
        for layer in self.layers:
            layer.self_attn.backend = self.backend

    # ------------------------------------------------------------------------------------------ properties
    @property
    def stm(self) -> ShortTermMemory:
        """The default memory state's short-term memory (``model.memory.stm``)."""
        return self.memory.stm

    @property
    def ltm(self) -> LongTermMemory | None:
        """The default memory state's long-term store (``model.memory.ltm``; None for MemoryLLM)."""
        return self.memory.ltm

    @property
    def memory_lock(self) -> MemoryLock:
        return self.memory.lock

    @property
    def memory_version(self) -> int:
        return self.memory.version

    def new_memory(self, like: MemoryState | None = None, *, seed: int | None = None) -> MemoryState:
        """A new memory state: a copy of ``like`` (default: the model's default state as it is now — right after
        ``from_pretrained``, the checkpoint's memory), on its device. ``seed``: the state draws its drops from its
        own ``torch.Generator`` seeded so (default: the copied state's generator; the default state's is torch's
        global CPU generator, as the official code draws)."""
        source = self.memory if like is None else self.resolve_memory(like, "new_memory")
        with source.lock.read():
            state = source.clone()
        if seed is not None:
            state.generator = torch.Generator().manual_seed(seed)
        return state

    def resolve_memories(
        self, memory: MemoryState | list[MemoryState] | None, b: int, what: str
    ) -> MemoryState | list[MemoryState]:
        """``memory`` for a batch of ``b`` rows: a state shared by the batch (None: the model's own), or a list of one
        state per row (B states, repeats allowed), each checked by :meth:`resolve_memory`."""
        if isinstance(memory, (list, tuple)):
            if len(memory) != b:
                raise ValueError(
                    f"{what}: memory lists {len(memory)} states for a batch of B={b} rows: give one per row"
                )
            return [self.resolve_memory(m, f"{what}: memory[{i}]") for i, m in enumerate(memory)]
        return self.resolve_memory(memory, what)

    def resolve_memory(self, memory: MemoryState | None, what: str, *, inject: bool = False) -> MemoryState:
        """The state a call named ``what`` works on (the default when None), checked to be one of this model's shape
        and place; ``inject``: also that it can be written (not placed for generation only)."""
        if memory is None:
            return self.memory
        if not isinstance(memory, MemoryState):
            raise TypeError(f"{what}: memory must be a MemoryState (model.new_memory()), got {type(memory).__name__}")
        if memory is not self.memory:
            memory.check_usable(self.memory, self.compute_device, what, inject=inject)
        return memory

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def compute_device(self) -> torch.device:
        """Where the parameters, the short-term memory and the long-term keys live (the rows stay on the host)."""
        return self.lm_head.weight.device

    @property
    def rope(self) -> RopeRows:
        """The chunk tokens' RoPE rows over the model's tables (built per call: the tables follow ``model.to``)."""
        return RopeRows(self.rope_cos, self.rope_sin, self.config.memory_prefix_len, self.max_length)

    @property
    def transfer(self) -> TransferEngine:
        """The engine that overlaps long-term retrieval and gather with compute (created on first use)."""
        device = self.compute_device
        # Triton on CPU tensors is the interpreter, which cannot run kernels on two threads at once: jobs run inline
        threaded = device.type != "cpu" or _backend.resolve("retrieve_topk", device, self.backend) != "triton"
        with _TRANSFER_LOCK:  # forwards from several threads share one engine
            engine = getattr(self, "_transfer", None)
            if engine is None or engine.device != device or engine.threaded != threaded:  # (re)made after a move
                if engine is not None:
                    engine.close()
                engine = self._transfer = TransferEngine(device, threaded=threaded)
        return engine

    # ---------------------------------------------------------------------------------------------- update
    def inject(
        self,
        context_ids: Tensor,
        *,
        update_memory: bool = True,
        victims: Tensor | None = None,
        output_hidden_states: bool = False,
        chunk_size: int = CHUNK_SIZE,
        progress: bool = True,
        memory: MemoryState | None = None,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Write a context ``context_ids [1, T]`` into memory (SPEC.md §4); returns the delta memory ``[L, K, d]``
        (and the per-layer input hidden states with ``output_hidden_states``). ``victims [L, K]``: the drops
        (default: drawn as the official code draws); ``update_memory=False``: nothing changes; a context of more
        than ``chunk_size`` tokens goes in as chunks, each all-or-nothing; ``memory``: the :class:`MemoryState`
        written (default: ``model.memory``). The details: :func:`mplus.update.inject`."""
        return update.inject(
            self,
            context_ids,
            update_memory=update_memory,
            victims=victims,
            output_hidden_states=output_hidden_states,
            chunk_size=chunk_size,
            progress=progress,
            memory=memory,
        )

    # ------------------------------------------------------------------------------------------ generation
    def forward(
        self,
        input_ids: Tensor,
        past_key_values: MPlusCache | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool = False,
        use_cache: bool = True,
        memory: MemoryState | list[MemoryState] | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Generation-mode forward (SPEC.md §5). ``input_ids [B, T]``; with an empty (or no) cache this is the
        prefill: each sequence retrieves its long-term rows. ``logits_to_keep``: only the last n positions (0 = all).

        ``labels [B, T]``: the language-model loss, as transformers' ``LlamaForCausalLM`` computes it
        (``self.loss_function``: shifted inside, ``-100`` ignored, ``num_items_in_batch`` / ``shift_labels`` honoured).
        The forward never records gradients: it attends the memory through K/V cached once per slot, so a gradient
        from it would miss the memory path. Its loss is an evaluation loss (a Trainer's ``evaluate``); training is
        :func:`mplus.training.training_step`, and labels in train mode with gradients on (a Trainer's training step)
        are refused. Other keywords: ``return_dict`` (False: a tuple), ``output_attentions=False``; anything else
        (``position_ids``, ``cache_position``, ``inputs_embeds``, ``output_attentions=True``, unknown names) is refused
        by name rather than ignored.

        Batches share the model's memory. ``attention_mask [B, T]`` at the prefill gives each row's left padding
        (Hugging Face's convention for generation): a row's positions start after its padding, its padding is
        invisible to every query and excluded from its retrieval queries, so each row computes what it would alone.
        Later calls (decoding) ignore the mask: the cache keeps the padding. Positions follow the memory (no
        ``position_ids``). ``memory``: the :class:`MemoryState` the prefill reads (default: the model's
        own), or a list of B states, one per row (each row attends its own short-term memory and retrieves from its
        own long-term store, exactly as alone; no memory is copied); the cache then belongs to them (later calls
        may repeat them or leave them out)."""
        check_ids(input_ids, self.config.vocab_size, "forward", batch=True, name="input_ids")
        return_dict, loss_kwargs = forward_keywords(kwargs)
        if labels is not None:
            check_labels(labels, input_ids, self.config.vocab_size, logits_to_keep)
            if torch.is_grad_enabled() and self.training:
                raise RuntimeError(
                    "forward: labels in train mode with gradients on (a training step): this forward records no "
                    "gradients (it reads the memory through its cached K/V); train with "
                    "mplus.training.training_step, or evaluate under model.eval() / torch.no_grad()"
                )
        logits, cache, hiddens = self._generation_forward(
            input_ids, past_key_values, attention_mask, logits_to_keep, memory
        )
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        out = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=cache if use_cache else None,
            hidden_states=tuple(hiddens) if output_hidden_states else None,
        )
        return out if return_dict is not False else out.to_tuple()

    @torch.no_grad()
    def _generation_forward(
        self,
        input_ids: Tensor,
        past_key_values: MPlusCache | None,
        attention_mask: Tensor | None,
        logits_to_keep: int,
        memory: MemoryState | list[MemoryState] | None,
    ) -> tuple[Tensor, MPlusCache, list[Tensor]]:
        """The forward itself (input checked): fp32 logits, the cache, every layer's input hidden states."""
        if past_key_values is not None and not isinstance(past_key_values, MPlusCache):
            raise TypeError(
                f"forward: past_key_values must be an MPlusCache (model.new_cache(), or the one a prefill returned), "
                f"got {type(past_key_values).__name__}"
            )
        b, t = input_ids.shape
        if past_key_values is not None and past_key_values.length:
            mem = past_key_values.memory
            if memory is not None and not same_states(memory, mem):
                raise ValueError(
                    "forward: memory is not the state this cache was prefilled on (past_key_values.memory)"
                )
        else:
            mem = self.resolve_memories(memory, b, "forward")
        with read_locks(mem):
            cache = past_key_values if past_key_values is not None else self.new_cache(batch_size=b)
            if cache.batch_size != b:
                raise ValueError(f"forward: input_ids has B={b} rows, past_key_values holds {cache.batch_size}")
            cap = cache.layers[0].k.shape[1]
            if cache.length + t > cap:  # before any layer writes its cache rows
                where = f"max_length={self.max_length} (load the model with a larger max_length)"
                if cap != self.max_length:
                    where = f"the cache's {cap} rows (model.new_cache(max_tokens=...))"
                raise ValueError(f"forward: {t} tokens after {cache.length} cached (prompt + generated) exceed {where}")
            prefill = cache.length == 0
            if prefill:
                cache.memory = mem
                cache.memory_version = [m.version for m in mem] if isinstance(mem, list) else mem.version
                cache.use_memory = bool(self.use_memory)  # read once, at the prefill: the cache keeps it
                cache.rotated_memory = bool(self.rotate_decode_memory)
                cache.pads = left_padding(attention_mask, b, t)
                cache.kv_start = None
                if cache.pads is not None:
                    cache.kv_start = torch.tensor(cache.pads, dtype=torch.int32, device=self.compute_device)
            else:
                check_cache(cache, "forward")
            pos = self.cache_rope(cache).rows(cache.length, t, cache.kv_start)
            hiddens = []
            with self.adapters.use(DECODER):
                h = self.model.embed_tokens(input_ids.to(self.compute_device))
                for layer_idx, layer in enumerate(self.layers):
                    hiddens.append(h)
                    segments = cache.memories[layer_idx]
                    if prefill and cache.use_memory:
                        segments = prefill_segments(self, layer_idx, layer, h, cache)
                    h = layer(h, pos, segments, cache.layers[layer_idx], kv_start=cache.kv_start)
                    if prefill and cache.use_memory:  # the layer resolved its long-term rows: the cache keeps them
                        cache.memories[layer_idx], cache.retrieved[layer_idx] = settle_segments(
                            segments, b, cache.rotated_memory, self.backend
                        )
                h = self.model.norm(h)
        hiddens.append(h)
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h).float()
        return logits, cache, hiddens

    # ------------------------------------------------------------------------------------------ checkpoints
    @classmethod
    def from_base(
        cls,
        path_or_id: str | os.PathLike,
        *,
        kind: Literal["mplus", "memoryllm"] = "mplus",
        gguf_file: str | None = None,
        dtype: torch.dtype | str | None = None,
        max_length: int = 2048,
        semantics: Semantics = "fast",
        kernels: Literal["fused", "reference"] = "fused",
        init_context: str | Tensor | list[int] | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        **memory_sizes,
    ) -> MPlusForCausalLM:
        """A new, untrained M+ (``kind="mplus"``) or MemoryLLM (``"memoryllm"``) on a pretrained Llama (a folder, a
        Hub id, or ``gguf_file`` in one), initialised as the official training code initialises it; with
        ``model.use_memory = False`` it computes what the base computes. Arguments: :func:`mplus.base.from_base`
        (``memory_sizes``: :func:`mplus.base.memory_config`)."""
        return _from_base(
            cls, path_or_id, kind=kind, gguf_file=gguf_file, dtype=dtype, max_length=max_length, semantics=semantics,
            kernels=kernels, init_context=init_context, seed=seed, device=device, **memory_sizes,
        )  # fmt: skip

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> MPlusForCausalLM:  # type: ignore[override]
        """Load an official M+ / MemoryLLM checkpoint (``config.json`` + safetensors, SPEC.md §2): a directory, or a
        Hugging Face Hub model id (``"owner/name"``) resolved through the Hub cache (``huggingface_hub``'s
        ``snapshot_download``: a cached model loads offline, ``HF_HUB_OFFLINE=1``).

        Keywords: ``dtype`` (or its Hugging Face spelling ``torch_dtype``), ``device`` (or ``device_map`` naming one
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``, ``"auto"`` = cuda when available, or ``{"": device}``), the
        Hub's (``revision``, ``subfolder``, ``cache_dir``, ``force_download``, ``local_files_only``, ``token``),
        ``config`` (an :class:`MPlusConfig` instead of ``config.json``: how ``AutoModelForCausalLM`` calls it), and
        the constructor's (``semantics``, ``kernels``, ``max_length``, ``ltm_capacity``). transformers' other
        keywords are taken when harmless (``trust_remote_code``, ``low_cpu_mem_usage``, ...) and refused by name when
        mplus cannot honour them (``attn_implementation="sdpa"``, ``variant``, ...): see
        :data:`mplus.checkpoint.IGNORED_KEYWORDS` and :data:`mplus.checkpoint.REFUSED_KEYWORDS`."""
        return load_checkpoint(cls, path, **kwargs)

    def save_pretrained(  # type: ignore[override]
        self, save_directory: str, *, safe_serialization: bool = True, max_shard_size: int | str | None = None
    ) -> None:
        """Write ``config.json`` + ``model.safetensors`` in the official layout (names and dtypes; ``model_type:
        "mplus"`` so that transformers' Auto classes build this class): the weights and the current memory as far as
        that layout holds it (not the short-term ages, the dropped-row cache, the RNG: ``save_memory`` keeps those).
        :meth:`from_pretrained` reads it back. See :func:`mplus.checkpoint.save_checkpoint`."""
        save_checkpoint(self, save_directory, safe_serialization=safe_serialization, max_shard_size=max_shard_size)
