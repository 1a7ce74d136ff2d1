"""`siren-batch nightly --run-date D`: one night, with work in proportion to what changed.

    ingest -> embed -> topics -> sketches -> score -> evaluate -> report

A night reads the folder `nightly.arrivals` (with "{run_date}" replaced): the
interactions that arrived that day (`interactions.<data.format>`, a file or a
folder) and, optionally, new or changed items (`items.<data.format>`), in the
`table` source's layout (data.columns / data.item_columns map the names).

- The first night (no `interactions` table yet) is the bootstrap: its folder is
  the whole history, ingested like `siren-batch ingest` (k-core, leave-last-out
  split), every item embedded, topics fitted, every user sketched.
- Later nights validate the arrivals row by row (no k-core: a new user's first
  rating counts), merge them into `interactions` (split train; a re-rating
  replaces the pair's older one), embed only the arrived items, assign them to
  the stored centroids, and rebuild serving sketches only for users with new
  interactions (or with a rating of a changed item). Topics are re-fitted only
  when asked (nightly.recluster) or when the drift, logged every night, passes
  nightly.drift_threshold; then every sketch is rebuilt.
- Every night keeps what arrived in `arrived_interactions` / `arrived_items` and
  its rejects in `night_rejects` (all partitioned by run_date): later steps read
  those partitions, so each step can run again and give the same tables.
- Candidates (nightly.candidates): `newest:N` = every user active in the last
  nightly.active_days x the N newest items they have not rated; or a Parquet path.
- Evaluate: the previous night's ratings against the truth that arrived tonight,
  with the baselines fit on the interactions known when those ratings were made.

A finished step leaves `_nightly/<run_date>/<step>.json` (its summary): a night
killed in any stage resumes at the first unfinished step; re-running a finished
date does nothing unless `--redo` (then every step runs again: same tables, no
duplicates). Each step also appends a `runs` row (stage nightly-<step>) with what
it read and wrote. Tables are swapped into place whole (siren_batch.warehouse), so
readers never see a half-written table or partition, and `_nightly/latest.json`
names the last complete night.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import re
from typing import Callable

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from siren_batch import schemas
from siren_batch.config import Config, ConfigError
from siren_batch.warehouse import (RunRecord, append_table, delete_path, list_dir, path_exists, read_table, read_text,
                                   run_record, table_exists, write_table, write_text)

logger = logging.getLogger(__name__)

STEPS = ["ingest", "embed", "topics", "sketches", "score", "evaluate", "report"]
DAY_MS = 86_400_000

ARRIVED_INTERACTIONS = schemas.with_run_date(schemas.INTERACTIONS)
ARRIVED_ITEMS = schemas.with_run_date(schemas.ITEMS)
NIGHT_REJECTS = schemas.with_run_date(schemas.REJECTS)


@dataclasses.dataclass
class Night:
    run_date: str
    bootstrap: bool            # the first night: its arrivals are the whole history
    folder: str                # where its arrivals are

    @property
    def end_ms(self) -> int:
        """Epoch ms of the end of run_date (UTC): what has arrived by then is known."""
        day = dt.datetime.strptime(self.run_date, "%Y-%m-%d").replace(tzinfo=dt.timezone.utc)
        return int((day + dt.timedelta(days=1)).timestamp() * 1000)


def state_dir(cfg: Config, run_date: str | None = None) -> str:
    root = f"{cfg.warehouse.rstrip('/')}/{cfg.dataset}/_nightly"
    return f"{root}/{run_date}" if run_date else root


def check_run_date(run_date: str) -> str:
    """The date, or a ConfigError saying what a night's date looks like.

    >>> check_run_date("2026-01-05")
    '2026-01-05'
    """
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", run_date or ""):
        raise ConfigError(f"--run-date must be YYYY-MM-DD, got {run_date!r}")
    dt.date.fromisoformat(run_date)
    return run_date


def completed_nights(spark: SparkSession, cfg: Config) -> list[str]:
    return [d for d in list_dir(spark, state_dir(cfg))
            if path_exists(spark, f"{state_dir(cfg, d)}/done.json")]


def _find(spark: SparkSession, folder: str, name: str, fmt: str) -> str | None:
    for path in (f"{folder}/{name}.{fmt}", f"{folder}/{name}"):
        if path_exists(spark, path):
            return path
    return None


def _arrivals_cfg(spark: SparkSession, cfg: Config, night: Night) -> tuple[Config, bool]:
    """cfg reading the night's folder with the table source; True when it has items."""
    fmt = cfg.data.format
    interactions = _find(spark, night.folder, "interactions", fmt)
    if interactions is None:
        raise ConfigError(f"no arrivals for {night.run_date}: {night.folder}/interactions.{fmt} not found "
                          "(nightly.arrivals)")
    items = _find(spark, night.folder, "items", fmt)
    if night.bootstrap and items is None:
        raise ConfigError(f"the first night needs the items too: {night.folder}/items.{fmt} not found")
    data = dataclasses.replace(cfg.data, source="table", path=interactions, items_path=items,
                               split="leave_last_out")
    return dataclasses.replace(cfg, data=data), items is not None


