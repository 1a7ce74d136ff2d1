"""Calibration: the scikit-learn models on synthetic frames, then the Spark edge
(fit on a valid partition, store, re-apply, refuse a mismatched calibrator)."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pandas as pd
import pytest

from siren_batch.train.calibrate import feature_matrix, fit_calibrator


def _frame(n: int, seed: int = 0, llm_signal: float = 1.5) -> pd.DataFrame:
    """Labels driven by a bias-like feature; the LLM's logits carry extra signal."""
    rng = np.random.default_rng(seed)
    bias = rng.uniform(2.0, 4.5, n)
    label = np.clip(np.round(bias + rng.normal(0, 0.9, n)), 1, 5)
    logits = rng.normal(0, 1, (n, 5))
    logits[np.arange(n), (label - 1).astype(int)] += llm_signal
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return pd.DataFrame({"label": label, "probs": list(probs), "bias": bias, "als": bias + rng.normal(0, .1, n),
                         "n_history": rng.integers(0, 50, n), "item_count": rng.integers(0, 300, n),
                         "user_mean": np.where(rng.random(n) < .2, np.nan, bias), "item_mean": bias})


def test_calibrated_distribution_is_on_the_scale_and_sums_to_one():
    cal = fit_calibrator(_frame(400), ["llm", "baselines", "counts"], folds=4)
    probs, rating, median = cal.predict(_frame(50, seed=1))
    assert probs.shape == (50, 5) and np.all(probs >= 0) and np.allclose(probs.sum(1), 1.0)
    assert np.all((rating >= 1) & (rating <= 5)) and set(median) <= {1.0, 2.0, 3.0, 4.0, 5.0}


def test_calibration_beats_the_raw_readout_out_of_fold():
    cal = fit_calibrator(_frame(500), ["llm", "baselines"], folds=5)
    oof, raw = cal.meta["out_of_fold"], cal.meta["raw"]
    assert oof["rmse"] < raw["rmse"] and oof["nll"] < raw["nll"] and oof["median_mae"] < raw["median_mae"]
    assert cal.meta["without_llm"]["nll"] > oof["nll"]   # the synthetic LLM carries signal: the ablation shows it


def test_raw_metrics_read_the_score_stages_readouts():
    frame = _frame(200)
    frame["rating"], frame["rating_median"] = frame["label"], frame["label"]   # the stage's readouts, exact here
    raw = fit_calibrator(frame, ["llm"], folds=2).meta["raw"]
    assert raw["mae"] == raw["rmse"] == raw["median_mae"] == 0.0 and raw["nll"] > 0
    assert fit_calibrator(_frame(200), ["llm"], folds=2).meta["raw"]["mae"] > 0.3   # from probs without them


def test_a_scale_point_absent_from_valid_keeps_probability_zero():
    frame = _frame(300)
    frame = frame[frame["label"] != 1.0].reset_index(drop=True)
    cal = fit_calibrator(frame, ["llm"], folds=3)
    probs, _, _ = cal.predict(_frame(20, seed=2))
    assert np.all(probs[:, 0] == 0.0) and np.allclose(probs.sum(1), 1.0)


