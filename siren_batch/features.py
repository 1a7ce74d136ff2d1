"""Per-pair numeric features the trained scorers combine with the LLM: the
baselines' predictions and the as-of counts.

    feats = split_features(spark, cfg, "valid")          # labelled pairs of a split
    feats = candidate_features(spark, cfg, pairs)        # nightly (user_id, item_id) pairs

Columns (schemas.PAIR_FEATURES): bias and als (the baselines' predictions), n_history
and user_mean (the user's earlier ratings), item_count and item_mean (the item's).
What each may have seen:
- split pairs: baselines fit as in evaluation (valid: train; test: train + valid), the
  counts from the example sketches (strictly earlier ratings only);
- nightly candidates: baselines fit on every interaction, counts as of the end of
  history (serving sketches and item priors).
A labelled split's baselines never see what later nights added (bootstrap_history).
ALS uses the (rank, reg) tuned on valid, or the pair the caller passes (a stored
calibrator brings its own so a night needs no grid search).
"""

from __future__ import annotations

import logging

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from siren_batch import baselines, schemas
from siren_batch.config import Config
from siren_batch.warehouse import conform, list_dir, path_exists, read_table

logger = logging.getLogger(__name__)

KEY = ["user_id", "item_id"]


def bootstrap_history(spark: SparkSession, cfg: Config) -> DataFrame:
    """The interactions the valid and test splits were cut from. A night after the split adds
    train rows later than every labelled pair (and a re-rating replaces a pair's row), so a
    baseline fit for a split on today's table (a calibrator refit on a later night, an
    evaluation after some nights) would learn from that split's future.
    - Nightly warehouses: the first night's arrivals, when they hold the valid and test rows
      (the bootstrap ingests the whole history and splits it): exactly what was cut.
      If the table's valid and test rows are not the bootstrap's (ingested afresh since), the table.
    - Nights added to a warehouse `siren-batch ingest` built: the table without every night's
      rows (a pair re-rated by a night has lost its older row there, and is left out).
    - No nightly arrivals: the `interactions` table itself."""
    interactions = read_table(spark, cfg, "interactions", schemas.INTERACTIONS)
    folder = cfg.table_path("arrived_interactions")
    nights = sorted(n.split("=", 1)[1] for n in (list_dir(spark, folder) if path_exists(spark, folder) else [])
                    if n.startswith("run_date="))
    if not nights:
        return interactions
    arrived = read_table(spark, cfg, "arrived_interactions", schemas.with_run_date(schemas.INTERACTIONS))
    first = arrived.where(F.col("run_date") == nights[0]).drop("run_date")
    labelled = F.col("split") != "train"
    if first.where(labelled).limit(1).count():
        # The bootstrap, unless the table was ingested afresh since: then its labelled rows
        # are not all the bootstrap's (a night's re-rating only removes some), and it is the history.
        fresh = interactions.where(labelled).join(first.where(labelled), on=schemas.INTERACTIONS.names,
                                                  how="left_anti")
        if not fresh.limit(1).count():
            return first
        logger.warning("the valid and test rows of %s are not those the first night (%s) cut: ingested "
                       "afresh since, so the baselines learn from the table as it is", cfg.table_path("interactions"),
                       nights[0])
        return interactions
    later = arrived.select("user_id", "item_id", "ts")
    return (interactions.join(later, on=["user_id", "item_id", "ts"], how="left_anti")
            .select(*schemas.INTERACTIONS.names))


def history_for(spark: SparkSession, cfg: Config, split: str | None) -> DataFrame:
    """The interactions a base or baseline for `split` may learn from: for the labelled splits
    (valid, test) the history they were cut from (bootstrap_history), else (train, nightly
    candidates: None) the table as it is."""
    if split in ("valid", "test"):
        return bootstrap_history(spark, cfg)
    return read_table(spark, cfg, "interactions", schemas.INTERACTIONS)


def _baselines(interactions: DataFrame, split: str, cfg: Config,
               als_params: tuple[int, float] | None) -> tuple[DataFrame, tuple[int, float]]:
    """(user_id, item_id, bias, als) for the pairs of `split`, and the ALS (rank, reg) used."""
    fit, pairs = baselines.with_base(interactions, split, cfg.evaluate)
    als_params, als = baselines.als_for_split(interactions, split, cfg.evaluate, (fit, pairs), als_params)
    out = (pairs.withColumnRenamed("base", "bias")
           .join(als.withColumnRenamed("rating", "als"), on=KEY, how="left"))
    return out, als_params


def split_features(spark: SparkSession, cfg: Config, split: str,
                   als_params: tuple[int, float] | None = None) -> tuple[DataFrame, tuple[int, float]]:
    """schemas.PAIR_FEATURES for every labelled pair of `split` (valid or test)."""
    interactions = bootstrap_history(spark, cfg)
    preds, als_params = _baselines(interactions, split, cfg, als_params)
    counts = (read_table(spark, cfg, "example_sketches", schemas.EXAMPLE_SKETCHES)
              .where(F.col("split") == split)
              .select(*KEY, "n_history", "user_mean", "item_count", "item_mean"))
    return conform(counts.join(preds, on=KEY, how="left"), schemas.PAIR_FEATURES), als_params


def candidate_features(spark: SparkSession, cfg: Config, pairs: DataFrame,
                       als_params: tuple[int, float]) -> DataFrame:
    """schemas.PAIR_FEATURES for nightly (user_id, item_id) pairs: baselines fit on every
    interaction, counts as of the end of history (unknown user or item: count 0)."""
    from siren_batch.sketches import item_priors

    interactions = read_table(spark, cfg, "interactions", schemas.INTERACTIONS)
    fit = interactions.select("user_id", "item_id", "rating")
    mu, user_bias, item_bias = baselines.fit_bias(fit, cfg.evaluate.bias_reg, cfg.evaluate.bias_iters)
    # One feature row per distinct pair: a lookup table joined back onto every ratings row
    # (repeated candidate rows all keep their own ratings row).
    targets = pairs.select(*KEY).dropDuplicates(KEY)
    targets = baselines.bias_predict(targets, mu, user_bias, item_bias, name="base")
    fit_base = baselines.bias_predict(fit, mu, user_bias, item_bias, name="base")
    als = baselines.als_predict(fit_base, targets, *als_params, cfg.evaluate)
    users = read_table(spark, cfg, "sketches", schemas.SKETCHES).select("user_id", "n_history", "user_mean")
    out = (targets.withColumnRenamed("base", "bias")
           .join(als.withColumnRenamed("rating", "als"), on=KEY, how="left")
           .join(users, on="user_id", how="left")
           .join(item_priors(interactions), on="item_id", how="left")
           .withColumn("n_history", F.coalesce("n_history", F.lit(0)))
           .withColumn("item_count", F.coalesce("item_count", F.lit(0))))
    return conform(out, schemas.PAIR_FEATURES)
