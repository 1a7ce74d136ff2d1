"""Arrival folders for `siren-batch nightly`, cut from a dataset by day: for trying
nightly operation out (`make nightly-demo`) and for its tests.

    python -m siren_batch.arrivals cut --out build/arrivals --first 1998-04-06 --nights 2

A real deployment's drops land in such folders by themselves: one per night,
`interactions.<data.format>` and, when items arrive, `items.<data.format>`.
"""

from __future__ import annotations

import datetime as dt

from siren_batch.nightly import check_run_date, day_end_ms


def cut_arrivals(interactions, items, out: str, first_night: str, nights: int,
                 held_items: int = 0) -> list[str]:
    """Write pandas frames (INTERACTIONS-like, ITEMS-like) as arrival folders
    `<out>/<date>/` for nightly.arrivals=<out>/{run_date}: the first night holds every
    interaction up to the end of first_night, each later night one more day. The
    `held_items` items whose first rating comes latest arrive on the night of that
    rating (as new items). Returns the dates (tests/test_nightly.py, make nightly-demo)."""
    import pandas as pd
    from pathlib import Path

    start = dt.date.fromisoformat(first_night)
    dates = [(start + dt.timedelta(days=i)).isoformat() for i in range(nights)]
    ends = [day_end_ms(d) for d in dates]
    inter = interactions[interactions.ts < ends[-1]][["user_id", "item_id", "rating", "ts"]]
    first = inter.groupby("item_id").ts.min().sort_values(ascending=False)
    late = set(first[first >= ends[0]].index[:held_items]) if held_items else set()
    arrive = {item: next(i for i, end in enumerate(ends) if ts < end) for item, ts in first.items() if item in late}
    cols = ["item_id", "title", "genres", "text"]
    for i, date in enumerate(dates):
        lo = -1 if i == 0 else ends[i - 1]
        folder = Path(out) / date
        folder.mkdir(parents=True, exist_ok=True)
        inter[(inter.ts >= lo) & (inter.ts < ends[i])].reset_index(drop=True).to_parquet(
            folder / "interactions.parquet")
        if i == 0:
            night_items = items[~items.item_id.isin(late)]
        else:
            night_items = items[items.item_id.isin([k for k, night in arrive.items() if night == i])]
        if i == 0 or len(night_items):
            pd.DataFrame(night_items[cols]).reset_index(drop=True).to_parquet(folder / "items.parquet")
    return dates


def main(argv: list[str] | None = None) -> int:
    """`python -m siren_batch.arrivals cut --out DIR --first YYYY-MM-DD --nights N [key=value ...]`:
    ingest the configured dataset into DIR/source and cut it into arrival folders
    DIR/<date>/ (for trying nightly out: nightly.arrivals=DIR/{run_date})."""
    import argparse

    import pandas as pd

    from siren_batch.config import load_config
    from siren_batch.pipeline import ingest
    from siren_batch.spark import get_spark
    from siren_batch.validate import from_model_scale

    parser = argparse.ArgumentParser(prog="python -m siren_batch.arrivals", description=main.__doc__)
    parser.add_argument("command", choices=["cut"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--first", required=True, help="the first night: every interaction up to its end")
    parser.add_argument("--nights", type=int, default=2)
    parser.add_argument("--held-items", type=int, default=2, help="items that arrive on a later night")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(overrides=[*overrides, f"warehouse={args.out}/source"])
    spark = get_spark(cfg.spark)
    ingest(spark, cfg)
    inter = pd.read_parquet(cfg.table_path("interactions"))
    # arrivals are source data: back on the source's scale, which the nightly maps onto 1-5 again
    inter["rating"] = from_model_scale(inter["rating"], cfg.data.scale)
    dates = cut_arrivals(inter, pd.read_parquet(cfg.table_path("items")),
                         args.out, check_run_date(args.first), args.nights, args.held_items)
    print(f"arrivals for {', '.join(dates)} under {args.out}: nightly.arrivals={args.out}/{{run_date}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
