"""The SIREN release (Amazon Movies & TV; any category in its format) with its own
train/valid/test split (JSONL, plain or .gz)."""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F, types as T

from siren_batch.config import Config, ConfigError
from siren_batch.readers.lines import read_jsonl
from siren_batch.readers.raw import CORRUPT, DEFECT, item_text, need, raw_interactions, raw_items, strings
from siren_batch.warehouse import path_exists

_SIREN_HISTORY = T.StructType([
    T.StructField("user_id", T.StringType()), T.StructField("history", T.StringType()),
    T.StructField("history_asins", T.ArrayType(T.StringType())),
    T.StructField("history_ratings", T.ArrayType(T.StringType()))])
_SIREN_ROW = strings(["user_id", "parent_asin", "timestamp", "label", "target"])


def _history_lines(history: Column) -> Column:
    """The history text's lines; none for a null or empty text (splitting "" gives one line)."""
    return F.when(F.coalesce(history, F.lit("")) == "", F.array().cast("array<string>")).otherwise(
        F.split(history, "\n"))


def _history_lengths(line: Column) -> Column:
    """A history line whose asins, ratings and text lines differ in number cannot be
    zipped into (item, rating, text) rows: the reason, else null. A missing field counts
    as none (Spark's size of null is null, which would pass unseen and lose the line)."""
    n = [F.when(part.isNull(), 0).otherwise(F.size(part))   # size(null) is null with ANSI on, else -1
         for part in (line["history_asins"], line["history_ratings"], _history_lines(line["history"]))]
    return F.when((n[0] != n[1]) | (n[0] != n[2]), F.format_string(
        "malformed_json: %d history_asins, %d history_ratings, %d history lines", *n))


# "Title, cat1|cat2": the categories are a path, and a path's last part may hold ", " ("Music
# Artists|Presley, Elvis"); (?s) because titles may hold line breaks Java's "." skips (\u0085).
_WITH_PATH = r"(?s)^(.*), ([^|]*\|.*)$"
_ANY = r"(?s)^(.*), (.*)$"


def _split_text(desc: Column) -> tuple[Column, Column]:
    """("Title", "cat1|cat2") from "Title, cat1|cat2": split at the last ", " that a category
    path ("|") follows, else at the LAST ", " (titles may contain ", "); no ", " at all
    gives an empty title (-> empty_text)."""
    with_path = desc.rlike(_WITH_PATH)
    return tuple(F.when(with_path, F.regexp_extract(desc, _WITH_PATH, k)).otherwise(F.regexp_extract(desc, _ANY, k))
                 for k in (1, 2))


def release_file(spark: SparkSession, folder: str, name: str) -> str:
    """The release's `name` file in `folder`: <name>.jsonl.gz, or as the public repository's
    first commits called two of them (history_balanced, test_balanced), or gunzipped (.jsonl);
    else a ConfigError naming what was looked for."""
    tried = [f"{stem}{ext}" for stem in (name, f"{name}_balanced") for ext in (".jsonl.gz", ".jsonl")]
    for file in tried:
        if path_exists(spark, f"{folder}/{file}"):
            return f"{folder}/{file}"
    raise ConfigError(f"data.path: {folder} has no {' / '.join(tried)}; a SIREN release folder holds "
                      "history, train, valid and test .jsonl.gz")


def read_siren_movies(spark: SparkSession, cfg: Config) -> tuple[DataFrame, DataFrame, str]:
    """Interactions = each user's history plus its valid and test rows; item id = parent_asin.

    train.jsonl.gz holds exactly the suffix of each user's `history_asins` (in order,
    with timestamps); the first len(history) - n_train items (>= 3) carry no
    timestamp. They are kept as train rows with an imputed, order-preserving ts:
    ts_i = (first known ts of the user) - (n_prefix - i) * 1000 ms, i = 0..n_prefix-1.
    Items come from the history lines and targets ("Title, cats"); each distinct
    (item, text) variant is one raw item row, so differing texts become duplicates.
    """
    folder = need(spark, cfg.data.path, "data.path")
    hist = read_jsonl(spark, release_file(spark, folder, "history"), _SIREN_HISTORY, ("user_id",), _history_lengths)
    rows = None
    for split in ("train", "valid", "test"):
        part = (read_jsonl(spark, release_file(spark, folder, split), _SIREN_ROW, ("user_id", "parent_asin"))
                .withColumn("split", F.lit(split)))
        rows = part if rows is None else rows.unionByName(part)
    per_user = rows.groupBy("user_id").agg(
        F.min(F.col("timestamp").try_cast("double")).alias("_first_ts"),
        F.sum(F.when(F.col("split") == "train", 1).otherwise(0)).alias("_n_train"))
    zipped = F.arrays_zip("history_asins", "history_ratings", _history_lines(F.col("history")).alias("_lines"))
    lines = (hist  # a malformed line is one row (_outer), its reject
             .select("user_id", CORRUPT, DEFECT, F.size("history_asins").alias("_n"), F.posexplode_outer(
                 F.when(F.col(DEFECT).isNull(), zipped)).alias("pos", "h"))
             .select("user_id", CORRUPT, DEFECT, "_n", "pos", F.col("h.history_asins").alias("item_id"),
                     F.col("h.history_ratings").alias("rating"), F.col("h._lines").alias("line")))
    n_prefix = F.col("_n") - F.coalesce(F.col("_n_train"), F.lit(0))
    prefix = (lines.join(per_user, on="user_id", how="left")
              .where((F.col("pos") < n_prefix) | F.col(DEFECT).isNotNull())
              .withColumn("ts", (F.col("_first_ts") - (n_prefix - F.col("pos")) * 1000)
                          .cast("long").cast("string"))
              .withColumn("split", F.lit("train")).withColumn("file", F.lit("history.jsonl.gz")))
    inter = (raw_interactions(prefix, "user_id", "item_id", "rating", "ts", F.col("split"),
                               ["file", "user_id", "pos", "item_id", "rating", "line"])
             .unionByName(raw_interactions(rows, "user_id", "parent_asin", "label", "timestamp",
                                            F.col("split"))))
    parsed = F.col(DEFECT).isNull()  # a malformed row is already an interaction reject
    line_desc = F.regexp_extract("line", r"(?s)^(.*), [^,]*$", 1)  # "Title, cats, 4" -> "Title, cats"
    descs = (lines.where(parsed & F.col("pos").isNotNull())   # not the empty row of an empty history
             .select("item_id", line_desc.alias("desc"))
             .unionByName(rows.where(parsed).select(F.col("parent_asin").alias("item_id"),
                                                    F.col("target").alias("desc")))
             .groupBy("item_id", "desc").count())  # one raw row per distinct text of an item
    title, cats = _split_text(F.col("desc"))
    cat_list = F.filter(F.split(cats, r"\|"), lambda c: c != "")
    items = raw_items(descs, F.col("item_id"), title, F.when(cats != "", cats),
                       item_text(title, cat_list), ["item_id", "desc"])
    return items, inter, "ms"


