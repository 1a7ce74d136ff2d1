"""Sketches: expected values worked out by hand on 3-6 row frames, then checked
against a pandas recomputation on real MovieLens-100K."""

from __future__ import annotations

import zlib

import pandas as pd
import pytest

from siren_batch import schemas
from siren_batch.config import SketchesConfig
from siren_batch.sketches import example_sketches, serving_sketches

TOPIC_NAMES = {0: "space opera", 1: "courtroom drama", 2: "slapstick"}


def _frames(spark, rows, item_topic):
    """rows: (user, item, rating, ts, split); item_topic: item -> topic (None = no topic)."""
    inter = spark.createDataFrame([(u, i, float(r), t, s) for u, i, r, t, s in rows], schemas.INTERACTIONS)
    items = spark.createDataFrame(
        [(i, f"Title {i}", None if i == "i1" else "Drama|War", f"Title {i}.") for i in sorted(item_topic)],
        schemas.ITEMS)
    topics_of = spark.createDataFrame(
        [(i, k, 0.1) for i, k in item_topic.items() if k is not None], schemas.ITEM_TOPICS)
    topics = spark.createDataFrame([(k, n, 1, [0.0]) for k, n in TOPIC_NAMES.items()], schemas.TOPICS)
    return inter, items, topics_of, topics


def _by_item(df):
    return {r.item_id: r for r in df.collect()}


def _names(stats):
    return [s.name for s in stats]


# user u1: topic 0 rated 5, 3; topic 1 rated 2 and 4 at the SAME ts; then a valid and a test target.
TIMELINE = [("u1", "i1", 5, 100, "train"), ("u1", "i2", 3, 200, "train"),
            ("u1", "i3", 2, 300, "train"), ("u1", "i4", 4, 300, "train"),
            ("u1", "i5", 4, 400, "valid"), ("u1", "i6", 5, 500, "test")]
TOPIC_OF = {"i1": 0, "i2": 0, "i3": 1, "i4": 1, "i5": 0, "i6": 2}


def test_example_sketch_sees_only_strictly_earlier_rows(spark):
    out = _by_item(example_sketches(*_frames(spark, TIMELINE, TOPIC_OF), SketchesConfig(recent_n=3)))
    assert set(out) == {"i1", "i2", "i3", "i4", "i5", "i6"}
    assert out["i1"].n_history == 0 and out["i1"].topic_stats == [] and out["i1"].recent == []
    # i3 and i4 share ts=300: neither sees the other, both see i1 and i2 only.
    for target in ("i3", "i4"):
        row = out[target]
        assert row.n_history == 2
        assert [r.item_id for r in row.recent] == ["i1", "i2"]
        assert [(s.topic_id, s["count"], s.mean) for s in row.topic_stats] == [(0, 2, 4.0)]
    # i5 (valid) sees the four train rows: topic 0 mean (5+3)/2=4 liked, topic 1 mean (2+4)/2=3 disliked.
    valid = out["i5"]
    assert valid.label == 4.0 and valid.split == "valid" and valid.n_history == 4
    assert [(s.topic_id, s.name, s["count"], s.mean) for s in valid.topic_stats] == \
        [(0, "space opera", 2, 4.0), (1, "courtroom drama", 2, 3.0)]
    assert _names(valid.liked) == ["space opera"] and _names(valid.disliked) == ["courtroom drama"]
    assert [r.item_id for r in valid.recent] == ["i2", "i3", "i4"]  # last 3, oldest first
    # the valid item is history for the test target; no target is in its own sketch
    test = out["i6"]
    assert test.n_history == 5 and [r.item_id for r in test.recent] == ["i3", "i4", "i5"]
    assert [(s.topic_id, s["count"]) for s in test.topic_stats] == [(0, 3), (1, 2)]
    for item, row in out.items():
        assert item not in [r.item_id for r in row.recent]
        assert all(r.ts < row.ts for r in row.recent)


def test_priors_use_only_strictly_earlier_ratings(spark):
    # i2 is rated by three users: u2 at 150 (4), u3 at 200 (2, the same ts as u1's target), u1 at 200 (3).
    rows = TIMELINE + [("u2", "i2", 4, 150, "train"), ("u3", "i2", 2, 200, "train"), ("u3", "i1", 1, 50, "train")]
    out = {(r.user_id, r.item_id): r for r in
           example_sketches(*_frames(spark, rows, TOPIC_OF), SketchesConfig(recent_n=3)).collect()}
    # item priors: i2 as of ts 200 sees only u2's 4 (u3's same-second 2 and u1's own 3 are excluded)
    assert (out[("u1", "i2")].item_count, out[("u1", "i2")].item_mean) == (1, 4.0)
    assert (out[("u2", "i2")].item_count, out[("u2", "i2")].item_mean) == (0, None)
    assert (out[("u1", "i1")].item_count, out[("u1", "i1")].item_mean) == (1, 1.0)   # u3's 1 at ts 50
    # user priors: u1's mean before the valid target = (5 + 3 + 2 + 4) / 4, before the first one: none
    assert (out[("u1", "i5")].n_history, out[("u1", "i5")].user_mean) == (4, 3.5)
    assert out[("u1", "i1")].user_mean is None
    serving = {r.user_id: r for r in serving_sketches(*_frames(spark, rows, TOPIC_OF), SketchesConfig()).collect()}
    assert serving["u1"].user_mean == pytest.approx(23 / 6)


