"""Distributed training (issue 21): the step time of 1 vs 2 ranks, DDP and FSDP2, over gloo on this machine's CPUs.

Each rank is a spawned process with one thread (the ranks share the machine's cores) holding the same small M+ —
4 layers, d 256, 4/2 heads of 64, MLP 704, vocabulary 2,048; K 32, N 256 short-term rows, K0 64 long-term rows from
a store of 96 (three earlier injections); LoRA r 8 — wrapped by ``DistributedDataParallel(training.Step(...))`` or
sharded by ``training.shard``, with its own memory (``training.rank_memory``) and its own data: a 64-token context and
a 64-token target. One timed step is the whole training step on every rank at once: ``training_step`` (inject with
gradients, LM + retriever losses), ``loss.backward()`` (DDP: the gradients all-reduced; FSDP2: all-gathers and
reduce-scatters) and AdamW over ``training.param_groups`` (FSDP2: on each rank's shards), with ``commit=False`` so
every round sees the same memory. Two processes are spawned once: "2 ranks" is the whole group, "1 rank" rank 0
alone in a process group of its own (``new_group([0])``: DDP's ``process_group``, FSDP2's mesh) while rank 1 waits
idle, so both run the same code in the same processes. The benchmark process sends each rank of the group "step"
and waits for all of them, so the median is the slowest rank's step plus a pipe round trip (tens of µs); each rank
also reports its own step times (``rank_step_ms``: the slowest rank's median). ``tokens_per_s``: the tokens of all
ranks' contexts and targets per second — with perfect scaling, 2 ranks double it at the same step time (on 2 cores,
one rank per core). Never asserted: a measurement.
"""

from __future__ import annotations

import datetime
import socket
import statistics
import time
import traceback
import warnings

import pytest
import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel

from mplus import training
from mplus.config import MPlusConfig
from mplus.model import MPlusForCausalLM

WORLDS = (1, 2)
WRAPPERS = ("ddp", "fsdp2")
T_CTX, T_TGT = 64, 64
ROUNDS, WARMUP = 5, 1
TIMEOUT_S = 120  # a rank that does not answer within it fails the benchmark (it is killed at the end)
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "up_proj",
                                                                          "down_proj", "gate_proj"]}  # fmt: skip
CONFIG = dict(
    vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, num_tokens=32, num_blocks=10, num_ltm_blocks=2, update_ltm_frequency=2,
    selector_hidden_dim=64, ltm_initial_size=64, lora_config=LORA, bos_token_id=None, eos_token_id=None,
    pad_token_id=None,
)  # fmt: skip
SHAPE = f"L4 d256 H4/2 D64 ctx{T_CTX} tgt{T_TGT} N256 K32 K0 64 (4.8M weights, 0.76M trained)"


def _model() -> MPlusForCausalLM:
    """The same model in every rank (seeded): random weights, a random memory with three injections behind it."""
    torch.manual_seed(0)
    model = MPlusForCausalLM(MPlusConfig(**CONFIG), max_length=T_CTX + T_TGT)
    with torch.no_grad():
        model.stm.hidden.normal_()
        model.bos_embedding.normal_()
        for name, p in model.named_parameters():
            if "lora_B" in name or (p.dim() == 2 and "lora" not in name):
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # long-term rows to retrieve: 64 merged + 32 cached per layer
        model.inject(torch.randint(0, model.config.vocab_size, (1, T_CTX), generator=g), progress=False)
    training.prepare(model)
    return model.eval()  # no LoRA dropout: the same work every round


def _rank(rank: int, port: int, conn) -> None:
    """A rank: for each group it is in (every world size of WORLDS: the first ``world`` ranks) and each wrapper, the
    model, wrapped on that group, and its optimiser; then a step of the (wrapper, world) named in each message,
    answered with its time in seconds, until None; any failure is sent back as "error: <traceback>"."""
    try:
        warnings.filterwarnings("ignore", message=".*returned a view tensor")  # memory_kv's views: never written
        torch.set_num_threads(1)
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=max(WORLDS),
            timeout=datetime.timedelta(seconds=TIMEOUT_S),
        )  # fmt: skip
        runs = {}
        for world in WORLDS:
            group = torch.distributed.new_group(list(range(world)))  # every rank calls it, members or not
            if rank >= world:
                continue
            for wrapper in WRAPPERS:
                model = _model()
                step = training.Step(model, memory=training.rank_memory(model, seed=0), commit=False)
                if wrapper == "ddp":
                    wrapped = DistributedDataParallel(step, process_group=group)
                else:
                    wrapped = training.shard(step, mesh=DeviceMesh.from_group(group, "cpu"))
                runs[wrapper, world] = (wrapped, torch.optim.AdamW(training.param_groups(model, lr=1e-4)))
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        data = [torch.randint(0, CONFIG["vocab_size"], (1, t), generator=g) for t in (T_CTX, T_TGT)]
        conn.send("ready")
        while (what := conn.recv()) is not None:
            wrapped, opt = runs[what]
            t0 = time.perf_counter()
            wrapped(*data).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            conn.send(time.perf_counter() - t0)
        torch.distributed.destroy_process_group()
    except BaseException:
        conn.send("error: " + traceback.format_exc())


class Ranks:
    """``max(WORLDS)`` spawned ranks on a free loopback port, driven through one pipe each."""

    def __init__(self) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.conns, self.procs = [], []
        for rank in range(max(WORLDS)):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_rank, args=(rank, port, child), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        self._answers(self.conns)
        self.times: dict[tuple[str, int], list[list[float]]] = {}

    def _answers(self, conns: list) -> list:
        answers = []
        for rank, conn in enumerate(conns):
            if not conn.poll(TIMEOUT_S):
                raise RuntimeError(f"rank {rank} did not answer in {TIMEOUT_S} s")
            answer = conn.recv()
            if isinstance(answer, str) and answer.startswith("error"):
                raise RuntimeError(f"rank {rank}: {answer}")
            answers.append(answer)
        return answers

    def step(self, wrapper: str, world: int) -> None:
        """One training step of ``wrapper`` on the first ``world`` ranks at once; returns when each is done."""
        for conn in self.conns[:world]:
            conn.send((wrapper, world))
        self.times.setdefault((wrapper, world), []).append(self._answers(self.conns[:world]))

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            if proc.is_alive():
                conn.send(None)
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()  # a process this benchmark started


@pytest.fixture(scope="module")
def ranks():
    ranks = Ranks()
    yield ranks
    ranks.close()


@pytest.mark.parametrize("world", WORLDS, ids=[f"{w}rank" for w in WORLDS])
@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_distributed_step(benchmark, bench, ranks, wrapper, world):
    bench(
        lambda: ranks.step(wrapper, world),
        group=f"distributed training step/{wrapper} gloo",
        provider=f"{world} rank" + ("s" if world > 1 else ""),
        shape=SHAPE,
        dtype="fp32",
        rounds=ROUNDS,
        warmup_rounds=WARMUP,
        measure_memory=False,  # the benchmark process only waits: its memory says nothing of the ranks'
        tokens_per_s_tokens=world * (T_CTX + T_TGT),
        world_size=world,
        threads_per_rank=1,
    )
    timed = ranks.times[wrapper, world][-ROUNDS:]  # the rounds pytest-benchmark timed (after the warm-up)
    per_rank = [statistics.median(t[rank] for t in timed) * 1e3 for rank in range(world)]
    benchmark.extra_info["rank_step_ms"] = max(per_rank)
    benchmark.extra_info["rank_medians_ms"] = per_rank
