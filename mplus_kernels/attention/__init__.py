"""M+ memory attention (prefill and decode) and the exact merge of partial attentions: reference, Triton kernels,
C++ kernel (csrc/cpu/attention.cpp), op registration."""

from .op import memory_attention, merge_attention_states
from .reference import apply_rope, memory_attention_reference, merge_attention_states_reference, rotate_half

__all__ = [
    "apply_rope",
    "memory_attention",
    "memory_attention_reference",
    "merge_attention_states",
    "merge_attention_states_reference",
    "rotate_half",
]
