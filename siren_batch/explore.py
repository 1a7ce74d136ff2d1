"""Read the warehouse without Spark (polars lazy scans, DuckDB SQL) for the
notebooks and the run report: a user's sketch and top predictions, predictions
against the truth, errors by history length and by topic, token savings, topics
and a 2-D projection of the item embeddings, a run's counts and the metrics.

    from siren_batch.config import load_config
    from siren_batch import explore
    cfg = load_config(overrides=["warehouse=./warehouse"])
    explore.predicted_vs_true(cfg).head()

Every function takes the config (for `<warehouse>/<dataset>/<table>`) and returns
a polars DataFrame (or a small dict); an absent table gives None (or an empty
frame where stated), never an exception, so callers can say "not there yet".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from siren_batch.config import Config

TABLES = ["interactions", "items", "rejects", "item_embeddings", "topics", "item_topics",
          "example_sketches", "sketches", "prompts", "ratings", "metrics", "runs",
          # written by `siren-batch nightly` only (partitioned by run_date)
          "nightly", "night_rejects", "arrived_interactions", "arrived_items"]
# The runs before a partition's score run that belong to it; not "score": an earlier score run
# wrote another partition (the chain's valid scores, an older day).
CHAIN_STAGES = ["ingest", "embed", "topics", "sketches", "prompts", "calibrate", "evaluate"]


def scan(cfg: Config, table: str) -> pl.LazyFrame | None:
    """A lazy scan of a table (hive partitions as string columns); None when absent or empty."""
    path = Path(cfg.table_path(table))
    if not path.is_dir() or next(path.glob("**/*.parquet"), None) is None:
        return None
    partitioned = next(path.glob("run_date=*"), None) is not None  # else polars reads it as a date
    return pl.scan_parquet(str(path / "**" / "*.parquet"), hive_partitioning=True,
                           hive_schema={"run_date": pl.String} if partitioned else None)


def tables(cfg: Config) -> dict[str, pl.LazyFrame]:
    """{table: lazy scan} for every table present in the warehouse."""
    return {name: frame for name in TABLES if (frame := scan(cfg, name)) is not None}


def duckdb_connection(cfg: Config):
    """A DuckDB connection with one view per present table (`SELECT * FROM ratings`)."""
    import duckdb

    con = duckdb.connect()
    for name in tables(cfg):
        glob = str(Path(cfg.table_path(name)) / "**" / "*.parquet")
        con.sql(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{glob}', hive_partitioning = true)")
    return con


def latest_run_date(cfg: Config) -> str | None:
    """The newest run_date partition of ratings (None without ratings)."""
    ratings = scan(cfg, "ratings")
    return None if ratings is None else ratings.select(pl.col("run_date").max()).collect().item()


def ratings_of(cfg: Config, run_date: str | None = None, run_id: str | None = None) -> pl.LazyFrame | None:
    """The ratings partition of run_date (default: the newest), only run_id's rows if given."""
    ratings = scan(cfg, "ratings")
    if ratings is None:
        return None
    run_date = run_date or latest_run_date(cfg)
    ratings = ratings.filter(pl.col("run_date") == run_date)
    return ratings if run_id is None else ratings.filter(pl.col("run_id") == run_id)


# ---- users --------------------------------------------------------------------------

def user_sketch(cfg: Config, user_id: str) -> dict | None:
    """The user's serving sketch (as of the end of history) as a dict; None if unknown."""
    sketches = scan(cfg, "sketches")
    if sketches is None:
        return None
    rows = sketches.filter(pl.col("user_id") == user_id).collect().to_dicts()
    return rows[0] if rows else None


def format_sketch(sketch: dict) -> str:
    """A sketch as the few lines a prompt shows.

    >>> print(format_sketch({"user_id": "7", "n_history": 3, "user_mean": 4.0,
    ...     "liked": [{"name": "space opera", "count": 2, "mean": 4.5}], "disliked": [],
    ...     "recent": [{"title": "Alien", "genres": "Horror", "rating": 2.0}]}))
    user 7: 3 ratings, mean 4.00
    liked: space opera (2 rated, mean 4.5)
    disliked: -
    recent: Alien [Horror] 2
    """
    topics = lambda stats: "; ".join(f"{t['name']} ({t['count']} rated, mean {t['mean']:.1f})"
                                     for t in stats) or "-"
    recent = "; ".join(f"{r['title']} [{r['genres'] or '-'}] {r['rating']:g}" for r in sketch["recent"]) or "-"
    mean = "-" if sketch.get("user_mean") is None else f"{sketch['user_mean']:.2f}"
    return "\n".join([f"user {sketch['user_id']}: {sketch['n_history']} ratings, mean {mean}",
                      f"liked: {topics(sketch['liked'])}", f"disliked: {topics(sketch['disliked'])}",
                      f"recent: {recent}"])


