"""Row-level validation, k-core filtering and the leave-last-out split.

Pure DataFrame functions: every input row comes out either kept or rejected with
exactly one reason, so `input == kept + rejected` holds by construction.

Readers (siren_batch.readers) hand over string-typed frames (RAW_INTERACTIONS,
RAW_ITEMS) so that bad values reach these checks instead of turning into nulls
inside a typed reader. Checks run in this order; the first failing one wins:

  interactions: malformed_line | malformed_json (the reader's `defect`), missing_id,
                bad_rating, bad_timestamp, bad_split, duplicate, unknown_item
                (then k-core: kcore)
  items:        malformed_line | malformed_json, missing_id, empty_text, duplicate

A reason is a code from the lists below, optionally followed by ": detail"
("malformed_line: 5 fields, header has 4"); counts are per code (reason_code).
"""

from __future__ import annotations

import logging

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F, types as T

from siren_batch import schemas
from siren_batch.backends import SCALE

logger = logging.getLogger(__name__)

MALFORMED = ("malformed_line", "malformed_json")  # set by a reader: CSV/TSV, JSON Lines
INTERACTION_REASONS = (*MALFORMED, "missing_id", "bad_rating", "bad_timestamp", "bad_split",
                       "duplicate", "unknown_item", "kcore")
ITEM_REASONS = (*MALFORMED, "missing_id", "empty_text", "duplicate")
NOT_BAD_DATA = ("kcore",)  # removed by design; does not count toward data.max_reject_fraction

# ts beyond 2200-01-01 in ms is a unit mistake (micro/nanoseconds), and would overflow a long.
MAX_TS_MS = 7258118400000
TS_SCALE = {"ms": 1.0, "s": 1000.0}

_S = T.StringType()
RAW_INTERACTIONS = T.StructType([
    T.StructField("user_id", _S), T.StructField("item_id", _S),
    T.StructField("rating", _S),                 # number as text
    T.StructField("ts", _S),                     # epoch number (unit ts_unit) or ISO text
    T.StructField("split", _S),                  # train | valid | test, or null
    T.StructField("record", _S),                 # the raw row as JSON, or the raw line when malformed
    T.StructField("defect", _S),                 # null, or why the reader could not parse the row (a reason)
])
RAW_ITEMS = T.StructType([
    T.StructField("item_id", _S), T.StructField("title", _S), T.StructField("genres", _S),
    T.StructField("text", _S), T.StructField("record", _S), T.StructField("defect", _S),
])


def _blank(col: str) -> Column:
    return F.col(col).isNull() | (F.trim(F.col(col)) == "")


def _first_reason(checks: list[tuple[str | Column, Column]]) -> Column:
    """A `reason` column: the name of the first check that is true, else null."""
    out = F.lit(None).cast("string")
    for name, failed in reversed(checks):
        out = F.when(failed, F.lit(name) if isinstance(name, str) else name).otherwise(out)
    return out


def _reader_defect() -> tuple[Column, Column]:
    """The reader's own reason ("malformed_line: ..."), checked before any value."""
    return F.col("defect"), F.col("defect").isNotNull()


def reason_code(reason: Column) -> Column:
    """"malformed_line" of "malformed_line: 5 fields, header has 4"."""
    return F.substring_index(reason, ":", 1)


def _mark_duplicates(df: DataFrame, keys: list[str], order: list[Column]) -> DataFrame:
    """Set reason=duplicate on all but the first row per `keys` among rows still unrejected."""
    ok = F.col("reason").isNull()
    rank = F.row_number().over(Window.partitionBy(ok, *keys).orderBy(*order))
    return df.withColumn("reason", F.when(ok & (rank > 1), F.lit("duplicate")).otherwise(F.col("reason")))


def _rejects(df: DataFrame, source: str) -> DataFrame:
    return df.where(F.col("reason").isNotNull()).select(
        F.lit(source).alias("source"), "reason", "record")


def parse_ts(col: str, ts_unit: str) -> Column:
    """Epoch milliseconds from a text column, null when it does not parse."""
    if ts_unit == "iso":
        return F.unix_millis(F.try_to_timestamp(F.col(col)))
    number = F.col(col).try_cast("double") * F.lit(TS_SCALE[ts_unit])
    return F.when(~F.isnan(number), number)


MODEL_SCALE = (float(SCALE[0]), float(SCALE[-1]))  # the model's answers (backends.SCALE): every table's ratings


