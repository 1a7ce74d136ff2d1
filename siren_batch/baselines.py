"""Reference predictors every LLM run is compared with.

    preds = baseline_predictions(interactions, "test", cfg.evaluate)   # {"user_mean": df, ...}
    for name, df in preds.items():
        metrics = compute_metrics(join_truth(df, interactions, "test"), interactions,
                                  cfg.evaluate, f"baseline:{name}", eval_id)

Each baseline is fit on the history available for the split and predicts every
(user, item) pair of the split:
  split=valid: fit on train;
  split=test:  fit on train + valid (the valid rating happened before the test one,
               so a deployed model would have had it).
ALS hyperparameters are always tuned on valid (fit on train), then ALS is refit
on the split's fit data with the best ones.

Baselines: constant_median, global_mean, user_mean and item_mean (unknown user or
item: the global mean), bias (regularised user + item biases, clipped to [1, 5]),
als (Spark MLlib explicit ALS on the residuals of the bias baseline by default,
evaluate.als_residual; clipped to [1, 5]; users or items unknown to it get the bias
prediction). Plain ALS on raw ratings predicts ~0 (clipped to 1) for weakly connected
pairs: on siren-movies test it scored RMSE 2.02 against 1.21 on residuals.
"""

from __future__ import annotations

import logging

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from siren_batch.config import EvaluateConfig
from siren_batch.evaluate import RATING_MAX, RATING_MIN

logger = logging.getLogger(__name__)

FIT_SPLITS = {"valid": ["train"], "test": ["train", "valid"]}


def fit_data(interactions: DataFrame, split: str) -> DataFrame:
    """The interactions a baseline may learn from when predicting `split` (see module doc)."""
    if split not in FIT_SPLITS:
        raise ValueError(f"split={split!r}: baselines predict valid or test")
    return interactions.filter(F.col("split").isin(FIT_SPLITS[split])).select("user_id", "item_id", "rating")


def target_pairs(interactions: DataFrame, split: str) -> DataFrame:
    """The (user_id, item_id) pairs of `split`, the ones every baseline predicts."""
    if split not in FIT_SPLITS:
        raise ValueError(f"split={split!r}: baselines predict valid or test")
    return interactions.filter(F.col("split") == split).select("user_id", "item_id")


def clip(col: Column, lo: float = RATING_MIN, hi: float = RATING_MAX) -> Column:
    return F.least(F.greatest(col, F.lit(lo)), F.lit(hi))


def constant(pairs: DataFrame, value: float) -> DataFrame:
    return pairs.select("user_id", "item_id", F.lit(float(value)).alias("rating"))


def global_mean(fit: DataFrame) -> float:
    value = fit.agg(F.avg("rating")).first()[0]
    if value is None:
        raise ValueError("no fit ratings: the baselines need a non-empty train split")
    return float(value)


def median(fit: DataFrame) -> float:
    """Exact median of the fit ratings (the mean of the two middle ones for an even count)."""
    value = fit.agg(F.median("rating")).first()[0]
    if value is None:
        raise ValueError("no fit ratings: the baselines need a non-empty train split")
    return float(value)


def mean_by(fit: DataFrame, pairs: DataFrame, key: str, fallback: float) -> DataFrame:
    """Mean fit rating of each pair's `key` (user_id or item_id); `fallback` when it has none."""
    means = fit.groupBy(key).agg(F.avg("rating").alias("_mean"))
    return (pairs.join(means, on=key, how="left")
            .select("user_id", "item_id", F.coalesce("_mean", F.lit(fallback)).alias("rating")))


