"""``MPlusConfig``: the official M+ / MemoryLLM ``config.json`` fields (SPEC.md §1, §10), with presets.

The official checkpoints store a ``LlamaConfig`` (``model_type: llama``) plus the memory fields below; this class
reads the same keys, so ``MPlusConfig.from_json_file(".../config.json")`` takes an official file unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import PretrainedConfig


class MPlusConfig(PretrainedConfig):
    """Llama fields + the M+ memory fields. Derived sizes: :attr:`stm_size` (N), :attr:`num_ltm_tokens` (K0)."""

    model_type = "mplus"

    def __init__(
        self,
        vocab_size: int = 128256,
        hidden_size: int = 4096,
        intermediate_size: int = 14336,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 8,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-5,
        rope_theta: float | None = None,
        rope_scaling: dict[str, Any] | None = None,
        rope_parameters: dict[str, Any] | None = None,
        max_position_embeddings: int = 131072,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        tie_word_embeddings: bool = False,
        num_tokens: int = 256,
        num_blocks: int = 50,
        num_ltm_blocks: int = 10,
        update_ltm_mode: str = "immediate",
        update_ltm_frequency: int = 60,
        decay_frequency: float = 1,
        initial_rf_when_moving_stm_to_ltm: float = 10,
        ltm_initial_size: int = 5120,
        selector_hidden_dim: int = 256,
        num_selector_layers: int = 2,
        add_selector: bool = True,
        add_encoder_retriever: bool = True,
        add_bos_embedding: bool = True,
        add_decoder_lora: bool = True,
        lora_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        # RoPE: transformers 5 keeps the base and the scaling together in `rope_parameters` (`rope_theta` inside it,
        # `rope_scaling` its deprecated alias); transformers-4 configs and the official checkpoints have a top-level
        # `rope_theta` and `rope_scaling`. Both are read; the base is Llama-3's 500000 only when neither gives one.
        rope = dict(rope_parameters if rope_parameters is not None else rope_scaling or {})
        theta = rope.get("rope_theta")
        if theta is not None and rope_theta is not None and float(theta) != float(rope_theta):
            raise ValueError(
                f"MPlusConfig: rope_theta={rope_theta} disagrees with rope_parameters['rope_theta']={theta}; give one"
            )
        self.rope_theta = float(theta if theta is not None else rope_theta if rope_theta is not None else 500000.0)
        rope.setdefault("rope_type", rope.pop("type", "default"))
        self.rope_parameters = {**rope, "rope_theta": self.rope_theta}
        self.max_position_embeddings = max_position_embeddings
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.num_tokens = num_tokens
        self.num_blocks = num_blocks
        self.num_ltm_blocks = num_ltm_blocks
        self.update_ltm_mode = update_ltm_mode
        self.update_ltm_frequency = update_ltm_frequency
        self.decay_frequency = decay_frequency
        self.initial_rf_when_moving_stm_to_ltm = initial_rf_when_moving_stm_to_ltm
        self.ltm_initial_size = ltm_initial_size
        self.selector_hidden_dim = selector_hidden_dim
        self.num_selector_layers = num_selector_layers
        self.add_selector = add_selector
        self.add_encoder_retriever = add_encoder_retriever
        self.add_bos_embedding = add_bos_embedding
        self.add_decoder_lora = add_decoder_lora
        self.lora_config = lora_config or {
            "r": 16,
            "lora_alpha": 32,
            "lora_dropout": 0.1,
            "target_modules": ["q_proj", "v_proj", "k_proj", "up_proj", "down_proj", "gate_proj"],
        }
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    # ---------------------------------------------------------------------------------------------- derived
    @property
    def has_ltm(self) -> bool:
        """M+ (long-term memory + retriever) vs MemoryLLM (short-term memory only, discard on drop)."""
        return bool(self.num_ltm_blocks) and bool(self.add_selector)

    @property
    def stm_size(self) -> int:
        """N: short-term rows per layer (``num_blocks`` is the total of STM and retrieved LTM blocks)."""
        return (self.num_blocks - (self.num_ltm_blocks if self.has_ltm else 0)) * self.num_tokens

    @property
    def num_ltm_tokens(self) -> int:
        """K0: long-term rows retrieved per layer."""
        return self.num_ltm_blocks * self.num_tokens if self.has_ltm else 0

    @property
    def memory_prefix_len(self) -> int:
        """P: rows every generation query sees before the input (BOS + K0 + N); inputs start at this position."""
        return int(self.add_bos_embedding) + self.num_ltm_tokens + self.stm_size

    @property
    def lora_scaling(self) -> float:
        return self.lora_config["lora_alpha"] / self.lora_config["r"]

    def rope_inv_freq(self) -> torch.Tensor:
        """``inv_freq [head_dim/2]`` fp32 for this config's RoPE (default, ``linear`` or ``llama3``; SPEC.md §3.2)."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        scaling = self.rope_parameters or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "linear":
            return inv / scaling["factor"]
        if kind == "llama3":
            factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
            old = scaling["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv
            smooth = (old / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * inv / factor + smooth * inv
            out = torch.where(wavelen > old / lo, inv / factor, inv)
            medium = (wavelen >= old / hi) & (wavelen <= old / lo)
            return torch.where(medium, smoothed, out)
        if kind != "default":
            raise ValueError(f"MPlusConfig: rope type {kind!r} is not supported (default, linear, llama3)")
        return inv

    # ---------------------------------------------------------------------------------------------- presets
    @classmethod
    def mplus_8b(cls, **overrides: Any) -> MPlusConfig:
        """M+ on Llama-3.1-8B (SPEC.md §1.1): N 10,240, K0 2,560, llama3 RoPE."""
        base = dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            bos_token_id=128000,
            eos_token_id=128001,
            pad_token_id=128001,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def memoryllm_8b(cls, **overrides: Any) -> MPlusConfig:
        """MemoryLLM-8B (SPEC.md §10): N 12,800, no LTM or retriever, linear RoPE scaling 1.8125."""
        base = dict(
            num_blocks=50,
            num_ltm_blocks=0,
            add_selector=False,
            add_encoder_retriever=False,
            rope_scaling={"type": "linear", "factor": 1.8125},
            max_position_embeddings=8192,
            bos_token_id=128000,
            eos_token_id=128001,
            pad_token_id=128001,
        )
        return cls(**{**base, **overrides})
