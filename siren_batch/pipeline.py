"""The stages: each reads its input tables by name, calls pure library
functions, writes its output tables atomically and appends a run record.

    ingest -> embed -> topics -> sketches -> prompts -> [score-calibrate] -> score -> evaluate

Every stage function has the signature `(spark, cfg) -> dict` (a summary of
counts that the CLI prints) so the CLI, the jobs/ entry points and the tests
drive them the same way.
"""

from __future__ import annotations

import logging
from typing import Callable

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from siren_batch import schemas
from siren_batch.config import Config
from siren_batch.train import stages as train_stages
from siren_batch.warehouse import read_table, run_record, write_table

logger = logging.getLogger(__name__)


def ingest(spark: SparkSession, cfg: Config) -> dict:
    """Raw source -> interactions, items, rejects (input rows = kept + rejected)."""
    from siren_batch.data import RejectsExceeded, check_dry_run_target, check_reject_fraction, ingest as read_source

    check_dry_run_target(spark, cfg)
    with run_record(spark, cfg, "ingest") as rec:
        rec.reads = [f"{cfg.data.source}:{cfg.data.path or 'bundled'}"]
        rec.writes = ["rejects", "interactions", "items"]
        result = read_source(spark, cfg)
        counts = result.counts
        write_table(result.rejects, cfg, "rejects", schemas.REJECTS)
        rec.output_rows = write_table(result.interactions, cfg, "interactions", schemas.INTERACTIONS)
        items = write_table(result.items, cfg, "items", schemas.ITEMS)
        # The run record is about interactions, so that input = output + rejected holds
        # there too; the rejects table also holds the item rejects (counts: rejected_items).
        # A dry run's sampled-out rows (data.sample_users) are in the summary and the log.
        rec.input_rows = counts["input_interactions"] - counts["sampled_out_interactions"]
        rec.rejected_rows = counts["rejected_interactions"]
        summary = {**counts, "items_written": items}
        logger.info("ingest counts: %s", summary)
        try:
            check_reject_fraction(counts, cfg.data.max_reject_fraction)
        except RejectsExceeded:
            logger.error("rejects table kept at %s for inspection", cfg.table_path("rejects"))
            raise
    return summary


def embed(spark: SparkSession, cfg: Config) -> dict:
    from siren_batch.embed import embed_items

    with run_record(spark, cfg, "embed") as rec:
        rec.reads, rec.writes = ["items"], ["item_embeddings"]
        items = read_table(spark, cfg, "items", schemas.ITEMS)
        rec.input_rows = items.count()
        rec.output_rows = write_table(embed_items(items, cfg.embed), cfg, "item_embeddings",
                                      schemas.ITEM_EMBEDDINGS)
    return {"items": rec.input_rows, "embeddings": rec.output_rows}


def topics(spark: SparkSession, cfg: Config) -> dict:
    from siren_batch.topics import build_topics

    with run_record(spark, cfg, "topics") as rec:
        rec.reads, rec.writes = ["item_embeddings", "items"], ["topics", "item_topics"]
        embeddings = read_table(spark, cfg, "item_embeddings", schemas.ITEM_EMBEDDINGS)
        items = read_table(spark, cfg, "items", schemas.ITEMS)
        topic_df, item_topics = build_topics(embeddings, items, cfg.topics)
        topic_df = topic_df.cache()
        write_table(topic_df, cfg, "topics", schemas.TOPICS)
        rec.input_rows = embeddings.count()
        rec.output_rows = write_table(item_topics, cfg, "item_topics", schemas.ITEM_TOPICS)
        names = [r.name for r in topic_df.orderBy("topic_id").collect()]
    return {"items": rec.output_rows, "topics": len(names), "names": names}


def sketch_inputs(spark: SparkSession, cfg: Config) -> tuple[DataFrame, ...]:
    return (read_table(spark, cfg, "interactions", schemas.INTERACTIONS),
            read_table(spark, cfg, "items", schemas.ITEMS),
            read_table(spark, cfg, "item_topics", schemas.ITEM_TOPICS),
            read_table(spark, cfg, "topics", schemas.TOPICS))


