"""mplus: a thin, fast M+ / MemoryLLM model on Llama built on the kernels of `mplus_kernels`."""

from .memory import ShortTermMemory

__all__ = ["ShortTermMemory"]
