"""baselines: each predictor on a tiny frame, then real data (siren-movies, MovieLens-100K)."""

from __future__ import annotations

import pandas as pd
import pytest
from pyspark.sql import functions as F

from siren_batch import assets, schemas
from siren_batch.baselines import (als_predict, baseline_predictions, bias_predict, fit_bias, fit_data,
                                   mean_by, median, target_pairs)
from siren_batch.config import ConfigError, EvaluateConfig
from siren_batch.evaluate import compute_metrics, join_truth

# train ratings 1, 2, 4, 5, 5 (median 4, mean 3.4); u3 and i9 appear only in valid/test
TINY = [
    ("u1", "i1", 5.0, 1, "train"), ("u1", "i2", 4.0, 2, "train"), ("u2", "i1", 1.0, 1, "train"),
    ("u2", "i3", 2.0, 2, "train"), ("u1", "i3", 5.0, 3, "train"),
    ("u1", "i9", 3.0, 4, "valid"), ("u2", "i2", 4.0, 3, "valid"), ("u3", "i1", 3.0, 1, "valid"),
    ("u1", "i4", 4.0, 5, "test"), ("u2", "i9", 2.0, 4, "test"), ("u3", "i3", 5.0, 2, "test"),
]


@pytest.fixture
def tiny(spark):
    return spark.createDataFrame(TINY, schemas.INTERACTIONS)


def as_dict(df):
    return {(r.user_id, r.item_id): r.rating for r in df.collect()}


def test_fit_data_uses_only_the_past_of_the_split(tiny):
    assert fit_data(tiny, "valid").count() == 5
    assert fit_data(tiny, "test").count() == 8  # train + valid
    assert target_pairs(tiny, "test").count() == 3
    with pytest.raises(ValueError, match="valid or test"):
        fit_data(tiny, "train")


def test_a_labelled_split_never_sees_what_later_nights_added(spark, cfg, tiny):
    """features.bootstrap_history on a warehouse `siren-batch ingest` built and nights then
    added to (no bootstrap night): every night's rows are left out, a re-rated pair's too.
    The nightly bootstrap's own case is in test_nightly."""
    from siren_batch.features import bootstrap_history
    from siren_batch.warehouse import write_table

    write_table(tiny, cfg, "interactions", schemas.INTERACTIONS)
    assert sorted(bootstrap_history(spark, cfg).collect()) == sorted(tiny.collect())   # no nights yet
    nights = spark.createDataFrame([("u1", "i5", 2.0, 9, "train", "2026-01-02"),
                                    ("u1", "i2", 1.0, 8, "train", "2026-01-03")],   # re-rates (u1, i2)
                                   schemas.with_run_date(schemas.INTERACTIONS))
    write_table(nights, cfg, "arrived_interactions", schemas.with_run_date(schemas.INTERACTIONS),
                partition_by=["run_date"])
    merged = tiny.where((F.col("user_id") != "u1") | (F.col("item_id") != "i2")).unionByName(nights.drop("run_date"))
    write_table(merged, cfg, "interactions", schemas.INTERACTIONS)
    history = bootstrap_history(spark, cfg)
    assert sorted(history.collect()) == sorted(tiny.where("item_id != 'i2' or user_id != 'u1'").collect())
    bias = {name: as_dict(bias_predict(target_pairs(table, "valid"), *fit_bias(fit_data(table, "valid"), 1.0, 2)))
            for name, table in (("history", history), ("merged", merged))}
    assert bias["history"].keys() == bias["merged"].keys() and bias["history"] != bias["merged"]


def test_median_and_means_with_fallback(tiny):
    fit = fit_data(tiny, "valid")
    assert median(fit) == 4.0
    assert median(fit.filter(F.col("rating") > 1)) == 4.5  # 2 4 5 5: mean of the middle two
    pairs = target_pairs(tiny, "valid")
    users = as_dict(mean_by(fit, pairs, "user_id", 3.4))
    assert users == pytest.approx({("u1", "i9"): 14 / 3, ("u2", "i2"): 1.5, ("u3", "i1"): 3.4})
    items = as_dict(mean_by(fit, pairs, "item_id", 3.4))
    assert items == pytest.approx({("u1", "i9"): 3.4, ("u2", "i2"): 4.0, ("u3", "i1"): 3.0})


def test_bias_one_pass_by_hand_and_shrinkage(spark):
    rows = [("u1", "i1", 5.0, 1, "train"), ("u1", "i2", 5.0, 2, "train"),
            ("u2", "i1", 1.0, 1, "train"), ("u2", "i2", 3.0, 2, "train")]
    fit = fit_data(spark.createDataFrame(rows, schemas.INTERACTIONS), "valid")
    mu, users, items = fit_bias(fit, reg=1.0, iters=1)
    # mu 3.5; b_i = sum(r - mu) / (2 + 1) = -1/3, +1/3; b_u = sum(r - mu - b_i) / 3 = +1, -1
    assert mu == 3.5
    assert {r.item_id: r.b_i for r in items.collect()} == pytest.approx({"i1": -1 / 3, "i2": 1 / 3})
    assert {r.user_id: r.b_u for r in users.collect()} == pytest.approx({"u1": 1.0, "u2": -1.0})
    loose_fit = fit_bias(fit, reg=0.0, iters=2)
    loose = {r.user_id: r.b_u for r in loose_fit[1].collect()}
    tight = {r.user_id: r.b_u for r in fit_bias(fit, reg=20.0, iters=2)[1].collect()}
    assert abs(tight["u1"]) < 0.2 < 1.0 < abs(loose["u1"])  # more reg: biases shrink towards 0
    pairs = spark.createDataFrame([("u1", "i2"), ("u7", "i7")], "user_id string, item_id string")
    pred = as_dict(bias_predict(pairs, *loose_fit))
    assert pred[("u7", "i7")] == 3.5 and 4.5 < pred[("u1", "i2")] <= 5.0  # unknown -> mu; clipped to 5


