"""The night's ingest step: the arrivals folder -> night_rejects, arrived_items,
arrived_interactions, then items and interactions (siren_batch.nightly)."""

from __future__ import annotations

import dataclasses
import logging

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from siren_batch import schemas
from siren_batch.config import Config, ConfigError
from siren_batch.nightly.night import (ARRIVED_INTERACTIONS, ARRIVED_ITEMS, NIGHT_REJECTS, Night, _keys, _merge,
                                       _partition, _write_partition)
from siren_batch.warehouse import RunRecord, append_table, path_exists, read_table, write_table

logger = logging.getLogger(__name__)


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



def ingest_step(spark: SparkSession, cfg: Config, night: Night, rec: RunRecord) -> dict:
    from siren_batch import data

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
        counts = _ingest_arrivals(spark, cfg, night, night_cfg, has_items)
    rec.input_rows = counts["input_interactions"]
    rec.output_rows = counts["kept_interactions"]
    rec.rejected_rows = counts["rejected_interactions"]
    return {k: v for k, v in counts.items()
            if not (v == 0 and (k.startswith("sampled_out_") or (k.startswith("rejected_") and k.count("_") > 1)))}


def _ingest_arrivals(spark: SparkSession, cfg: Config, night: Night, night_cfg: Config, has_items: bool) -> dict:
    """A later night: validate the arrivals, write tonight's partitions, merge them into
    items and interactions; returns data.ingest_counts."""
    from siren_batch import data, validate
    from siren_batch.readers.table import read_table_interactions, read_table_items

    # Each input is validated once into a small materialised frame (localCheckpoint):
    # the partitions and the counts below all read it, not the checks again.
    if has_items:
        raw_items = read_table_items(spark, night_cfg)
        new_items, item_rejects = validate.split_marked(validate.mark_items(raw_items).localCheckpoint(), "items")
    else:
        raw_items = spark.createDataFrame([], "item_id string")
        new_items = spark.createDataFrame([], schemas.ITEMS)
        item_rejects = spark.createDataFrame([], schemas.REJECTS)
    stored_items = read_table(spark, cfg, "items", schemas.ITEMS)
    raw = read_table_interactions(spark, night_cfg)
    known = stored_items.select("item_id").unionByName(new_items.select("item_id"))   # only ids are checked
    marked = validate.mark_interactions(raw, known, rating_min=cfg.data.rating_min, rating_max=cfg.data.rating_max,
                                        ts_unit=cfg.data.ts_unit,
                                        scale=cfg.data.scale).localCheckpoint()
    kept, inter_rejects = validate.split_marked(marked, "interactions")
    delta = kept.withColumn("split", F.lit("train"))
    rejects = item_rejects.unionByName(inter_rejects)
    counts = data.ingest_counts(raw, raw_items, delta, new_items, rejects)   # raises unless input = kept + rejected
    kept_n = {source: counts[f"kept_{source}"] for source in ("interactions", "items")}
    # Arrivals first (they read the old items), then each table from the stored
    # one and tonight's partition: every write reads only what is not yet replaced.
    rejected = counts["rejected_interactions"] + counts["rejected_items"]
    _write_partition(rejects, rejected, cfg, "night_rejects", NIGHT_REJECTS, night.run_date)
    _write_partition(new_items, kept_n["items"], cfg, "arrived_items", ARRIVED_ITEMS, night.run_date)
    _write_partition(delta, kept_n["interactions"], cfg, "arrived_interactions", ARRIVED_INTERACTIONS,
                     night.run_date)
    if kept_n["items"]:
        write_table(_merge(stored_items, _partition(spark, cfg, "arrived_items", ARRIVED_ITEMS, night.run_date),
                           ["item_id"], kept_n["items"]), cfg, "items", schemas.ITEMS)
    if kept_n["interactions"]:
        _add_interactions(spark, cfg, night, kept_n["interactions"])
    data.check_reject_fraction(counts, cfg.data.max_reject_fraction)
    return counts


def _add_interactions(spark: SparkSession, cfg: Config, night: Night, arrived_rows: int) -> None:
    """Tonight's arrivals into `interactions`: appended as one file when none of their
    pairs is stored yet (work in proportion to the arrivals), else the table is
    rewritten with the stored rows of those pairs replaced (a re-rating, or a step
    that runs again after its append)."""
    arrived = _partition(spark, cfg, "arrived_interactions", ARRIVED_INTERACTIONS, night.run_date)
    stored = read_table(spark, cfg, "interactions", schemas.INTERACTIONS)
    keys = ["user_id", "item_id"]
    overlap = stored.select(*keys).join(_keys(arrived, keys, arrived_rows), on=keys, how="left_semi").limit(1).count()
    if overlap:
        logger.info("some arrived pairs are stored already: rewriting interactions with them replaced")
        write_table(_merge(stored, arrived, keys, arrived_rows), cfg, "interactions", schemas.INTERACTIONS)
    else:
        append_table(arrived, cfg, "interactions", schemas.INTERACTIONS)


