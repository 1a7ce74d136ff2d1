"""`make bench-nightly`: an incremental night against a full rebuild on the same data.

    python -m siren_batch.bench_nightly [--source ml-1m] [--new-fraction 0.01] [key=value ...]

The source's interactions are cut by time: night 1 holds all but the newest
`--new-fraction` (1%) of them, night 2 the rest, with the items first rated in
night 2 arriving that night. Three runs, scoring off (nightly.candidates=none,
as the target excludes scoring): night 1 (bootstrap), night 2 (incremental) and
a full rebuild, i.e. a bootstrap night over the same data as night 2 in a fresh
warehouse; then, for what a night costs without nightly, `sketch-chain` (ingest ..
prompts) over the same data. Target: night 2 under 10% of a full rebuild.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import pandas as pd

from siren_batch import nightly, pipeline
from siren_batch.assets import REPO_ROOT
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
    start = time.perf_counter()
    out = nightly.run_night(spark, cfg, run_date)
    steps = {s: out[s].get("seconds") for s in nightly.STEPS if isinstance(out.get(s), dict)}
    return {"seconds": round(time.perf_counter() - start, 1), "steps": steps,
            "users_sketched": out["sketches"]["users_sketched"], "embedded": out["embed"]["embedded"]}


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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="ml-1m", help="dataset read by its configured source")
    parser.add_argument("--new-fraction", type=float, default=0.01, help="share of interactions new in night 2")
    parser.add_argument("--work", default="bench/tmp/nightly", help="folder for the inputs and warehouses")
    args, overrides = parser.parse_known_args(argv)
    work = Path(args.work) if Path(args.work).is_absolute() else REPO_ROOT / args.work
    shutil.rmtree(work, ignore_errors=True)
    source = load_config(overrides=[f"dataset={args.source}", f"warehouse={work}/source", *overrides])
    spark = get_spark(source.spark)
    pipeline.STAGES["ingest"](spark, source)
    sizes = cut(pd.read_parquet(source.table_path("interactions")), pd.read_parquet(source.table_path("items")),
                args.new_fraction, work / "arrivals")
    common = [f"dataset={args.source}-nightly", f"nightly.arrivals={work}/arrivals/{{run_date}}",
              "nightly.candidates=none", "nightly.report=false", "data.kcore=0", *overrides]
    night1 = _night(spark, common, work / "wh", NIGHT1)
    night2 = _night(spark, common, work / "wh", NIGHT2)
    full_common = [o.replace("{run_date}", "full") if o.startswith("nightly.arrivals=") else o for o in common]
    full = _night(spark, full_common, work / "wh-full", NIGHT2)
    chain = _sketch_chain(spark, work, args.source, overrides)
    ratio = night2["seconds"] / full["seconds"]
    payload = {"source": args.source, **sizes, "night1_bootstrap": night1, "night2_incremental": night2,
               "full_rebuild": full, "sketch_chain": chain, "night2_over_full": round(ratio, 3),
               "night2_over_sketch_chain": round(night2["seconds"] / chain["seconds"], 3), "target": 0.10}
    path = write_results("bench-nightly", payload, _markdown(payload))
    logger.info("bench-nightly: night 2 %.1f s vs full rebuild %.1f s (%.1f%%) -> %s", night2["seconds"],
                full["seconds"], 100 * ratio, path)
    return 0


def _markdown(p: dict) -> str:
    lines = [f"{p['source']}: {p['interactions']:,} interactions; night 2 adds {p['night2_interactions']:,} "
             f"({100 * p['night2_interactions'] / p['interactions']:.1f}%) and {p['night2_new_items']} new items. "
             "Scoring off (the target excludes it).", "",
             "| run | wall s | " + " | ".join(nightly.STEPS[:4]) + " | users sketched | items embedded |",
             "|---|---:|" + "---:|" * 6]
    for name in ("night1_bootstrap", "night2_incremental", "full_rebuild"):
        r = p[name]
        lines.append(f"| {name} | {r['seconds']} | " + " | ".join(str(r['steps'].get(s)) for s in nightly.STEPS[:4])
                     + f" | {r['users_sketched']:,} | {r['embedded']:,} |")
    c = p["sketch_chain"]
    lines += ["", f"Without nightly, a night reruns `siren-batch sketch-chain` (ingest .. prompts, example sketches "
              f"included): {c['seconds']} s (" + ", ".join(f"{k} {v}" for k, v in c["steps"].items()) + ").", "",
              f"Night 2 / full rebuild of the nightly tables (a bootstrap night on the same data): "
              f"**{100 * p['night2_over_full']:.1f}%**; night 2 / sketch chain: "
              f"**{100 * p['night2_over_sketch_chain']:.1f}%** (target under {100 * p['target']:.0f}%)."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
