"""mplus: a thin, fast M+ / MemoryLLM model on Llama built on the kernels of `mplus_kernels`."""

from .attention import FusedMemoryAttention, KVCache, MemoryKV
from .config import MPlusConfig
from .memory import DroppedRows, ShortTermMemory
from .memory.ltm import LongTermMemory
from .memory.transfer import TransferEngine
from .model import MPlusCache, MPlusForCausalLM

__all__ = [
    "DroppedRows",
    "FusedMemoryAttention",
    "KVCache",
    "LongTermMemory",
    "MPlusCache",
    "MPlusConfig",
    "MPlusForCausalLM",
    "MemoryKV",
    "ShortTermMemory",
    "TransferEngine",
]
