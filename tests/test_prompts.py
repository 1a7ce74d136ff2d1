"""Prompts: section order, suffix, token counts, shared per-user prefix, unknown
items, raw history bounds; the sketch-vs-raw token ratio on real MovieLens-100K."""

from __future__ import annotations

import os

import pytest
from pyspark.sql import functions as F

from siren_batch import prompts as P
from siren_batch import schemas
from siren_batch.assets import resolve_llm
from siren_batch.config import PromptsConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SKETCH = {
    "liked": [{"topic_id": 0, "name": "space opera", "count": 2, "mean": 4.5}],
    "disliked": [{"topic_id": 1, "name": "courtroom drama", "count": 1, "mean": 2.0}],
    "recent": [{"item_id": "a", "title": "Alien", "genres": "Horror|Sci-Fi", "rating": 5.0, "ts": 1},
               {"item_id": "b", "title": "Heat", "genres": None, "rating": 3.0, "ts": 2}],
}
CANDIDATE = {"title": "Dune", "genres": "Sci-Fi"}


@pytest.fixture(scope="module")
def tokenizer():
    return P.load_tokenizer(resolve_llm("default"))


def test_sketch_message_has_sections_in_order():
    text = P.render_user_message(SKETCH, CANDIDATE, "sketch", theta=4.0)
    marks = ["topics (ratings ≥ 4):\n- space opera", "topics (ratings < 4):\n- courtroom drama",
             P.RECENT_HEADER + "\nAlien, Horror|Sci-Fi, 5.0\nHeat, 3.0",
             P.QUESTION + "\nThe candidate is described as: Dune, Sci-Fi"]
    positions = [text.find(m) for m in marks]
    assert -1 not in positions and positions == sorted(positions)
    assert text.endswith("The candidate is described as: Dune, Sci-Fi")  # fixed text comes first


def test_empty_sections_are_left_out_and_theta_is_rendered():
    text = P.render_user_message({**SKETCH, "liked": [], "recent": []}, CANDIDATE, "sketch", theta=3.5)
    assert "preference" not in text and P.RECENT_HEADER not in text
    assert text.startswith("The user shows dislike for the following topics (ratings < 3.5):")
    cold = P.render_user_message({"liked": [], "disliked": [], "recent": []}, {"title": "Dune", "genres": None},
                                 "sketch", 4.0)
    assert cold == P.QUESTION + "\nThe candidate is described as: Dune"


def test_priors_are_optional_lines_in_the_user_and_candidate_parts():
    sketch = {**SKETCH, "n_history": 12, "user_mean": 3.25}
    candidate = {**CANDIDATE, "item_count": 40, "item_mean": 4.125}
    plain = P.render_user_message(sketch, candidate, "sketch", 4.0)
    text = P.render_user_message(sketch, candidate, "sketch", 4.0, priors=True)
    assert "3.25" not in plain and "average" not in plain
    user_line = "The user has rated 12 items before, 3.25 on average."
    assert text.index("Heat, 3.0") < text.index(user_line) < text.index(P.QUESTION)
    assert text.endswith("Dune, Sci-Fi\nEarlier ratings of this item: 40, 4.12 on average.")
    cold = P.render_user_message({**SKETCH, "n_history": 0, "user_mean": None},
                                 {**CANDIDATE, "item_count": 0, "item_mean": float("nan")}, "sketch", 4.0, True)
    assert P.USER_PRIOR_NONE in cold and cold.endswith(P.ITEM_PRIOR_NONE)


def test_recent_and_raw_variants_have_no_topics():
    recent = P.render_user_message(SKETCH, CANDIDATE, "recent", 4.0)
    assert "topics" not in recent and recent.startswith(P.RECENT_HEADER)
    raw = P.render_user_message({**SKETCH, "history": SKETCH["recent"][:1]}, CANDIDATE, "raw", 4.0)
    assert raw.startswith(P.RAW_HEADER + "\nAlien, Horror|Sci-Fi, 5.0\n\n") and "Heat" not in raw
    with pytest.raises(ValueError, match="unknown prompt variant"):
        P.render_user_message(SKETCH, CANDIDATE, "full", 4.0)


