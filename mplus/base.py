"""M+ / MemoryLLM from any pretrained Llama (issue 20): :func:`from_base`, :func:`load_tokenizer`.

``MPlusForCausalLM.from_base(path_or_id)`` is how every M+ starts: the base's config and weights through transformers
(a folder, a Hub id, a GGUF file), the weights in the LoRA layout (a tied ``lm_head`` copied from the embedding), the
parameters M+ adds and the memory initialised as the official training code does — docs/architecture.md §8 says
what each follows in that code (wangyu-ustc/MemoryLLM, branch ``mplus``) and why. Memory sizes not given are the
official ones scaled to the base (:func:`memory_config`).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.initialization import no_init_weights

from .checkpoint import load_official_memory
from .config import MPlusConfig
from .lora import ENCODER, LoRALinear
from .update import CHUNK_SIZE

__all__ = ["DEFAULT_INIT_CONTEXT", "MEMORY_SIZE_KEYS", "from_base", "load_tokenizer", "memory_config"]

Kind = Literal["mplus", "memoryllm"]
KINDS = ("mplus", "memoryllm")
ROPE_TYPES = ("default", "linear", "llama3")  # what MPlusConfig.rope_inv_freq computes (fixed tables, no dynamic)
LORA_TARGETS = ["q_proj", "v_proj", "k_proj", "up_proj", "down_proj", "gate_proj"]  # the official target_modules
NEW_PARAMETERS = (".lora_A.", ".lora_B.", "query_proj.", "key_proj.", "bos_embedding", "new_memory_positional_emb")

# the keyword arguments from_base takes as **memory_sizes; the M+-only ones are refused for kind="memoryllm"
MEMORY_SIZE_KEYS = (
    "num_tokens",
    "num_blocks",
    "num_ltm_blocks",
    "update_ltm_frequency",
    "decay_frequency",
    "initial_rf_when_moving_stm_to_ltm",
    "selector_hidden_dim",
    "num_selector_layers",
    "add_encoder_retriever",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "ltm_capacity",
)
MPLUS_ONLY = (
    "num_ltm_blocks",
    "update_ltm_frequency",
    "decay_frequency",
    "initial_rf_when_moving_stm_to_ltm",
    "selector_hidden_dim",
    "num_selector_layers",
    "add_encoder_retriever",
    "ltm_capacity",
)

# The memory's first context when none is given: plain English prose (the official training data is fineweb-edu
# text), long enough for a few hundred tokens so that the first delta has K distinct rows with most tokenizers.
DEFAULT_INIT_CONTEXT = (
    "Memory is the faculty by which information is encoded, stored, and retrieved when it is needed. It is often "
    "described as several systems working together. Sensory memory holds an impression of what was just seen or "
    "heard for a fraction of a second. Short-term memory keeps a small number of items available for a short while, "
    "long enough to follow a sentence, to add two numbers, or to remember a name until it is written down. Long-term "
    "memory holds knowledge and experiences for days, years, or a lifetime, and it has no known limit to its "
    "capacity. Moving information from short-term to long-term memory takes attention and repetition, and what is "
    "not rehearsed is usually forgotten. Forgetting is not only a failure: it keeps memory useful by letting go of "
    "details that no longer matter, so that what remains can be found quickly. When a memory is recalled, a cue such "
    "as a word, a smell, or a place brings back the stored trace, and the act of recalling it makes it stronger and "
    "easier to find the next time. Libraries, notebooks, and computers extend human memory: they keep far more than "
    "any one person can hold, and an index tells the reader where to look. A good index is small, it is consulted "
    "first, and it points to the pages that answer the question, much as a reader who remembers the chapter of a book "
    "can open it at the right place without reading everything again from the beginning."
)


# ------------------------------------------------------------------------------------------------ tokenizer, config
def load_tokenizer(path_or_id: str | os.PathLike, gguf_file: str | None = None, **kwargs: Any):
    """The tokenizer a checkpoint ships (``AutoTokenizer.from_pretrained(path_or_id, gguf_file=...)``): a local
    folder, a Hub id through the Hub cache, or a GGUF file inside either (``gguf_file``, the file's name). Keywords go
    to ``AutoTokenizer.from_pretrained`` (``revision``, ``cache_dir``, ``local_files_only``, ``token``...)."""
    try:
        return AutoTokenizer.from_pretrained(path_or_id, gguf_file=gguf_file, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        where = f"{os.fspath(path_or_id)!r}" + (f" (gguf_file={gguf_file!r})" if gguf_file else "")
        raise ValueError(f"load_tokenizer: no tokenizer could be loaded from {where}: {exc}") from exc


def read_base_config(path_or_id: str | os.PathLike, gguf_file: str | None = None) -> PretrainedConfig:
    """The base checkpoint's transformers config, checked to be a Llama mplus can build on (else a ``ValueError``
    naming what is not: the model type, the activation, the RoPE type)."""
    where = f"{os.fspath(path_or_id)!r}" + (f" (gguf_file={gguf_file!r})" if gguf_file else "")
    try:
        base = AutoConfig.from_pretrained(path_or_id, gguf_file=gguf_file)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"from_base: cannot read a transformers config from {where}: {exc}") from exc
    if base.model_type != "llama":
        raise ValueError(
            f"from_base: {where} is a {base.model_type!r} model ({type(base).__name__}); M+ / MemoryLLM are built on "
            "Llama checkpoints (model_type 'llama')"
        )
    if base.hidden_act != "silu":
        raise ValueError(f"from_base: {where} uses hidden_act={base.hidden_act!r}; mplus's Llama MLP is SiLU-gated")
    rope = _rope_of(base)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"from_base: {where} uses RoPE type {kind!r}, which mplus cannot compute (it computes "
            f"{', '.join(ROPE_TYPES)} into fixed tables; 'dynamic' and 'longrope' change the frequencies with the "
            "sequence length, 'yarn' also scales the attention)"
        )
    return base


def _rope_of(base: PretrainedConfig) -> dict[str, Any]:
    """The base's RoPE as one dict with ``rope_theta`` in it (transformers 5: ``rope_parameters``; transformers 4:
    ``rope_theta`` + ``rope_scaling``)."""
    rope = getattr(base, "rope_parameters", None)
    if rope is None:
        rope = {**(getattr(base, "rope_scaling", None) or {}), "rope_theta": getattr(base, "rope_theta", 10000.0)}
    if any(isinstance(v, dict) for v in rope.values()):
        raise ValueError(f"from_base: per-layer-type RoPE parameters are not a Llama's ({sorted(rope)})")
    return dict(rope)


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"from_base: {name}={value!r} must be an int >= {minimum}")
    return value


def memory_config(
    base: PretrainedConfig, *, kind: Kind = "mplus", max_length: int = 2048, **memory_sizes: Any
) -> tuple[MPlusConfig, int]:
    """The :class:`MPlusConfig` of an M+ (``kind="mplus"``) or MemoryLLM (``"memoryllm"``) on the Llama ``base``, and
    the long-term store's initial capacity. Every Llama field is the base's (RoPE included); ``memory_sizes`` (names:
    :data:`MEMORY_SIZE_KEYS`; any other name is a ``ValueError`` naming it) override the defaults:

    * ``num_tokens`` K = 256 (official): the rows one injection writes, tied to the 512-token chunks, not scaled.
    * ``num_blocks`` = min(50, (max_position_embeddings − max_length − 1) // K): the official 50, or fewer so that the
      memory prefix (BOS + K0 + N rows) and a ``max_length`` generation fit in the positions the base was trained on
      (Llama-3.1: 50; an 8k-position base with max_length 2048: 23). A given ``num_blocks`` past that warns.
    * ``num_ltm_blocks`` (M+) = max(1, round(num_blocks / 5)): the official 10 of 50; MemoryLLM has none.
    * ``update_ltm_frequency`` (M+) = max(1, round(1.5 · short-term blocks)): the official 60 for 40 short-term blocks
      (a merge after the short-term memory turned over 1.5 times).
    * ``selector_hidden_dim`` (M+) = d / 16 rounded down to a multiple of 8, within [32, 256]: 256 for d = 4096 (the
      official value), 32 for d = 576.
    * ``num_selector_layers`` 2, ``add_encoder_retriever`` True, ``decay_frequency`` 1,
      ``initial_rf_when_moving_stm_to_ltm`` 10, ``lora_r`` 16, ``lora_alpha`` 32, ``lora_dropout`` 0.1: official.
    * ``ltm_capacity`` 0: long-term rows reserved per layer (the store grows on demand).
    """
    if kind not in KINDS:
        raise ValueError(f"from_base: kind={kind!r}, expected 'mplus' or 'memoryllm'")
    unknown = sorted(set(memory_sizes) - set(MEMORY_SIZE_KEYS))
    if unknown:
        raise ValueError(f"from_base: unknown keyword(s) {unknown}; memory sizes are {list(MEMORY_SIZE_KEYS)}")
    if kind == "memoryllm":
        extra = sorted(
            k for k in memory_sizes if k in MPLUS_ONLY and not (k == "num_ltm_blocks" and not memory_sizes[k])
        )
        if extra:
            raise ValueError(
                f"from_base: {extra} are M+ sizes (long-term memory, retriever); kind='memoryllm' has none"
            )
    _positive_int("max_length", max_length)
    mplus = kind == "mplus"
    d, max_pos = base.hidden_size, base.max_position_embeddings
    k = _positive_int("num_tokens", memory_sizes.get("num_tokens", 256))
    room = max_pos - max_length - 1  # positions left for the memory prefix: BOS + K0 + N
    if "num_blocks" in memory_sizes:
        blocks = _positive_int("num_blocks", memory_sizes["num_blocks"], 2 if mplus else 1)
        if blocks * k > room:
            warnings.warn(
                f"from_base: num_blocks={blocks} x num_tokens={k} memory rows + BOS + max_length={max_length} reach "
                f"position {blocks * k + 1 + max_length}, past the base's max_position_embeddings={max_pos}",
                stacklevel=3,
            )
    else:
        blocks = min(50, room // k)
        if blocks < (2 if mplus else 1):
            raise ValueError(
                f"from_base: the base's max_position_embeddings={max_pos} leave {max(room, 0)} positions for the "
                f"memory after max_length={max_length}: not enough for {2 if mplus else 1} block(s) of "
                f"num_tokens={k}; lower max_length or num_tokens, or give num_blocks"
            )
    ltm_blocks = memory_sizes.get("num_ltm_blocks", max(1, round(blocks / 5)) if mplus else 0)
    if mplus:
        _positive_int("num_ltm_blocks", ltm_blocks)
        if ltm_blocks >= blocks:
            raise ValueError(
                f"from_base: num_ltm_blocks={ltm_blocks} must be < num_blocks={blocks} (num_blocks counts the "
                "short-term and the retrieved long-term blocks)"
            )
    frequency = _positive_int(
        "update_ltm_frequency", memory_sizes.get("update_ltm_frequency", max(1, round(1.5 * (blocks - ltm_blocks))))
    )
    ds = _positive_int(
        "selector_hidden_dim", memory_sizes.get("selector_hidden_dim", min(256, max(32, d // 16 // 8 * 8)))
    )
    r = _positive_int("lora_r", memory_sizes.get("lora_r", 16))
    alpha = memory_sizes.get("lora_alpha", 32)
    dropout = memory_sizes.get("lora_dropout", 0.1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"from_base: lora_alpha={alpha!r} must be a number > 0")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"from_base: lora_dropout={dropout!r} must be a number in [0, 1)")
    capacity = _positive_int("ltm_capacity", memory_sizes.get("ltm_capacity", 0), 0)
    selector_layers = memory_sizes.get("num_selector_layers", 2)
    if selector_layers not in (1, 2) or isinstance(selector_layers, bool):
        raise ValueError(f"from_base: num_selector_layers={selector_layers!r} must be 1 or 2 (the official projectors)")
    for name, default in [("decay_frequency", 1), ("initial_rf_when_moving_stm_to_ltm", 10)]:
        value = memory_sizes.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"from_base: {name}={value!r} must be a number > 0")
    pad = base.pad_token_id if base.pad_token_id is not None else base.eos_token_id  # official: pad = eos
    config = MPlusConfig(
        vocab_size=base.vocab_size,
        hidden_size=d,
        intermediate_size=base.intermediate_size,
        num_hidden_layers=base.num_hidden_layers,
        num_attention_heads=base.num_attention_heads,
        num_key_value_heads=base.num_key_value_heads or base.num_attention_heads,
        head_dim=getattr(base, "head_dim", None) or d // base.num_attention_heads,
        hidden_act=base.hidden_act,
        rms_norm_eps=base.rms_norm_eps,
        rope_parameters=_rope_of(base),
        max_position_embeddings=max_pos,
        attention_bias=bool(getattr(base, "attention_bias", False)),
        mlp_bias=bool(getattr(base, "mlp_bias", False)),
        tie_word_embeddings=bool(getattr(base, "tie_word_embeddings", False)),
        initializer_range=getattr(base, "initializer_range", 0.02),
        bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id,
        pad_token_id=pad,
        num_tokens=k,
        num_blocks=blocks,
        num_ltm_blocks=ltm_blocks,
        update_ltm_mode="immediate",
        update_ltm_frequency=frequency,
        decay_frequency=memory_sizes.get("decay_frequency", 1),
        initial_rf_when_moving_stm_to_ltm=memory_sizes.get("initial_rf_when_moving_stm_to_ltm", 10),
        selector_hidden_dim=ds,
        num_selector_layers=selector_layers,
        add_selector=mplus,
        add_encoder_retriever=bool(memory_sizes.get("add_encoder_retriever", True)) and mplus,
        add_bos_embedding=True,
        add_decoder_lora=True,
        lora_config={
            "inference_mode": False,
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": dropout,
            "target_modules": list(LORA_TARGETS),
        },
    )
    return config, capacity


# --------------------------------------------------------------------------------------------------- the build
def _checked_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"from_base: dtype={dtype!r} must be a floating torch.dtype (torch.float32, torch.bfloat16, ...), 'auto' "
            "or None (the base's)"
        )
    return dtype


def _init_ids(init_context: Any, path_or_id, gguf_file: str | None, vocab: int, limit: int, tokenizer=None) -> Tensor:
    """The memory's first context as ids ``[1, T]``, ``T <= limit``: given ids, or text tokenized by the base's
    tokenizer (the default text is cut to its first ``limit`` tokens; a given context longer is refused)."""
    if init_context is None or isinstance(init_context, str):
        text = DEFAULT_INIT_CONTEXT if init_context is None else init_context
        tokenizer = tokenizer or load_tokenizer(path_or_id, gguf_file)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)
        if init_context is None:
            ids = ids[:, :limit]
    elif isinstance(init_context, Tensor):
        ids = init_context.detach().cpu()
        ids = ids[None] if ids.dim() == 1 else ids
    elif isinstance(init_context, Sequence):
        ids = torch.tensor(list(init_context))
        ids = ids[None] if ids.dim() == 1 else ids
    else:
        raise TypeError(
            f"from_base: init_context must be None, a str or token ids ([T] / [1, T] tensor or a list of ints), got "
            f"{type(init_context).__name__}"
        )
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"from_base: init_context ids must be integers [1, T], got {ids.dtype} {list(ids.shape)}")
    if not 1 <= ids.shape[1] <= limit:
        raise ValueError(
            f"from_base: init_context has {ids.shape[1]} tokens; the memory's first context takes 1..{limit} (one "
            f"training chunk of at most {CHUNK_SIZE}, within the RoPE table of max_length)"
        )
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(
            f"from_base: init_context ids must be in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]"
        )
    return ids.long()


def _load_base_weights(model, weights: dict[str, Tensor], where: str) -> set[str]:
    """Copy the base's weights (transformers' Llama names) into ``model`` (the LoRA-wrapped projections under
    ``base_layer``; ``lm_head`` from the embedding when the base ties them). Returns the parameter names loaded."""
    own = dict(model.named_parameters())
    tied = model.config.tie_word_embeddings
    mapped, problems = {}, []
    for name, p in own.items():
        if any(key in name for key in NEW_PARAMETERS):
            continue
        source = name.replace(".base_layer.", ".")
        if source not in weights and name == "lm_head.weight" and tied:
            source = "model.embed_tokens.weight"
        t = weights.get(source)
        if t is None:
            problems.append(f"missing {source} {list(p.shape)}")
        elif t.shape != p.shape:
            problems.append(f"{source} has shape {list(t.shape)}, expected {list(p.shape)}")
        else:
            mapped[name] = t
    used = {name.replace(".base_layer.", ".") for name in mapped} | ({"model.embed_tokens.weight"} if tied else set())
    problems += [f"unexpected tensor {k}" for k in weights if k not in used and not k.endswith("rotary_emb.inv_freq")]
    if problems:
        raise ValueError(
            f"from_base: the weights of {where} are not the Llama its config describes:\n  " + "\n  ".join(problems)
        )
    with torch.no_grad():
        for name, t in mapped.items():
            own[name].copy_(t)
    return set(mapped)


@torch.no_grad()
def _init_new_parameters(model, bos_token_id: int, std: float, generator: torch.Generator) -> set[str]:
    """The parameters M+ adds to the base, initialised as the official training code does (module docstring)."""
    done = set()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):  # PEFT: A kaiming-uniform(a=sqrt(5)), B zeros; every adapter
            for adapter, lin in module.lora_A.items():
                torch.nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=generator)
                module.lora_B[adapter].weight.zero_()
                done |= {f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight"}
    for name, p in model.named_parameters():
        if "query_proj." in name or "key_proj." in name:  # _init_weights of a Linear: normal(0, initializer_range)
            p.normal_(0.0, std, generator=generator)
            done.add(name)
    model.bos_embedding.copy_(model.model.embed_tokens.weight[bos_token_id].expand_as(model.bos_embedding))
    model.new_memory_positional_emb.zero_()
    return done | {"bos_embedding", "new_memory_positional_emb"}


@torch.no_grad()
def first_delta(model, ids: Tensor) -> Tensor:
    """The delta of the memory's first injection ``ids [1, T]`` (official ``initialized == 0``): the update forward
    with no memory at all (no BOS row, no short-term rows, positions 0..T-1), ``new_memory_positional_emb`` added to
    the last K rows at every layer, under the update adapter. Returns ``[L, min(T, K), d]``."""
    k = model.config.num_tokens
    pos = model.rope.chunk(0, ids.shape[1])
    deltas = []
    with model.adapters.use(ENCODER):
        h = model.model.embed_tokens(ids.to(model.compute_device))
        for layer in model.layers:
            h[:, -k:] += model.new_memory_positional_emb[0, 0]
            h = layer(h, pos, None, None)
            deltas.append(h[0, -k:])
    return torch.stack(deltas)


def tile_rows(delta: Tensor, n: int) -> Tensor:
    """``delta [L, m, d]`` tiled to ``[L, n, d]`` as the official first update fills the memory: ``n // m`` copies, then
    the last ``n mod m`` rows (``delta``'s last ``n`` rows when ``m >= n``)."""
    m = delta.shape[1]
    if m >= n:
        return delta[:, -n:]
    parts = [delta] * (n // m) + ([delta[:, -(n % m) :]] if n % m else [])
    return torch.cat(parts, 1)


@torch.no_grad()
def init_memory(model, ids: Tensor) -> None:
    """Fill ``model.memory`` from the first context ``ids [1, T]`` as the official training code does (module
    docstring), through the state's load (``plan_load`` / ``commit``)."""
    cfg = model.config
    L, N = cfg.num_hidden_layers, cfg.stm_size  # noqa: N806
    delta = first_delta(model, ids)
    state: dict[str, Tensor] = {
        "memory": tile_rows(delta, N),
        "memory_ages": torch.zeros(L, N, dtype=torch.float64),
    }
    if cfg.has_ltm:
        m = delta.shape[1]
        for layer_idx, layer in enumerate(model.layers):
            rows = delta[layer_idx]
            state[f"ltm.{layer_idx}"] = rows
            state[f"ltm_keys.{layer_idx}"] = layer.retriever_keys(rows)
            state[f"ltm_ages.{layer_idx}"] = torch.zeros(m, dtype=torch.float64)
            state[f"ltm_recall_frequencies.{layer_idx}"] = torch.zeros(m, dtype=torch.float64)
        state["update_step"] = torch.zeros(1, dtype=torch.int64)
    load_official_memory(model, state)


def from_base(
    cls,
    path_or_id: str | os.PathLike,
    *,
    kind: Kind = "mplus",
    gguf_file: str | None = None,
    dtype: torch.dtype | str | None = None,
    max_length: int = 2048,
    semantics: Literal["fast", "reference"] = "fast",
    kernels: Literal["fused", "reference"] = "fused",
    init_context: str | Tensor | Sequence[int] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    **memory_sizes: Any,
):
    """Build ``cls`` (:class:`~mplus.model.MPlusForCausalLM`) on a pretrained Llama: see
    :meth:`MPlusForCausalLM.from_base <mplus.model.MPlusForCausalLM.from_base>` and this module's docstring."""
    if kind not in KINDS:
        raise ValueError(f"from_base: kind={kind!r}, expected 'mplus' or 'memoryllm'")
    if semantics not in ("fast", "reference") or kernels not in ("fused", "reference"):
        raise ValueError(f"from_base: semantics={semantics!r} (fast|reference), kernels={kernels!r} (fused|reference)")
    dtype = _checked_dtype(dtype)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"from_base: seed must be an int, got {type(seed).__name__}")
    try:  # a bad device fails here, before any loading
        device = torch.device(device) if device is not None else None
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"from_base: device={device!r} is not a device ({exc})") from None
    where = f"{os.fspath(path_or_id)!r}" + (f" (gguf_file={gguf_file!r})" if gguf_file else "")
    base_config = read_base_config(path_or_id, gguf_file)
    config, capacity = memory_config(base_config, kind=kind, max_length=max_length, **memory_sizes)
    tokenizer = None
    bos = config.bos_token_id
    if bos is None:  # the official code takes the tokenizer's (LlamaMemoryModelPL.__init__)
        tokenizer = load_tokenizer(path_or_id, gguf_file)
        bos = tokenizer.bos_token_id
        if bos is None:
            raise ValueError(f"from_base: {where} has no BOS token (config nor tokenizer): the BOS rows start from it")
        config.bos_token_id = bos
    limit = min(CHUNK_SIZE, config.memory_prefix_len + max_length)  # positions 0..T-1 within the RoPE table
    ids = _init_ids(init_context, path_or_id, gguf_file, config.vocab_size, limit, tokenizer)  # fail before loading
    base = AutoModelForCausalLM.from_pretrained(path_or_id, gguf_file=gguf_file, dtype=dtype or "auto")
    weights = base.state_dict()
    if dtype is None:
        dtype = weights["model.embed_tokens.weight"].dtype
    generation_config = copy.deepcopy(base.generation_config)
    del base
    # every parameter is loaded or initialised below (checked): skip torch's random init (transformers' context patches
    # torch.nn.init process-wide while the model is built, as its own from_pretrained does)
    with no_init_weights():
        model = cls(
            config, semantics=semantics, kernels=kernels, dtype=dtype, max_length=max_length, ltm_capacity=capacity
        )
    done = _load_base_weights(model, weights, where)
    del weights
    generator = torch.Generator().manual_seed(seed)
    done |= _init_new_parameters(model, bos, config.initializer_range, generator)
    left = sorted(set(dict(model.named_parameters())) - done)
    if left:  # a parameter neither loaded nor initialised would hold torch.empty's garbage
        raise RuntimeError(f"from_base: internal error: parameters left uninitialised: {left}")
    if device is not None:  # the memory's first context runs there (an 8B base: on the GPU, not the host)
        model = model.to(device)
    init_memory(model, ids)
    model.generation_config = generation_config
    return model
