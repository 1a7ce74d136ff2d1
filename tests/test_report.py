"""The run report on real tables: the MovieLens-100K chain (the shared `ml100k`
fixture, copied) plus a ratings partition and metrics written through the
warehouse's own writers (a model run costs minutes here: the predictions are
each user's train mean, spread over the scale). Also rendered in headless Chromium."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest

from siren_batch import explore, schemas
from siren_batch.config import load_config
from siren_batch.report import main, write_report

RUN_DATE = "1998-04-23"
USERS = 150   # test pairs of the first USERS users are scored, plus one unknown user
PLOTS = 6     # predicted vs true, error by history, error by topic, token savings, topic sizes, projection
_BUILT: dict = {}


def _probs(mean: float) -> list[float]:
    weights = [math.exp(-((k - mean) ** 2)) for k in range(1, 6)]
    return [w / sum(weights) for w in weights]


def _predictions(cfg) -> pl.DataFrame:
    interactions = explore.scan(cfg, "interactions")
    users = interactions.select(pl.col("user_id").unique().sort().head(USERS))
    train_mean = (interactions.filter(pl.col("split") == "train").group_by("user_id")
                  .agg(pl.col("rating").mean().alias("mean")))
    tokens = (explore.scan(cfg, "prompts").filter((pl.col("variant") == "sketch") & (pl.col("mode") == "answer_only"))
              .select("user_id", "item_id", "prompt_tokens"))
    pairs = (interactions.filter(pl.col("split") == "test").join(users, on="user_id", how="semi")
             .join(train_mean, on="user_id", how="left").join(tokens, on=["user_id", "item_id"], how="left")
             .select("user_id", "item_id", "mean", "prompt_tokens").sort("user_id").collect())
    return pairs.with_columns(pl.col("mean").map_elements(_probs, return_dtype=pl.List(pl.Float64)).alias("probs"))


def _rating_row(user, item, probs, tokens, error=None):
    rating = None if probs is None else sum((k + 1) * p for k, p in enumerate(probs))
    argmax = None if probs is None else float(probs.index(max(probs)) + 1)
    return (user, item, rating, argmax, argmax, probs, tokens, None if probs is None else 1, "test-model", None,
            "hash", "filled-in", error, None, None, None, RUN_DATE)


def scored_warehouse(spark, ml100k, tmp_path_factory):
    """The copied warehouse with ratings/run_date=RUN_DATE and an evaluation of it,
    each with its runs row; built once per session (the notebook tests use it too)."""
    if "cfg" in _BUILT:
        return _BUILT["cfg"]
    from pyspark.sql import functions as F

    from siren_batch.warehouse import run_record, write_table

    source, _ = ml100k
    wh = tmp_path_factory.mktemp("report-wh")
    shutil.copytree(Path(source.warehouse) / source.dataset, wh / source.dataset)
    cfg = load_config(overrides=[f"warehouse={wh}", f"dataset={source.dataset}", "calibrate.enabled=false"])
    pairs = _predictions(cfg)
    rows = [_rating_row(r["user_id"], r["item_id"], r["probs"], r["prompt_tokens"])
            for r in pairs.iter_rows(named=True)]
    rows.append(_rating_row("nobody", pairs["item_id"][0], None, None, "unknown_user"))
    with run_record(spark, cfg, "score") as rec:
        ratings = spark.createDataFrame(rows, schemas.RATINGS).withColumn("run_id", F.lit(rec.run_id))
        rec.input_rows = rec.output_rows = write_table(ratings, cfg, "ratings", schemas.RATINGS,
                                                       partition_by=["run_date"])
    truth = explore.scan(cfg, "interactions").select("user_id", "item_id", "rating").collect()
    scored = pairs.with_columns(pl.col("probs").list.eval(pl.element() * pl.int_range(1, 6)).list.sum()
                                .alias("llm")).join(truth, on=["user_id", "item_id"], how="inner")
    with run_record(spark, cfg, "evaluate") as rec:
        eval_id = f"{RUN_DATE}-{rec.run_id}"
        metrics = [(eval_id, "test", system, "all", metric, float(value), scored.height)
                   for system, prediction in (("llm:test-model", pl.col("llm")), ("baseline:user_mean", pl.col("mean")),
                                              ("baseline:global_mean", pl.lit(truth["rating"].mean())))
                   for metric, value in (("mae", scored.select((prediction - pl.col("rating")).abs().mean()).item()),
                                         ("rmse", scored.select(((prediction - pl.col("rating")) ** 2).mean().sqrt())
                                          .item()), ("coverage", 1.0))]
        rec.input_rows = scored.height
        rec.output_rows = write_table(spark.createDataFrame(metrics, schemas.METRICS), cfg, "metrics", schemas.METRICS)
    _BUILT["cfg"] = cfg
    return cfg


@pytest.fixture(scope="module")
def report_cfg(spark, ml100k, tmp_path_factory):
    return scored_warehouse(spark, ml100k, tmp_path_factory)


@pytest.fixture(scope="module")
def report(report_cfg):
    result = write_report(report_cfg, run_date=RUN_DATE)
    return result, Path(result["report"]).read_text()


def test_report_holds_metrics_plots_and_links(report_cfg, report):
    result, page = report
    assert Path(result["report"]).name == f"run-{RUN_DATE}.html"
    assert Path(result["latest"]).read_text() == page
    eval_id, metrics = explore.metrics_table(report_cfg)
    assert result["eval_id"] == eval_id and eval_id.startswith(f"{RUN_DATE}-")
    for system in metrics["system"]:   # the LLM and two baselines, one row each
        assert page.count(f'<td class="s">{system}</td>') == 1
    assert sorted(metrics["system"]) == ["baseline:global_mean", "baseline:user_mean", "llm:test-model"]
    assert metrics["mae"].to_list() == sorted(metrics["mae"])   # best first
    assert page.count("<img ") == result["plots"] == PLOTS
    assert len(re.findall(r'src="data:image/png;base64,', page)) == PLOTS
    # self-contained: no scripts, stylesheets or remote resources
    assert not re.search(r"<script|<link|src=\"http|url\(", page)
    for table in ("interactions", "ratings", "metrics", "runs", "topics"):
        assert f'<a href="../{table}/">{table}</a>' in page
        assert (Path(result["report"]).parent / f"../{table}").resolve().is_dir()
    assert "measured: tokens of the sketch and the raw-history prompt" in page


def test_report_counts_reconcile_with_tables(report_cfg, report):
    result, page = report
    ratings = explore.ratings_of(report_cfg, RUN_DATE).collect()
    assert (result["rows"], result["scored"], result["errors"]) == (USERS + 1, USERS, 1)  # one test pair a user
    assert ratings.filter(pl.col("error").is_not_null())["error"].to_list() == ["unknown_user"]
    assert '<td class="s">unknown_user</td><td>1</td>' in page
    assert result["prompt_tokens"] == ratings["prompt_tokens"].sum() > 0
    # predicted vs true: exactly the scored pairs that have a truth row
    truth = explore.scan(report_cfg, "interactions").select("user_id", "item_id").collect()
    scored = ratings.filter(pl.col("error").is_null()).select("user_id", "item_id")
    assert result["with_truth"] == scored.join(truth, on=["user_id", "item_id"], how="inner").height == USERS
    # the stages are the runs rows: ingest's rejected rows are the interaction rejects shown
    counts = explore.run_counts(report_cfg, run_date=RUN_DATE)
    stages = {r["stage"]: r for r in counts["stages"].iter_rows(named=True)}
    assert list(stages) == ["ingest", "embed", "topics", "sketches", "prompts", "score", "evaluate"]
    assert stages["score"]["run_id"] == ratings["run_id"][0]
    assert stages["score"]["input_rows"] == USERS + 1
    ingest = stages["ingest"]
    assert ingest["input_rows"] == ingest["output_rows"] + ingest["rejected_rows"]
    interaction_rejects = counts["rejects"].filter(pl.col("source") == "interactions")["n"].sum()
    assert interaction_rejects == ingest["rejected_rows"] > 0 and result["rejected"] >= interaction_rejects
    for stage in stages:
        assert f'<td class="s">{stage}</td>' in page


def test_report_says_what_is_missing(cfg):
    result = write_report(cfg, run_date="2026-01-05")
    page = Path(result["report"]).read_text()
    assert "<img " not in page and result["plots"] == 0
    for line in ("No metrics table yet", "No runs table", "No rejects table", "No ratings for run_date 2026-01-05",
                 "No ratings or interactions table", "No topics table yet", "No tables."):
        assert line in page


def test_a_warehouse_on_hdfs_gets_one_line_not_a_local_folder(cfg, tmp_path, monkeypatch):
    import dataclasses

    from siren_batch.config import ConfigError

    monkeypatch.chdir(tmp_path)   # pathlib would have made ./hdfs:/user/... here
    remote = dataclasses.replace(cfg, warehouse="hdfs:///user/siren/warehouse")
    with pytest.raises(ConfigError, match="the report reads the warehouse from a local disk"):
        write_report(remote, run_date="2026-01-05")
    assert not list(tmp_path.iterdir())


def test_report_command_line(report_cfg, capsys):
    assert main([f"warehouse={report_cfg.warehouse}", f"dataset={report_cfg.dataset}", "--run-date", RUN_DATE]) == 0
    assert capsys.readouterr().out.strip().endswith(f"reports/run-{RUN_DATE}.html")


# ---- headless Chromium: the page renders with its tables and plots -------------------------

def _screenshot(html_path: Path, out: Path):
    import numpy as np
    from PIL import Image

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium binary (make browser installs Debian's chromium)")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={out}", "--window-size=1280,4000", html_path.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(out).convert("RGB")).astype(int)


def test_report_renders_in_chromium(report, cfg, tmp_path):
    result, _ = report
    full = _screenshot(Path(result["report"]), tmp_path / "full.png")
    empty = _screenshot(Path(write_report(cfg, run_date="2026-01-05")["report"]), tmp_path / "empty.png")
    assert full.shape == empty.shape == (4000, 1280, 3)
    ink = lambda img: (img.min(axis=2) < 200)                                # text, lines, plot marks
    colour = lambda img: (img.max(axis=2) - img.min(axis=2) > 80)             # plot bars and points
    bands = lambda mask: [mask[y:y + 500].mean() for y in range(0, 4000, 500)]
    # the empty page is a few lines of text at the top; the report fills the page
    assert ink(empty)[600:].mean() < 0.001 and colour(empty).mean() < 0.003   # red "missing" lines only
    assert all(share > 0.01 for share in bands(ink(full))), bands(ink(full))
    assert colour(full).mean() > 0.02
    assert sum(share > 0.005 for share in bands(colour(full))) >= 4        # plots all down the page


def test_a_partitions_stages_leave_out_other_score_runs(tmp_path):
    """`siren-batch all` scores the valid split (calibrate.in_chain) just before the test
    partition: the test partition's stages show the calibrate run and its own score run,
    not the valid one's (nor an older day's)."""
    cfg = load_config(overrides=[f"warehouse={tmp_path}"])
    runs = pl.DataFrame({"run_id": ["old", "p", "valid", "cal", "test", "ev"],
                         "stage": ["score", "prompts", "score", "calibrate", "score", "evaluate"],
                         "started_at": list(range(6))})
    stages, scope = explore._runs_of(runs, cfg, None, "2026-01-05", ["test"])
    assert stages["run_id"].to_list() == ["p", "cal", "test", "ev"] and "its score run" in scope