def fit_bias(fit: DataFrame, reg: float, iters: int) -> tuple[float, DataFrame, DataFrame]:
    """Regularised biases r ~ mu + b_u + b_i by alternating least squares passes:
    b_i = sum(r - mu - b_u) / (n_i + reg), then b_u = sum(r - mu - b_i) / (n_u + reg),
    starting from b_u = 0 (Koren 2010, "Factor in the neighbors", eq. 2-3). `reg`
    shrinks the biases of users and items with few ratings towards 0.
    Returns (mu, user_bias[user_id, b_u], item_bias[item_id, b_i])."""
    mu = global_mean(fit)
    resid = fit.select("user_id", "item_id", (F.col("rating") - mu).alias("_resid"))
    user_bias = None
    item_bias = None
    for _ in range(iters):
        with_user = (resid.withColumn("b_u", F.lit(0.0)) if user_bias is None
                     else resid.join(user_bias, on="user_id", how="left"))
        item_bias = (with_user.groupBy("item_id")
                     .agg((F.sum(F.col("_resid") - F.coalesce("b_u", F.lit(0.0)))
                           / (F.count(F.lit(1)) + reg)).alias("b_i"))
                     .localCheckpoint())  # cuts the lineage that grows with every pass
        user_bias = (resid.join(item_bias, on="item_id", how="left").groupBy("user_id")
                     .agg((F.sum(F.col("_resid") - F.coalesce("b_i", F.lit(0.0)))
                           / (F.count(F.lit(1)) + reg)).alias("b_u"))
                     .localCheckpoint())
    return mu, user_bias, item_bias


def bias_predict(pairs: DataFrame, mu: float, user_bias: DataFrame, item_bias: DataFrame,
                 name: str = "rating") -> DataFrame:
    """`pairs` plus `name` = mu + b_u + b_i clipped to the scale; an unknown user or item adds 0."""
    rating = clip(F.lit(mu) + F.coalesce("b_u", F.lit(0.0)) + F.coalesce("b_i", F.lit(0.0)))
    return (pairs.join(user_bias, on="user_id", how="left").join(item_bias, on="item_id", how="left")
            .select(*pairs.columns, rating.alias(name)))


def als_predict(fit: DataFrame, pairs: DataFrame, rank: int, reg: float, cfg: EvaluateConfig) -> DataFrame:
    """Explicit ALS fit on `fit` (user_id, item_id, rating, base), predicting `pairs`
    (user_id, item_id, base); `base` is the bias prediction.

    cfg.als_residual: ALS learns rating - base and predicts base + its output (a biased
    MF; plain ALS predicts ~0 for weakly connected pairs of sparse data, clipped to 1).
    Otherwise it learns the ratings themselves. Clipped to the scale; `base` where ALS
    knows the user or the item not (cold start)."""
    from pyspark.ml.feature import StringIndexer
    from pyspark.ml.recommendation import ALS

    target = F.col("rating") - F.col("base") if cfg.als_residual else F.col("rating")
    train = fit.select("user_id", "item_id", target.alias("_target"))
    # Unknown ids get index numLabels ("keep"), which ALS has no factors for -> NaN.
    indexer = StringIndexer(inputCols=["user_id", "item_id"], outputCols=["_u", "_i"],
                            handleInvalid="keep", stringOrderType="alphabetAsc").fit(train)
    als = ALS(rank=rank, regParam=reg, maxIter=cfg.als_max_iter, seed=cfg.seed, userCol="_u",
              itemCol="_i", ratingCol="_target", implicitPrefs=False, coldStartStrategy="nan")
    model = als.fit(indexer.transform(train))
    scored = model.transform(indexer.transform(pairs))
    cold = F.col("prediction").isNull() | F.isnan("prediction")
    raw = F.col("prediction").cast("double") + (F.col("base") if cfg.als_residual else F.lit(0.0))
    rating = F.when(cold, F.col("base")).otherwise(clip(raw))
    return scored.select("user_id", "item_id", rating.alias("rating"))


def _rmse(pred: DataFrame, truth: DataFrame) -> float:
    err = F.col("rating") - F.col("label")
    return float(pred.join(truth, on=["user_id", "item_id"], how="inner")
                 .agg(F.sqrt(F.avg(err * err))).first()[0])