def test_item_priors_cover_all_history(spark):
    from siren_batch.sketches import item_priors

    inter = _frames(spark, TIMELINE + [("u2", "i1", 1, 50, "train")], TOPIC_OF)[0]
    out = {r.item_id: (r.item_count, r.item_mean) for r in item_priors(inter).collect()}
    assert out["i1"] == (2, 3.0) and out["i6"] == (1, 5.0)


def test_recent_carries_title_genres_rating(spark):
    out = _by_item(example_sketches(*_frames(spark, TIMELINE, TOPIC_OF), SketchesConfig(recent_n=10)))
    first, second = out["i3"].recent
    assert (first.title, first.genres, first.rating, first.ts) == ("Title i1", None, 5.0, 100)
    assert (second.title, second.genres, second.rating) == ("Title i2", "Drama|War", 3.0)
    assert len(out["i6"].recent) == 5


def test_example_splits_select_targets_but_history_keeps_every_split(spark):
    cfg = SketchesConfig(recent_n=2, example_splits=["test"])
    out = _by_item(example_sketches(*_frames(spark, TIMELINE, TOPIC_OF), cfg))
    assert list(out) == ["i6"]
    assert [r.item_id for r in out["i6"].recent] == ["i4", "i5"]


# topic 0: 5, 3 (mean 4.0, majority tie); topic 1: 5, 5, 1 (mean 3.67, 2 vs 1); topic 2: 2 (mean 2.0, 0 vs 1)
RULES = [("u", "a", 5, 1, "train"), ("u", "b", 3, 2, "train"), ("u", "c", 5, 3, "train"),
         ("u", "d", 5, 4, "train"), ("u", "e", 1, 5, "train"), ("u", "f", 2, 6, "train"),
         ("u", "g", 4, 7, "test")]
RULES_TOPIC = {"a": 0, "b": 0, "c": 1, "d": 1, "e": 1, "f": 2, "g": 2}


@pytest.mark.parametrize("rule, liked, disliked", [
    ("mean", ["space opera"], ["slapstick", "courtroom drama"]),     # disliked: mean ascending
    ("majority", ["courtroom drama"], ["slapstick"]),                 # topic 0 tie dropped
])
def test_liked_disliked_rules(spark, rule, liked, disliked):
    cfg = SketchesConfig(rule=rule, recent_n=0, example_splits=["test"])
    row = _by_item(example_sketches(*_frames(spark, RULES, RULES_TOPIC), cfg))["g"]
    assert row.recent == [] and row.n_history == 6
    assert _names(row.liked) == liked and _names(row.disliked) == disliked
    assert [s["count"] for s in row.topic_stats] == [2, 3, 1]
    assert row.topic_stats[1].mean == pytest.approx(11 / 3)


def test_serving_sketch_is_as_of_the_end(spark):
    # liked ties: topics 0 and 1 both mean 5.0; topic 1 has more ratings so it leads.
    rows = [("u", "a", 5, 10, "train"), ("u", "c", 5, 20, "train"), ("u", "d", 5, 30, "valid"),
            ("u", "x", 1, 40, "test"), ("v", "b", 3, 5, "train")]
    topic_of = {"a": 0, "b": 0, "c": 1, "d": 1, "x": None}
    out = {r.user_id: r for r in serving_sketches(*_frames(spark, rows, topic_of),
                                                  SketchesConfig(recent_n=3)).collect()}
    u = out["u"]
    assert u.as_of_ts == 40 and u.n_history == 4  # the topic-less item x still counts
    assert [r.item_id for r in u.recent] == ["c", "d", "x"] and u.recent[2].title == "Title x"
    assert _names(u.liked) == ["courtroom drama", "space opera"] and u.disliked == []
    assert [(s.topic_id, s["count"]) for s in u.topic_stats] == [(0, 1), (1, 2)]
    assert out["v"].n_history == 1 and _names(out["v"].disliked) == ["space opera"]


def test_liked_ties_break_on_topic_id(spark):
    rows = [("u", "c", 4, 1, "train"), ("u", "a", 4, 2, "train"), ("u", "f", 5, 3, "train")]
    out = serving_sketches(*_frames(spark, rows, {"a": 0, "c": 1, "f": 2}), SketchesConfig()).collect()
    assert [s.topic_id for s in out[0].liked] == [2, 0, 1]


