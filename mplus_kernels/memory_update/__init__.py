"""Random-drop short-term-memory update: reference, Triton kernels, C++ kernel, op registration."""

from .op import memory_update_, validate_memory_update
from .reference import draw_victims, logical_view, memory_update_reference_, official_memory_update_

__all__ = [
    "draw_victims",
    "logical_view",
    "memory_update_",
    "memory_update_reference_",
    "official_memory_update_",
    "validate_memory_update",
]