def to_model_scale(rating: Column, scale: tuple[float, float]) -> Column:
    """A rating on the source's `scale` (low, high) mapped linearly onto MODEL_SCALE: 1-10 data's
    10 is 5, its 1 is 1; half stars 0.5-5 give 0.5 -> 1 and 3 -> 3.22. The identity on 1-5."""
    (low, high), (lo, hi) = scale, MODEL_SCALE
    if (low, high) == (lo, hi):
        return rating
    mapped = F.lit(lo) + (rating - F.lit(low)) * F.lit(hi - lo) / F.lit(high - low)
    return F.least(F.greatest(mapped, F.lit(lo)), F.lit(hi))   # never off 1-5 by a rounding error


def from_model_scale(ratings, scale: tuple[float, float]):
    """to_model_scale undone, on numbers (pandas, numpy, float), rounded to 6 decimals so a source
    value comes back exactly: what a stored rating was in the source's units.

    >>> from_model_scale(1 + 2.5 * 4 / 4.5, (0.5, 5.0)), from_model_scale(5.0, (1.0, 10.0))
    (3.0, 10.0)
    """
    (low, high), (lo, hi) = scale, MODEL_SCALE
    return round(low + (ratings - lo) * (high - low) / (hi - lo), 6)


def validate_interactions(raw: DataFrame, items: DataFrame, *, rating_min: float, rating_max: float,
                          ts_unit: str = "ms", source_split: bool = False,
                          scale: tuple[float, float] = MODEL_SCALE) -> tuple[DataFrame, DataFrame]:
    """Check RAW_INTERACTIONS rows against each other and the valid `items`.

    Returns (kept, rejects). kept has the INTERACTIONS columns (split = the source's
    split when `source_split`, else null) plus `record`, so later filters can reject
    the raw row; rejects has the REJECTS columns. Of rows with the same user_id and
    item_id the latest by ts is kept (ties: higher rating, then the raw record text).
    """
    return split_marked(mark_interactions(raw, items, rating_min=rating_min, rating_max=rating_max,
                                          ts_unit=ts_unit, source_split=source_split, scale=scale), "interactions")


def mark_interactions(raw: DataFrame, items: DataFrame, *, rating_min: float, rating_max: float,
                      ts_unit: str = "ms", source_split: bool = False,
                      scale: tuple[float, float] = MODEL_SCALE) -> DataFrame:
    """validate_interactions before the split: every raw row once, with the kept
    columns and `reason` (null when kept). Only items.item_id is read. Materialise it
    (localCheckpoint) when both halves are used, so the checks run once."""
    rating = F.col("rating").try_cast("double")
    ts = parse_ts("ts", ts_unit)
    checks = [
        _reader_defect(),
        ("missing_id", _blank("user_id") | _blank("item_id")),
        ("bad_rating", rating.isNull() | F.isnan(rating) | (rating < rating_min) | (rating > rating_max)),
        ("bad_timestamp", ts.isNull() | (ts < 0) | (ts >= MAX_TS_MS)),
    ]
    if source_split:
        checks.append(("bad_split", F.col("split").isNull() | ~F.col("split").isin(*schemas.SPLITS)))
    known = items.groupBy("item_id").agg(F.lit(True).alias("_known"))  # one row per id: no fan-out
    df = (raw
          .withColumn("reason", _first_reason(checks))
          .withColumn("user_id", F.trim("user_id"))
          .withColumn("item_id", F.trim("item_id"))
          .withColumn("rating", F.when(F.col("reason").isNull(), to_model_scale(rating, scale)))
          .withColumn("ts", F.when(F.col("reason").isNull(), ts.cast("long")))
          .withColumn("split", F.col("split") if source_split else F.lit(None).cast("string")))
    df = _mark_duplicates(df, ["user_id", "item_id"],
                          [F.col("ts").desc(), F.col("rating").desc(), F.col("record")])
    df = (df.join(known, on="item_id", how="left")
          .withColumn("reason", F.when(F.col("reason").isNull() & F.col("_known").isNull(),
                                       F.lit("unknown_item")).otherwise(F.col("reason"))))
    return df.select(*KEPT_COLUMNS["interactions"], "reason")


KEPT_COLUMNS = {"interactions": ("user_id", "item_id", "rating", "ts", "split", "record"),
                "items": ("item_id", "title", "genres", "text")}


