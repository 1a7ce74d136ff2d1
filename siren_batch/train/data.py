"""The Spark edge of training: example sketches of one split -> prompts, labels and
the bias baseline's prediction, collected to pandas for the torch loop.

    rows = training_rows(spark, cfg, "train")   # user_id, item_id, prompt, label, base

- Rows: the split's `example_sketches` (each sketch built strictly before its
  target, so no prompt contains its own rating).
- Sample: a deterministic seeded sample of train.max_examples rows (valid:
  train.valid_examples) that takes whole (user, ts) groups: ratings a user gave at
  the same moment share one sketch, so they pack behind one prompt prefix
  (train.pack). Groups are ordered by a seeded hash and taken while the total stays
  within the limit; every row has the same chance to be drawn.
- Prompts: siren_batch.prompts.build_prompts with the options of the prompts
  section (priors, raw history), variant train.variant, mode answer_only, rendered
  with train.base_model's tokenizer: the prompts scoring will use.
- base: the user+item bias prediction (baselines.fit_bias, evaluate.bias_reg and
  bias_iters). Valid rows: fit on train (baselines.fit_data), as at evaluation.
  Train rows: fit on the train split itself, so a train row's own rating is inside
  its base (in-sample; shrinkage by bias_reg keeps the effect small). A leak-free
  as-of base per train row would need one fit per timestamp.
- Test is never read here: model selection and early stopping use valid only.
"""

from __future__ import annotations

import dataclasses
import logging

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from siren_batch import schemas
from siren_batch.config import Config
from siren_batch.features import history_for
from siren_batch.warehouse import read_table

logger = logging.getLogger(__name__)

ROW_COLUMNS = ["user_id", "item_id", "prompt", "label", "base"]


def sample_groups(examples: DataFrame, limit: int | None, seed: int) -> DataFrame:
    """Whole (user_id, ts) groups in seeded-hash order while the row total stays <= limit
    (all rows when limit is None)."""
    if limit is None:
        return examples
    key = F.xxhash64("user_id", "ts", F.lit(seed))
    groups = examples.groupBy("user_id", "ts").agg(F.count(F.lit(1)).alias("_n")).withColumn("_key", key)
    # One window over the group counts (a few thousand to a few million small rows).
    running = F.sum("_n").over(Window.orderBy("_key", "user_id", "ts")
                               .rowsBetween(Window.unboundedPreceding, Window.currentRow))
    picked = groups.withColumn("_total", running).where(F.col("_total") <= limit).select("user_id", "ts")
    return examples.join(picked, on=["user_id", "ts"], how="left_semi")


def with_base(pairs: DataFrame, interactions: DataFrame, split: str | None, cfg: Config) -> DataFrame:
    """pairs (user_id, item_id) + base = the bias prediction fit as the module doc says;
    split None (nightly candidates, scored with serving sketches): fit on every interaction."""
    from siren_batch.baselines import bias_predict, fit_bias, fit_data

    if split is None:
        fit = interactions.select("user_id", "item_id", "rating")
    elif split == "train":
        fit = interactions.where(F.col("split") == "train").select("user_id", "item_id", "rating")
    else:
        fit = fit_data(interactions, split)
    mu, user_bias, item_bias = fit_bias(fit, cfg.evaluate.bias_reg, cfg.evaluate.bias_iters)
    return bias_predict(pairs.select("user_id", "item_id"), mu, user_bias, item_bias, name="base")


def training_frame(examples: DataFrame, items: DataFrame, interactions: DataFrame, cfg: Config,
                   split: str, mode: str = "answer_only", limit: int | None | str = "train",
                   picked: DataFrame | None = None) -> DataFrame:
    """Sampled prompts of `split` with label and base (ROW_COLUMNS), one row per example.
    mode: answer_only (scoring's prompts) or cot (they end at the generation prompt);
    limit: the sample size ("train": train.max_examples / train.valid_examples);
    picked: the sample, when the caller drew it already."""
    from siren_batch.prompts import build_prompts

    if split not in ("train", "valid"):
        raise ValueError(f"training reads the train and valid splits only, not {split!r}: "
                         "test stays unseen until the trained model is scored")
    if limit == "train":
        limit = cfg.train.max_examples if split == "train" else cfg.train.valid_examples
    if picked is None:
        picked = sample_groups(examples.where(F.col("split") == split), limit, cfg.train.seed)
    prompt_cfg = dataclasses.replace(cfg.prompts, tokenizer=cfg.train.base_model, splits=[split],
                                     variants=[cfg.train.variant], modes=[mode])
    history = interactions if cfg.train.variant == "raw" else None
    prompts = build_prompts(picked, items, prompt_cfg, cfg.sketches.theta, history)
    base = with_base(picked, interactions, split, cfg)
    return (prompts.join(base, on=["user_id", "item_id"], how="left")
            .select(*ROW_COLUMNS))


