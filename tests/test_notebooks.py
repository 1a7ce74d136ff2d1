"""explore_ratings.ipynb and topics.ipynb run top to bottom, cell by cell, against
the report tests' warehouse (the MovieLens-100K chain plus a ratings partition
and metrics), and are stored without outputs and without logic of their own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from siren_batch import explore
from test_report import RUN_DATE, USERS, scored_warehouse

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _cells(name: str) -> list[dict]:
    return json.loads((NOTEBOOKS / name).read_text())["cells"]


def run_notebook(name: str, cfg, monkeypatch) -> dict:
    monkeypatch.setenv("WAREHOUSE", cfg.warehouse)
    monkeypatch.setenv("DATASET", cfg.dataset)
    scope: dict = {}
    for k, cell in enumerate(c for c in _cells(name) if c["cell_type"] == "code"):
        exec(compile("".join(cell["source"]), f"{name}[{k}]", "exec"), scope)
    return scope


@pytest.fixture(scope="module")
def warehouse(spark, ml100k, tmp_path_factory):
    return scored_warehouse(spark, ml100k, tmp_path_factory)


@pytest.mark.parametrize("name", ["explore_ratings.ipynb", "topics.ipynb"])
def test_stored_without_outputs_or_logic(name):
    notebook = json.loads((NOTEBOOKS / name).read_text())
    assert notebook["nbformat"] == 4
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    source = "\n".join("".join(c["source"]) for c in code)
    for construct in ("def ", "lambda", "for ", "class ", "import polars"):   # calls and displays only
        assert construct not in source, construct


def test_explore_ratings_notebook(warehouse, monkeypatch):
    scope = run_notebook("explore_ratings.ipynb", warehouse, monkeypatch)
    assert {"ratings", "metrics", "sketches", "topics", "runs"} <= set(scope["present"])
    assert scope["run_date"] == RUN_DATE
    assert scope["eval_id"].startswith(f"{RUN_DATE}-") and "llm:test-model" in scope["metrics"]["system"]
    assert scope["pairs"].height == USERS and scope["counts"]["scored"] == USERS
    assert scope["sketch"]["user_id"] == scope["user_id"]
    top = scope["top"]
    assert set(top["user_id"]) == {scope["user_id"]} and top["rating"].is_sorted(descending=True)
    assert scope["by_history"]["n"].sum() == scope["by_topic"]["n"].sum() == USERS
    assert scope["savings"].summary["mean_raw_tokens"] > scope["savings"].summary["mean_sketch_tokens"]
    assert scope["spark_ratings"].count() == USERS + 1          # the Spark cell read the same partition
    errors = scope["con"].sql("SELECT count(error) FROM ratings").fetchall()[0][0]
    assert errors == 1


def test_topics_notebook(warehouse, monkeypatch):
    scope = run_notebook("topics.ipynb", warehouse, monkeypatch)
    topics = explore.scan(warehouse, "topics").collect()
    assert scope["summary"].height == topics.height and scope["summary"]["size"].sum() == topics["size"].sum()
    assert scope["nearest"].group_by("topic_id").len()["len"].max() <= 5
    projected = scope["projected"]
    assert projected.height == topics["size"].sum() and projected["topic_id"].null_count() == 0
    assert isinstance(scope["plots"].projection(projected), Figure)

