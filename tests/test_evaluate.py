"""evaluate: truth join, metrics against hand-computed values, the Markdown report."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from pyspark.sql import functions as F

from siren_batch import schemas
from siren_batch.config import EvaluateConfig
from siren_batch.evaluate import (PAPER_ROWS, compute_metrics, evaluate_systems, history_segment, join_truth,
                                  llm_systems, markdown_report, nll_metric)

# u1 has two test pairs, u2 one whose item is new, u3 one whose prediction failed.
INTERACTIONS = [
    ("u1", "i1", 4.0, 1, "train"), ("u1", "i2", 2.0, 2, "train"), ("u1", "i3", 3.0, 3, "valid"),
    ("u1", "i4", 5.0, 4, "test"), ("u1", "i6", 3.0, 5, "test"),
    ("u2", "i1", 3.0, 1, "train"), ("u2", "i2", 4.0, 2, "valid"), ("u2", "i5", 1.0, 3, "test"),
    ("u3", "i2", 5.0, 1, "train"), ("u3", "i4", 4.0, 2, "valid"), ("u3", "i1", 2.0, 3, "test"),
]
PREDICTIONS = [  # (user, item, rating, error): errors -1, +0.5, +1; one error; one extra pair
    ("u1", "i4", 4.0, None), ("u1", "i6", 3.5, None), ("u2", "i5", 2.0, None),
    ("u3", "i1", None, "boom"), ("u9", "i1", 3.0, None),
]


def ratings_frame(spark, rows, probs=None, calibrated=None):
    """RATINGS-shaped frame: the real table's schema, bookkeeping columns filled in.
    probs / calibrated: per row, a distribution (and for calibrated (point, median, probs))."""
    probs = probs or [None] * len(rows)
    calibrated = calibrated or [(None, None, None)] * len(rows)
    full = [(u, i, r, r, r, p, 10, 1, "m", None, "h", "run", e, *c, "2025-01-01")
            for (u, i, r, e), p, c in zip(rows, probs, calibrated)]
    return spark.createDataFrame(full, schemas.RATINGS)


@pytest.fixture
def inter(spark):
    return spark.createDataFrame(INTERACTIONS, schemas.INTERACTIONS)


def metric_map(metrics):
    return {(r.segment, r.metric): (r.value, r.n) for r in metrics.collect()}


def test_join_truth_keeps_every_truth_pair_and_flags_extras(spark, inter):
    joined = join_truth(ratings_frame(spark, PREDICTIONS[:3] + PREDICTIONS[4:]), inter, "test")
    status = {(r.user_id, r.item_id): r.status for r in joined.collect()}
    assert status == {("u1", "i4"): "covered", ("u1", "i6"): "covered", ("u2", "i5"): "covered",
                      ("u3", "i1"): "uncovered", ("u9", "i1"): "extra"}
    with_error = join_truth(ratings_frame(spark, PREDICTIONS), inter, "test")
    assert with_error.filter(F.col("status") == "uncovered").count() == 1
    with pytest.raises(ValueError, match="split='train2'"):
        join_truth(ratings_frame(spark, PREDICTIONS), inter, "train2")


def test_metrics_match_hand_computed_values(spark, inter):
    cfg = EvaluateConfig(missing="count", history_buckets=[3])
    joined = join_truth(ratings_frame(spark, PREDICTIONS), inter, "test")
    m = metric_map(compute_metrics(joined, inter, cfg, "sys", "e1"))
    errs = [-1.0, 0.5, 1.0]
    assert m[("all", "mae")] == pytest.approx((sum(map(abs, errs)) / 3, 3))
    assert m[("all", "rmse")][0] == pytest.approx(math.sqrt(sum(e * e for e in errs) / 3))
    u1_mae, u1_rmse = (1.0 + 0.5) / 2, math.sqrt((1.0 + 0.25) / 2)
    assert m[("all", "user_mae")] == pytest.approx(((u1_mae + 1.0) / 2, 2))
    assert m[("all", "user_rmse")][0] == pytest.approx((u1_rmse + 1.0) / 2)
    assert m[("all", "coverage")] == pytest.approx((0.75, 4))
    assert m[("all", "extra")] == (1.0, 1)
    assert m[("all", "out_of_range")] == (0.0, 3)
    # history before the target (any split): u1 has 3 and 4, u2 and u3 have 2 each
    assert m[("history:>=3", "mae")] == pytest.approx((u1_mae, 2))
    assert m[("history:<3", "mae")] == pytest.approx((1.0, 1))
    assert m[("history:<3", "coverage")] == pytest.approx((0.5, 2))
    # only i1 (u3's failed pair) appears in train
    assert m[("item:seen", "mae")] == (None, 0) and m[("item:seen", "coverage")] == (0.0, 1)
    assert m[("item:unseen", "coverage")] == pytest.approx((1.0, 3))
    assert {k[0] for k in m} == {"all", "history:<3", "history:>=3", "item:seen", "item:unseen"}


def test_missing_error_policy(spark, inter):
    joined = join_truth(ratings_frame(spark, PREDICTIONS), inter, "test")
    with pytest.raises(ValueError, match=r"1 of 4 test pairs .* evaluate.missing=count"):
        compute_metrics(joined, inter, EvaluateConfig(missing="error"), "sys", "e1")
    complete = PREDICTIONS[:3] + [("u3", "i1", 2.5, None)]
    ok = join_truth(ratings_frame(spark, complete), inter, "test")
    m = metric_map(compute_metrics(ok, inter, EvaluateConfig(missing="error"), "sys", "e1"))
    assert m[("all", "coverage")] == (1.0, 4) and m[("all", "extra")] == (0.0, 0)


def test_duplicates_and_wrong_split_are_refused(spark, inter):
    cfg = EvaluateConfig(missing="count")
    twice = join_truth(ratings_frame(spark, PREDICTIONS + [("u1", "i4", 3.0, None)]), inter, "test")
    with pytest.raises(ValueError, match="share a \\(user_id, item_id\\) pair"):
        compute_metrics(twice, inter, cfg, "sys", "e1")
    valid = join_truth(ratings_frame(spark, PREDICTIONS), inter, "valid")
    with pytest.raises(ValueError, match="evaluate.split=test"):
        compute_metrics(valid, inter, cfg, "sys", "e1")


def test_all_systems_at_once_give_each_systems_own_rows(spark, inter):
    cfg = EvaluateConfig(missing="count", history_buckets=[3])
    systems = {  # extras, an error, a missing pair, a prediction off the scale; a frame without `error`
        "a": ratings_frame(spark, PREDICTIONS),
        "b": ratings_frame(spark, [("u1", "i4", 6.0, None), ("u2", "i5", 1.5, None), ("u8", "i2", 2.0, None)]),
        "c": spark.createDataFrame([("u1", "i6", 4.0), ("u3", "i1", 2.0)], "user_id string, item_id string, "
                                   "rating double"),
    }
    together = evaluate_systems(systems, inter, cfg, "e1").collect()
    alone = [r for name, preds in systems.items()
             for r in compute_metrics(join_truth(preds, inter, "test"), inter, cfg, name, "e1").collect()]
    assert [r.system for r in together] == [r.system for r in alone]   # systems in order, segments sorted
    assert len(together) == len(alone) == 3 * (7 + 4 * 5)   # "all": 7 metrics; 4 segments: 5
    for got, want in zip(together, alone):
        assert got[:5] == want[:5] and got.n == want.n, (got, want)
        assert got.value == pytest.approx(want.value, abs=1e-12) if want.value is not None else got.value is None
    twice = {**systems, "d": ratings_frame(spark, PREDICTIONS + [("u1", "i4", 3.0, None)])}
    with pytest.raises(ValueError, match="^d: 2 rows share"):
        evaluate_systems(twice, inter, cfg, "e1")
    with pytest.raises(ValueError, match="no systems"):
        evaluate_systems({}, inter, cfg, "e1")


def test_out_of_scale_predictions_are_scored_as_they_are(spark, inter):
    rows = [("u1", "i4", 6.0, None), ("u1", "i6", 3.0, None), ("u2", "i5", 1.0, None), ("u3", "i1", 2.0, None)]
    joined = join_truth(ratings_frame(spark, rows), inter, "test")
    m = metric_map(compute_metrics(joined, inter, EvaluateConfig(), "sys", "e1"))
    assert m[("all", "mae")] == pytest.approx((0.25, 4))  # |6 - 5| over 4 pairs, not clipped to 0
    assert m[("all", "out_of_range")] == (1.0, 4)


def test_history_segment_labels(spark):
    frame = spark.createDataFrame([(n,) for n in (0, 4, 5, 9, 10, 49, 50, 300)], "n long")
    got = [r.s for r in frame.select(history_segment(F.col("n"), [5, 10, 20, 50]).alias("s")).collect()]
    assert got == ["history:<5", "history:<5", "history:5-9", "history:5-9", "history:10-19",
                   "history:20-49", "history:>=50", "history:>=50"]


def _metrics_pdf(system, mae, rmse, coverage=1.0, extra=0.0):
    rows = [("all", "mae", mae, 10), ("all", "rmse", rmse, 10), ("all", "user_mae", mae, 4),
            ("all", "user_rmse", rmse, 4), ("all", "coverage", coverage, 10), ("all", "extra", extra, 0),
            ("history:5-9", "mae", mae, 6), ("history:5-9", "rmse", rmse, 6), ("history:5-9", "coverage", 1.0, 6),
            ("history:<5", "mae", mae, 4), ("history:<5", "rmse", rmse, 4), ("history:<5", "coverage", 1.0, 4)]
    return pd.DataFrame([("e", "test", system, *r) for r in rows],
                        columns=["eval_id", "split", "system", "segment", "metric", "value", "n"])


def test_markdown_report_sorts_by_rmse_and_marks_paper_rows():
    pdf = pd.concat([_metrics_pdf("baseline:global_mean", 0.9, 1.4),
                     _metrics_pdf("llm:x", 0.8, 1.1, coverage=0.9, extra=3.0)])
    text = markdown_report(pdf, "siren-movies", PAPER_ROWS["siren-movies"])
    lines = text.splitlines()
    main = lines[lines.index("| system | MAE | RMSE | user MAE | user RMSE | NLL | coverage | n |") + 2:][:3]
    assert [line.split(" | ")[0] for line in main] == [  # RMSE 1.1 < 1.2924 < 1.4
        "| llm:x", "| SIREN Qwen3-4B †", "| baseline:global_mean"]
    assert "| llm:x | 0.8000 | 1.1000 | 0.8000 | 1.1000 | – | 0.9000 | 10 |" in lines  # no distribution: no NLL
    assert any(line.startswith("† SIREN Qwen3-4B: quoted from the paper") for line in lines)
    assert "Note: llm:x: 3 predictions for pairs outside the truth (not scored)." in lines
    header = next(line for line in lines if line.startswith("| system | <5"))
    assert header.index("<5 (n=4)") < header.index("5-9 (n=6)")
    assert "SIREN" not in markdown_report(pdf, "no paper", None)
    assert not any(line.startswith("Ratings and metrics are on") for line in lines)
    ten = markdown_report(pdf, "a 1-10 source", None, (1.0, 10.0)).splitlines()
    assert ten[2] == ("Ratings and metrics are on the model's 1-5 scale; this data's own scale is 1-10 "
                      "(data.scale_min/scale_max). On it, MAE and RMSE are x2.25 and a prediction r reads as "
                      "1 + (r - 1) x 2.25.")


def test_markdown_report_refuses_two_values_per_system():
    pdf = pd.concat([_metrics_pdf("a", 0.8, 1.1), _metrics_pdf("a", 0.7, 1.0)])
    with pytest.raises(ValueError, match="one eval_id per system"):
        markdown_report(pdf, "t", None)


def test_readouts_are_systems_and_nll_matches_hand_values(spark, inter):
    rows = [("u1", "i4", 4.0, None), ("u1", "i6", 3.5, None), ("u2", "i5", 2.0, None), ("u3", "i1", None, "boom")]
    probs = [[0.0, 0.0, 0.2, 0.3, 0.5], [0.1, 0.1, 0.4, 0.2, 0.2], [0.5, 0.5, 0.0, 0.0, 0.0], None]
    raw = ratings_frame(spark, rows, probs)
    assert sorted(llm_systems(raw, "llm:m")) == ["llm:m", "llm:m/argmax", "llm:m/median"]
    # true ratings 5, 3, 1: -log(0.5), -log(0.4), -log(0.5); the error row does not count
    nll = nll_metric(raw, inter, "test", "probs", "llm:m", "e1").first()
    assert (nll.metric, nll.n) == ("nll", 3) and nll.value == pytest.approx(-(2 * math.log(0.5) + math.log(0.4)) / 3)
    calibrated = [(4.5, 5.0, [0.0, 0.0, 0.0, 0.5, 0.5]), (3.0, 3.0, [0.0, 0.0, 1e-9, 0.5, 0.5]),
                  (1.5, 1.0, [0.6, 0.4, 0.0, 0.0, 0.0]), (None, None, None)]
    cal = ratings_frame(spark, rows, probs, calibrated)
    systems = llm_systems(cal, "llm:m")
    assert set(systems) == {"llm:m", "llm:m/median", "llm:m/argmax", "llm:m+calibrated", "llm:m+calibrated/median"}
    assert {r.item_id: r.rating for r in systems["llm:m+calibrated/median"].collect()} == \
        {"i4": 5.0, "i6": 3.0, "i5": 1.0, "i1": None}
    floor = nll_metric(cal, inter, "test", "calibrated_probs", "llm:m+calibrated", "e1").first()
    assert floor.value == pytest.approx(-(math.log(0.5) + math.log(1e-6) + math.log(0.6)) / 3)  # floored at 1e-6


def test_nll_reads_a_half_star_label_as_its_two_hot_distribution(spark):
    """3.5 counts half for 3 and half for 4 (as training and calibration read it); 5 is 5."""
    truth = spark.createDataFrame([("u1", "i1", 3.5, 1, "test"), ("u2", "i2", 5.0, 1, "test")], schemas.INTERACTIONS)
    probs = [[0.1, 0.1, 0.2, 0.4, 0.2]] * 2
    nll = nll_metric(ratings_frame(spark, [("u1", "i1", 3.6, None), ("u2", "i2", 3.6, None)], probs), truth,
                     "test", "probs", "llm:m", "e1").first()
    assert nll.n == 2 and nll.value == pytest.approx((-(0.5 * math.log(0.2) + 0.5 * math.log(0.4)) - math.log(0.2)) / 2)