def split_marked(df: DataFrame, source: str) -> tuple[DataFrame, DataFrame]:
    """(kept, rejects) of a mark_* frame: rows without a reason with the source's
    kept columns, and the others as REJECTS."""
    return df.where(F.col("reason").isNull()).select(*KEPT_COLUMNS[source]), _rejects(df, source)


def validate_items(raw: DataFrame) -> tuple[DataFrame, DataFrame]:
    """Check RAW_ITEMS rows. Returns (items as ITEMS, rejects as REJECTS).

    Of rows with the same item_id the first by (title, genres, record) is kept.
    A blank genres value becomes null.
    """
    return split_marked(mark_items(raw), "items")


def mark_items(raw: DataFrame) -> DataFrame:
    """validate_items before the split (as mark_interactions)."""
    checks = [
        _reader_defect(),
        ("missing_id", _blank("item_id")),
        ("empty_text", _blank("title") | _blank("text")),
    ]
    df = (raw.withColumn("reason", _first_reason(checks))
          .withColumn("item_id", F.trim("item_id"))
          .withColumn("title", F.trim("title"))
          .withColumn("genres", F.when(~_blank("genres"), F.trim("genres"))))
    df = _mark_duplicates(df, ["item_id"],
                          [F.col("title"), F.col("genres").asc_nulls_last(), F.col("record")])
    return df.select(*KEPT_COLUMNS["items"], "record", "reason")


SAMPLE_BUCKETS = 1_000_000


def in_user_sample(fraction: float) -> Column:
    """True for the users a `fraction` sample keeps: a hash of user_id, so the same users
    are kept by every run, stage and machine (and a larger fraction keeps a superset)."""
    return F.pmod(F.xxhash64(F.col("user_id")), F.lit(SAMPLE_BUCKETS)) < F.lit(int(round(fraction * SAMPLE_BUCKETS)))


def kcore_filter(df: DataFrame, k: int) -> tuple[DataFrame, DataFrame]:
    """Keep rows whose user and item both have >= k rows, iterating until stable.

    The k-core of the user-item graph is the subgraph induced by the surviving users
    and items, so the loop runs on (user_id, item_id) pairs only and the rows are
    joined once at the end. Returns (kept, rejects with reason kcore); k=0 is off.
    The raw row in the rejects is `record` when `df` carries one.
    """
    if k <= 0:
        return df, df.sparkSession.createDataFrame([], schemas.REJECTS)
    edges = df.select("user_id", "item_id").persist()
    n = edges.count()
    for step in range(1, 1000):
        by_user = Window.partitionBy("user_id")
        by_item = Window.partitionBy("item_id")
        survived = (edges
                    .withColumn("_nu", F.count(F.lit(1)).over(by_user))
                    .withColumn("_ni", F.count(F.lit(1)).over(by_item))
                    .where((F.col("_nu") >= k) & (F.col("_ni") >= k))
                    .select("user_id", "item_id").persist())
        m = survived.count()
        edges.unpersist()
        edges = survived
        logger.info("kcore k=%d step %d: %d -> %d pairs", k, step, n, m)
        if m == n:
            break
        n = m
    keep = edges.groupBy("user_id", "item_id").agg(F.lit(True).alias("_core"))  # no fan-out
    marked = (df.join(keep, on=["user_id", "item_id"], how="left")
              .withColumn("reason", F.when(F.col("_core").isNull(), F.lit("kcore"))))
    if "record" not in df.columns:
        marked = marked.withColumn("record", F.to_json(F.struct(*[F.col(c) for c in df.columns])))
    kept = marked.where(F.col("reason").isNull()).select(*df.columns)
    return kept, _rejects(marked, "interactions")


def leave_last_out_split(df: DataFrame) -> DataFrame:
    """Per user ordered by (ts, item_id): last -> test, second last -> valid, rest train.

    Users with fewer than 3 interactions keep all of them in train. Deterministic,
    since (user_id, item_id) is unique after validation.
    """
    by_user = Window.partitionBy("user_id")
    latest_first = by_user.orderBy(F.col("ts").desc(), F.col("item_id").desc())
    rank = F.row_number().over(latest_first)
    n = F.count(F.lit(1)).over(by_user)
    split = (F.when(n < 3, F.lit("train"))
             .when(rank == 1, F.lit("test"))
             .when(rank == 2, F.lit("valid"))
             .otherwise(F.lit("train")))
    return df.withColumn("split", split)
