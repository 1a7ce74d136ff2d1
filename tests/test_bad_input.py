"""Bad input, each kind in a 3-5-row file with its reject reason; input rows = kept + rejected.

Delimited files (table CSV, MovieLens TSV) and JSON Lines (Amazon 2023, siren-movies)
reject a bad line as a row; a Parquet column of the wrong type fails the whole read.
"""

from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path

import pandas as pd
import pytest

from siren_batch import pipeline, schemas
from siren_batch.config import ConfigError, load_config
from siren_batch.data import ingest
from siren_batch.warehouse import read_table

RELAXED = ["data.kcore=0", "data.max_reject_fraction=1"]  # small files: keep every row, never fail


def folder(tmp_path):
    path = tmp_path / uuid.uuid4().hex[:8]  # new paths each call: no stale Spark cache
    path.mkdir()
    return path


def run(spark, tmp_path, *overrides):
    return ingest(spark, load_config(overrides=[f"warehouse={tmp_path / 'wh'}", *RELAXED, *overrides]))


def rejects(result):
    return sorted((r.source, r.reason, r.record) for r in result.rejects.collect())


def kept(result):
    return sorted((r.user_id, r.item_id, r.rating, r.ts) for r in result.interactions.collect())


def assert_reconciled(result, inputs, items):
    c = result.counts
    assert (c["input_interactions"], c["input_items"]) == (inputs, items)
    for s in ("interactions", "items"):
        assert c[f"input_{s}"] == c[f"kept_{s}"] + c[f"rejected_{s}"]


# ---- CSV (data.source=table) -----------------------------------------------------------

ITEMS_CSV = "item_id,title\ni1,One\ni2,Two\ni3,Three\n"


def csv_source(tmp_path, inter, items=ITEMS_CSV):
    d = folder(tmp_path)
    (d / "inter.csv").write_bytes(inter.encode())
    (d / "items.csv").write_bytes(items.encode())
    return [f"data.path={d / 'inter.csv'}", f"data.items_path={d / 'items.csv'}", "data.format=csv",
            "data.source=table"]


# Each defect once, all in one file (one ingest: each costs seconds of fixed Spark cost).
CSV_DEFECTS = [
    ("u1,i1,5,900,oops", "malformed_line: 5 fields, header has 4"),  # later ts: would win de-duplication
    ("u1,i1,5", "malformed_line: 3 fields, header has 4"),
    ('u1,"i1,5,900', "malformed_line: unbalanced quote"),           # mid-line: swallows nothing below
    ('u1,i1,5,"900', "malformed_line: unbalanced quote"),           # last field: Spark's CSV reads 900
    ('u1,i1,"5"x,900', "malformed_line: unbalanced quote"),         # text after a closing quote
]


def test_csv_malformed_lines_are_each_one_reject_with_its_reason(spark, tmp_path):
    """A good line after every bad one: no defect swallows the line below it or wins the
    de-duplication of (u1, i1) with its later timestamp."""
    good = [("u1", "i1", 4, 100), *[(f"u{k + 2}", f"i{k % 3 + 1}", k % 5 + 1, 200 + k)
                                    for k in range(len(CSV_DEFECTS))]]
    lines = ["user_id,item_id,rating,ts", ",".join(map(str, good[0]))]
    for (bad, _), row in zip(CSV_DEFECTS, good[1:]):
        lines += [bad, ",".join(map(str, row))]
    result = run(spark, tmp_path, *csv_source(tmp_path, "\n".join(lines) + "\n"))
    assert kept(result) == sorted((u, i, float(r), t) for u, i, r, t in good)
    assert rejects(result) == sorted(("interactions", reason, bad) for bad, reason in CSV_DEFECTS)  # the raw line
    assert result.counts["rejected_interactions_malformed_line"] == len(CSV_DEFECTS)
    assert_reconciled(result, len(good) + len(CSV_DEFECTS), 3)


