"""Issue 21: a model built on the meta device, sharded, then materialised per rank (``training.materialize``).

Built under ``torch.device("meta")`` (no weights allocated), wrapped in a Step with this rank's memory, sharded with
FSDP2 and materialised from the golden checkpoint (``to_empty`` + this rank's shards of the weights + the memory),
the model holds exactly what the eagerly built one (``from_pretrained``, ``rank_memory``, ``shard``) holds, and its
first training step — loss, gradients, AdamW step, memory — is the eager one's, bit for bit (2 gloo processes); an
inject through ``Step.run`` on the sharded model is the unsharded inject's. Unsharded, in one process, the same
against ``from_pretrained``. Bad input is refused by name."""

from __future__ import annotations

import copy
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from _golden import GOLDEN
from _ranks import NEEDS_GLOO, golden_model, init_rank, rank_data, run_ranks, snapshot
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from mplus import training
from mplus.model import MPlusForCausalLM
from mplus_kernels.testing import assert_equal

WORLD = 2
SEED = 5
TIMEOUT_S = 80  # the whole multi-process run; init_process_group and every collective time out at 60 s
CHECKPOINT = GOLDEN / "model"

pytestmark = NEEDS_GLOO


def _full(model) -> dict[str, torch.Tensor]:
    """Every parameter whole (a sharded one gathered: a collective)."""
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def _meta_step(config, seed: int, rank: int | None = None) -> training.Step:
    """The model built on the meta device, prepared as golden_model() prepares it, in a Step with its rank memory."""
    with torch.device("meta"):
        model = MPlusForCausalLM(config, max_length=96)
    training.prepare(model)
    model.eval()
    return training.Step(model, memory=training.rank_memory(model, seed=seed, rank=rank))


def _first_step(step, model, rank: int, opt_lr: float = 1e-2) -> dict:
    """One training step and one AdamW step: the loss, the whole gradients, the weights after and the memory after."""
    opt = torch.optim.AdamW(training.param_groups(model, lr=opt_lr))
    out = step(*rank_data(rank, 0, model.config.vocab_size))
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    got = {
        "loss": out.loss.detach().clone(),
        "grads": {n: (g.full_tensor() if isinstance(g, DTensor) else g).clone() for n, g in grads.items()},
    }
    opt.step()
    got["weights"] = {n: w for n, w in _full(model).items() if n in grads}
    got["memory"] = snapshot(step.memory)
    return got


def _worker(rank: int, port: int, folder: str) -> None:
    """One rank: the eager sharded step and the meta-built one, what each holds, their first steps, an inject through
    ``Step.run``, and the refusals; to ``folder/meta-rank{rank}.pt``."""
    try:
        warnings.filterwarnings("ignore", message=".*returned a view tensor")  # memory_kv's views: never written
        init_rank(rank, port, WORLD)
        eager_model = golden_model()
        eager = training.shard(training.Step(eager_model, memory=training.rank_memory(eager_model, seed=SEED)))
        step = _meta_step(eager_model.config, SEED)
        model = step.model
        errors = {}
        try:
            training.shard(step)
        except ValueError as exc:
            errors["shard(meta)"] = str(exc)
        training.shard(step, mesh=init_device_mesh("cpu", (WORLD,)))
        meta_params = {p.device.type for p in model.parameters()}
        training.materialize(step, load_file(str(CHECKPOINT / "model.safetensors")), device="cpu")
        root_resharded = all(p.to_local().shape[0] < p.shape[0] for p in model.lm_head.parameters())
        injected = model.new_memory(step.memory)  # a copy: the step below starts from the materialised memory
        step.run(model.inject, rank_data(rank, 1, model.config.vocab_size)[0], memory=injected, progress=False)
        result = {
            "meta_params": meta_params,
            "devices": {t.device.type for t in [*model.parameters(), *model.buffers(), *step.memory.buffers()]},
            "sharded": all(isinstance(p, DTensor) for p in model.parameters()),
            "root_resharded": root_resharded,
            "age_mode": step.memory.stm.age_mode,
            "seed": step.memory.generator.initial_seed(),
            "weights": (_full(model), _full(eager_model)),
            "memory": (snapshot(step.memory), snapshot(eager.memory)),
            "default": (snapshot(model.memory), snapshot(eager_model.memory)),
            "inject": snapshot(injected),
            "step": (_first_step(step, model, rank), _first_step(eager, eager_model, rank)),
        }
        for name, call in [
            ("materialize twice", lambda: training.materialize(step, CHECKPOINT, device="cpu")),
            ("shard(ddp)", lambda: training.shard(DistributedDataParallel(training.Step(golden_model())))),
            ("Step(sharded)", lambda: training.Step(step)),
            ("DDP(sharded)", lambda: DistributedDataParallel(step)),
        ]:
            try:
                call()
            except (TypeError, ValueError, RuntimeError) as exc:
                errors[name] = str(exc)
        result["errors"] = errors
        torch.save(result, Path(folder) / f"meta-rank{rank}.pt")
        torch.distributed.destroy_process_group()
    except BaseException:
        (Path(folder) / f"meta-rank{rank}.err").write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("meta"), TIMEOUT_S, prefix="meta-")


