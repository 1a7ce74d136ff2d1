"""The night's calibrate, score, evaluate and report steps (siren_batch.nightly)."""

from __future__ import annotations

import dataclasses
import logging

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from siren_batch import schemas
from siren_batch.config import Config
from siren_batch.nightly.night import (ARRIVED_INTERACTIONS, ARRIVED_ITEMS, DAY_MS, Night, _partition,
                                       day_end_ms, state_dir)
from siren_batch.warehouse import RunRecord, on_local_disk, read_table, table_exists, write_table

logger = logging.getLogger(__name__)


def newest_candidates(interactions: DataFrame, arrived_items: DataFrame, items: DataFrame,
                      n: int, end_ms: int, active_days: int) -> DataFrame:
    """(user_id, item_id): users with an interaction in the `active_days` before end_ms
    x the n newest items (latest arrival night, then latest first rating; items never
    rated count as newest), less the pairs already rated."""
    first_seen = arrived_items.groupBy("item_id").agg(F.min("run_date").alias("_seen"))
    first_ts = interactions.groupBy("item_id").agg(F.min("ts").alias("_first_ts"))
    newest = (items.select("item_id").join(first_seen, "item_id", "left").join(first_ts, "item_id", "left")
              .orderBy(F.col("_seen").desc_nulls_last(), F.col("_first_ts").desc_nulls_first(), "item_id")
              .limit(n).select("item_id"))
    active = (interactions.where(F.col("ts") >= F.lit(end_ms - active_days * DAY_MS))
              .select("user_id").distinct())
    return (active.crossJoin(F.broadcast(newest))
            .join(interactions.select("user_id", "item_id"), on=["user_id", "item_id"], how="left_anti"))


def calibrate_step(spark: SparkSession, cfg: Config, night: Night, rec: RunRecord) -> dict:
    """Fit the calibrator the score step applies, when the warehouse has none for this model and
    these prompts: on the first night, and on the first after score.model, score.adapter or a
    prompt setting changed. It sketches the valid split (the bootstrap's leave-last-out one, as of
    strictly before each pair), scores it into ratings/run_date=1970-01-01 (VALID_RUN_DATE, whatever
    calibrate.run_date says: a night's partition is never the valid one) and fits
    (calibration.score_and_calibrate). Every other night keeps the stored calibrator."""
    from siren_batch.calibration import calibrator_dir, left_out_of_chains, score_and_calibrate, why_fit

    off = left_out_of_chains(cfg) or ("nightly.candidates=none" if cfg.nightly.candidates == "none" else None)
    if off:
        return {"skipped": off}
    reason = why_fit(spark, cfg)
    if reason is None:
        return {"kept": calibrator_dir(cfg)}
    logger.info("nightly %s calibrate: %s: fitting one on the valid split", night.run_date, reason)
    rec.reads = ["interactions", "items", "item_topics", "topics"]
    rec.writes = ["example_sketches", "ratings", "calibrators"]
    rec.input_rows = _valid_sketches(spark, cfg)
    summary = score_and_calibrate(spark, dataclasses.replace(
        cfg, calibrate=dataclasses.replace(cfg.calibrate, run_date=None)))   # None: VALID_RUN_DATE
    rec.output_rows = summary["valid_scored"]["rows"]
    return {"reason": reason, "valid_sketches": rec.input_rows, **summary}


def _valid_sketches(spark: SparkSession, cfg: Config) -> int:
    """The valid split's example sketches, which score-calibrate reads (nights build serving
    sketches only), built afresh: a re-fit of the topics or new sketches.* settings since the
    last fit change them. The rows of other splits (a `siren-batch sketches` run's training
    rows) stay as they are."""
    from siren_batch.pipeline import sketch_inputs
    from siren_batch.sketches import example_sketches

    valid_only = dataclasses.replace(cfg.sketches, example_splits=["valid"])
    rows = example_sketches(*sketch_inputs(spark, cfg), valid_only)
    kept = 0
    if table_exists(spark, cfg, "example_sketches"):
        others = read_table(spark, cfg, "example_sketches", schemas.EXAMPLE_SKETCHES).where(F.col("split") != "valid")
        kept = others.count()
        rows = others.unionByName(rows)
    return write_table(rows, cfg, "example_sketches", schemas.EXAMPLE_SKETCHES) - kept


