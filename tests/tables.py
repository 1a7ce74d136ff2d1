"""Comparing two warehouses' tables (the cluster against local mode, a killed run against an
uninterrupted one, a night run again): read a table folder into a sorted pandas frame without
the columns that name a run, then assert two such frames, or two datasets' tables, equal,
floats within a tolerance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

# Columns that name a run, not its result.
RUN_COLUMNS = {"run_id", "eval_id", "started_at", "duration_s"}
# Keys no table may repeat (the tables not named here have none).
KEYS = {"interactions": ["user_id", "item_id"], "items": ["item_id"], "item_embeddings": ["item_id"],
        "topics": ["topic_id"], "item_topics": ["item_id"], "example_sketches": ["user_id", "item_id"],
        "sketches": ["user_id"], "prompts": ["user_id", "item_id", "variant", "mode"],
        "ratings": ["run_date", "user_id", "item_id"], "metrics": ["system", "segment", "metric"]}


def read_frame(folder: Path, keys: list[str] | None = None) -> pd.DataFrame:
    """The table at `folder` without RUN_COLUMNS, partition columns (categoricals) as text, rows
    sorted by `keys` (default: every integer, boolean and text column; text may be null)."""
    df = pd.read_parquet(folder).drop(columns=list(RUN_COLUMNS), errors="ignore")
    df = df.astype({c: str for c in df.columns if isinstance(df[c].dtype, pd.CategoricalDtype)})
    if keys is None:
        keys = [c for c in df.columns if df[c].dtype.kind in "iub"
                or (df[c].dtype == object and df[c].map(lambda v: v is None or isinstance(v, str)).all())]
    return df.sort_values(keys or list(df.columns[:1])).reset_index(drop=True)


def same_value(a, b, atol: float = 1e-6) -> bool:
    """Nested values equal, floats within atol; a null equals only a null, NaN only NaN.

    >>> same_value([1.0, {"x": float("nan")}], (1.0 + 1e-7, {"x": float("nan")})), same_value(None, 0.0)
    (True, False)
    """
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype.kind in "fiub" \
            and b.dtype.kind in "fiub":
        return a.shape == b.shape and bool(np.allclose(a, b, rtol=0, atol=atol, equal_nan=True))
    if isinstance(a, (list, tuple, np.ndarray)) and isinstance(b, (list, tuple, np.ndarray)):
        return len(a) == len(b) and all(same_value(x, y, atol) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k], atol) for k in a)
    if isinstance(a, (float, np.floating)) and isinstance(b, (float, np.floating)):
        return bool((np.isnan(a) and np.isnan(b)) or abs(a - b) <= atol)
    return bool(a == b)


def assert_same_frame(mine: pd.DataFrame, theirs: pd.DataFrame, what: str, atol: float = 1e-6) -> None:
    """Same columns, rows and values (same_value), or an assertion naming the first difference."""
    assert list(mine.columns) == list(theirs.columns), f"{what}: columns {list(mine.columns)} vs {list(theirs.columns)}"
    assert len(mine) == len(theirs), f"{what}: {len(mine)} rows against {len(theirs)}"
    for column in mine.columns:
        bad = [k for k, (x, y) in enumerate(zip(mine[column], theirs[column])) if not same_value(x, y, atol)]
        assert not bad, f"{what}.{column} differs in {len(bad)} rows, e.g. {mine[column][bad[0]]!r} vs " \
                        f"{theirs[column][bad[0]]!r}"


def visible(folder: Path) -> set[str]:
    """Folders a reader of the tables can see: every path under the dataset without a part
    starting with '_' or '.' (Spark, pyarrow and our readers skip those), the runs table and
    the reports left out (a killed run has no runs row; report names carry the run id)."""
    found = set()
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_dir() and rel.parts[0] not in {"runs", "reports"} \
                and not any(p.startswith(("_", ".")) for p in rel.parts):
            found.add(str(rel))
    return found


def assert_same_tables(got: Path, want: Path, what: str) -> None:
    """Two datasets' folders hold the same tables and partitions, the same rows (floats within
    1e-6), no duplicate keys, and as many reports."""
    assert visible(got) == visible(want), f"{what}: the tables and partitions a reader sees differ"
    for table in sorted({p.split("/")[0] for p in visible(want)}):
        mine, theirs = read_frame(got / table), read_frame(want / table)
        if table in KEYS:
            assert not mine.duplicated(KEYS[table]).any(), f"{table} holds duplicate keys"
        assert_same_frame(mine, theirs, f"{table} ({what})")
    # reports/: <eval_id>.md and latest.md, once per finished evaluate
    assert len(list(got.glob("reports/*"))) == len(list(want.glob("reports/*")))
