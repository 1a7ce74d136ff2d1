"""`siren-batch nightly --run-date D`: one night, with work in proportion to what changed.

    ingest -> embed -> topics -> sketches -> calibrate -> score -> evaluate -> report

A night reads the folder `nightly.arrivals` (with "{run_date}" replaced): the
interactions that arrived that day (`interactions.<data.format>`, a file or a
folder) and, optionally, new or changed items (`items.<data.format>`), in the
`table` source's layout (data.columns / data.item_columns map the names);
siren_batch/arrivals.py cuts any dataset into such folders by day.

- The first night (no `interactions` table yet) is the bootstrap: its folder is
  the whole history, ingested like `siren-batch ingest` (k-core, leave-last-out
  split), every item embedded, topics fitted, every user sketched.
- Later nights validate the arrivals row by row (no k-core: a new user's first
  rating counts), merge them into `interactions` (split train; a re-rating
  replaces the pair's older one), embed only the arrived items, assign them to
  the stored centroids, and rebuild serving sketches only for users with new
  interactions (or with a rating of a changed item). Topics are re-fitted only
  when asked (nightly.recluster) or when the drift, logged every night, passes
  nightly.drift_threshold; then every sketch is rebuilt.
- Every night keeps what arrived in `arrived_interactions` / `arrived_items` and
  its rejects in `night_rejects` (all partitioned by run_date): later steps read
  those partitions, so each step can run again and give the same tables.
- Calibrate: when the warehouse holds no calibrator for score.model, score.adapter and
  the prompt settings (the first night, or the first after one of them changed), score
  the valid split (at most calibrate.chain_rows pairs) and fit one, as `siren-batch all`
  does; every later night's score step applies it (calibrate.in_chain=false skips it).
- Candidates (nightly.candidates): `newest:N` = every user active in the last
  nightly.active_days x the N newest items they have not rated; or a Parquet path.
- Evaluate: the previous night's ratings against the truth that arrived tonight,
  with the baselines fit on the interactions known when those ratings were made.

A finished step leaves `_nightly/<run_date>/<step>.json` (its summary): a night
killed in any stage resumes at the first unfinished step; re-running a finished
date does nothing unless `--redo` (then every step runs again: same tables, no
duplicates). Each step also appends a `runs` row (stage nightly-<step>) with what
it read and wrote. Tables are swapped into place whole (siren_batch.warehouse), so
readers never see a half-written table or partition, and `_nightly/latest.json`
names the last complete night. A night first removes the staging leftovers of
killed runs that are a day old (warehouse.sweep_staging).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Callable

from pyspark.sql import SparkSession

from siren_batch import data
from siren_batch.config import Config, ConfigError
from siren_batch.nightly.ingest import ingest_step
from siren_batch.nightly.night import Night, check_run_date, day_end_ms, state_dir
from siren_batch.nightly.refresh import embed_step, sketches_step, topics_step
from siren_batch.nightly.serve import calibrate_step, evaluate_step, report_step, score_step
from siren_batch.warehouse import (delete_path, list_dir, path_exists, read_text, run_record, sweep_staging,
                                   table_exists, write_text)

logger = logging.getLogger(__name__)

STEPS = ["ingest", "embed", "topics", "sketches", "calibrate", "score", "evaluate", "report"]
__all__ = ["STEPS", "Night", "check_run_date", "completed_nights", "day_end_ms", "run_night", "state_dir"]


def completed_nights(spark: SparkSession, cfg: Config) -> list[str]:
    return [d for d in list_dir(spark, state_dir(cfg))
            if path_exists(spark, f"{state_dir(cfg, d)}/done.json")]



def _plan(spark: SparkSession, cfg: Config, run_date: str) -> Night:
    """The night's plan, decided once (plan.json): a resumed bootstrap stays one even
    though its first tables already exist."""
    if not cfg.nightly.arrivals:
        raise ConfigError("nightly.arrivals is not set: set nightly.arrivals=<folder with {run_date}> "
                          "(see README, Nightly operation)")
    path = f"{state_dir(cfg, run_date)}/plan.json"
    if path_exists(spark, path):
        return Night(**json.loads(read_text(spark, path)))
    night = Night(run_date, not table_exists(spark, cfg, "interactions"),
                  cfg.nightly.arrivals.replace("{run_date}", run_date))
    write_text(spark, path, json.dumps(dataclasses.asdict(night)))
    return night


def run_night(spark: SparkSession, cfg: Config, run_date: str, *, redo: bool = False,
              after_step: Callable[[str], None] | None = None) -> dict:
    """Run (or resume) the night of run_date; returns {step: summary}."""
    check_run_date(run_date)
    if cfg.data.sample_users < 1.0:
        raise ConfigError(f"data.sample_users={cfg.data.sample_users:g} is for dry runs of the batch chain; "
                          "a night keeps every user (set data.sample_users=1)")
    stored = data.stored_sample(spark, cfg)
    if stored is not None and stored < 1.0:
        raise ConfigError(f"{cfg.warehouse}/{cfg.dataset} holds a dry run's tables (data.sample_users={stored:g}); "
                          "a night needs a full one: run the nightly on its own warehouse")
    done_nights = completed_nights(spark, cfg)
    later = [d for d in done_nights if d > run_date]
    if later:
        raise ConfigError(f"nights run in date order: {max(later)} is already complete, so {run_date} "
                          "cannot run now")
    unfinished = [d for d in list_dir(spark, state_dir(cfg)) if d < run_date and d not in done_nights
                  and path_exists(spark, f"{state_dir(cfg, d)}/plan.json")]
    if unfinished:   # run past, it would be refused for good once this one is done: its arrivals lost
        first = unfinished[0]
        way_out = ("" if path_exists(spark, f"{state_dir(cfg, first)}/ingest.json")
                   else f"; it ingested nothing, so to give it up delete {state_dir(cfg, first)}")
        raise ConfigError(f"night {first} started but did not finish: run it again first "
                          f"(siren-batch nightly --run-date {first}), then {run_date}{way_out}")
    folder = state_dir(cfg, run_date)
    if redo:
        for name in list_dir(spark, folder):
            if name.endswith(".json") and name != "plan.json":
                delete_path(spark, f"{folder}/{name}")
    night = _plan(spark, cfg, run_date)
    sweep_staging(spark, cfg)   # what killed runs left behind, a day old or more
    out: dict = {"run_date": run_date, "bootstrap": night.bootstrap}
    for step in STEPS:
        marker = f"{folder}/{step}.json"
        if path_exists(spark, marker):
            out[step] = {**json.loads(read_text(spark, marker)), "resumed": "already done"}
            logger.info("nightly %s %s: already done", run_date, step)
            continue
        if (step == "evaluate" and not cfg.nightly.evaluate) or (step == "report" and not cfg.nightly.report):
            out[step] = {"skipped": f"nightly.{step}=false"}
            continue
        logger.info("nightly %s %s: start", run_date, step)
        with run_record(spark, cfg, f"nightly-{step}") as rec:
            if step == "sketches":
                summary = sketches_step(spark, cfg, night, rec,
                                        rebuild_all=bool(out.get("topics", {}).get("reclustered")))
            else:
                summary = STEP_FUNCS[step](spark, cfg, night, rec)
        # Cached plans would answer a later step's read of a table this step rewrote.
        spark.catalog.clearCache()
        summary = {**summary, "seconds": rec.duration_s, "run_id": rec.run_id}
        write_text(spark, marker, json.dumps(summary, default=str))
        out[step] = summary
        if after_step is not None:
            after_step(step)
    write_text(spark, f"{folder}/done.json", json.dumps({"run_date": run_date}))
    write_text(spark, f"{state_dir(cfg)}/latest.json", json.dumps({"run_date": run_date}))
    return out


STEP_FUNCS = {"ingest": ingest_step, "embed": embed_step, "topics": topics_step, "calibrate": calibrate_step,
              "score": score_step,
              "evaluate": evaluate_step, "report": report_step}