def _partition(spark: SparkSession, cfg: Config, table: str, schema, run_date: str) -> DataFrame:
    """The run_date partition of a nightly table (empty when that night had none)."""
    if not path_exists(spark, f"{cfg.table_path(table)}/run_date={run_date}"):
        return spark.createDataFrame([], T.StructType(schema.fields[:-1]))
    return read_table(spark, cfg, table, schema).where(F.col("run_date") == run_date).drop("run_date")


def _write_partition(df: DataFrame, rows: int, cfg: Config, table: str, schema, run_date: str) -> None:
    """Replace the run_date partition of `table` with df; an empty df only removes it
    (no Spark job for nothing, and a redo never keeps an older night's rows)."""
    if rows:
        write_table(df.withColumn("run_date", F.lit(run_date)), cfg, table, schema, partition_by=["run_date"])
    else:
        delete_path(df.sparkSession, f"{cfg.table_path(table)}/run_date={run_date}")


def _partition_rows(spark: SparkSession, cfg: Config, table: str, run_date: str) -> int:
    """Rows in a run_date partition, 0 when absent (Parquet footers only)."""
    path = f"{cfg.table_path(table)}/run_date={run_date}"
    return spark.read.parquet(path).count() if path_exists(spark, path) else 0


def _merge(stored: DataFrame, fresh: DataFrame, keys: list[str]) -> DataFrame:
    """stored rows whose keys are not in fresh, plus fresh (fresh wins)."""
    return stored.join(fresh.select(*keys).distinct(), on=keys, how="left_anti").unionByName(fresh)


# ---- the steps: each (spark, cfg, night, rec) -> summary ---------------------------------

