"""Amazon Reviews 2023: the raw McAuley Lab reviews and meta files (JSONL, plain or .gz)."""

from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F, types as T

from siren_batch.config import Config
from siren_batch.readers.lines import read_jsonl
from siren_batch.readers.raw import item_text, need, raw_interactions, raw_items, strings

# Only the fields ingest uses are declared: the others (a review's title and text, a meta row's
# description, price, details, ...) are never parsed, so they neither ride along in every row and
# reject record (the review texts are most of a category's bytes) nor reject a row over their type.
_AMAZON_REVIEW = strings(["rating", "asin", "parent_asin", "user_id", "timestamp"])
_AMAZON_META = T.StructType([
    *strings(["parent_asin", "title", "main_category", "store"]).fields,
    *[T.StructField(n, T.ArrayType(T.StringType())) for n in ("categories", "features")]])


def read_amazon2023(spark: SparkSession, cfg: Config) -> tuple[DataFrame, DataFrame, str]:
    """Reviews JSONL (data.path) and meta JSONL (data.items_path), plain or .gz.

    item_id = parent_asin; genres = categories joined by "|" (else main_category);
    text "Title: …. Category: …. Feature: …." with the features joined by spaces.
    """
    reviews_path = need(spark, cfg.data.path, "data.path")
    meta_path = need(spark, cfg.data.items_path, "data.items_path")
    reviews = read_jsonl(spark, reviews_path, _AMAZON_REVIEW, ("user_id", "parent_asin"))
    meta = read_jsonl(spark, meta_path, _AMAZON_META, ("parent_asin",))
    cats = F.filter(F.coalesce(F.col("categories"), F.array()), lambda c: F.trim(c) != "")
    cats = F.when(F.size(cats) > 0, cats).otherwise(
        F.when(F.trim(F.col("main_category")) != "", F.array(F.col("main_category"))).otherwise(F.array()))
    features = F.filter(F.coalesce(F.col("features"), F.array()), lambda c: F.trim(c) != "")
    items = raw_items(meta, F.col("parent_asin"), F.col("title"), F.array_join(cats, "|"),
                       F.when(F.trim(F.col("title")) != "", item_text(F.col("title"), cats, features)),
                       ["parent_asin", "title", "main_category", "categories", "features", "store"])
    return items, raw_interactions(reviews, "user_id", "parent_asin", "rating", "timestamp"), "ms"


