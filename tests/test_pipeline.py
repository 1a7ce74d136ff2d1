"""Integration: the whole chain on real data through the same stage functions the
CLI and jobs/ call. One chain run per dataset (module-scoped), many checks on it."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
from pyspark.sql import functions as F

from siren_batch import pipeline, ratings, schemas
from siren_batch.config import load_config
from siren_batch.warehouse import read_table

pytestmark = pytest.mark.integration


def _tables(spark, cfg):
    """The small tables whole; of example_sketches (one row per rating, with nested
    lists) its row count and a deterministic 400-row sample, so the driver's heap
    never holds the whole table."""
    tables = {name: read_table(spark, cfg, name, schema).toPandas() for name, schema in [
        ("interactions", schemas.INTERACTIONS), ("prompts", schemas.PROMPTS), ("runs", schemas.RUNS)]}
    ex = read_table(spark, cfg, "example_sketches", schemas.EXAMPLE_SKETCHES)
    tables["example_sketch_rows"] = ex.count()
    tables["example_sketches"] = ex.orderBy(F.xxhash64("user_id", "item_id")).limit(400).toPandas()
    return tables


def _check_chain(spark, cfg, summaries):
    t = _tables(spark, cfg)
    inter, ex, prompts, runs = t["interactions"], t["example_sketches"], t["prompts"], t["runs"]
    # Counts reconcile: input = kept + rejected (+ sampled out, in a dry run on a user sample) in
    # the summary, and input = output + rejected in the runs table.
    ing = summaries["ingest"]
    assert ing["input_interactions"] == (ing["kept_interactions"] + ing["rejected_interactions"]
                                         + ing["sampled_out_interactions"])
    assert len(inter) == ing["kept_interactions"]
    run = runs[runs.stage == "ingest"].iloc[-1]
    assert run.input_rows == run.output_rows + run.rejected_rows
    assert set(runs.stage) >= set(pipeline.SKETCH_CHAIN) and (runs.status == "ok").all()
    # Each run says what it read and wrote.
    wrote = runs.groupby("stage").writes.last()
    assert wrote["ingest"] == "rejects,interactions,items" and wrote["sketches"] == "example_sketches,sketches"
    assert runs[runs.stage == "topics"].reads.iloc[-1] == "item_embeddings,items"
    # One example sketch per target interaction.
    assert t["example_sketch_rows"] == len(inter)

    # No sketch contains its target: every recent item is strictly earlier, and
    # n_history equals the number of strictly earlier interactions.
    by_user = {u: g.sort_values("ts") for u, g in inter.groupby("user_id")}
    for row in ex.itertuples():
        hist = by_user[row.user_id]
        earlier = hist[hist.ts < row.ts]
        assert row.n_history == len(earlier)
        assert all(r["ts"] < row.ts for r in row.recent)
        assert [r["item_id"] for r in row.recent] == list(earlier.item_id[-cfg.sketches.recent_n:]) or \
            len(set(earlier.ts)) < len(earlier)  # ties in ts: order within a tie is by item_id
        # liked / disliked agree with the stored means (paper rule)
        theta = cfg.sketches.theta
        assert all(s["mean"] >= theta for s in row.liked)
        assert all(0 < s["mean"] < theta for s in row.disliked)
        assert len(row.liked) + len(row.disliked) == len(row.topic_stats)
        assert sum(s["count"] for s in row.topic_stats) <= row.n_history

    # Every test pair has an answer-only sketch prompt with a token count.
    test_pairs = set(map(tuple, inter[inter.split == "test"][["user_id", "item_id"]].values))
    ao = prompts[(prompts["mode"] == "answer_only") & (prompts["variant"] == "sketch")
                 & (prompts["split"] == "test")]
    assert set(map(tuple, ao[["user_id", "item_id"]].values)) == test_pairs
    assert (ao.prompt_tokens > 0).all() and ao.prompt.str.endswith("<answer>").all()
    return t


def test_ml100k_chain(spark, ml100k):
    cfg, summaries = ml100k
    t = _check_chain(spark, cfg, summaries)
    assert summaries["topics"]["topics"] == cfg.topics.k
    assert len(set(summaries["topics"]["names"])) == cfg.topics.k
    # Both variants for every valid and test pair, and sketch prompts much shorter than raw-history
    # prompts on the same pairs (ml-100k users average ~100 ratings: ~500 tokens against ~2,400).
    p = t["prompts"][t["prompts"]["mode"] == "answer_only"].pivot_table(
        index=["user_id", "item_id"], columns="variant", values="prompt_tokens")
    assert len(p) == (t["interactions"].split != "train").sum() and p.notna().all().all()
    assert (p["sketch"].mean() / p["raw"].mean()) < 0.6


def test_siren_movies_chain_keeps_the_release_split(spark, movies):
    """A dry run on a 5% user sample (data.sample_users): the chain embeds only the items
    those users rated (1,433 of 10,874: embedding is the chain's main cost here)."""
    cfg, summaries = movies
    t = _check_chain(spark, cfg, summaries)
    counts = t["interactions"].split.value_counts()
    assert counts["valid"] == counts["test"] == t["interactions"].user_id.nunique()
    ing = summaries["ingest"]
    assert ing["sampled_out_interactions"] > 0 and ing["sampled_out_items"] > ing["kept_items"]
    assert summaries["embed"]["embeddings"] == ing["kept_items"] == ing["interacted_items"]


def _mixed_real_prompts(spark, cfg) -> tuple[list[str], list[str]]:
    """ml-100k sketch prompts: 4 users with their valid and test pairs, 3 with one pair."""
    rows = (read_table(spark, cfg, "prompts", schemas.PROMPTS)
            .where((F.col("variant") == "sketch") & (F.col("mode") == "answer_only"))
            .orderBy("user_id", "split").limit(20).toPandas())
    users = list(dict.fromkeys(rows.user_id))
    pick = rows[rows.user_id.isin(users[:4]) | (rows.user_id.isin(users[4:7]) & (rows.split == "test"))]
    return pick.prompt.tolist(), pick.user_id.tolist()


def test_real_prompts_every_path_agrees_and_bf16_stays_close(spark, ml100k):
    """fp32: cross-user shared prefixes equal one prompt at a time within 1e-4 on real
    prompts of mixed users. bf16 (the CPU default where the CPU has native bf16,
    ~1.6-1.9x fp32 there) stays within 0.15 in rating and 0.05 in probability, on the
    first user's prompts (emulated bf16 on an AVX2-only CPU takes ~8 s a prompt)."""
    import numpy as np

    from siren_batch.backends.transformers_backend import TransformersBackend

    cfg, _ = ml100k
    texts, users = _mixed_real_prompts(spark, cfg)
    assert len(texts) == 11 and len(set(users)) == 7
    runs = {}
    bf16_rows = [k for k, u in enumerate(users) if u == users[0]]
    assert len(bf16_rows) == 2   # its valid and test pairs
    for name, kw in {"single": dict(dtype="float32", batch_size=1, shared_prefix=False),
                     "shared": dict(dtype="float32", shared_prefix=True, shared_prefix_min_tokens=8),
                     "bf16": dict(dtype="bfloat16", shared_prefix=True)}.items():
        backend = TransformersBackend(dataclasses.replace(cfg.score, device="cpu", **kw))
        rows = bf16_rows if name == "bf16" else range(len(texts))
        results = backend.score([texts[k] for k in rows], [users[k] for k in rows])
        assert all(r.error is None for r in results), name
        runs[name] = (np.array([r.probs for r in results]), np.array([r.rating for r in results]))
        if name == "shared":    # the root, then the users' prefixes: the cross-user path really ran
            assert backend.stats["prefix_passes"] >= 2
    np.testing.assert_allclose(runs["shared"][0], runs["single"][0], atol=1e-4)
    assert np.abs(runs["bf16"][0] - runs["single"][0][bf16_rows]).max() < 0.05
    assert 0 < np.abs(runs["bf16"][1] - runs["single"][1][bf16_rows]).max() < 0.15    # really two dtypes, close


def _candidates(spark, tmp_path, inter: pd.DataFrame) -> tuple[str, int]:
    users = sorted(inter.user_id.unique())[:4]
    items = sorted(inter.item_id.unique())[:3]
    rows = [(u, i) for u in users for i in items] + [("no-such-user", items[0]), (users[0], "no-such-item")]
    path = str(tmp_path / "candidates")
    spark.createDataFrame(rows, "user_id string, item_id string").write.parquet(path)
    return path, len(rows)


def test_score_nightly_candidates_rerun_and_resume(spark, ml100k, tmp_path, monkeypatch, long_tiny_model):
    base, _ = ml100k
    inter = read_table(spark, base, "interactions", schemas.INTERACTIONS).toPandas()
    path, n = _candidates(spark, tmp_path, inter)
    cfg = load_config(overrides=[f"warehouse={base.warehouse}", "calibrate.enabled=false", f"score.candidates={path}",
                                 "score.run_date=2026-01-01", "score.chunk_rows=4", f"score.model={long_tiny_model}"])

    # A crash in the middle: the first committed chunks survive in staging.
    from siren_batch import scoring
    calls = {"n": 0}
    original = scoring.score_frame

    def flaky(frame, score_cfg, *timers):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("executor lost")
        return original(frame, score_cfg, *timers)

    monkeypatch.setattr(scoring, "score_frame", flaky)
    with pytest.raises(RuntimeError, match="executor lost"):
        ratings.score_run(spark, cfg)
    committed = ratings.list_dir(spark, f"{cfg.warehouse}/{cfg.dataset}/_staging/ratings-2026-01-01/chunks")
    assert len(committed) == 1

    # Resume: the committed chunk is not scored again.
    calls["n"] = 10
    summary = ratings.score_run(spark, cfg)
    n_chunks = -(-n // 4)  # chunks are cut from all candidate rows, error rows included
    assert calls["n"] - 10 == n_chunks - 1
    assert summary["rows"] == n and summary["errors_by_reason"] == {"unknown_user": 1, "unknown_item": 1}

    out = read_table(spark, cfg, "ratings", schemas.RATINGS).where(F.col("run_date") == "2026-01-01").toPandas()
    assert len(out) == n and not out.duplicated(["user_id", "item_id"]).any()
    ok = out[out.error.isna()]
    assert ok.probs.map(lambda p: abs(sum(p) - 1) < 1e-6).all()
    assert ok.rating.between(1, 5).all() and (ok.output_tokens == 1).all()
    assert set(out[out.error.notna()].error) == {"unknown_user", "unknown_item"}

    # Re-running the same run_date replaces the partition: still n rows, no duplicates.
    monkeypatch.setattr(scoring, "score_frame", original)
    ratings.score_run(spark, cfg)
    again = read_table(spark, cfg, "ratings", schemas.RATINGS).where(F.col("run_date") == "2026-01-01")
    assert again.count() == n


def test_score_staging_resumes_only_the_same_candidates(spark, tmp_path):
    """A crashed score run resumes from its staged chunks only for the same config AND the
    same candidate pairs: a candidates file rewritten under the same path starts clean."""
    cfg = load_config(overrides=[f"warehouse={tmp_path / 'wh'}"])
    staging = str(tmp_path / "staging")
    ratings._check_staging(spark, staging, cfg, "40:123456")
    (tmp_path / "staging" / "chunks" / "chunk=00000").mkdir(parents=True)
    ratings._check_staging(spark, staging, cfg, "40:123456")            # the same run: kept
    assert ratings.list_dir(spark, f"{staging}/chunks") == ["chunk=00000"]
    ratings._check_staging(spark, staging, cfg, "40:654321")            # other pairs, same count
    assert not (tmp_path / "staging" / "chunks").exists()


def test_score_and_evaluate_test_split_sample(spark, ml100k_scored):
    cfg, summary, result = ml100k_scored   # 12 test pairs scored, then evaluated against three baselines
    assert summary["rows"] == 12 and summary["errors"] == 0
    metrics = read_table(spark, cfg, "metrics", schemas.METRICS).toPandas()
    mine = metrics[metrics.eval_id == result["eval_id"]]
    llm = "llm:smollm2-135m-instruct"
    assert set(mine.system) == {llm, f"{llm}/median", f"{llm}/argmax", "baseline:global_mean", "baseline:user_mean",
                                "baseline:bias"}
    nll = mine[mine.metric == "nll"]
    assert list(nll.system) == [llm] and nll.value.iloc[0] > 0 and nll.n.iloc[0] == 12
    cov = mine[(mine.metric == "coverage") & (mine.segment == "all")]
    assert (cov.value == 1.0).all() and (cov.n == 12).all()
    report = (pd.io.common.Path(cfg.table_path("reports")) / "latest.md").read_text()
    assert "llm:smollm2-135m-instruct" in report and "baseline:user_mean" in report
