"""mplus: a thin, fast M+ / MemoryLLM model on Llama built on the kernels of `mplus_kernels`."""

from .attention import FusedMemoryAttention, KVCache, MemoryKV
from .config import MPlusConfig
from .memory import DroppedRows, ShortTermMemory
from .memory.ltm import LongTermMemory, LTMBudgetError
from .memory.state import MemoryState
from .memory.transfer import TransferEngine
from .model import MPlusCache, MPlusForCausalLM, StaleCacheError
from .segments import MemorySegments, PendingSegment

__all__ = [
    "DroppedRows",
    "FusedMemoryAttention",
    "KVCache",
    "LTMBudgetError",
    "LongTermMemory",
    "MPlusCache",
    "MemoryState",
    "MPlusConfig",
    "MPlusForCausalLM",
    "MemoryKV",
    "MemorySegments",
    "PendingSegment",
    "ShortTermMemory",
    "StaleCacheError",
    "TransferEngine",
]
