"""Memory state of M+: the short-term slot pool (and, later, the long-term store and the transfer engine)."""

from .stm import DroppedRows, ShortTermMemory

__all__ = ["DroppedRows", "ShortTermMemory"]