def test_render_prompt_modes(tokenizer):
    ao = P.render_prompt(tokenizer, SKETCH, CANDIDATE, "sketch", "answer_only", 4.0)
    cot = P.render_prompt(tokenizer, SKETCH, CANDIDATE, "sketch", "cot", 4.0)
    assert ao == cot + P.ANSWER_ONLY_SUFFIX and ao.endswith("\n<think>\n</think>\n<answer>")
    assert cot.endswith("<|im_start|>assistant\n") and P.SYSTEM_PROMPT in cot
    with pytest.raises(ValueError, match="unknown prompt mode"):
        P.render_prompt(tokenizer, SKETCH, CANDIDATE, "sketch", "greedy", 4.0)


def test_template_hash_tracks_the_template_and_the_prompt_settings(monkeypatch):
    from siren_batch.config import load_config

    cfg = load_config([], [])
    first = P.prompt_template_hash(cfg)
    assert len(first) == 12 and first == P.prompt_template_hash(load_config([], ["score.limit=5"]))
    for setting in ("prompts.priors=true", "score.variant=recent", "score.mode=cot"):
        assert P.prompt_template_hash(load_config([], [setting])) != first, setting
    # A setting counts only where it applies: the raw variant's history length, cot's prefill.
    assert P.prompt_template_hash(load_config([], ["prompts.raw_history_max=50"])) == first
    raw = P.prompt_template_hash(load_config([], ["score.variant=raw"]))
    assert P.prompt_template_hash(load_config([], ["score.variant=raw", "prompts.raw_history_max=50"])) != raw
    monkeypatch.setattr(P, "QUESTION", P.QUESTION + " Answer briefly.")
    assert P.prompt_template_hash(cfg) != first


# ---- build_prompts on Spark ---------------------------------------------------------

def _stat(k, name, mean):
    return (k, name, 1, mean)


def _pairs(spark, with_ts=True):
    recent_u1 = [("a", "Alien", "Horror|Sci-Fi", 5.0, 10), ("b", "Heat", None, 3.0, 20)]
    rows = [  # (user, item, ts, label, split, n_history, stats, liked, disliked, recent, user_mean,
              #  item_count, item_mean)
        ("u1", "c1", 30, 4.0, "test", 2, [], [_stat(0, "space opera", 5.0)], [], recent_u1, 4.0, 1, 5.0),
        ("u1", "c2", 30, 2.0, "test", 2, [], [_stat(0, "space opera", 5.0)], [], recent_u1, 4.0, 0, None),
        ("u2", "c1", 15, 5.0, "valid", 0, [], [], [], [], None, 0, None),
    ]
    return spark.createDataFrame(rows, schemas.EXAMPLE_SKETCHES)


def _items(spark):
    rows = [("a", "Alien", "Horror|Sci-Fi"), ("b", "Heat", None), ("c1", "Dune", "Sci-Fi"),
            ("c2", "Clue", "Comedy|Mystery")]
    return spark.createDataFrame([(i, t, g, t) for i, t, g in rows], schemas.ITEMS)


def test_build_prompts_counts_tokens_and_groups_users(spark, tokenizer):
    cfg = PromptsConfig(variants=["sketch", "recent"], modes=["answer_only", "cot"])
    out = P.build_prompts(_pairs(spark), _items(spark), cfg, theta=4.0).collect()
    assert len(out) == 3 * 2 * 2
    for row in out:
        assert row.prompt_tokens == len(tokenizer(row.prompt, add_special_tokens=False).input_ids)
        assert row.prompt.endswith(P.ANSWER_ONLY_SUFFIX) == (row.mode == "answer_only")
    users = [r.user_id for r in out]
    assert sorted(set(users)) == ["u1", "u2"] and sum(a != b for a, b in zip(users, users[1:])) == 1
    by_key = {(r.user_id, r.item_id, r.variant, r.mode): r for r in out}
    first, second = by_key[("u1", "c1", "sketch", "answer_only")], by_key[("u1", "c2", "sketch", "answer_only")]
    assert (first.label, first.split) == (4.0, "test")
    shared = os.path.commonprefix([first.prompt, second.prompt])
    assert shared.endswith("The candidate is described as: ")  # everything but the candidate is shared
    assert "- space opera" in shared and "Heat, 3.0" in shared
    assert "preference" not in by_key[("u1", "c1", "recent", "cot")].prompt