def test_csv_good_lines_rfc4180_crlf_blank_and_repeated_header(spark, tmp_path):
    inter = 'user_id,item_id,rating,ts\r\nu1,i1,4,100\r\n\r\nuser_id,item_id,rating,ts\r\n"u,2",i2,3,200\r\n'
    items = 'item_id,title\ni1,"Heat, the ""director\'s"" cut"\ni2,12" Vinyl\n'
    result = run(spark, tmp_path, *csv_source(tmp_path, inter, items))
    assert kept(result) == [("u,2", "i2", 3.0, 200), ("u1", "i1", 4.0, 100)] and rejects(result) == []
    titles = sorted(r.title for r in result.items.collect())
    assert titles == ['12" Vinyl', 'Heat, the "director\'s" cut']  # a quote inside a field is a character
    assert_reconciled(result, 2, 2)  # the blank line and the repeated header are no rows


def test_csv_malformed_item_line(spark, tmp_path):
    items = "item_id,title\ni1,One\ni2,Two,extra\ni3,Three\n"
    result = run(spark, tmp_path, *csv_source(tmp_path, "user_id,item_id,rating,ts\nu1,i1,4,100\nu1,i2,3,200\n", items))
    assert rejects(result) == [
        ("interactions", "unknown_item", '{"user_id":"u1","item_id":"i2","rating":"3","ts":"200"}'),
        ("items", "malformed_line: 3 fields, header has 2", "i2,Two,extra")]
    assert_reconciled(result, 2, 3)


def test_ingest_run_record_reconciles_with_item_rejects(spark, tmp_path):
    items = "item_id,title\ni1,One\ni2,Two,extra\n"
    cfg = load_config(overrides=[f"warehouse={tmp_path / 'wh'}", *RELAXED, *csv_source(
        tmp_path, "user_id,item_id,rating,ts\nu1,i1,4,100\nu1,i2,3,200\n", items)])
    summary = pipeline.ingest(spark, cfg)
    run = read_table(spark, cfg, "runs", schemas.RUNS).toPandas().iloc[-1]
    assert (run.input_rows, run.output_rows, run.rejected_rows) == (2, 1, 1)  # item rejects not mixed in
    assert (summary["rejected_items"], read_table(spark, cfg, "rejects", schemas.REJECTS).count()) == (1, 2)


# ---- MovieLens TSV (RecBole atomic files; a quote is a plain character) ---------------

def test_movielens_tsv_malformed_lines(spark, tmp_path):
    d = folder(tmp_path)
    (d / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                     "1\t10\t4\t100\n1\t11\t5\t200\t7\n2\t10\t3\n2\t12\t2\t300\n")
    (d / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                                    '10\tDr. "Strange\t1964\tComedy\n11\tHeat\t1995\n12\tAlien\t1979\tHorror Sci-Fi\n')
    result = run(spark, tmp_path, "dataset=ml-100k", f"data.path={d}")
    assert kept(result) == [("1", "10", 4.0, 100_000), ("2", "12", 2.0, 300_000)]
    assert [(s, r) for s, r, _ in rejects(result)] == [
        ("interactions", "malformed_line: 3 fields, header has 4"),
        ("interactions", "malformed_line: 5 fields, header has 4"),
        ("items", "malformed_line: 3 fields, header has 4")]
    assert {r.item_id: r.title for r in result.items.collect()}["10"] == 'Dr. "Strange (1964)'
    assert_reconciled(result, 4, 3)


# ---- Amazon Reviews 2023 JSONL -------------------------------------------------------------

def review(user, asin, rating=4.0, ts=1000):
    return json.dumps({"rating": rating, "parent_asin": asin, "user_id": user, "timestamp": ts})


META = [{"parent_asin": "P1", "title": "Alien", "categories": ["Sci-Fi"]},
        {"parent_asin": "P2", "title": "Heat", "categories": []}]


def amazon_source(tmp_path, reviews, meta=None):
    d = folder(tmp_path)
    (d / "reviews.jsonl").write_text("".join(f"{r}\n" for r in reviews))
    (d / "meta.jsonl").write_text("".join(f"{m if isinstance(m, str) else json.dumps(m)}\n" for m in meta or META))
    return ["dataset=amazon2023", f"data.path={d / 'reviews.jsonl'}", f"data.items_path={d / 'meta.jsonl'}"]


