"""The calibrated columns of the `ratings` table: fit on valid, apply where present.

    siren-batch score score.candidates=split:valid score.run_date=2026-11-01   # raw valid scores
    siren-batch calibrate calibrate.run_date=2026-11-01                         # fit, store in the warehouse
    siren-batch score                                                           # applies it: calibrated_* columns

The calibrator (siren_batch.train.calibrate) is stored in `calibrator_dir(cfg)`:
calibrate.path, else `<warehouse>/<dataset>/calibrators/<model>[__<adapter>]/`, through
Hadoop's FileSystem like the tables, so on a cluster the next night's driver finds it
wherever it runs (the model folder is only on the machines that load the model). It
records the prompt settings and model it was fit for; applying it to ratings of another
model, adapter, prompt variant or priors setting fails with one line instead of
producing quietly wrong numbers. `calibrate.apply_run_date` re-applies it to an already
scored partition (no second scoring pass). A calibrator that earlier versions left
beside the model (`<model folder>/calibration/<dataset>/`) is still read, with a
warning, until one is fit in the warehouse.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any, Iterator

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from siren_batch import schemas
from siren_batch.assets import AssetError, llm_id, models_dir, resolve_llm
from siren_batch.config import Config, ConfigError
from siren_batch.features import KEY, candidate_features, split_features
from siren_batch.prompts import prompt_settings, prompt_template_hash
from siren_batch.warehouse import (path_exists, read_bytes, read_table, read_text, run_record, write_bytes,
                                   write_table, write_text)

logger = logging.getLogger(__name__)

CALIBRATED = ["calibrated_rating", "calibrated_median", "calibrated_probs"]
VALID_RUN_DATE = "1970-01-01"   # score-calibrate's valid scores, when calibrate.run_date is unset


def calibrator_dir(cfg: Config) -> str:
    """calibrate.path, else the warehouse folder of this model (and adapter) on this dataset."""
    if cfg.calibrate.path:
        return cfg.calibrate.path
    model = llm_id("default") if cfg.score.model == "default" else cfg.score.model
    key = _slug(model) + (f"__{_slug(cfg.score.adapter)}" if cfg.score.adapter else "")
    return f"{cfg.table_path('calibrators')}/{key}"


def _slug(ref: str) -> str:
    """A folder name for a model reference: a bare name as it is; a hub id or a path by its
    last part, made safe, and a hash of the whole reference, so two never share a folder
    (Qwen/Qwen3-4B -> Qwen3-4B-<8 hex>; /models/run 7/export -> export-<8 hex>)."""
    last = ref.rstrip("/").rsplit("/", 1)[-1]
    safe = re.sub(r"[^A-Za-z0-9_-]+", "-", last).strip("-")[:80] or "model"
    if safe == ref:
        return safe
    return f"{safe}-{hashlib.sha1(ref.encode('utf-8')).hexdigest()[:8]}"


def _legacy_dir(cfg: Config) -> Path | None:
    """Where versions before the warehouse store kept it: beside the model, on the driver's disk."""
    if cfg.calibrate.path:
        return None
    try:
        base = cfg.score.adapter or resolve_llm(cfg.score.model)
    except AssetError:   # the default model not prepared: nothing can be stored beside it either
        return None
    if Path(base).is_dir():
        return Path(base) / "calibration" / cfg.dataset
    return models_dir() / "calibration" / str(base).replace("/", "--") / cfg.dataset


def store(spark: SparkSession, calibrator, folder: str) -> str:
    """Write calibrator.pkl and calibration.json (its meta) into `folder`, local or not."""
    write_bytes(spark, f"{folder}/calibrator.pkl", pickle.dumps(calibrator))
    write_text(spark, f"{folder}/calibration.json", json.dumps(calibrator.meta, indent=2, default=str) + "\n")
    return folder


def read_calibrator(spark: SparkSession, folder: str):
    return pickle.loads(read_bytes(spark, f"{folder}/calibrator.pkl"))


def stored_at(spark: SparkSession, cfg: Config) -> str | None:
    """The folder holding this model's calibrator for this dataset, or None. A path without a
    scheme is Hadoop's: on fs.defaultFS (HDFS on YARN), as for `warehouse`."""
    folder = calibrator_dir(cfg)
    if path_exists(spark, f"{folder}/calibrator.pkl"):
        return folder
    if cfg.calibrate.path and (Path(cfg.calibrate.path) / "calibrator.pkl").exists():
        logger.warning("calibrate.path=%s: no calibrator there on Hadoop's default filesystem, but this machine's "
                       "disk has one: to read it, set calibrate.path=%s", folder,
                       Path(cfg.calibrate.path).resolve().as_uri())
        return None
    legacy = _legacy_dir(cfg)
    if legacy is not None and (legacy / "calibrator.pkl").exists():
        logger.warning("reading the calibrator at %s, beside the model on this machine's disk; a fit now stores "
                       "it in the warehouse at %s, which every driver of a cluster reads: run `siren-batch "
                       "calibrate` once, or copy it there", legacy, folder)
        return legacy.resolve().as_uri()   # file://: a scheme-less path would go to fs.defaultFS
    return None


