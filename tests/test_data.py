"""Readers and ingest: fixture files per source, plus the real ml-100k and siren-movies data."""

from __future__ import annotations

import dataclasses
import gzip
import json
import shutil
import uuid

import pandas as pd
import pytest
from pyspark.sql import functions as F

from siren_batch import assets, schemas
from siren_batch.config import ConfigError, load_config
from siren_batch.data import RejectsExceeded, ingest


def conf(tmp_path, *overrides):
    return load_config(overrides=[f"warehouse={tmp_path / 'wh'}", *overrides])


def collect(df):
    return df.toPandas()


def reconciled(counts):
    return all(counts[f"input_{s}"] == counts[f"kept_{s}"] + counts[f"rejected_{s}"] + counts[f"sampled_out_{s}"]
               for s in ("interactions", "items"))


# ---- MovieLens ---------------------------------------------------------------------

def python_kcore(df: pd.DataFrame, k: int) -> pd.DataFrame:
    while True:
        ok = (df.groupby("user_id")["item_id"].transform("size") >= k) & \
             (df.groupby("item_id")["user_id"].transform("size") >= k)
        if ok.all():
            return df
        df = df[ok]


@pytest.mark.integration   # reads the session's ml-100k chain
def test_movielens100k_full(ml100k):
    """The ingest stage of the session's ml-100k chain (conftest.ml100k) against pandas."""
    cfg, summaries = ml100k
    folder = assets.movielens_dir("ml-100k")
    raw = pd.read_csv(folder / "ml-100k.inter", sep="\t", dtype=str, quoting=3)
    raw.columns = ["user_id", "item_id", "rating", "ts"]
    n_items = sum(1 for _ in open(folder / "ml-100k.item")) - 1
    core = python_kcore(raw, 5)

    c = summaries["ingest"]
    assert (c["input_interactions"], c["users"], c["input_items"]) == (len(raw), raw.user_id.nunique(), n_items)
    assert c["kept_items"] == n_items and c["kept_interactions"] == len(core)
    assert c["rejected_interactions_kcore"] == len(raw) - len(core) and reconciled(c)
    got, items = (pd.read_parquet(cfg.table_path(name)) for name in ("interactions", "items"))
    assert list(got.columns) == schemas.INTERACTIONS.fieldNames() and len(got) == len(core)
    assert list(items.columns) == schemas.ITEMS.fieldNames() and len(items) == n_items

    per_user = got.groupby("user_id").split.value_counts().unstack(fill_value=0)
    assert (per_user["valid"] == 1).all() and (per_user["test"] == 1).all()
    latest = got.sort_values(["ts", "item_id"]).groupby("user_id").tail(1)
    assert (latest.split == "test").all()
    expected_ts = core.assign(ts=core.ts.astype("int64") * 1000).groupby("user_id").ts.max()
    assert (latest.set_index("user_id").ts.sort_index() == expected_ts.sort_index()).all()

    toy = items[items.item_id == "1"].iloc[0]
    assert (toy.title, toy.genres) == ("Toy Story (1995)", "Animation|Children's|Comedy")
    assert toy.text == "Toy Story (1995). Genres: Animation, Children's, Comedy"


def test_a_user_sample_keeps_what_a_full_run_keeps_for_its_users(spark, tmp_path):
    """data.sample_users: a hashed fifth of the users, each with exactly the rows and split a full
    run gives it (the k-core runs on every user first), the items they rated, and every row
    left out counted (input = kept + rejected + sampled out)."""
    from siren_batch.validate import in_user_sample

    folder = assets.movielens_dir("ml-100k")
    raw = pd.read_csv(folder / "ml-100k.inter", sep="\t", dtype=str, quoting=3)
    raw.columns = ["user_id", "item_id", "rating", "ts"]
    core = python_kcore(raw, 5)
    result = ingest(spark, conf(tmp_path, "dataset=ml-100k", "data.sample_users=0.2"))
    c, got, items = result.counts, collect(result.interactions), collect(result.items)
    users = set(got.user_id)
    assert 0.15 < len(users) / core.user_id.nunique() < 0.25 and c["users"] == len(users)
    mine = core[core.user_id.isin(users)]
    assert sorted(zip(got.user_id, got.item_id)) == sorted(zip(mine.user_id, mine.item_id))
    assert c["sampled_out_interactions"] == len(core) - len(got)
    assert c["rejected_interactions_kcore"] == len(raw) - len(core)
    assert set(items.item_id) == set(got.item_id) and c["sampled_out_items"] == c["input_items"] - len(items)
    assert reconciled(c)
    assert (got.groupby("user_id").split.value_counts().unstack(fill_value=0)[["valid", "test"]] == 1).all().all()
    # the same users on every run, and a larger share keeps a superset
    ids = spark.createDataFrame([(u,) for u in core.user_id.unique()], "user_id string")
    fifth = {r.user_id for r in ids.where(in_user_sample(0.2)).collect()}
    assert fifth == users and fifth < {r.user_id for r in ids.where(in_user_sample(0.3)).collect()}
    result.unpersist()
    with pytest.raises(ValueError, match="data.sample_users must be within"):
        conf(tmp_path, "data.sample_users=0")