NOT_ONE = "malformed_json: not one JSON object"


AMAZON_DEFECTS = [
    ('{"rating": 5.0, "user_id": "u1", broken', NOT_ONE),              # truncated
    (review("u1", "P1", 5.0, 9000) + " trailing", NOT_ONE),        # Spark alone keeps the first object
    (review("u1", "P1", 5.0, 9000) + review("u3", "P2"), NOT_ONE),  # two records glued: one row, one reject
    (f'[{review("u3", "P1")}, {review("u4", "P2")}]', NOT_ONE),    # Spark alone makes two rows
    ('"u1"', NOT_ONE),                                              # not an object
    (json.dumps({"rating": 5.0, "parent_asin": "P1", "user_id": ["u1"], "timestamp": 1}),
     "malformed_json: user_id is an array or object, not a value"),
    (json.dumps({"rating": {"stars": 5}, "parent_asin": "P1", "user_id": "u3", "timestamp": 1}), "bad_rating"),
]


def test_amazon_review_defects_are_each_one_reject_with_its_reason(spark, tmp_path):
    """Every defect in one file: none of them adds a row (u3, u4 or a later u1/P1)."""
    reviews = [review("u1", "P1"), *(bad for bad, _ in AMAZON_DEFECTS), review("u2", "P2", 3.0, 2000)]
    result = run(spark, tmp_path, *amazon_source(tmp_path, reviews))
    assert kept(result) == [("u1", "P1", 4.0, 1000), ("u2", "P2", 3.0, 2000)]
    got = rejects(result)
    assert sorted((s, r) for s, r, _ in got) == sorted(("interactions", r) for _, r in AMAZON_DEFECTS)
    # a malformed line is its own record (a row with a bad rating is the parsed row)
    assert {rec for _, r, rec in got if r != "bad_rating"} == {b for b, r in AMAZON_DEFECTS if r != "bad_rating"}
    assert_reconciled(result, len(reviews), 2)


def test_amazon_meta_field_of_the_wrong_type(spark, tmp_path):
    bad = json.dumps({"parent_asin": "P3", "title": "Up", "categories": "Animation"})  # not an array
    result = run(spark, tmp_path, *amazon_source(tmp_path, [review("u1", "P1"), review("u1", "P3")], [*META, bad, ""]))
    assert rejects(result) == [
        ("interactions", "unknown_item", '{"rating":"4.0","parent_asin":"P3","user_id":"u1","timestamp":"1000"}'),
        ("items", "malformed_json: a field does not have its declared type", bad)]
    assert_reconciled(result, 2, 3)  # the blank line is no row


def test_amazon_fields_ingest_never_reads_are_neither_kept_nor_checked(spark, tmp_path):
    """A review's title and text (most of a category's bytes) stay out of the rows and the
    reject records, and a meta field nothing reads (description, price, details) rejects
    nothing whatever its type."""
    wordy = json.dumps({"rating": 5.0, "parent_asin": "P9", "user_id": "u1", "timestamp": 1000, "title": "Great",
                        "text": "a long review " * 50, "helpful_vote": "many", "verified_purchase": "yes"})
    odd = {"parent_asin": "P2", "title": "Heat", "categories": [], "description": "not a list", "price": "None",
           "details": {"Runtime": [170, "min"]}}
    result = run(spark, tmp_path, *amazon_source(tmp_path, [review("u1", "P1"), review("u1", "P2"), wordy],
                                                 [META[0], odd]))
    assert rejects(result) == [
        ("interactions", "unknown_item", '{"rating":"5.0","parent_asin":"P9","user_id":"u1","timestamp":"1000"}')]
    assert_reconciled(result, 3, 2)


# ---- siren-movies JSONL.gz ------------------------------------------------------------------

def write_gz(path, lines):
    with gzip.open(path, "wt") as f:
        f.writelines(f"{line if isinstance(line, str) else json.dumps(line)}\n" for line in lines)