def score_step(spark: SparkSession, cfg: Config, night: Night, rec: RunRecord) -> dict:
    from siren_batch.ratings import score_run

    source = cfg.nightly.candidates
    rec.reads = ["sketches", "interactions", "items"]
    if source == "none":
        return {"skipped": "nightly.candidates=none"}
    if source.startswith("newest:"):
        path = f"{state_dir(cfg, night.run_date)}/candidates"
        pairs = newest_candidates(read_table(spark, cfg, "interactions", schemas.INTERACTIONS),
                                  read_table(spark, cfg, "arrived_items", ARRIVED_ITEMS),
                                  read_table(spark, cfg, "items", schemas.ITEMS),
                                  int(source.split(":", 1)[1]), night.end_ms, cfg.nightly.active_days)
        pairs.orderBy("user_id", "item_id").write.mode("overwrite").parquet(path)
    else:
        path = source.replace("{run_date}", night.run_date)
        rec.reads.append(path)
    night_cfg = dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, candidates=path,
                                                                   run_date=night.run_date))
    summary = score_run(spark, night_cfg)
    rec.writes = ["ratings"]
    rec.input_rows = rec.output_rows = summary["rows"]
    rec.rejected_rows = summary["errors"]
    return {**summary, "candidates": path}


def evaluate_step(spark: SparkSession, cfg: Config, night: Night, rec: RunRecord) -> dict:
    """The newest earlier night's ratings partition against tonight's arrivals for its pairs
    (not the calibrate step's valid scores)."""
    from siren_batch.baselines import baseline_predictions
    from siren_batch.calibration import VALID_RUN_DATE
    from siren_batch.evaluate import evaluate_systems, llm_systems
    from siren_batch.pipeline import replace_evaluation

    rec.reads, rec.writes = ["ratings", "arrived_interactions", "interactions"], ["metrics"]
    if not table_exists(spark, cfg, "ratings"):
        return {"skipped": "no ratings yet"}
    ratings = read_table(spark, cfg, "ratings", schemas.RATINGS)
    earlier = [r[0] for r in ratings.where((F.col("run_date") < night.run_date)
                                           & (F.col("run_date") != VALID_RUN_DATE))
               .select("run_date").distinct().collect()]
    if not earlier:
        return {"skipped": "no earlier ratings"}
    scored_on = max(earlier)
    preds = ratings.where(F.col("run_date") == scored_on)
    arrived = _partition(spark, cfg, "arrived_interactions", ARRIVED_INTERACTIONS, night.run_date)
    truth = arrived.join(preds.select("user_id", "item_id"), on=["user_id", "item_id"], how="left_semi")
    n_truth = truth.count()
    if n_truth == 0:
        return {"skipped": f"no truth arrived tonight for the ratings of {scored_on}", "scored_on": scored_on}
    # What was known when those ratings were made, plus tonight's truth as the test split.
    known_end = day_end_ms(scored_on)
    known = (read_table(spark, cfg, "interactions", schemas.INTERACTIONS)
             .where(F.col("ts") < known_end).withColumn("split", F.lit("train"))
             .join(truth.select("user_id", "item_id"), on=["user_id", "item_id"], how="left_anti"))
    view = known.unionByName(truth.withColumn("split", F.lit("test"))).cache()
    ev_cfg = dataclasses.replace(cfg.evaluate, split="test", missing="count")
    eval_id = f"nightly-{night.run_date}"
    in_truth = preds.join(truth.select("user_id", "item_id"), on=["user_id", "item_id"], how="left_semi")
    model = preds.select("model_id").first()
    systems = llm_systems(in_truth, cfg.evaluate.system or f"llm:{model.model_id.rstrip('/').split('/')[-1]}")
    systems.update({f"baseline:{name}": p for name, p in baseline_predictions(view, "test", ev_cfg).items()})
    metrics = evaluate_systems(systems, view, ev_cfg, eval_id).localCheckpoint()
    replace_evaluation(spark, cfg, metrics, eval_id)
    view.unpersist()
    rec.input_rows, rec.output_rows = n_truth, metrics.count()
    overall = {r.system: r.value for r in metrics.where((F.col("segment") == "all") & (F.col("metric") == "mae"))
               .collect()}
    return {"eval_id": eval_id, "scored_on": scored_on, "truth_pairs": n_truth, "mae": overall}


def report_step(spark: SparkSession, cfg: Config, night: Night, rec: RunRecord) -> dict:
    from siren_batch.report import write_report

    if not on_local_disk(spark, cfg.warehouse):   # the report reads tables and writes pages on a local disk
        logger.warning("nightly report skipped: the warehouse %s is not on this machine's disk; run "
                       "`siren-batch report` where it is mounted, or set nightly.report=false", cfg.warehouse)
        return {"skipped": f"warehouse {cfg.warehouse} is not local"}
    rec.reads, rec.writes = ["metrics", "runs", "ratings", "night_rejects"], ["reports"]
    return write_report(cfg, run_date=night.run_date)


