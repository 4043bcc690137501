"""Issue 12, item 2 (first part): retriever scores with a backward and the official BCE objective (SPEC.md §7.3)."""

from __future__ import annotations

import pytest
import torch

from mplus_kernels.retrieval import scores as sc
from mplus_kernels.testing import assert_close


def _plain(queries, keys):
    return torch.sigmoid(queries @ keys.transpose(1, 2)).mean(1)


def test_reference_scores_and_gradients_match_autograd_of_the_plain_formula(monkeypatch):
    """The blocked reference (the fused kernels: tests/test_retriever_scores.py)."""
    monkeypatch.setattr(sc, "BLOCK", 7)  # several recomputed blocks, one partial
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 5, 16, generator=g), torch.randn(3, 23, 16, generator=g)
    upstream = torch.randn(3, 23, generator=g)
    a = [q.clone().requires_grad_(), k.clone().requires_grad_()]
    b = [q.clone().requires_grad_(), k.clone().requires_grad_()]
    w, ref = sc.retriever_scores(*a, backend="reference"), _plain(*b)
    assert_close(w, ref, atol=1e-6, rtol=1e-6, name="scores")
    (w * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert_close(a[0].grad, b[0].grad, atol=1e-6, rtol=1e-5, name="d queries")
    assert_close(a[1].grad, b[1].grad, atol=1e-6, rtol=1e-5, name="d keys")


def test_reference_gradcheck_fp64(monkeypatch):
    monkeypatch.setattr(sc, "BLOCK", 3)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: sc.retriever_scores(a, b, backend="reference"), (q, k))


def test_bce_loss_is_the_official_formula():
    w = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.7, 0.3]], requires_grad=True)
    pos = torch.tensor([[True, False, True], [False, True, False]])
    lam = 0.5
    l_pos = -torch.log(torch.tensor([0.9, 0.6, 0.7]) + 1e-5).mean()
    l_neg = -torch.log(1 - torch.tensor([0.2, 0.1, 0.3]) + 1e-5).mean()
    assert_close(sc.retriever_bce_loss(w, pos, lam), (l_pos + lam * l_neg) / (1 + lam), atol=1e-7, rtol=0, name="loss")
    sc.retriever_bce_loss(w, pos).backward()
    assert bool((w.grad[pos] < 0).all()) and bool((w.grad[~pos] > 0).all())  # positives up, negatives down
    only_neg = sc.retriever_bce_loss(w.detach(), torch.zeros_like(pos))
    assert torch.isfinite(only_neg)


def test_bad_input():
    with pytest.raises(ValueError, match="queries must be \\[L, T, ds\\] and keys \\[L, N, ds\\]"):
        sc.retriever_scores(torch.randn(2, 3, 4), torch.randn(3, 5, 4))
    with pytest.raises(ValueError, match="T = 0"):
        sc.retriever_scores(torch.randn(2, 0, 4), torch.randn(2, 5, 4))
    with pytest.raises(TypeError, match="keys must be a torch.Tensor"):
        sc.retriever_scores(torch.randn(2, 3, 4), None)
    with pytest.raises(ValueError, match="positives must be a bool tensor"):
        sc.retriever_bce_loss(torch.rand(2, 3), torch.ones(2, 3))


def test_opcheck():
    q = torch.randn(2, 3, 8, requires_grad=True)
    k = torch.randn(2, 9, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.mplus.retriever_scores.default, (q, k))
