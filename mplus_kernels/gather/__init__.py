"""Two-source row gather for long-term-memory retrieval: reference, C++ kernel, Triton kernel."""

from .op import gather_rows_
from .reference import gather_rows_reference_, index_select_reference

__all__ = ["gather_rows_", "gather_rows_reference_", "index_select_reference"]