def sketches(spark: SparkSession, cfg: Config) -> dict:
    """Example sketches (as of strictly before each target) and serving sketches
    (as of the end of all history, for nightly scoring of new candidates)."""
    from siren_batch.sketches import example_sketches, serving_sketches

    with run_record(spark, cfg, "sketches") as rec:
        rec.reads, rec.writes = ["interactions", "items", "item_topics", "topics"], ["example_sketches", "sketches"]
        interactions, items, item_topics, topic_df = sketch_inputs(spark, cfg)
        rec.input_rows = interactions.count()
        examples = example_sketches(interactions, items, item_topics, topic_df, cfg.sketches)
        n_examples = write_table(examples, cfg, "example_sketches", schemas.EXAMPLE_SKETCHES)
        serving = serving_sketches(interactions, items, item_topics, topic_df, cfg.sketches)
        n_users = write_table(serving, cfg, "sketches", schemas.SKETCHES)
        rec.output_rows = n_examples + n_users
    return {"interactions": rec.input_rows, "example_sketches": n_examples, "serving_sketches": n_users}


def prompts(spark: SparkSession, cfg: Config) -> dict:
    """Prompts for the labelled pairs of prompts.splits, every variant x mode."""
    from siren_batch.prompts import build_prompts

    with run_record(spark, cfg, "prompts") as rec:
        rec.reads, rec.writes = ["example_sketches", "items", "interactions"], ["prompts"]
        examples = read_table(spark, cfg, "example_sketches", schemas.EXAMPLE_SKETCHES)
        pairs = examples.where(F.col("split").isin(cfg.prompts.splits))
        items = read_table(spark, cfg, "items", schemas.ITEMS)
        history = read_table(spark, cfg, "interactions", schemas.INTERACTIONS)
        out = build_prompts(pairs, items, cfg.prompts, cfg.sketches.theta, history)
        rec.input_rows = pairs.count()
        rec.output_rows = write_table(out, cfg, "prompts", schemas.PROMPTS)
        stats = (read_table(spark, cfg, "prompts", schemas.PROMPTS)
                 .groupBy("variant", "mode")
                 .agg(F.count("*").alias("n"), F.round(F.avg("prompt_tokens"), 1).alias("mean_tokens"))
                 .orderBy("variant", "mode").collect())
    return {"pairs": rec.input_rows, "prompts": rec.output_rows,
            "tokens": {f"{r.variant}/{r.mode}": {"n": r.n, "mean_tokens": r.mean_tokens} for r in stats}}


def score(spark: SparkSession, cfg: Config) -> dict:
    from siren_batch.ratings import score_run

    return score_run(spark, cfg)


def _latest_ratings(spark: SparkSession, cfg: Config) -> tuple[str, DataFrame]:
    ratings = read_table(spark, cfg, "ratings", schemas.RATINGS)
    run_date = cfg.evaluate.run_date or ratings.agg(F.max("run_date")).first()[0]
    if run_date is None:
        raise FileNotFoundError(f"ratings at {cfg.table_path('ratings')} is empty: run `siren-batch score` first")
    return run_date, ratings.where(F.col("run_date") == run_date)


def _truth_scope(interactions: DataFrame, ratings: DataFrame, cfg: Config) -> DataFrame:
    """evaluate.scope=scored keeps only the truth pairs present in the ratings
    partition (a sampled run), for every system alike; other splits stay whole."""
    if cfg.evaluate.scope == "all":
        return interactions
    scored = ratings.select("user_id", "item_id").withColumn("_scored", F.lit(True))
    in_scope = (F.col("split") != cfg.evaluate.split) | F.col("_scored").isNotNull()
    return (interactions.join(scored, on=["user_id", "item_id"], how="left")
            .where(in_scope).drop("_scored"))


