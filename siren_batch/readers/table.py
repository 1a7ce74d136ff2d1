"""Any Parquet or CSV pair of tables (interactions, items) with a column mapping."""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from siren_batch.config import Config, ConfigError
from siren_batch.readers.lines import read_delimited
from siren_batch.readers.raw import data_columns, item_text, need, raw_interactions, raw_items


def _read_user_table(spark: SparkSession, cfg: Config, key: str) -> tuple[DataFrame, str]:
    path = need(spark, getattr(cfg.data, key.split(".")[1]), key)
    if cfg.data.format == "csv":
        return read_delimited(spark, path, ","), path
    return spark.read.parquet(path), path  # Parquet carries its own declared schema


def _columns(df: DataFrame, path: str, mapping: dict[str, str], key: str,
             required: list[str], optional: list[str]) -> dict[str, Column | None]:
    """canonical name -> source column as text; a required or explicitly mapped
    column that is absent fails with one line naming the config key to set."""
    unknown = [c for c in mapping if c not in required + optional]
    if unknown:
        raise ConfigError(f"{key} maps unknown canonical columns {unknown}; known: {required + optional}")
    out: dict[str, Column | None] = {}
    for name in required + optional:
        source = mapping.get(name, name)
        if source in data_columns(df):
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
    inter, inter_path = _read_user_table(spark, cfg, "data.path")
    items, items_path = _read_user_table(spark, cfg, "data.items_path")
    c = _columns(inter, inter_path, cfg.data.columns, "data.columns",
                 ["user_id", "item_id", "rating", "ts"] + (["split"] if cfg.data.split == "source" else []),
                 [] if cfg.data.split == "source" else ["split"])
    canonical = [(col if col is not None else F.lit(None).cast("string")).alias(f"_{n}") for n, col in c.items()]
    raw_inter = raw_interactions(inter.select("*", *canonical), "_user_id", "_item_id", "_rating", "_ts",
                                  F.col("_split") if "split" in c else None, cols=data_columns(inter))
    ic = _columns(items, items_path, cfg.data.item_columns, "data.item_columns",
                  ["item_id", "title"], ["genres", "text"])
    genres = ic["genres"] if ic["genres"] is not None else F.lit(None).cast("string")
    cats = F.filter(F.split(F.coalesce(genres, F.lit("")), r"\|"), lambda g: g != "")
    text = ic["text"] if ic["text"] is not None else item_text(ic["title"], cats)
    return (raw_items(items, ic["item_id"], ic["title"], genres, text, data_columns(items)),
            raw_inter, cfg.data.ts_unit)