def test_siren_movies_malformed_lines(spark, tmp_path):
    d = folder(tmp_path)
    good = {"user_id": "u1", "history": "A, c1, 4\nB, c2, 3\nC, c1, 5", "history_asins": ["A", "B", "C"],
            "history_ratings": [4, 3, 5]}
    uneven = {"user_id": "u2", "history": "A, c1, 2\nB, c2, 3", "history_asins": ["A", "B", "C"],
              "history_ratings": [2, 3]}  # cannot be zipped: which rating or title goes with C?
    no_ratings = {"user_id": "u3", "history": "F, c1, 4", "history_asins": ["F"]}   # a field missing
    empty = {"user_id": "u4", "history": "", "history_asins": [], "history_ratings": []}   # nothing to lose
    # The public repository's first commits name two files *_balanced; gunzipped files read too.
    write_gz(d / "history_balanced.jsonl.gz", [good, uneven, no_ratings, empty])
    row = {"user_id": "u1", "parent_asin": "C", "timestamp": 3000, "label": 5.0, "target": "C, c1"}
    write_gz(d / "train.jsonl.gz", [row])
    # A category path whose last part holds ", "; a title with U+0085 (a mis-decoded "...").
    write_gz(d / "valid.jsonl.gz", [{**row, "parent_asin": "D", "timestamp": 4000,
                                     "target": "D [DVD], Movies & TV|Music Artists|Presley, Elvis"},
                                    '{"user_id": "u2", "parent_asin": "D"'])
    (d / "test.jsonl").write_text(json.dumps({**row, "parent_asin": "E", "timestamp": 5000,
                                              "target": "E\u0085 Cut, c2"}) + "\n")
    result = run(spark, tmp_path, "dataset=siren-movies", f"data.path={d}")
    assert [i for _, i, _, _ in kept(result)] == ["A", "B", "C", "D", "E"]
    assert rejects(result) == [
        ("interactions", "malformed_json: 1 history_asins, 0 history_ratings, 1 history lines", json.dumps(no_ratings)),
        ("interactions", "malformed_json: 3 history_asins, 2 history_ratings, 2 history lines", json.dumps(uneven)),
        ("interactions", NOT_ONE, '{"user_id": "u2", "parent_asin": "D"')]
    # u1: 2 history-only + train + valid + test; u2: 1 + 1; u3: 1; items A-E
    assert_reconciled(result, 8, 5)
    titles = {r.item_id: (r.title, r.genres) for r in result.items.collect()}
    assert titles["D"] == ("D [DVD]", "Movies & TV|Music Artists|Presley, Elvis")
    assert titles["E"] == ("E\u0085 Cut", "c2")


def test_siren_release_files_by_name(spark, tmp_path):
    from siren_batch.readers.siren_movies import release_file

    d = folder(tmp_path)
    for name in ("history.jsonl.gz", "history_balanced.jsonl.gz", "test_balanced.jsonl", "valid.jsonl"):
        (d / name).write_text("")
    assert [Path(release_file(spark, str(d), n)).name for n in ("history", "test", "valid")] == [
        "history.jsonl.gz", "test_balanced.jsonl", "valid.jsonl"]
    with pytest.raises(ConfigError, match=r"has no train.jsonl.gz / train.jsonl / train_balanced.jsonl.gz / "
                                          r"train_balanced.jsonl; a SIREN release folder holds history, train"):
        release_file(spark, str(d), "train")


# ---- Parquet: a column of the wrong type is a file problem (one line) ----------------------

def parquet_source(tmp_path, inter: pd.DataFrame | list[pd.DataFrame]):
    d = folder(tmp_path)
    if isinstance(inter, list):  # a folder of part files
        (d / "inter").mkdir()
        for n, part in enumerate(inter):
            part.to_parquet(d / "inter" / f"part-{n}.parquet", index=False)
    else:
        inter.to_parquet(d / "inter", index=False)
    pd.DataFrame({"item_id": ["i1", "i2"], "title": ["One", "Two"]}).to_parquet(d / "items", index=False)
    return [f"data.path={d / 'inter'}", f"data.items_path={d / 'items'}", "data.source=table"]


