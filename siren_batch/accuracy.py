"""Accuracy across datasets and systems: notebooks/benchmarks/accuracy.{json,md}.

    python -m siren_batch.accuracy --dataset ml-100k --dataset siren-movies \\
        --meta "zero-shot+priors=training_examples:0,device:cpu"

Reads each dataset's `metrics` table straight from Parquet (no Spark) and keeps, per
system, its newest evaluation of the split (segment "all"; newest by the evaluate run's
start, which its eval_id carries):
dataset -> system -> readout, mae, rmse, nll, n, eval_id, plus what --meta adds
(training examples, wall time, device: what the metrics table cannot know).
A system's name says its readout: `.../median`, `.../argmax`, else the expected
value (LLM) or the point estimate (calibrated, baselines).

--drop PREFIX leaves out systems read now (an evaluation without a system name, `llm:<model>`).
--merge keeps what the results file already holds (a warehouse that is gone, another
machine's runs): the systems read now replace their namesakes, every other entry stays
as recorded, and each entry carries the date it was read (`recorded`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def readout_of(system: str) -> str:
    """The readout a system name stands for.

    >>> readout_of("llm:x/median"), readout_of("llm:x+calibrated"), readout_of("llm:x+calibrated/median")
    ('median', 'calibrated point', 'calibrated median')
    """
    if system.endswith("/median"):
        return "calibrated median" if "+calibrated" in system else "median"
    if system.endswith("/argmax"):
        return "argmax"
    if "+calibrated" in system:
        return "calibrated point"
    return "mean" if not system.startswith("baseline:") else "point"


def evaluated_at(eval_id: str) -> str | None:
    """When an `evaluate` run ran: the UTC start stamp inside its eval_id (`<ratings
    run_date>-<run_id>`, run_id = `%Y%m%dT%H%M%S-<hex>`; dashes in both halves); None for
    other evaluations in the metrics table (the nightly job's `nightly-<date>`).

    >>> evaluated_at("2026-11-02-20261126T162755-a7e1a8"), evaluated_at("nightly-2026-11-03")
    ('20261126T162755', None)
    """
    parts = eval_id.rsplit("-", 2)
    return parts[1] if len(parts) == 3 and re.fullmatch(r"\d{8}T\d{6}", parts[1]) else None


def newest_by_system(metrics: Any, split: str) -> dict[str, dict[str, Any]]:
    """{system: {mae, rmse, nll, n, eval_id}} from the newest `evaluate` run holding that
    system (by its start; ties go to the greater eval_id). The nightly job's evaluations of
    served ratings are left out: they judge other pairs than the split's."""
    part = metrics[(metrics["split"] == split) & (metrics["segment"] == "all")].copy()
    part["evaluated_at"] = [evaluated_at(e) for e in part["eval_id"]]
    other = sorted(set(part.loc[part["evaluated_at"].isna(), "eval_id"]))
    if other:
        logger.info("accuracy: left out %d evaluations that are not evaluate runs (%s)", len(other),
                    ", ".join(other[:3]) + (", ..." if len(other) > 3 else ""))
    part = part[part["evaluated_at"].notna()]
    out: dict[str, dict[str, Any]] = {}
    for system, rows in part.groupby("system"):
        newest = rows[rows["eval_id"] == rows.sort_values(["evaluated_at", "eval_id"])["eval_id"].iloc[-1]]
        values = dict(zip(newest["metric"], newest["value"]))
        n = dict(zip(newest["metric"], newest["n"]))
        out[system] = {"readout": readout_of(system), "mae": values.get("mae"), "rmse": values.get("rmse"),
                       "nll": values.get("nll"), "coverage": values.get("coverage"), "n": int(n.get("mae", 0)),
                       "eval_id": newest["eval_id"].iloc[0]}
    return out


def parse_meta(items: list[str]) -> dict[str, dict[str, Any]]:
    """["sys=training_examples:0,device:cpu"] -> {"sys": {"training_examples": 0, "device": "cpu"}};
    "DATASET::sys=..." scopes the entry to one dataset (key "DATASET::sys")."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        system, _, pairs = item.partition("=")
        for pair in filter(None, pairs.split(",")):
            key, _, value = pair.partition(":")
            out.setdefault(system, {})[key] = int(value) if value.isdigit() else value
    return out


def meta_for(meta: dict[str, dict[str, Any]], dataset: str, system: str) -> dict[str, Any]:
    """The entry for `system`, overridden by a `dataset::system` one."""
    return {**meta.get(system, {}), **meta.get(f"{dataset}::{system}", {})}


def merge_tables(old: dict[str, dict[str, dict[str, Any]]],
                 new: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """dataset -> system -> entry: `old`'s entries, with `new`'s in place of their namesakes.
    A namesake read again from the same evaluation (eval_id) keeps what --meta recorded for
    it (training examples, device, wall time) unless given again; a new evaluation does not.

    >>> merge_tables({"a": {"x": {"mae": 1}, "y": {"mae": 2}}}, {"a": {"x": {"mae": 0}}, "b": {"z": {}}})
    {'a': {'x': {'mae': 0}, 'y': {'mae': 2}}, 'b': {'z': {}}}
    >>> old = {"a": {"x": {"eval_id": "e1", "mae": 1, "device": "cpu"}}}
    >>> merge_tables(old, {"a": {"x": {"eval_id": "e1", "mae": 1}}})["a"]["x"]
    {'eval_id': 'e1', 'mae': 1, 'device': 'cpu'}
    >>> merge_tables(old, {"a": {"x": {"eval_id": "e2", "mae": 0}}})["a"]["x"]
    {'eval_id': 'e2', 'mae': 0}
    """
    out = {dataset: dict(systems) for dataset, systems in old.items()}
    for dataset, systems in new.items():
        kept = out.setdefault(dataset, {})
        for system, entry in systems.items():
            before = kept.get(system, {})
            same = "eval_id" in entry and before.get("eval_id") == entry["eval_id"]
            kept[system] = {**before, **entry} if same else entry
    return out


def _fmt(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def markdown(table: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = []
    for dataset, systems in table.items():
        lines += [f"## {dataset}", "", "| system | readout | MAE | RMSE | NLL | n | training examples | device |",
                  "|---|---|---|---|---|---|---|---|"]
        for system, r in sorted(systems.items(), key=lambda kv: kv[1]["rmse"] or 9):
            lines.append(f"| {system} | {r['readout']} | {_fmt(r['mae'])} | {_fmt(r['rmse'])} | {_fmt(r['nll'])} "
                         f"| {r['n']} | {r.get('training_examples', '–')} | {r.get('device', '–')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import pandas as pd

    from siren_batch.evaluate import PAPER_ROWS
    from siren_batch.profiling import RESULTS_DIR, write_results

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", action="append", required=True)
    parser.add_argument("--warehouse", default="./warehouse")
    parser.add_argument("--split", default="test")
    parser.add_argument("--meta", action="append", default=[], metavar="SYSTEM=key:value,...")
    parser.add_argument("--drop", action="append", default=[], metavar="PREFIX",
                        help="leave out the systems read now whose name starts with PREFIX (e.g. llm: for an "
                             "evaluation run without evaluate.system)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the results file's other entries; the systems read now replace their namesakes")
    args = parser.parse_args(argv)
    recorded = dt.date.today().isoformat()
    meta = parse_meta(args.meta)
    table = {}
    for dataset in args.dataset:
        root = Path(args.warehouse) / dataset
        systems = newest_by_system(pd.read_parquet(root / "metrics"), args.split)
        systems = {s: r for s, r in systems.items() if not s.startswith(tuple(args.drop))}
        table[dataset] = {s: {**r, **meta_for(meta, dataset, s), "recorded": recorded} for s, r in systems.items()}
        for name, quoted in PAPER_ROWS.get(dataset, {}).items():   # quoted, never measured here
            if quoted.get("split", args.split) == args.split:
                table[dataset][f"{name} (quoted)"] = {"readout": "quoted", "mae": quoted["mae"], "rmse": quoted["rmse"],
                                                      "nll": None, "n": 0, "source": quoted["source"]}
    previous = RESULTS_DIR / "accuracy.json"
    if args.merge and previous.exists():
        before = json.loads(previous.read_text())
        if before.get("split", args.split) != args.split:
            raise SystemExit(f"--merge: {previous} holds split {before['split']!r}, not {args.split!r}")
        table = merge_tables(before.get("datasets", {}), table)
    path = write_results("accuracy", {"split": args.split, "datasets": table}, markdown(table))
    logger.info("accuracy written to %s", path)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level="INFO")
    sys.exit(main(sys.argv[1:]))
