"""Print where the tables are and a short summary of them, read with polars
(no Spark needed: the same way a notebook reads the warehouse).

    python -m siren_batch.summary [key=value ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from siren_batch.config import Config, load_config
from siren_batch.console import log_dir

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_ratings.ipynb"
TABLES = ["interactions", "items", "rejects", "item_embeddings", "topics", "item_topics",
          "example_sketches", "sketches", "prompts", "ratings", "metrics", "runs"]


def scan(cfg: Config, table: str):
    import polars as pl

    path = Path(cfg.table_path(table))
    if not path.exists():
        return None
    return pl.scan_parquet(str(path / "**" / "*.parquet"), hive_partitioning=True)


def summarize(cfg: Config) -> str:
    import polars as pl

    lines = [f"warehouse: {Path(cfg.warehouse).resolve() / cfg.dataset}", ""]
    for table in TABLES:
        frame = scan(cfg, table)
        rows = frame.select(pl.len()).collect().item() if frame is not None else "-"
        lines.append(f"  {table:<18} {rows!s:>10}  {cfg.table_path(table)}")
    topics = scan(cfg, "topics")
    if topics is not None:
        lines += ["", "topics:"] + [f"  {r['topic_id']:>2} ({r['size']:>4} items) {r['name']}"
                                     for r in topics.sort("topic_id").collect().iter_rows(named=True)]
    prompts = scan(cfg, "prompts")
    if prompts is not None:
        stats = (prompts.group_by("variant", "mode")
                 .agg(pl.len().alias("n"), pl.col("prompt_tokens").mean().round(1).alias("mean_tokens"))
                 .sort("variant").collect())
        lines += ["", "prompt tokens:", str(stats)]
        first = prompts.filter(pl.col("mode") == "answer_only").head(1).collect()
        if first.height:
            lines += ["", "an answer-only prompt:", first["prompt"][0]]
    report = Path(cfg.table_path("reports")) / "latest.md"
    if report.exists():
        lines += ["", report.read_text()]
    return "\n".join(lines)


def where_next(cfg: Config, overrides: list[str]) -> str:
    """Where the run's logs, the notebook and the HTML report are (and how to write the
    report when it is not there yet)."""
    html = Path(cfg.table_path("reports")).resolve() / "latest.html"
    report = (f"{html}" if html.exists() else
              f"{html} (not written yet: {' '.join(['python -m siren_batch.report', *overrides])})")
    notebook = _relative(NOTEBOOK) + ("" if NOTEBOOK.exists() else " (not there yet)")
    return "\n".join([f"logs:      {log_dir(cfg).resolve()}/  (one file per run; --verbose shows it all)",
                      f"notebook:  {notebook}  (jupyter lab {_relative(NOTEBOOK)})",
                      f"report:    {report}"])


def _relative(path: Path) -> str:
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def main(argv: list[str] | None = None) -> int:
    overrides = argv if argv is not None else sys.argv[1:]
    cfg = load_config(overrides=overrides)
    sys.stdout.write(summarize(cfg) + "\n\n" + where_next(cfg, overrides) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
