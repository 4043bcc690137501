"""Issue 11, item 4: ``inject`` of a document longer than one chunk splits it as the official LongBench evaluation
does (full chunks aligned to the end, the remainder first) and equals injecting the chunks one by one."""

from __future__ import annotations

import warnings

import pytest
import torch
from _golden import GOLDEN

from mplus.checkpoint import memory_state
from mplus.memory.ltm import LTMBudgetError
from mplus.model import MPlusForCausalLM, split_chunks
from mplus_kernels.testing import assert_equal


def _model(max_length: int = 128) -> MPlusForCausalLM:
    return MPlusForCausalLM.from_pretrained(str(GOLDEN / "model"), max_length=max_length)


def _document(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def _assert_same_memory(a, b) -> None:
    sa, sb = memory_state(a), memory_state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        if key != "rng.cpu":
            assert_equal(sa[key], sb[key], name=key)


@pytest.mark.parametrize(
    ("length", "size", "expected"),
    [
        (1100, 512, [(0, 76), (76, 588), (588, 1100)]),  # the remainder first, full chunks aligned to the end
        (1024, 512, [(0, 512), (512, 1024)]),
        (512, 512, [(0, 512)]),
        (513, 512, [(0, 1), (1, 513)]),
        (7, 512, [(0, 7)]),
        (10, 3, [(0, 1), (1, 4), (4, 7), (7, 10)]),
    ],
)
def test_split_rule(length, size, expected):
    assert split_chunks(length, size) == expected


@pytest.mark.parametrize(("length", "chunk_size"), [(100, 32), (1100, 512)])
def test_a_long_document_equals_its_chunks_injected_one_by_one(length, chunk_size):
    doc = _document(length)
    whole, by_hand = _model(max_length=600), _model(max_length=600)
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 4-token head chunk of 100 / 32 warns (tested below)
        whole.inject(doc, chunk_size=chunk_size, progress=False)
        after = torch.get_rng_state()
        torch.manual_seed(3)
        for a, b in split_chunks(length, chunk_size):
            by_hand.inject(doc[:, a:b])
    assert torch.equal(torch.get_rng_state(), after)
    _assert_same_memory(whole, by_hand)
    assert whole.memory_version == by_hand.memory_version == len(split_chunks(length, chunk_size))


def test_progress_bar_and_short_chunk_warning(capsys):
    model = _model()
    with pytest.warns(UserWarning, match="1 chunk\\(s\\) of 4 tokens, under the 16-token training minimum"):
        model.inject(_document(100), chunk_size=32, progress=True)
    assert "inject" in capsys.readouterr().err  # tqdm writes to stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # full 32-token chunks: no warning
        model.inject(_document(96), chunk_size=32, progress=False)
    assert capsys.readouterr().err == ""


def test_options_of_one_chunk_are_refused_for_a_document_with_the_memory_untouched():
    model = _model()
    before = memory_state(model)
    before = {k: v.clone() for k, v in before.items()}
    for kwargs in [{"victims": torch.zeros(3, 8, dtype=torch.long)}, {"output_hidden_states": True},
                   {"update_memory": False}]:  # fmt: skip
        with pytest.raises(ValueError, match="apply to one chunk"):
            model.inject(_document(64), chunk_size=32, **kwargs)
    with pytest.raises(ValueError, match="chunk_size=0 must be an int > 0"):
        model.inject(_document(64), chunk_size=0)
    with pytest.raises(ValueError, match="exceeds the .*-token limit of max_length=128"):
        model.inject(_document(1024))
    after = memory_state(model)
    for key, value in before.items():
        assert_equal(after[key], value, name=key)


def test_a_chunk_that_fails_leaves_the_chunks_before_it_and_says_so():
    """The second chunk merges the dropped-row cache (update_ltm_frequency 2): over the budget it fails whole,
    leaving exactly the memory of the first chunk."""
    doc = _document(64)
    model, first_only = _model(), _model()
    model.ltm.budget_bytes = model.ltm.nbytes()
    torch.manual_seed(1)
    with pytest.raises(LTMBudgetError, match="over the budget") as info:
        model.inject(doc, chunk_size=32, progress=False)
    assert any("chunk 1 of 2 (tokens 32:64)" in note for note in info.value.__notes__)
    torch.manual_seed(1)
    first_only.inject(doc[:, :32])
    _assert_same_memory(model, first_only)
    assert model.memory_version == 1
