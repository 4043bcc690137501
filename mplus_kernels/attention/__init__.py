"""M+ memory attention (prefill and decode), the exact merge of partial attentions and memory keys rotated once
(``rotate_keys``): references, Triton kernels, C++ kernels (csrc/cpu/attention.cpp), op registration."""

from .op import memory_attention, merge_attention_states
from .reference import (
    apply_rope,
    memory_attention_reference,
    merge_attention_states_reference,
    rotate_half,
    rotate_keys_reference,
)
from .rotate import rotate_keys

__all__ = [
    "apply_rope",
    "memory_attention",
    "memory_attention_reference",
    "merge_attention_states",
    "merge_attention_states_reference",
    "rotate_half",
    "rotate_keys",
    "rotate_keys_reference",
]
