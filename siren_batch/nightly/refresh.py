"""The night's embed, topics and sketches steps: only what the arrivals changed
(siren_batch.nightly)."""

from __future__ import annotations

import json
import logging

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from siren_batch import schemas
from siren_batch.config import Config
from siren_batch.nightly.night import (ARRIVED_INTERACTIONS, ARRIVED_ITEMS, BROADCAST_MAX_ROWS, Night, _merge,
                                       _partition, _partition_rows, state_dir)
from siren_batch.warehouse import (RunRecord, path_exists, read_table, read_text, table_exists, write_table,
                                   write_text)

logger = logging.getLogger(__name__)


def embed_step(spark: SparkSession, cfg: Config, night: Night, rec: RunRecord) -> dict:
    from siren_batch.embed import embed_items

    rec.reads, rec.writes = ["arrived_items", "item_embeddings"], ["item_embeddings"]
    arrived_rows = _partition_rows(spark, cfg, "arrived_items", night.run_date)
    if not arrived_rows:
        rec.writes = []
        return {"embedded": 0}
    arrived = _partition(spark, cfg, "arrived_items", ARRIVED_ITEMS, night.run_date)
    fresh = embed_items(arrived, cfg.embed)
    if not night.bootstrap and table_exists(spark, cfg, "item_embeddings"):
        fresh = _merge(read_table(spark, cfg, "item_embeddings", schemas.ITEM_EMBEDDINGS), fresh, ["item_id"],
                       arrived_rows)
    rec.input_rows = arrived_rows
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
    # A re-fit is decided once (refit.json): a run killed between writing topics and item_topics
    # must re-fit again when resumed, not measure drift against its own new centroids and mix
    # old topic ids with new ones.
    decided = f"{state_dir(cfg, night.run_date)}/refit.json"
    if path_exists(spark, decided):
        why, measured = (json.loads(read_text(spark, decided))[k] for k in ("why", "drift"))
    elif night.bootstrap or not table_exists(spark, cfg, "topics"):
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
    write_text(spark, decided, json.dumps({"why": why, "drift": measured}))
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
    who rated an item that arrived (new or changed text, so maybe another topic). A user
    may appear more than once: the caller semi-joins on it (no shuffle for a distinct)."""
    users = arrived_interactions.select("user_id")
    if arrived_items is not None:
        rated = interactions.join(F.broadcast(arrived_items.select("item_id")), on="item_id", how="left_semi")
        users = users.unionByName(rated.select("user_id"))
    return users


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
    # A small night's users are broadcast as they are; otherwise (a huge night, or users who
    # rated an arrived item: a popular one may bring millions) Spark plans the distinct users'
    # join, broadcasting them only when they prove small (no driver-sized broadcast forced).
    small = arrived_items is None and _partition_rows(spark, cfg, "arrived_interactions",
                                                      night.run_date) <= BROADCAST_MAX_ROWS
    history = interactions.join(F.broadcast(users) if small else users.distinct(), on="user_id", how="left_semi")
    fresh = serving_sketches(history, items, item_topics, topic_df, cfg.sketches).localCheckpoint()
    sketched = fresh.agg(F.count(F.lit(1)).alias("users"), F.sum("n_history").alias("history")).first()
    stored = read_table(spark, cfg, "sketches", schemas.SKETCHES)
    total = write_table(_merge(stored, fresh, ["user_id"], int(sketched["users"])), cfg, "sketches",
                        schemas.SKETCHES)
    rec.output_rows = int(sketched["users"])
    rec.input_rows = int(sketched["history"] or 0)   # the history rows read
    return {"users_sketched": rec.output_rows, "sketches": total, "rebuilt_all": False}


