"""TOPICS and ITEM_TOPICS: K-means over ALL item embeddings, each cluster named.

SIREN (seeds/000): K=20 clusters over every item, each named from the M=100 items
nearest its centroid. Clustering runs on Spark MLlib; naming runs on the driver
over K*M collected rows (see siren_batch/topic_names.py).

Distance, everywhere in this module: the euclidean distance ||e - c||_2 between an
item's embedding e and a topic centroid c (the mean of its members' embeddings,
so not unit length). With unit-normalised embeddings, ordering one topic's items
by distance is the same as ordering them by cosine similarity to its centroid.

Empty clusters (MLlib keeps a center that lost all its points; k-means|| may also
return fewer than k centers) are dropped, and the kept topics are renumbered
0..n-1 by size, largest first (ties: MLlib's cluster order), so ids stay contiguous.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from siren_batch import schemas
from siren_batch.config import TopicsConfig
from siren_batch.topic_names import name_topics

logger = logging.getLogger(__name__)


def _fit_kmeans(vectors: DataFrame, cfg: TopicsConfig):
    from pyspark.ml.clustering import KMeans

    kmeans = KMeans(k=cfg.k, seed=cfg.seed, maxIter=cfg.max_iter, featuresCol="features",
                    predictionCol="cluster", distanceMeasure="euclidean")
    return kmeans.fit(vectors)  # MLlib persists its own copy of the input while it iterates


def _renumber(sizes: dict[int, int], n_centers: int) -> dict[int, int]:
    """MLlib cluster index -> topic id: non-empty clusters only, largest first.

    >>> _renumber({0: 5, 2: 9, 3: 5}, 4)
    {2: 0, 0: 1, 3: 2}
    """
    kept = sorted((c for c in range(n_centers) if sizes.get(c, 0) > 0), key=lambda c: (-sizes[c], c))
    return {cluster: topic_id for topic_id, cluster in enumerate(kept)}


def _euclidean(a, b):
    """SQL expression: ||a - b||_2 over two equal-length numeric arrays."""
    squares = F.zip_with(a, b, lambda x, y: (x - y) * (x - y))
    return F.sqrt(F.aggregate(squares, F.lit(0.0), lambda acc, v: acc + v))


def nearest_items(item_topics: DataFrame, items: DataFrame, m: int) -> pd.DataFrame:
    """The m items nearest each centroid, collected to the driver (K*m rows):
    pandas frame topic_id, rank (1 = nearest), item_id, title, genres."""
    by_distance = Window.partitionBy("topic_id").orderBy("distance", "item_id")
    top = (
        item_topics.withColumn("rank", F.row_number().over(by_distance))
        .where(F.col("rank") <= m)
        .join(items.select("item_id", "title", "genres"), on="item_id", how="inner")
        .select("topic_id", "rank", "item_id", "title", "genres")
    )
    return top.toPandas().sort_values(["topic_id", "rank"], ignore_index=True)


def build_topics(embeddings: DataFrame, items: DataFrame, cfg: TopicsConfig) -> tuple[DataFrame, DataFrame]:
    """Cluster ITEM_EMBEDDINGS into TOPICS (topic_id, name, size, centroid) and
    ITEM_TOPICS (item_id, topic_id, distance), one row per embedded item.

    `embeddings` is scanned several times (fit, sizes, naming, and again when the
    returned frames are written): pass a table-backed or cached frame.
    """
    from pyspark.ml.functions import array_to_vector

    spark = embeddings.sparkSession
    if embeddings.isEmpty():  # MLlib would fail deep inside with "Nothing has been added to this summarizer"
        raise ValueError("build_topics: the embeddings frame is empty; run embed_items on a non-empty items table")
    # k-means|| samples its initial centres per partition: the same items in the same
    # partitions, in the same order, give the same topics on a laptop and on a cluster
    # (tests/test_cluster.py), whatever files the embeddings table happens to be in.
    vectors = (embeddings.repartition(cfg.fit_partitions, "item_id").sortWithinPartitions("item_id")
               .select("item_id", "embedding", array_to_vector("embedding").alias("features")))
    model = _fit_kmeans(vectors, cfg)
    centers = [np.asarray(c, dtype=np.float64) for c in model.clusterCenters()]
    predicted = model.transform(vectors)
    sizes = {r["cluster"]: r["count"] for r in predicted.groupBy("cluster").count().collect()}
    topic_of = _renumber(sizes, len(centers))
    if len(topic_of) < cfg.k:
        logger.warning("k-means: only %d of k=%d clusters are non-empty; the rest are dropped", len(topic_of), cfg.k)

    centroid_rows = [(cluster, topic_id, centers[cluster].tolist()) for cluster, topic_id in topic_of.items()]
    centroids = spark.createDataFrame(centroid_rows, "cluster int, topic_id int, centroid array<double>")
    item_topics = (
        predicted.join(F.broadcast(centroids), on="cluster", how="inner")
        .select("item_id", "topic_id", _euclidean(F.col("embedding"), F.col("centroid")).alias("distance"))
    )
    names = name_topics(nearest_items(item_topics, items, cfg.name_top_m), sorted(topic_of.values()), cfg)
    topic_rows = [(topic_id, names[topic_id], sizes[cluster], centers[cluster].tolist())
                  for cluster, topic_id in sorted(topic_of.items(), key=lambda kv: kv[1])]
    logger.info("topics: %d kept of k=%d, sizes %d..%d", len(topic_rows), cfg.k,
                min(r[2] for r in topic_rows), max(r[2] for r in topic_rows))
    topics = spark.createDataFrame(topic_rows, schemas.TOPICS)
    return topics, item_topics


def assign_topics(embeddings: DataFrame, topics: DataFrame) -> DataFrame:
    """ITEM_TOPICS for (new) embeddings: nearest kept centroid, no re-clustering.

    Same distance as build_topics; an exact tie goes to the lower topic id.
    """
    rows = topics.select("topic_id", "centroid").orderBy("topic_id").collect()
    if not rows:
        raise ValueError("assign_topics: the topics frame is empty; run build_topics first")
    topic_ids = np.array([r["topic_id"] for r in rows], dtype=np.int32)
    centroids = np.array([r["centroid"] for r in rows], dtype=np.float64)
    c_sq = (centroids ** 2).sum(axis=1)

    def assign(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            n = batch.num_rows
            if n == 0:
                continue
            flat = batch.column("embedding").flatten().to_numpy(zero_copy_only=False)
            if flat.size != n * centroids.shape[1]:
                raise ValueError(f"assign_topics: embeddings are not all {centroids.shape[1]}-dimensional "
                                 "like the centroids; were they made by another encoder?")
            x = flat.reshape(n, -1).astype(np.float64)
            # ||x||^2 is constant per row, so argmin over -2x.c + ||c||^2 picks the nearest centroid.
            nearest = np.argmin(c_sq[None, :] - 2.0 * x @ centroids.T, axis=1)
            distance = np.linalg.norm(x - centroids[nearest], axis=1)  # exact, not the expansion
            yield pa.RecordBatch.from_arrays(
                [batch.column("item_id"), pa.array(topic_ids[nearest]), pa.array(distance)],
                names=["item_id", "topic_id", "distance"])

    return embeddings.select("item_id", "embedding").mapInArrow(assign, schemas.ITEM_TOPICS)
