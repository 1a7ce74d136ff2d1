"""`make bench-scale`: the chain from ingest to prompts at 1M, 3M and 10M ratings.

    python -m siren_batch.bench_scale [--scales 1,3,10] [--source ml-1m] [key=value ...]

The input is MovieLens-1M replicated with fresh user ids (copy r of user u is
`u~r`), so the item text and the rating patterns are real and only the number
of users grows; it is written once per scale as a Parquet table source. Per
stage: wall time, input rows, rows/s and the peak RSS of the whole process tree
(driver, JVM, Python workers), and the driver JVM's peak heap. Targets: time
linear in ratings, 10M under 20 minutes excluding embedding on 2 cores, and a
driver whose memory does not grow with users (nothing collected to it).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pyspark.sql import functions as F

from siren_batch import pipeline, schemas
from siren_batch.assets import REPO_ROOT
from siren_batch.bench_sketch import time_stages
from siren_batch.config import load_config
from siren_batch.profiling import write_results
from siren_batch.spark import get_spark
from siren_batch.warehouse import read_table

logger = logging.getLogger(__name__)


def replicate(spark, cfg, copies: int, folder: str) -> int:
    """Write `copies` of the ingested interactions (fresh user ids) and the items as a
    Parquet table source under `folder`; returns the number of ratings written."""
    inter = read_table(spark, cfg, "interactions", schemas.INTERACTIONS).select("user_id", "item_id", "rating", "ts")
    copies_df = spark.range(copies).select(F.col("id").cast("string").alias("copy"))
    replicated = (inter.crossJoin(copies_df)
                  .select(F.concat_ws("~", "user_id", "copy").alias("user_id"), "item_id", "rating", "ts"))
    replicated.write.mode("overwrite").parquet(f"{folder}/interactions")
    (read_table(spark, cfg, "items", schemas.ITEMS).select("item_id", "title", "genres", "text")
     .write.mode("overwrite").parquet(f"{folder}/items"))
    return spark.read.parquet(f"{folder}/interactions").count()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="1,3,10", help="copies of the source dataset, comma-separated")
    parser.add_argument("--source", default="ml-1m", help="the dataset replicated")
    parser.add_argument("--work", default="bench/tmp/scale", help="folder for the inputs and warehouses")
    args, overrides = parser.parse_known_args(argv)
    args.work = args.work if Path(args.work).is_absolute() else str(REPO_ROOT / args.work)
    base = load_config(overrides=[f"dataset={args.source}", f"warehouse={args.work}/source", *overrides])
    spark = get_spark(base.spark)
    pipeline.STAGES["ingest"](spark, base)
    results = {}
    for copies in [int(s) for s in args.scales.split(",")]:
        folder = f"{args.work}/input-x{copies}"
        ratings = replicate(spark, base, copies, folder)
        cfg = load_config(overrides=[f"dataset=scale-x{copies}", f"warehouse={args.work}/wh-x{copies}",
                                     "data.source=table", f"data.path={folder}/interactions",
                                     f"data.items_path={folder}/items", "data.ts_unit=ms",
                                     "prompts.splits=test", *overrides])
        stages = time_stages(spark, cfg)
        total = round(sum(s["seconds"] for n, s in stages.items() if n != "embed"), 1)
        results[f"x{copies}"] = {"ratings": ratings, "stages": stages, "total_s_excluding_embed": total,
                                 "seconds_per_million_ratings": round(total / ratings * 1e6, 1)}
        logger.info("bench-scale x%d: %d ratings, %.1f s excluding embed", copies, ratings, total)
        payload = {"source": args.source, "scales": results, "target_10m_s_excluding_embed": 1200}
        write_results("bench-scale", payload, _markdown(results))  # after every scale: a long run keeps its figures
    return 0


def _markdown(results: dict) -> str:
    lines = ["| scale | ratings | stage | seconds | rows/s | peak RSS (MiB) | driver heap after (MiB) |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for scale, r in results.items():
        for name, s in r["stages"].items():
            lines.append(f"| {scale} | {r['ratings']:,} | {name} | {s['seconds']} | {s['rows_per_s']} | "
                         f"{s['peak_rss_mib']} | {s['driver_heap_after_mib']} |")
    totals = "; ".join(f"{scale}: {r['total_s_excluding_embed']} s excluding embed "
                       f"({r['seconds_per_million_ratings']} s per million ratings)" for scale, r in results.items())
    return "\n".join(lines) + f"\n\n{totals}. Target: 10M under 1,200 s excluding embed, linear in ratings."


if __name__ == "__main__":
    raise SystemExit(main())
