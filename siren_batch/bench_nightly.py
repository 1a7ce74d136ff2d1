"""`make bench-nightly`: an incremental night against a full rebuild on the same data.

    python -m siren_batch.bench_nightly [--source ml-1m] [--copies 1,3] [--new-fraction 0.01] [--name N] [key=value ...]

The source's interactions are cut by time: night 1 holds all but the newest
`--new-fraction` (1%) of them, night 2 the rest, with the items first rated in
night 2 arriving that night. Three runs, scoring off (nightly.candidates=none,
as the target excludes scoring): night 1 (bootstrap), night 2 (incremental) and
a full rebuild, i.e. a bootstrap night over the same data as night 2 in a fresh
warehouse; then, for what a night costs without nightly, `sketch-chain` (ingest ..
prompts) over the same data. Target: night 2 under 10% of a full rebuild.

`--copies 1,3` repeats this at each size: the source replicated with fresh user
ids (bench_scale.replicate), so item text and rating patterns stay real. A full
rebuild grows with the data, night 2 with what arrived, and a night's fixed cost
(Spark jobs, file commits) with neither: the ratio falls as the data grows. The
load average around night 2 is recorded, as the machine may be shared.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path

import pandas as pd

from siren_batch import nightly, pipeline
from siren_batch.assets import REPO_ROOT
from siren_batch.bench_scale import replicate
from siren_batch.bench_sketch import time_stages
from siren_batch.config import load_config
from siren_batch.profiling import write_results
from siren_batch.spark import get_spark

logger = logging.getLogger(__name__)
NIGHT1, NIGHT2 = "2030-01-01", "2030-01-02"   # names only: scoring is off, so no date logic applies


def cut(interactions: pd.DataFrame, items: pd.DataFrame, fraction: float, out: Path) -> dict:
    """Arrival folders: night 1 = all but the newest `fraction` of interactions,
    night 2 = those and the items first rated among them; `full` = both in one."""
    inter = interactions[["user_id", "item_id", "rating", "ts"]].sort_values(["ts", "user_id", "item_id"])
    split = int(len(inter) * (1 - fraction))
    old, new = inter.iloc[:split], inter.iloc[split:]
    new_items = set(new.item_id) - set(old.item_id)
    cols = ["item_id", "title", "genres", "text"]
    folders = {NIGHT1: (old, items[~items.item_id.isin(new_items)]),
               NIGHT2: (new, items[items.item_id.isin(new_items)]),
               "full": (inter, items)}
    for name, (rows, its) in folders.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        rows.reset_index(drop=True).to_parquet(folder / "interactions.parquet")
        if len(its):
            its[cols].reset_index(drop=True).to_parquet(folder / "items.parquet")
    return {"interactions": len(inter), "night2_interactions": len(new), "night2_new_items": len(new_items)}


def _night(spark, overrides: list[str], warehouse: Path, run_date: str) -> dict:
    cfg = load_config(overrides=[f"warehouse={warehouse}", *overrides])
    sc, group = spark.sparkContext, f"bench-nightly:{warehouse}:{run_date}"
    sc.setJobGroup(group, group)   # to count the night's Spark jobs: a cost that the load does not change
    start = time.perf_counter()
    out = nightly.run_night(spark, cfg, run_date)
    seconds = round(time.perf_counter() - start, 1)
    jobs = len(sc.statusTracker().getJobIdsForGroup(group))
    sc.setLocalProperty("spark.jobGroup.id", None)
    steps = {s: out[s].get("seconds") for s in nightly.STEPS if isinstance(out.get(s), dict)}
    return {"seconds": seconds, "spark_jobs": jobs, "steps": steps,
            "users_sketched": out["sketches"]["users_sketched"], "embedded": out["embed"]["embedded"],
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}   # just after: the machine may be shared


def _sketch_chain(spark, work: Path, source: str, overrides: list[str]) -> dict:
    """What a night costs without nightly: `siren-batch sketch-chain` (ingest .. prompts,
    example sketches included) over the same data as night 2."""
    cfg = load_config(overrides=[f"dataset={source}-chain", f"warehouse={work}/wh-chain", "data.source=table",
                                 f"data.path={work}/arrivals/full/interactions.parquet",
                                 f"data.items_path={work}/arrivals/full/items.parquet", "data.kcore=0",
                                 *overrides])
    stages = time_stages(spark, cfg)
    return {"seconds": round(sum(s["seconds"] for s in stages.values()), 1),
            "steps": {name: s["seconds"] for name, s in stages.items()}}


def _size(spark, source, copies: int, work: Path, fraction: float, overrides: list[str], chain: bool) -> dict:
    """One data size: the source's interactions x `copies` (fresh user ids), cut into two
    nights; night 1, night 2, a full rebuild and (with `chain`) the sketch chain."""
    inter, items = source.table_path("interactions"), source.table_path("items")
    if copies > 1:
        replicate(spark, source, copies, str(work / "input"))
        inter, items = str(work / "input" / "interactions"), str(work / "input" / "items")
    sizes = cut(pd.read_parquet(inter), pd.read_parquet(items), fraction, work / "arrivals")
    common = [f"dataset={source.dataset}-nightly", f"nightly.arrivals={work}/arrivals/{{run_date}}",
              "nightly.candidates=none", "nightly.report=false", "data.kcore=0", *overrides]
    night1 = _night(spark, common, work / "wh", NIGHT1)
    night2 = _night(spark, common, work / "wh", NIGHT2)
    full_common = [o.replace("{run_date}", "full") if o.startswith("nightly.arrivals=") else o for o in common]
    full = _night(spark, full_common, work / "wh-full", NIGHT2)
    out = {"copies": copies, **sizes, "night1_bootstrap": night1, "night2_incremental": night2,
           "full_rebuild": full, "night2_over_full": round(night2["seconds"] / full["seconds"], 3)}
    if chain:
        out["sketch_chain"] = _sketch_chain(spark, work, source.dataset, overrides)
        out["night2_over_sketch_chain"] = round(night2["seconds"] / out["sketch_chain"]["seconds"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="ml-1m", help="dataset read by its configured source")
    parser.add_argument("--copies", default="1,3", help="data sizes: copies of the source, comma-separated")
    parser.add_argument("--new-fraction", type=float, default=0.01, help="share of interactions new in night 2")
    parser.add_argument("--no-chain", action="store_true", help="skip timing sketch-chain at each size")
    parser.add_argument("--work", default="bench/tmp/nightly", help="folder for the inputs and warehouses")
    parser.add_argument("--name", default="bench-nightly",
                        help="results file name under notebooks/benchmarks (e.g. bench-nightly-10m for one big size)")
    args, overrides = parser.parse_known_args(argv)
    work = Path(args.work) if Path(args.work).is_absolute() else REPO_ROOT / args.work
    shutil.rmtree(work, ignore_errors=True)
    source = load_config(overrides=[f"dataset={args.source}", f"warehouse={work}/source", *overrides])
    spark = get_spark(source.spark)
    pipeline.STAGES["ingest"](spark, source)
    sizes = {}
    for copies in [int(c) for c in args.copies.split(",")]:
        r = sizes[f"x{copies}"] = _size(spark, source, copies, work / f"x{copies}", args.new_fraction, overrides,
                                        not args.no_chain)
        payload = {"source": args.source, "new_fraction": args.new_fraction, "target": 0.10, "sizes": sizes}
        path = write_results(args.name, payload, _markdown(payload))   # after every size
        logger.info("bench-nightly x%d: night 2 %.1f s vs full rebuild %.1f s (%.1f%%) -> %s", copies,
                    r["night2_incremental"]["seconds"], r["full_rebuild"]["seconds"], 100 * r["night2_over_full"],
                    path)
    return 0


def _markdown(p: dict) -> str:
    steps = nightly.STEPS[:4]
    lines = [f"{p['source']} replicated with fresh user ids (bench_scale.replicate); night 2 holds the newest "
             f"{100 * p['new_fraction']:.0f}% of interactions. Scoring off (the target excludes it).", "",
             "| size | interactions | run | wall s | Spark jobs | " + " | ".join(steps)
             + " | users sketched | items embedded | load avg (1/5/15 min) after |",
             "|---|---:|---|---:|---:|" + "---:|" * 7]
    for size, r in p["sizes"].items():
        for name in ("night1_bootstrap", "night2_incremental", "full_rebuild"):
            run = r[name]
            load = "/".join(str(x) for x in run.get("load_average_1_5_15", []))
            lines.append(f"| {size} | {r['interactions']:,} | {name} | {run['seconds']} | {run['spark_jobs']} | "
                         + " | ".join(str(run["steps"].get(s)) for s in steps)
                         + f" | {run['users_sketched']:,} | {run['embedded']:,} | {load} |")
    lines.append("")
    for size, r in p["sizes"].items():
        line = (f"- {size}: night 2 adds {r['night2_interactions']:,} interactions and {r['night2_new_items']} new "
                f"items; night 2 / full rebuild of the nightly tables (a bootstrap night on the same data): "
                f"**{100 * r['night2_over_full']:.1f}%**")
        if "sketch_chain" in r:
            c = r["sketch_chain"]
            line += (f"; night 2 / `siren-batch sketch-chain` (what a night costs without nightly, ingest .. prompts: "
                     f"{c['seconds']} s): **{100 * r['night2_over_sketch_chain']:.1f}%**")
        lines.append(line + ".")
    lines += ["", f"Target: night 2 under {100 * p['target']:.0f}% of a full rebuild."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