def _assert_same(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key in want:
        if isinstance(want[key], dict):
            _assert_same(got[key], want[key], f"{what} {key}")
        else:
            assert_equal(got[key], want[key], name=f"{what} {key}")


def test_a_sharded_meta_build_holds_what_the_eager_one_holds(ranks):
    """Built on meta (every parameter there), sharded and materialised: every parameter a CPU DTensor, the root's
    back to its shards, this rank's memory with training ages and its own generator; the weights, this rank's memory
    and the model's default memory bit-equal to the eager build's."""
    for rank in range(WORLD):
        r = ranks[rank]
        assert r["meta_params"] == {"meta"} and r["devices"] == {"cpu"}
        assert r["sharded"] and r["root_resharded"]
        assert r["age_mode"] == "training" and r["seed"] == training.rank_seed(SEED, rank)
        for key in ("weights", "memory", "default"):
            _assert_same(*r[key], f"rank {rank} {key}")
        assert len(r["weights"][0]) == 122 and len(r["memory"][0]) == 31


def test_its_first_training_step_is_the_eager_one(ranks):
    """Loss, whole gradients (the mean over the ranks), weights after one AdamW step and the memory after the
    commit: the meta build's equal the eager build's bit for bit (the same shards, the same collectives)."""
    for rank in range(WORLD):
        meta, eager = ranks[rank]["step"]
        _assert_same(meta, eager, f"rank {rank} first step")
        assert len(meta["grads"]) == 90
        assert not torch.equal(meta["memory"]["stm.hidden"], ranks[rank]["memory"][0]["stm.hidden"])  # it committed
    assert not torch.equal(ranks[0]["step"][0]["loss"], ranks[1]["step"][0]["loss"])  # each rank its own data


def test_an_inject_through_step_run_is_the_unsharded_inject(ranks):
    """``step.run(model.inject, ...)`` on the sharded model (every layer unsharded in its forward, the embedding by
    the root) writes the memory an unsharded model writes: each rank's inject replayed in this process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = golden_model()
        for rank in range(WORLD):
            model = copy.deepcopy(base)
            memory = training.rank_memory(model, seed=SEED, rank=rank)
            model.inject(rank_data(rank, 1, model.config.vocab_size)[0], memory=memory, progress=False)
            _assert_same(ranks[rank]["inject"], snapshot(memory), f"rank {rank} inject")
    finally:
        torch.set_num_threads(threads)


def test_sharding_and_materialising_refuse_bad_input_by_name(ranks):
    errors = ranks[0]["errors"]
    assert "shard: the model is on the meta device, so mesh cannot follow it" in errors["shard(meta)"]
    assert "materialize: the model is on cpu, not the meta device" in errors["materialize twice"]
    assert "shard: expected a training.Step, got DistributedDataParallel wrapping a Step" in errors["shard(ddp)"]
    assert "DDP or FSDP2, not both" in errors["shard(ddp)"]
    assert "Step: model is already a training.Step" in errors["Step(sharded)"]
    # every parameter of a sharded Step is in DDP's ignore list: DDP has nothing to synchronise and says so
    assert "DistributedDataParallel is not needed when a module doesn't have any parameter" in errors["DDP(sharded)"]


def test_an_unsharded_meta_build_is_from_pretrained():
    """In one process, no sharding: a Step built on meta and materialised from the checkpoint folder holds the eager
    build's weights and memory, and its first step is the eager one, bit for bit."""
    eager_model = golden_model()
    eager = training.Step(eager_model, memory=training.rank_memory(eager_model, seed=SEED, rank=0))
    step = training.materialize(_meta_step(eager_model.config, SEED, rank=0), CHECKPOINT, device="cpu")
    model = step.model
    _assert_same(_full(model), _full(eager_model), "weights")
    _assert_same(snapshot(step.memory), snapshot(eager.memory), "memory")
    _assert_same(snapshot(model.memory), snapshot(eager_model.memory), "default memory")
    assert_equal(model.rope_cos, eager_model.rope_cos, name="rope_cos")  # the tables are computed anew
    _assert_same(_first_step(step, model, 0), _first_step(eager, eager_model, 0), "first step")


def test_materialize_refuses_bad_input_before_allocating():
    config = golden_model().config
    step = _meta_step(config, SEED, rank=0)
    tensors = load_file(str(CHECKPOINT / "model.safetensors"))
    with pytest.raises(TypeError, match="materialize: expected a training.Step built on the meta device, got Linear"):
        training.materialize(torch.nn.Linear(2, 2), tensors, device="cpu")
    with pytest.raises(ValueError, match="materialize: device=meta: give the device the model is to live on"):
        training.materialize(step, tensors, device="meta")
    with pytest.raises(TypeError, match="materialize: tensors must be a checkpoint directory, a Hub id or a dict"):
        training.materialize(step, [tensors], device="cpu")
    bad = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    bad["memory"] = tensors["memory"][:, :4]
    message = (
        r"(?s)materialize: the tensors given does not match the config:.*"
        r"missing lm_head.weight \[256, 64\].*memory has shape \[3, 4, 64\], expected \[3, 32, 64\]"
    )
    with pytest.raises(ValueError, match=message):
        training.materialize(step, bad, device="cpu")
    assert {t.device.type for t in [*step.model.parameters(), *step.memory.buffers()]} == {"meta"}  # nothing changed


def test_a_meta_build_resumes_from_a_training_checkpoint(tmp_path):
    """The recipe's last line: a Step built on meta and materialised from the base checkpoint, then given a training
    checkpoint of an eager run (one process), holds that run's trained weights, AdamW state and memory, and its next
    step is the eager run's next step, bit for bit."""
    eager_model = golden_model()
    eager = training.Step(eager_model, memory=training.rank_memory(eager_model, seed=SEED, rank=0))
    eager_opt = torch.optim.AdamW(training.param_groups(eager_model, lr=1e-2))
    eager(*rank_data(0, 0, eager_model.config.vocab_size)).loss.backward()
    eager_opt.step()
    eager_opt.zero_grad(set_to_none=True)
    training.save_training_checkpoint(tmp_path / "ckpt", eager, eager_opt, step=1)
    step = training.materialize(_meta_step(eager_model.config, SEED, rank=0), CHECKPOINT, device="cpu")
    opt = torch.optim.AdamW(training.param_groups(step.model, lr=1e-2))
    assert training.load_training_checkpoint(tmp_path / "ckpt", step, opt).step == 1
    _assert_same(_full(step.model), _full(eager_model), "weights")
    _assert_same(snapshot(step.memory), snapshot(eager.memory), "memory")
    assert len(opt.state) == len(eager_opt.state) == 90
    for a, b in zip(opt.state.values(), eager_opt.state.values()):
        _assert_same(a, b, "AdamW state")
    data = rank_data(0, 1, eager_model.config.vocab_size)
    got, want = step(*data), eager(*data)
    got.loss.backward()
    want.loss.backward()
    assert_equal(got.loss, want.loss, name="next loss")
    grads = {n: p.grad for n, p in eager_model.named_parameters() if p.requires_grad}
    _assert_same({n: p.grad for n, p in step.model.named_parameters() if p.requires_grad}, grads, "next gradients")
