"""Issue 21, first slice: M+ training under DDP (gloo, 2 processes on the CPU, loopback only).

Each rank trains on its own data with its own memory (``training.rank_memory``: its own drop generator), through
``DistributedDataParallel(training.Step(model))``. Checked against a single-process replay of each rank's steps: the
DDP gradients are the mean of the per-rank gradients, each rank's memory is exactly its replay's, the memories differ,
and DDP (default arguments: buffers broadcast) never touches a memory."""

from __future__ import annotations

import copy
import traceback
from pathlib import Path

import pytest
import torch
from _ranks import NEEDS_GLOO, golden_model, init_rank, rank_data, replay_ranks, run_ranks, snapshot, trained_grads
from torch.nn.parallel import DistributedDataParallel

from mplus import training
from mplus_kernels.testing import assert_close, assert_equal

WORLD = 2
SEED = 7
STEPS = 2
TIMEOUT_S = 240  # the whole multi-process run; init_process_group and every collective time out at 60 s

pytestmark = NEEDS_GLOO


def _worker(rank: int, port: int, folder: str) -> None:
    """One rank: wrap, run STEPS steps without an optimiser step (so the replay needs no optimiser), save what the
    parent checks to ``folder/rank{rank}.pt`` (or the traceback to ``folder/rank{rank}.err``)."""
    try:
        init_rank(rank, port, WORLD)
        model = golden_model()
        vocab = model.config.vocab_size
        memory = training.rank_memory(model, seed=SEED)  # rank from torch.distributed
        # rank 1's default memory differs from rank 0's before wrapping: DDP must not overwrite it
        if rank == 1:
            model.inject(rank_data(9, 9, vocab)[0])
        default_before = snapshot(model)
        ddp = DistributedDataParallel(training.Step(model, memory=memory))  # default: buffers broadcast
        default_wrapped = snapshot(model)
        result = {"grads": [], "victims": [], "memory": [], "errors": {}}
        for step in range(STEPS):
            context, target = rank_data(rank, step, vocab)
            out = ddp(context, target)
            out.loss.backward()
            result["grads"].append(trained_grads(model))
            result["victims"].append([v.clone() for v in out.victims])
            result["memory"].append(snapshot(memory))
            model.zero_grad(set_to_none=True)
        result["default_before"], result["default_wrapped"] = default_before, default_wrapped
        result["default_after"] = snapshot(model)
        # retriever_loss=False leaves the projectors unreached: DDP needs find_unused_parameters=True (module doc)
        lean = DistributedDataParallel(
            training.Step(model, memory=memory.clone(), retriever_loss=False), find_unused_parameters=True
        )
        for step in range(2):  # the second forward is where DDP raises on a reduction left unfinished
            lean(*rank_data(rank, step, vocab)).loss.backward()
            result["lean"] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
            model.zero_grad(set_to_none=True)
        for name, call in [
            ("training_step(ddp)", lambda: training.training_step(ddp, *rank_data(rank, 0, vocab))),
            ("Step(ddp)", lambda: training.Step(ddp)),
        ]:
            try:
                call()
            except TypeError as exc:
                result["errors"][name] = str(exc)
        torch.save(result, Path(folder) / f"rank{rank}.pt")
        torch.distributed.destroy_process_group()
    except BaseException:
        (Path(folder) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Run the 2-rank job once (spawned processes, loopback, a deadline); each rank's saved results."""
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("ddp"), TIMEOUT_S)


@pytest.fixture(scope="module")
def replay(ranks) -> list[dict]:
    """Each rank's steps replayed in this process, on one thread as the ranks ran, on a copy of the model with the
    memory ``rank_memory`` gives that rank, drawing its own victims: the per-rank gradients and memories."""
    return replay_ranks(WORLD, STEPS, SEED)


def test_ddp_gradients_are_the_mean_of_the_per_rank_gradients(ranks, replay):
    """Both ranks hold the same averaged gradients, the mean of the single-process ones to fp32 rounding: DDP divides
    each rank's gradient by the world size (2: exact) and gloo sums two addends (one rounding, the same as the
    reference's ``(g0 + g1) / 2``), so the figures are expected bit-equal; 1e-6 leaves room for a reducer that
    buckets or orders otherwise."""
    for step in range(STEPS):
        grads = [r["grads"][step] for r in ranks]
        assert grads[0].keys() == grads[1].keys() == replay[0]["grads"][step].keys()
        assert len(grads[0]) == 90  # every LoRA factor and projector of the golden model
        worst = 0.0
        for name in grads[0]:
            assert_equal(grads[0][name], grads[1][name], name=f"step {step} {name}: rank 0 vs rank 1")
            mean = (replay[0]["grads"][step][name] + replay[1]["grads"][step][name]) / WORLD
            assert_close(grads[0][name], mean, atol=1e-6, rtol=0, name=f"step {step} {name}")
            worst = max(worst, (grads[0][name] - mean).abs().max().item())
        # the ranks' own gradients differ: the mean is not just one rank's
        differ = [n for n in grads[0] if not torch.equal(replay[0]["grads"][step][n], replay[1]["grads"][step][n])]
        assert differ
        print(f"step {step}: max |DDP grad - mean of single-process grads| = {worst:.3g}")