def fitted_for(cfg: Config) -> dict[str, Any]:
    """What a calibrator is only valid for: it is checked again when applied. The prompt
    hash covers the templates and every prompt setting (prompts.prompt_settings)."""
    return {"model": cfg.score.model, "adapter": cfg.score.adapter, "variant": cfg.score.variant,
            "priors": cfg.prompts.priors, "prompt_hash": prompt_template_hash(cfg), "dataset": cfg.dataset}


def load_if_present(spark: SparkSession, cfg: Config):
    """The stored calibrator for this model and dataset, or None; one-line error on a mismatch.
    Its meta's `loaded_from` says where it was read."""
    folder = stored_at(spark, cfg) if cfg.calibrate.enabled else None
    if folder is None:
        return None
    calibrator = read_calibrator(spark, folder)
    calibrator.meta["loaded_from"] = folder
    diff = _mismatch(cfg, calibrator)
    if diff:
        raise ValueError(f"calibrator at {folder} was fit for other settings {diff} (stored, now); refit it "
                         f"with `siren-batch calibrate` or set calibrate.enabled=false")
    return calibrator


def _mismatch(cfg: Config, calibrator) -> dict[str, tuple]:
    """{setting: (fit for, now)} for each setting of fitted_for that differs."""
    want, got = fitted_for(cfg), calibrator.meta.get("fitted_for", {})
    return {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}


def left_out_of_chains(cfg: Config) -> str | None:
    """Why `siren-batch all` and a night leave score-calibrate out, or None when they run it."""
    if not cfg.calibrate.enabled:
        return "calibrate.enabled=false"
    if not cfg.calibrate.in_chain:
        return "calibrate.in_chain=false"
    if cfg.score.mode == "cot":
        return "score.mode=cot has no rating distribution to calibrate"
    return None


def why_fit(spark: SparkSession, cfg: Config) -> str | None:
    """Why the calibrator folder needs a fit for cfg's model and prompts, or None when it
    holds one (the nightly calibrate step fits when this says so; one only beside the model,
    where earlier versions kept it, counts as none)."""
    folder = calibrator_dir(cfg)
    if not path_exists(spark, f"{folder}/calibrator.pkl"):
        return f"no calibrator stored at {folder}"
    diff = _mismatch(cfg, read_calibrator(spark, folder))
    return f"the calibrator at {folder} was fit for other settings {diff} (stored, now)" if diff else None


def _features(spark: SparkSession, cfg: Config, pairs: DataFrame, als_params) -> tuple[DataFrame, Any]:
    source = cfg.score.candidates
    if source.startswith("split:"):
        return split_features(spark, cfg, source.split(":", 1)[1], als_params)
    return candidate_features(spark, cfg, pairs, als_params), als_params


def _calibrator_features(spark: SparkSession, cfg: Config, ratings: DataFrame, calibrator) -> DataFrame:
    """The features of `ratings`' pairs for score.candidates, ALS as tuned when it was fit."""
    als = calibrator.meta.get("als_params")
    return _features(spark, cfg, ratings, tuple(als) if als else None)[0]


def apply_calibrator(spark: SparkSession, cfg: Config, ratings: DataFrame, calibrator,
                     feats: DataFrame | None = None) -> DataFrame:
    """`ratings` (RATINGS columns) with the calibrated_* columns filled for rows with probs;
    feats: the pairs' features when the caller has them (else built for score.candidates)."""
    if feats is None:
        feats = _calibrator_features(spark, cfg, ratings, calibrator)
    joined = ratings.drop(*[c for c in CALIBRATED if c in ratings.columns]).join(feats, on=KEY, how="left")
    schema = schemas.RATINGS

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        for pdf in batches:
            ok = pdf["probs"].notna() & pdf["error"].isna()
            out = pdf.assign(calibrated_rating=pd.array([None] * len(pdf), dtype="Float64"),
                             calibrated_median=pd.array([None] * len(pdf), dtype="Float64"),
                             calibrated_probs=[None] * len(pdf))
            if ok.any():
                probs, rating, median = calibrator.predict(pdf[ok])
                out.loc[ok, "calibrated_rating"] = rating
                out.loc[ok, "calibrated_median"] = median
                out.loc[ok, "calibrated_probs"] = pd.Series([list(map(float, p)) for p in probs],
                                                            index=out.index[ok])
            yield out[schema.names]

    return joined.mapInPandas(run, schema)