def top_predictions(cfg: Config, user_id: str, n: int = 10, run_date: str | None = None) -> pl.DataFrame | None:
    """The user's n highest predicted ratings of run_date (default newest), with titles and truth if known."""
    ratings = ratings_of(cfg, run_date)
    if ratings is None:
        return None
    out = (ratings.filter((pl.col("user_id") == user_id) & pl.col("error").is_null())
           .select("user_id", "item_id", "rating", "rating_argmax", pl.col("probs").list.max().alias("p_max"))
           .sort(["rating", "item_id"], descending=[True, False]).head(n))
    if (items := scan(cfg, "items")) is not None:
        out = out.join(items.select("item_id", "title", "genres"), on="item_id", how="left")
    if (truth := scan(cfg, "interactions")) is not None:
        out = out.join(truth.select("user_id", "item_id", pl.col("rating").alias("true_rating")),
                       on=["user_id", "item_id"], how="left")
    return out.collect()


# ---- errors ---------------------------------------------------------------------------

def predicted_vs_true(cfg: Config, run_date: str | None = None, run_id: str | None = None) -> pl.DataFrame | None:
    """Scored pairs of a ratings partition with their true rating (inner join on
    (user_id, item_id) with interactions: pairs without truth are left out), the
    user's history length before the rated interaction (n_before), and the error."""
    ratings, truth = ratings_of(cfg, run_date, run_id), scan(cfg, "interactions")
    if ratings is None or truth is None:
        return None
    truth = truth.select("user_id", "item_id", pl.col("rating").alias("true_rating"), "ts", "split",
                         # the user's interactions with a strictly smaller ts (as in evaluate's segments)
                         (pl.col("ts").rank("min").over("user_id") - 1).cast(pl.Int64).alias("n_before"))
    return (ratings.filter(pl.col("error").is_null())
            .select("user_id", "item_id", pl.col("rating").alias("predicted"), "calibrated_rating", "run_date")
            .join(truth, on=["user_id", "item_id"], how="inner")
            .with_columns((pl.col("predicted") - pl.col("true_rating")).alias("error"))
            .sort("user_id", "item_id").collect())


def history_bucket(n_before: int, edges: list[int]) -> str:
    """evaluate's history segment label of a history length.

    >>> [history_bucket(k, [5, 10]) for k in (0, 4, 5, 9, 10, 99)]
    ['<5', '<5', '5-9', '5-9', '>=10', '>=10']
    """
    for lo, hi in zip([0, *edges], edges):
        if n_before < hi:
            return f"<{hi}" if lo == 0 else f"{lo}-{hi - 1}"
    return f">={edges[-1] if edges else 0}"


