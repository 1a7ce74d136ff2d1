"""The run report: one self-contained HTML page (inline CSS, plots as base64
PNG, no external resources) per ratings run_date, read from the warehouse with
polars (no Spark): metrics against the baselines, the run's counts, predicted
against true ratings, errors by history length and by topic, token savings of
sketches, topics and a 2-D map of the item embeddings, and links to the tables.

    python -m siren_batch.report [key=value ...] [--run-date 1998-04-23] [--run-id RUN_ID]

Writes <warehouse>/<dataset>/reports/run-<run_date>.html and reports/latest.html
(a local or mounted warehouse: the page is written with plain file I/O).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime as dt
import html
import logging
import os
import sys
from pathlib import Path

import polars as pl

from siren_batch import explore
from siren_batch.config import Config, ConfigError, load_config, local_path

logger = logging.getLogger(__name__)

CSS = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-top:8px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eef}
td.s,th.s{text-align:left}.missing{color:#a33}.note{color:#555;font-size:13px}img{max-width:100%}"""
MAX_ROWS = 60


def table_html(frame: pl.DataFrame, max_rows: int = MAX_ROWS) -> str:
    """A polars frame as an HTML table (floats to 4 decimals, first max_rows rows).

    >>> table_html(pl.DataFrame({"system": ["a"], "mae": [0.12345]}))
    '<table><tr><th class="s">system</th><th>mae</th></tr><tr><td class="s">a</td><td>0.1235</td></tr></table>'
    """
    text = {c: frame.schema[c] in (pl.String, pl.Categorical) for c in frame.columns}
    cell = lambda v: "" if v is None else f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))
    cls = lambda c: ' class="s"' if text[c] else ""   # text columns align left
    head = "".join(f"<th{cls(c)}>{html.escape(c)}</th>" for c in frame.columns)
    rows = ["<tr>" + "".join(f"<td{cls(c)}>{cell(v)}</td>" for c, v in zip(frame.columns, row)) + "</tr>"
            for row in frame.head(max_rows).iter_rows()]
    more = f'<p class="note">{frame.height - max_rows} more rows not shown</p>' if frame.height > max_rows else ""
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>{more}"


