"""The accuracy summary: newest evaluation per system, readouts, meta, Markdown."""

from __future__ import annotations

import pandas as pd

from siren_batch.accuracy import markdown, meta_for, newest_by_system, parse_meta


def _metrics(eval_id, system, mae, rmse, nll=None):
    rows = [(eval_id, "test", system, "all", "mae", mae, 10), (eval_id, "test", system, "all", "rmse", rmse, 10),
            (eval_id, "test", system, "history:<5", "mae", 9.0, 2), (eval_id, "valid", system, "all", "mae", 7.0, 10)]
    if nll is not None:
        rows.append((eval_id, "test", system, "all", "nll", nll, 10))
    return rows


def test_newest_evaluation_wins_and_readouts_are_named():
    metrics = pd.DataFrame(_metrics("d-r1", "llm:a", 1.0, 1.2, 1.5) + _metrics("d-r2", "llm:a", 0.9, 1.1, 1.4)
                           + _metrics("d-r1", "llm:a/median", 0.8, 1.3) + _metrics("d-r1", "baseline:bias", 0.85, 1.05),
                           columns=["eval_id", "split", "system", "segment", "metric", "value", "n"])
    runs = pd.DataFrame({"run_id": ["r1", "r2"], "started_at": ["2026-01-01T00:00", "2026-01-02T00:00"]})
    out = newest_by_system(metrics, runs, "test")
    assert out["llm:a"] == {"readout": "mean", "mae": 0.9, "rmse": 1.1, "nll": 1.4, "coverage": None, "n": 10,
                            "eval_id": "d-r2"}
    assert out["llm:a/median"]["readout"] == "median" and out["baseline:bias"]["nll"] is None
    meta = parse_meta(["llm:a=training_examples:0,device:cpu"])
    assert meta == {"llm:a": {"training_examples": 0, "device": "cpu"}}
    text = markdown({"ml-100k": {s: {**r, **meta.get(s, {})} for s, r in out.items()}})
    rows = [line for line in text.splitlines() if line.startswith("| llm") or line.startswith("| baseline")]
    assert rows[0].startswith("| baseline:bias") and "| 0 | cpu |" in rows[1]     # sorted by RMSE


def test_meta_can_be_scoped_to_a_dataset():
    meta = parse_meta(["sys=training_examples:943,device:cpu", "siren-movies::sys=training_examples:600"])
    assert meta_for(meta, "ml-100k", "sys") == {"training_examples": 943, "device": "cpu"}
    assert meta_for(meta, "siren-movies", "sys") == {"training_examples": 600, "device": "cpu"}