def test_each_rank_memory_is_its_own_replay_and_the_ranks_differ(ranks, replay):
    """Each rank drew its own victims (its own generator), and its memory is bit-equal to the single-process replay
    of its data; the two ranks' memories differ."""
    for step in range(STEPS):
        for rank in range(WORLD):
            for a, b in zip(ranks[rank]["victims"][step], replay[rank]["victims"][step]):
                assert_equal(a, b, name=f"rank {rank} step {step} victims")
            want = replay[rank]["memory"][step]
            got = ranks[rank]["memory"][step]
            assert got.keys() == want.keys()
            for key in want:
                assert_equal(got[key], want[key], name=f"rank {rank} step {step} {key}")
        assert not torch.equal(ranks[0]["victims"][step][0], ranks[1]["victims"][step][0])
        assert not torch.equal(ranks[0]["memory"][step]["stm.hidden"], ranks[1]["memory"][step]["stm.hidden"])
        assert not torch.equal(ranks[0]["memory"][step]["rng.cpu"], ranks[1]["memory"][step]["rng.cpu"])


def test_ddp_never_touches_a_memory(ranks):
    """DDP with its default arguments (buffers broadcast at wrapping and before every forward) left rank 1's default
    memory, which differs from rank 0's, as it was: the Step puts every memory buffer in DDP's ignore list."""
    for rank in range(WORLD):
        for key in ("default_wrapped", "default_after"):
            for name, t in ranks[rank][key].items():
                assert_equal(t, ranks[rank]["default_before"][name], name=f"rank {rank} {key} {name}")
    before = [r["default_before"] for r in ranks]
    assert any(not torch.equal(before[0][k], before[1][k]) for k in before[0])


def test_unreached_parameters_need_find_unused_parameters(ranks):
    """A step without the retriever loss reaches no projector; with ``find_unused_parameters=True`` DDP then averages
    the LoRA gradients and leaves the projectors' unset (on both ranks alike)."""
    lean = [r["lean"] for r in ranks]
    unset = {n for n, g in lean[0].items() if g is None}
    assert unset and all(any(key in n for key in training.SELECTOR_KEYS) for n in unset)
    assert unset == {n for n, g in lean[1].items() if g is None}
    for name in lean[0].keys() - unset:
        assert_equal(lean[0][name], lean[1][name], name=name)


def test_wrapped_models_are_refused_by_name(ranks):
    errors = ranks[0]["errors"]
    assert "training_step: model is a DistributedDataParallel wrapping a Step" in errors["training_step(ddp)"]
    assert "Step: model must be an MPlusForCausalLM, got DistributedDataParallel wrapping a Step" in errors["Step(ddp)"]


def test_a_step_is_wrapped_once_and_training_step_takes_it():
    model = golden_model()
    step = training.Step(model, memory=training.rank_memory(model, seed=SEED, rank=0))
    with pytest.raises(TypeError, match=r"Step: model is already a training\.Step \(of a MPlusForCausalLM\)"):
        training.Step(step)
    with pytest.raises(TypeError, match="Step: model must be an MPlusForCausalLM, got Linear"):
        training.Step(torch.nn.Linear(2, 2))
    assert "model.memory.stm.hidden" in step._ddp_params_and_buffers_to_ignore
    assert not any(name.startswith("memory.") for name, _ in step.named_buffers())  # the rank's state: no submodule
    twin = copy.deepcopy(model)
    memory = training.rank_memory(twin, seed=SEED, rank=0)
    ids = rank_data(0, 0, model.config.vocab_size)
    a = training.training_step(step, *ids)  # the Step's model and memory
    b = training.training_step(twin, *ids, memory=memory)
    assert_equal(a.loss.detach(), b.loss.detach(), name="loss")
    assert_equal(step.memory.stm.hidden, memory.stm.hidden, name="memory")


def test_rank_seed_rule():
    assert training.rank_seed(0, 1) == 1 and training.rank_seed(1, 0) == 2**32
    with pytest.raises(ValueError, match="rank=-1"):
        training.rank_seed(0, -1)
    with pytest.raises(ValueError, match="seed=4294967296"):
        training.rank_seed(2**32, 0)
    model = golden_model()
    a, b = (training.rank_memory(model, seed=3, rank=r) for r in (0, 1))
    assert a.stm.age_mode == "training" and a.generator is not None
    assert a.generator.initial_seed() == 3 * 2**32 and b.generator.initial_seed() == 3 * 2**32 + 1
    assert training.rank_memory(model, seed=3).generator.initial_seed() == 3 * 2**32  # no process group: rank 0
