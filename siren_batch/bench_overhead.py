"""`make bench-score-overhead`: what the score stage costs beside its model, and a kill halfway.

    python -m siren_batch.bench_overhead [--pairs 1000000] [--per-user 166] [key=value ...]
    python -m siren_batch.bench_overhead --pairs 40000,160000     # two sizes and a linear fit to 1M

The real `score` stage (siren_batch.ratings.score_run: candidate join, prompt rendering,
backend, chunk commits) scores `--pairs` (user, item) candidates of MovieLens-1M (every
chosen user x `--per-user` items they have not rated, a Parquet path as the nightly
candidates are) with a tiny random-initialised model of the default architecture:
SmolLM2's LlamaForCausalLM config and its real tokenizer, 2 layers, hidden 64, saved
to a folder that `score.model` names. The model then costs little and the framework's
own cost shows. Measured in the same run, per size:
- stage: wall seconds and pairs/s of the whole stage;
- backend alone: the same prompts, rendered by the stage's own code and stored, scored
  by `backend.score` in this one Python process with the stage's per-task settings
  (torch threads = spark.task.cpus, one call per Arrow batch, batch size and tokens);
- overhead per pair: stage minus backend alone, three ways (bench_overhead_figures);
- where the time goes: the stage's own timers (siren_batch.timers), as wall seconds.
Then, at the largest size, kill and restart: the same run in a subprocess, SIGKILLed with
its JVM when half the chunks are committed, then started again: rows == pairs, each pair
once, and the same ratings as the uninterrupted run. Target: overhead under 2 ms per
pair. The warehouse (ingest -> embed -> topics -> sketches, the real stages) is built
once under --work and reused by later runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pyspark.sql import Window, functions as F

from siren_batch import pipeline, schemas
from siren_batch.assets import REPO_ROOT, resolve_llm
from siren_batch.bench_overhead_figures import figures, linear_fit, markdown
from siren_batch.config import load_config
from siren_batch.profiling import write_results
from siren_batch.spark import get_spark, task_threads
from siren_batch.warehouse import read_table, table_exists

logger = logging.getLogger(__name__)

WAREHOUSE_STAGES = ("ingest", "embed", "topics", "sketches")
RUN_DATE, KILLED_RUN_DATE = "2030-01-01", "2030-01-02"
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=256, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)   # the default architecture, shrunk


def build_warehouse(spark, cfg) -> dict:
    """The tables the score stage reads, through the real stages; reused when present."""
    if table_exists(spark, cfg, "sketches"):
        return {"reused": cfg.table_path("sketches")}
    seconds = {}
    for name in WAREHOUSE_STAGES:
        start = time.perf_counter()
        pipeline.STAGES[name](spark, cfg)
        seconds[name] = round(time.perf_counter() - start, 1)
    return seconds


def tiny_model(folder: Path) -> str:
    """The default model's tokenizer and config with TINY's sizes, random weights (seed 0)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = resolve_llm("default")
    config = AutoConfig.from_pretrained(source)
    for key, value in TINY.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return str(folder)


def make_candidates(spark, cfg, pairs: int, per_user: int, path: str) -> int:
    """`pairs` (user_id, item_id) rows: users in a hashed order, each with the `per_user`
    items it has not rated that hash first (the last user may get fewer)."""
    inter = read_table(spark, cfg, "interactions", schemas.INTERACTIONS).select("user_id", "item_id")
    users_needed = math.ceil(pairs / per_user)
    users = (inter.select("user_id").distinct()
             .withColumn("_u", F.row_number().over(Window.orderBy(F.xxhash64("user_id"), "user_id")) - 1)
             .where(F.col("_u") < users_needed))
    items = read_table(spark, cfg, "items", schemas.ITEMS).select("item_id")
    by_hash = Window.partitionBy("user_id").orderBy(F.xxhash64("user_id", "item_id"), "item_id")
    wanted = (F.col("_r") < per_user) & (F.col("_u") * per_user + F.col("_r") < pairs)
    (users.crossJoin(items).join(inter, on=["user_id", "item_id"], how="left_anti")
     .withColumn("_r", F.row_number().over(by_hash) - 1)
     .where(wanted).select("user_id", "item_id")
     .write.mode("overwrite").parquet(path))
    written = spark.read.parquet(path).count()
    if written != pairs:
        raise ValueError(f"{written} candidate pairs, not {pairs}: too few users or unrated items "
                         f"for --per-user {per_user}")
    return written


