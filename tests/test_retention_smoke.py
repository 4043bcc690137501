"""Issue 12, item 4: the retention experiment's pipeline (experiments/retention.py) end to end at its smoke size:
base pretraining, memory training of both models with the training step, evaluation through inject/forward, the
JSON and the PNG. (The full run is an experiment, never run by the tests.)"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))  # a script, not a package

import retention  # noqa: E402
import torch  # noqa: E402


def test_the_smoke_run_writes_a_sane_json_and_a_plot(tmp_path):
    result = retention.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "retention.json").read_text())
    assert data["smoke"] is True and data["summary"]
    png = (tmp_path / "retention.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    theory = data["theory"]
    k, n = theory["K"], theory["N"]
    assert theory["ns"] == list(retention.SMOKE.eval_ns) == data["eval"]["ns"]
    assert theory["memoryllm_survival"] == [(1 - k / n) ** x for x in theory["ns"]]
    for kind in retention.MODELS:
        per_n = data["eval"][kind]["per_n"]
        assert [r["n"] for r in per_n] == theory["ns"]
        for r in per_n:
            assert 0.0 <= r["accuracy"] <= 1.0 and r["questions"] == retention.SMOKE.eval_trials
            assert 0.0 <= r["fact_rows_in_stm"] <= 1.0
        # no drop before the first distractor; then the fact's rows leave the STM
        assert per_n[0]["fact_rows_in_stm"] == 1.0 and per_n[-1]["fact_rows_in_stm"] < 1.0
        curve = data["training"][kind]["curve"]
        assert curve and all(math.isfinite(x["loss"]) for x in curve)
    mplus = data["eval"]["mplus"]["per_n"]
    assert all(abs(r["fact_rows_in_stm"] + r["fact_rows_in_ltm"] - 1.0) < 1e-9 for r in mplus)  # dropped rows kept
    assert result["settings"] == data["settings"]
    png_path = tmp_path / "retention.png"
    png_path.unlink()
    redrawn = retention.main(["--plot", str(tmp_path / "retention.json")])  # the PNG, redrawn from the JSON alone
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and redrawn["summary"] == data["summary"]


def test_facts_are_pairs_of_one_topic_and_questions_ask_all_of_them():
    s = retention.SMOKE
    stream = retention.FactStream(s, seed=0)
    earlier = torch.stack([stream.chunk() for _ in range(s.num_topics - 1)])
    topics = lambda chunk: set(((chunk.reshape(-1, 2)[:, 0] - 1) // s.keys_per_topic).tolist())  # noqa: E731
    for _ in range(20):
        fact = stream.chunk(earlier)
        keys, values = fact.view(-1, 2).unbind(1)
        assert fact.shape == (s.num_tokens,) and len(set(keys.tolist())) == s.pairs
        assert len(topics(fact)) == 1 and not topics(fact) & topics(earlier)  # the one topic left free
        assert bool((values > s.num_keys).all()) and bool((values <= s.num_keys + s.num_values).all())
        question = stream.question(fact)
        prompt, answer = question[: s.pairs], question[s.pairs :].view(-1, 2)
        assert prompt.tolist() == answer[:, 0].tolist() and sorted(prompt.tolist()) == sorted(keys.tolist())
        assert dict(answer.tolist()) == dict(fact.view(-1, 2).tolist())