def ingest_step(spark: SparkSession, cfg: Config, night: Night, rec: RunRecord) -> dict:
    from siren_batch import data, validate
    from siren_batch.readers.table import read_table_interactions, read_table_items

    night_cfg, has_items = _arrivals_cfg(spark, cfg, night)
    stamp = {"run_date": F.lit(night.run_date)}
    rec.reads = [night.folder] + ([] if night.bootstrap else ["items", "interactions"])
    rec.writes = ["night_rejects", "arrived_items", "arrived_interactions", "items", "interactions"]
    if night.bootstrap:
        result = data.ingest(spark, night_cfg)
        counts = result.counts
        write_table(result.rejects.withColumns(stamp), cfg, "night_rejects", NIGHT_REJECTS, partition_by=["run_date"])
        write_table(result.items.withColumns(stamp), cfg, "arrived_items", ARRIVED_ITEMS, partition_by=["run_date"])
        write_table(result.interactions.withColumns(stamp), cfg, "arrived_interactions", ARRIVED_INTERACTIONS,
                    partition_by=["run_date"])
        write_table(_partition(spark, cfg, "arrived_items", ARRIVED_ITEMS, night.run_date), cfg, "items",
                    schemas.ITEMS)
        write_table(_partition(spark, cfg, "arrived_interactions", ARRIVED_INTERACTIONS, night.run_date), cfg,
                    "interactions", schemas.INTERACTIONS)
        result.unpersist()
        data.check_reject_fraction(counts, cfg.data.max_reject_fraction)
    else:
        if has_items:
            raw_items = read_table_items(spark, night_cfg)
            new_items, item_rejects = validate.validate_items(raw_items)
        else:
            raw_items = spark.createDataFrame([], "item_id string")
            new_items = spark.createDataFrame([], schemas.ITEMS)
            item_rejects = spark.createDataFrame([], schemas.REJECTS)
        new_items, item_rejects = new_items.persist(), item_rejects.persist()
        stored_items = read_table(spark, cfg, "items", schemas.ITEMS)
        all_items = _merge(stored_items, new_items, ["item_id"])
        raw = read_table_interactions(spark, night_cfg)
        kept, inter_rejects = validate.validate_interactions(
            raw, all_items, rating_min=cfg.data.rating_min, rating_max=cfg.data.rating_max,
            ts_unit=cfg.data.ts_unit)
        delta = kept.withColumn("split", F.lit("train")).persist()
        rejects = item_rejects.unionByName(inter_rejects).persist()
        inputs = {"interactions": raw.count(), "items": raw_items.count()}
        kept_n = {"interactions": delta.count(), "items": new_items.count()}
        by_reason = validate.reason_counts(rejects)
        counts = {}
        for source in ("interactions", "items"):
            rejected = sum(n for (s, _), n in by_reason.items() if s == source)
            counts.update({f"input_{source}": inputs[source], f"kept_{source}": kept_n[source],
                           f"rejected_{source}": rejected})
            counts.update({f"rejected_{source}_{r}": n for (s, r), n in by_reason.items() if s == source})
            if inputs[source] != kept_n[source] + rejected:
                raise RuntimeError(f"{source}: input {inputs[source]} != kept {kept_n[source]} + rejected {rejected}")
        # Arrivals first (they read the old items), then each table from the stored
        # one and tonight's partition: every write reads only what is not yet replaced.
        rejected = counts["rejected_interactions"] + counts["rejected_items"]
        _write_partition(rejects, rejected, cfg, "night_rejects", NIGHT_REJECTS, night.run_date)
        _write_partition(new_items, kept_n["items"], cfg, "arrived_items", ARRIVED_ITEMS, night.run_date)
        _write_partition(delta, kept_n["interactions"], cfg, "arrived_interactions", ARRIVED_INTERACTIONS,
                         night.run_date)
        for df in (new_items, item_rejects, delta, rejects):
            df.unpersist()
        if kept_n["items"]:
            write_table(_merge(stored_items, _partition(spark, cfg, "arrived_items", ARRIVED_ITEMS, night.run_date),
                               ["item_id"]), cfg, "items", schemas.ITEMS)
        if kept_n["interactions"]:
            _add_interactions(spark, cfg, night)
        data.check_reject_fraction({**{f"rejected_{s}_{r}": 0 for s, rs in data.REJECT_REASONS.items() for r in rs},
                                    **counts}, cfg.data.max_reject_fraction)
    rec.input_rows = counts["input_interactions"]
    rec.output_rows = counts["kept_interactions"]
    rec.rejected_rows = counts["rejected_interactions"]
    return {k: v for k, v in counts.items() if not (k.startswith("rejected_") and v == 0 and k.count("_") > 1)}


