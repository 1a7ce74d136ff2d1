"""bench_overhead at a tiny size: the real score stage on 300 candidate pairs, the backend
alone on the same prompts, the breakdown of the stage's time, and a run SIGKILLed just
before committing its second chunk, started again (issue 10, "Scale and faults")."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from siren_batch import bench_overhead, profiling

# A benchmark harness end to end (~3 min on 2 busy cores): `make test-bench`, not `make test`;
# score resume and reconciliation are in every run through test_pipeline and test_driver_kill.
pytestmark = [pytest.mark.integration, pytest.mark.bench]

USERS, ITEMS, RATED, PER_USER = 20, 40, 12, 15


def _source(folder: Path) -> list[str]:
    """20 users x 12 of 40 films, so each has 28 unrated films to be candidates."""
    folder.mkdir(parents=True)
    genres = ["Drama|Romance", "Horror|Thriller", "Comedy", "Sci-Fi|Action"]
    (folder / "items.csv").write_text("item_id,title,genres\n" + "\n".join(
        f"i{i},Film {i} about {genres[i % 4].split('|')[0].lower()},{genres[i % 4]}" for i in range(ITEMS)) + "\n")
    rows = [f"u{u},i{(3 * u + k) % ITEMS},{(u * 3 + k * (u % 3 + 1)) % 5 + 1},{1000 + 100 * u + k}"
            for u in range(USERS) for k in range(RATED)]
    (folder / "inter.csv").write_text("user_id,item_id,rating,ts\n" + "\n".join(rows) + "\n")
    return [f"data.path={folder / 'inter.csv'}", f"data.items_path={folder / 'items.csv'}", "data.format=csv",
            "data.source=table", "data.kcore=0", "dataset=overhead-tiny"]


def test_tiny_run_reconciles_and_survives_a_kill(spark, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(profiling, "RESULTS_DIR", tmp_path / "results")
    caplog.set_level(logging.INFO, logger="siren_batch.ratings")
    pairs = USERS * PER_USER
    args = ["--pairs", str(pairs), "--per-user", str(PER_USER), "--work", str(tmp_path / "work"),
            "--kill", "hook", "--name", "tiny", *_source(tmp_path / "in"),
            "spark.master=local[2]", "spark.shuffle_partitions=4", "topics.k=3", "topics.name_top_m=4",
            "score.dtype=float32", "score.chunk_rows=150"]
    assert bench_overhead.main(args) == 0
    out = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert "Overhead per pair" in (tmp_path / "results" / "tiny.md").read_text()

    # The uninterrupted run: every candidate once, scored.
    assert out["ratings"] == {"rows": pairs, "distinct_pairs": pairs, "missing": 0, "extra": 0, "errors": 0}
    f = out["figures"]
    assert f["pairs"] == pairs and out["backend_alone"]["pairs"] == pairs == out["prompts_stored"]
    assert out["stage_summary"]["prompt_tokens"] > 100 * pairs   # counted by the backend, not while rendering
    assert 0 < f["backend_alone_s"] < f["stage_s"] * f["task_slots"]

    # The breakdown sums to the stage's wall time; what was measured fits inside it.
    parts = f["breakdown_s"]
    measured = {k: v for k, v in parts.items() if k not in ("spark_in_chunk_jobs", "driver_other")}
    assert abs(sum(parts.values()) - f["stage_s"]) < 0.2
    assert sum(measured.values()) <= f["stage_s"]
    assert parts["spark_in_chunk_jobs"] >= 0 and parts["driver_other"] >= 0
    for key in ("candidate_join", "arrow_and_jvm_input", "prompt_rendering",
                "backend_tokenize", "backend_model", "output_frame", "chunk_commits", "finish"):
        assert measured[key] > 0, f"{key} was not timed"
    task_s = out["stage_summary"]["timings"]["task_s"]
    assert task_s["render"] > 0 and task_s["score_input"] > 0

    # Killed before committing chunk 2 of 2, started again: each pair once, same ratings.
    kill = out["kill_restart"]
    assert kill["chunks"] == 2 and kill["committed_at_kill"] == 1
    assert kill["restart_rows"] == pairs
    assert kill["ratings"] == {"rows": pairs, "distinct_pairs": pairs, "missing": 0, "extra": 0, "errors": 0,
                               "same_pairs_as_reference": pairs, "max_rating_diff_vs_reference": 0.0}
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resume:")]
    assert skipped == ["resume: chunk=00000 already committed, skipping"]   # kept, not scored again


def test_measured_run_can_be_the_killed_one(spark, tmp_path, monkeypatch):
    """--measure-killed: one run, killed before committing chunk 2 of 2 and started again, is
    both the measurement (time to the kill + the restart; the restart's breakdown) and the
    reconciliation check."""
    monkeypatch.setattr(profiling, "RESULTS_DIR", tmp_path / "results")
    pairs = USERS * PER_USER
    args = ["--pairs", str(pairs), "--per-user", str(PER_USER), "--work", str(tmp_path / "work"),
            "--kill", "hook", "--measure-killed", "--name", "tiny", *_source(tmp_path / "in"),
            "spark.master=local[2]", "spark.shuffle_partitions=4", "topics.k=3", "topics.name_top_m=4",
            "score.dtype=float32", "score.chunk_rows=150"]
    assert bench_overhead.main(args) == 0
    out = json.loads((tmp_path / "results" / "tiny.json").read_text())
    kill, f = out["kill_restart"], out["figures"]
    assert kill["chunks"] == 2 and kill["committed_at_kill"] == 1 and 0 < kill["rows_committed_at_kill"] < pairs
    assert out["ratings"] == kill["ratings"] == {"rows": pairs, "distinct_pairs": pairs, "missing": 0, "extra": 0,
                                                 "errors": 0}
    assert f["stage_s"] == pytest.approx(kill["killed_after_s"] + kill["restart_s"], abs=0.2)
    assert f["breakdown_of"]["pairs"] == pairs - kill["rows_committed_at_kill"]
    assert abs(sum(f["breakdown_s"].values()) - f["breakdown_of"]["seconds"]) < 0.2
    assert "the time to the kill plus the restart" in (tmp_path / "results" / "tiny.md").read_text()