@pytest.mark.parametrize("residual", [True, False])
def test_als_falls_back_for_cold_start(spark, tiny, residual):
    pairs = spark.createDataFrame([("u1", "i2", 2.0), ("u3", "i1", 1.25), ("u1", "i9", 4.75)],
                                  "user_id string, item_id string, base double")
    fit = fit_data(tiny, "valid").withColumn("base", F.lit(3.0))
    cfg = EvaluateConfig(als_max_iter=5, als_residual=residual)
    pred = as_dict(als_predict(fit, pairs, 2, 0.01, cfg))
    assert pred[("u3", "i1")] == 1.25 and pred[("u1", "i9")] == 4.75  # unknown user / item -> base
    assert pred[("u1", "i2")] != 2.0 and 1.0 <= pred[("u1", "i2")] <= 5.0
    # u1 rated 5, 4, 5: learned above the base, whether as a residual or as a rating
    assert pred[("u1", "i2")] > (2.0 if residual else 3.0)


def test_baseline_predictions_cover_every_pair(tiny):
    cfg = EvaluateConfig(baselines=["user_mean", "constant_median", "global_mean"])
    preds = baseline_predictions(tiny, "test", cfg)
    assert list(preds) == ["user_mean", "constant_median", "global_mean"]
    # train + valid ratings 1 2 3 3 4 4 5 5: median 3.5, mean 27 / 8
    assert as_dict(preds["constant_median"]) == {("u1", "i4"): 3.5, ("u2", "i9"): 3.5, ("u3", "i3"): 3.5}
    assert set(as_dict(preds["global_mean"]).values()) == {27 / 8}
    assert as_dict(preds["user_mean"])[("u3", "i3")] == 3.0  # fit on train + valid: u3's valid 3
    with pytest.raises(ConfigError, match="unknown entries"):
        EvaluateConfig(baselines=["user_mean", "knn"])


# ---- real data -------------------------------------------------------------------

def siren_movies_interactions(spark, folder):
    parts = []
    for split in ("train", "valid", "test"):
        pdf = pd.read_json(folder / f"{split}.jsonl.gz", lines=True, convert_dates=False)
        parts.append(pd.DataFrame({"user_id": pdf["user_id"].astype(str),
                                   "item_id": pdf["parent_asin"].astype(str),
                                   "rating": pdf["label"].astype(float), "ts": pdf["timestamp"].astype("int64"),
                                   "split": split}))
    return spark.createDataFrame(pd.concat(parts, ignore_index=True), schemas.INTERACTIONS)


def ml100k_interactions(spark):
    raw = pd.read_csv(assets.movielens_dir("ml-100k") / "ml-100k.inter", sep="\t")
    pdf = pd.DataFrame({"user_id": raw["user_id:token"].astype(str), "item_id": raw["item_id:token"].astype(str),
                        "rating": raw["rating:float"].astype(float),
                        "ts": (raw["timestamp:float"] * 1000).astype("int64")})
    pdf = pdf.sort_values(["user_id", "ts", "item_id"])
    from_end = pdf.groupby("user_id").cumcount(ascending=False)  # leave-last-out by (ts, item_id)
    pdf["split"] = "train"
    pdf.loc[from_end == 1, "split"] = "valid"
    pdf.loc[from_end == 0, "split"] = "test"
    return spark.createDataFrame(pdf, schemas.INTERACTIONS)


def overall(spark_metrics):
    return {r.metric: r.value for r in spark_metrics.filter(F.col("segment") == "all").collect()}


def test_siren_movies_trivial_predictors_match_published_values(spark, shared_movies):
    inter = siren_movies_interactions(spark, shared_movies).cache()
    cfg = EvaluateConfig(baselines=["constant_median"])
    pairs = target_pairs(inter, "test")
    five = pairs.withColumn("rating", F.lit(5.0))
    four = baseline_predictions(inter, "test", cfg)["constant_median"]  # median of train + valid: 4
    got = {name: overall(compute_metrics(join_truth(df, inter, "test"), inter, cfg, name, "e"))
           for name, df in (("constant:5", five), ("constant_median", four))}
    assert pairs.count() == 2629
    assert (round(got["constant:5"]["mae"], 4), round(got["constant:5"]["rmse"], 4)) == (0.7995, 1.4797)
    assert (round(got["constant_median"]["mae"], 4), round(got["constant_median"]["rmse"], 4)) == (1.0487, 1.2611)
    inter.unpersist()


def test_als_beats_global_mean_on_ml100k(spark):
    inter = ml100k_interactions(spark).cache()
    cfg = EvaluateConfig(baselines=["global_mean", "als"], als_ranks=[8], als_reg_params=[0.1],
                         als_max_iter=5, bias_iters=1)
    preds = baseline_predictions(inter, "test", cfg)
    rmse = {name: overall(compute_metrics(join_truth(df, inter, "test"), inter, cfg, name, "e"))["rmse"]
            for name, df in preds.items()}
    assert rmse["als"] < rmse["global_mean"] - 0.02, rmse
    inter.unpersist()
