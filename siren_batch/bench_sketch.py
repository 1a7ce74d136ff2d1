"""The sketch-chain benchmark behind `make bench-sketch` (see jobs/bench_sketch.py)."""

from __future__ import annotations

import logging

from pyspark.sql import functions as F

from siren_batch import pipeline, schemas
from siren_batch.config import load_config
from siren_batch.profiling import PeakMemory, Stopwatch, write_results
from siren_batch.spark import get_spark
from siren_batch.warehouse import read_table

logger = logging.getLogger(__name__)

DEFAULTS = ["dataset=ml-1m", "prompts.variants=sketch,raw", "prompts.splits=test"]


def token_comparison(spark, cfg) -> dict:
    """Sketch vs raw-history prompt tokens on the same (user, item) pairs."""
    prompts = read_table(spark, cfg, "prompts", schemas.PROMPTS).where(F.col("mode") == "answer_only")
    sketch = prompts.where(F.col("variant") == "sketch").select("user_id", "item_id",
                                                                F.col("prompt_tokens").alias("sketch"))
    raw = prompts.where(F.col("variant") == "raw").select("user_id", "item_id",
                                                          F.col("prompt_tokens").alias("raw"))
    row = (sketch.join(raw, on=["user_id", "item_id"], how="inner")
           .agg(F.count("*").alias("pairs"), F.avg("sketch").alias("sketch"), F.avg("raw").alias("raw"),
                F.expr("percentile_approx(sketch / raw, 0.5)").alias("median_ratio")).first())
    return {"pairs": row.pairs, "mean_sketch_tokens": round(row.sketch, 1),
            "mean_raw_tokens": round(row.raw, 1),
            "reduction_pct": round(100 * (1 - row.sketch / row.raw), 1),
            "median_pair_ratio": round(row.median_ratio, 3)}


def _heap_mib(spark) -> float:
    runtime = spark.sparkContext._jvm.java.lang.Runtime.getRuntime()
    return round((runtime.totalMemory() - runtime.freeMemory()) / 2**20, 1)


def time_stages(spark, cfg) -> dict:
    """Run the sketch chain; per stage: seconds, rows in and out, rows/s, the peak RSS
    of the process tree (driver, JVM, Python workers) and the JVM heap in use after
    it (a GC runs before each stage, so stages do not inherit each other's garbage)."""
    stages = {}
    with PeakMemory() as mem:
        for name in pipeline.SKETCH_CHAIN:
            mem.reset()
            spark.sparkContext._jvm.java.lang.System.gc()
            watch = Stopwatch()
            summary = pipeline.STAGES[name](spark, cfg)
            seconds = watch.seconds()
            run = (read_table(spark, cfg, "runs", schemas.RUNS).where(F.col("stage") == name)
                   .orderBy(F.col("started_at").desc()).first())
            stages[name] = {"seconds": seconds, "input_rows": run.input_rows, "output_rows": run.output_rows,
                            "rows_per_s": round(run.input_rows / seconds, 1) if seconds else None,
                            "peak_rss_mib": mem.peak_mib, "driver_heap_after_mib": _heap_mib(spark)}
            if name == "embed":
                stages[name]["items_per_s"] = round(summary["items"] / seconds, 1)
            logger.info("bench %s: %s", name, stages[name])
    return stages


def main(argv: list[str]) -> int:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(overrides=[*DEFAULTS, *argv])
    spark = get_spark(cfg.spark)
    stages = time_stages(spark, cfg)
    excl_embed = round(sum(s["seconds"] for n, s in stages.items() if n != "embed"), 1)
    tokens = token_comparison(spark, cfg)
    payload = {"dataset": cfg.dataset, "config_hash": cfg.hash(), "stages": stages,
               "total_s_excluding_embed": excl_embed, "target_s_excluding_embed": 180,
               "embed_items_per_s": stages["embed"].get("items_per_s"), "tokens": tokens}
    table = ["| stage | seconds | input rows | rows/s | peak RSS (MiB) |", "|---|---:|---:|---:|---:|"]
    table += [f"| {n} | {s['seconds']} | {s['input_rows']} | {s['rows_per_s']} | {s['peak_rss_mib']} |"
              for n, s in stages.items()]
    md = "\n".join(table) + (
        f"\n\nTotal excluding embed: **{excl_embed} s** (target < 180 s). "
        f"Embedding: {payload['embed_items_per_s']} items/s.\n\n"
        f"Prompt tokens on the same {tokens['pairs']} pairs: sketch {tokens['mean_sketch_tokens']} vs raw "
        f"history {tokens['mean_raw_tokens']} = **{tokens['reduction_pct']}% fewer** (paper: 48.7%).")
    path = write_results("bench-sketch", payload, md)
    logger.info("results written to %s", path)
    return 0
