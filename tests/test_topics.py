"""build_topics / assign_topics on planted clusters, naming, and ml-100k end to end."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from siren_batch import schemas
from siren_batch.config import TopicsConfig
from siren_batch.topics import assign_topics, build_topics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PLANTED = ["slasher", "western", "musical"]  # one keyword per planted cluster
PER_CLUSTER = 4


def _planted(seed: int = 0, noise: float = 0.05):
    """3 well-separated unit-vector clusters in 8 dims; item i of cluster c is 'c<c>-<i>'."""
    rng = np.random.default_rng(seed)
    rows, truth = [], {}
    for c in range(len(PLANTED)):
        for i in range(PER_CLUSTER):
            v = np.eye(8)[c] + noise * rng.standard_normal(8)
            rows.append((f"c{c}-{i}", (v / np.linalg.norm(v)).astype(np.float32).tolist()))
            truth[f"c{c}-{i}"] = c
    return rows, truth


def _items(spark, ids):
    rows = [(i, f"{PLANTED[int(i[1])].title()} Night {i[-1]} (1990)", "Drama|Comedy", "x") for i in ids]
    return spark.createDataFrame(rows, schemas.ITEMS)


@pytest.fixture(scope="module")
def planted(spark):
    rows, truth = _planted()
    emb = spark.createDataFrame(rows, schemas.ITEM_EMBEDDINGS).cache()
    topics, item_topics = build_topics(emb, _items(spark, truth), TopicsConfig(k=3, seed=7, max_iter=20))
    return emb, truth, topics.toPandas(), item_topics.toPandas()


def test_build_topics_recovers_planted_clusters(planted):
    _, truth, topics, item_topics = planted
    assert sorted(item_topics["item_id"]) == sorted(truth)  # every item once
    pairs = {(truth[r.item_id], r.topic_id) for r in item_topics.itertuples()}
    assert len(pairs) == 3 and len({c for c, _ in pairs}) == 3 and len({t for _, t in pairs}) == 3
    assert sorted(topics["topic_id"]) == [0, 1, 2]
    assert topics["size"].sum() == len(truth)
    assert item_topics.groupby("topic_id").size().to_dict() == dict(zip(topics["topic_id"], topics["size"]))
    for cluster, topic_id in pairs:  # the name carries the planted title word
        assert PLANTED[cluster] in topics.set_index("topic_id").loc[topic_id, "name"]


def test_distance_and_centroid_match_numpy(planted):
    emb, _, topics, item_topics = planted
    vectors = {r["item_id"]: np.asarray(r["embedding"], dtype=np.float64) for r in emb.collect()}
    centroids = {r.topic_id: np.asarray(r.centroid) for r in topics.itertuples()}
    for r in item_topics.itertuples():
        assert r.distance == pytest.approx(np.linalg.norm(vectors[r.item_id] - centroids[r.topic_id]), abs=1e-9)
    for topic_id, members in item_topics.groupby("topic_id")["item_id"]:
        mean = np.mean([vectors[i] for i in members], axis=0)
        assert np.allclose(centroids[topic_id], mean, atol=1e-6)


def test_same_seed_same_topics(spark, planted):
    emb, truth, topics, item_topics = planted
    again_topics, again_items = build_topics(emb, _items(spark, truth), TopicsConfig(k=3, seed=7, max_iter=20))
    again = again_items.toPandas().sort_values("item_id", ignore_index=True)
    assert again["topic_id"].tolist() == item_topics.sort_values("item_id")["topic_id"].tolist()
    assert again_topics.toPandas()["name"].tolist() == topics["name"].tolist()


def test_assign_topics_reproduces_build_and_places_new_items(spark, planted):
    emb, _, topics, item_topics = planted
    topics_df = spark.createDataFrame(topics, schemas.TOPICS)
    assigned = assign_topics(emb, topics_df).toPandas().merge(item_topics, on="item_id", how="inner")
    assert len(assigned) == len(item_topics)
    assert (assigned["topic_id_x"] == assigned["topic_id_y"]).all()
    assert np.allclose(assigned["distance_x"], assigned["distance_y"], atol=1e-9)
    new_rows, new_truth = _planted(seed=99, noise=0.1)  # fresh points around the same planted centers
    new = assign_topics(spark.createDataFrame(new_rows, schemas.ITEM_EMBEDDINGS), topics_df).toPandas()
    topic_of_cluster = {int(i[1]): t for i, t in zip(item_topics["item_id"], item_topics["topic_id"])}
    assert all(topic_of_cluster[new_truth[r.item_id]] == r.topic_id for r in new.itertuples())


def test_assign_topics_failures(spark, planted):
    emb, _, _, _ = planted
    with pytest.raises(ValueError, match="empty"):
        assign_topics(emb, spark.createDataFrame([], schemas.TOPICS))
    wrong_dims = spark.createDataFrame([(0, "t", 1, [1.0, 0.0])], schemas.TOPICS)
    with pytest.raises(Exception, match="dimensional"):
        assign_topics(emb, wrong_dims).collect()


def test_duplicate_points_give_contiguous_ids_without_empty_topics(spark):
    rows = [(f"i{i}", [1.0, 0.0] if i % 2 else [0.0, 1.0]) for i in range(6)]  # 2 distinct points, k=4
    emb = spark.createDataFrame(rows, schemas.ITEM_EMBEDDINGS)
    topics, item_topics = build_topics(emb, _items(spark, []), TopicsConfig(k=4, seed=1, max_iter=5))
    t = topics.toPandas()
    assert sorted(t["topic_id"]) == list(range(len(t))) and len(t) <= 2
    assert (t["size"] > 0).all() and t["size"].sum() == 6 and item_topics.count() == 6
    assert t["name"].str.len().gt(0).all() and t["name"].is_unique  # no items to name from: "topic <id>"


def test_build_topics_rejects_empty_embeddings(spark):
    with pytest.raises(ValueError, match="empty"):
        build_topics(spark.createDataFrame([], schemas.ITEM_EMBEDDINGS), _items(spark, []), TopicsConfig(k=3))


@pytest.mark.integration
def test_ml100k_embed_and_topics(ml100k):
    """The session's ml-100k chain (tests/conftest.py): every item embedded (all-MiniLM-L6-v2,
    384 dims) and in exactly one of 15-20 named topics (k=20; an empty cluster is dropped)."""
    cfg, _ = ml100k
    tables = Path(cfg.warehouse) / cfg.dataset
    emb, t, it = (pd.read_parquet(tables / name) for name in ("item_embeddings", "topics", "item_topics"))
    assert len(emb) == 1682 and emb["item_id"].is_unique and emb["embedding"].map(len).eq(384).all()
    assert cfg.topics.k == 20
    assert len(it) == 1682 and it["item_id"].is_unique and set(it["item_id"]) == set(emb["item_id"])
    assert sorted(t["topic_id"]) == list(range(len(t))) and 15 <= len(t) <= 20
    assert t["size"].sum() == 1682 and set(it["topic_id"]) == set(t["topic_id"])
    assert t["name"].is_unique and t["name"].str.strip().str.len().gt(0).all()
    assert all(len(c) == 384 for c in t["centroid"])