def timed_stage(spark, cfg) -> dict:
    start = time.perf_counter()
    summary = pipeline.STAGES["score"](spark, cfg)
    return {"seconds": time.perf_counter() - start, "summary": summary}


def store_prompts(spark, cfg, path: str) -> int:
    """The candidates' prompts as the stage renders them (ratings._prompts_for), each
    user's rows together as score_frame orders them."""
    from siren_batch.ratings import _prompts_for, candidate_pairs
    from siren_batch.scoring import score_tasks

    pairs, history = candidate_pairs(spark, cfg)
    prompts = _prompts_for(pairs.where(F.col("error").isNull()), history, cfg, spark)
    (prompts.select("user_id", "item_id", "prompt").repartition(score_tasks(spark, cfg.score), "user_id")
     .sortWithinPartitions("user_id").write.mode("overwrite").parquet(path))
    return spark.read.parquet(path).count()


def backend_alone(spark, cfg, path: str) -> dict:
    """backend.score on the stored prompts, one call per Arrow batch, with the stage's
    per-task settings; only the calls are timed."""
    import pyarrow.parquet as pq

    from siren_batch.backends import load_backend

    score_cfg = dataclasses.replace(cfg.score, model=resolve_llm(cfg.score.model),
                                    torch_threads=task_threads(cfg.score.torch_threads, spark))
    backend = load_backend(score_cfg)
    seconds = cpu = 0.0
    pairs = calls = 0
    for part in sorted(Path(path).glob("part-*.parquet")):
        for batch in pq.ParquetFile(part).iter_batches(batch_size=cfg.spark.arrow_batch_size,
                                                       columns=["user_id", "prompt"]):
            prompts, users = batch.column("prompt").to_pylist(), batch.column("user_id").to_pylist()
            start, cpu_start = time.perf_counter(), time.process_time()
            backend.score(prompts, users)
            seconds += time.perf_counter() - start
            cpu += time.process_time() - cpu_start
            pairs, calls = pairs + len(prompts), calls + 1
    return {"pairs": pairs, "calls": calls, "seconds": seconds, "cpu_seconds": cpu,
            "torch_threads": score_cfg.torch_threads, "pairs_per_s": pairs / seconds if seconds else None,
            "stats": dict(backend.stats)}


# ---- kill halfway and start again ------------------------------------------------------

def kill_family(pid: int) -> None:
    """SIGKILL a process, its process group and all it started. Its driver JVM runs in a
    session of its own (siren_batch.spark), outside the group, so it is named here."""
    import psutil

    try:
        family = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(os.getpgid(pid), signal.SIGKILL)
    except ProcessLookupError:
        pass


def _child(overrides: list[str], kill_before_commit: int) -> int:
    """The score stage alone, in a process of its own (the parent SIGKILLs it); with
    kill_before_commit = k it kills itself and all it started, JVM included, just before
    committing chunk k + 1 (k chunks committed, the next one written to its tmp folder)."""
    from siren_batch import ratings

    if kill_before_commit:
        commit, commits = ratings.move_path, []

        def move_then_maybe_die(spark, src, dst):
            if "/chunks/" in dst:
                commits.append(dst)
                if len(commits) == kill_before_commit + 1:
                    kill_family(os.getpid())
            return commit(spark, src, dst)

        ratings.move_path = move_then_maybe_die
    cfg = load_config(overrides=overrides)
    pipeline.STAGES["score"](get_spark(cfg.spark), cfg)
    return 0


