"""Retention experiment (issue 12, item 4): how long does a fact stay readable, MemoryLLM vs M+?

Two tiny models on the same small random-init Llama are trained here, on synthetic data, with the package's training
step (:func:`mplus.training.training_step`), then evaluated through the inference API (``inject``, ``forward``):

* MemoryLLM: a short-term memory (STM) of N rows per layer; each injection writes K new rows and drops K random ones
  (discarded);
* M+: the same STM (N rows, K per injection), plus the long-term memory (LTM) that keeps the dropped rows and a
  retriever that brings K0 of them back at every prefill.

Data. A *fact chunk* (one injection, K tokens, so it writes exactly its own K rows) is P = K/2 pairs
``[k1 v1 ... kP vP]``: P distinct keys of one *topic*, each followed by a random value. Its *question* is a prompt,
the P keys in a shuffled order, then the answer, the pairs in the prompt's order; recall accuracy is the fraction of
the answer's values predicted right (argmax at the key before each value). Distractors are other fact chunks, of
other topics. The prompt is what retrieves (the prefill, SPEC.md §5.2), and the values to be predicted never reach
the retriever. The keys of a topic start with embeddings sharing a direction (``topic_share`` of their variance):
the stand-in for a pretrained model, whose words of one subject lie near each other, and what lets the retriever's
mean-over-query-tokens score (SPEC.md §5.2, §7.3) rate *every* row of the fact high from *every* prompt token. With
unrelated random keys a prompt token matches one row of the fact at best (a mean of 1/P): the retriever then brought
back under 10 % of a fact's rows, and M+ held only a little longer than MemoryLLM. (A first design asked with a
"subject" token repeated in every triplet ``[s k v]``: the base never learnt in-context recall on it, plateauing at
1/P, a value of the fact picked at random.)

Stages (the same data, steps and seeds for both models):

0. base pretraining: the Llama alone (adapters off, no memory), batched, in-context recall on ``[fact ; question]``
   with a curriculum over the number of pairs. A stand-in for the pretrained Llama the paper starts from (from
   random init, batch-1 memory training did not learn recall at all within this budget). Both models start from it.
1. memory training: every parameter trained (the base is tiny and synthetic), ``training_step`` with the paper's two
   kinds of steps: *fresh* (inject a fact chunk, ask about it) and *revisit* (inject an unrelated chunk, ask about
   the chunk injected d steps before, its rows tracked through the drops and passed as ``document=``), with d
   log-uniform in [1, max_distance] and the revisit share annealed from 0 to 75 %.

Evaluation: a fresh memory state (``model.new_memory(seed=...)``) warmed up with distractor injections; per trial
``inject(fact)``, then distractors; after n of them the question is asked (a forward never changes the memory, so
one trial scores every n). The prefill is the prompt (that is where M+ retrieves its K0 rows), and the answer is fed
through the cache teacher-forced (no re-retrieval); training asks the same way (``training_step(prompt_length=P)``).
The reference curve ``(1 - K/N)^n`` is the probability that one given STM row survives n injections; the measured
fraction of the fact's rows still in the STM is recorded too.

``python experiments/retention.py [--smoke] [--out docs/]`` writes ``retention.json`` and ``retention.png``. Torch runs
on one thread by default (``--threads``): on this 2-core machine, shared with other jobs, two OpenMP threads made the
tiny ops up to 30x slower (threads spinning against each other); one thread loses nothing at these sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
import zlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the package is this repository's
    sys.path.insert(0, str(ROOT))

from mplus import training  # noqa: E402
from mplus.config import MPlusConfig  # noqa: E402
from mplus.model import MPlusForCausalLM  # noqa: E402

MODELS = ("memoryllm", "mplus")
LABELS = {"memoryllm": "MemoryLLM (STM only)", "mplus": "M+ (STM + LTM + retriever)"}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every size and hyper-parameter of one run (written to the JSON as they are)."""

    # the small Llama (shared by both models)
    layers: int = 2
    hidden: int = 128
    heads: int = 2  # head_dim 64: in-context recall formed far later with 4 heads of 32
    kv_heads: int = 2
    intermediate: int = 384
    lora_rank: int = 16
    selector_dim: int = 64  # ds (M+ only)
    # memory: K = num_tokens rows per injection, N = stm_blocks * K, K0 = ltm_blocks * K (M+ only)
    num_tokens: int = 16
    stm_blocks: int = 10
    ltm_blocks: int = 2
    update_ltm_frequency: int = 16  # merge the dropped-row cache into the LTM every 16 injections
    decay_frequency: float = 1.0
    initial_rf: float = 10.0  # a merged batch is evicted at its 10th merge: >= 144 injections after its drop
    # data
    num_topics: int = 256  # a fact's keys are P of one topic's keys ...
    keys_per_topic: int = 10
    topic_share: float = 0.5  # ... whose embeddings share a direction: this share of their initial variance
    num_values: int = 256
    topic_window: int = 200  # a training chunk's topic avoids those of the 200 chunks before it
    # stage 0: in-context pretraining of the base (no memory, batched)
    pretrain_steps: int = 3000
    pretrain_batch: int = 32
    pretrain_lr: float = 1e-3
    # stage 1: memory training
    steps: int = 6000
    lr: float = 1e-3
    selector_lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 200
    grad_clip: float = 1.0
    fresh_start: float = 1.0  # probability of a fresh step at the start, annealed linearly ...
    fresh_end: float = 0.25  # ... to this at `anneal` of the steps
    anneal: float = 0.3
    max_distance: int = 64  # revisit distances d ~ log-uniform in [1, max_distance]
    # evaluation
    eval_ns: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64)
    eval_trials: int = 200
    warmup_injections: int = 30  # distractors injected into the fresh state before the trials
    seed: int = 0

    @property
    def pairs(self) -> int:
        return self.num_tokens // 2

    @property
    def num_keys(self) -> int:
        return self.num_topics * self.keys_per_topic

    @property
    def stm_size(self) -> int:
        return self.stm_blocks * self.num_tokens

    @property
    def vocab_size(self) -> int:
        return 1 + self.num_keys + self.num_values  # 0 unused, keys, values


