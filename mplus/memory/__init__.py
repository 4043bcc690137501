"""The memory of M+ / MemoryLLM (docs/architecture.md): the short-term slot pool (:mod:`.stm`), the long-term store
(:mod:`.ltm`, its buffers :mod:`.buffers`, eviction rule :mod:`.eviction` and retrieval :mod:`.retrieval`), the
state that owns both and every change of them (:mod:`.state`), its file (:mod:`.serialization`), and the engine that
overlaps long-term transfers with compute (:mod:`.transfer`)."""

from .stm import DroppedRows, ShortTermMemory

__all__ = ["DroppedRows", "ShortTermMemory"]
