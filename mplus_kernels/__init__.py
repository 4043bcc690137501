"""mplus_kernels: the fused kernels of M+ behind `torch.ops.mplus`, each with a pure-PyTorch reference.

Each op family is a subpackage (reference.py, triton_impl.py, op.py). This package never imports transformers.
"""

from ._backend import BackendUnavailableError, cpp_available, resolve
from .gather import gather_rows_
from .memory_update import draw_victims, memory_update_, memory_update_reference_, official_memory_update_

__all__ = [
    "BackendUnavailableError",
    "cpp_available",
    "draw_victims",
    "gather_rows_",
    "memory_update_",
    "memory_update_reference_",
    "official_memory_update_",
    "resolve",
]