def test_movielens1m_first_rows(spark, tmp_path):
    src = assets.movielens_dir("ml-1m")
    (tmp_path / "ml").mkdir()
    with open(src / "ml-1m.inter") as fin, open(tmp_path / "ml" / "ml-1m.inter", "w") as fout:
        fout.writelines(line for _, line in zip(range(3001), fin))
    shutil.copy(src / "ml-1m.item", tmp_path / "ml" / "ml-1m.item")
    raw = pd.read_csv(tmp_path / "ml" / "ml-1m.inter", sep="\t", dtype=str, quoting=3)

    result = ingest(spark, conf(tmp_path, "dataset=ml-1m", f"data.path={tmp_path / 'ml'}", "data.kcore=0"))
    c = result.counts
    assert c["input_interactions"] == c["kept_interactions"] == len(raw) == 3000 and reconciled(c)
    first = raw.iloc[0]
    row = collect(result.interactions.where(F.col("user_id") == first.iloc[0])
                  .where(F.col("item_id") == first.iloc[1]))
    assert row[["rating", "ts"]].values.tolist() == [[float(first.iloc[2]), int(first.iloc[3]) * 1000]]
    toy = collect(result.items.where("item_id = 'Toy Story (1995)'")).iloc[0]
    assert (toy.title, toy.genres) == ("Toy Story (1995)", "Animation|Children's|Comedy")


def test_split_source_needs_a_source_with_splits(spark, tmp_path):
    with pytest.raises(ConfigError, match="data.split=source"):
        ingest(spark, conf(tmp_path, "dataset=ml-100k", "data.split=source"))


# ---- siren-movies --------------------------------------------------------------------

