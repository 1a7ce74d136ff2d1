"""bench-scale's input: a dataset replicated with fresh user ids (tiny, in Spark)."""

from __future__ import annotations

from siren_batch.bench_scale import replicate
from siren_batch.config import load_config
from siren_batch.data import ingest
from siren_batch.warehouse import write_table
from siren_batch import schemas


def test_replicate_gives_fresh_users_the_same_items_and_ratings(spark, tmp_path):
    inter = tmp_path / "inter.csv"
    inter.write_text("user_id,item_id,rating,ts\nu1,i1,4,100\nu1,i2,2,200\nu2,i1,5,150\n")
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\ni1,One\ni2,Two\n")
    cfg = load_config(overrides=[f"warehouse={tmp_path / 'wh'}", "dataset=tiny", "data.source=table",
                                 "data.format=csv", f"data.path={inter}", f"data.items_path={items}",
                                 "data.kcore=0"])
    result = ingest(spark, cfg)
    write_table(result.interactions, cfg, "interactions", schemas.INTERACTIONS)
    write_table(result.items, cfg, "items", schemas.ITEMS)
    assert replicate(spark, cfg, 3, str(tmp_path / "x3")) == 9
    out = spark.read.parquet(str(tmp_path / "x3" / "interactions")).toPandas()
    assert sorted(out.user_id.unique()) == ["u1~0", "u1~1", "u1~2", "u2~0", "u2~1", "u2~2"]
    for copy in range(3):   # every copy is the original, ratings and times included
        mine = out[out.user_id.str.endswith(f"~{copy}")].assign(user_id=lambda d: d.user_id.str[:2])
        assert sorted(map(tuple, mine[["user_id", "item_id", "rating", "ts"]].values)) == \
            [("u1", "i1", 4.0, 100), ("u1", "i2", 2.0, 200), ("u2", "i1", 5.0, 150)]
    assert spark.read.parquet(str(tmp_path / "x3" / "items")).count() == 2
