"""Retriever scoring + top-K: reference, Triton kernels, C++ kernel, op registration; the training scores and loss
(``scores``: importing it registers the fused op's backward and fake kernels)."""

from .op import retrieve_topk
from .reference import (
    official_retrieve_reference,
    retrieval_scores_reference,
    retrieve_topk_chunked,
    retrieve_topk_reference,
    select_topk_ascending,
)
from .scores import retriever_bce_loss, retriever_scores, retriever_scores_reference

__all__ = [
    "official_retrieve_reference",
    "retrieval_scores_reference",
    "retrieve_topk",
    "retrieve_topk_chunked",
    "retrieve_topk_reference",
    "retriever_bce_loss",
    "retriever_scores",
    "retriever_scores_reference",
    "select_topk_ascending",
]