def with_base(interactions: DataFrame, split: str, cfg: EvaluateConfig,
               bias: tuple | None = None) -> tuple[DataFrame, DataFrame]:
    """Fit rows and target pairs of `split`, each with `base` = the bias prediction
    (`bias` = fit_bias of the split's fit data when the caller already has it)."""
    fit = fit_data(interactions, split)
    bias = bias or fit_bias(fit, cfg.bias_reg, cfg.bias_iters)
    return (bias_predict(fit, *bias, name="base").cache(),
            bias_predict(target_pairs(interactions, split), *bias, name="base").cache())


def als_for_split(interactions: DataFrame, split: str, cfg: EvaluateConfig, based: tuple[DataFrame, DataFrame],
                  params: tuple[int, float] | None = None) -> tuple[tuple[int, float], DataFrame]:
    """(rank, reg) and ALS predictions for the pairs of `split`; `based` = with_base(interactions,
    split, ...). Without `params` they are tuned on valid (tune_als); for split=valid the grid
    search's own best fit (on train, predicting valid) is the answer, so nothing is refit."""
    if params is None and split == "valid":
        return tune_als(interactions, cfg, based=based)
    if params is None:
        params, tuned = tune_als(interactions, cfg)
        tuned.unpersist()  # valid predictions; this split's come from the refit below
    return params, als_predict(*based, *params, cfg)


def tune_als(interactions: DataFrame, cfg: EvaluateConfig,
             based: tuple[DataFrame, DataFrame] | None = None) -> tuple[tuple[int, float], DataFrame]:
    """Grid cfg.als_ranks x cfg.als_reg_params, each fit on train and scored (RMSE) on
    valid. Returns the best (rank, reg) and its valid predictions (cached).
    `based`: the caller's with_base(interactions, "valid"), which stays cached for it."""
    fit, pairs = based or with_base(interactions, "valid", cfg)
    valid = interactions.filter(F.col("split") == "valid").select(
        "user_id", "item_id", F.col("rating").alias("label"))
    best = None
    for rank in cfg.als_ranks:
        for reg in cfg.als_reg_params:
            pred = als_predict(fit, pairs, rank, reg, cfg).cache()
            rmse = _rmse(pred, valid)
            logger.info("als rank=%d reg=%g: valid rmse=%.4f", rank, reg, rmse)
            if best is None or rmse < best[0]:
                if best is not None:
                    best[2].unpersist()
                best = (rmse, (rank, reg), pred)
            else:
                pred.unpersist()
    logger.info("als best: rank=%d reg=%g (valid rmse=%.4f)", *best[1], best[0])
    if based is None:
        fit.unpersist()
        pairs.unpersist()
    return best[1], best[2]


def baseline_predictions(interactions: DataFrame, split: str, cfg: EvaluateConfig) -> dict[str, DataFrame]:
    """Predictions (user_id, item_id, rating) of every baseline in cfg.baselines for each
    pair of `split`, fit on train (split=valid) or train + valid (split=test).
    The constants, biases and ALS models are fit here; the frames are lazy."""
    fit = fit_data(interactions, split)
    pairs = target_pairs(interactions, split)
    mu = global_mean(fit)
    out: dict[str, DataFrame] = {}
    for name in cfg.baselines:
        if name == "constant_median":
            out[name] = constant(pairs, median(fit))
        elif name == "global_mean":
            out[name] = constant(pairs, mu)
        elif name in ("user_mean", "item_mean"):
            out[name] = mean_by(fit, pairs, name.replace("_mean", "_id"), mu)
        elif name not in ("bias", "als"):
            raise ValueError(f"unknown baseline {name!r}; use {', '.join(EvaluateConfig.BASELINES)}")
    bias = fit_bias(fit, cfg.bias_reg, cfg.bias_iters) if {"bias", "als"} & set(cfg.baselines) else None
    if "bias" in cfg.baselines:
        out["bias"] = bias_predict(pairs, *bias)
    if "als" in cfg.baselines:
        _, out["als"] = als_for_split(interactions, split, cfg, with_base(interactions, split, cfg, bias))
    logger.info("baselines for %s (fit on %s): %s", split, "+".join(FIT_SPLITS[split]), ", ".join(cfg.baselines))
    return {name: out[name] for name in cfg.baselines}