def kill_and_restart(spark, cfg, overrides: list[str], kill: str, log: Path) -> dict:
    """Run the stage in a subprocess, SIGKILL it with half the chunks committed (kill=poll:
    from outside, wherever it is then; kill=hook: at a chosen commit, deterministic),
    then run it again here. Returns what was committed at the kill and the restart's time."""
    import pyarrow.parquet as pq

    chunks_dir = Path(cfg.warehouse) / cfg.dataset / "_staging" / f"ratings-{cfg.score.run_date}" / "chunks"
    total = spark.read.parquet(cfg.score.candidates).count()
    n_chunks = max(1, math.ceil(total / cfg.score.chunk_rows))
    half = max(1, n_chunks // 2)
    command = [sys.executable, "-m", "siren_batch.bench_overhead", "--child",
               "--kill-before-commit", str(half if kill == "hook" else 0), *overrides]
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, start_new_session=True)
        try:
            while proc.poll() is None:
                if kill == "poll" and chunks_dir.is_dir() and len(list(chunks_dir.iterdir())) >= half:
                    break
                time.sleep(0.1)
        finally:
            kill_family(proc.pid)   # the driver, its JVM and the Python workers, as a dying machine would
            proc.wait()
    killed_after = time.perf_counter() - start
    if proc.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the killed run ended with {proc.returncode}, not SIGKILL: see {log}")
    committed = sorted(chunks_dir.iterdir()) if chunks_dir.is_dir() else []
    committed_rows = sum(pq.ParquetFile(f).metadata.num_rows for c in committed for f in c.glob("*.parquet"))
    restart = timed_stage(spark, cfg)
    return {"chunks": n_chunks, "committed_at_kill": len(committed), "rows_committed_at_kill": committed_rows,
            "kill": kill, "killed_after_s": round(killed_after, 1), "restart_s": round(restart["seconds"], 1),
            "restart_rows": restart["summary"]["rows"], "restart_summary": restart["summary"]}


def killed_stage(spark, cfg, overrides: list[str], kill: str, log: Path) -> tuple[dict, dict]:
    """The measured run itself, SIGKILLed with half its chunks committed and started again:
    (stage as timed_stage gives it, with seconds = both parts, the work lost at the kill
    included; its timers are the restart's, over the pairs the restart scored: timed_part),
    and kill_and_restart's record."""
    kill = kill_and_restart(spark, cfg, overrides, kill, log)
    summary = kill.pop("restart_summary")
    stage = {"seconds": kill["killed_after_s"] + kill["restart_s"], "summary": summary,
             "timed_part": {"seconds": kill["restart_s"], "pairs": summary["rows"] - kill["rows_committed_at_kill"]}}
    return stage, kill