def evaluate(spark: SparkSession, cfg: Config) -> dict:
    """The newest ratings partition and every configured baseline against the
    truth of evaluate.split -> metrics (appended by eval_id) and reports/."""
    from siren_batch.baselines import baseline_predictions
    from siren_batch.evaluate import PAPER_ROWS, evaluate_systems, llm_systems, markdown_report, nll_metric
    from siren_batch.features import bootstrap_history
    from siren_batch.warehouse import write_text

    with run_record(spark, cfg, "evaluate") as rec:
        rec.reads, rec.writes = ["interactions", "ratings"], ["metrics", "reports"]
        # After some nights the baselines still learn only from what the split was cut from.
        interactions = bootstrap_history(spark, cfg).cache()
        run_date, ratings = _latest_ratings(spark, cfg)
        model = ratings.select("model_id").first()
        llm = cfg.evaluate.system or f"llm:{(model.model_id if model else cfg.score.model).rstrip('/').split('/')[-1]}"
        systems = llm_systems(ratings, llm)
        truth = _truth_scope(interactions, ratings, cfg)
        in_scope = truth.where(F.col("split") == cfg.evaluate.split).select("user_id", "item_id")
        # Baselines predict every pair of the split; keep those in scope (all of them by default).
        systems.update({f"baseline:{name}": preds.join(in_scope, on=["user_id", "item_id"], how="left_semi")
                        for name, preds in
                        baseline_predictions(interactions, cfg.evaluate.split, cfg.evaluate).items()})
        eval_id = f"{run_date}-{rec.run_id}"
        parts = [evaluate_systems(systems, truth, cfg.evaluate, eval_id, history=interactions)]
        parts += [nll_metric(ratings, interactions, cfg.evaluate.split, probs, f"{llm}{suffix}", eval_id)
                  for probs, suffix in (("probs", ""), ("calibrated_probs", "+calibrated"))
                  if f"{llm}{suffix}" in systems]
        metrics = parts[0]
        for part in parts[1:]:
            metrics = metrics.unionByName(part)
        metrics = metrics.cache()
        rec.input_rows = ratings.count()
        rec.output_rows = replace_evaluation(spark, cfg, metrics, eval_id)
        title = f"{cfg.dataset} {cfg.evaluate.split} (ratings run_date={run_date}, eval_id={eval_id})"
        report = markdown_report(metrics.toPandas(), title, PAPER_ROWS.get(cfg.dataset),
                                 cfg.data.scale)
        for name in (f"{eval_id}.md", "latest.md"):
            write_text(spark, f"{cfg.table_path('reports')}/{name}", report)
        overall = {r.system: {"mae": r.mae, "rmse": r.rmse} for r in
                   metrics.where(F.col("segment") == "all")
                   .groupBy("system").pivot("metric", ["mae", "rmse"]).agg(F.first("value")).collect()}
        interactions.unpersist()  # else a later evaluate in this session reads these rows, not the table
        metrics.unpersist()
    return {"eval_id": eval_id, "run_date": run_date, "report": f"{cfg.table_path('reports')}/latest.md",
            "overall": overall}


def replace_evaluation(spark: SparkSession, cfg: Config, metrics: DataFrame, eval_id: str) -> int:
    """Write `metrics` into the metrics table in place of eval_id's older rows (the other
    evaluations stay); returns the table's rows."""
    from siren_batch.warehouse import table_exists

    if table_exists(spark, cfg, "metrics"):
        older = read_table(spark, cfg, "metrics", schemas.METRICS).where(F.col("eval_id") != eval_id)
        metrics = older.unionByName(metrics)
    return write_table(metrics.localCheckpoint(), cfg, "metrics", schemas.METRICS)


def calibrate(spark: SparkSession, cfg: Config) -> dict:
    """Fit the calibrator on the valid scores of calibrate.run_date (siren_batch.calibration)."""
    from siren_batch.calibration import calibrate as fit_and_store

    return fit_and_store(spark, cfg)


def score_calibrate(spark: SparkSession, cfg: Config) -> dict:
    """Score the valid split (calibrate.chain_rows pairs at most), then fit the calibrator on it."""
    from siren_batch.calibration import score_and_calibrate

    return score_and_calibrate(spark, cfg)


def train_probe(spark: SparkSession, cfg: Config) -> dict:
    """Frozen hidden states + baselines -> the probe, fit on valid, scores probe.split."""
    from siren_batch.train.probe import train_probe as fit_and_score

    return fit_and_score(spark, cfg)


def prepare_model(spark: SparkSession | None, cfg: Config) -> dict:
    from siren_batch.assets import convert_smollm2

    return {"model": str(convert_smollm2())}


STAGES: dict[str, Callable[[SparkSession, Config], dict]] = {
    "ingest": ingest,
    "embed": embed,
    "topics": topics,
    "sketches": sketches,
    "prompts": prompts,
    "score": score,
    "evaluate": evaluate,
    "calibrate": calibrate,
    "score-calibrate": score_calibrate,
    "train-probe": train_probe,
    "train-sft": train_stages.train_sft,
    "train-grpo": train_stages.train_grpo,
    "train-align": train_stages.train_align,
    "export": train_stages.export,
}
SKETCH_CHAIN = ["ingest", "embed", "topics", "sketches", "prompts"]
FULL_CHAIN = [*SKETCH_CHAIN, "score", "evaluate"]


def chain(name: str, cfg: Config) -> list[str]:
    """The stages of a CLI chain: `sketch-chain`, or `all`, which fits the calibrator on the valid
    split before scoring (calibrate.in_chain, with calibrate.enabled; not for score.mode=cot,
    which has no rating distribution to calibrate) so the scores it evaluates are calibrated as
    well as raw."""
    from siren_batch.calibration import left_out_of_chains

    if name == "sketch-chain":
        return SKETCH_CHAIN
    if left_out_of_chains(cfg) is None:
        return [*SKETCH_CHAIN, "score-calibrate", "score", "evaluate"]
    return FULL_CHAIN
