"""The exploration notebook runs top to bottom against a small warehouse written
with the real table schemas (polars, DuckDB and Spark cells alike)."""

import json
from pathlib import Path

from siren_batch import schemas
from siren_batch.warehouse import append_run, RunRecord, write_table

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "explore_tables.ipynb"


def _warehouse(spark, cfg):
    rating = lambda u, i, r, err, day: (u, i, r, r, r, [0.1, 0.1, 0.2, 0.3, 0.3] if r else None, 300, 1,
                                        "smollm2", None, "abc", "run1", err, None, None, None, day)
    write_table(spark.createDataFrame([rating("u1", "i1", 3.8, None, "2026-01-01"),
                                       rating("u1", "i1", 4.1, None, "2026-01-02"),
                                       rating("u2", "i9", None, "unknown_item", "2026-01-02")],
                                      schemas.RATINGS), cfg, "ratings", schemas.RATINGS, partition_by=["run_date"])
    write_table(spark.createDataFrame([("e1", "test", "llm:smollm2", "all", "mae", 0.9, 2),
                                       ("e1", "test", "baseline:bias", "all", "rmse", 1.0, 2)],
                                      schemas.METRICS), cfg, "metrics", schemas.METRICS)
    liked = [(0, "space opera", 3, 4.5)]
    write_table(spark.createDataFrame([("u1", 10, 3, liked, liked, [], [], 4.0)], schemas.SKETCHES),
                cfg, "sketches", schemas.SKETCHES)
    append_run(spark, cfg, RunRecord(stage="score", input_rows=3, output_rows=3))


def test_notebook_runs(spark, cfg, monkeypatch):
    _warehouse(spark, cfg)
    monkeypatch.setenv("WAREHOUSE", cfg.warehouse)
    monkeypatch.setenv("DATASET", cfg.dataset)
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    scope: dict = {}
    for cell in cells:
        exec(compile("".join(cell["source"]), str(NOTEBOOK), "exec"), scope)
    assert str(scope["latest"]) == "2026-01-02"  # polars reads the hive key as a date
    assert scope["scored"].collect().height == 2
