"""Predicted ratings against the truth: the METRICS table and a Markdown report.

    metrics = evaluate_systems({"llm:smollm2": ratings, "baseline:bias": bias}, interactions,
                               cfg.evaluate, eval_id)        # every system in one aggregation
    joined = join_truth(ratings, interactions, "test")       # or one system, its pairs inspected
    metrics = compute_metrics(joined, interactions, cfg.evaluate, "llm:smollm2", eval_id)
    text = markdown_report(metrics, "ml-100k test", PAPER_ROWS.get(cfg.dataset))

METRICS rows (long format), per segment:
  mae, rmse            over the covered pairs (n = covered pairs)
  user_mae, user_rmse  mean over users of each user's MAE / RMSE (n = users with a covered pair)
  coverage             covered / truth pairs (n = truth pairs)
and in segment "all" only:
  nll                  mean -log p(true rating) of a system with a distribution (nll_metric)
  extra                predictions for pairs outside the truth; value = n = their count
  out_of_range         covered predictions outside [1, 5]; value = their count, n = covered pairs
Segments: "all"; "history:<5", "history:5-9", ..., "history:>=50" (the user's
interactions of any split strictly before the target's ts, edges from
evaluate.history_buckets); "item:seen" / "item:unseen" (target item in the train split or not).

Predictions are scored as they are, never clipped to the scale: a system that
predicts 6.2 pays for it, and out_of_range says how often that happened.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from siren_batch import schemas
from siren_batch.config import EvaluateConfig
from siren_batch.validate import MODEL_SCALE

logger = logging.getLogger(__name__)

RATING_MIN, RATING_MAX = MODEL_SCALE  # every table's ratings: the model's answers (data.scale mapped at ingest)

# Numbers quoted from publications, shown beside measured rows and never mixed up with them.
PAPER_ROWS: dict[str, dict[str, dict[str, Any]]] = {
    "siren-movies": {
        "SIREN Qwen3-4B": {
            "mae": 0.7603, "rmse": 1.2924, "split": "test",
            "source": "SIREN paper, Movies & TV results, Qwen3-4B (see /work/shared/REFERENCE.md)",
        },
    },
}

KEY = ["user_id", "item_id"]


def join_truth(predictions: DataFrame, interactions: DataFrame, split: str) -> DataFrame:
    """Every truth pair of `split` with its prediction, plus the predictions outside it.

    Returns user_id, item_id, split, ts, label, rating, error, status, duplicate where
    status is covered (a usable rating), uncovered (no prediction, a null/NaN rating or
    an error) or extra (a prediction whose pair is not in the truth; label is null).
    `duplicate` flags pairs present more than once on either side (compute_metrics
    refuses them). A missing `error` column counts as no error.
    """
    return _join(_truth(interactions, split), _predictions(predictions), split, KEY)


def _truth(interactions: DataFrame, split: str) -> DataFrame:
    if split not in schemas.SPLITS:
        raise ValueError(f"split={split!r} is not one of {', '.join(schemas.SPLITS)}")
    return (interactions.filter(F.col("split") == split)
            .select(*KEY, "ts", F.col("rating").cast("double").alias("label"))
            .withColumn("_n_truth", F.count(F.lit(1)).over(Window.partitionBy(*KEY))))


def _predictions(predictions: DataFrame) -> DataFrame:
    error = F.col("error") if "error" in predictions.columns else F.lit(None).cast("string")
    return predictions.select(*KEY, F.col("rating").cast("double").alias("rating"),
                              error.cast("string").alias("error"))


def _join(truth: DataFrame, preds: DataFrame, split: str, keys: list[str], *keep: str) -> DataFrame:
    """The full join of _truth and _predictions rows on `keys`, with status and duplicate."""
    preds = preds.withColumn("_n_pred", F.count(F.lit(1)).over(Window.partitionBy(*keys)))
    joined = truth.join(preds, on=keys, how="full")
    in_truth = F.col("_n_truth").isNotNull()
    usable = F.col("rating").isNotNull() & ~F.isnan("rating") & F.col("error").isNull()
    status = F.when(~in_truth, "extra").when(usable, "covered").otherwise("uncovered")
    duplicate = (F.coalesce("_n_truth", F.lit(1)) > 1) | (F.coalesce("_n_pred", F.lit(1)) > 1)
    return joined.select(*keys, F.lit(split).alias("split"), "ts", "label", "rating", "error",
                         status.alias("status"), duplicate.alias("duplicate"), *keep)


# Readouts of one ratings partition, each judged as its own system: (column, name suffix).
READOUTS = [("rating", ""), ("rating_median", "/median"), ("rating_argmax", "/argmax")]
CALIBRATED_READOUTS = [("calibrated_rating", "+calibrated"), ("calibrated_median", "+calibrated/median")]
LOG_FLOOR = 1e-6  # a probability below this counts as this in the NLL (log 0 = -inf)


def llm_systems(ratings: DataFrame, name: str) -> dict[str, DataFrame]:
    """{system: (user_id, item_id, rating, error)} for every readout of the partition:
    the expected value (RMSE-optimal), the median (MAE-optimal) and the argmax, and
    the calibrated point and median when the partition holds calibrated columns."""
    readouts = list(READOUTS)
    calibrated = F.col("calibrated_rating").isNotNull()
    if "calibrated_rating" in ratings.columns and ratings.where(calibrated).limit(1).count():
        readouts += CALIBRATED_READOUTS
    return {f"{name}{suffix}": ratings.select(*KEY, F.col(column).alias("rating"), "error")
            for column, suffix in readouts}


def nll_metric(ratings: DataFrame, interactions: DataFrame, split: str, probs: str,
               system: str, eval_id: str) -> DataFrame:
    """One METRICS row: mean -log p(true rating) over the split's pairs that have a
    distribution in column `probs` (probabilities below LOG_FLOOR count as LOG_FLOOR);
    n = those pairs. A label between two points of the 1..5 grid (half stars) is read as
    its two-hot distribution, as training and calibration read it: with w = label - low,
    -(1 - w) log p(low) - w log p(low + 1)."""
    truth = interactions.filter(F.col("split") == split).select(*KEY, F.col("rating").alias("label"))
    label = F.least(F.greatest(F.col("label"), F.lit(RATING_MIN)), F.lit(RATING_MAX))
    low = F.least(F.floor(label).cast("int"), F.lit(int(RATING_MAX) - 1))
    upper = label - low

    def log_p(point: Column) -> Column:
        return F.log(F.greatest(F.element_at(probs, point - int(RATING_MIN) + 1), F.lit(LOG_FLOOR)))

    loss = -((1 - upper) * log_p(low) + upper * log_p(low + 1))
    row = (ratings.where(F.col(probs).isNotNull() & F.col("error").isNull())
           .join(truth, on=KEY, how="inner")
           .agg(F.avg(loss).alias("value"), F.count(F.lit(1)).alias("n")).first())
    return ratings.sparkSession.createDataFrame(
        [(eval_id, split, system, "all", "nll", row["value"], int(row["n"]))], schemas.METRICS)


def history_segment(n_before: Column, edges: list[int]) -> Column:
    """Bucket label of a history length: edges [5, 10] -> history:<5 | history:5-9 | history:>=10."""
    label = F.lit(f"history:>={edges[-1] if edges else 0}")
    bounds = [0, *edges]
    for lo, hi in reversed(list(zip(bounds, bounds[1:]))):
        text = f"history:<{hi}" if lo == 0 else f"history:{lo}-{hi - 1}"
        label = F.when(n_before < hi, text).otherwise(label)
    return label


def with_segments(truth: DataFrame, interactions: DataFrame, edges: list[int]) -> DataFrame:
    """Add n_before (the user's interactions strictly before the target ts) and the
    segment labels ["all", history bucket, item:seen|unseen] of each truth pair."""
    before = (Window.partitionBy("user_id").orderBy("ts")
              .rangeBetween(Window.unboundedPreceding, -1))  # ts strictly smaller
    history = interactions.select("user_id", "ts", F.lit(1).alias("_is_history"))
    counted = (truth.withColumn("_is_history", F.lit(0))
               .unionByName(history, allowMissingColumns=True)
               .withColumn("n_before", F.coalesce(F.sum("_is_history").over(before), F.lit(0)))
               .filter(F.col("_is_history") == 0)
               .drop("_is_history"))
    train_items = (interactions.filter(F.col("split") == "train")
                   .groupBy("item_id").agg(F.count(F.lit(1)).alias("_n_train")))
    seen = F.when(F.col("_n_train").isNotNull(), "item:seen").otherwise("item:unseen")
    return (counted.join(train_items, on="item_id", how="left")
            .withColumn("segments", F.array(F.lit("all"), history_segment(F.col("n_before"), edges), seen))
            .drop("_n_train"))


def _aggregate(pairs: DataFrame) -> list[Any]:
    """Sums per system and segment, through per-user sums so the user means come in the same job."""
    covered = F.col("status") == "covered"
    err = F.when(covered, F.col("rating") - F.col("label"))
    outside = covered & ((F.col("rating") < RATING_MIN) | (F.col("rating") > RATING_MAX))

    def count(cond: Column) -> Column:
        return F.sum(cond.cast("long"))

    per_user = (pairs.withColumn("segment", F.explode("segments"))
                .groupBy("system", "segment", "user_id")
                .agg(count(F.col("status") != "extra").alias("n_truth"), count(covered).alias("n_cov"),
                     F.sum(F.abs(err)).alias("sum_abs"), F.sum(err * err).alias("sum_sq"),
                     count(F.col("status") == "extra").alias("n_extra"),
                     count(F.col("duplicate")).alias("n_dup"), count(outside).alias("n_out"),
                     F.min("split").alias("split_min"), F.max("split").alias("split_max")))
    has_cov = F.col("n_cov") > 0
    return (per_user.groupBy("system", "segment")
            .agg(*[F.sum(c).alias(c) for c in
                   ("n_truth", "n_cov", "sum_abs", "sum_sq", "n_extra", "n_dup", "n_out")],
                 F.avg(F.when(has_cov, F.col("sum_abs") / F.col("n_cov"))).alias("user_mae"),
                 F.avg(F.when(has_cov, F.sqrt(F.col("sum_sq") / F.col("n_cov")))).alias("user_rmse"),
                 count(has_cov).alias("n_users"),
                 F.min("split_min").alias("split_min"), F.max("split_max").alias("split_max"))
            .collect())


def _check(total: Any, cfg: EvaluateConfig, system: str) -> None:
    if total is None or not total["n_truth"]:
        raise ValueError(f"{system}: the {cfg.split} split holds no truth pairs: nothing to evaluate")
    if (total["split_min"], total["split_max"]) != (cfg.split, cfg.split):
        raise ValueError(f"{system}: joined frame is for split {total['split_min']}, "
                         f"evaluate.split={cfg.split}: call join_truth with the same split")
    if total["n_dup"]:
        raise ValueError(f"{system}: {total['n_dup']} rows share a (user_id, item_id) pair with another row; "
                         f"keep one prediction per pair (one run_date) and one truth row per pair")
    missing = total["n_truth"] - total["n_cov"]
    if missing and cfg.missing == "error":
        raise ValueError(f"{system}: {missing} of {total['n_truth']} {cfg.split} pairs have no usable "
                         f"prediction (missing, null or error); set evaluate.missing=count to report "
                         f"them as uncovered")
    if missing:
        logger.warning("%s: %d of %d pairs uncovered", system, missing, total["n_truth"])
    if total["n_extra"]:
        logger.warning("%s: %d predictions for pairs outside the %s truth (reported as extra)",
                       system, total["n_extra"], cfg.split)


def compute_metrics(joined: DataFrame, interactions: DataFrame, cfg: EvaluateConfig,
                    system: str, eval_id: str) -> DataFrame:
    """METRICS rows of one system from a join_truth frame (see the module docstring).

    Raises ValueError when pairs are uncovered and cfg.missing == "error", when a pair
    appears twice, or when the frame was joined for another split than cfg.split.
    """
    truth = with_segments(joined.filter(F.col("status") != "extra"), interactions, cfg.history_buckets)
    extra = joined.filter(F.col("status") == "extra").withColumn("segments", F.array(F.lit("all")))
    pairs = truth.unionByName(extra, allowMissingColumns=True).withColumn("system", F.lit(system))
    return _metrics(pairs, cfg, [system], eval_id)


def evaluate_systems(systems: dict[str, DataFrame], truth: DataFrame, cfg: EvaluateConfig, eval_id: str,
                     history: DataFrame | None = None) -> DataFrame:
    """METRICS rows of every system ({name: predictions with user_id, item_id, rating and
    optionally error}) against the cfg.split rows of `truth` (an interactions frame), the
    segments counted in `history` (default: `truth`): for each system, in `systems` order,
    the rows of compute_metrics(join_truth(predictions, truth, cfg.split), history, ...),
    from one join and one aggregation with the segments computed once (a job chain per
    system cost ~2 s each, even on a night's few pairs). Raises as compute_metrics does."""
    if not systems:
        raise ValueError("no systems to evaluate")
    history = truth if history is None else history
    names = truth.sparkSession.createDataFrame([(name,) for name in systems], "system string")
    truth = (with_segments(_truth(truth, cfg.split), history, cfg.history_buckets)
             .crossJoin(F.broadcast(names)))
    stacked = [_predictions(preds).withColumn("system", F.lit(name)) for name, preds in systems.items()]
    preds = stacked[0]
    for more in stacked[1:]:
        preds = preds.unionByName(more)
    pairs = (_join(truth, preds, cfg.split, ["system", *KEY], "segments")
             .withColumn("segments", F.coalesce("segments", F.array(F.lit("all")))))  # extras: "all" only
    return _metrics(pairs, cfg, list(systems), eval_id)


def _metrics(pairs: DataFrame, cfg: EvaluateConfig, systems: list[str], eval_id: str) -> DataFrame:
    """METRICS rows from joined pairs with their `system` and `segments`, checked per system."""
    by_system: dict[str, dict[str, Any]] = {system: {} for system in systems}
    for r in _aggregate(pairs):
        by_system[r["system"]][r["segment"]] = r
    out = []
    for system, by_segment in by_system.items():
        _check(by_segment.get("all"), cfg, system)
        for segment in sorted(by_segment, key=segment_order):
            r = by_segment[segment]
            n_cov = r["n_cov"]
            mae = r["sum_abs"] / n_cov if n_cov else None
            rmse = math.sqrt(r["sum_sq"] / n_cov) if n_cov else None
            values = [("mae", mae, n_cov), ("rmse", rmse, n_cov),
                      ("user_mae", r["user_mae"], r["n_users"]), ("user_rmse", r["user_rmse"], r["n_users"]),
                      ("coverage", n_cov / r["n_truth"] if r["n_truth"] else None, r["n_truth"])]
            if segment == "all":
                values += [("extra", float(r["n_extra"]), r["n_extra"]),
                           ("out_of_range", float(r["n_out"]), n_cov)]
            out += [(eval_id, cfg.split, system, segment, metric, value, int(n)) for metric, value, n in values]
        total = by_segment["all"]
        logger.info("%s on %s: mae=%s rmse=%s coverage=%d/%d", system, cfg.split,
                    _fmt(total["sum_abs"] / total["n_cov"] if total["n_cov"] else None),
                    _fmt(math.sqrt(total["sum_sq"] / total["n_cov"]) if total["n_cov"] else None),
                    total["n_cov"], total["n_truth"])
    return pairs.sparkSession.createDataFrame(out, schemas.METRICS)


def segment_order(segment: str) -> tuple:
    """Sort key: all first, then history buckets by their lower edge, then item segments."""
    family, _, label = segment.partition(":")
    rank = {"all": 0, "history": 1, "item": 2}.get(family, 3)
    if label.startswith("<"):
        return rank, 0, label
    if label.startswith(">="):
        return rank, 1e18, label
    lower = label.split("-")[0]
    return rank, int(lower) if lower.isdigit() else 0, label


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4f}"



# ---- Markdown report ----------------------------------------------------------------

MAIN_METRICS = [("mae", "MAE"), ("rmse", "RMSE"), ("user_mae", "user MAE"),
                ("user_rmse", "user RMSE"), ("nll", "NLL"), ("coverage", "coverage")]
SEGMENT_FAMILIES = [("history", "By history length (the user's interactions before the target)"),
                    ("item", "By target item (seen in the train split or not)")]


def markdown_report(metrics: Any, title: str, paper_rows: dict[str, dict[str, Any]] | None = None,
                    source_scale: tuple[float, float] = (RATING_MIN, RATING_MAX)) -> str:
    """Markdown text of a METRICS frame (Spark or pandas): per split, one system table
    (MAE, RMSE, user MAE, user RMSE, coverage, n) sorted by RMSE with the quoted paper
    rows marked †, notes on extra / out-of-range predictions, then the segment tables.
    `paper_rows`: {name: {"mae", "rmse", "source", optional "split"}}, e.g. PAPER_ROWS[dataset].
    `source_scale`: the data's own scale (data.scale_min/max); when it is not 1-5 a line says
    how the 1-5 figures read on it.
    """
    frame = metrics.toPandas() if isinstance(metrics, DataFrame) else metrics.copy()
    if frame.empty:
        raise ValueError("no metrics to report")
    lines = [f"# {title}", ""]
    (low, high), factor = source_scale, (source_scale[1] - source_scale[0]) / (RATING_MAX - RATING_MIN)
    if (low, high) != (RATING_MIN, RATING_MAX):
        lines += [f"Ratings and metrics are on the model's {RATING_MIN:g}-{RATING_MAX:g} scale; this data's own "
                  f"scale is {low:g}-{high:g} (data.scale_min/scale_max). On it, MAE and RMSE are x{factor:.4g} "
                  f"and a prediction r reads as {low:g} + (r - {RATING_MIN:g}) x {factor:.4g}.", ""]
    for split in sorted(frame["split"].unique()):
        part = frame[frame["split"] == split]
        twice = part[part.duplicated(["system", "segment", "metric"])]
        if not twice.empty:
            raise ValueError(f"metrics hold several values for system {twice['system'].iloc[0]!r} on "
                             f"{split}: report one eval_id per system")
        table, systems = _system_table(part, split, paper_rows or {})
        lines += [f"## Split: {split}", "", *table, *_segment_tables(part, systems)]
    return "\n".join(lines)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _system_table(part: Any, split: str, paper_rows: dict[str, dict[str, Any]]) -> tuple[list[str], list[str]]:
    overall = part[part["segment"] == "all"]
    value = overall.pivot(index="system", columns="metric", values="value")
    n_pairs = overall[overall["metric"] == "coverage"].set_index("system")["n"]
    rows = [(value.loc[s].get("rmse"), s, [s, *(_fmt(value.loc[s].get(m)) for m, _ in MAIN_METRICS),
                                            str(int(n_pairs.get(s, 0)))]) for s in value.index]
    quoted = {name: q for name, q in paper_rows.items() if q.get("split", split) == split}
    rows += [(q.get("rmse"), None, [f"{name} †", *(_fmt(q.get(m)) for m, _ in MAIN_METRICS), "–"])
             for name, q in quoted.items()]
    rows.sort(key=lambda r: (r[0] is None or math.isnan(r[0]), r[0] if r[0] is not None else 0.0))
    lines = [_row(["system", *(label for _, label in MAIN_METRICS), "n"]),
             _row(["---"] * (len(MAIN_METRICS) + 2)), *(_row(cells) for _, _, cells in rows), ""]
    for name, q in quoted.items():
        source = q.get("source", "no source given")
        lines.append(f"† {name}: quoted from the paper, not measured here ({source}).")
    for metric, what in (("extra", "predictions for pairs outside the truth (not scored)"),
                         ("out_of_range", f"covered predictions outside [{RATING_MIN:g}, {RATING_MAX:g}] "
                                          "(scored as they are)")):
        counts = value[metric].dropna() if metric in value else {}
        lines += [f"Note: {s}: {int(c)} {what}." for s, c in counts.items() if c > 0]
    systems = [s for _, s, _ in rows if s is not None]
    return lines + [""], systems


def _segment_tables(part: Any, systems: list[str]) -> list[str]:
    lines: list[str] = []
    for family, heading in SEGMENT_FAMILIES:
        fam = part[part["segment"].str.startswith(family + ":")]
        if fam.empty:
            continue
        segments = sorted(fam["segment"].unique(), key=segment_order)
        n_pairs = fam[fam["metric"] == "coverage"].groupby("segment")["n"].max()
        value = fam.pivot(index=["system", "segment"], columns="metric", values="value")
        lines += [f"### {heading}: MAE / RMSE", "",
                  _row(["system", *(f"{s.split(':', 1)[1]} (n={int(n_pairs.get(s, 0))})" for s in segments)]),
                  _row(["---"] * (len(segments) + 1))]
        for system in systems:
            cells = []
            for segment in segments:
                if (system, segment) not in value.index:
                    cells.append("–")
                    continue
                v = value.loc[(system, segment)]
                cov = v.get("coverage")
                note = f" (coverage {cov:.2f})" if cov is not None and cov < 1 else ""
                cells.append(f"{_fmt(v.get('mae'))} / {_fmt(v.get('rmse'))}{note}")
            lines.append(_row([system, *cells]))
        lines.append("")
    return lines