def _add_interactions(spark: SparkSession, cfg: Config, night: Night) -> None:
    """Tonight's arrivals into `interactions`: appended as one file when none of their
    pairs is stored yet (work in proportion to the arrivals), else the table is
    rewritten with the stored rows of those pairs replaced (a re-rating, or a step
    that runs again after its append)."""
    arrived = _partition(spark, cfg, "arrived_interactions", ARRIVED_INTERACTIONS, night.run_date)
    stored = read_table(spark, cfg, "interactions", schemas.INTERACTIONS)
    keys = ["user_id", "item_id"]
    overlap = stored.select(*keys).join(F.broadcast(arrived.select(*keys)), on=keys, how="left_semi").limit(1).count()
    if overlap:
        logger.info("some arrived pairs are stored already: rewriting interactions with them replaced")
        write_table(_merge(stored, arrived, keys), cfg, "interactions", schemas.INTERACTIONS)
    else:
        append_table(arrived, cfg, "interactions", schemas.INTERACTIONS)


def embed_step(spark: SparkSession, cfg: Config, night: Night, rec: RunRecord) -> dict:
    from siren_batch.embed import embed_items

    rec.reads, rec.writes = ["arrived_items", "item_embeddings"], ["item_embeddings"]
    if not _partition_rows(spark, cfg, "arrived_items", night.run_date):
        rec.writes = []
        return {"embedded": 0}
    arrived = _partition(spark, cfg, "arrived_items", ARRIVED_ITEMS, night.run_date)
    fresh = embed_items(arrived, cfg.embed)
    if not night.bootstrap and table_exists(spark, cfg, "item_embeddings"):
        fresh = _merge(read_table(spark, cfg, "item_embeddings", schemas.ITEM_EMBEDDINGS), fresh, ["item_id"])
    rec.input_rows = arrived.count()
    total = write_table(fresh, cfg, "item_embeddings", schemas.ITEM_EMBEDDINGS)
    rec.output_rows = rec.input_rows
    return {"embedded": rec.input_rows, "item_embeddings": total}


def drift(new_distances: DataFrame, stored_distances: DataFrame) -> float | None:
    """Mean distance of tonight's items to their centroid over that of the stored items,
    minus 1 (0.25: tonight's items lie 25% farther out); None when either is empty."""
    new = new_distances.agg(F.avg("distance")).first()[0]
    old = stored_distances.agg(F.avg("distance")).first()[0]
    if new is None or not old:
        return None
    return float(new) / float(old) - 1.0


def topics_step(spark: SparkSession, cfg: Config, night: Night, rec: RunRecord) -> dict:
    from siren_batch.topics import assign_topics, build_topics

    embeddings = read_table(spark, cfg, "item_embeddings", schemas.ITEM_EMBEDDINGS)
    arrived = _partition(spark, cfg, "arrived_items", ARRIVED_ITEMS, night.run_date).select("item_id")
    rec.reads, rec.writes = ["item_embeddings", "arrived_items", "topics", "item_topics"], ["item_topics"]
    why, measured = None, None
    if night.bootstrap or not table_exists(spark, cfg, "topics"):
        why = "first night"
    elif cfg.nightly.recluster:
        why = "nightly.recluster"
    elif not _partition_rows(spark, cfg, "arrived_items", night.run_date):
        rec.writes = []
        return {"assigned": 0, "drift": None, "reclustered": False}
    else:
        stored = read_table(spark, cfg, "item_topics", schemas.ITEM_TOPICS)
        topic_df = read_table(spark, cfg, "topics", schemas.TOPICS)
        assigned = assign_topics(embeddings.join(arrived, on="item_id", how="left_semi"), topic_df).localCheckpoint()
        kept = stored.join(arrived, on="item_id", how="left_anti")
        measured = drift(assigned, kept)
        logger.info("topic drift tonight: %s (threshold %s)", "n/a" if measured is None else f"{measured:+.3f}",
                    cfg.nightly.drift_threshold)
        if measured is not None and measured > cfg.nightly.drift_threshold:
            why = f"drift {measured:+.3f} > {cfg.nightly.drift_threshold}"
        else:
            rec.input_rows = rec.output_rows = assigned.count()
            write_table(kept.unionByName(assigned), cfg, "item_topics", schemas.ITEM_TOPICS)
            return {"assigned": rec.output_rows, "drift": measured, "reclustered": False}
    logger.info("fitting topics (%s)", why)
    items = read_table(spark, cfg, "items", schemas.ITEMS)
    topic_df, item_topics = build_topics(embeddings, items, cfg.topics)
    topic_df = topic_df.cache()
    write_table(topic_df, cfg, "topics", schemas.TOPICS)
    rec.writes = ["topics", "item_topics"]
    rec.input_rows = embeddings.count()
    rec.output_rows = write_table(item_topics, cfg, "item_topics", schemas.ITEM_TOPICS)
    return {"assigned": rec.output_rows, "drift": measured, "reclustered": True, "why": why,
            "topics": topic_df.count()}


