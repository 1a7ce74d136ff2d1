"""data.ingest_counts (one aggregation) equals the counts taken one by one and catches lost
rows; write_table's row count from Parquet footers equals Spark's count."""

from __future__ import annotations

import pytest
from pyspark.sql import functions as F

from siren_batch import data, schemas
from siren_batch.warehouse import parquet_rows, read_table, write_table


def _frames(spark, with_items: bool):
    raw = spark.createDataFrame([("u1", "i1"), ("u1", "i2"), ("u2", "i1"), ("u3", "i9"), ("", "i1")],
                                "user_id string, item_id string")
    kept = spark.createDataFrame([("u1", "i1", 4.0, 1, "train"), ("u1", "i2", 3.0, 2, "train"),
                                  ("u2", "i1", 5.0, 3, "train")],
                                 "user_id string, item_id string, rating double, ts long, split string")
    rejects = [("interactions", "unknown_item", "u3,i9"), ("interactions", "missing_id: user_id", ",i1")]
    if with_items:
        raw_items = spark.createDataFrame([("i2",), ("i3",)], "item_id string")
        items = spark.createDataFrame([("i2", "T", None, "T")], schemas.ITEMS)
        rejects.append(("items", "empty_text", "i3,,"))
    else:
        raw_items = spark.createDataFrame([], "item_id string")
        items = spark.createDataFrame([], schemas.ITEMS)
    return raw, raw_items, kept, items, spark.createDataFrame(rejects, schemas.REJECTS)


@pytest.mark.parametrize("with_items", [True, False])
def test_ingest_counts_equal_the_counts_one_by_one(spark, with_items):
    raw, raw_items, kept, items, rejects = _frames(spark, with_items)
    kept = kept.withColumn("split", F.when(F.col("ts") == 3, "test").otherwise(F.col("split")))
    counted = rejects.groupBy("source", "reason").count().collect()
    reasons = {(r.source, r.reason.split(":")[0]): r["count"] for r in counted}
    counts = data.ingest_counts(raw, raw_items, kept, items, rejects)
    for source, frames in {"interactions": (raw, kept), "items": (raw_items, items)}.items():
        assert counts[f"input_{source}"] == frames[0].count() and counts[f"kept_{source}"] == frames[1].count()
        assert counts[f"rejected_{source}"] == sum(n for (s, _), n in reasons.items() if s == source)
        for reason in data.REJECT_REASONS[source]:
            assert counts[f"rejected_{source}_{reason}"] == reasons.get((source, reason), 0)
    assert counts["rejected_interactions_missing_id"] == 1                  # the code, not "missing_id: user_id"
    assert (counts["users"], counts["interacted_items"]) == (2, 2)
    assert (counts["split_train"], counts["split_valid"], counts["split_test"]) == (2, 0, 1)


def test_ingest_counts_reconcile_the_rows_a_user_sample_leaves_out(spark):
    raw, raw_items, kept, items, rejects = _frames(spark, True)
    out = (kept.where(F.col("user_id") == "u2"), items.limit(1))
    counts = data.ingest_counts(raw, raw_items, kept.where(F.col("user_id") != "u2"), items.subtract(out[1]),
                                rejects, out)
    assert (counts["sampled_out_interactions"], counts["sampled_out_items"]) == (out[0].count(), 1)
    assert counts["kept_interactions"] + counts["sampled_out_interactions"] == kept.count() and counts["users"] == 1
    with pytest.raises(RuntimeError, match=r"input 5 != kept 1 \+ rejected 2 \+ sampled out 1"):
        data.ingest_counts(raw, raw_items, kept.limit(1), items, rejects, (out[0], items.limit(0)))


def test_ingest_counts_catch_lost_rows(spark):
    raw, raw_items, kept, items, rejects = _frames(spark, True)
    with pytest.raises(RuntimeError, match="interactions: input 5 != kept 2"):
        data.ingest_counts(raw, raw_items, kept.limit(2), items, rejects)


def test_parquet_rows_from_footers(spark, cfg):
    df = spark.range(57).select(F.col("id").cast("string").alias("user_id"), (F.col("id") % 3).alias("part"))
    df.repartition(4).write.partitionBy("part").parquet(f"{cfg.warehouse}/plain")
    assert parquet_rows(spark, f"{cfg.warehouse}/plain") == 57
    items = spark.createDataFrame([(f"i{n}", "t", None, "t") for n in range(11)], schemas.ITEMS)
    rows = write_table(items.repartition(3), cfg, "items", schemas.ITEMS)
    assert rows == 11 == read_table(spark, cfg, "items", schemas.ITEMS).count()


@pytest.mark.parametrize("fresh_rows", [2, 10**9])   # keys broadcast, or (a huge night) left to Spark
def test_merge_replaces_stored_rows_by_key(spark, fresh_rows):
    from siren_batch.nightly.night import _merge

    stored = spark.createDataFrame([("u1", "i1", 1.0), ("u1", "i2", 2.0), ("u2", "i1", 3.0)],
                                   "user_id string, item_id string, rating double")
    fresh = spark.createDataFrame([("u1", "i2", 5.0), ("u3", "i1", 4.0)],
                                  "user_id string, item_id string, rating double")
    merged = _merge(stored, fresh, ["user_id", "item_id"], fresh_rows)
    assert sorted(tuple(r) for r in merged.collect()) == [("u1", "i1", 1.0), ("u1", "i2", 5.0), ("u2", "i1", 3.0),
                                                          ("u3", "i1", 4.0)]
