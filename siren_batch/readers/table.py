"""Any Parquet or CSV pair of tables (interactions, items) with a column mapping."""

from __future__ import annotations

import re

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F, types as T

from siren_batch.config import Config, ConfigError
from siren_batch.readers.lines import read_delimited
from siren_batch.readers.raw import data_columns, item_text, need, raw_interactions, raw_items


_INTEGERS = (T.ByteType, T.ShortType, T.IntegerType, T.LongType)
_TIMES = (T.TimestampType, T.TimestampNTZType, T.DateType)
_ID = ((T.StringType, *_INTEGERS), "a string or integer column (a float id reads as '1.0' and matches no item)")
_NUMBER = ((T.StringType, T.NumericType), "a number or string column")
_TEXT = ((T.StringType,), "a string column")
_TYPES = {"user_id": _ID, "item_id": _ID, "rating": _NUMBER, "ts": _NUMBER, "split": _TEXT,
          "title": _TEXT, "genres": _TEXT, "text": _TEXT}  # canonical column -> (accepted, what to say)


def _read_parquet(spark: SparkSession, path: str, key: str) -> DataFrame:
    """mergeSchema reads the footer of every file, so part files that disagree on a
    column's type fail here in one line instead of mid-job in a Spark task."""
    try:
        return spark.read.option("mergeSchema", True).parquet(path)
    except Exception as e:  # Py4JJavaError or AnalysisException, depending on where Spark stops
        text = str(e)
        if "CANNOT_MERGE" in text:
            types = re.search(r'incompatible data types ("\w+" and "\w+")', text)
            raise ConfigError(f"{key}: the Parquet files in {path} disagree on a column's type"
                              f"{f' ({types.group(1)})' if types else ''}; rewrite them with one schema") from None
        if "PARQUET_TYPE_ILLEGAL" in text:  # e.g. nanosecond timestamps (pandas' default)
            kind = re.search(r"Illegal Parquet type: ([^.]+)\.", text)
            raise ConfigError(f"{key}: {path} has a column of a Parquet type Spark cannot read"
                              f"{f' ({kind.group(1)})' if kind else ''}; rewrite it (timestamps in "
                              "micro- or milliseconds)") from None
        raise


def _read_user_table(spark: SparkSession, cfg: Config, key: str) -> tuple[DataFrame, str]:
    path = need(spark, getattr(cfg.data, key.split(".")[1]), key)
    if cfg.data.format == "csv":
        return read_delimited(spark, path, ","), path
    return _read_parquet(spark, path, key), path  # Parquet carries its own declared schema


def _check_type(df: DataFrame, path: str, key: str, name: str, source: str, ts_unit: str) -> None:
    """A whole column of the wrong type is a file problem, not a row problem: one line."""
    dtype = df.schema[source].dataType
    accepted, want = _TYPES[name]
    if name == "ts" and ts_unit == "iso":
        accepted, want = (*accepted, *_TIMES), "a number, string, timestamp or date column"
    if not isinstance(dtype, accepted):
        hint = " or set data.ts_unit=iso" if name == "ts" and isinstance(dtype, _TIMES) else ""
        raise ConfigError(f"column {source!r} ({name}) in {path} is {dtype.simpleString()}; {name} needs "
                          f"{want}: fix the file, set {key}.{name}=<column>{hint}")


def _columns(df: DataFrame, path: str, mapping: dict[str, str], key: str, required: list[str],
             optional: list[str], ts_unit: str = "ms") -> dict[str, Column | None]:
    """canonical name -> source column as text; a required or explicitly mapped
    column that is absent, or has the wrong type, fails with one line naming the
    config key to set."""
    unknown = [c for c in mapping if c not in required + optional]
    if unknown:
        raise ConfigError(f"{key} maps unknown canonical columns {unknown}; known: {required + optional}")
    out: dict[str, Column | None] = {}
    for name in required + optional:
        source = mapping.get(name, name)
        if source in data_columns(df):
            _check_type(df, path, key, name, source, ts_unit)
            out[name] = F.col(f"`{source}`").cast("string")
        elif name in required or name in mapping:
            raise ConfigError(f"column {source!r} ({name}) not found in {path} (columns: "
                              f"{', '.join(data_columns(df))}); set {key}.{name}=<column>")
        else:
            out[name] = None
    return out


def read_table(spark: SparkSession, cfg: Config) -> tuple[DataFrame, DataFrame, str]:
    """data.path (interactions) and data.items_path (items), Parquet or CSV, with
    data.columns / data.item_columns mapping canonical -> source names. Items
    without a `text` column get "Title: …. Category: …." from title and genres."""
    return read_table_items(spark, cfg), read_table_interactions(spark, cfg), cfg.data.ts_unit


def read_table_interactions(spark: SparkSession, cfg: Config) -> DataFrame:
    """RAW_INTERACTIONS from data.path (the table source's interactions alone)."""
    inter, inter_path = _read_user_table(spark, cfg, "data.path")
    c = _columns(inter, inter_path, cfg.data.columns, "data.columns",
                 ["user_id", "item_id", "rating", "ts"] + (["split"] if cfg.data.split == "source" else []),
                 [] if cfg.data.split == "source" else ["split"], cfg.data.ts_unit)
    canonical = [(col if col is not None else F.lit(None).cast("string")).alias(f"_{n}") for n, col in c.items()]
    return raw_interactions(inter.select("*", *canonical), "_user_id", "_item_id", "_rating", "_ts",
                            F.col("_split") if "split" in c else None, cols=data_columns(inter))


def read_table_items(spark: SparkSession, cfg: Config) -> DataFrame:
    """RAW_ITEMS from data.items_path (the table source's items alone)."""
    items, items_path = _read_user_table(spark, cfg, "data.items_path")
    ic = _columns(items, items_path, cfg.data.item_columns, "data.item_columns",
                  ["item_id", "title"], ["genres", "text"])
    genres = ic["genres"] if ic["genres"] is not None else F.lit(None).cast("string")
    cats = F.filter(F.split(F.coalesce(genres, F.lit("")), r"\|"), lambda g: g != "")
    text = ic["text"] if ic["text"] is not None else item_text(ic["title"], cats)
    return raw_items(items, ic["item_id"], ic["title"], genres, text, data_columns(items))