def check_ratings(spark, cfg, run_date: str, reference_date: str | None = None) -> dict:
    """Rows, distinct pairs, pairs missing or extra against the candidates, errors, and the
    largest rating difference from the `reference_date` partition."""
    ratings = (read_table(spark, cfg, "ratings", schemas.RATINGS).where(F.col("run_date") == run_date)
               .select("user_id", "item_id", "rating", "error").cache())
    cands = spark.read.parquet(cfg.score.candidates)
    out = {"rows": ratings.count(), "distinct_pairs": ratings.select("user_id", "item_id").distinct().count(),
           "missing": cands.join(ratings, ["user_id", "item_id"], "left_anti").count(),
           "extra": ratings.join(cands, ["user_id", "item_id"], "left_anti").count(),
           "errors": ratings.where(F.col("error").isNotNull()).count()}
    if reference_date:
        ref = (read_table(spark, cfg, "ratings", schemas.RATINGS).where(F.col("run_date") == reference_date)
               .select("user_id", "item_id", F.col("rating").alias("_ref")))
        diff = ratings.join(ref, ["user_id", "item_id"], "inner").agg(
            F.count("*").alias("n"), F.max(F.abs(F.col("rating") - F.col("_ref"))).alias("d")).first()
        out.update(same_pairs_as_reference=diff.n, max_rating_diff_vs_reference=diff.d)
    ratings.unpersist()
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="1000000",
                        help="candidate pairs scored; several sizes (e.g. 40000,200000) add a linear fit")
    parser.add_argument("--per-user", type=int, default=166, help="candidates per user (6,040 users x 166 ~ 1M)")
    parser.add_argument("--work", default="bench/tmp/overhead", help="folder for the warehouse, model, inputs")
    parser.add_argument("--kill", choices=["poll", "hook", "none"], default="poll",
                        help="at the largest size: poll = SIGKILL from outside once half the chunks are "
                             "committed; hook = just before committing the chunk after half (deterministic)")
    parser.add_argument("--measure-killed", action="store_true",
                        help="at the largest size the measured run is the killed and restarted one (one run, "
                             "not two; its wall time is both parts): half the time of a separate kill run")
    parser.add_argument("--name", default="bench-score-overhead", help="results file under notebooks/benchmarks")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kill-before-commit", type=int, default=0, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    if args.child:
        return _child(overrides, args.kill_before_commit)
    work = Path(args.work) if Path(args.work).is_absolute() else REPO_ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    base = ["dataset=ml-1m", f"warehouse={work}/wh", "calibrate.enabled=false", *overrides]
    cfg = load_config(overrides=base)
    spark = get_spark(cfg.spark)
    payload = {"warehouse_build_s": build_warehouse(spark, cfg), "per_user": args.per_user,
               "model": {"layers": TINY["num_hidden_layers"], "hidden": TINY["hidden_size"]}, "sizes": {}}
    model, load_before = tiny_model(work / "model"), os.getloadavg()[0]
    sizes = [int(n) for n in args.pairs.split(",")]
    for pairs in sizes:
        run = [*base, f"score.model={model}", f"score.candidates={work}/candidates-{pairs}x{args.per_user}"]
        cfg = load_config(overrides=[*run, f"score.run_date={RUN_DATE}"])
        make_candidates(spark, cfg, pairs, args.per_user, cfg.score.candidates)
        _clear_staging(work / "wh" / cfg.dataset / "_staging")
        if args.measure_killed and args.kill != "none" and pairs == sizes[-1]:
            stage, payload["kill_restart"] = killed_stage(spark, cfg, [*run, f"score.run_date={RUN_DATE}"],
                                                          args.kill, work / "killed-run.log")
        else:
            stage = timed_stage(spark, cfg)
        stored = store_prompts(spark, cfg, f"{work}/prompts")
        alone = backend_alone(spark, cfg, f"{work}/prompts")
        payload.update(dataset=cfg.dataset, users=math.ceil(pairs / args.per_user), dtype=cfg.score.dtype,
                       arrow_batch_size=cfg.spark.arrow_batch_size, chunk_rows=cfg.score.chunk_rows,
                       figures=figures(pairs, stage, alone, stage.get("timed_part")), stage_summary=stage["summary"],
                       prompts_stored=stored, backend_alone=alone, ratings=check_ratings(spark, cfg, RUN_DATE))
        payload["sizes"][pairs] = payload["figures"]
        logger.info("bench-score-overhead at %d pairs: %s", pairs, json.dumps(payload["figures"]))
    if len(payload["sizes"]) > 1:
        payload["fit"] = linear_fit(payload["sizes"], 1_000_000)
    if "kill_restart" in payload:
        payload["kill_restart"]["ratings"] = payload["ratings"]
    elif args.kill != "none":
        killed = [*run, f"score.run_date={KILLED_RUN_DATE}"]
        kcfg = load_config(overrides=killed)
        payload["kill_restart"] = kill_and_restart(spark, kcfg, killed, args.kill, work / "killed-run.log")
        payload["kill_restart"].pop("restart_summary")
        payload["kill_restart"]["ratings"] = check_ratings(spark, kcfg, KILLED_RUN_DATE, RUN_DATE)
    payload["load_average_1min"] = {"before": round(load_before, 1), "after": round(os.getloadavg()[0], 1)}
    path = write_results(args.name, payload, markdown(payload))
    logger.info("bench-score-overhead: results in %s", path)
    return 0


def _clear_staging(folder: Path) -> None:
    """An earlier bench's leftover chunks would make the measured run resume, not score."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