def _fit_frame(spark: SparkSession, cfg: Config) -> tuple[Any, tuple[int, float], str]:
    """Labelled valid pairs with the scores of calibrate.run_date and their features (pandas)."""
    ratings = read_table(spark, cfg, "ratings", schemas.RATINGS)
    run_date = cfg.calibrate.run_date or ratings.agg(F.max("run_date")).first()[0]
    if cfg.calibrate.apply_run_date:   # refused before the fit, not after it is stored
        _refuse_in_sample(cfg, cfg.calibrate.apply_run_date, run_date)
    scored = ratings.where((F.col("run_date") == run_date) & F.col("error").isNull())
    _check_scored_by(scored, cfg, run_date)
    truth = (read_table(spark, cfg, "interactions", schemas.INTERACTIONS)
             .where(F.col("split") == "valid").select(*KEY, F.col("rating").alias("label")))
    labelled = scored.select(*KEY, "probs", "rating", "rating_median").join(truth, on=KEY, how="inner").cache()
    n_valid, n_scored = labelled.count(), scored.count()
    # A sampled valid run (score.limit) is fine; a partition of other pairs is not. Checked
    # before the features, whose ALS grid search is the stage's slow part.
    if n_valid < 0.5 * n_scored or not n_valid:
        labelled.unpersist()
        raise ValueError(f"ratings run_date={run_date}: only {n_valid} of its {n_scored} scored rows are valid "
                         f"pairs: score split:valid first "
                         f"(siren-batch score score.candidates=split:valid score.run_date=...), or name the "
                         f"partition that holds them (`siren-batch all` scores them into "
                         f"calibrate.run_date={VALID_RUN_DATE})")
    feats, als_params = split_features(spark, cfg, "valid")
    pairs = labelled.join(feats, on=KEY, how="left")
    if cfg.calibrate.max_rows:
        pdf = pairs.orderBy(F.xxhash64(*KEY)).limit(cfg.calibrate.max_rows).toPandas()
    else:
        pdf = pairs.toPandas()
    labelled.unpersist()
    return pdf, als_params, run_date


def _check_scored_by(scored: DataFrame, cfg: Config, run_date: str) -> None:
    """The partition must hold the scores of the model, adapter and prompts the calibrator is
    stored for (fitted_for); a calibrator fit on another model's scores, or on prompts with
    priors, would be applied to this one's."""
    want = (llm_id(cfg.score.model), cfg.score.adapter)
    seen = {(r.model_id, r.adapter_id, r.prompt_template_hash)
            for r in scored.select("model_id", "adapter_id", "prompt_template_hash").distinct().collect()}
    models = {s[:2] for s in seen}
    if models - {want}:
        raise ValueError(f"ratings run_date={run_date} were scored by (model_id, adapter_id) "
                         f"{sorted(models, key=str)}, not {want}: calibrate with the score.model and score.adapter "
                         "that scored it")
    mine = prompt_template_hash(cfg)
    prompts = {s[2] for s in seen} - {mine}
    if prompts:
        raise ValueError(f"ratings run_date={run_date} were scored from other prompts (prompt_template_hash "
                         f"{sorted(prompts)}, not {mine} of {prompt_settings(cfg)}): calibrate "
                         "with the score.variant, score.mode and prompts.* settings that scored it")


def score_valid(spark: SparkSession, cfg: Config) -> tuple[Config, dict]:
    """score-calibrate's first half: score the valid split into calibrate.run_date (VALID_RUN_DATE
    when unset), calibrate.chain_rows pairs at most (score.limit's when fewer); returns the config
    to fit with (its calibrate.run_date names that partition) and the score stage's summary."""
    from siren_batch.ratings import score_run

    run_date = cfg.calibrate.run_date or VALID_RUN_DATE
    limits = [n for n in (cfg.calibrate.chain_rows, cfg.score.limit) if n]
    # The stored calibrator is not applied there (valid columns would be in-sample) nor checked:
    # it is the one about to be replaced.
    valid = dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, candidates="split:valid", run_date=run_date,
                                                               limit=min(limits) if limits else None),
                                calibrate=dataclasses.replace(cfg.calibrate, enabled=False))
    logger.info("calibrate: scoring split:valid into ratings/run_date=%s (%s pairs at most)", run_date,
                valid.score.limit or "all")
    summary = score_run(spark, valid)
    # apply_run_date is for `siren-batch calibrate` (a partition scored before): the chain's own
    # score stage applies the new calibrator.
    fit = dataclasses.replace(cfg.calibrate, run_date=run_date, apply_run_date=None)
    return dataclasses.replace(cfg, calibrate=fit), summary


