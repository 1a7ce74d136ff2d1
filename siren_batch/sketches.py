"""User sketches: liked/disliked topics and the N most recent ratings.

Two tables share one body (n_history, topic_stats, liked, disliked, recent):

- example_sketches: one row per target interaction, built ONLY from that user's
  interactions with a strictly smaller ts. The reference release builds one
  static sketch per user from the whole train history, so a training row sees
  its own rating inside its sketch; here no sketch contains the rating it is
  asked to predict, and simultaneous ratings never inform each other.
- serving_sketches: one row per user as of the end of the given interactions.

How example sketches stay O(n * (K + N)) without a history x targets join:
one window per user ordered by ts with the RANGE frame (unboundedPreceding, -1),
which is exactly "strictly earlier ts", computes 2K running conditional
aggregates (count and rating sum per topic; 3K for the majority rule). Recent
items: a ROWS frame (-N, -1) collects the N rows before each row; a target takes
that list from the first row of its (user, ts) group, so rows that share its
timestamp are never included.
"""

from __future__ import annotations

import logging

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F, types as T

from siren_batch import schemas
from siren_batch.config import SketchesConfig
from siren_batch.warehouse import conform

logger = logging.getLogger(__name__)

_RECENT_ARRAY = T.ArrayType(schemas.RECENT, False)


def _topic_list(topics: DataFrame) -> list[tuple[int, str]]:
    """(topic_id, name) of every topic, sorted by id: K comes from the data."""
    rows = topics.select("topic_id", "name").collect()   # K rows: sorted here, not by a Spark sort's jobs
    if not rows:
        raise ValueError("topics table is empty: run the topics stage before the sketches stage")
    return sorted((int(r.topic_id), r.name) for r in rows)


def _enriched(interactions: DataFrame, items: DataFrame, item_topics: DataFrame) -> DataFrame:
    """Interactions with their item's topic, title and genres. An item without a
    topic still counts in n_history and recent, but in no topic's stats."""
    # One topic per item: the nearest centroid, should a table ever hold several rows per item.
    topic_of = item_topics.groupBy("item_id").agg(F.min_by("topic_id", "distance").alias("topic_id"))
    meta = items.select("item_id", "title", "genres")
    return (
        interactions.select("user_id", "item_id", "rating", "ts", "split")
        .join(topic_of, on="item_id", how="left")
        .join(meta, on="item_id", how="left")
        # An item missing from the items table is shown by its id rather than dropped.
        .withColumn("title", F.coalesce(F.col("title"), F.col("item_id")))
    )


def _sql_string(text: str) -> str:
    """A Spark SQL string literal.

    >>> print(_sql_string("it's a \\\\ b"))
    'it\\'s a \\\\ b'
    """
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _double(x: float) -> str:
    """A Spark SQL double literal.

    >>> _double(3.5)
    'CAST(3.5 AS DOUBLE)'
    """
    return f"CAST({float(x)!r} AS DOUBLE)"


# The per-topic columns below are written as Spark SQL text, one expression per
# column: built with Column calls they cost thousands of Python-to-JVM calls per
# plan (about a second of a small night), as SQL a handful.

def _aggregates(topic_ids: list[int], cfg: SketchesConfig) -> list[tuple[str, Column]]:
    """(column name, aggregate) pairs, usable over a window or in a groupBy: n_history,
    the rating sum, and per topic i the count (_n{i}) and rating sum (_s{i}), and for
    the majority rule the count of ratings >= theta (_p{i})."""
    aggs = [("n_history", "count(1)"), ("_rating_sum", "sum(rating)")]
    for i, k in enumerate(topic_ids):
        in_k = f"topic_id = {int(k)}"
        aggs.append((f"_n{i}", f"count(CASE WHEN {in_k} THEN true END)"))
        aggs.append((f"_s{i}", f"sum(CASE WHEN {in_k} THEN rating END)"))
        if cfg.rule == "majority":
            aggs.append((f"_p{i}", f"count(CASE WHEN {in_k} AND rating >= {_double(cfg.theta)} THEN true END)"))
    return [(name, F.expr(sql)) for name, sql in aggs]


def _topic_array(topics: list[tuple[int, str]]) -> str:
    """SQL: one schemas.TOPIC_STAT per topic (count 0 included) in topic_id order; the
    mean is 0.0 for count 0, so that it is non-null as the table schema declares."""
    stats = [f"named_struct('topic_id', CAST({int(topic_id)} AS INT), 'name', {_sql_string(name)}, "
             f"'count', CAST(_n{i} AS BIGINT), 'mean', coalesce(CASE WHEN _n{i} > 0 THEN _s{i} / _n{i} END, 0.0D))"
             for i, (topic_id, name) in enumerate(topics)]
    return f"array({', '.join(stats)})"


def _sorted(stats: str, ascending_mean: bool) -> str:
    """SQL: stats sorted by (mean desc|asc, count desc, topic_id)."""
    mean = "s.mean" if ascending_mean else "-s.mean"
    return (f"transform(sort_array(transform({stats}, s -> named_struct('k1', {mean}, 'k2', -s.count, "
            f"'k3', s.topic_id, 'stat', s))), x -> x.stat)")