def changed_users(interactions: DataFrame, arrived_interactions: DataFrame,
                  arrived_items: DataFrame | None) -> DataFrame:
    """Users whose serving sketch changes tonight: those with new interactions, and those
    who rated an item that arrived (new or changed text, so maybe another topic)."""
    users = arrived_interactions.select("user_id")
    if arrived_items is not None:
        rated = interactions.join(F.broadcast(arrived_items.select("item_id")), on="item_id", how="left_semi")
        users = users.unionByName(rated.select("user_id"))
    return users.distinct()


def sketches_step(spark: SparkSession, cfg: Config, night: Night, rec: RunRecord, *, rebuild_all: bool) -> dict:
    from siren_batch.sketches import serving_sketches

    interactions = read_table(spark, cfg, "interactions", schemas.INTERACTIONS)
    items = read_table(spark, cfg, "items", schemas.ITEMS)
    item_topics = read_table(spark, cfg, "item_topics", schemas.ITEM_TOPICS)
    topic_df = read_table(spark, cfg, "topics", schemas.TOPICS)
    rec.reads = ["interactions", "items", "item_topics", "topics", "arrived_interactions", "arrived_items"]
    rec.writes = ["sketches"]
    if rebuild_all or not table_exists(spark, cfg, "sketches"):
        rec.output_rows = write_table(serving_sketches(interactions, items, item_topics, topic_df, cfg.sketches),
                                      cfg, "sketches", schemas.SKETCHES)
        rec.input_rows = interactions.count()
        return {"users_sketched": rec.output_rows, "sketches": rec.output_rows, "rebuilt_all": True}
    arrived_items = (_partition(spark, cfg, "arrived_items", ARRIVED_ITEMS, night.run_date)
                     if _partition_rows(spark, cfg, "arrived_items", night.run_date) else None)
    users = changed_users(interactions,
                          _partition(spark, cfg, "arrived_interactions", ARRIVED_INTERACTIONS, night.run_date),
                          arrived_items)
    history = interactions.join(F.broadcast(users), on="user_id", how="left_semi")
    fresh = serving_sketches(history, items, item_topics, topic_df, cfg.sketches).localCheckpoint()
    stored = read_table(spark, cfg, "sketches", schemas.SKETCHES)
    total = write_table(_merge(stored, fresh, ["user_id"]), cfg, "sketches", schemas.SKETCHES)
    rec.output_rows = fresh.count()
    rec.input_rows = int(fresh.agg(F.sum("n_history")).first()[0] or 0)   # the history rows read
    return {"users_sketched": rec.output_rows, "sketches": total, "rebuilt_all": False}


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
    """The newest earlier ratings partition against tonight's arrivals for its pairs."""
    from siren_batch.baselines import baseline_predictions
    from siren_batch.evaluate import compute_metrics, join_truth, llm_systems

    rec.reads, rec.writes = ["ratings", "arrived_interactions", "interactions"], ["metrics"]
    if not table_exists(spark, cfg, "ratings"):
        return {"skipped": "no ratings yet"}
    ratings = read_table(spark, cfg, "ratings", schemas.RATINGS)
    earlier = [r[0] for r in ratings.where(F.col("run_date") < night.run_date)
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
    known_end = Night(scored_on, False, "").end_ms
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
    parts = [compute_metrics(join_truth(p, view, "test"), view, ev_cfg, system, eval_id)
             for system, p in systems.items()]
    metrics = parts[0]
    for part in parts[1:]:
        metrics = metrics.unionByName(part)
    metrics = metrics.localCheckpoint()
    if table_exists(spark, cfg, "metrics"):
        older = read_table(spark, cfg, "metrics", schemas.METRICS).where(F.col("eval_id") != eval_id)
        metrics_all = older.unionByName(metrics).localCheckpoint()
    else:
        metrics_all = metrics
    write_table(metrics_all, cfg, "metrics", schemas.METRICS)
    view.unpersist()
    rec.input_rows, rec.output_rows = n_truth, metrics.count()
    overall = {r.system: r.value for r in metrics.where((F.col("segment") == "all") & (F.col("metric") == "mae"))
               .collect()}
    return {"eval_id": eval_id, "scored_on": scored_on, "truth_pairs": n_truth, "mae": overall}


def report_step(spark: SparkSession, cfg: Config, night: Night, rec: RunRecord) -> dict:
    from siren_batch.report import write_report

    rec.reads, rec.writes = ["metrics", "runs", "ratings", "night_rejects"], ["reports"]
    return write_report(cfg, run_date=night.run_date)


# ---- the night ---------------------------------------------------------------------------

def _plan(spark: SparkSession, cfg: Config, run_date: str) -> Night:
    """The night's plan, decided once (plan.json): a resumed bootstrap stays one even
    though its first tables already exist."""
    if not cfg.nightly.arrivals:
        raise ConfigError("nightly.arrivals is not set: set nightly.arrivals=<folder with {run_date}> "
                          "(see README, Nightly operation)")
    path = f"{state_dir(cfg, run_date)}/plan.json"
    if path_exists(spark, path):
        return Night(**json.loads(read_text(spark, path)))
    night = Night(run_date, not table_exists(spark, cfg, "interactions"),
                  cfg.nightly.arrivals.replace("{run_date}", run_date))
    write_text(spark, path, json.dumps(dataclasses.asdict(night)))
    return night


def run_night(spark: SparkSession, cfg: Config, run_date: str, *, redo: bool = False,
              after_step: Callable[[str], None] | None = None) -> dict:
    """Run (or resume) the night of run_date; returns {step: summary}."""
    check_run_date(run_date)
    done_nights = completed_nights(spark, cfg)
    later = [d for d in done_nights if d > run_date]
    if later:
        raise ConfigError(f"nights run in date order: {max(later)} is already complete, so {run_date} "
                          "cannot run now")
    folder = state_dir(cfg, run_date)
    if redo:
        for name in list_dir(spark, folder):
            if name.endswith(".json") and name != "plan.json":
                delete_path(spark, f"{folder}/{name}")
    night = _plan(spark, cfg, run_date)
    out: dict = {"run_date": run_date, "bootstrap": night.bootstrap}
    for step in STEPS:
        marker = f"{folder}/{step}.json"
        if path_exists(spark, marker):
            out[step] = {**json.loads(read_text(spark, marker)), "resumed": "already done"}
            logger.info("nightly %s %s: already done", run_date, step)
            continue
        if (step == "evaluate" and not cfg.nightly.evaluate) or (step == "report" and not cfg.nightly.report):
            out[step] = {"skipped": f"nightly.{step}=false"}
            continue
        logger.info("nightly %s %s: start", run_date, step)
        with run_record(spark, cfg, f"nightly-{step}") as rec:
            if step == "sketches":
                summary = sketches_step(spark, cfg, night, rec,
                                        rebuild_all=bool(out.get("topics", {}).get("reclustered")))
            else:
                summary = STEP_FUNCS[step](spark, cfg, night, rec)
        # Cached plans would answer a later step's read of a table this step rewrote.
        spark.catalog.clearCache()
        summary = {**summary, "seconds": rec.duration_s, "run_id": rec.run_id}
        write_text(spark, marker, json.dumps(summary, default=str))
        out[step] = summary
        if after_step is not None:
            after_step(step)
    write_text(spark, f"{folder}/done.json", json.dumps({"run_date": run_date}))
    write_text(spark, f"{state_dir(cfg)}/latest.json", json.dumps({"run_date": run_date}))
    return out


STEP_FUNCS = {"ingest": ingest_step, "embed": embed_step, "topics": topics_step, "score": score_step,
              "evaluate": evaluate_step, "report": report_step}


# ---- arrivals for trying it out: a dataset cut into nights ----------------------------------

def cut_arrivals(interactions, items, out: str, first_night: str, nights: int,
                 held_items: int = 0) -> list[str]:
    """Write pandas frames (INTERACTIONS-like, ITEMS-like) as arrival folders
    `<out>/<date>/` for nightly.arrivals=<out>/{run_date}: the first night holds every
    interaction up to the end of first_night, each later night one more day. The
    `held_items` items whose first rating comes latest arrive on the night of that
    rating (as new items). Returns the dates. Used by tests, make nightly-demo and
    make bench-nightly."""
    import pandas as pd
    from pathlib import Path

    start = dt.date.fromisoformat(first_night)
    dates = [(start + dt.timedelta(days=i)).isoformat() for i in range(nights)]
    ends = [Night(d, False, "").end_ms for d in dates]
    inter = interactions[interactions.ts < ends[-1]][["user_id", "item_id", "rating", "ts"]]
    first = inter.groupby("item_id").ts.min().sort_values(ascending=False)
    late = set(first[first >= ends[0]].index[:held_items]) if held_items else set()
    arrive = {item: next(i for i, end in enumerate(ends) if ts < end) for item, ts in first.items() if item in late}
    cols = ["item_id", "title", "genres", "text"]
    for i, date in enumerate(dates):
        lo = -1 if i == 0 else ends[i - 1]
        folder = Path(out) / date
        folder.mkdir(parents=True, exist_ok=True)
        inter[(inter.ts >= lo) & (inter.ts < ends[i])].reset_index(drop=True).to_parquet(
            folder / "interactions.parquet")
        if i == 0:
            night_items = items[~items.item_id.isin(late)]
        else:
            night_items = items[items.item_id.isin([k for k, night in arrive.items() if night == i])]
        if i == 0 or len(night_items):
            pd.DataFrame(night_items[cols]).reset_index(drop=True).to_parquet(folder / "items.parquet")
    return dates


def main(argv: list[str] | None = None) -> int:
    """`python -m siren_batch.nightly cut --out DIR --first YYYY-MM-DD --nights N [key=value ...]`:
    ingest the configured dataset into DIR/source and cut it into arrival folders
    DIR/<date>/ (for trying nightly out: nightly.arrivals=DIR/{run_date})."""
    import argparse

    import pandas as pd

    from siren_batch.config import load_config
    from siren_batch.pipeline import ingest
    from siren_batch.spark import get_spark

    parser = argparse.ArgumentParser(prog="python -m siren_batch.nightly", description=main.__doc__)
    parser.add_argument("command", choices=["cut"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--first", required=True, help="the first night: every interaction up to its end")
    parser.add_argument("--nights", type=int, default=2)
    parser.add_argument("--held-items", type=int, default=2, help="items that arrive on a later night")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(overrides=[*overrides, f"warehouse={args.out}/source"])
    spark = get_spark(cfg.spark)
    ingest(spark, cfg)
    dates = cut_arrivals(pd.read_parquet(cfg.table_path("interactions")), pd.read_parquet(cfg.table_path("items")),
                         args.out, check_run_date(args.first), args.nights, args.held_items)
    print(f"arrivals for {', '.join(dates)} under {args.out}: nightly.arrivals={args.out}/{{run_date}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