def test_topic_names_keep_quotes_and_backslashes(spark):
    # Topic names come from item text (topic_names.py); the sketch columns are built as SQL text.
    inter, items, topics_of, _ = _frames(spark, [("u", "a", 5, 1, "train"), ("u", "b", 1, 2, "train")],
                                         {"a": 0, "b": 1})
    names = {0: "it's \\d+ \"noir\"", 1: "a\\'b"}
    topics = spark.createDataFrame([(k, n, 1, [0.0]) for k, n in names.items()], schemas.TOPICS)
    row = serving_sketches(inter, items, topics_of, topics, SketchesConfig()).first()
    assert _names(row.topic_stats) == [names[0], names[1]]
    assert _names(row.liked) == [names[0]] and _names(row.disliked) == [names[1]]


def test_empty_topics_fail_loudly(spark):
    inter, items, topics_of, topics = _frames(spark, TIMELINE, TOPIC_OF)
    with pytest.raises(ValueError, match="topics table is empty"):
        example_sketches(inter, items, topics_of, topics.limit(0), SketchesConfig())


# ---- integration: MovieLens-100K against a pandas recomputation --------------------

def _ml100k(spark, n_topics=20):
    from siren_batch.assets import movielens_dir

    folder = movielens_dir("ml-100k")
    raw = pd.read_csv(folder / "ml-100k.inter", sep="\t")
    raw.columns = ["user_id", "item_id", "rating", "ts"]
    raw = raw.astype({"user_id": str, "item_id": str, "rating": float})
    raw["ts"] = raw["ts"].astype("int64") * 1000
    order = raw.sort_values(["user_id", "ts", "item_id"])
    rank = order.groupby("user_id").cumcount(ascending=False)
    raw["split"] = rank.map({0: "test", 1: "valid"}).reindex(raw.index).fillna("train")
    item_ids = sorted(raw["item_id"].unique())
    topic = {i: zlib.crc32(i.encode()) % n_topics for i in item_ids}
    inter = spark.createDataFrame(raw[["user_id", "item_id", "rating", "ts", "split"]], schemas.INTERACTIONS)
    items = spark.createDataFrame([(i, f"movie {i}", "Drama", f"movie {i}.") for i in item_ids], schemas.ITEMS)
    item_topics = spark.createDataFrame([(i, k, 0.0) for i, k in topic.items()], schemas.ITEM_TOPICS)
    topics = spark.createDataFrame([(k, f"topic {k}", 1, [0.0]) for k in range(n_topics)], schemas.TOPICS)
    return raw.assign(topic=raw["item_id"].map(topic)), (inter, items, item_topics, topics)


def test_ml100k_matches_pandas_recomputation(spark):
    raw, frames = _ml100k(spark)
    cfg = SketchesConfig(recent_n=10)
    users = sorted(raw["user_id"].unique())[::40]  # 24 users, all their targets
    got = example_sketches(*frames, cfg).where(f"user_id in ({','.join(repr(u) for u in users)})").collect()
    assert len(got) == int(raw["user_id"].isin(users).sum())
    by_user = {u: g.sort_values(["ts", "item_id"]) for u, g in raw[raw["user_id"].isin(users)].groupby("user_id")}
    for row in got:
        mine = by_user[row.user_id]
        hist = mine[mine["ts"] < row.ts]
        assert row.n_history == len(hist)
        stats = hist.groupby("topic")["rating"].agg(["count", "mean"]).sort_index()
        assert [(s.topic_id, s["count"]) for s in row.topic_stats] == list(zip(stats.index, stats["count"]))
        assert [s.mean for s in row.topic_stats] == pytest.approx(list(stats["mean"]))
        assert {s.topic_id for s in row.liked} == set(stats.index[stats["mean"] >= 4.0])
        assert {s.topic_id for s in row.disliked} == set(stats.index[stats["mean"] < 4.0])
        assert [r.item_id for r in row.recent] == list(hist["item_id"].tail(10))
        assert row.item_id not in {r.item_id for r in row.recent}  # no sketch contains its target


def test_ml100k_serving_matches_last_rows(spark):
    raw, frames = _ml100k(spark)
    got = {r.user_id: r for r in serving_sketches(*frames, SketchesConfig(recent_n=5)).collect()}
    assert len(got) == raw["user_id"].nunique()
    for user in sorted(got)[::50]:
        mine = raw[raw["user_id"] == user].sort_values(["ts", "item_id"])
        assert got[user].n_history == len(mine) and got[user].as_of_ts == mine["ts"].max()
        assert [r.item_id for r in got[user].recent] == list(mine["item_id"].tail(5))