def test_the_calibrator_lives_in_the_warehouse_and_round_trips(spark, tmp_path, caplog, monkeypatch):
    """Stored through Hadoop's FileSystem under <warehouse>/<dataset>/calibrators/<model>, so the
    next night's driver finds it on whichever node it runs (a file:// URI stands in for hdfs://);
    one left beside the model by earlier versions is still read, with a warning."""
    from siren_batch.calibration import calibrator_dir, fitted_for, load_if_present, store
    from siren_batch.config import load_config

    monkeypatch.setenv("SIREN_MODELS_DIR", str(tmp_path / "models"))
    (tmp_path / "models" / "smollm2-135m-instruct").mkdir(parents=True)
    (tmp_path / "models" / "smollm2-135m-instruct" / "config.json").write_text("{}")
    warehouse = f"file://{tmp_path}/wh"
    cfg = load_config(overrides=[f"warehouse={warehouse}"])
    assert calibrator_dir(cfg) == f"{warehouse}/ml-100k/calibrators/smollm2-135m-instruct"
    hub = load_config(overrides=[f"warehouse={warehouse}", "score.model=Qwen/Qwen3-4B", "score.adapter=/m/kv lora"])
    assert re.search(r"/ml-100k/calibrators/Qwen3-4B-[0-9a-f]{8}__kv-lora-[0-9a-f]{8}$", calibrator_dir(hub))
    other_org = load_config(overrides=[f"warehouse={warehouse}", "score.model=Other/Qwen3-4B"])
    assert calibrator_dir(other_org) != calibrator_dir(hub).split("__")[0]        # never one folder for two
    assert load_if_present(spark, cfg) is None
    cal = fit_calibrator(_frame(200), ["llm", "counts"], folds=2)
    cal.meta["fitted_for"] = fitted_for(cfg)
    store(spark, cal, calibrator_dir(cfg))
    stored = tmp_path / "wh" / "ml-100k" / "calibrators" / "smollm2-135m-instruct"
    assert sorted(p.name for p in stored.iterdir() if not p.name.startswith(".")) == ["calibration.json",
                                                                                      "calibrator.pkl"]
    assert (stored / "calibration.json").read_text().count('"fitted_for"') == 1
    again = load_if_present(spark, cfg)
    assert again.meta["loaded_from"] == calibrator_dir(cfg)
    test = _frame(30, seed=3)
    for a, b in zip(cal.predict(test), again.predict(test)):
        np.testing.assert_array_equal(a, b)
    # Earlier versions' place, beside the model: read with a warning while the warehouse has none.
    elsewhere = load_config(overrides=[f"warehouse={tmp_path / 'other'}"])
    legacy = tmp_path / "models" / "smollm2-135m-instruct" / "calibration" / "ml-100k"
    assert load_if_present(spark, elsewhere) is None
    store(spark, cal, str(legacy))
    caplog.clear()
    assert load_if_present(spark, elsewhere).meta["loaded_from"] == legacy.as_uri()   # not fs.defaultFS's
    assert "beside the model on this machine's disk" in caplog.text and calibrator_dir(elsewhere) in caplog.text
    assert load_if_present(spark, cfg).meta["loaded_from"] == calibrator_dir(cfg)   # the warehouse's wins
    # calibrate.path on this disk while Hadoop's default filesystem is another (HDFS on YARN):
    # nothing is applied, and the warning says how to name this disk.
    mine = load_config(overrides=[f"warehouse={warehouse}", f"calibrate.path={legacy}"])
    assert load_if_present(spark, mine) is not None
    monkeypatch.setattr("siren_batch.calibration.path_exists", lambda *_: False)
    caplog.clear()
    assert load_if_present(spark, mine) is None
    assert f"to read it, set calibrate.path={legacy.as_uri()}" in caplog.text


def test_bad_inputs_fail_with_a_reason():
    with pytest.raises(ValueError, match="use one or more of llm, baselines, counts"):
        feature_matrix(_frame(5), ["llm", "probe"])
    with pytest.raises(ValueError, match="at least 50 labelled rows"):
        fit_calibrator(_frame(20), ["llm"], folds=5)
    off = _frame(100).assign(label=lambda f: f["label"] - 0.5)   # a 1 becomes 0.5
    with pytest.raises(ValueError, match=r"calibration labels \[0.5\] lie off the scale 1-5"):
        fit_calibrator(off, ["llm"], folds=2)


def test_a_half_star_label_counts_half_for_each_neighbour():
    """Labels between scale points (half stars; another scale mapped onto 1-5) are fit as their
    two-hot distributions: with nothing to learn, every 3.5 gives p(3) = p(4) = 0.5."""
    cal = fit_calibrator(_frame(200).assign(label=3.5), ["llm"], folds=2, cs=(0.01,))
    probs, rating, _ = cal.predict(_frame(20, seed=2))
    assert cal.classes == [3.0, 4.0] and np.allclose(probs[:, 2:4], 0.5, atol=0.05) and np.allclose(rating, 3.5)
    assert cal.meta["out_of_fold"]["nll"] == pytest.approx(math.log(2), abs=0.01)   # the two-hot cross-entropy