def training_rows(spark: SparkSession, cfg: Config, split: str):
    """pandas (ROW_COLUMNS) for `split`, sorted by user_id, item_id (a stable order
    whatever Spark's partitioning)."""
    if split == "valid" and cfg.train.valid_examples == 0:
        import pandas as pd

        return pd.DataFrame({c: [] for c in ROW_COLUMNS})
    examples = read_table(spark, cfg, "example_sketches", schemas.EXAMPLE_SKETCHES)
    items = read_table(spark, cfg, "items", schemas.ITEMS)
    interactions = history_for(spark, cfg, split)   # valid: never later nights' rows
    rows = training_frame(examples, items, interactions, cfg, split).toPandas()
    rows = rows.sort_values(["user_id", "item_id"], kind="stable").reset_index(drop=True)
    logger.info("%s rows for training: %d (limit %s), mean base %.3f", split, len(rows),
                cfg.train.max_examples if split == "train" else cfg.train.valid_examples,
                rows["base"].mean() if len(rows) else float("nan"))
    return rows


def evidence(picked: DataFrame, items: DataFrame, item_topics: DataFrame, topics: DataFrame) -> DataFrame:
    """(user_id, item_id, evidence): the JSON that cot.rationale cites: the candidate's
    text and topic name, the liked and disliked topics with their means, the recent
    ratings and the as-of priors of each example sketch."""
    names = item_topics.join(topics.select("topic_id", F.col("name").alias("candidate_topic")), "topic_id")
    text = F.when(F.col("genres").isNotNull(), F.concat_ws(", ", "title", "genres")).otherwise(F.col("title"))
    cand = items.select("item_id", text.alias("candidate")).join(names.select("item_id", "candidate_topic"),
                                                                 "item_id", "left")
    topic = lambda t: F.struct(t["name"].alias("name"), t["mean"].alias("mean"))   # noqa: E731
    body = F.struct("candidate", "candidate_topic", F.transform("liked", topic).alias("liked"),
                    F.transform("disliked", topic).alias("disliked"),
                    F.transform("recent", lambda r: r["rating"]).alias("recent"),
                    "user_mean", "item_mean", "item_count")
    return picked.join(cand, "item_id", "left").select("user_id", "item_id", F.to_json(body).alias("evidence"))


def cot_rows(spark: SparkSession, cfg: Config, split: str, limit: int | None):
    """pandas (ROW_COLUMNS + evidence) of `split` with chain-of-thought prompts (the
    answer-only prompt is prompt + prompts.ANSWER_ONLY_SUFFIX), a seeded sample of
    `limit` rows, sorted by user_id, item_id. For stage 1 (GRPO) and stage 2 (align)."""
    examples = read_table(spark, cfg, "example_sketches", schemas.EXAMPLE_SKETCHES)
    items = read_table(spark, cfg, "items", schemas.ITEMS)
    interactions = history_for(spark, cfg, split)   # valid: never later nights' rows
    picked = sample_groups(examples.where(F.col("split") == split), limit, cfg.train.seed).cache()
    frame = training_frame(examples, items, interactions, cfg, split, mode="cot", picked=picked)
    ev = evidence(picked, items, read_table(spark, cfg, "item_topics", schemas.ITEM_TOPICS),
                  read_table(spark, cfg, "topics", schemas.TOPICS))
    rows = frame.join(ev, ["user_id", "item_id"], "left").toPandas()
    picked.unpersist()
    rows = rows.sort_values(["user_id", "item_id"], kind="stable").reset_index(drop=True)
    logger.info("%s chain-of-thought rows: %d (limit %s)", split, len(rows), limit)
    return rows