def image_html(fig, alt: str) -> str:
    """A Figure as an inline PNG <img>."""
    from siren_batch import plots

    data = base64.b64encode(plots.png(fig)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def missing(what: str) -> str:
    return f'<p class="missing">{html.escape(what)}</p>'


def _metrics_section(cfg: Config, run_date: str | None) -> tuple[str, dict]:
    ids = explore.eval_ids(cfg)
    if not ids:
        return missing("No metrics table yet: run `siren-batch evaluate`."), {}
    mine = [e for e in ids if run_date and (e.startswith(f"{run_date}-") or e == f"nightly-{run_date}")]
    eval_id, frame = explore.metrics_table(cfg, (mine or ids)[-1])
    note = "" if mine else f" (no evaluation of run_date {run_date}: the newest one)"
    parts = [f'<p class="note">eval_id {html.escape(eval_id)}{html.escape(note)}; segment all; '
             "systems named baseline:* are the baselines, best MAE first.</p>", table_html(frame)]
    llm = frame.filter(~pl.col("system").str.starts_with("baseline:"))
    base = frame.filter(pl.col("system").str.starts_with("baseline:"))
    if "mae" in frame.columns and llm.height and base.height:
        best = base.sort("mae").row(0, named=True)
        lines = [f"{r['system']}: MAE {r['mae']:.4f} against the best baseline {best['system']} "
                 f"{best['mae']:.4f} ({r['mae'] - best['mae']:+.4f})" for r in llm.iter_rows(named=True)
                 if r["mae"] is not None]
        parts.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>")
    return "".join(parts), {"eval_id": eval_id, "systems": frame.height}


def _counts_section(cfg: Config, run_date: str | None, run_id: str | None) -> tuple[str, dict]:
    counts = explore.run_counts(cfg, run_id=run_id, run_date=run_date)
    parts, out = [], {}
    if counts.get("stages") is not None:
        parts += [f'<h3>Stages</h3><p class="note">{html.escape(counts["scope"])}</p>', table_html(counts["stages"])]
    else:
        parts.append(missing("No runs table: no stage has run."))
    if counts.get("rejects") is not None:
        out["rejected"] = int(counts["rejects"]["n"].sum())
        parts += [f'<h3>Rejected by reason</h3><p class="note">from {html.escape(counts["rejects_source"])}: '
                  f'{out["rejected"]} rows</p>', table_html(counts["rejects"])]
    else:
        parts.append(missing("No rejects table."))
    if "rows" in counts:
        out.update({k: counts[k] for k in ("rows", "scored", "prompt_tokens", "output_tokens")})
        out["errors"] = int(counts["errors"]["n"].sum())
        summary = pl.DataFrame({"ratings rows": [counts["rows"]], "scored": [counts["scored"]],
                                "errors": [out["errors"]], "prompt tokens": [counts["prompt_tokens"]],
                                "output tokens": [counts["output_tokens"]]})
        parts += ["<h3>Scored</h3>", table_html(summary)]
        parts += ["<h3>Errors by reason</h3>", table_html(counts["errors"]) if out["errors"] else
                  '<p class="note">no errors</p>']
    else:
        parts.append(missing(f"No ratings for run_date {run_date}."))
    return "".join(parts), out


def _prediction_sections(cfg: Config, run_date: str | None) -> tuple[list[tuple[str, str]], dict]:
    from siren_batch import plots

    pairs = explore.predicted_vs_true(cfg, run_date)
    if pairs is None:
        return [("Predicted and true ratings", missing("No ratings or interactions table."))], {}
    if pairs.is_empty():
        return [("Predicted and true ratings", missing("No scored pair of this run_date has a true rating "
                                                        "yet (it arrives with a later night)."))], {"with_truth": 0}
    out = [("Predicted and true ratings", image_html(plots.predicted_vs_true(pairs), "predicted vs true")
            + f'<p class="note">{pairs.height} scored pairs with a true rating (interactions, any split); '
            "predicted = the ratings column <code>rating</code>, the expected value of <code>probs</code>.</p>")]
    by_history = explore.error_by_history(cfg, pairs=pairs)
    out.append(("Error by history length", image_html(plots.error_by_history(by_history), "error by history")
                + table_html(by_history)))
    by_topic = explore.error_by_topic(cfg, pairs=pairs)
    out.append(("Error by topic", missing("No topics table.") if by_topic is None else
                image_html(plots.error_by_topic(by_topic), "error by topic")))
    return out, {"with_truth": pairs.height}


def _token_section(cfg: Config) -> str:
    from siren_batch import plots

    savings = explore.token_savings(cfg)
    if savings is None or savings.pairs.is_empty():
        return missing("No prompts with both sketch and raw variants, and no ratings to estimate from.")
    summary = pl.DataFrame([savings.summary])
    return (f'<p class="note">{html.escape(savings.measures)}</p>' + table_html(summary)
            + image_html(plots.token_savings(savings), "token savings"))


def _topic_section(cfg: Config) -> str:
    from siren_batch import plots

    summary = explore.topic_summary(cfg)
    if summary is None:
        return missing("No topics table yet: run `siren-batch topics`.")
    parts = [image_html(plots.topic_sizes(summary), "topic sizes")]
    projected = explore.embedding_projection(cfg)
    parts.append(missing("No item_embeddings table.") if projected is None else
                 image_html(plots.projection(projected), "embedding projection"))
    return "".join(parts)


def _links_section(cfg: Config) -> str:
    present = explore.tables(cfg)
    rows = "".join(f'<li><a href="../{name}/">{name}</a> ({frame.select(pl.len()).collect().item()} rows)</li>'
                   for name, frame in present.items())
    return f"<ul>{rows}</ul>" if rows else missing("No tables.")


def render(cfg: Config, run_date: str | None, run_id: str | None) -> tuple[str, dict]:
    """The page's HTML and its counts."""
    metrics, info = _metrics_section(cfg, run_date)
    counts, numbers = _counts_section(cfg, run_date, run_id)
    predictions, with_truth = _prediction_sections(cfg, run_date)
    sections = [("Metrics and baselines", metrics), ("Run counts", counts), *predictions,
                ("Token savings of sketches", _token_section(cfg)), ("Topics", _topic_section(cfg))]
    if (nightly := explore.scan(cfg, "nightly")) is not None:
        frame = nightly.collect()
        if run_date and "run_date" in frame.columns:
            frame = frame.filter(pl.col("run_date").cast(pl.String) == run_date)
        sections.append(("Night steps", table_html(frame)))
    sections.append(("Tables", _links_section(cfg)))
    title = f"siren-batch run report: {cfg.dataset}, run_date {run_date or '-'}"
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "".join(f"<h2>{html.escape(name)}</h2>\n{content}\n" for name, content in sections)
    page = (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f'<p class="note">warehouse {html.escape(str(Path(cfg.warehouse).resolve()))}; written {stamp}</p>\n'
            f"{body}</body></html>\n")
    return page, {**info, **numbers, **with_truth, "plots": page.count("<img ")}


def write_report(cfg: Config, run_date: str | None = None, run_id: str | None = None) -> dict:
    """Write reports/run-<run_date>.html and reports/latest.html (run_date
    default: the newest ratings partition, else today UTC); returns
    {"report": path, "latest": path, "run_date", counts...}."""
    local = local_path(cfg.warehouse)
    if local is None:
        raise ConfigError(f"the report reads the warehouse from a local disk (polars, DuckDB); {cfg.warehouse} "
                          "is not one: run it where the warehouse is mounted, with warehouse=<that path>")
    cfg = dataclasses.replace(cfg, warehouse=local)   # file:///wh -> /wh, a path pathlib reads
    run_date = run_date or explore.latest_run_date(cfg) or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    page, numbers = render(cfg, run_date, run_id)
    folder = Path(cfg.table_path("reports"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"run-{run_date}.html", folder / "latest.html"]
    for path in paths:  # write then rename: a reader never sees half a page
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_text(page, encoding="utf-8")
        os.replace(staging, path)
    logger.info("report written to %s", paths[0])
    return {"report": str(paths[0]), "latest": str(paths[1]), "run_date": run_date, **numbers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    parser.add_argument("--run-date", help="ratings partition (default: the newest)")
    parser.add_argument("--run-id", help="one run's counts instead of the run_date's")
    args = parser.parse_args(argv)
    cfg = load_config(overrides=args.overrides)
    result = write_report(cfg, run_date=args.run_date, run_id=args.run_id)
    sys.stdout.write(f"{result['report']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