def test_a_split_label_row_counts_once_in_the_scaler():
    """A 3.5 label is two weighted rows (3 and 4): the features' mean and spread still count the
    row once, as they do for whole-point labels."""
    from siren_batch.train.calibrate import _fit_distribution

    x = np.array([[0.0], [0.0], [10.0], [10.0]])
    scaler = _fit_distribution(1.0, 0, x, np.array([3.5, 3.5, 2.0, 5.0]))[0]
    assert scaler.mean_[0] == pytest.approx(5.0) and scaler.scale_[0] == pytest.approx(5.0)


# ---- the Spark edge ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_warehouse(spark, tmp_path_factory):
    """_write_warehouse's tables, written once per module (~10 s of Spark jobs for 240 rows):
    (the warehouse folder, its interaction rows). Each test copies the folder (_warehouse)."""
    from siren_batch.config import load_config

    folder = tmp_path_factory.mktemp("calibrate-wh")
    return folder, _write_warehouse(spark, load_config(overrides=[f"warehouse={folder}"]))


def _warehouse(small_warehouse, cfg) -> list[tuple]:
    """A copy of small_warehouse at cfg.warehouse (default dataset); its interaction rows."""
    import shutil

    folder, rows = small_warehouse
    shutil.copytree(folder, cfg.warehouse)
    return rows


def _write_warehouse(spark, cfg):
    """40 users x 6 items: 4 train ratings each, then a valid and a test one; topics trivial."""
    from siren_batch import schemas
    from siren_batch.config import SketchesConfig
    from siren_batch.sketches import example_sketches, serving_sketches
    from siren_batch.warehouse import write_table

    rng = np.random.default_rng(0)
    rows = []
    for u in range(40):
        items = rng.permutation(6)
        for k, split in enumerate(["train"] * 4 + ["valid", "test"]):
            rating = float(np.clip(round(2 + items[k] * 0.6 + rng.normal(0, 0.7)), 1, 5))
            rows.append((f"u{u}", f"i{items[k]}", rating, 1000 * u + 10 * k, split))
    inter = spark.createDataFrame(rows, schemas.INTERACTIONS)
    items = spark.createDataFrame([(f"i{i}", f"Title {i}", "Drama", f"Title {i}.") for i in range(6)], schemas.ITEMS)
    item_topics = spark.createDataFrame([(f"i{i}", i % 2, 0.1) for i in range(6)], schemas.ITEM_TOPICS)
    topics = spark.createDataFrame([(0, "a", 3, [0.0]), (1, "b", 3, [0.0])], schemas.TOPICS)
    write_table(inter, cfg, "interactions", schemas.INTERACTIONS)
    write_table(items, cfg, "items", schemas.ITEMS)
    write_table(example_sketches(inter, items, item_topics, topics, SketchesConfig()), cfg, "example_sketches",
                schemas.EXAMPLE_SKETCHES)
    write_table(serving_sketches(inter, items, item_topics, topics, SketchesConfig()), cfg, "sketches",
                schemas.SKETCHES)
    return rows


def _ratings(spark, cfg, rows, split, run_date, model_id="smollm2-135m-instruct"):
    """Raw scores whose distribution leans on the true rating, one error row; scored by
    model_id (the default model's, as the score stage writes it) from cfg's prompts."""
    from pyspark.sql import functions as F

    from siren_batch import schemas
    from siren_batch.prompts import prompt_template_hash
    from siren_batch.warehouse import write_table

    rng = np.random.default_rng(1)
    out = []
    for u, i, rating, _, s in rows:
        if s != split:
            continue
        logits = rng.normal(0, 1, 5)
        logits[int(rating) - 1] += 1.0
        p = (np.exp(logits) / np.exp(logits).sum()).tolist()
        err = "prompt_too_long: 9 tokens > 8" if u == "u0" else None
        out.append((u, i, None if err else float(np.dot(p, range(1, 6))), None, None, None if err else p,
                    10, 1, model_id, None, prompt_template_hash(cfg), "r", err, None, None, None, run_date))
    frame = spark.createDataFrame(out, schemas.RATINGS).withColumn("run_date", F.lit(run_date))
    write_table(frame, cfg, "ratings", schemas.RATINGS, partition_by=["run_date"])


