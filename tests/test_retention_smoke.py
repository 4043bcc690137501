"""Issue 12, item 4: the retention experiment's pipeline (benchmarks/retention.py) end to end at its smoke size:
base pretraining, memory training of both models with the training step, evaluation through inject/forward, the
JSON and the PNG. (The full run is a benchmark, never run by the tests.)"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import retention  # noqa: E402


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
