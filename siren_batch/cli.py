"""`siren-batch <stage> [--conf FILE ...] [key=value ...]`

Stages: ingest, embed, topics, sketches, prompts, score, evaluate; `all` runs
ingest..evaluate, fitting the calibrator on the valid split before scoring
(score-calibrate; calibrate.in_chain=false skips it); `sketch-chain` runs
ingest..prompts; `prepare-model` converts the bundled SmolLM2 once. Examples:

    siren-batch ingest                                   # MovieLens-100K, local mode
    siren-batch sketches dataset=siren-movies topics.k=30
    siren-batch score --conf conf/cluster.yaml score.candidates=hdfs:///nightly/pairs
    siren-batch train-sft train.max_examples=2000; siren-batch export   # fine-tune, then merge (siren_batch/train)
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time

from siren_batch import stopping
from siren_batch.config import ConfigError, load_config
from siren_batch.lock import LockHeld

logger = logging.getLogger("siren_batch")

CHAINS = ("all", "sketch-chain")   # their stages: pipeline.chain
LOCK_FREE = {"train-sft", "train-grpo", "train-align", "export"}   # write under train.out_dir, not the warehouse


def _parser() -> argparse.ArgumentParser:
    from siren_batch.pipeline import STAGES

    parser = argparse.ArgumentParser(prog="siren-batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=[*STAGES, *CHAINS, "nightly", "report", "prepare-model", "show-config"])
    parser.add_argument("--conf", action="append", default=[], metavar="FILE",
                        help="extra YAML layer(s), e.g. conf/cluster.yaml; repeatable")
    parser.add_argument("--run-date", metavar="YYYY-MM-DD", help="nightly: the night to run; report: its run")
    parser.add_argument("--redo", action="store_true", help="nightly: run every step of a finished night again")
    parser.add_argument("--break-lock", action="store_true",
                        help="remove the warehouse lock left by a run that died, then go on")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show every log line (and Spark's) on the console, not only in the run's log file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. topics.k=30 spark.master=yarn")
    return parser


def run(stage: str, conf_files: list[str], overrides: list[str], *, run_date: str | None = None,
        redo: bool = False, break_lock: bool = False) -> dict:
    """Run one stage or a chain; returns {stage: summary}. Stages that write tables
    hold the warehouse's lock (siren_batch.lock) while they run."""
    from siren_batch import lock, pipeline
    from siren_batch.spark import get_spark
    from siren_batch.warehouse import RunRecord, restore_swaps

    cfg = load_config(conf_files, overrides)
    if stage == "show-config":
        return {"config": cfg.to_dict(), "hash": cfg.hash()}
    if stage == "prepare-model":
        return {stage: pipeline.prepare_model(None, cfg)}
    if stage == "report":
        from siren_batch.report import write_report
        return {stage: write_report(cfg, run_date=run_date)}
    if stage == "nightly" and not run_date:
        raise ConfigError("nightly needs --run-date YYYY-MM-DD")
    spark = get_spark(cfg.spark)
    if stage in LOCK_FREE:   # they only read the warehouse: a nightly run may go on beside them
        return _run_stages(spark, cfg, [stage])
    holder = RunRecord(stage=stage).run_id
    # SIGTERM/SIGINT cancel the running Spark job and unwind, so the lock is released (siren_batch.stopping)
    with stopping.on_signals(spark) as stop, lock.hold(spark, cfg, holder, stage, break_lock=break_lock):
        restore_swaps(spark, cfg)   # a killed run's half-done replace, before anything reads a table
        if stage == "nightly":
            from siren_batch.nightly import run_night
            return {"nightly": run_night(spark, cfg, run_date, redo=redo, after_step=stop.check),
                    "warehouse": f"{cfg.warehouse.rstrip('/')}/{cfg.dataset}"}
        return _run_stages(spark, cfg, pipeline.chain(stage, cfg) if stage in CHAINS else [stage],
                           before_stage=stop.check)


def _run_stages(spark, cfg, names: list[str], before_stage=lambda: None) -> dict:
    from siren_batch import pipeline

    out = {}
    for name in names:
        before_stage()
        start = time.perf_counter()
        logger.info("stage %s: start (dataset=%s, config %s)", name, cfg.dataset, cfg.hash())
        out[name] = pipeline.STAGES[name](spark, cfg)
        spark.catalog.clearCache()  # a cached plan would answer a later stage's read of a rewritten table
        out[name]["seconds"] = round(time.perf_counter() - start, 1)
        logger.info("stage %s: done in %.1fs", name, out[name]["seconds"])
    out["warehouse"] = f"{cfg.warehouse.rstrip('/')}/{cfg.dataset}"
    return out


# Spark names an unreadable input file in one of these; the innermost cause says why.
_BAD_FILE = (re.compile(r"Encountered error while reading file (\S+?)\.?\s"),
             re.compile(r"(\S+) is not a Parquet file"))
# Writing failed for want of space or permission (local disk, HDFS, S3 alike).
_STORAGE = re.compile(r"No space left on device|File too large|Disk quota exceeded|Read-only file system|"
                      r"Permission denied|AccessDeniedException|ParentNotDirectoryException|Not a directory|"
                      r"Mkdirs failed|DiskSpaceQuotaExceeded")


def _root_cause(err: BaseException) -> str:
    """The most specific message: for a Java error, its innermost 'Caused by' line, and
    for a truncated or corrupt input file, that file first."""
    text = str(err)
    caused = [line.strip() for line in text.splitlines() if line.strip().startswith("Caused by:")]
    line = caused[-1] if caused else next((l.strip() for l in text.splitlines() if l.strip()), "")
    bad = next((m.group(1) for pattern in _BAD_FILE for m in [pattern.search(text)] if m), None)
    why = re.sub(r"^(?:[\w$]+\.)+(?=[\w$]+: )", "", line.removeprefix("Caused by:").strip())  # drop the package
    if bad:
        return f"cannot read input file {bad} (truncated or corrupt?): {why}"[:500]
    storage = _STORAGE.search(text)
    if storage:
        return (f"storage error: {why or storage.group()} (a full disk, or a path that cannot be "
                "written or read; tables already written are untouched, a write is renamed into place only "
                "when complete)")[:500]
    return f"{type(err).__name__}: {line}"[:500]


def main(argv: list[str] | None = None) -> int:
    from siren_batch import console

    args = _parser().parse_intermixed_args(argv)
    try:  # the run's log file goes beside its tables; run() below reports a bad config
        log_cfg = None if args.stage == "show-config" else load_config(args.conf, args.overrides)
    except (ConfigError, FileNotFoundError):
        log_cfg = None
    console.setup_logging(log_cfg, verbose=args.verbose, stage=args.stage)
    try:
        result = run(args.stage, args.conf, args.overrides, run_date=args.run_date, redo=args.redo,
                     break_lock=args.break_lock)
    except (ConfigError, FileNotFoundError, LockHeld) as err:
        print(f"siren-batch: error: {err}", file=sys.stderr)
        return 2
    except stopping.Stopped as err:
        logger.info("stage %s %s", args.stage, err)
        print(f"siren-batch: {args.stage} {err}", file=sys.stderr)
        return err.code
    except Exception as err:  # one clear line for the operator; the traceback is in the log
        logger.error("stage %s failed", args.stage, exc_info=True)
        print(f"siren-batch: {args.stage} failed: {_root_cause(err)}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