def test_calibrate_stage_fits_on_valid_and_fills_the_test_partition(spark, tmp_path, small_warehouse):
    from pyspark.sql import functions as F

    from siren_batch import schemas
    from siren_batch.calibration import _fit_frame, _reapply, calibrate, load_if_present
    from siren_batch.config import load_config
    from siren_batch.warehouse import read_table

    cfg = load_config(overrides=[f"warehouse={tmp_path / 'wh'}", f"calibrate.path={tmp_path / 'cal'}",
                                 "calibrate.folds=2", "calibrate.run_date=2026-01-01",
                                 "calibrate.apply_run_date=2026-01-02", "evaluate.als_ranks=[2]",
                                 "evaluate.als_reg_params=[0.1]", "evaluate.als_max_iter=3"])
    rows = _warehouse(small_warehouse, cfg)
    _ratings(spark, cfg, rows, "valid", "2026-01-01")
    _ratings(spark, cfg, rows, "test", "2026-01-02")
    summary = calibrate(spark, cfg)
    assert summary["rows"] == 39 and summary["applied"] == 40          # u0's valid row is an error row
    assert summary["valid"]["fitted_for"]["priors"] is False and summary["valid"]["als_params"] == [2, 0.1]
    test = read_table(spark, cfg, "ratings", schemas.RATINGS).where(F.col("run_date") == "2026-01-02").collect()
    for r in test:
        if r.error:
            assert r.calibrated_rating is None and r.calibrated_probs is None
        else:
            assert 1 <= r.calibrated_rating <= 5 and abs(sum(r.calibrated_probs) - 1) < 1e-9
            assert r.calibrated_median in (1.0, 2.0, 3.0, 4.0, 5.0)
    assert sum(r.error is None for r in test) == 39
    # re-applied with features for other pairs than the partition scored: one line, nothing written
    _ratings(spark, cfg, rows, "valid", "2026-01-03")   # the valid pairs again, in another run
    elsewhere = dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, candidates="split:test"))
    with pytest.raises(ValueError, match="40 of its 40 pairs are not among score.candidates=split:test"):
        _reapply(spark, elsewhere, load_if_present(spark, cfg), "2026-01-03")
    # ... or to the valid pairs it was fit on: calibrated columns there would be in-sample
    in_sample = dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, candidates="split:valid"))
    for run_cfg, run_date in ((in_sample, "2026-01-02"), (cfg, "2026-01-01")):
        with pytest.raises(ValueError, match="calibrated columns there would be in-sample"):
            _reapply(spark, run_cfg, load_if_present(spark, cfg), run_date)
    # Asked to apply it to the valid run itself: refused before anything is fit or stored.
    early = load_config(overrides=[f"warehouse={tmp_path / 'wh'}", f"calibrate.path={tmp_path / 'cal6'}",
                                   "calibrate.run_date=2026-01-01", "calibrate.apply_run_date=2026-01-01"])
    with pytest.raises(ValueError, match="calibrated columns there would be in-sample"):
        calibrate(spark, early)
    assert not (tmp_path / "cal6").exists()
    # Fit with a prompt setting the valid run did not use (priors forgotten, or added): refused.
    forgot = load_config(overrides=[f"warehouse={tmp_path / 'wh'}", f"calibrate.path={tmp_path / 'cal5'}",
                                    "calibrate.run_date=2026-01-01", "prompts.priors=true"])
    with pytest.raises(ValueError, match=r"were scored from other prompts .*'priors': True.*calibrate with the "
                                         r"score.variant, score.mode and prompts.\* settings that scored it"):
        calibrate(spark, forgot)
    other = load_config(overrides=[f"warehouse={tmp_path / 'wh'}", f"calibrate.path={tmp_path / 'cal'}",
                                   "prompts.priors=true"])
    with pytest.raises(ValueError, match="was fit for other settings .*priors"):
        load_if_present(spark, other)
    assert load_if_present(spark, load_config(overrides=[f"calibrate.path={tmp_path / 'cal'}",
                                                         "calibrate.enabled=false"])) is None
    wrong = load_config(overrides=[f"warehouse={tmp_path / 'wh'}", f"calibrate.path={tmp_path / 'cal2'}",
                                   "calibrate.run_date=2026-01-02", "calibrate.folds=2"])
    with pytest.raises(ValueError, match="only 0 of its 39 scored rows are valid pairs: score split:valid first"):
        calibrate(spark, wrong)
    other_adapter = load_config(overrides=[f"warehouse={tmp_path / 'wh'}", f"calibrate.path={tmp_path / 'cal3'}",
                                           "calibrate.run_date=2026-01-01", f"score.adapter={tmp_path / 'adapter'}"])
    with pytest.raises(ValueError, match=r"were scored by .*\('smollm2-135m-instruct', None\)\], not "
                                         r"\('smollm2-135m-instruct', '.*adapter'\)"):
        calibrate(spark, other_adapter)
    with pytest.raises(ValueError, match="were scored by"):                  # re-applying checks it too
        _reapply(spark, other_adapter, load_if_present(spark, cfg), "2026-01-02")
    # a sample of the valid pairs, smaller than half of them
    sampled = load_config(overrides=[f"warehouse={tmp_path / 'wh'}", f"calibrate.path={tmp_path / 'cal4'}",
                                     "calibrate.run_date=2026-01-01", "calibrate.max_rows=12", "calibrate.folds=2",
                                     "evaluate.als_ranks=[2]", "evaluate.als_reg_params=[0.1]",
                                     "evaluate.als_max_iter=3"])
    frame, _, _ = _fit_frame(spark, sampled)
    assert len(frame) == 12 and frame["label"].notna().all()


