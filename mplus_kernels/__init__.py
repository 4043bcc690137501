"""mplus_kernels: the fused kernels of M+ behind `torch.ops.mplus`, each with a pure-PyTorch reference.

Each op family is a subpackage (reference.py, triton_impl.py, op.py). This package never imports transformers.
"""

from ._backend import (
    BackendUnavailableError,
    cpp_available,
    cpu_isa,
    cpu_isa_levels,
    cpu_isa_missing,
    resolve,
    set_cpu_isa,
    supported_cpu_isas,
    use_cpu_isa,
)
from .attention import (
    memory_attention,
    memory_attention_reference,
    merge_attention_states,
    merge_attention_states_reference,
    rotate_keys,
    rotate_keys_reference,
)
from .gather import gather_rows_
from .memory_update import draw_victims, memory_update_, memory_update_reference_, official_memory_update_
from .retrieval import official_retrieve_reference, retrieve_topk, retrieve_topk_chunked, retrieve_topk_reference

__all__ = [
    "BackendUnavailableError",
    "cpp_available",
    "cpu_isa",
    "cpu_isa_levels",
    "cpu_isa_missing",
    "draw_victims",
    "gather_rows_",
    "memory_attention",
    "memory_attention_reference",
    "memory_update_",
    "memory_update_reference_",
    "merge_attention_states",
    "merge_attention_states_reference",
    "official_memory_update_",
    "official_retrieve_reference",
    "resolve",
    "retrieve_topk",
    "retrieve_topk_chunked",
    "retrieve_topk_reference",
    "rotate_keys",
    "rotate_keys_reference",
    "set_cpu_isa",
    "supported_cpu_isas",
    "use_cpu_isa",
]