SMOKE = Settings(
    hidden=64,
    intermediate=128,
    lora_rank=4,
    selector_dim=32,
    num_tokens=8,
    stm_blocks=5,
    ltm_blocks=2,
    update_ltm_frequency=4,
    num_topics=32,
    keys_per_topic=6,
    topic_window=16,
    num_values=64,
    pretrain_steps=30,
    pretrain_batch=8,
    steps=40,
    warmup_steps=5,
    max_distance=8,
    eval_ns=(0, 1, 2, 4, 8),
    eval_trials=6,
    warmup_injections=4,
)


# ---------------------------------------------------------------------------------------------------- models
def build_config(s: Settings, kind: str) -> MPlusConfig:
    """The tiny MemoryLLM or M+ config: the same Llama, the same STM (N, K); M+ adds K0 retrieved LTM rows."""
    base = dict(
        vocab_size=s.vocab_size,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        rope_scaling=None,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        num_tokens=s.num_tokens,
        lora_config={
            "r": s.lora_rank,
            "lora_alpha": 2 * s.lora_rank,
            "lora_dropout": 0.0,  # tiny model, synthetic data: no dropout (training and evaluation compute the same)
            "target_modules": ["q_proj", "v_proj", "k_proj", "up_proj", "down_proj", "gate_proj"],
        },
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if kind == "memoryllm":
        return MPlusConfig.memoryllm_8b(num_blocks=s.stm_blocks, **base)
    return MPlusConfig.mplus_8b(
        num_blocks=s.stm_blocks + s.ltm_blocks,
        num_ltm_blocks=s.ltm_blocks,
        update_ltm_frequency=s.update_ltm_frequency,
        decay_frequency=s.decay_frequency,
        initial_rf_when_moving_stm_to_ltm=s.initial_rf,
        selector_hidden_dim=s.selector_dim,
        **base,
    )


def init_weights(model: MPlusForCausalLM, s: Settings) -> None:
    """Random init, one generator per parameter seeded from its name, so the parameters both models share get the
    same values in both: embeddings N(0, 1), matrices N(0, 1/fan_in) (o_proj, down_proj also / 2L), norms 1, LoRA B 0
    (PEFT's init), BOS and new-memory embeddings N(0, 0.02^2). (GPT-2's N(0, 0.02^2) everywhere left this d=128 model
    unable to learn even copying within the budget.) A topic's keys share a random direction: ``topic_share`` of
    each key embedding's variance, the stand-in for a pretrained model's embedding geometry, where the words of one
    subject lie near each other."""
    layers, seed = model.config.num_hidden_layers, s.seed
    with torch.no_grad():
        for name, p in model.named_parameters():
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                value = torch.ones_like(noise)
            elif ".lora_B." in name:
                value = torch.zeros_like(noise)
            elif "embed_tokens" in name:
                topics = torch.randn(s.num_topics, p.shape[1], generator=gen).repeat_interleave(s.keys_per_topic, 0)
                value = noise.clone()
                keys = slice(1, 1 + s.num_keys)
                value[keys] = math.sqrt(s.topic_share) * topics + math.sqrt(1 - s.topic_share) * noise[keys]
            elif "o_proj" in name or "down_proj" in name:
                value = noise / math.sqrt(p.shape[-1] * 2 * layers)
            elif p.dim() == 2:  # attention, MLP, LoRA A, retriever projectors, lm_head
                value = noise / math.sqrt(p.shape[-1])
            else:  # bos_embedding, new_memory_positional_emb: rows of the residual stream
                value = noise * 0.02
            p.copy_(value.to(p.dtype))


def build_model(s: Settings, kind: str) -> MPlusForCausalLM:
    """A randomly initialised model, every parameter trainable."""
    model = MPlusForCausalLM(build_config(s, kind), dtype=torch.float32, max_length=2 * s.num_tokens)
    init_weights(model, s)
    training.prepare(model)  # train mode, training ages, LoRA + projectors trainable ...
    for p in model.parameters():  # ... and, the base being tiny and untrained, everything else too
        p.requires_grad_(True)
    return model


# ------------------------------------------------------------------------------------------------------ data
class FactStream:
    """Fact chunks ``[k1 v1 ... kP vP]`` and their questions ``[prompt ; answer]``: the keys in a shuffled order,
    then the pairs in that order."""

    def __init__(self, s: Settings, seed: int) -> None:
        self.s = s
        self.gen = torch.Generator().manual_seed(seed)

    def chunk(self, exclude: torch.Tensor | None = None, pairs: int | None = None) -> torch.Tensor:
        """``[2P]`` int64 (P = ``pairs``, default K/2): P distinct keys of one topic, a topic unlike those of the
        chunks ``exclude`` (``[..., 2P']``), and P random values."""
        s = self.s
        pairs = s.pairs if pairs is None else pairs
        allowed = torch.ones(s.num_topics, dtype=torch.bool)
        if exclude is not None and exclude.numel():
            allowed[(exclude.reshape(-1, 2)[:, 0] - 1) // s.keys_per_topic] = False
        pool = allowed.nonzero().squeeze(1)
        topic = pool[int(torch.randint(0, pool.numel(), (), generator=self.gen))]
        key = 1 + topic * s.keys_per_topic + torch.randperm(s.keys_per_topic, generator=self.gen)[:pairs]
        value = 1 + s.num_keys + torch.randint(0, s.num_values, (pairs,), generator=self.gen)
        return torch.stack([key, value], 1).flatten()

    def question(self, chunk: torch.Tensor) -> torch.Tensor:
        """``[3P]``: the prompt (the chunk's P keys, shuffled), then the answer (the pairs in the prompt's order)."""
        pairs = chunk.view(-1, 2)
        pairs = pairs[torch.randperm(pairs.shape[0], generator=self.gen)]
        return torch.cat([pairs[:, 0], pairs.flatten()])


def value_accuracy(logits: torch.Tensor, question: torch.Tensor, offset: int = 0) -> float:
    """Fraction of the answer's values predicted right: with ``P`` = len(question) / 3, the value at ``P + 2i + 1``
    from the logits at its key, ``P + 2i``. ``logits [1, T, V]`` are those of ``question[offset:]``."""
    p = question.shape[0] // 3
    pred = logits[0, p - offset :: 2].argmax(-1)
    return float((pred == question[p + 1 :: 2]).float().mean())


def training_plan(s: Settings) -> dict[str, torch.Tensor]:
    """The training data, the same for both models: per step the injected chunk, the question, and the chunk asked
    about (== the step: fresh; earlier: revisit). A chunk's topic, so its keys, avoid those of the ``topic_window``
    chunks before it (longer than a row lives in the STM, or in most of M+'s long-term memory), so no question is
    ambiguous."""
    stream = FactStream(s, s.seed + 1)
    gen = torch.Generator().manual_seed(s.seed + 2)
    chunks, asked = [], []
    for step in range(s.steps):
        recent = torch.stack(chunks[-s.topic_window :]) if chunks else None
        chunks.append(stream.chunk(recent))
        frac = min(1.0, step / max(1, s.anneal * s.steps))
        p_fresh = s.fresh_start + (s.fresh_end - s.fresh_start) * frac
        d = 0
        if float(torch.rand((), generator=gen)) >= p_fresh:  # revisit: d log-uniform in [1, max_distance]
            u = float(torch.rand((), generator=gen))
            d = min(step, int(math.exp(u * math.log(s.max_distance + 1))))
        asked.append(step - d)
    chunks_t = torch.stack(chunks)
    questions = torch.stack([stream.question(chunks_t[i]) for i in asked])
    return {"chunks": chunks_t, "questions": questions, "asked": torch.tensor(asked)}


def eval_plan(s: Settings) -> dict[str, torch.Tensor]:
    """The evaluation data, the same for both models: warm-up chunks, then per trial a fact (a topic, so keys,
    unlike the warm-up's), its question and ``max(eval_ns)`` distractors (topics unlike the fact's)."""
    stream = FactStream(s, s.seed + 3)
    warm = torch.stack([stream.chunk() for _ in range(s.warmup_injections)]) if s.warmup_injections else None
    n_max = max(s.eval_ns)
    facts, questions, distractors = [], [], []
    for _ in range(s.eval_trials):
        fact = stream.chunk(warm)
        facts.append(fact)
        questions.append(stream.question(fact))
        distractors.append(torch.stack([stream.chunk(fact) for _ in range(n_max)]))
    return {
        "warmup": warm if warm is not None else torch.zeros(0, s.num_tokens, dtype=torch.long),
        "facts": torch.stack(facts),
        "questions": torch.stack(questions),
        "distractors": torch.stack(distractors),
    }


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# -------------------------------------------------------------------------------------------------- training
def pretrain_base(model: MPlusForCausalLM, s: Settings) -> dict:
    """Stage 0, the stand-in for a pretrained base: the Llama alone (adapters off; ``memory=None`` is plain causal
    attention), batched, learns in-context recall on ``[fact ; question]`` (loss on the answer's values), with
    p ~ U{1..P} pairs per batch (a curriculum: with P pairs only, recall formed late and at a seed-dependent step).
    Accuracy is logged on the batches of P pairs."""
    params = [p for n, p in model.named_parameters() if ".lora_" not in n]  # the adapters are off here
    opt = torch.optim.AdamW(params, lr=s.pretrain_lr)
    stream = FactStream(s, s.seed + 4)
    gen = torch.Generator().manual_seed(s.seed + 5)
    start, curve, accs, losses = time.perf_counter(), [], [], []
    log_every = max(1, s.pretrain_steps // 20)
    model.train()
    bar = tqdm(range(s.pretrain_steps), desc="pretrain base", unit="step", leave=False)
    for step in bar:
        pairs = int(torch.randint(1, s.pairs + 1, (), generator=gen))
        facts = [stream.chunk(pairs=pairs) for _ in range(s.pretrain_batch)]
        ids = torch.stack([torch.cat([f, stream.question(f)]) for f in facts])  # [B, 5p]: fact, prompt, answer
        answer = 3 * pairs
        cos, sin = model.rope_cos[: ids.shape[1]], model.rope_sin[: ids.shape[1]]
        pos = (torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None])
        with model.adapters.use(None):
            h = model.model.embed_tokens(ids)
            for layer in model.layers:
                h = layer(h, pos, None, None)
            logits = model.lm_head(model.model.norm(h[:, answer::2])).float()  # at the answer's keys
        values = ids[:, answer + 1 :: 2]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), values.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if pairs == s.pairs:
            accs.append(float((logits.detach().argmax(-1) == values).float().mean()))
        if (step + 1) % log_every == 0 or step + 1 == s.pretrain_steps:
            curve.append({"step": step + 1, "loss": _mean(losses), "acc": _mean(accs)})
            bar.set_postfix(loss=f"{curve[-1]['loss']:.3f}", acc=f"{curve[-1]['acc'] or 0:.2f}")
            losses, accs = [], []
    bar.close()
    return {"steps": s.pretrain_steps, "batch": s.pretrain_batch, "time_s": time.perf_counter() - start, "curve": curve}


def train(model: MPlusForCausalLM, s: Settings, plan: dict[str, torch.Tensor], kind: str) -> dict:
    """Stage 1 on ``plan`` with :func:`mplus.training.training_step`; returns the record (time, logged curve)."""
    opt = torch.optim.AdamW(training.param_groups(model, s.lr, s.selector_lr, s.weight_decay))
    total = s.steps

    def schedule(step: int) -> float:  # linear warm-up, cosine decay to 10 %
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        progress = (step - s.warmup_steps) / max(1, total - s.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    memory = model.new_memory(seed=s.seed + 10)  # the training state (training ages, from prepare)
    params = [p for p in model.parameters() if p.requires_grad]
    chunks, questions, asked = plan["chunks"], plan["questions"], plan["asked"].tolist()
    last_ask = {}  # chunk -> the last step asking about it
    for step, doc in enumerate(asked):
        last_ask[doc] = step
    tracked: dict[int, torch.Tensor] = {}  # chunk -> where its rows sit in the STM [L, N] (asked about later)
    log_every = max(1, total // 40)
    window: dict[str, list[float]] = {"loss": [], "lm_loss": [], "retriever_loss": [], "fresh": [], "revisit": []}
    curve, start = [], time.perf_counter()
    model.train()
    bar = tqdm(range(total), desc=f"train {kind}", unit="step", leave=False)
    for step in bar:
        tgt, doc = questions[step][None], asked[step]
        out = training.training_step(
            model, chunks[step][None], tgt, memory=memory, document=tracked.get(doc), prompt_length=s.pairs
        )  # the prompt (the keys) retrieves, as in the evaluation's prefill
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        lr_sched.step()
        # follow the tracked chunks through this step's drops (for the one asked about, that is out.positives)
        (victims,) = out.victims
        for i in list(tracked):
            if last_ask[i] <= step:
                del tracked[i]
            else:
                tracked[i] = training.track_document(tracked[i], victims, new=False)
        if last_ask.get(step, -1) > step:
            fresh_rows = torch.zeros_like(out.positives)
            tracked[step] = out.positives if doc == step else training.track_document(fresh_rows, victims, new=True)
        window["loss"].append(float(out.loss.detach()))
        window["lm_loss"].append(float(out.lm_loss.detach()))
        if out.retriever_loss is not None:  # the decoder retriever's BCE (M+)
            window["retriever_loss"].append(float(out.retriever_loss.detach()))
        window["fresh" if doc == step else "revisit"].append(value_accuracy(out.logits.detach(), tgt[0]))
        if (step + 1) % log_every == 0 or step + 1 == total:
            names = {"fresh": "fresh_acc", "revisit": "revisit_acc"}
            curve.append({"step": step + 1, **{names.get(k, k): _mean(v) for k, v in window.items()}})
            bar.set_postfix(loss=f"{curve[-1]['loss']:.3f}", fresh=f"{curve[-1]['fresh_acc'] or 0:.2f}")
            window = {k: [] for k in window}
    bar.close()
    model.eval()
    return {"steps": total, "time_s": time.perf_counter() - start, "curve": curve}


# ------------------------------------------------------------------------------------------------ evaluation
def _rows_in(rows: torch.Tensor, fact_rows: torch.Tensor) -> torch.Tensor:
    """``[R]`` bool: which of ``rows [R, d]`` are (bit for bit) one of ``fact_rows [K, d]``."""
    if rows.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool)
    return (rows[:, None, :] == fact_rows[None]).all(-1).any(-1)


@torch.no_grad()
def evaluate(model: MPlusForCausalLM, s: Settings, plan: dict[str, torch.Tensor], kind: str) -> dict:
    """Recall accuracy after n distractor injections, through ``inject`` and ``forward`` on fresh memory states; also
    where the fact's rows are (STM; M+: LTM + cache, and how many of them the prefill retrieved)."""
    model.eval()
    warm = model.new_memory(seed=s.seed + 20)  # a copy of the model's default state, which training never wrote
    for chunk in plan["warmup"]:
        model.inject(chunk[None], memory=warm)
    ns, n_max, k, p = list(s.eval_ns), max(s.eval_ns), s.num_tokens, s.pairs
    acc = {n: [] for n in ns}
    where = {n: {"in_stm": [], "in_ltm": [], "retrieved": []} for n in ns}
    start = time.perf_counter()
    for trial in tqdm(range(s.eval_trials), desc=f"eval {kind}", unit="trial", leave=False):
        state = model.new_memory(warm, seed=s.seed + 1000 + trial)
        question = plan["questions"][trial]
        delta = model.inject(plan["facts"][trial][None], memory=state)  # [L, K, d]: the fact's rows
        for n in range(n_max + 1):
            if n in acc:
                # prefill = the prompt, the keys (retrieval happens here), then the answer teacher-forced
                out = model(question[None, :p], memory=state)
                logits = model(question[None, p:], past_key_values=out.past_key_values).logits
                acc[n].append(value_accuracy(logits, question, offset=p))
                stm = state.stm.logical("hidden")
                in_stm = sum(int(_rows_in(stm[i], delta[i]).sum()) for i in range(s.layers))
                where[n]["in_stm"].append(in_stm / (s.layers * k))
                if state.ltm is not None:
                    ltm, in_ltm, got = state.ltm, 0, 0
                    for i in range(s.layers):
                        pool = torch.cat([ltm.hidden[i][: ltm.size[i]], ltm.cache_hidden[i, : ltm.cache_len]])
                        mask = _rows_in(pool, delta[i])
                        in_ltm += int(mask.sum())
                        got += int(mask[out.past_key_values.retrieved[i].long()].sum())
                    where[n]["in_ltm"].append(in_ltm / (s.layers * k))
                    where[n]["retrieved"].append(got / (s.layers * k))
            if n < n_max:
                model.inject(plan["distractors"][trial, n][None], memory=state)
    rows = []
    for n in ns:
        a = acc[n]
        mean = sum(a) / len(a)
        sd = math.sqrt(sum((x - mean) ** 2 for x in a) / max(1, len(a) - 1))
        row = {"n": n, "accuracy": mean, "stderr": sd / math.sqrt(len(a)), "questions": len(a)}
        row["values_scored"] = len(a) * s.pairs
        row["fact_rows_in_stm"] = _mean(where[n]["in_stm"])
        if where[n]["in_ltm"]:
            row["fact_rows_in_ltm"] = _mean(where[n]["in_ltm"])
            row["fact_rows_retrieved"] = _mean(where[n]["retrieved"])
        rows.append(row)
    return {"time_s": time.perf_counter() - start, "per_n": rows}


# ------------------------------------------------------------------------------------------------ reporting
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns, theory = result["eval"]["ns"], result["theory"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for kind, style in zip(MODELS, ("o-", "s-")):
        rows = result["eval"][kind]["per_n"]
        err = [1.96 * r["stderr"] for r in rows]
        ax.errorbar(ns, [r["accuracy"] for r in rows], yerr=err, fmt=style, capsize=3, label=LABELS[kind])
    rows = result["eval"]["mplus"]["per_n"]
    ax.plot(ns, [r["fact_rows_retrieved"] for r in rows], "s:", color="C1", alpha=0.6, ms=4,
            label="M+: fraction of the fact's rows retrieved")  # fmt: skip
    dense = list(range(0, max(ns) + 1))
    q = 1 - theory["K"] / theory["N"]
    ax.plot(dense, [q**n for n in dense], "k--", lw=1, label=f"(1 - K/N)^n = {q:g}^n (one STM row survives)")
    ax.axhline(result["data"]["chance"], color="grey", ls=":", lw=1, label="chance")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(-0.15, max(ns) * 1.15)
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("injections between the fact and its question (n)")
    ax.set_ylabel("recall accuracy (value tokens)")
    s = result["settings"]
    ax.set_title(
        f"Retention: N={theory['N']}, K={theory['K']}, K0={result['config']['mplus']['num_ltm_tokens']}; "
        f"{s['layers']} layers, d={s['hidden']}; {s['steps']} training steps" + (" (smoke)" if result["smoke"] else ""),
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="center left")  # the empty area: few injections, between the curves
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(result: dict) -> str:
    """The numbers in one line per model (the claims are for the reader, from the JSON)."""
    lines = []
    for kind in MODELS:
        rows = result["eval"][kind]["per_n"]
        accs = ", ".join(f"n={r['n']}: {r['accuracy']:.3f}" for r in rows)
        lines.append(f"{LABELS[kind]}: {accs}")
    lines.append("(1-K/N)^n: " + ", ".join(f"{v:.3f}" for v in result["theory"]["memoryllm_survival"]))
    return "\n".join(lines)


def _machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def _config_record(model: MPlusForCausalLM) -> dict:
    cfg = model.config
    rec = {
        "stm_size": cfg.stm_size,
        "num_tokens": cfg.num_tokens,
        "num_ltm_tokens": cfg.num_ltm_tokens,
        "num_blocks": cfg.num_blocks,
        "num_ltm_blocks": cfg.num_ltm_blocks,
        "has_ltm": cfg.has_ltm,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if cfg.has_ltm:
        rec["update_ltm_frequency"] = cfg.update_ltm_frequency
        rec["decay_frequency"] = cfg.decay_frequency
        rec["initial_rf_when_moving_stm_to_ltm"] = cfg.initial_rf_when_moving_stm_to_ltm
        rec["selector_hidden_dim"] = cfg.selector_hidden_dim
        rec["ltm_eviction"] = (
            f"a merged batch is evicted at its {cfg.initial_rf_when_moving_stm_to_ltm / cfg.decay_frequency:g}th merge,"
            f" >= {int((cfg.initial_rf_when_moving_stm_to_ltm / cfg.decay_frequency - 1) * cfg.update_ltm_frequency)}"
            " injections after its rows were dropped: nothing of a fact is evicted within the tested n"
        )
    return rec


def run(s: Settings, out_dir: Path, *, smoke: bool = False) -> dict:
    """Pretrain the base, train and evaluate both models, write ``retention.json`` and ``retention.png``."""
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)  # everything draws from its own generator; seeded in case anything does not
    train_data, test_data = training_plan(s), eval_plan(s)
    q = 1 - s.num_tokens / s.stm_size
    result: dict = {
        "experiment": "retention",
        "smoke": smoke,
        "settings": {**dataclasses.asdict(s), "eval_ns": list(s.eval_ns)},
        "machine": _machine(),
        "data": {
            "fact": f"[k1 v1 ... k{s.pairs} v{s.pairs}]: {s.pairs} distinct keys of one topic ({s.num_topics} "
            f"topics of {s.keys_per_topic} keys, embeddings initialised with a shared direction per topic: "
            f"{s.topic_share:g} of the variance), random values ({s.num_tokens} tokens = one injection)",
            "question": f"[prompt ; answer]: the fact's {s.pairs} keys shuffled, then the pairs in that order; scored: "
            "argmax at each answer key vs the value after it",
            "pairs_per_fact": s.pairs,
            "vocab_size": s.vocab_size,
            "chance": 1 / s.num_values,
            "revisit_fraction": float((train_data["asked"] != torch.arange(s.steps)).float().mean()),
        },
        "protocol": {
            "training": "stage 0: in-context pretraining of the base (adapters off, no memory, batched, curriculum "
            "over the number of pairs); stage 1: mplus.training.training_step(prompt_length=P), fresh + revisit steps "
            "(document= tracked rows)",
            "trainable": "all parameters (Llama weights, both LoRA adapters, retriever projectors, bos_embedding, "
            "new_memory_positional_emb); stage 0 trains the base weights only",
            "evaluation": "model.new_memory(seed) warmed with distractors; inject(fact); n distractor injects; prefill "
            "with the prompt (the keys: M+ retrieves here, the values never reach the retriever), then the answer "
            "through the cache, teacher-forced; memory ages: training mode (as in training)",
            "fact_rows_*": "fraction of the fact's K rows per layer found (bit for bit) in the STM, in the LTM + "
            "dropped-row cache, and among the K0 rows the prefill retrieved (averaged over layers and trials)",
        },
        "seeds": {
            "weights": s.seed,
            "training_data": s.seed + 1,
            "curriculum": s.seed + 2,
            "eval_data": s.seed + 3,
            "pretrain_data": [s.seed + 4, s.seed + 5],
            "training_memory_drops": s.seed + 10,
            "eval_warmup_drops": s.seed + 20,
            "eval_trial_drops": f"{s.seed + 1000} + trial",
        },
        "theory": {
            "N": s.stm_size,
            "K": s.num_tokens,
            "ns": list(s.eval_ns),
            "memoryllm_survival": [q**n for n in s.eval_ns],
            "what": "(1 - K/N)^n: the probability that one STM row survives n injections (K of N dropped uniformly)",
        },
        "config": {},
        "training": {},
        "eval": {"ns": list(s.eval_ns), "trials": s.eval_trials, "warmup_injections": s.warmup_injections},
    }
    base = build_model(s, "memoryllm")
    result["pretrain"] = pretrain_base(base, s)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    del base
    for kind in MODELS:
        model = build_model(s, kind)
        missing, unexpected = model.load_state_dict(base_state, strict=False)
        if unexpected or any("_proj." not in name for name in missing):  # M+ adds only the retriever projectors
            raise RuntimeError(f"retention: base weights do not fit {kind}: missing {missing}, unexpected {unexpected}")
        result["config"][kind] = _config_record(model)
        result["training"][kind] = train(model, s, train_data, kind)
        result["eval"][kind] = evaluate(model, s, test_data, kind)
        del model
    result["summary"] = summarize(result)
    result["wall_time_s"] = time.perf_counter() - t0
    (out_dir / "retention.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out_dir / "retention.png")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Retention experiment: MemoryLLM vs M+ recall after n injections")
    parser.add_argument("--smoke", action="store_true", help="the whole pipeline at a tiny size (< 1 minute)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="output folder (default: docs/)")
    parser.add_argument("--steps", type=int, default=None, help="override the number of memory-training steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see the module docstring)")
    parser.add_argument("--plot", type=Path, default=None, metavar="JSON",
                        help="only redraw the PNG (beside JSON) from a run's retention.json")  # fmt: skip
    args = parser.parse_args(argv)
    if args.plot is not None:
        result = json.loads(args.plot.read_text())
        plot(result, args.plot.with_suffix(".png"))
        print(result["summary"])
        return result
    torch.set_num_threads(args.threads)
    s = SMOKE if args.smoke else Settings()
    if args.steps is not None:
        s = dataclasses.replace(s, steps=args.steps)
    result = run(s, args.out, smoke=args.smoke)
    print(result["summary"])
    print(f"wrote {args.out / 'retention.json'} and {args.out / 'retention.png'} in {result['wall_time_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