def test_score_calibrate_scores_valid_then_fits_and_all_runs_it_before_score(spark, tmp_path, long_tiny_model,
                                                                             small_warehouse):
    """`siren-batch all`'s calibration: valid scores into their own partition (calibrate.chain_rows
    pairs, no calibrated columns: in-sample there), the fit on them, then a score run that
    fills the calibrated columns; the chain leaves it out when asked to."""
    from pyspark.sql import functions as F

    from siren_batch import pipeline, schemas
    from siren_batch.calibration import VALID_RUN_DATE
    from siren_batch.config import ConfigError, load_config
    from siren_batch.warehouse import read_table

    args = [f"warehouse={tmp_path / 'wh'}", f"calibrate.path={tmp_path / 'cal'}", f"score.model={long_tiny_model}",
            "score.device=cpu", "score.dtype=float32", "score.run_date=2026-03-02", "calibrate.folds=2",
            "calibrate.chain_rows=30", "evaluate.als_ranks=[2]", "evaluate.als_reg_params=[0.1]",
            "evaluate.als_max_iter=3"]
    cfg = load_config(overrides=args)
    rows = _warehouse(small_warehouse, cfg)
    assert pipeline.chain("all", cfg) == [*pipeline.SKETCH_CHAIN, "score-calibrate", "score", "evaluate"]
    for off in ("calibrate.in_chain=false", "calibrate.enabled=false"):
        assert pipeline.chain("all", load_config(overrides=[*args, off])) == pipeline.FULL_CHAIN
    assert pipeline.chain("sketch-chain", cfg) == pipeline.SKETCH_CHAIN
    cot = load_config(overrides=[*args, "score.mode=cot"])   # no rating distribution to calibrate
    assert pipeline.chain("all", cot) == pipeline.FULL_CHAIN
    with pytest.raises(ConfigError, match="score.mode=cot has none"):
        pipeline.STAGES["score-calibrate"](spark, cot)

    few = load_config(overrides=[*args, "score.limit=5", f"calibrate.path={tmp_path / 'few'}"])
    skipped = pipeline.STAGES["score-calibrate"](spark, few)           # a smoke test's limit: a warning
    assert skipped["valid_scored"]["rows"] == 5 and "5 valid pairs scored without error, a fit needs 20" in \
        skipped["skipped"] and not (tmp_path / "few").exists()

    summary = pipeline.STAGES["score-calibrate"](spark, cfg)
    assert summary["valid_scored"]["run_date"] == VALID_RUN_DATE and summary["valid_scored"]["rows"] == 30
    assert summary["rows"] == 30 and summary["valid"]["valid_run_date"] == VALID_RUN_DATE
    ratings = read_table(spark, cfg, "ratings", schemas.RATINGS)
    valid = ratings.where(F.col("run_date") == VALID_RUN_DATE).collect()
    valid_pairs = {(u, i) for u, i, _, _, split in rows if split == "valid"}
    assert len(valid) == 30 and {(r.user_id, r.item_id) for r in valid} <= valid_pairs
    assert all(r.error is None and r.probs and r.calibrated_rating is None for r in valid)

    assert pipeline.score(spark, cfg)["rows"] == 40
    test = read_table(spark, cfg, "ratings", schemas.RATINGS).where(F.col("run_date") == "2026-03-02").collect()
    assert len(test) == 40 and all(1 <= r.calibrated_rating <= 5 and abs(sum(r.calibrated_probs) - 1) < 1e-9
                                   for r in test)


