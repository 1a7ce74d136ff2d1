"""Rating prediction at the Spark edge: prompts in, SCORED rows out.

The backends (siren_batch.backends) turn prompts into distributions over the
rating scale; this module wraps them as a pandas function for mapInPandas, with
the backend loaded once per Python worker through the model cache.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Callable, Iterator

from pyspark.sql import types as T

from siren_batch import model_cache, schemas
from siren_batch.assets import resolve_llm
from siren_batch.backends import (SCALE, Backend, ScoreResult, ScoringError, load_backend,
                                  readout_median)
from siren_batch.config import ScoreConfig
from siren_batch.spark import task_config, task_threads
from siren_batch.timers import StageTimers

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame

logger = logging.getLogger(__name__)

# What score_frame returns: RATINGS minus the run bookkeeping the job adds
# (prompt_template_hash, run_id, run_date).
SCORED_COLUMNS = ("user_id", "item_id", "rating", "rating_median", "rating_argmax", "probs",
                  "prompt_tokens", "output_tokens", "model_id", "adapter_id", "error")
SCORED = T.StructType([schemas.RATINGS[name] for name in SCORED_COLUMNS])


def results_to_frame(batch: "pd.DataFrame", results: list[ScoreResult], backend: Backend) -> "pd.DataFrame":
    """One output row per input row, columns SCORED_COLUMNS (shared by every backend)."""
    import pandas as pd

    if len(results) != len(batch):
        raise ScoringError(f"backend returned {len(results)} results for {len(batch)} prompts")
    return pd.DataFrame({
        "user_id": batch["user_id"].to_numpy(),
        "item_id": batch["item_id"].to_numpy(),
        "rating": pd.array([r.rating for r in results], dtype="Float64"),
        # CoT: the parsed answer is the only point there is
        "rating_median": pd.array([r.rating if r.probs is None else float(readout_median(r.probs, SCALE))
                                   for r in results], dtype="Float64"),
        "rating_argmax": pd.array([r.rating_argmax for r in results], dtype="Float64"),
        "probs": [None if r.probs is None else [float(p) for p in r.probs] for r in results],
        "prompt_tokens": pd.array([r.prompt_tokens for r in results], dtype="Int32"),
        "output_tokens": pd.array([r.output_tokens for r in results], dtype="Int32"),
        "model_id": backend.model_id,
        "adapter_id": backend.adapter_id,
        "error": [r.error for r in results],
    }, columns=list(SCORED_COLUMNS))


# Settings that choose the work, not the model: another night or candidates file must reuse
# a worker's loaded model, not load a second one beside it.
NOT_BACKEND = ("candidates", "variant", "run_date", "limit", "partitions", "chunk_rows", "progress_every_s")


def backend_key(cfg: ScoreConfig) -> str:
    """The model-cache key of a scoring backend: every score setting but NOT_BACKEND.

    >>> backend_key(ScoreConfig(run_date="2026-01-01")) == backend_key(ScoreConfig(run_date="2026-01-02"))
    True
    >>> backend_key(ScoreConfig()) == backend_key(ScoreConfig(dtype="float32"))
    False
    """
    kept = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in NOT_BACKEND}
    return f"scoring.backend:{kept!r}"


def make_predict_fn(cfg: ScoreConfig, timers: StageTimers | None = None
                    ) -> Callable[["pd.DataFrame"], "pd.DataFrame"]:
    """Loader closure: the backend loads once per Python worker (model_cache), then
    `predict(batch)` maps (user_id, item_id, prompt) rows to SCORED_COLUMNS. `timers`
    gets the seconds of the backend's tokenizing (backend_tokenize), the rest of its
    call (backend_forward) and of building the output frame (score_results)."""
    # Resolved here, on the driver: "default" names a folder beside the repository, which
    # executors running the shipped zip cannot locate (on a cluster it must sit on storage
    # every executor reaches, or be a hub id).
    cfg = dataclasses.replace(cfg, model=resolve_llm(cfg.model))
    timers = timers or StageTimers()
    on_task_gpu = task_config(cfg)   # on a cluster with GPU scheduling: the task's own GPU

    def predict(batch: "pd.DataFrame") -> "pd.DataFrame":
        task_cfg = on_task_gpu()
        # one scoring model per device: a worker whose settings change between jobs swaps it
        backend = model_cache.get_or_load(backend_key(task_cfg), lambda: load_backend(task_cfg),
                                          slot=f"scoring:{task_cfg.device}")
        prompts = [p if isinstance(p, str) else "" for p in batch["prompt"]]  # null -> empty_prompt row
        stats = getattr(backend, "stats", {})
        encoded, start = stats.get("encode_s", 0.0), time.perf_counter()
        if cfg.mode == "cot":
            results = backend.generate_cot(prompts)
        else:
            results = backend.score(prompts, [str(u) for u in batch["user_id"]])
        scored, encoded = time.perf_counter(), stats.get("encode_s", 0.0) - encoded
        failed = sum(r.error is not None for r in results)
        if failed:
            logger.warning("%d of %d prompts failed to score in this batch", failed, len(results))
        frame = results_to_frame(batch, results, backend)
        timers.add("backend_tokenize", encoded)
        timers.add("backend_forward", scored - start - encoded)
        timers.add("score_results", time.perf_counter() - scored)
        return frame

    return predict


def score_frame(prompts: "DataFrame", cfg: ScoreConfig, timers: StageTimers | None = None) -> "DataFrame":
    """PROMPTS-like frame (user_id, item_id, prompt) -> SCORED rows, one per prompt.

    A user's prompts go to one of `score_tasks` partitions, next to each other, so
    they reach the backend in the same Arrow batch (shared prefix). The count is
    explicit because adaptive execution coalesces a small shuffle (thousands of
    prompts, a few MB) into ONE partition: one task, one core, one GPU busy.
    torch_threads=0 gives each task spark.task.cpus threads, the cores Spark
    reserves for it, so concurrent tasks do not oversubscribe the CPU. `timers` gets
    the seconds by phase (make_predict_fn), and the Arrow transfers (score_input, score_output).
    """
    spark = prompts.sparkSession
    cfg = dataclasses.replace(cfg, torch_threads=task_threads(cfg.torch_threads, spark))
    if cfg.backend == "vllm":   # several tasks on one GPU: each engine takes its share of the memory
        from siren_batch.backends.vllm_backend import shared_gpu_memory

        share = shared_gpu_memory(cfg.vllm_gpu_memory_utilization,
                                  spark.conf.get("spark.task.resource.gpu.amount", None))
        if share != cfg.vllm_gpu_memory_utilization:
            logger.info("score.vllm_gpu_memory_utilization %s -> %s: Spark runs tasks on a fraction of a GPU",
                        cfg.vllm_gpu_memory_utilization, share)
            cfg = dataclasses.replace(cfg, vllm_gpu_memory_utilization=share)
    timers = timers or StageTimers()
    predict = make_predict_fn(cfg, timers)

    def run(batches: Iterator["pd.DataFrame"]) -> Iterator["pd.DataFrame"]:
        yield from timers.map_batches(batches, predict, read="score_input", write="score_output")

    rows = prompts.select("user_id", "item_id", "prompt").repartition(score_tasks(spark, cfg), "user_id")
    if cfg.shared_prefix and cfg.mode == "answer_only":
        rows = rows.sortWithinPartitions("user_id")
    return rows.mapInPandas(run, schema=SCORED)


def score_tasks(spark, cfg: ScoreConfig) -> int:
    """Scoring partitions: score.partitions, else Spark's default parallelism (the
    cores of local mode; executors x cores on a cluster)."""
    return cfg.partitions or max(1, spark.sparkContext.defaultParallelism)
