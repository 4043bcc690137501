"""A thin M+ / MemoryLLM on Llama (SPEC.md §3–5, DESIGN.md §3–4): few hundred readable lines on mplus kernels.

State, per layer: the short-term memory as a slot pool (``ShortTermMemory``, with each slot's generation-adapter K/V
cached before RoPE), the long-term memory store (``LongTermMemory``, M+ only), the per-layer BOS row.

* ``inject(context_ids)`` — the update path (SPEC.md §4): encoder adapter; per layer the context attends to
  [BOS ; last K short-term rows]; the last K outputs of each layer become that layer's new memory rows; K rows are
  dropped per layer (official RNG: per layer ``torch.randperm(N)`` on torch's default CPU generator) and go to the
  long-term cache (M+) or are discarded (MemoryLLM).
* ``forward(input_ids)`` / ``generate(...)`` — generation (SPEC.md §5): decoder adapter; per layer, the prompt
  retrieves K0 long-term rows (prefill only), then attends to [BOS ; long-term rows ; short-term rows] and itself.
  Nothing is concatenated per step: the short-term memory is attended in slot order with its cached K/V, the
  BOS + long-term rows as a second segment, and the two partial attentions are merged through their LSE.

``semantics="reference"`` reproduces the official implementation (small-LTM repeat rule, bf16-rounded RoPE
``inv_freq`` when the model runs in bf16); ``"fast"`` (default) takes the documented fixes. ``kernels="reference"``
runs every op on its pure-PyTorch reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from mplus_kernels import _backend, draw_victims
from mplus_kernels._utils import host_values

from ._placement import FixedDtypeBuffers
from ._sync import MemoryLock
from .attention import FusedMemoryAttention, KVCache, MemoryKV, rope_tables
from .config import MPlusConfig
from .lora import AdapterState, LoRALinear
from .memory import ShortTermMemory
from .memory.ltm import LongTermMemory
from .memory.state import MemoryState
from .memory.transfer import TransferEngine
from .retriever import Projector, rms_norm

ENCODER, DECODER = "default", "decoder_adapter"
Semantics = Literal["fast", "reference"]
_TRANSFER_LOCK = threading.Lock()
CHUNK_SIZE = 512  # tokens per injected chunk: the official training cap and LongBench evaluation chunk
MIN_CHUNK = 16  # the training minimum (the official README: shorter contexts disturb the memory)


def split_chunks(length: int, chunk_size: int = CHUNK_SIZE) -> list[tuple[int, int]]:
    """``[start, end)`` of the chunks of a ``length``-token document, as the official LongBench evaluation cuts
    it: full ``chunk_size`` chunks aligned to the end, the remainder (if any) first."""
    head = length % chunk_size
    bounds = ([0] if head else []) + list(range(head, length + 1, chunk_size))
    return list(zip(bounds[:-1], bounds[1:]))


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, dtype=dtype))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    def __init__(self, config: MPlusConfig, lora, dtype) -> None:
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.gate_proj = lora(nn.Linear(d, i, bias=config.mlp_bias, dtype=dtype))
        self.up_proj = lora(nn.Linear(d, i, bias=config.mlp_bias, dtype=dtype))
        self.down_proj = lora(nn.Linear(i, d, bias=config.mlp_bias, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Llama decoder layer whose attention sees memory segments (keys before RoPE, each with its positions)."""

    def __init__(self, config: MPlusConfig, lora, dtype, backend: str | None) -> None:
        super().__init__()
        d = config.hidden_size
        self.input_layernorm = RMSNorm(d, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(d, config.rms_norm_eps, dtype)
        attn = FusedMemoryAttention.from_config(config, dtype=dtype, backend=backend)
        attn.q_proj, attn.k_proj, attn.v_proj = lora(attn.q_proj), lora(attn.k_proj), lora(attn.v_proj)
        if config.has_ltm:
            ds, n = config.selector_hidden_dim, config.num_selector_layers
            attn.query_proj = Projector(d, ds, n, dtype)
            attn.key_proj = Projector(d, ds, n, dtype)
            if config.add_encoder_retriever:
                attn.encoder_query_proj = Projector(d, ds, n, dtype)
        self.self_attn = attn
        self.mlp = MLP(config, lora, dtype)

    def memory_kv(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Pre-RoPE K/V ``[M, Hkv, D]`` of memory rows ``[M, d]`` under the active adapter."""
        k, v = self.self_attn.project_memory(self.input_layernorm(rows)[None])
        return k[0], v[0]

    def forward(
        self,
        h: Tensor,
        pos: tuple[Tensor, Tensor],
        memories: list,
        cache: KVCache | None,
        cache_position: Tensor | None = None,
        kv_start: Tensor | None = None,
    ) -> Tensor:
        """``h [B, T, d]`` → ``[B, T, d]``; ``pos`` = the chunk's (cos, sin) ``[B or 1, T, D]``; ``memories``: the
        segments :meth:`FusedMemoryAttention.forward` takes (entries still being fetched are resolved in place);
        ``cache_position``: static-cache mode (see :meth:`MPlusForCausalLM.decode_step`); ``kv_start [B]``: each
        row's first valid cache row (left padding)."""
        h = h + self.self_attn(
            self.input_layernorm(h), pos, memories, cache, cache_position=cache_position, kv_start=kv_start
        )
        return h + self.mlp(self.post_attention_layernorm(h))


class MPlusModel(nn.Module):
    def __init__(self, config: MPlusConfig, lora, dtype, backend: str | None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, lora, dtype, backend) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)


def _same_states(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, list):
        return len(a) == len(b) and all(x is y for x, y in zip(a, b))
    return a is b


@contextlib.contextmanager
def _read_locks(memory):
    """Read locks of one state or of a list (each distinct state once, in a fixed order: no lock-order cycles)."""
    states = list({id(m): m for m in memory}.values()) if isinstance(memory, list) else [memory]
    with contextlib.ExitStack() as stack:
        for state in sorted(states, key=id):
            stack.enter_context(state.lock.read())
        yield


class StaleCacheError(RuntimeError):
    """A generation cache was used after the memory it was built on changed (an ``inject`` or a load since its
    prefill): its memory segments no longer match the memory. Start a new generation (a new cache)."""


@dataclasses.dataclass
class MPlusCache:
    """Per-generate state: each layer's chunk KV cache and its fixed memory segments (built at prefill)."""

    layers: list[KVCache]
    memories: list[list[MemoryKV]]
    retrieved: list[Tensor | None]  # per layer: indices of the long-term rows used (age order), for inspection
    memory: MemoryState | list[MemoryState] | None = None  # the state(s) the prefill read (segments are views of it)
    memory_version: int | list[int] | None = None  # their versions at the prefill (None: not prefilled yet)
    kv_start: Tensor | None = None  # [B] int32: each row's left padding (its first valid cache row); None: none
    pads: list[int] | None = None  # the same on the host
    is_compileable = False  # read by transformers' generate (no automatic torch.compile of the decode step)

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def batch_size(self) -> int:
        return self.layers[0].k.shape[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:  # the name transformers' generation utilities call
        return self.layers[layer_idx].length


class MPlusForCausalLM(FixedDtypeBuffers, PreTrainedModel, GenerationMixin):
    """M+ (or MemoryLLM) on Llama. Build with :meth:`from_pretrained` from an official checkpoint directory.

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
        self.model = MPlusModel(config, lora, dtype, self.backend)
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
        inv_freq = config.rope_inv_freq()
        if semantics == "reference" and dtype == torch.bfloat16 and config.has_ltm:
            # M+'s README has model.to(bf16) round inv_freq (SPEC §3.2); MemoryLLM keeps it fp32 (SPEC §10)
            inv_freq = inv_freq.to(torch.bfloat16).float()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        cos, sin = rope_tables(inv_freq, config.memory_prefix_len + max_length)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.eval()  # an inference model until mplus.training.prepare (train mode turns LoRA dropout on)

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
        source = self.memory if like is None else self._memory_of(like, "new_memory")
        with source.lock.read():
            state = source.clone()
        if seed is not None:
            state.generator = torch.Generator().manual_seed(seed)
        return state

    def _memories_of(self, memory, b: int, what: str) -> MemoryState | list[MemoryState]:
        """A state shared by the batch, or a list of one state per row (B states, repeats allowed)."""
        if isinstance(memory, (list, tuple)):
            if len(memory) != b:
                raise ValueError(
                    f"{what}: memory lists {len(memory)} states for a batch of B={b} rows: give one per row"
                )
            return [self._memory_of(m, f"{what}: memory[{i}]") for i, m in enumerate(memory)]
        return self._memory_of(memory, what)

    def _memory_of(self, memory: MemoryState | None, what: str, *, inject: bool = False) -> MemoryState:
        """The state a call works on (the default when None), checked to be one of this model's shape and place."""
        if memory is None:
            return self.memory
        if not isinstance(memory, MemoryState):
            raise TypeError(f"{what}: memory must be a MemoryState (model.new_memory()), got {type(memory).__name__}")
        if memory is self.memory:
            return memory
        own, other = self.memory.describe(), memory.describe()
        for part in ("stm", "ltm"):
            mine, theirs = own[part], other[part]
            if (mine is None) != (theirs is None) or (
                mine is not None
                and {k: v for k, v in mine.items() if k != "budget_bytes"}
                != {k: v for k, v in theirs.items() if k != "budget_bytes"}
            ):
                raise ValueError(f"{what}: memory is a state of another config ({part}: {theirs}, this model: {mine})")
        if memory.device != self.compute_device:
            raise ValueError(
                f"{what}: memory's short-term K/V is on {memory.device}, the model on {self.compute_device}: "
                "memory.to(device) first"
            )
        if inject and memory.placed_for_generation_only():
            raise ValueError(
                f"{what}: memory was placed for generation only (to(..., what='generation')): inject also reads and "
                "writes the short-term rows, ages and slot order; memory.to(device) first"
            )
        return memory

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def compute_device(self) -> torch.device:
        """Where the parameters, the short-term memory and the long-term keys live (the rows stay on the host)."""
        return self.lm_head.weight.device

    def _check_rope_range(self, end: int) -> None:
        if end > self.rope_cos.shape[0]:
            raise ValueError(
                f"positions up to {end} exceed the RoPE table ({self.rope_cos.shape[0]}): raise "
                f"max_length (now {self.max_length})"
            )

    def _chunk_rope(self, start: int, t: int) -> tuple[Tensor, Tensor]:
        self._check_rope_range(start + t)
        cos, sin = self.rope_cos[start : start + t], self.rope_sin[start : start + t]
        return torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]

    def _mem(self, k: Tensor, v: Tensor, positions: Tensor, batch: int = 1) -> MemoryKV:
        """A memory segment of rows ``k/v [M, Hkv, D]`` shared by ``batch`` sequences (an expand, never a copy)."""
        k, v = k[None].expand(batch, *k.shape), v[None].expand(batch, *v.shape)
        return MemoryKV(k, v, positions, self.rope_cos, self.rope_sin)

    def _rope_rows(self, start: int, t: int, kv_start: Tensor | None) -> tuple[Tensor, Tensor]:
        """(cos, sin) of cache rows ``start .. start+t-1``: ``[1, T, D]``, or ``[B, T, D]`` with left padding (see
        :meth:`_rope_at`)."""
        prefix = self.config.memory_prefix_len
        if kv_start is None:
            return self._chunk_rope(prefix + start, t)
        self._check_rope_range(prefix + start + t)  # padding only lowers positions
        return self._rope_at(prefix + torch.arange(start, start + t, device=kv_start.device), kv_start)

    def _rope_at(self, positions: Tensor, kv_start: Tensor | None) -> tuple[Tensor, Tensor]:
        """(cos, sin) ``[1 or B, T, D]`` of the cache rows at ``positions [T]`` (memory prefix included). With left
        padding ``kv_start [B]``, row b's tokens sit at positions counted from its first valid row (padding rows:
        the first position after the memory prefix)."""
        prefix = self.config.memory_prefix_len
        if kv_start is None:
            positions = positions[None]
        else:
            positions = (positions[None] - kv_start[:, None].long()).clamp_min(prefix)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)

    def _left_padding(self, attention_mask: Tensor | None, b: int, t: int) -> list[int] | None:
        """Each row's number of left-padding tokens from a prefill's ``attention_mask [B, T]`` (1 = token, 0 =
        padding, Hugging Face's convention); None when nothing is padded. The mask is read on the host, once per
        prefill (a sync when it is on a device): a mask that is not left padding is refused, not guessed."""
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (b, t):
            got = list(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise ValueError(f"forward: attention_mask must be [B={b}, T={t}] like input_ids at the prefill, got {got}")
        if attention_mask.device.type == "meta":
            raise ValueError("forward: an attention_mask on the meta device has no values to read the padding from")
        mask = attention_mask.detach().to("cpu")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("forward: attention_mask must hold 0 (padding) and 1 (token) only")
        mask = mask.bool()
        pads = (~mask).sum(1)
        wrong = (mask != (torch.arange(t)[None] >= pads[:, None])).any(1) | (pads == t)  # not left padding; no token
        if bool(wrong.any()):
            bad = int(wrong.nonzero()[0])
            raise ValueError(
                f"forward: attention_mask row {bad} is {mask[bad].int().tolist()}: mplus needs left padding (zeros, "
                "then ones, at least one token per row), as Hugging Face pads for generation (tokenizer.padding_side "
                '= "left")'
            )
        return pads.tolist() if bool(pads.any()) else None

    def _check_ids(self, ids: Tensor, what: str, batch: bool = False) -> None:
        shape = "[B, T]" if batch else "[1, T]"
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
            raise ValueError(f"{what}: expected integer token ids {shape}, got {getattr(ids, 'shape', type(ids))}")
        if ids.shape[0] == 0:
            raise ValueError(f"{what}: empty batch (B = 0)")
        if ids.shape[0] != 1 and not batch:
            raise ValueError(f"{what}: batch size {ids.shape[0]} is not supported (M+ memory is per sequence: use 1)")
        if ids.shape[1] == 0:
            raise ValueError(f"{what}: empty input (T = 0)")
        if host_values(ids):  # device ids are not read (a host sync); MPLUS_DEBUG_CHECKS=1 reads them
            lo, hi = (int(x) for x in torch.aminmax(ids))
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"{what}: token ids must be in [0, {self.config.vocab_size}), got range [{lo}, {hi}]")

    # ---------------------------------------------------------------------------------------------- update
    @torch.no_grad()
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
        """Write a context into memory (SPEC.md §4). ``context_ids [1, T]``; returns the delta memory ``[L, K, d]``
        (and the per-layer input hidden states with ``output_hidden_states``).

        ``victims [L, K]`` overrides the drop choices (logical positions); by default they are drawn as the official
        code does, from torch's default CPU generator. With ``update_memory=False`` nothing changes.

        **Long documents.** A context of more than ``chunk_size`` tokens (default 512, the official training and
        evaluation cap) is split as the official LongBench evaluation splits it: full ``chunk_size`` chunks aligned
        to the *end* of the document, the remainder (``T mod chunk_size`` tokens, when not 0) as the first chunk;
        the chunks are injected in order, exactly as ``inject`` called on each one, with a ``tqdm`` progress bar
        (``progress=False``: none). A chunk under 16 tokens (the training minimum) warns: the official README says
        such chunks disturb the memory. Returns the last chunk's delta. Each chunk is all-or-nothing; when chunk i
        fails (e.g. ``LTMBudgetError``), the chunks before it stay injected and the error's note says how many.
        ``victims``, ``output_hidden_states`` and ``update_memory=False`` apply to a single chunk only.

        ``memory``: the :class:`MemoryState` to write (default: the model's own, ``model.memory``).
        """
        self._check_ids(context_ids, "inject")
        mem = self._memory_of(memory, "inject", inject=True)
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"inject: chunk_size={chunk_size!r} must be an int > 0")
        t = context_ids.shape[1]
        chunks = split_chunks(t, chunk_size)
        if len(chunks) > 1 and (victims is not None or output_hidden_states or not update_memory):
            raise ValueError(
                f"inject: a context of {t} tokens is {len(chunks)} chunks of <= {chunk_size}; victims, "
                "output_hidden_states and update_memory=False apply to one chunk: inject the chunks one by one"
            )
        limit = self.rope_cos.shape[0] - self.config.num_tokens - 1
        if max(b - a for a, b in chunks) > limit:
            raise ValueError(
                f"inject: a context of {min(t, chunk_size)} tokens exceeds the {limit}-token limit of "
                f"max_length={self.max_length} (lower chunk_size or load with a larger max_length)"
            )
        short = [b - a for a, b in chunks if b - a < MIN_CHUNK]
        if short:
            warnings.warn(
                f"inject: {len(short)} chunk(s) of {short[0]} tokens, under the {MIN_CHUNK}-token training minimum "
                "(the official README: shorter contexts disturb the memory)",
                stacklevel=3,  # the caller of inject (past torch.no_grad's wrapper)
            )
        if victims is not None:  # checked where they are: on the host (a device tensor is read once, here)
            if not isinstance(victims, Tensor):
                raise TypeError(f"inject: victims must be an integer tensor [L, K], got {type(victims).__name__}")
            victims = victims.cpu() if victims.device.type != "meta" else victims
        if len(chunks) == 1:
            with mem.lock.write() if update_memory else mem.lock.read():
                delta, hiddens = self._inject_chunk(mem, context_ids, update_memory, victims)
            return (delta, hiddens) if output_hidden_states else delta
        with mem.lock.write():  # readers never see half a document
            bar = tqdm(chunks, desc="inject", unit="chunk", disable=not progress, leave=False)
            for i, (a, b) in enumerate(bar):
                try:
                    delta, _ = self._inject_chunk(mem, context_ids[:, a:b], True, None)
                except BaseException as exc:
                    exc.add_note(
                        f"inject: chunk {i} of {len(chunks)} (tokens {a}:{b}) failed with the memory as it was before "
                        f"it; the {i} chunk(s) before it are injected"
                    )
                    raise
        return delta

    def _inject_chunk(self, mem: MemoryState, context_ids: Tensor, update_memory: bool, victims: Tensor | None):
        n, k = self.config.stm_size, self.config.num_tokens
        tails = lambda i: mem.stm.hidden[i].index_select(0, mem.stm.order[i, n - k :].long())  # noqa: E731
        delta, hiddens = self._encode(context_ids, tails)
        if update_memory:
            self._update_memory(mem, delta, victims)
        return delta, hiddens

    def _encode(self, context_ids: Tensor, tails, run_layer=None) -> tuple[Tensor, list[Tensor]]:
        """The update forward (SPEC.md §4.2) under the encoder adapter: per layer the context attends to
        [BOS ; ``tails(layer_idx)``] (the last K short-term rows ``[K, d]``, logical order); the last K outputs of
        each layer are its delta rows. Returns the delta ``[L, K, d]`` and the layers' input hidden states.
        ``run_layer(fn, *args)``, when given, runs each layer's ``fn(*args)`` (training: gradient checkpointing).
        Differentiable when gradients are enabled (training); ``inject`` runs it under ``no_grad``."""
        k, t = self.config.num_tokens, context_ids.shape[1]
        deltas, hiddens = [], []
        p = min(k + 1, t + 1)  # official: min(1 + K, (1 + K + T) - K)
        pos = self._chunk_rope(p, k + t + 1 - p)
        memory_pos = torch.arange(p, dtype=torch.int32, device=self.compute_device)

        def encode_layer(layer_idx: int, h: Tensor, tail: Tensor) -> Tensor:
            layer = self.layers[layer_idx]
            with self.adapters.use(ENCODER):  # set inside: a checkpointed layer recomputes in the backward pass
                x = torch.cat([self.bos_embedding[layer_idx], tail, h[0]])
                x[-k:] += self.new_memory_positional_emb[0, 0]
                mk, mv = layer.memory_kv(x[:p])
                return layer(x[None, p:], pos, [self._mem(mk, mv, memory_pos)], None)

        with self.adapters.use(ENCODER):
            h = self.model.embed_tokens(context_ids.to(self.compute_device))
            for layer_idx in range(len(self.layers)):
                hiddens.append(h)
                args = (layer_idx, h, tails(layer_idx))
                out = encode_layer(*args) if run_layer is None else run_layer(encode_layer, *args)
                deltas.append(out[0, -k:])
                h = out[:, -t:]
            hiddens.append(self.model.norm(h))
        return torch.stack(deltas), hiddens

    def _update_memory(self, mem: MemoryState, delta: Tensor, victims: Tensor | None) -> None:
        """All or nothing: every check (the victims, room in the long-term cache, the budget of a merge) and every
        computation (the new rows' K/V, the dropped rows' retriever keys) comes before the first write, and the
        RNG the victims are drawn from is restored when any of it fails."""
        with self.adapters.use(DECODER):  # the short-term K/V cache holds generation-adapter keys and values
            kv = [layer.memory_kv(delta[i]) for i, layer in enumerate(self.layers)]
        new_k, new_v = torch.stack([a for a, _ in kv]), torch.stack([b for _, b in kv])
        # On the host the dropped rows land straight in the long-term cache (zero copy); from a device they come out
        # in device memory and push_dropped copies them to the (pinned) host cache asynchronously.
        stm, ltm, rows = mem.stm, mem.ltm, delta.shape[1]
        in_place = ltm is not None and self.compute_device.type == "cpu"
        keys: list[Tensor] = []

        def prepare(dropped_hidden: Tensor) -> None:  # after the STM's checks, before its first write
            if ltm is not None:
                for i, layer in enumerate(self.layers):
                    keys.append(layer.self_attn.key_proj(layer.input_layernorm(dropped_hidden[i])))
                ltm.prepare_push(rows)

        rng = mem.rng_state()
        try:
            if victims is None:
                victims = draw_victims(stm.num_layers, stm.size, rows, mem.generator)
            views = ltm.cache_views(rows) if in_place else None
            dropped = stm.update(
                delta, new_k=new_k, new_v=new_v, victims=victims, dropped=views, backend=self.backend, prepare=prepare
            )
        except BaseException:
            mem.set_rng_state(rng)
            raise
        # checked by prepare_push: from here on nothing can fail part-way
        if ltm is not None:
            if in_place:
                ltm.push_dropped(torch.stack(keys), written=True)
            else:
                kv = (dropped.k, dropped.v) if ltm.kv is not None else None
                ltm.push_dropped(torch.stack(keys), hidden=dropped.hidden, age=dropped.age, kv=kv)
        mem.version += 1

    # ------------------------------------------------------------------------------------------ generation
    def _layer_memories(self, layer_idx: int, layer: DecoderLayer, h: Tensor, cache: MPlusCache) -> list:
        """[short-term slots (cached K/V, slot order)] and [BOS ; retrieved long-term rows], with their positions.

        The short-term memory is shared by the batch (an expand of the slots' K/V); each sequence retrieves its own
        long-term rows with its own queries (its padding excluded from the score's mean) and attends its own gathered
        segment. The long-term part is retrieved and gathered on the transfer engine's worker thread while this
        thread attends to the short-term memory and the chunk; the layer resolves it last and merges through the LSE.
        """
        k0, b, mem = self.config.num_ltm_tokens, h.shape[0], cache.memory
        states = mem if isinstance(mem, list) else [mem] * b
        if isinstance(mem, list):  # each row its own short-term memory: per-row segments (views, no stacking)
            stm = [self._mem(m.stm.k[layer_idx], m.stm.v[layer_idx], m.stm.pos[layer_idx] + (1 + k0)) for m in mem]
        else:
            stm = self._mem(mem.stm.k[layer_idx], mem.stm.v[layer_idx], mem.stm.pos[layer_idx] + (1 + k0), b)
        bos_k, bos_v = layer.memory_kv(self.bos_embedding[layer_idx])
        device = self.compute_device
        if not self.config.has_ltm:
            return [stm, self._mem(bos_k, bos_v, torch.zeros(1, dtype=torch.int32, device=device), b)]
        queries = layer.self_attn.query_proj(layer.input_layernorm(h))
        pads = cache.pads or [0] * b

        def job() -> list:
            return [
                states[i].ltm.retrieve(layer_idx, queries[i, pads[i] :], mode=self.semantics, backend=self.backend,
                                       with_hidden=False)  # the store keeps each row's K/V: generation gathers those
                for i in range(b)
            ]  # fmt: skip

        handle = self.transfer.submit(f"ltm-layer{layer_idx}", job)

        def segment(rows: list) -> MemoryKV:
            seg_k = torch.stack([torch.cat([bos_k, g.k]) for g in rows])
            seg_v = torch.stack([torch.cat([bos_v, g.v]) for g in rows])
            positions = torch.arange(seg_k.shape[1], dtype=torch.int32, device=device)
            return MemoryKV(seg_k, seg_v, positions, self.rope_cos, self.rope_sin)

        def resolve() -> MemoryKV | list[MemoryKV]:
            got = handle.wait()
            if len({g.index.numel() for g in got}) == 1:  # e.g. one shared store: the same count for every row
                cache.retrieved[layer_idx] = got[0].index if b == 1 else torch.stack([g.index for g in got])
                return segment(got)
            cache.retrieved[layer_idx] = [g.index for g in got]
            return [segment([g]) for g in got]  # stores of different sizes: per-row segments

        return [stm, resolve]

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

    def new_cache(self, max_tokens: int | None = None, batch_size: int = 1) -> MPlusCache:
        """An empty generation cache of ``batch_size`` sequences of up to ``max_tokens`` prompt (padding included) +
        generated tokens each (default ``max_length``)."""
        cap = self.max_length if max_tokens is None else max_tokens
        if not isinstance(cap, int) or cap <= 0:
            raise ValueError(f"new_cache: max_tokens={max_tokens!r} must be an int > 0 (or None: max_length)")
        if cap > self.max_length:
            raise ValueError(f"new_cache: {cap} tokens exceed max_length={self.max_length} (set it at load time)")
        cfg = self.config
        dtype, device = self.lm_head.weight.dtype, self.lm_head.weight.device
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"new_cache: batch_size={batch_size!r} must be an int > 0")
        layers = [
            KVCache.empty(batch_size, cap, cfg.num_key_value_heads, cfg.head_dim, dtype=dtype, device=device)
            for _ in range(cfg.num_hidden_layers)
        ]
        return MPlusCache(layers, [[] for _ in layers], [None] * len(layers))

    @torch.no_grad()
    def forward(
        self,
        input_ids: Tensor,
        past_key_values: MPlusCache | None = None,
        attention_mask: Tensor | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool = False,
        use_cache: bool = True,
        memory: MemoryState | list[MemoryState] | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Generation-mode forward (SPEC.md §5). ``input_ids [B, T]``; with an empty (or no) cache this is the
        prefill: each sequence retrieves its long-term rows. ``logits_to_keep``: only the last n positions (0 = all).

        Batches share the model's memory. ``attention_mask [B, T]`` at the prefill gives each row's left padding
        (Hugging Face's convention for generation): a row's positions start after its padding, its padding is
        invisible to every query and excluded from its retrieval queries, so each row computes what it would alone.
        Later calls (decoding) ignore the mask: the cache keeps the padding. ``position_ids`` are not used
        (positions follow the memory). ``memory``: the :class:`MemoryState` the prefill reads (default: the model's
        own), or a list of B states, one per row (each row attends its own short-term memory and retrieves from its
        own long-term store, exactly as alone; no memory is copied); the cache then belongs to them (later calls
        may repeat them or leave them out)."""
        self._check_ids(input_ids, "forward", batch=True)
        if past_key_values is not None and not isinstance(past_key_values, MPlusCache):
            raise TypeError(
                f"forward: past_key_values must be an MPlusCache (model.new_cache(), or the one a prefill returned), "
                f"got {type(past_key_values).__name__}"
            )
        b, t = input_ids.shape
        if past_key_values is not None and past_key_values.length:
            mem = past_key_values.memory
            if memory is not None and not _same_states(memory, mem):
                raise ValueError(
                    "forward: memory is not the state this cache was prefilled on (past_key_values.memory)"
                )
        else:
            mem = self._memories_of(memory, b, "forward")
        with _read_locks(mem):
            cache = past_key_values if past_key_values is not None else self.new_cache(batch_size=b)
            if cache.batch_size != b:
                raise ValueError(f"forward: input_ids has B={b} rows, past_key_values holds {cache.batch_size}")
            prefill = cache.length == 0
            if prefill:
                cache.memory = mem
                cache.memory_version = [m.version for m in mem] if isinstance(mem, list) else mem.version
                cache.pads = self._left_padding(attention_mask, b, t)
                cache.kv_start = None
                if cache.pads is not None:
                    cache.kv_start = torch.tensor(cache.pads, dtype=torch.int32, device=self.compute_device)
            else:
                self._check_cache(cache, "forward")
            pos = self._rope_rows(cache.length, t, cache.kv_start)
            hiddens = []
            with self.adapters.use(DECODER):
                h = self.model.embed_tokens(input_ids.to(self.compute_device))
                for layer_idx, layer in enumerate(self.layers):
                    hiddens.append(h)
                    if prefill:
                        cache.memories[layer_idx] = self._layer_memories(layer_idx, layer, h, cache)
                    h = layer(h, pos, cache.memories[layer_idx], cache.layers[layer_idx], kv_start=cache.kv_start)
                h = self.model.norm(h)
        hiddens.append(h)
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h).float()
        return CausalLMOutputWithPast(
            logits=logits,
            past_key_values=cache if use_cache else None,
            hidden_states=tuple(hiddens) if output_hidden_states else None,
        )

    def _check_cache(self, cache: MPlusCache, what: str) -> None:
        if not isinstance(cache, MPlusCache):
            raise TypeError(f"{what}: past_key_values must be an MPlusCache (model.new_cache()), got {type(cache)}")
        if cache.memory_version is None:
            raise ValueError(
                f"{what}: past_key_values was never prefilled: run model(prompt_ids, past_key_values=cache)"
            )
        versions = [m.version for m in cache.memory] if isinstance(cache.memory, list) else cache.memory.version
        if cache.memory_version != versions:
            raise StaleCacheError(
                f"{what}: this generation cache was built on memory version {cache.memory_version}, but the memory "
                f"has changed since (now version {versions}: inject or load_memory); its memory segments "
                "are stale. Start a new generation (a new cache) to read the current memory."
            )

    @torch.no_grad()
    def decode_step(self, input_ids: Tensor, cache_position: Tensor, past_key_values: MPlusCache) -> Tensor:
        """One decode step with a static cache, for ``torch.compile(fullgraph=True)`` and CUDA graphs.

        ``input_ids [B, T]`` (usually T = 1) on the model's device; ``cache_position [T]`` int64 on the model's
        device: the cache rows of these tokens (after a prefill of P tokens the first step is ``[P]``);
        ``past_key_values``: the cache a prefill (``model(prompt)``) returned, holding the memory segments it
        retrieved. Returns fp32 logits ``[1, vocab]`` of the last token. Nothing here depends on a Python int that
        changes per step (positions are tensors, the cache is written with ``index_copy_``, the kernel gets the
        valid length as a tensor), so one compiled graph serves every step. The caller advances
        ``cache_position``; ``past_key_values.length`` is not advanced (use :meth:`forward` or this, not both).

        Recipe (README "Compiled decoding"): :meth:`compile_decode_step` compiles it behind the cache's version
        check; ``torch.compile(model.decode_step, fullgraph=True)`` works too but skips that check inside the graph.
        """
        self._check_adapter()
        if not torch.compiler.is_compiling():  # compiled: unchecked (a guard on the version recompiles per inject)
            self._check_step(input_ids, cache_position, past_key_values)
        return self._decode_step(input_ids, cache_position, past_key_values)

    def _check_adapter(self) -> None:
        if self.adapters.active != DECODER:
            raise RuntimeError(f"decode_step: the {DECODER!r} adapter must be active, not {self.adapters.active!r}")

    def _check_step(self, input_ids: Tensor, cache_position: Tensor, past_key_values: MPlusCache) -> None:
        self._check_cache(past_key_values, "decode_step")
        for name, t in [("input_ids", input_ids), ("cache_position", cache_position)]:
            if not isinstance(t, Tensor) or t.dtype.is_floating_point:
                raise TypeError(f"decode_step: {name} must be an integer tensor, got {getattr(t, 'dtype', type(t))}")

    def compile_decode_step(self, **compile_kwargs):
        """``torch.compile(decode_step, fullgraph=True, **compile_kwargs)`` with the eager checks kept outside the
        graph: every call first checks (in Python, no host sync) that the cache still matches the memory version
        (``StaleCacheError`` after an inject or a load), then runs the one compiled graph. On a GPU pass
        ``mode="reduce-overhead"`` for CUDA graphs::

            out = model(prompt_ids)                                # eager prefill: retrieval, memory segments
            cache, pos = out.past_key_values, torch.tensor([prompt_ids.shape[1]], device=device)
            step = model.compile_decode_step(mode="reduce-overhead")
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(n):
                token = step(token, pos, cache).argmax(-1, keepdim=True)
                pos += 1
        """
        compiled = torch.compile(self._decode_step, fullgraph=True, **compile_kwargs)

        def step(input_ids: Tensor, cache_position: Tensor, past_key_values: MPlusCache) -> Tensor:
            self._check_adapter()
            self._check_step(input_ids, cache_position, past_key_values)
            return compiled(input_ids, cache_position, past_key_values)

        return step

    @torch.no_grad()
    def _decode_step(self, input_ids: Tensor, cache_position: Tensor, past_key_values: MPlusCache) -> Tensor:
        kv_start = past_key_values.kv_start
        pos = self._rope_at(self.config.memory_prefix_len + cache_position, kv_start)
        h = self.model.embed_tokens(input_ids)
        for layer_idx, layer in enumerate(self.layers):
            memories = past_key_values.memories[layer_idx]
            h = layer(h, pos, memories, past_key_values.layers[layer_idx], cache_position, kv_start=kv_start)
        return self.lm_head(self.model.norm(h[:, -1])).float()

    @torch.no_grad()
    def generate(
        self, inputs: Tensor | None = None, *args, memory: MemoryState | list[MemoryState] | None = None, **kwargs
    ):
        """Transformers' ``generate`` over ``memory`` (a :class:`MemoryState` shared by the batch, default the
        model's own; or a list of B states, one per row), holding their locks for reading for the whole call: an
        ``inject`` from another thread waits until this generation is done (and never changes a memory under it)."""
        if self.compute_device.type == "meta":
            raise ValueError(
                "generate: the model is on the meta device, which holds no values (generate reads the tokens it picks);"
                " use forward / decode_step on meta, generate on a real device"
            )
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        self._check_ids(ids, "generate", batch=True)  # the prompts [B, T] (the memory is the context: no empty one)
        mem = self._memories_of(memory, ids.shape[0], "generate")
        with _read_locks(mem):
            return super().generate(inputs, *args, memory=mem, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs) -> None:
        """A request that cannot fit is refused before the prefill (not at the step that would overflow). The cache
        is the :class:`MPlusCache` the prefill allocates for the batch (the memory prefix is never copied per step).
        """
        if generation_config.max_length is not None and generation_config.max_length > self.max_length:
            raise ValueError(
                f"generate: up to {generation_config.max_length} tokens (prompt + max_new_tokens) exceed the "
                f"model's max_length={self.max_length}: lower max_new_tokens, or load with a larger max_length"
            )
        model_kwargs.setdefault("past_key_values", None)

    def prepare_inputs_for_generation(self, input_ids: Tensor, past_key_values: MPlusCache | None = None, **kwargs):
        if past_key_values is not None and past_key_values.length:
            input_ids = input_ids[:, past_key_values.length :]
        inputs = {"input_ids": input_ids, "past_key_values": past_key_values, "logits_to_keep": 1}
        return inputs | {"attention_mask": kwargs.get("attention_mask"), "memory": kwargs.get("memory")}

    # ------------------------------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> MPlusForCausalLM:  # type: ignore[override]
        """Load an official M+ / MemoryLLM checkpoint (``config.json`` + safetensors, SPEC.md §2): a directory, or a
        Hugging Face Hub model id (``"owner/name"``) resolved through the Hub cache (``huggingface_hub``'s
        ``snapshot_download``: a cached model loads offline, ``HF_HUB_OFFLINE=1``).

        Keywords: ``dtype`` (or its Hugging Face spelling ``torch_dtype``), ``device`` (or ``device_map`` naming one
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``, ``"auto"`` = cuda when available, or ``{"": device}``), the
        Hub's (``revision``, ``cache_dir``, ``local_files_only``, ``token``), and the constructor's (``semantics``,
        ``kernels``, ``max_length``, ``ltm_capacity``)."""
        from .checkpoint import load_checkpoint

        return load_checkpoint(cls, path, **kwargs)

    def save_pretrained(  # type: ignore[override]
        self, save_directory: str, *, safe_serialization: bool = True, max_shard_size: int | str | None = None
    ) -> None:
        """Write ``config.json`` + ``model.safetensors`` in the official layout: the weights and the current memory
        as far as that layout holds it (not the short-term ages, the dropped-row cache, the RNG: ``save_memory``
        keeps those). :meth:`from_pretrained` reads it back. See :func:`mplus.checkpoint.save_checkpoint`."""
        from .checkpoint import save_checkpoint

        save_checkpoint(self, save_directory, safe_serialization=safe_serialization, max_shard_size=max_shard_size)