def test_a_fit_says_when_it_replaces_a_larger_one_or_another_warehouses(spark, tmp_path, caplog):
    import json

    from siren_batch.calibration import _say_what_is_replaced

    _say_what_is_replaced(spark, str(tmp_path), {"rows": 100, "warehouse": "/wh"})   # nothing stored: nothing said
    (tmp_path / "calibration.json").write_text(json.dumps({"rows": 943, "warehouse": "/wh"}))
    for new, said in (({"rows": 943, "warehouse": "/wh"}, False), ({"rows": 2000, "warehouse": "/wh"}, False),
                      ({"rows": 100, "warehouse": "/wh"}, True), ({"rows": 943, "warehouse": "/demo"}, True)):
        caplog.clear()
        _say_what_is_replaced(spark, str(tmp_path), new)
        assert ("fit on 943 valid rows of /wh" in caplog.text) is said, new


def test_valid_features_reuse_the_tuned_als_fit(spark, tmp_path, small_warehouse):
    """The valid split's ALS column is the grid search's own fit, not a refit: the same
    numbers as a refit with the chosen (rank, reg)."""
    from siren_batch.config import load_config
    from siren_batch.features import split_features

    cfg = load_config(overrides=[f"warehouse={tmp_path / 'wh'}", "evaluate.als_ranks=[2]",
                                 "evaluate.als_reg_params=[0.1]", "evaluate.als_max_iter=3"])
    _warehouse(small_warehouse, cfg)
    tuned, params = split_features(spark, cfg, "valid")
    refit, same = split_features(spark, cfg, "valid", params)
    assert same == params == (2, 0.1)
    a, b = (f.toPandas().sort_values(["user_id", "item_id"]).reset_index(drop=True) for f in (tuned, refit))
    assert len(a) == 40 and a.als.notna().all()
    np.testing.assert_allclose(a[["bias", "als"]].to_numpy(), b[["bias", "als"]].to_numpy(), atol=1e-9)


# ---- the probe ----------------------------------------------------------------------------