def _body(topics: list[tuple[int, str]], cfg: SketchesConfig) -> list[Column]:
    """topic_stats, liked and disliked from the aggregate columns of _aggregates.
    (Measured: rebuilding the small topic array inline per use is cheaper here than
    materialising it as a column, which Spark then re-reads element by element.)"""
    every, theta = _topic_array(topics), _double(cfg.theta)
    if cfg.rule == "majority":  # reference code: #(rating >= theta) against the rest, ties dropped
        positives = f"array({', '.join(f'_p{i}' for i in range(len(topics)))})"
        pos = f"get({positives}, i)"
        liked = f"filter({every}, (s, i) -> {pos} > s.count - {pos})"
        disliked = f"filter({every}, (s, i) -> s.count - {pos} > {pos})"
    else:  # paper: mean rating against theta (a topic with count 0 has no mean)
        liked = f"filter({every}, s -> s.count > 0 AND s.mean >= {theta})"
        disliked = f"filter({every}, s -> s.count > 0 AND s.mean > 0 AND s.mean < {theta})"
    return [F.expr(f"filter({every}, s -> s.count > 0)").alias("topic_stats"),  # stays in topic_id order
            F.expr(_sorted(liked, ascending_mean=False)).alias("liked"),
            F.expr(_sorted(disliked, ascending_mean=True)).alias("disliked")]


def _user_mean() -> Column:
    return F.when(F.col("n_history") > 0, F.col("_rating_sum") / F.col("n_history")).alias("user_mean")


def item_priors(interactions: DataFrame) -> DataFrame:
    """schemas.ITEM_PRIORS: each item's rating count and mean over all the given
    interactions (as of the end of history: the prior a nightly candidate sees)."""
    out = interactions.groupBy("item_id").agg(F.count(F.lit(1)).alias("item_count"),
                                             F.avg("rating").alias("item_mean"))
    return conform(out, schemas.ITEM_PRIORS)


def _recent_entry() -> Column:
    # ts and item_id lead so that sort_array orders entries oldest first, deterministically.
    return F.struct("ts", "item_id", "title", "genres", "rating")


def _recent_public(entries: Column) -> Column:
    """Sort entries oldest first and reorder their fields to schemas.RECENT.

    Parquet reads mark every column nullable, but a nested field can only be cast
    to the table schema when declared non-null. These inputs are non-null by the
    INTERACTIONS contract (ingest rejects such rows), so the fallbacks never fire;
    they only tell Spark so (NaN / -1 would stand out if one ever did)."""
    return F.transform(F.sort_array(entries), lambda e: F.struct(
        F.coalesce(e["item_id"], F.lit("")).alias("item_id"),
        F.coalesce(e["title"], F.lit("")).alias("title"),
        e["genres"].alias("genres"),
        F.coalesce(e["rating"], F.lit(float("nan"))).alias("rating"),
        F.coalesce(e["ts"], F.lit(-1).cast("long")).alias("ts")))


def example_sketches(interactions: DataFrame, items: DataFrame, item_topics: DataFrame,
                     topics: DataFrame, cfg: SketchesConfig) -> DataFrame:
    """One sketch per target interaction whose split is in cfg.example_splits
    (label = its rating), from the user's interactions with a strictly smaller
    ts, of every split. Returns schemas.EXAMPLE_SKETCHES."""
    topic_list = _topic_list(topics)
    rows = _enriched(interactions, items, item_topics)
    earlier = (Window.partitionBy("user_id").orderBy("ts")
               .rangeBetween(Window.unboundedPreceding, -1))  # strictly smaller ts
    aggs = _aggregates([k for k, _ in topic_list], cfg)
    rows = rows.select("*", *[agg.over(earlier).alias(name) for name, agg in aggs])
    item_earlier = (Window.partitionBy("item_id").orderBy("ts")
                    .rangeBetween(Window.unboundedPreceding, -1))  # the item's strictly earlier ratings
    rows = rows.select("*", F.count(F.lit(1)).over(item_earlier).alias("item_count"),
                       F.avg("rating").over(item_earlier).alias("item_mean"))

    if cfg.recent_n > 0:
        before_row = (Window.partitionBy("user_id").orderBy("ts", "item_id", "rating")
                      .rowsBetween(-cfg.recent_n, -1))
        same_ts = Window.partitionBy("user_id", "ts").orderBy("item_id", "rating")
        rows = (rows.withColumn("_recent_row", F.collect_list(_recent_entry()).over(before_row))
                # The group's first row sees only strictly earlier rows; all its rows take that list.
                .withColumn("_recent", F.first("_recent_row").over(same_ts)))
        recent = _recent_public(F.col("_recent"))
    else:
        recent = F.array().cast(_RECENT_ARRAY)

    targets = (rows.where(F.col("split").isin(*cfg.example_splits))
               .select("user_id", "item_id", "ts", F.col("rating").alias("label"), "split", "n_history",
                       *_body(topic_list, cfg), recent.alias("recent"), _user_mean(),
                       "item_count", "item_mean"))
    return conform(targets, schemas.EXAMPLE_SKETCHES)


def serving_sketches(interactions: DataFrame, items: DataFrame, item_topics: DataFrame,
                     topics: DataFrame, cfg: SketchesConfig) -> DataFrame:
    """One sketch per user as of the end of the given interactions
    (as_of_ts = the user's max ts). Returns schemas.SKETCHES."""
    topic_list = _topic_list(topics)
    rows = _enriched(interactions, items, item_topics)
    aggs = _aggregates([k for k, _ in topic_list], cfg)
    per_user = rows.groupBy("user_id").agg(
        F.max("ts").alias("as_of_ts"),
        F.sort_array(F.collect_list(_recent_entry())).alias("_all"),
        *[agg.alias(name) for name, agg in aggs])
    if cfg.recent_n > 0:
        start = F.greatest(F.size("_all") - F.lit(cfg.recent_n - 1), F.lit(1))
        recent = _recent_public(F.slice("_all", start, F.lit(cfg.recent_n)))
    else:
        recent = F.array().cast(_RECENT_ARRAY)
    out = per_user.select("user_id", "as_of_ts", "n_history", *_body(topic_list, cfg),
                          recent.alias("recent"), _user_mean())
    return conform(out, schemas.SKETCHES)