def score_and_calibrate(spark: SparkSession, cfg: Config) -> dict:
    """The stage `score-calibrate` (`siren-batch all`'s when calibrate.in_chain): score_valid, then
    calibrate on those scores. Too few of them to fit on (a smoke test's score.limit=10) is a
    warning, not a failed chain: the score stage then applies what is stored, if anything."""
    from siren_batch.train.calibrate import min_rows

    if cfg.score.mode == "cot":   # refused before a thousand chains of thought are generated
        raise ConfigError("score-calibrate fits the rating-token distribution of answer-only scoring; "
                          "score.mode=cot has none (set score.mode=answer_only, or calibrate.in_chain=false)")
    cfg, scored = score_valid(spark, cfg)
    usable, need = scored["rows"] - scored["errors"], min_rows(cfg.calibrate.folds)
    if usable < need:
        why = (f"{usable} valid pairs scored without error, a fit needs {need} (10 x calibrate.folds): "
               f"not fitted (raise score.limit or calibrate.chain_rows)")
        logger.warning("score-calibrate: %s; the score stage applies the calibrator stored at %s, if any",
                       why, calibrator_dir(cfg))
        return {"skipped": why, "valid_scored": scored}
    return {**calibrate(spark, cfg), "valid_scored": scored}


def calibrate(spark: SparkSession, cfg: Config) -> dict:
    """The stage: fit on valid, store in the warehouse, optionally re-apply to a partition."""
    from siren_batch.train.calibrate import fit_calibrator

    with run_record(spark, cfg, "calibrate") as rec:
        frame, als_params, run_date = _fit_frame(spark, cfg)
        rec.input_rows = len(frame)
        calibrator = fit_calibrator(frame, cfg.calibrate.features, cfg.calibrate.folds, cfg.calibrate.seed)
        calibrator.meta.update({"fitted_for": fitted_for(cfg), "als_params": list(als_params),
                                "valid_run_date": run_date, "config_hash": cfg.hash(),
                                "warehouse": cfg.warehouse, "sample_users": cfg.data.sample_users})
        _say_what_is_replaced(spark, calibrator_dir(cfg), calibrator.meta)
        folder = store(spark, calibrator, calibrator_dir(cfg))
        summary = {"calibrator": folder, "rows": len(frame), "valid": calibrator.meta}
        if cfg.calibrate.apply_run_date:
            summary["applied"] = _reapply(spark, cfg, calibrator, cfg.calibrate.apply_run_date)
        rec.output_rows = summary.get("applied", 0)
    return summary


def _say_what_is_replaced(spark: SparkSession, folder: str, new: dict) -> None:
    """One calibrator per model and dataset: the last fit wins. Say so when a fit on fewer rows,
    or on another warehouse (one calibrate.path shared by two), replaces one (a demo's 100 rows
    over a full run's)."""
    path = f"{folder}/calibration.json"
    if not path_exists(spark, path):
        return
    try:
        old = json.loads(read_text(spark, path))
    except ValueError:
        return
    if old.get("rows", 0) > new["rows"] or old.get("warehouse", new["warehouse"]) != new["warehouse"]:
        logger.warning("replacing the calibrator at %s, fit on %s valid rows of %s, with one fit on %d rows of %s "
                       "(set calibrate.path to keep both)", folder, old.get("rows"),
                       old.get("warehouse", "an unrecorded warehouse"), new["rows"], new["warehouse"])


def _refuse_in_sample(cfg: Config, apply_run_date: str, valid_run_date: str | None) -> None:
    """Calibrated columns on the valid pairs would be in-sample: the calibrator was fit on them."""
    if cfg.score.candidates == "split:valid" or apply_run_date == valid_run_date:
        raise ValueError(f"calibrate.apply_run_date={apply_run_date}: the calibrator is fit on the valid pairs, "
                         "so calibrated columns there would be in-sample; apply it to a test or nightly partition")


def _reapply(spark: SparkSession, cfg: Config, calibrator, run_date: str) -> int:
    """The calibrated columns of an already scored partition: scored by the model and
    adapter the calibrator was fit for, its features built for score.candidates (which
    must be what the partition scored: its pairs must all be there)."""
    _refuse_in_sample(cfg, run_date, calibrator.meta.get("valid_run_date"))
    ratings = read_table(spark, cfg, "ratings", schemas.RATINGS).where(F.col("run_date") == run_date)
    _check_scored_by(ratings.where(F.col("error").isNull()), cfg, run_date)   # the model it was fit for
    feats = _calibrator_features(spark, cfg, ratings, calibrator).cache()
    n, found = ratings.count(), ratings.join(feats.select(*KEY), on=KEY, how="left_semi").count()
    if found < n:
        feats.unpersist()
        raise ValueError(f"ratings run_date={run_date}: {n - found} of its {n} pairs are not among "
                         f"score.candidates={cfg.score.candidates}: set score.candidates to what that run scored")
    out = apply_calibrator(spark, cfg, ratings, calibrator, feats).localCheckpoint()
    feats.unpersist()
    return write_table(out, cfg, "ratings", schemas.RATINGS, partition_by=["run_date"])
