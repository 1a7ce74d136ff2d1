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
    """eval_ids as evaluate writes them (`<run_date>-<run_id>`, dashes in both), the newer
    evaluation's rows first: its numbers and its id, never a mix of the two."""
    old, new = "20260101T000000-aaaaaa", "20260102T000000-bbbbbb"
    e1, e2 = f"2026-01-01-{old}", f"2026-01-01-{new}"
    metrics = pd.DataFrame(_metrics(e2, "llm:a", 0.9, 1.1, 1.4) + _metrics(e1, "llm:a", 1.0, 1.2, 1.5)
                           + _metrics(e1, "llm:a/median", 0.8, 1.3) + _metrics(e1, "baseline:bias", 0.85, 1.05),
                           columns=["eval_id", "split", "system", "segment", "metric", "value", "n"])
    out = newest_by_system(metrics, "test")
    assert out["llm:a"] == {"readout": "mean", "mae": 0.9, "rmse": 1.1, "nll": 1.4, "coverage": None, "n": 10,
                            "eval_id": e2}
    assert out["llm:a/median"]["readout"] == "median" and out["baseline:bias"]["nll"] is None
    meta = parse_meta(["llm:a=training_examples:0,device:cpu"])
    assert meta == {"llm:a": {"training_examples": 0, "device": "cpu"}}
    text = markdown({"ml-100k": {s: {**r, **meta.get(s, {})} for s, r in out.items()}})
    rows = [line for line in text.splitlines() if line.startswith("| llm") or line.startswith("| baseline")]
    assert rows[0].startswith("| baseline:bias") and "| 0 | cpu |" in rows[1]     # sorted by RMSE


def test_the_nightly_jobs_evaluations_are_left_out():
    """The nightly job writes eval_id nightly-<date> rows (served pairs) into the same table."""
    metrics = pd.DataFrame(_metrics("2026-01-01-20260101T000000-aaaaaa", "llm:a", 1.0, 1.2)
                           + _metrics("nightly-2026-01-05", "llm:a", 0.5, 0.6),
                           columns=["eval_id", "split", "system", "segment", "metric", "value", "n"])
    out = newest_by_system(metrics, "test")
    assert out["llm:a"]["mae"] == 1.0 and out["llm:a"]["eval_id"] == "2026-01-01-20260101T000000-aaaaaa"
    assert newest_by_system(metrics[metrics["eval_id"].str.startswith("nightly")], "test") == {}


def test_meta_can_be_scoped_to_a_dataset():
    meta = parse_meta(["sys=training_examples:943,device:cpu", "siren-movies::sys=training_examples:600"])
    assert meta_for(meta, "ml-100k", "sys") == {"training_examples": 943, "device": "cpu"}
    assert meta_for(meta, "siren-movies", "sys") == {"training_examples": 600, "device": "cpu"}


def test_merge_keeps_what_the_warehouse_no_longer_holds(tmp_path, monkeypatch):
    import json

    from siren_batch import accuracy, profiling

    monkeypatch.setattr(profiling, "RESULTS_DIR", tmp_path / "results")
    columns = ["eval_id", "split", "system", "segment", "metric", "value", "n"]
    e1, e2 = "2026-01-01-20260101T000000-aaaaaa", "2026-01-01-20260102T000000-bbbbbb"
    for dataset, rows in (("ml-100k", _metrics(e1, "llm:a", 1.0, 1.2) + _metrics(e1, "baseline:bias", 0.8, 1.0)),
                          ("movies", _metrics(e1, "llm:b", 0.7, 1.1))):
        (tmp_path / "wh" / dataset / "metrics").mkdir(parents=True)
        pd.DataFrame(rows, columns=columns).to_parquet(tmp_path / "wh" / dataset / "metrics" / "part.parquet")
    wh = ["--warehouse", str(tmp_path / "wh")]
    assert accuracy.main([*wh, "--dataset", "ml-100k", "--dataset", "movies"]) == 0
    # ml-100k's warehouse is gone; a new evaluation of movies is read with --merge
    (tmp_path / "wh" / "ml-100k" / "metrics" / "part.parquet").unlink()
    pd.DataFrame(_metrics(e2, "llm:b", 0.6, 1.0), columns=columns).to_parquet(
        tmp_path / "wh" / "movies" / "metrics" / "part.parquet")
    assert accuracy.main([*wh, "--dataset", "movies", "--merge"]) == 0
    datasets = json.loads((tmp_path / "results" / "accuracy.json").read_text())["datasets"]
    assert set(datasets["ml-100k"]) == {"llm:a", "baseline:bias"} and datasets["ml-100k"]["llm:a"]["mae"] == 1.0
    assert datasets["movies"]["llm:b"]["mae"] == 0.6 and datasets["movies"]["llm:b"]["eval_id"] == e2
    assert accuracy.main([*wh, "--dataset", "movies"]) == 0               # without --merge: what is read now
    assert set(json.loads((tmp_path / "results" / "accuracy.json").read_text())["datasets"]) == {"movies"}
    # --drop leaves out what is read now under a prefix (an unnamed evaluation's llm:<model>)
    assert accuracy.main([*wh, "--dataset", "movies", "--drop", "llm:"]) == 0
    assert "llm:b" not in json.loads((tmp_path / "results" / "accuracy.json").read_text())["datasets"]["movies"]