def test_answer_states_are_the_last_position_whatever_the_batch(long_tiny_model):
    import torch

    from siren_batch.backends.transformers_backend import TransformersBackend
    from siren_batch.config import ScoreConfig

    backend = TransformersBackend(ScoreConfig(model=str(long_tiny_model), device="cpu", dtype="float32", batch_size=3))
    prompts = ["short one <answer>", "a much longer prompt about Heat, Crime|Drama, 5 <answer>", "mid <answer>", " "]
    states, errors = backend.answer_states(prompts, [2, 1])
    assert states.shape == (4, 64) and errors == [None, None, None, "empty_prompt"]
    assert not states[3].any()
    ids = backend.tokenizer(prompts[1], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():   # by hand: one unpadded sequence, its last position
        hs = backend.model(input_ids=ids, output_hidden_states=True).hidden_states
    np.testing.assert_allclose(states[1], torch.cat([hs[2][0, -1], hs[1][0, -1]]).numpy(), atol=1e-5)
    alone, _ = backend.answer_states(prompts[:1], [2, 1])
    np.testing.assert_allclose(states[0], alone[0], atol=1e-5)
    # a pass that fails (out of memory, say) splits in halves: only the row that fails is lost
    module, forward = backend.model.get_decoder(), backend.model.get_decoder().forward

    def failing(*args, **kw):
        if kw["input_ids"].shape[1] >= ids.shape[1]:    # the long prompt's passes
            raise torch.OutOfMemoryError("CUDA out of memory")
        return forward(*args, **kw)

    module.forward = failing
    try:
        again, errors = backend.answer_states(prompts, [2, 1])
    finally:
        del module.forward
    assert errors[0] is None and errors[1].startswith("forward_failed: OutOfMemoryError") and errors[2] is None
    np.testing.assert_allclose(again[[0, 2]], states[[0, 2]], atol=1e-5)
    assert not again[1].any()


def test_train_probe_fits_on_valid_and_writes_a_scored_partition(spark, tmp_path, long_tiny_model,
                                                                   small_warehouse):
    from pyspark.sql import functions as F

    from siren_batch import schemas
    from siren_batch.config import load_config
    from siren_batch.train.probe import train_probe
    from siren_batch.warehouse import read_table

    cfg = load_config(overrides=[f"warehouse={tmp_path / 'wh'}", f"calibrate.path={tmp_path / 'cal'}",
                                 f"score.model={long_tiny_model}", "score.device=cpu", "calibrate.folds=2",
                                 "probe.dtype=float32", "probe.run_date=2026-02-01", "evaluate.als_ranks=[2]",
                                 "evaluate.als_reg_params=[0.1]", "evaluate.als_max_iter=3"])
    _warehouse(small_warehouse, cfg)
    summary = train_probe(spark, cfg)
    assert summary["valid_rows"] == 40 and summary["scored"] == 40 and summary["layers"] == [2, 1]
    assert (tmp_path / "cal" / "probe" / "calibrator.pkl").exists()
    rows = read_table(spark, cfg, "ratings", schemas.RATINGS).where(F.col("run_date") == "2026-02-01").collect()
    assert len(rows) == 40 and all(r.model_id.startswith("probe:") and r.error is None for r in rows)
    for r in rows:
        assert abs(sum(r.probs) - 1) < 1e-9 and 1 <= r.rating <= 5 and r.rating_argmax == 1 + int(np.argmax(r.probs))


def test_candidate_features_cover_unknown_users_and_items(spark, tmp_path, small_warehouse):
    from siren_batch.config import load_config
    from siren_batch.features import candidate_features

    cfg = load_config(overrides=[f"warehouse={tmp_path / 'wh'}", "evaluate.als_max_iter=3"])
    rows = _warehouse(small_warehouse, cfg)
    pairs = spark.createDataFrame([("u1", "i2"), ("u1", "i2"), ("u1", "i99"), ("nobody", "i3")], ["user_id", "item_id"])
    out = {(r.user_id, r.item_id): r for r in candidate_features(spark, cfg, pairs, (2, 0.1)).collect()}
    assert len(out) == 3                                   # one lookup row per distinct pair
    known = out[("u1", "i2")]
    u1 = [r for u, _, r, _, _ in rows if u == "u1"]
    i2 = [r for _, i, r, _, _ in rows if i == "i2"]
    assert known.n_history == 6 and known.user_mean == pytest.approx(sum(u1) / 6)   # as of the end of history
    assert known.item_count == len(i2) and known.item_mean == pytest.approx(sum(i2) / len(i2))
    assert 1 <= known.bias <= 5 and 1 <= known.als <= 5
    assert (out[("u1", "i99")].item_count, out[("u1", "i99")].item_mean) == (0, None)
    assert (out[("nobody", "i3")].n_history, out[("nobody", "i3")].user_mean) == (0, None)
    assert out[("nobody", "i3")].als == out[("nobody", "i3")].bias       # ALS knows no such user: the bias


def test_probe_states_in_chunks_equal_one_call_and_count_progress():
    """The probe's forward passes go a chunk at a time (a progress line for a long split):
    the same states and errors, in prompt order, as one call."""
    from siren_batch.console import Progress
    from siren_batch.train.probe import _states

    class Backend:
        def answer_states(self, prompts, layers):
            states = np.array([[len(p), layers[0]] for p in prompts], dtype=np.float32).reshape(len(prompts), 2)
            return states, [None if p else "empty prompt" for p in prompts]

    prompts = ["a", "bb", "", "dddd", "eeeee"]
    progress = Progress(len(prompts), every_s=1e9)
    states, errors = _states(Backend(), prompts, [3], progress, chunk=2)
    want, want_errors = Backend().answer_states(prompts, [3])
    assert np.array_equal(states, want) and errors == want_errors and progress.done == 5
    assert _states(Backend(), [], [3], Progress(0))[0].shape == (0, 2)