def inter_frame(**columns):
    base = {"user_id": ["u1", "u2", "u3"], "item_id": ["i1", "i2", "i1"], "rating": [4.0, 3.0, 5.0],
            "ts": [100, 200, 300]}
    return pd.DataFrame({**base, **columns})


@pytest.mark.parametrize("columns, message", [
    ({"rating": [{"stars": 4}, {"stars": 3}, {"stars": 5}]},
     r"column 'rating' \(rating\) in .* is struct<stars:bigint>; rating needs a number or string column"),
    ({"rating": [[4.0], [3.0], [5.0]]}, r"is array<double>; rating needs a number or string column"),
    ({"item_id": [1.0, 2.0, 1.0]}, r"\(item_id\) .* is double; item_id needs a string or integer column"),
    ({"ts": pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03"]).as_unit("ms")},
     r"\(ts\) .* is timestamp.*set data.ts_unit=iso"),
    ({"ts": pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03"]).as_unit("ns")},
     r"data.path: .* has a column of a Parquet type Spark cannot read \(INT64 \(TIMESTAMP\(NANOS,false\)\)\)"),
], ids=["rating_struct", "rating_array", "float_id", "timestamp_ts_not_iso", "nanosecond_timestamp"])
def test_parquet_column_of_the_wrong_type(spark, tmp_path, columns, message):
    with pytest.raises(ConfigError, match=message):
        run(spark, tmp_path, *parquet_source(tmp_path, inter_frame(**columns)))


def test_parquet_timestamp_column_with_ts_unit_iso(spark, tmp_path):
    times = pd.to_datetime(["2024-01-01 00:00:00", "2024-01-02 00:00:00", "1970-01-01 00:00:01"]).as_unit("us")
    frame = inter_frame(ts=times, rating=["4", "x", "5"])
    result = run(spark, tmp_path, *parquet_source(tmp_path, frame), "data.ts_unit=iso")
    assert kept(result) == [("u1", "i1", 4.0, 1704067200000), ("u3", "i1", 5.0, 1000)]
    assert [r for _, r, _ in rejects(result)] == ["bad_rating"]
    assert_reconciled(result, 3, 2)


def test_parquet_part_files_that_disagree_on_a_type(spark, tmp_path):
    parts = [inter_frame(), inter_frame(rating=["4", "3", "5"])]
    with pytest.raises(ConfigError, match=r"data.path: the Parquet files in .* disagree on a column's type "
                                          r'\("DOUBLE" and "STRING"\); rewrite them with one schema'):
        run(spark, tmp_path, *parquet_source(tmp_path, parts))


# ---- a truncated or corrupt Parquet file among the inputs: one line naming it, nothing written ----

def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":               # the footer is gone
        data = data[: len(data) // 2]
    elif how == "corrupt_footer":        # the footer's metadata is garbage, its length and magic intact
        end = len(data) - 8
        data[end - 40:end] = b"\xff" * 40
    else:                                # corrupt_pages: the first data page's header is garbage
        data[4:40] = b"\xff" * 36
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "corrupt_footer", "corrupt_pages"])
def test_a_damaged_parquet_file_fails_in_one_line_naming_it(spark, tmp_path, capsys, how):
    from siren_batch.cli import main

    frames = [inter_frame(), inter_frame(user_id=["u4", "u5", "u6"])]
    overrides = parquet_source(tmp_path, frames)
    damaged = tmp_path / overrides[0].split("=", 1)[1].split("/")[-2] / "inter" / "part-1.parquet"
    _damage(damaged, how)
    wh = tmp_path / "wh"
    assert main(["ingest", f"warehouse={wh}", "dataset=damaged", *RELAXED, *overrides]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("siren-batch")]
    assert len(err) == 1 and "cannot read input file" in err[0] and str(damaged) in err[0], err
    written = {p.name for p in (wh / "damaged").iterdir()} if (wh / "damaged").exists() else set()
    assert written <= {"runs"}, f"tables written despite the failure: {written}"
