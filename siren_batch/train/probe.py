"""The probe: the cheapest trained scorer (`make train-probe`).

The frozen model's hidden states at the answer position (one forward pass per
pair, bf16 where the CPU has it) become features beside the baselines'
predictions and the as-of counts; the same scikit-learn pair as calibration
(siren_batch.train.calibrate: a multinomial distribution and a ridge point
estimate) is fit on the valid split and scores the test split. The result is a
`ratings` partition like any scorer's (model_id `probe:<model>`), so `evaluate`
judges it beside the LLM and the baselines; the fitted probe is stored in the
calibrator's folder (siren_batch.calibration.calibrator_dir), under probe/.

Runs on the driver: the valid sample (probe.valid_rows) and the split it scores
are collected there, which suits evaluation splits (thousands of pairs), not a
nightly million (use the calibrated scorer for that).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from siren_batch import schemas
from siren_batch.config import Config
from siren_batch.console import Progress
from siren_batch.warehouse import read_table, run_record, write_table

logger = logging.getLogger(__name__)

STATES_CHUNK = 128   # prompts per answer_states call: the progress line moves after each


def layer_indices(n_layers: int, fractions: list[float]) -> list[int]:
    """hidden_states indices (0 = embeddings, n_layers = the top) for depth fractions.

    >>> layer_indices(30, [1.0, 0.5])
    [30, 15]
    """
    return [min(n_layers, max(1, round(f * n_layers))) for f in fractions]


def _pairs(spark: SparkSession, cfg: Config, split: str, limit: int | None) -> DataFrame:
    pairs = (read_table(spark, cfg, "example_sketches", schemas.EXAMPLE_SKETCHES)
             .where(F.col("split") == split).withColumn("error", F.lit(None).cast("string")))
    if limit:
        pairs = pairs.orderBy(F.xxhash64("user_id", "item_id"), "user_id", "item_id").limit(limit)
    return pairs


def _frame(spark: SparkSession, cfg: Config, split: str, limit: int | None, backend, layers: list[int],
           als_params):
    """pandas: user_id, item_id, label, prompt_tokens, hidden, error + the pair features."""
    from siren_batch.features import KEY, split_features
    from siren_batch.ratings import _prompts_for

    pairs = _pairs(spark, cfg, split, limit)
    prompts = _prompts_for(pairs, read_table(spark, cfg, "interactions", schemas.INTERACTIONS), cfg, spark,
                           count_tokens=True)
    feats, als_params = split_features(spark, cfg, split, als_params)
    frame = (prompts.select(*KEY, "label", "prompt", "prompt_tokens").join(feats, on=KEY, how="left")
             .orderBy(*KEY).toPandas())
    start = time.perf_counter()
    hidden, errors = _states(backend, frame["prompt"].tolist(), layers,
                             Progress(len(frame), cfg.score.progress_every_s, f"probe {split}"))
    logger.info("probe: %d %s hidden states in %.1fs", len(frame), split, time.perf_counter() - start)
    frame["hidden"] = list(hidden)
    frame["error"] = errors
    return frame.drop(columns=["prompt"]), als_params


def _states(backend, prompts: list[str], layers: list[int], progress: Progress, chunk: int = STATES_CHUNK):
    """backend.answer_states over `prompts` a chunk at a time, so a long split shows its
    progress (rows, rows/s, ETA): (states, errors) in prompt order, as one call gives."""
    parts, errors = [], []
    for at in range(0, len(prompts), chunk):
        states, errs = backend.answer_states(prompts[at:at + chunk], layers)
        parts.append(states)
        errors += errs
        progress.update(len(errs))
    if not parts:
        return backend.answer_states([], layers)
    return np.concatenate(parts), errors


def _ratings(frame, probe, cfg: Config, model_id: str, run_id: str, run_date: str):
    import pandas as pd

    from siren_batch.prompts import prompt_template_hash

    ok = frame["error"].isna().to_numpy()
    probs, rating, median = probe.predict(frame[ok])
    full = np.full(len(frame), np.nan)
    cols = {name: full.copy() for name in ("rating", "rating_median", "rating_argmax")}
    cols["rating"][ok], cols["rating_median"][ok] = rating, median
    cols["rating_argmax"][ok] = probs.argmax(axis=1) + 1.0
    prob_lists = [None] * len(frame)
    for row, p in zip(np.flatnonzero(ok), probs):
        prob_lists[row] = [float(v) for v in p]
    return pd.DataFrame({"user_id": frame["user_id"], "item_id": frame["item_id"], **cols, "probs": prob_lists,
                         "prompt_tokens": frame["prompt_tokens"].astype("int32"), "output_tokens": 1,
                         "model_id": model_id, "adapter_id": cfg.score.adapter,
                         "prompt_template_hash": prompt_template_hash(cfg), "run_id": run_id, "error": frame["error"],
                         "calibrated_rating": None, "calibrated_median": None, "calibrated_probs": None,
                         "run_date": run_date})


def train_probe(spark: SparkSession, cfg: Config) -> dict:
    """Fit the probe on valid, score probe.split into ratings/run_date=probe.run_date."""
    from siren_batch.backends.transformers_backend import TransformersBackend
    from siren_batch.calibration import calibrator_dir, store
    from siren_batch.train.calibrate import fit_calibrator

    pc = cfg.probe
    with run_record(spark, cfg, "train-probe") as rec:
        backend = TransformersBackend(dataclasses.replace(cfg.score, dtype=pc.dtype, shared_prefix=False))
        layers = layer_indices(backend.model.config.num_hidden_layers, pc.layer_fractions)
        valid, als_params = _frame(spark, cfg, "valid", pc.valid_rows, backend, layers, None)
        fit_rows = valid[valid["error"].isna()]
        probe = fit_calibrator(fit_rows, ["hidden", *pc.features], cfg.calibrate.folds, cfg.calibrate.seed)
        probe.meta.update({"layers": layers, "als_params": list(als_params), "model": backend.model_id})
        folder = store(spark, probe, f"{calibrator_dir(cfg)}/probe")
        scored, _ = _frame(spark, cfg, pc.split, None, backend, layers, als_params)
        pdf = _ratings(scored, probe, cfg, f"probe:{backend.model_id}", rec.run_id, pc.run_date)
        out = spark.createDataFrame(pdf, schemas.RATINGS)
        rec.input_rows = len(valid) + len(scored)
        rec.output_rows = write_table(out, cfg, "ratings", schemas.RATINGS, partition_by=["run_date"])
    return {"probe": folder, "valid_rows": len(fit_rows), "scored": rec.output_rows, "run_date": pc.run_date,
            "layers": layers, "valid": probe.meta["out_of_fold"]}