def test_think_prefill_opens_the_reasoning_in_cot_prompts_only(spark):
    cfg = PromptsConfig(modes=["answer_only", "cot"], think_prefill=True)
    out = {r.mode: r.prompt for r in P.build_prompts(_pairs(spark), _items(spark), cfg, 4.0).collect()
           if (r.user_id, r.item_id) == ("u1", "c1")}
    assert out["cot"].endswith("<|im_start|>assistant\n<think>\n")
    assert out["answer_only"] == out["cot"].removesuffix(P.THINK_PREFILL) + P.ANSWER_ONLY_SUFFIX
    assert P.answer_only_of(out["cot"]) == out["answer_only"]    # what stage 2's student reads


def test_build_prompts_with_priors(spark):
    cfg = PromptsConfig(priors=True)
    out = {(r.user_id, r.item_id): r.prompt for r in P.build_prompts(_pairs(spark), _items(spark), cfg, 4.0).collect()}
    assert "The user has rated 2 items before, 4.00 on average." in out[("u1", "c1")]
    assert "Dune, Sci-Fi\nEarlier ratings of this item: 1, 5.00 on average." in out[("u1", "c1")]
    assert "Clue, Comedy|Mystery\n" + P.ITEM_PRIOR_NONE in out[("u1", "c2")]
    assert P.USER_PRIOR_NONE in out[("u2", "c1")]


def test_candidate_pairs_without_label(spark):
    pairs = _pairs(spark).drop("label", "ts").withColumn("split", F.lit("candidates"))
    out = P.build_prompts(pairs, _items(spark), PromptsConfig(), theta=4.0).collect()
    assert len(out) == 3 and all(r.label is None and r.split == "candidates" for r in out)


def test_unknown_candidate_fails_loudly(spark):
    pairs = _pairs(spark).withColumn("item_id", F.when(F.col("user_id") == "u2", "zz").otherwise(F.col("item_id")))
    with pytest.raises(Exception, match=r"missing from the items table.*\(u2, zz\)"):
        P.build_prompts(pairs, _items(spark), PromptsConfig(), theta=4.0).collect()


def test_raw_variant_uses_only_earlier_history(spark):
    history = spark.createDataFrame(
        [("u1", "a", 5.0, 10, "train"), ("u1", "b", 3.0, 20, "train"), ("u1", "c1", 4.0, 30, "test"),
         ("u2", "c1", 5.0, 15, "test")], schemas.INTERACTIONS)
    cfg = PromptsConfig(variants=["raw"], modes=["cot"])
    out = {(r.user_id, r.item_id): r.prompt
           for r in P.build_prompts(_pairs(spark), _items(spark), cfg, 4.0, history).collect()}
    assert "Alien, Horror|Sci-Fi, 5.0\nHeat, 3.0\n\n" in out[("u1", "c1")]
    assert "Dune, Sci-Fi, 4.0" not in out[("u1", "c2")]  # same-ts row is not history
    assert P.RAW_HEADER not in out[("u2", "c1")]           # its only rating is the target
    last_one = P.build_prompts(_pairs(spark), _items(spark), PromptsConfig(
        variants=["raw"], modes=["cot"], raw_history_max=1), 4.0, history).where("user_id = 'u1'").collect()
    assert all("Heat, 3.0" in r.prompt and "Alien" not in r.prompt for r in last_one)
    with pytest.raises(ValueError, match="history"):
        P.build_prompts(_pairs(spark), _items(spark), cfg, 4.0)