def read_jsonl(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def test_siren_movies_keeps_the_release_split(spark, tmp_path, shared_movies):
    hist = read_jsonl(shared_movies / "history.jsonl.gz")
    rows = {s: read_jsonl(shared_movies / f"{s}.jsonl.gz") for s in ("train", "valid", "test")}
    n_hist = sum(len(h["history_asins"]) for h in hist)

    result = ingest(spark, conf(tmp_path, "dataset=siren-movies"))
    c = result.counts
    assert (c["split_train"], c["split_valid"], c["split_test"]) == \
        (n_hist, len(rows["valid"]), len(rows["test"]))
    assert n_hist > len(rows["train"]) and c["rejected_interactions"] == 0 and reconciled(c)

    got = collect(result.interactions)
    items = set(collect(result.items.select("item_id")).item_id)
    assert set(got[got.split != "train"].item_id) <= items and set(got.item_id) <= items
    # Ordering by ts reproduces each user's history, then valid, then test.
    order = got.sort_values(["user_id", "ts"]).groupby("user_id").item_id.apply(list)
    valid = {r["user_id"]: r["parent_asin"] for r in rows["valid"]}
    test = {r["user_id"]: r["parent_asin"] for r in rows["test"]}
    for h in hist:
        assert order[h["user_id"]] == h["history_asins"] + [valid[h["user_id"]], test[h["user_id"]]]
    known = {(r["user_id"], r["parent_asin"]): r["timestamp"] for r in rows["train"]}
    train = got[got.split == "train"]
    real_ts = [known.get((u, i), ts) == ts for u, i, ts in zip(train.user_id, train.item_id, train.ts)]
    assert all(real_ts)  # rows in train.jsonl keep their own timestamps

    title = next(line for line in hist[0]["history"].split("\n"))
    item = collect(result.items.where(f"item_id = '{hist[0]['history_asins'][0]}'")).iloc[0]
    name, cats = title.rsplit(", ", 1)[0].rsplit(", ", 1)
    assert (item.title, item.genres) == (name, cats)
    assert item.text == f"Title: {name}. Category: {', '.join(cats.split('|'))}."


# ---- Amazon Reviews 2023 ---------------------------------------------------------------

def write_jsonl(path, rows, opener=open):
    with opener(path, "wt") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")


def review(user, asin, rating, ts):
    return {"rating": rating, "title": "t", "text": "x", "asin": asin + "v", "parent_asin": asin,
            "user_id": user, "timestamp": ts, "helpful_vote": 0, "verified_purchase": True}


def test_amazon2023_reader(spark, tmp_path):
    write_jsonl(tmp_path / "reviews.jsonl", [
        review("u1", "P1", 5.0, 1000), review("u1", "P2", 3.0, 2000), review("u1", "P1", 1.0, 3000),
        review("u2", "P1", 4.0, 1500), review("u2", "P9", 4.0, 1600), review("u2", "P2", "five", 1700),
        '{"rating": 4.0, "user_id": "u3", broken'])
    write_jsonl(tmp_path / "meta.jsonl.gz", [
        {"parent_asin": "P1", "title": "Alien", "main_category": "Movies & TV",
         "categories": ["Movies & TV", "Sci-Fi"], "features": ["Widescreen.", "Color."],
         "description": [], "store": "Fox", "details": {"Format": "DVD"}},
        {"parent_asin": "P2", "title": "Heat", "main_category": "Movies & TV", "categories": [],
         "features": [], "description": ["d"], "store": None, "details": {}},
        {"parent_asin": "P3", "title": "", "main_category": "Movies & TV"}], gzip.open)

    cfg = conf(tmp_path, "dataset=amazon2023", f"data.path={tmp_path / 'reviews.jsonl'}",
               f"data.items_path={tmp_path / 'meta.jsonl.gz'}", "data.kcore=0", "data.max_reject_fraction=1")
    result = ingest(spark, cfg)
    got = collect(result.interactions).sort_values(["user_id", "item_id"])
    assert list(zip(got.user_id, got.item_id, got.rating, got.ts)) == [
        ("u1", "P1", 1.0, 3000), ("u1", "P2", 3.0, 2000), ("u2", "P1", 4.0, 1500)]
    rejects = collect(result.rejects)
    assert sorted(zip(rejects.source, rejects.reason)) == [
        ("interactions", "bad_rating"), ("interactions", "duplicate"),
        ("interactions", "malformed_json: not one JSON object"),
        ("interactions", "unknown_item"), ("items", "empty_text")]
    assert "broken" in rejects[rejects.reason.str.startswith("malformed_json")].record.iloc[0]
    items = collect(result.items).set_index("item_id")
    assert items.loc["P1"].text == "Title: Alien. Category: Movies & TV, Sci-Fi. Feature: Widescreen. Color."
    assert (items.loc["P2"].genres, items.loc["P2"].text) == ("Movies & TV", "Title: Heat. Category: Movies & TV.")
    assert result.counts["input_interactions"] == 7 and reconciled(result.counts)


# ---- generic tables --------------------------------------------------------------------

def write_tables(tmp_path, fmt, ratings):
    tmp_path = tmp_path / uuid.uuid4().hex[:8]  # new paths each call: no stale Spark cache
    tmp_path.mkdir()
    inter = pd.DataFrame({"uid": ["a", "a", "a", "b", "b"], "iid": ["1", "2", "3", "1", "2"],
                          "stars": ratings, "when": [10, 20, 30, 15, 25]})
    items = pd.DataFrame({"iid": ["1", "2", "3"], "name": ["One", "Two", "Three"],
                          "genres": ["x|y", None, "z"]})
    for name, frame in (("inter", inter), ("items", items)):
        path = tmp_path / f"{name}.{fmt}"
        if fmt == "csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)
    return [f"data.path={tmp_path / f'inter.{fmt}'}", f"data.items_path={tmp_path / f'items.{fmt}'}",
            f"data.format={fmt}", "data.columns.user_id=uid", "data.columns.item_id=iid",
            "data.columns.rating=stars", "data.columns.ts=when", "data.item_columns.item_id=iid",
            "data.item_columns.title=name", "data.source=table", "data.kcore=0"]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_table_source_with_column_mapping(spark, tmp_path, fmt):
    opts = write_tables(tmp_path, fmt, [4.0, 5.0, 3.0, 2.0, 1.0])
    result = ingest(spark, conf(tmp_path, *opts, "data.ts_unit=s"))
    got = collect(result.interactions).set_index(["user_id", "item_id"])
    assert got.loc[("a", "3")].tolist() == [3.0, 30000, "test"]
    assert got.loc[("b", "1")].split == "train" and len(got) == 5
    items = collect(result.items).set_index("item_id")
    assert items.loc["1"].text == "Title: One. Category: x, y." and items.loc["2"].text == "Title: Two."


def test_another_scale_is_mapped_onto_one_to_five(spark, tmp_path):
    """data.scale_min/scale_max: a 1-10 source lands on the model's 1-5 scale, linearly; a rating
    off the source's scale is a bad_rating reject, whatever it would map to."""
    opts = write_tables(tmp_path, "parquet", [10.0, 7.0, 1.0, 11.0, 5.5])
    result = ingest(spark, conf(tmp_path, *opts, "data.ts_unit=s", "data.scale_min=1", "data.scale_max=10",
                                "data.max_reject_fraction=1"))
    got = collect(result.interactions).set_index(["user_id", "item_id"]).rating.sort_index()
    assert got.tolist() == pytest.approx([5.0, 1 + 6 * 4 / 9, 1.0, 3.0]) and got.between(1, 5).all()
    assert result.counts["rejected_interactions_bad_rating"] == 1 and reconciled(result.counts)


def test_a_dry_run_never_replaces_a_full_run_nor_feeds_a_night(spark, tmp_path):
    from siren_batch import nightly, pipeline

    opts = [*write_tables(tmp_path, "parquet", [4.0, 5.0, 3.0, 2.0, 1.0]), "data.ts_unit=s"]
    pipeline.ingest(spark, conf(tmp_path, *opts))
    with pytest.raises(ConfigError, match="holds a full run's tables, which a dry run would replace; give the dry"):
        pipeline.ingest(spark, conf(tmp_path, *opts, "data.sample_users=0.99"))
    dry = load_config(overrides=[f"warehouse={tmp_path / 'dry'}", *opts, "data.sample_users=0.99"])
    assert pipeline.ingest(spark, dry)["sampled_out_interactions"] == 0   # both users kept: a 99% sample
    pipeline.ingest(spark, dry)                                             # a dry run again replaces a dry run
    night = dataclasses.replace(dry, data=dataclasses.replace(dry.data, sample_users=1.0))
    with pytest.raises(ConfigError, match=r"holds a dry run's tables \(data.sample_users=0.99\); a night needs"):
        nightly.run_night(spark, night, "2026-01-01")


def test_table_source_rejects_exceeded(spark, tmp_path):
    opts = write_tables(tmp_path, "parquet", [4.0, 9.0, 3.0, float("nan"), 1.0])
    with pytest.raises(RejectsExceeded, match="2 of 5 rows rejected"):
        ingest(spark, conf(tmp_path, *opts), check_rejects=True)
    opts = write_tables(tmp_path, "parquet", [4.0, 5.0, 3.0, 2.0, 1.0])
    result = ingest(spark, conf(tmp_path, *opts, "data.kcore=3"), check_rejects=True)  # kcore is no bad data
    assert result.counts["rejected_interactions_kcore"] == 5 and reconciled(result.counts)


def test_table_source_errors_name_the_config_key(spark, tmp_path):
    opts = write_tables(tmp_path, "parquet", [4.0, 5.0, 3.0, 2.0, 1.0])
    with pytest.raises(ConfigError, match=r"'score' \(rating\) not found .* set data.columns.rating=<column>"):
        ingest(spark, conf(tmp_path, *opts, "data.columns.rating=score"))
    with pytest.raises(ConfigError, match=r"data.items_path: .*nope.parquet does not exist"):
        ingest(spark, conf(tmp_path, *opts, f"data.items_path={tmp_path / 'nope.parquet'}"))
