"""Retriever scoring + top-K: reference, Triton kernels, C++ kernel, op registration."""

from .op import retrieve_topk
from .reference import (
    official_retrieve_reference,
    retrieval_scores_reference,
    retrieve_topk_chunked,
    retrieve_topk_reference,
    select_topk_ascending,
)

__all__ = [
    "official_retrieve_reference",
    "retrieval_scores_reference",
    "retrieve_topk",
    "retrieve_topk_chunked",
    "retrieve_topk_reference",
    "select_topk_ascending",
]
