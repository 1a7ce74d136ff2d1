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
from siren_batch.warehouse import conform

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
        ts_unit=ts_unit, source_split=data.split == "source")
    valid = kept.persist()
    kept, kcore_rejects = validate.kcore_filter(valid, data.kcore)
    if data.split == "leave_last_out":
        kept = validate.leave_last_out_split(kept)
    interactions = conform(kept, schemas.INTERACTIONS).persist()
    rejects = (conform(item_rejects, schemas.REJECTS)
               .unionByName(conform(inter_rejects, schemas.REJECTS))
               .unionByName(conform(kcore_rejects, schemas.REJECTS))).persist()
    inputs = {"interactions": raw_inter.count(), "items": raw_items.count()}
    result = IngestResult(interactions, items, rejects, ingest_counts(inputs, interactions, items, rejects))
    valid.unpersist()  # the outputs above are cached and counted: nothing reads it again
    logger.info("ingest %s: %s", data.source, result.counts)
    if check_rejects:
        check_reject_fraction(result.counts, data.max_reject_fraction)
    return result


def ingest_counts(inputs: dict[str, int], interactions: DataFrame, items: DataFrame,
                  rejects: DataFrame) -> dict[str, int]:
    by_reason = validate.reason_counts(rejects)
    counts: dict[str, int] = {}
    kept = {"interactions": interactions.count(), "items": items.count()}
    for source, reasons in REJECT_REASONS.items():
        counts[f"input_{source}"] = inputs[source]
        counts[f"kept_{source}"] = kept[source]
        counts[f"rejected_{source}"] = sum(n for (s, _), n in by_reason.items() if s == source)
        for reason in reasons:
            counts[f"rejected_{source}_{reason}"] = by_reason.get((source, reason), 0)
        if inputs[source] != kept[source] + counts[f"rejected_{source}"]:  # a bug, never data
            raise RuntimeError(f"{source}: input {inputs[source]} != kept {kept[source]} + "
                               f"rejected {counts[f'rejected_{source}']}")
    stats = interactions.agg(F.countDistinct("user_id").alias("users"),
                             F.countDistinct("item_id").alias("interacted_items"),
                             *[F.sum(F.when(F.col("split") == s, 1).otherwise(0)).alias(f"split_{s}")
                               for s in schemas.SPLITS]).first()
    counts.update({k: int(v or 0) for k, v in stats.asDict().items()})
    return counts


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
