"""What every reader shares: paths from config and the raw frames it hands over.

The frames follow validate.RAW_ITEMS / validate.RAW_INTERACTIONS: every value a
string, read with a declared all-string schema (never inferred), so that a bad
value reaches validation as text and becomes a reject instead of a silent null.
"""

from __future__ import annotations

from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F, types as T

from siren_batch import assets
from siren_batch.config import ConfigError
from siren_batch.warehouse import path_exists

CORRUPT = "_corrupt_record"  # the raw text of a line the reader could not parse (its reject record)
DEFECT = "_defect"           # why a reader could not parse a row: the reject reason, else null
_INTERNAL = (CORRUPT, DEFECT)


def resolve(path: str) -> str:
    """Relative paths are relative to the repository root; URIs pass unchanged."""
    if "://" in path or Path(path).is_absolute():
        return path
    return str(assets.REPO_ROOT / path)


def need(spark: SparkSession, path: str | None, key: str) -> str:
    if not path:
        raise ConfigError(f"{key} is not set: set {key}=<file or folder>")
    path = resolve(path)
    if not path_exists(spark, path):
        raise ConfigError(f"{key}: {path} does not exist; set {key}=<file or folder>")
    return path


def strings(names: list[str]) -> T.StructType:
    """A declared schema of string columns (never an inferred one)."""
    return T.StructType([T.StructField(n, T.StringType()) for n in names])


def _record(df: DataFrame, cols: list[str]) -> Column:
    """The raw row as JSON: the reader's corrupt text when it could not parse it."""
    row = F.to_json(F.struct(*[F.col(f"`{c}`") for c in cols]))
    return F.coalesce(F.col(CORRUPT), row) if CORRUPT in df.columns else row


def _defect(df: DataFrame) -> Column:
    return F.col(DEFECT) if DEFECT in df.columns else F.lit(None).cast("string")


def data_columns(df: DataFrame) -> list[str]:
    """The columns of `df` that came from the input (not CORRUPT, DEFECT)."""
    return [c for c in df.columns if c not in _INTERNAL]


def raw_interactions(df: DataFrame, user: str, item: str, rating: str, ts: str,
                     split: Column | None = None, cols: list[str] | None = None) -> DataFrame:
    return df.select(F.col(user).alias("user_id"), F.col(item).alias("item_id"),
                     F.col(rating).alias("rating"), F.col(ts).alias("ts"),
                     (split if split is not None else F.lit(None).cast("string")).alias("split"),
                     _record(df, cols or data_columns(df)).alias("record"), _defect(df).alias("defect"))


def raw_items(df: DataFrame, item: Column, title: Column, genres: Column, text: Column,
              cols: list[str]) -> DataFrame:
    return df.select(item.alias("item_id"), title.alias("title"), genres.alias("genres"),
                     text.alias("text"), _record(df, cols).alias("record"), _defect(df).alias("defect"))


def item_text(title: Column, categories: Column, features: Column | None = None) -> Column:
    """"Title: …. Category: a, b. Feature: …." (the reference's text for clustering);
    empty parts are left out. `categories` and `features` are string arrays."""
    def sentence(text: Column) -> Column:  # end with one period, not two
        return F.when(text.endswith("."), text).otherwise(F.concat(text, F.lit(".")))

    def part(label: str, values: Column, sep: str) -> Column:
        return F.when(F.size(values) > 0, F.concat(F.lit(f" {label}: "), sentence(F.array_join(values, sep))))
    parts = [F.lit("Title: "), sentence(title), part("Category", categories, ", ")]
    if features is not None:
        parts.append(part("Feature", features, " "))
    return F.concat_ws("", *parts)