def _errors(frame: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    return (frame.group_by(by).agg(pl.len().alias("n"), pl.col("error").abs().mean().alias("mae"),
                                   (pl.col("error") ** 2).mean().sqrt().alias("rmse"),
                                   pl.col("predicted").mean().alias("mean_predicted"),
                                   pl.col("true_rating").mean().alias("mean_true")))


def error_by_history(cfg: Config, run_date: str | None = None, pairs: pl.DataFrame | None = None,
                     edges: list[int] | None = None) -> pl.DataFrame | None:
    """MAE / RMSE per history-length bucket (evaluate.history_buckets edges), in bucket order."""
    pairs = predicted_vs_true(cfg, run_date) if pairs is None else pairs
    if pairs is None:
        return None
    edges = cfg.evaluate.history_buckets if edges is None else edges
    labels = [history_bucket(k, edges) for k in [0, *edges]]
    bucketed = pairs.with_columns(pl.col("n_before").map_elements(lambda k: history_bucket(k, edges),
                                                                  return_dtype=pl.String).alias("history"))
    order = pl.DataFrame({"history": labels, "_order": range(len(labels))})
    return _errors(bucketed, ["history"]).join(order, on="history", how="left").sort("_order").drop("_order")


def error_by_topic(cfg: Config, run_date: str | None = None, pairs: pl.DataFrame | None = None) -> pl.DataFrame | None:
    """MAE / RMSE per topic of the rated item (item_topics), most pairs first."""
    pairs = predicted_vs_true(cfg, run_date) if pairs is None else pairs
    item_topics, topic_names = scan(cfg, "item_topics"), scan(cfg, "topics")
    if pairs is None or item_topics is None or topic_names is None:
        return None
    names = topic_names.select("topic_id", "name").collect()
    with_topic = (pairs.join(item_topics.select("item_id", "topic_id").collect(), on="item_id", how="inner")
                  .join(names, on="topic_id", how="left"))
    return _errors(with_topic, ["topic_id", "name"]).sort(["n", "topic_id"], descending=[True, False])


@dataclass
class TokenSavings:
    measures: str            # what the numbers are, in one sentence
    pairs: pl.DataFrame      # per pair: sketch_tokens, raw_tokens
    summary: dict            # pairs, mean tokens of each, saved fraction


def token_savings(cfg: Config) -> TokenSavings | None:
    """Prompt tokens of sketch prompts against raw-history prompts.

    Measured when the prompts table holds both variants (prompts.variants
    includes raw): the same (user, item, mode) pairs, tokenizer counts. Else
    an estimate from the newest ratings: their prompt_tokens against those plus
    the history lines the sketch leaves out (n_history minus the recent lines
    shown) at the mean token length of a recent line (4 characters a token).
    None when neither table is there."""
    prompts = scan(cfg, "prompts")
    if prompts is not None:
        both = (prompts.filter(pl.col("variant").is_in(["sketch", "raw"]))
                .collect().pivot("variant", index=["user_id", "item_id", "split", "mode"], values="prompt_tokens"))
        if {"sketch", "raw"} <= set(both.columns):
            pairs = both.drop_nulls(["sketch", "raw"]).rename({"sketch": "sketch_tokens", "raw": "raw_tokens"})
            return TokenSavings("measured: tokens of the sketch and the raw-history prompt of the same "
                                "pairs (prompts table)", pairs, _savings(pairs))
    ratings, sketches = ratings_of(cfg), scan(cfg, "sketches")
    if ratings is None or sketches is None:
        return None
    line = pl.col("recent").list.eval(pl.element().struct.field("title").str.len_chars() + 12).list.mean() / 4
    users = sketches.select("user_id", "n_history", pl.col("recent").list.len().alias("_shown"),
                            line.fill_null(0).alias("_line_tokens"))
    pairs = (ratings.filter(pl.col("error").is_null()).select("user_id", "item_id", pl.col("prompt_tokens")
                                                              .alias("sketch_tokens"))
             .join(users, on="user_id", how="inner")
             .with_columns((pl.col("sketch_tokens") + (pl.col("n_history") - pl.col("_shown")).clip(0)
                            * pl.col("_line_tokens")).round().cast(pl.Int64).alias("raw_tokens"))
             .select("user_id", "item_id", "sketch_tokens", "raw_tokens").collect())
    return TokenSavings("estimate (no raw prompts stored): scored prompt tokens against those plus the "
                        "left-out history lines at ~4 characters a token", pairs, _savings(pairs))


def _savings(pairs: pl.DataFrame) -> dict:
    sketch, raw = pairs["sketch_tokens"].sum(), pairs["raw_tokens"].sum()
    return {"pairs": pairs.height, "mean_sketch_tokens": pairs["sketch_tokens"].mean(),
            "mean_raw_tokens": pairs["raw_tokens"].mean(),
            "saved_fraction": None if not raw else 1 - sketch / raw}


# ---- topics -----------------------------------------------------------------------------

def topic_summary(cfg: Config) -> pl.DataFrame | None:
    """Per topic: name, size, mean distance of its items to the centroid, and the
    interactions with its items (count, mean rating); largest first."""
    topics, item_topics = scan(cfg, "topics"), scan(cfg, "item_topics")
    if topics is None or item_topics is None:
        return None
    out = topics.select("topic_id", "name", "size").join(
        item_topics.group_by("topic_id").agg(pl.col("distance").mean().alias("mean_distance")),
        on="topic_id", how="left")
    if (interactions := scan(cfg, "interactions")) is not None:
        rated = (interactions.join(item_topics.select("item_id", "topic_id"), on="item_id", how="inner")
                 .group_by("topic_id").agg(pl.len().alias("interactions"),
                                           pl.col("rating").mean().alias("mean_rating")))
        out = out.join(rated, on="topic_id", how="left")
    return out.sort(["size", "topic_id"], descending=[True, False]).collect()


def nearest_items_per_topic(cfg: Config, m: int = 5) -> pl.DataFrame | None:
    """The m items nearest each topic's centroid (rank 1 = nearest), with titles."""
    item_topics, topics = scan(cfg, "item_topics"), scan(cfg, "topics")
    if item_topics is None or topics is None:
        return None
    out = (item_topics.sort(["topic_id", "distance", "item_id"])
           .with_columns(pl.int_range(1, pl.len() + 1).over("topic_id").alias("rank"))
           .filter(pl.col("rank") <= m)
           .join(topics.select("topic_id", pl.col("name").alias("topic")), on="topic_id", how="left"))
    if (items := scan(cfg, "items")) is not None:
        out = out.join(items.select("item_id", "title", "genres"), on="item_id", how="left")
    return out.sort("topic_id", "rank").collect()


def embedding_projection(cfg: Config, max_items: int = 20000) -> pl.DataFrame | None:
    """Item embeddings projected on their first two principal components (numpy
    SVD of the centred matrix), with each item's topic. Above max_items a fixed
    hash sample of items is projected. Columns: item_id, x, y, pc1_share and
    pc2_share (the variance each component explains, equal on every row),
    topic_id, topic."""
    import numpy as np

    embeddings = scan(cfg, "item_embeddings")
    if embeddings is None:
        return None
    total = embeddings.select(pl.len()).collect().item()
    if total > max_items:
        embeddings = embeddings.filter(pl.col("item_id").hash(seed=0) % -(-total // max_items) == 0)
    frame = embeddings.sort("item_id").collect()
    if frame.height < 2:
        return None
    matrix = np.asarray(frame["embedding"].to_list(), dtype=np.float64)
    matrix -= matrix.mean(axis=0)
    _, singular, vt = np.linalg.svd(matrix, full_matrices=False)
    xy = matrix @ vt[:2].T
    explained = (singular[:2] ** 2 / (singular ** 2).sum()).tolist()
    out = pl.DataFrame({"item_id": frame["item_id"], "x": xy[:, 0], "y": xy[:, 1]}).with_columns(
        pl.lit(explained[0]).alias("pc1_share"), pl.lit(explained[1]).alias("pc2_share"))
    item_topics, topics = scan(cfg, "item_topics"), scan(cfg, "topics")
    if item_topics is not None and topics is not None:
        labels = item_topics.select("item_id", "topic_id").join(
            topics.select("topic_id", pl.col("name").alias("topic")), on="topic_id", how="left").collect()
        out = out.join(labels, on="item_id", how="left")
    return out


# ---- runs and metrics -----------------------------------------------------------------------

def _runs_of(runs: pl.DataFrame, cfg: Config, run_id: str | None, run_date: str | None,
             score_ids: list[str]) -> tuple[pl.DataFrame, str]:
    """The runs rows behind a run: see run_counts."""
    if run_id is not None:
        return runs.filter(pl.col("run_id") == run_id), f"run {run_id}"
    night = Path(cfg.warehouse) / cfg.dataset / "_nightly" / str(run_date)
    night_ids = [run for p in sorted(night.glob("*.json")) if (run := json.loads(p.read_text()).get("run_id"))]
    if night_ids:
        return runs.filter(pl.col("run_id").is_in(night_ids)), f"the night {run_date} (_nightly markers)"
    scored = runs.filter(pl.col("run_id").is_in(score_ids))
    if scored.is_empty():
        latest = runs.sort("started_at").group_by("stage", maintain_order=True).last().select(runs.columns)
        return latest, "the latest run of each stage (no run wrote this ratings partition)"
    start = scored["started_at"].min()
    before = (runs.filter((pl.col("started_at") < start) & pl.col("stage").is_in(CHAIN_STAGES))
              .sort("started_at").group_by("stage", maintain_order=True).last().select(runs.columns))
    evaluated = runs.filter((pl.col("stage") == "evaluate") & (pl.col("started_at") > start))
    evaluated = evaluated.sort("started_at").tail(1)
    return (pl.concat([before, scored, evaluated]),
            f"ratings run_date={run_date}: its score run, the latest run of each stage before it "
            "and the next evaluate run")


def run_counts(cfg: Config, run_id: str | None = None, run_date: str | None = None) -> dict:
    """Counts of one run: rows in, rejected by reason, scored, errors by reason,
    tokens, and per stage its duration and input rows/s.

    The stages are those of run_id if given; else of the night run_date (its
    `_nightly/<date>/*.json` markers); else the score run(s) that wrote the
    ratings partition of run_date (default: newest), the latest run of every
    chain stage before it and the evaluate run after it. Rejects come from
    `night_rejects` for a night, else from the `rejects` table (the last ingest).
    Keys: run_date, scope, stages (DataFrame or None), rejects (DataFrame or None),
    rejects_source, rows, scored, errors (DataFrame or None), prompt_tokens, output_tokens.
    """
    out: dict = {"run_date": run_date or (None if run_id else latest_run_date(cfg))}
    ratings = ratings_of(cfg, out["run_date"], run_id) if out["run_date"] else None
    rated = ratings.collect() if ratings is not None else None
    if rated is not None:
        out.update(rows=rated.height, scored=int(rated["error"].is_null().sum()),
                   prompt_tokens=int(rated["prompt_tokens"].sum() or 0),
                   output_tokens=int(rated["output_tokens"].sum() or 0),
                   errors=(rated.filter(pl.col("error").is_not_null())
                           .group_by(pl.col("error").str.split(":").list.first().alias("reason"))
                           .agg(pl.len().alias("n")).sort("n", "reason", descending=[True, False])))
    runs = scan(cfg, "runs")
    if runs is not None:
        score_ids = [] if rated is None else rated["run_id"].unique().to_list()
        stages, out["scope"] = _runs_of(runs.collect(), cfg, run_id, out["run_date"], score_ids)
        out["stages"] = (stages.sort("started_at").select(
            "stage", "run_id", "started_at", "status", "input_rows", "output_rows", "rejected_rows",
            "duration_s", (pl.col("input_rows") / pl.col("duration_s")).round(1).alias("input_rows_per_s")))
    night = scan(cfg, "night_rejects")
    if night is not None and out["run_date"]:
        rejects, out["rejects_source"] = night.filter(pl.col("run_date") == out["run_date"]), "night_rejects"
    else:
        rejects, out["rejects_source"] = scan(cfg, "rejects"), "rejects (the last ingest)"
    if rejects is not None:
        out["rejects"] = (rejects.group_by("source", pl.col("reason").str.split(":").list.first())
                          .agg(pl.len().alias("n")).sort("n", "source", "reason", descending=[True, False, False])
                          .collect())
    return out


def _eval_time(eval_id: str) -> str:
    """Sort key: the run time in an evaluate eval_id, or the night's date.

    >>> _eval_time("1998-04-23-20260105T101500-ab12cd"), _eval_time("nightly-2026-01-05")
    ('20260105T101500', '20260105T000000')
    """
    if m := re.search(r"(\d{8}T\d{6})", eval_id):
        return m.group(1)
    m = re.search(r"(\d{4})-(\d{2})-(\d{2})", eval_id)
    return f"{m.group(1)}{m.group(2)}{m.group(3)}T000000" if m else ""


def eval_ids(cfg: Config) -> list[str]:
    """The eval_ids of the metrics table, oldest first (by the time or date in the id)."""
    metrics = scan(cfg, "metrics")
    ids = [] if metrics is None else metrics.select(pl.col("eval_id").unique()).collect()["eval_id"].to_list()
    return sorted(ids, key=lambda e: (_eval_time(e), e))


def metrics_table(cfg: Config, eval_id: str | None = None) -> tuple[str, pl.DataFrame] | None:
    """(eval_id, system x metric) for segment all of eval_id (default: the newest),
    with n = the pairs behind mae; best MAE first. None without metrics."""
    ids = eval_ids(cfg)
    eval_id = eval_id or (ids[-1] if ids else None)
    if eval_id is None:
        return None
    rows = scan(cfg, "metrics").filter((pl.col("eval_id") == eval_id) & (pl.col("segment") == "all")).collect()
    if rows.is_empty():
        return None
    order = [m for m in ("mae", "rmse", "user_mae", "user_rmse", "nll", "coverage") if m in rows["metric"]]
    order += sorted(set(rows["metric"]) - set(order))
    wide = rows.pivot("metric", index="system", values="value", aggregate_function="first")
    n = rows.filter(pl.col("metric") == "mae").select("system", "n")
    return eval_id, (wide.join(n, on="system", how="left").select("system", *order, "n")
                     .sort(pl.col("mae").is_null(), "mae", "system") if "mae" in order else wide)
