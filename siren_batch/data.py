"""Ingest: read a source into the canonical interactions and items tables.

    result = ingest(spark, cfg)   # IngestResult(interactions, items, rejects, counts)

Each reader (one per `data.source`) returns string-typed frames in the
validate.RAW_ITEMS / validate.RAW_INTERACTIONS layout, read with declared schemas
(all strings) so that bad values become rejects in siren_batch.validate rather
than nulls. Timestamps come out in epoch milliseconds for every source.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from siren_batch import schemas, validate
from siren_batch.config import Config, ConfigError
from siren_batch.readers import READERS
from siren_batch.warehouse import conform, table_config

logger = logging.getLogger(__name__)

REJECT_REASONS = {"interactions": validate.INTERACTION_REASONS, "items": validate.ITEM_REASONS}


class RejectsExceeded(RuntimeError):
    """More bad-data rows than data.max_reject_fraction (see check_reject_fraction)."""


@dataclass
class IngestResult:
    interactions: DataFrame  # schemas.INTERACTIONS, split filled
    items: DataFrame         # schemas.ITEMS, every valid item (also those without interactions)
    rejects: DataFrame       # schemas.REJECTS
    counts: dict[str, int]   # input_x == kept_x + rejected_x for x in interactions, items

    def unpersist(self) -> None:
        """The three frames are cached (counted once, written next); free them when done."""
        for df in (self.interactions, self.items, self.rejects):
            df.unpersist()


def ingest(spark: SparkSession, cfg: Config, *, check_rejects: bool = False) -> IngestResult:
    """Read cfg.data.source, validate, k-core filter, split.

    With check_rejects, raise RejectsExceeded when bad-data rejects exceed
    data.max_reject_fraction of either input; otherwise the caller runs
    check_reject_fraction(result.counts, ...) itself (after writing the rejects)."""
    data = cfg.data
    if data.split == "source" and data.source not in ("siren_movies", "table"):
        raise ConfigError(f"data.split=source but data.source={data.source} brings no split: "
                          "set data.split=leave_last_out")
    raw_items, raw_inter, ts_unit = READERS[data.source](spark, cfg)
    items, item_rejects = validate.validate_items(raw_items)
    items = items.persist()
    kept, inter_rejects = validate.validate_interactions(
        raw_inter, items, rating_min=data.rating_min, rating_max=data.rating_max,
        ts_unit=ts_unit, source_split=data.split == "source", scale=data.scale)
    valid = kept.persist()
    kept, kcore_rejects = validate.kcore_filter(valid, data.kcore)
    sampled_out = None
    if data.sample_users < 1.0:  # after the k-core: a sampled user keeps the rows a full run keeps
        keep = validate.in_user_sample(data.sample_users)
        kept, sampled_out = kept.where(keep), kept.where(~keep)
    if data.split == "leave_last_out":
        kept = validate.leave_last_out_split(kept)
    interactions = conform(kept, schemas.INTERACTIONS).persist()
    all_items = items
    if sampled_out is not None:  # the items the sampled users rated; the rest are counted, not written
        rated = interactions.select("item_id").distinct()
        items = all_items.join(rated, on="item_id", how="left_semi").persist()
        sampled_out = (sampled_out, all_items.join(rated, on="item_id", how="left_anti"))
    rejects = (conform(item_rejects, schemas.REJECTS)
               .unionByName(conform(inter_rejects, schemas.REJECTS))
               .unionByName(conform(kcore_rejects, schemas.REJECTS))).persist()
    result = IngestResult(interactions, items, rejects, ingest_counts(raw_inter, raw_items, interactions, items,
                                                                      rejects, sampled_out))
    valid.unpersist()  # the outputs above are cached and counted: nothing reads it again
    if items is not all_items:
        all_items.unpersist()
    logger.info("ingest %s: %s", data.source, result.counts)
    if check_rejects:
        check_reject_fraction(result.counts, data.max_reject_fraction)
    return result


def ingest_counts(raw_inter: DataFrame, raw_items: DataFrame, interactions: DataFrame, items: DataFrame,
                  rejects: DataFrame, sampled_out: tuple[DataFrame, DataFrame] | None = None) -> dict[str, int]:
    """Input, kept, rejected and sampled-out rows (data.sample_users: the valid rows of the
    users and items a dry run leaves out) of interactions and items, rejects by reason, the
    kept interactions' users, items and rows per split; raises unless input = kept +
    rejected + sampled out for each. One aggregation over the frames tagged and unioned: one
    Spark job instead of one per count (on a night's few rows, each job's fixed cost is the cost)."""
    none = F.lit(None).cast("string")

    def tag(df: DataFrame, kind: str, source, reason=None, kept_rows: bool = False) -> DataFrame:
        return df.select(F.lit(kind).alias("kind"), (F.lit(source) if isinstance(source, str) else source)
                         .alias("source"), (reason if reason is not None else none).alias("reason"),
                         *[(F.col(c) if kept_rows else none).alias(c) for c in ("user_id", "item_id", "split")])

    tagged = (tag(raw_inter, "input", "interactions")
              .unionByName(tag(raw_items, "input", "items"))
              .unionByName(tag(interactions, "kept", "interactions", kept_rows=True))
              .unionByName(tag(items, "kept", "items"))
              .unionByName(tag(rejects, "rejected", F.col("source"), validate.reason_code(F.col("reason")))))
    for source, frame in zip(REJECT_REASONS, sampled_out or ()):
        tagged = tagged.unionByName(tag(frame, "sampled_out", source))
    groups = {(r["kind"], r["source"], r["reason"]): r for r in tagged.groupBy("kind", "source", "reason").agg(
        F.count(F.lit(1)).alias("n"), F.countDistinct("user_id").alias("users"),
        F.countDistinct("item_id").alias("interacted_items"),
        *[F.sum(F.when(F.col("split") == s, 1).otherwise(0)).alias(f"split_{s}") for s in schemas.SPLITS]
    ).collect()}
    counts: dict[str, int] = {}
    for source, reasons in REJECT_REASONS.items():
        n_in, n_kept, n_out = (int(groups[(kind, source, None)]["n"]) if (kind, source, None) in groups else 0
                               for kind in ("input", "kept", "sampled_out"))
        by_reason = {reason: int(r["n"]) for (k, s, reason), r in groups.items() if k == "rejected" and s == source}
        counts.update({f"input_{source}": n_in, f"kept_{source}": n_kept,
                       f"rejected_{source}": sum(by_reason.values()), f"sampled_out_{source}": n_out})
        counts.update({f"rejected_{source}_{reason}": by_reason.get(reason, 0) for reason in reasons})
        if n_in != n_kept + counts[f"rejected_{source}"] + n_out:  # a bug, never data
            raise RuntimeError(f"{source}: input {n_in} != kept {n_kept} + rejected {counts[f'rejected_{source}']}"
                               + (f" + sampled out {n_out}" if n_out else ""))
    kept = groups.get(("kept", "interactions", None))
    counts.update({key: int(kept[key] or 0) if kept else 0
                   for key in ("users", "interacted_items", *[f"split_{s}" for s in schemas.SPLITS])})
    return counts


def stored_sample(spark: SparkSession, cfg: Config) -> float | None:
    """data.sample_users of the run that wrote cfg's interactions table (1.0 when its config
    predates the option); None when there is no such table."""
    written = table_config(spark, cfg, "interactions")
    if written is None:
        return None
    return float((written.get("data") or {}).get("sample_users", 1.0))


def check_dry_run_target(spark: SparkSession, cfg: Config) -> None:
    """A dry run (data.sample_users < 1) must not replace a full run's tables: ConfigError."""
    if cfg.data.sample_users < 1.0 and stored_sample(spark, cfg) == 1.0:
        raise ConfigError(f"data.sample_users={cfg.data.sample_users:g}: {cfg.warehouse}/{cfg.dataset} holds a full "
                          "run's tables, which a dry run would replace; give the dry run its own warehouse "
                          "(warehouse=<folder>)")


def check_reject_fraction(counts: dict[str, int], limit: float) -> None:
    """Raise RejectsExceeded when bad-data rejects (all reasons but kcore) exceed
    `limit` of the input rows of interactions or items."""
    for source, reasons in REJECT_REASONS.items():
        bad = {r: counts[f"rejected_{source}_{r}"] for r in reasons if r not in validate.NOT_BAD_DATA}
        total, n = sum(bad.values()), counts[f"input_{source}"]
        if n and total / n > limit:
            detail = ", ".join(f"{r}={c}" for r, c in bad.items() if c)
            raise RejectsExceeded(
                f"{source}: {total} of {n} rows rejected ({total / n:.1%}: {detail}) > "
                f"data.max_reject_fraction={limit}; inspect the rejects table or raise the limit")
