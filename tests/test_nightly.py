"""Two nights on MovieLens-100K cut by time: `siren-batch nightly --run-date D`.

Night 1 (1998-04-06) is the bootstrap: every interaction up to its end. Night 2
(1998-04-07) adds that day's ~300 interactions (0.3%) and the two items first rated
that day. The second night must touch only what changed, re-running it must change
nothing, a night killed mid-stage must resume to the same tables, and a second
concurrent run must be refused in one line.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from siren_batch import arrivals, cli, lock, nightly
from siren_batch.config import load_config
from tables import assert_same_frame, read_frame

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
NIGHT1, NIGHT2 = "1998-04-06", "1998-04-07"
TABLES = ["interactions", "items", "item_embeddings", "topics", "item_topics", "sketches", "ratings",
          "metrics", "arrived_interactions", "arrived_items", "night_rejects"]


def _overrides(warehouse: Path, arrivals: Path, candidates: Path, model: Path) -> list[str]:
    """The nights score with a tiny random model in fp32: what is tested is the chain (what a
    night touches, resumes and writes), and a rating still moves when its prompt does."""
    return [f"warehouse={warehouse}", f"nightly.arrivals={arrivals}/{{run_date}}", f"score.model={model}",
            f"nightly.candidates={candidates}", "nightly.report=false", "calibrate.enabled=false",
            "score.dtype=float32", "score.partitions=2", "evaluate.baselines=[global_mean,bias]",
            "spark.master=local[2]"]


def _read(warehouse: Path, table: str) -> pd.DataFrame:
    return read_frame(warehouse / "ml-100k" / table)


@pytest.fixture(scope="module")
def nights(spark, ml100k, tmp_path_factory, long_tiny_model):
    """Arrival folders, then night 1 and night 2 in one warehouse; a copy taken after night 1."""
    cfg100, _ = ml100k
    src = Path(cfg100.warehouse) / "ml-100k"
    root = tmp_path_factory.mktemp("nightly")
    dates = arrivals.cut_arrivals(pd.read_parquet(src / "interactions"), pd.read_parquet(src / "items"),
                                 str(root / "arrivals"), NIGHT1, 2, held_items=2)
    assert dates == [NIGHT1, NIGHT2]
    night2 = pd.read_parquet(root / "arrivals" / NIGHT2 / "interactions.parquet")
    first = pd.read_parquet(root / "arrivals" / NIGHT1 / "interactions.parquet")
    # Candidates: three pairs whose truth arrives on night 2 (users known on night 1),
    # two pairs of users untouched by night 2.
    arriving = night2[night2.user_id.isin(first.user_id)].drop_duplicates("user_id").head(3)
    new_items = pd.read_parquet(root / "arrivals" / NIGHT2 / "items.parquet").item_id
    rated_new = set(night2.user_id) | set(first[first.item_id.isin(new_items)].user_id)
    quiet = sorted(set(first.user_id) - rated_new)[:2]
    assert len(quiet) == 2 and len(arriving) == 3
    cands = pd.concat([arriving[["user_id", "item_id"]],
                       pd.DataFrame({"user_id": quiet, "item_id": ["50", "50"]})], ignore_index=True)
    cands = cands[~cands.set_index(["user_id", "item_id"]).index.isin(
        first.set_index(["user_id", "item_id"]).index)]
    cands.to_parquet(root / "candidates.parquet")
    wh = root / "wh"
    cfg = load_config(overrides=_overrides(wh, root / "arrivals", root / "candidates.parquet", long_tiny_model))
    one = nightly.run_night(spark, cfg, NIGHT1)
    shutil.copytree(wh, root / "after-night1")
    with_report = dataclasses.replace(cfg, nightly=dataclasses.replace(cfg.nightly, report=True))
    two = nightly.run_night(spark, with_report, NIGHT2)
    return {"root": root, "cfg": cfg, "wh": wh, "one": one, "two": two, "night2": night2,
            "cands": cands, "quiet": quiet, "arriving": arriving}


def test_first_night_bootstraps_and_records_every_step(nights):
    one = nights["one"]
    assert one["bootstrap"] and one["topics"]["reclustered"] and one["sketches"]["rebuilt_all"]
    assert one["ingest"]["input_interactions"] == (one["ingest"]["kept_interactions"]
                                                   + one["ingest"]["rejected_interactions"])
    runs = pd.read_parquet(nights["wh"] / "ml-100k" / "runs")
    night = runs[runs.stage.str.startswith("nightly-")]
    assert set(night.stage) >= {f"nightly-{s}" for s in ("ingest", "embed", "topics", "sketches", "score",
                                                         "evaluate")}
    ingest = night[night.stage == "nightly-ingest"].iloc[-1]
    assert "interactions" in ingest.writes and ingest.reads.startswith(str(nights["root"] / "arrivals"))


def test_second_night_touches_only_what_changed(nights):
    before, after = nights["root"] / "after-night1" / "ml-100k", nights["wh"] / "ml-100k"
    two, night2 = nights["two"], nights["night2"]
    assert not two["bootstrap"] and two["ingest"]["kept_interactions"] == len(night2)
    # Interactions: night 1's plus tonight's, no duplicates.
    inter = pd.read_parquet(after / "interactions")
    assert len(inter) == len(pd.read_parquet(before / "interactions")) + len(night2)
    assert not inter.duplicated(["user_id", "item_id"]).any()
    # Embeddings: only the two new items were embedded; the others are untouched.
    assert two["embed"]["embedded"] == 2
    old = pd.read_parquet(before / "item_embeddings").set_index("item_id")
    new = pd.read_parquet(after / "item_embeddings").set_index("item_id")
    assert len(new) == len(old) + 2
    assert all(np.array_equal(old.embedding[i], new.embedding[i]) for i in old.index[:200])
    assert not two["topics"]["reclustered"] and two["topics"]["assigned"] == 2
    assert two["topics"]["drift"] is not None
    # Sketches: exactly the users with new interactions (or a rating of a new item) were rebuilt.
    s_old = pd.read_parquet(before / "sketches").set_index("user_id")
    s_new = pd.read_parquet(after / "sketches").set_index("user_id")
    changed = set(night2.user_id)
    assert two["sketches"]["users_sketched"] == len(changed) and not two["sketches"]["rebuilt_all"]
    untouched = s_old.index.difference(sorted(changed))
    assert len(untouched) > 800
    assert (s_old.loc[untouched, "as_of_ts"] == s_new.loc[untouched, "as_of_ts"]).all()
    assert all(str(s_old.loc[u, "recent"]) == str(s_new.loc[u, "recent"]) for u in untouched[:100])
    grew = night2.groupby("user_id").size()
    known = grew.index.intersection(s_old.index)
    assert (s_new.loc[known, "n_history"] == s_old.loc[known, "n_history"] + grew[known]).all()


def test_second_nights_ratings_reflect_the_new_interactions(nights):
    ratings = pd.read_parquet(nights["wh"] / "ml-100k" / "ratings")
    ratings["run_date"] = ratings.run_date.astype(str)
    wide = ratings.pivot_table(index=["user_id", "item_id"], columns="run_date", values="rating")
    assert len(wide) == len(nights["cands"]) and wide.notna().all().all()
    quiet = wide[wide.index.get_level_values(0).isin(nights["quiet"])]
    moved = wide[wide.index.get_level_values(0).isin(nights["arriving"].user_id)]
    assert np.allclose(quiet[NIGHT1], quiet[NIGHT2], atol=1e-4)   # same sketch, same rating
    assert (abs(moved[NIGHT1] - moved[NIGHT2]) > 1e-4).all()       # the new ratings are in the sketch


def test_every_night_writes_its_html_report(nights):
    report = Path(nights["two"]["report"]["report"])
    assert report.name == f"run-{NIGHT2}.html" and report.exists()
    page = report.read_text()
    assert f"nightly-{NIGHT2}" in page and "baseline:bias" in page    # tonight's evaluation
    assert page.count("<img") >= 4 and "nightly-sketches" in page


def test_night_two_evaluates_night_ones_ratings_against_the_arrived_truth(nights):
    ev = nights["two"]["evaluate"]
    assert ev["scored_on"] == NIGHT1 and ev["truth_pairs"] == len(nights["arriving"])
    metrics = pd.read_parquet(nights["wh"] / "ml-100k" / "metrics")
    mine = metrics[(metrics.eval_id == f"nightly-{NIGHT2}") & (metrics.segment == "all")]
    mae = mine[mine.metric == "mae"].set_index("system")
    assert {"baseline:bias", "baseline:global_mean"} <= set(mae.index)
    assert (mae.n == len(nights["arriving"])).all()
    truth = nights["arriving"].set_index(["user_id", "item_id"]).rating
    llm = pd.read_parquet(nights["wh"] / "ml-100k" / "ratings")
    llm = llm[llm.run_date.astype(str) == NIGHT1].set_index(["user_id", "item_id"]).rating
    expected = float((llm.reindex(truth.index) - truth).abs().mean())
    llm_system = next(s for s in mae.index if s.startswith("llm:") and "/" not in s)   # the expected-value readout
    assert mae.loc[llm_system, "value"] == pytest.approx(expected, abs=1e-9)


def test_a_night_fits_the_calibrator_when_none_is_stored_and_applies_it(spark, nights, long_tiny_model):
    """Night 2 on a copy of night 1's warehouse, calibration on: with no calibrator stored the
    calibrate step sketches and scores the valid split and fits one in the warehouse; the
    score step fills the calibrated columns; evaluate never reads the valid partition (night
    1's ratings are removed, so that partition is the only earlier one)."""
    from siren_batch.calibration import VALID_RUN_DATE, calibrator_dir, why_fit
    from pyspark.sql import functions as F

    from siren_batch import schemas
    from siren_batch.baselines import with_base
    from siren_batch.features import bootstrap_history, split_features
    from siren_batch.nightly.serve import _valid_sketches, calibrate_step
    from siren_batch.warehouse import read_table, write_table

    root = nights["root"]
    wh = root / "calibrated"
    shutil.copytree(root / "after-night1", wh)
    shutil.rmtree(wh / "ml-100k" / "ratings" / f"run_date={NIGHT1}")
    def cfg_at(warehouse):
        return load_config(overrides=[*_overrides(warehouse, root / "arrivals", root / "candidates.parquet",
                                                  long_tiny_model),
                                      "calibrate.enabled=true", "calibrate.chain_rows=40", "calibrate.folds=2",
                                      "evaluate.als_ranks=[2]", "evaluate.als_reg_params=[0.1]",
                                      "evaluate.als_max_iter=3"])
    cfg = cfg_at(wh)
    assert not (wh / "ml-100k" / "example_sketches").exists()   # nights build serving sketches only
    two = nightly.run_night(spark, cfg, NIGHT2)
    fit = two["calibrate"]
    assert fit["reason"].startswith("no calibrator stored at") and fit["calibrator"] == calibrator_dir(cfg)
    valid = (_read(wh, "interactions").split == "valid").sum()
    assert fit["valid_sketches"] == valid > 40 and fit["valid_scored"]["rows"] == 40 and fit["rows"] == 40
    assert (_read(wh, "example_sketches").split == "valid").all()
    assert (Path(calibrator_dir(cfg)) / "calibrator.pkl").exists()
    ratings = pd.read_parquet(wh / "ml-100k" / "ratings")
    ratings["run_date"] = ratings.run_date.astype(str)
    assert set(ratings.run_date) == {VALID_RUN_DATE, NIGHT2}
    assert (ratings.run_date == VALID_RUN_DATE).sum() == 40
    tonight = ratings[ratings.run_date == NIGHT2]
    assert len(tonight) == len(nights["cands"]) and tonight.calibrated_rating.between(1, 5).all()
    assert two["evaluate"]["skipped"] == "no earlier ratings"
    # The fit's baseline features learn from the history the valid split was cut from, not
    # from night 2's arrivals (train rows later than every valid pair): as on night 1's tables.
    stored = read_table(spark, cfg, "interactions", schemas.INTERACTIONS)
    night1 = read_table(spark, cfg_at(root / "after-night1"), "interactions", schemas.INTERACTIONS)
    arrived = (_read(wh, "arrived_interactions").run_date.astype(str) == NIGHT2).sum()
    assert bootstrap_history(spark, cfg).count() == stored.count() - arrived == night1.count()
    feats, _ = split_features(spark, cfg, "valid", (2, 0.1))
    bias = feats.toPandas().set_index(["user_id", "item_id"]).bias.sort_index()
    at_night1 = with_base(night1, "valid", cfg.evaluate)[1].toPandas().set_index(["user_id", "item_id"]).base
    leaky = with_base(stored, "valid", cfg.evaluate)[1].toPandas().set_index(["user_id", "item_id"]).base
    assert len(bias) == valid and np.allclose(bias, at_night1.reindex(bias.index), atol=1e-9)
    assert not np.allclose(bias, leaky.reindex(bias.index), atol=1e-6)   # what the fit saw before
    # Stored for these settings: later nights keep it; a prompt setting changed: the next night refits.
    assert calibrate_step(spark, cfg, None, None) == {"kept": calibrator_dir(cfg)}
    priors = dataclasses.replace(cfg, prompts=dataclasses.replace(cfg.prompts, priors=True))
    assert "was fit for other settings {'priors': (False, True)" in why_fit(spark, priors)
    # A refit rebuilds the valid rows (topics may have been re-fitted) and keeps the other splits'.
    stored = read_table(spark, cfg, "example_sketches", schemas.EXAMPLE_SKETCHES)
    stale_and_trained = stored.unionByName(stored).unionByName(stored.limit(5).withColumn("split", F.lit("train")))
    write_table(stale_and_trained.localCheckpoint(), cfg, "example_sketches", schemas.EXAMPLE_SKETCHES)
    assert _valid_sketches(spark, cfg) == valid
    again = _read(wh, "example_sketches")
    assert (again.split == "train").sum() == 5 and (again.split == "valid").sum() == valid
    off = dataclasses.replace(cfg, calibrate=dataclasses.replace(cfg.calibrate, in_chain=False))
    assert calibrate_step(spark, off, None, None) == {"skipped": "calibrate.in_chain=false"}
    # A later night's re-rating of a valid pair replaces its row in interactions; the split keeps it.
    table = read_table(spark, cfg, "interactions", schemas.INTERACTIONS).localCheckpoint()
    pair = table.where(F.col("split") == "valid").limit(1).localCheckpoint()
    rerated = pair.withColumns({"split": F.lit("train"), "ts": F.col("ts") + 1, "rating": 6 - F.col("rating")})
    kept = table.join(pair.select("user_id", "item_id"), on=["user_id", "item_id"], how="left_anti")
    write_table(kept.unionByName(rerated).localCheckpoint(), cfg, "interactions", schemas.INTERACTIONS)
    history = bootstrap_history(spark, cfg)
    assert history.where(F.col("split") == "valid").count() == valid
    assert history.join(pair, on=list(pair.columns), how="left_semi").count() == 1
    # The table ingested afresh since (its labelled rows are not the bootstrap's): the table is the history.
    write_table(table.withColumn("rating", F.when(F.col("split") == "test", 6 - F.col("rating"))
                                 .otherwise(F.col("rating"))).localCheckpoint(),
                cfg, "interactions", schemas.INTERACTIONS)
    assert bootstrap_history(spark, cfg).where("split = 'test'").agg(F.sum("rating")).first()[0] == \
        table.where("split = 'test'").agg(F.sum(6 - F.col("rating"))).first()[0]


def test_rerunning_a_night_changes_nothing(spark, nights):
    before = {t: _read(nights["wh"], t) for t in TABLES}
    again = nightly.run_night(spark, nights["cfg"], NIGHT2)
    assert all(again[s].get("resumed") == "already done" for s in ("ingest", "sketches", "score"))
    redone = nightly.run_night(spark, nights["cfg"], NIGHT2, redo=True)
    assert "resumed" not in redone["sketches"] and redone["embed"]["embedded"] == 2
    sampled = dataclasses.replace(nights["cfg"], data=dataclasses.replace(nights["cfg"].data, sample_users=0.5))
    with pytest.raises(Exception, match=r"data.sample_users=0.5 is for dry runs .* a night keeps every user"):
        nightly.run_night(spark, sampled, NIGHT2, redo=True)   # refused before it touches anything
    for table in TABLES:
        assert_same_frame(before[table], _read(nights["wh"], table), table, atol=1e-5)
    with pytest.raises(Exception, match="date order"):
        nightly.run_night(spark, nights["cfg"], NIGHT1)


def test_a_killed_night_resumes_with_the_same_tables(spark, nights, long_tiny_model, capsys):
    root = nights["root"]
    wh = root / "killed"
    shutil.copytree(root / "after-night1", wh)
    args = ["nightly", "--run-date", NIGHT2,
            *_overrides(wh, root / "arrivals", root / "candidates.parquet", long_tiny_model)]
    marker = wh / "ml-100k" / "_nightly" / NIGHT2 / "embed.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "SIREN_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "siren_batch.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "the night never finished its embed step"
    os.killpg(proc.pid, signal.SIGKILL)   # mid-night: in topics or sketches, lock left behind
    proc.wait()
    assert not (wh / "ml-100k" / "_nightly" / NIGHT2 / "done.json").exists()
    # The dead run's lock is detected; --break-lock takes it over and the night resumes.
    assert cli.main(args) == 2
    assert "no longer running" in capsys.readouterr().err
    # Not the next night first: once that one was done, this one would be refused for good.
    assert cli.main([a if a != NIGHT2 else "1998-04-08" for a in args] + ["--break-lock"]) == 2
    assert f"night {NIGHT2} started but did not finish: run it again first" in capsys.readouterr().err
    assert not (wh / "ml-100k" / "_nightly" / "1998-04-08").exists()
    assert cli.main([*args, "--break-lock"]) == 0
    for table in TABLES:
        assert_same_frame(_read(nights["wh"], table), _read(wh, table), table, atol=1e-5)


def test_a_second_concurrent_run_is_refused_in_one_line(nights, tmp_path, capsys):
    cfg = load_config(overrides=[f"warehouse={tmp_path}"])
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        holder = {"host": socket.gethostname(), "pid": sleeper.pid, "run_id": "night-a", "what": "nightly",
                  "started_at": "2026-01-05T01:00:00+00:00"}
        Path(lock.lock_path(cfg)).parent.mkdir(parents=True)
        Path(lock.lock_path(cfg)).write_text(__import__("json").dumps(holder))
        start = time.monotonic()
        assert cli.main(["nightly", "--run-date", NIGHT2, f"warehouse={tmp_path}"]) == 2
        err = capsys.readouterr().err.strip()
        assert time.monotonic() - start < 30
        assert len(err.splitlines()) == 1
        for part in (socket.gethostname(), str(sleeper.pid), "2026-01-05T01:00:00", "night-a", "is running"):
            assert part in err
    finally:
        sleeper.kill()
        sleeper.wait()
    assert cli.main(["nightly", "--run-date", NIGHT2, f"warehouse={tmp_path}"]) == 2
    assert "no longer running: rerun with --break-lock" in capsys.readouterr().err


def test_a_refit_killed_between_topics_and_item_topics_refits_again(spark, nights, tmp_path, monkeypatch):
    """Tonight's drift decided a re-fit; the run died with the new topics written and item_topics
    not. Resumed, it must re-fit as decided, not measure drift against its own new centroids
    (which could fall under the threshold and mix old topic ids with new ones)."""
    from siren_batch import warehouse
    from siren_batch.nightly import refresh
    from siren_batch.nightly.night import Night

    wh = tmp_path / "wh"
    shutil.copytree(nights["wh"], wh)
    for leftover in (wh / "ml-100k" / "_nightly" / NIGHT2).glob("*.json"):   # night 2 from its topics step on
        if leftover.name not in ("plan.json", "ingest.json", "embed.json"):
            leftover.unlink()
    cfg = load_config(overrides=[f"warehouse={wh}"])
    night = Night(NIGHT2, False, str(nights["root"] / "arrivals" / NIGHT2))
    write = warehouse.write_table

    def killed_at_item_topics(df, cfg_, table, *args, **kwargs):
        if table == "item_topics":
            raise KeyboardInterrupt   # stands in for the kill
        return write(df, cfg_, table, *args, **kwargs)

    monkeypatch.setattr(refresh, "write_table", killed_at_item_topics)
    monkeypatch.setattr(refresh, "drift", lambda new, stored: 5.0)   # tonight's items far out: re-fit
    with pytest.raises(KeyboardInterrupt):
        refresh.topics_step(spark, cfg, night, warehouse.RunRecord("nightly-topics"))
    monkeypatch.undo()
    decided = (wh / "ml-100k" / "_nightly" / NIGHT2 / "refit.json").read_text()
    assert '"why": "drift' in decided
    # Resumed, drift is no longer measured (against the new centroids it could be small): the
    # decision stands, and every item gets a topic of the new fit.
    monkeypatch.setattr(refresh, "drift", lambda new, stored: pytest.fail("drift measured again"))
    out = refresh.topics_step(spark, cfg, night, warehouse.RunRecord("nightly-topics"))
    monkeypatch.undo()
    assert out["reclustered"] and out["why"].startswith("drift")
    topics, item_topics = _read(wh, "topics"), _read(wh, "item_topics")
    assert set(item_topics.topic_id) <= set(topics.topic_id) and len(item_topics) == len(_read(wh, "items"))


def test_a_night_that_ingested_nothing_blocks_the_next_and_says_how_to_give_it_up(spark, tmp_path):
    cfg = load_config(overrides=[f"warehouse={tmp_path}", f"nightly.arrivals={tmp_path}/arrivals/{{run_date}}"])
    started = tmp_path / "ml-100k" / "_nightly" / NIGHT1
    started.mkdir(parents=True)
    (started / "plan.json").write_text('{"run_date": "%s", "bootstrap": true, "folder": "x"}' % NIGHT1)
    with pytest.raises(Exception, match=rf"night {NIGHT1} started but did not finish: run it again first .* "
                                        rf"it ingested nothing, so to give it up delete .*{NIGHT1}"):
        nightly.run_night(spark, cfg, NIGHT2)
    assert not (tmp_path / "ml-100k" / "_nightly" / NIGHT2).exists()
