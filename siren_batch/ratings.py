"""The scoring run that writes the `ratings` table (partitioned by run_date).

candidates -> (sketch, item) join -> answer-only prompts -> backend -> ratings

- Candidates: `split:valid|test` scores the labelled pairs of that split with
  their leak-free example sketches; anything else is a Parquet path of
  (user_id, item_id) pairs scored with the serving sketches (nightly use).
- Unknown users or items become rows with an `error`, never silently dropped:
  ratings rows = candidate rows, always.
- Work is cut into chunks by a hash of user_id (a user's prompts stay together,
  so shared prefixes stay in one batch). Each finished chunk is committed to a
  staging folder; a crashed run started again with the same run_date, config
  and candidate pairs skips the committed chunks. The staged rows must equal the
  candidate rows before the run_date partition is replaced, atomically, at the
  end: no duplicates, never a half-written partition.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from siren_batch import schemas
from siren_batch.assets import llm_id, training_meta
from siren_batch.config import Config
from siren_batch.console import Progress
from siren_batch.spark import task_cpus
from siren_batch.timers import StageTimers
from siren_batch.warehouse import (delete_path, list_dir, move_path, parquet_rows, path_exists, read_table,
                                   read_text, run_record, write_table, write_text)

logger = logging.getLogger(__name__)

SCORED_COLUMNS = ["rating", "rating_median", "rating_argmax", "probs", "prompt_tokens", "output_tokens",
                  "model_id", "adapter_id", "error"]


def candidate_pairs(spark: SparkSession, cfg: Config) -> tuple[DataFrame, DataFrame]:
    """(pairs with sketch columns, history) for the configured candidates.

    pairs: user_id, item_id, split, label, ts (null for nightly), sketch body,
    the item's as-of prior (item_count, item_mean), plus `error` for pairs that
    cannot be prompted (unknown user or item)."""
    from siren_batch.sketches import item_priors

    history = read_table(spark, cfg, "interactions", schemas.INTERACTIONS)
    items = read_table(spark, cfg, "items", schemas.ITEMS).select("item_id")
    source = cfg.score.candidates
    if source.startswith("split:"):
        split = source.split(":", 1)[1]
        pairs = (read_table(spark, cfg, "example_sketches", schemas.EXAMPLE_SKETCHES)
                 .where(F.col("split") == split)
                 .withColumn("error", F.lit(None).cast("string")))
        return pairs, history
    cands = spark.read.parquet(source)
    missing = {"user_id", "item_id"} - set(cands.columns)
    if missing:
        raise ValueError(f"candidates at {source} lack columns {sorted(missing)}")
    cands = cands.select(F.col("user_id").cast("string"), F.col("item_id").cast("string"))
    sketch = read_table(spark, cfg, "sketches", schemas.SKETCHES).drop("as_of_ts")
    known_item = items.withColumn("_item_known", F.lit(True))
    pairs = (cands.join(sketch, on="user_id", how="left")
             .join(known_item, on="item_id", how="left")
             .join(item_priors(history), on="item_id", how="left")
             .withColumn("item_count", F.coalesce("item_count", F.lit(0)))
             .withColumn("error", F.when(F.col("n_history").isNull(), F.lit("unknown_user"))
                         .when(F.col("_item_known").isNull(), F.lit("unknown_item")))
             .withColumn("split", F.lit("candidates"))
             .withColumn("label", F.lit(None).cast("double"))
             .drop("_item_known"))
    return pairs, history


def _prompts_for(pairs: DataFrame, history: DataFrame, cfg: Config, spark: SparkSession,
                 timers: StageTimers | None = None, count_tokens: bool = False) -> DataFrame:
    from siren_batch.prompts import build_prompts

    prompt_cfg = dataclasses.replace(cfg.prompts, tokenizer=cfg.score.model,
                                     variants=[cfg.score.variant], modes=[cfg.score.mode])
    items = read_table(spark, cfg, "items", schemas.ITEMS)
    # The score stage's backend tokenizes every prompt and reports prompt_tokens itself, so by
    # default there is no count here; the probe, which reads states, asks for it.
    return build_prompts(pairs, items, prompt_cfg, cfg.sketches.theta, history, timers, count_tokens)


def _error_rows(pairs: DataFrame) -> DataFrame:
    nulls = {c: F.lit(None) for c in SCORED_COLUMNS if c != "error"}
    return pairs.select("user_id", "item_id", "error").withColumns(nulls)


def _chunked(df: DataFrame, n_chunks: int) -> DataFrame:
    return df.withColumn("_chunk", F.pmod(F.xxhash64("user_id"), F.lit(n_chunks)).cast("int"))


def score_run(spark: SparkSession, cfg: Config) -> dict:
    """Score the candidates and replace ratings/run_date=<date>. Resumable. The summary's
    `timings` say where the time went (TASK_PHASES, DRIVER_PHASES)."""
    from siren_batch.prompts import prompt_template_hash
    from siren_batch.scoring import score_frame

    from siren_batch.calibration import load_if_present

    run_date = cfg.score.run_date or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    load_if_present(spark, cfg)  # a calibrator fit for other settings fails here, not after the scoring
    training = training_meta(cfg)
    check_prompts_match_training(cfg, training)
    trained_prefill = training.get("think_prefill")
    if cfg.score.mode == "cot" and trained_prefill is not None and trained_prefill != cfg.prompts.think_prefill:
        logger.warning("the model was trained with prompts.think_prefill=%s, scored with %s: set "
                       "prompts.think_prefill=%s for the prompts it learned", trained_prefill,
                       cfg.prompts.think_prefill, trained_prefill)
    staging = f"{cfg.warehouse.rstrip('/')}/{cfg.dataset}/_staging/ratings-{run_date}"
    timers = StageTimers(spark, TASK_PHASES)
    with run_record(spark, cfg, "score") as rec:
        split = cfg.score.candidates.startswith("split:")
        rec.reads = ["example_sketches" if split else "sketches", "interactions", "items",
                     *([] if split else [cfg.score.candidates])]
        rec.writes = ["ratings"]
        with timers.phase("candidate_join"):
            pairs, history = candidate_pairs(spark, cfg)
            if cfg.score.limit:
                pairs = pairs.orderBy(F.xxhash64("user_id", "item_id"), "user_id", "item_id").limit(cfg.score.limit)
            # Unpersisted below: a cached plan outlives the run, and Spark would answer the next
            # run's identical read of rewritten tables (a later night in one session) from it.
            pairs = pairs.cache()
            total, checksum = pairs.agg(F.count("*"), F.sum(F.xxhash64("user_id", "item_id")
                                                             .cast("decimal(38,0)"))).first()
        try:
            rec.input_rows = total
            _check_staging(spark, staging, cfg, f"{total}:{checksum}")
            n_chunks = max(1, math.ceil(total / cfg.score.chunk_rows))
            ok_pairs = _chunked(pairs.where(F.col("error").isNull()), n_chunks)
            bad_pairs = pairs.where(F.col("error").isNotNull())
            done = set(list_dir(spark, f"{staging}/chunks"))
            progress = Progress(total=total, every_s=cfg.score.progress_every_s)
            for chunk in range(n_chunks):
                name = f"chunk={chunk:05d}"
                if name in done:
                    logger.info("resume: %s already committed, skipping", name)
                    continue
                part = ok_pairs.where(F.col("_chunk") == chunk).drop("_chunk")
                prompt_rows = _prompts_for(part, history, cfg, spark, timers)
                scored = score_frame(prompt_rows.select("user_id", "item_id", "prompt"), cfg.score, timers)
                tmp = f"{staging}/tmp-{name}"
                with timers.phase("chunk_jobs"):
                    scored.select("user_id", "item_id", *SCORED_COLUMNS).write.mode("overwrite").parquet(tmp)
                with timers.phase("chunk_commits"):
                    move_path(spark, tmp, f"{staging}/chunks/{name}")
                    progress.update(parquet_rows(spark, f"{staging}/chunks/{name}"))
            with timers.phase("finish"):
                summary = _finish(spark, cfg, staging, bad_pairs, run_date, prompt_template_hash(cfg), rec.run_id,
                                  training, total)
        finally:   # also when a chunk or the finish fails: a cached plan outlives the run
            pairs.unpersist()
        rec.output_rows, rec.rejected_rows = summary["rows"], summary["errors"]
        if summary["rows"] != total:
            raise RuntimeError(f"ratings rows {summary['rows']} != candidate rows {total}")
    summary["rows_per_s"] = round(summary["rows"] / max(rec.duration_s, 1e-9), 2)
    summary["timings"] = {"seconds": round(rec.duration_s, 3), "task_slots": _task_slots(spark),
                          "driver_s": {k: round(v, 3) for k, v in timers.driver.items()},
                          "task_s": {k: round(v, 3) for k, v in timers.task_seconds().items()}}
    logger.info("score summary: %s", summary)
    return summary


# Where the score stage's time goes. Driver phases are wall seconds: the candidate join
# (pairs + sketches + items + priors, cached and counted), the Spark jobs that render,
# score and write each chunk, the chunk commits (rename + count) and the finish (the
# ratings partition swapped in). Task phases are task-seconds inside those chunk jobs:
# input waits (shuffle read, sort, Arrow -> pandas) and output hand-offs (pandas -> Arrow)
# of the two Python steps, prompt rendering, the backend's tokenizing and the rest of its
# call, and the output frame.
DRIVER_PHASES = ("candidate_join", "chunk_jobs", "chunk_commits", "finish")
TASK_PHASES = ("render_input", "render", "render_output", "score_input", "backend_tokenize", "backend_forward",
               "score_results", "score_output")


def _task_slots(spark: SparkSession) -> int:
    return max(1, spark.sparkContext.defaultParallelism // task_cpus(spark))


# What the committed chunks depend on: a change elsewhere (training, evaluation) keeps them.
SCORING_SECTIONS = ("dataset", "warehouse", "data", "embed", "topics", "sketches", "prompts", "score")


def _check_staging(spark: SparkSession, staging: str, cfg: Config, inputs: str) -> None:
    """Resume only a run with the same scoring config and the same candidate pairs
    (`inputs`: their count and a checksum); otherwise start clean."""
    marker = f"{staging}/_config_hash"
    digest = f"{cfg.hash(*SCORING_SECTIONS)}:{inputs}"
    if path_exists(spark, marker) and read_text(spark, marker).strip() != digest:
        logger.warning("staging at %s is from another config or other candidates: discarding it", staging)
        delete_path(spark, staging)
    if not path_exists(spark, marker):
        write_text(spark, marker, digest)


def _finish(spark, cfg: Config, staging: str, bad_pairs: DataFrame, run_date: str,
            template_hash: str, run_id: str, training: dict, expected: int) -> dict:
    from siren_batch.calibration import CALIBRATED, apply_calibrator, load_if_present

    chunks = f"{staging}/chunks" if list_dir(spark, f"{staging}/chunks") else None
    staged = (parquet_rows(spark, chunks) if chunks else 0) + bad_pairs.count()
    if staged != expected:   # checked before the partition is replaced, so readers never see it
        raise RuntimeError(f"staged ratings rows {staged} != candidate rows {expected}: ratings run_date="
                           f"{run_date} left as it was; delete {staging} and score again")

    meta = {"prompt_template_hash": F.lit(template_hash), "run_id": F.lit(run_id),
            "run_date": F.lit(run_date)}
    parts = [_error_rows(bad_pairs).withColumns(meta)]
    if chunks:
        parts.append(spark.read.parquet(chunks).drop("chunk").withColumns(meta))
    out = parts[0]
    for extra in parts[1:]:
        out = out.unionByName(extra, allowMissingColumns=True)
    out = out.withColumn("model_id", F.coalesce("model_id", F.lit(llm_id(cfg.score.model))))
    if training.get("target") == "residual":
        logger.info("residual model: adding the user+item bias prediction back to its ratings")
        out = add_base_back(spark, cfg, out, training)
    calibrator = load_if_present(spark, cfg)
    if calibrator is not None and cfg.score.candidates == "split:valid":
        logger.info("calibrator at %s not applied: it was fit on the valid split these pairs come from, so "
                    "its columns would be in-sample", calibrator.meta["loaded_from"])
        calibrator = None
    if calibrator is not None:
        logger.info("applying the calibrator stored at %s", calibrator.meta["loaded_from"])
        out = apply_calibrator(spark, cfg, out, calibrator)
    else:
        out = out.withColumns({c: F.lit(None).cast(schemas.RATINGS[c].dataType) for c in CALIBRATED})
    rows = write_table(out, cfg, "ratings", schemas.RATINGS, partition_by=["run_date"])
    written = read_table(spark, cfg, "ratings", schemas.RATINGS).where(F.col("run_date") == run_date)
    agg = written.agg(F.count("*").alias("rows"), F.count("error").alias("errors"),
                      F.sum("prompt_tokens").alias("prompt_tokens"),
                      F.sum("output_tokens").alias("output_tokens")).first()
    by_error = errors_by_reason(written)
    delete_path(spark, staging)
    return {"run_date": run_date, "rows": int(agg.rows or rows), "errors": int(agg.errors),
            "errors_by_reason": by_error, "prompt_tokens": int(agg.prompt_tokens or 0),
            "output_tokens": int(agg.output_tokens or 0), "table": cfg.table_path("ratings")}



def check_prompts_match_training(cfg: Config, training: dict) -> None:
    """A trained model is scored with the prompts it learned: its prompt variant, and
    whether the as-of priors were in them (recorded since 2026-11-27; older runs say nothing)."""
    trained = {"score.variant": training.get("variant"), "prompts.priors": training.get("priors")}
    now = {"score.variant": cfg.score.variant, "prompts.priors": cfg.prompts.priors}
    differ = [f"{key}={trained[key]} (now {now[key]})" for key in trained
              if trained[key] is not None and trained[key] != now[key]]
    if differ:
        raise ValueError(f"the model was trained on other prompts: set {', '.join(differ)} to score it "
                         "with the prompts it learned")


def errors_by_reason(ratings: DataFrame) -> dict[str, int]:
    """{reason: rows} over the rows with an error; a reason is the error's text before its
    first ':' (`prompt_too_long: 9000 tokens > 8192` counts as prompt_too_long)."""
    return {r.reason: r["count"] for r in ratings.where(F.col("error").isNotNull())
            .groupBy(F.split("error", ":")[0].alias("reason")).count().collect()}


def add_base_back(spark: SparkSession, cfg: Config, out: DataFrame, training: dict) -> DataFrame:
    """A residual model's ratings on the label scale: rating and rating_median become
    clip(base + value - midpoint), rating_argmax the scale point nearest base + argmax -
    midpoint, and `probs` the model's distribution over the residual moved by base -
    midpoint onto the scale (rebin). base = the user+item bias prediction, fit as for
    training: on train for split:valid, on train + valid for split:test, on every
    interaction for candidates."""
    from siren_batch.baselines import clip
    from siren_batch.train.data import with_base

    scale = [float(s) for s in training.get("scale", ["1", "2", "3", "4", "5"])]
    midpoint = (scale[0] + scale[-1]) / 2
    source = cfg.score.candidates
    split = source.split(":", 1)[1] if source.startswith("split:") else None
    from siren_batch.features import history_for   # a labelled split's base: as in training

    bases = with_base(out.select("user_id", "item_id").dropDuplicates(), history_for(spark, cfg, split), split, cfg)
    # clip() is least/greatest, which skip nulls: an error row's null must stay null.
    shifted = {c: F.when(F.col(c).isNotNull(), clip(F.col(c) + F.col("base") - F.lit(midpoint)))
               for c in ("rating", "rating_median")}
    shifted["rating_argmax"] = F.when(F.col("rating_argmax").isNotNull(),
                                      clip(F.round(F.col("rating_argmax") + F.col("base") - F.lit(midpoint))))
    shifted["probs"] = F.when(F.col("probs").isNotNull(),
                              rebin(F.col("probs"), F.col("base") - F.lit(midpoint), scale))
    return out.join(bases, on=["user_id", "item_id"], how="left").withColumns(shifted).drop("base")


def rebin(probs: Column, shift: Column, scale: list[float]) -> Column:
    """A distribution over the (unit-spaced) scale points moved by `shift`: each point's
    mass goes to its new place, clipped to the scale, split between the two nearest
    points in proportion to nearness (objective.two_hot, the training targets' rule).
    It still sums to 1, and its mean moves by exactly `shift` unless clipping stops it."""
    from siren_batch.baselines import clip

    moved = [clip(F.lit(v) + shift, scale[0], scale[-1]) for v in scale]
    return F.array(*[sum((F.element_at(probs, k + 1) * F.greatest(F.lit(0.0), 1 - F.abs(x - F.lit(point)))
                          for k, x in enumerate(moved)), F.lit(0.0))
                     for point in scale])
