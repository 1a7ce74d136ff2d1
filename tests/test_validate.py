"""Row checks, k-core and the leave-last-out split on 3-5-row frames."""

from __future__ import annotations

import json

import pytest
from pyspark.sql import functions as F

from siren_batch import validate
from siren_batch.data import RejectsExceeded, check_reject_fraction


def raw_inter(spark, rows, defects=None):
    """rows: (user_id, item_id, rating, ts, split) as text; record = the row as JSON;
    defects: {row index: the reader's reason}."""
    data = [(*r, json.dumps(r), (defects or {}).get(i)) for i, r in enumerate(rows)]
    return spark.createDataFrame(data, validate.RAW_INTERACTIONS)


def items_df(spark, ids=("i1", "i2", "i3")):
    return spark.createDataFrame([(i, f"T{i}", None, f"T{i}.") for i in ids],
                                 "item_id string, title string, genres string, text string")


def run(spark, rows, *, defects=None, source_split=False, ts_unit="ms", items=None):
    kept, rejects = validate.validate_interactions(
        raw_inter(spark, rows, defects), items or items_df(spark), rating_min=1.0, rating_max=5.0,
        ts_unit=ts_unit, source_split=source_split)
    return kept.collect(), rejects.collect()


def test_valid_rows_are_kept_typed_and_trimmed(spark):
    kept, rejects = run(spark, [("u1", "i1", "4", "1000", None), (" u1 ", "i2", "2.5", "2", None),
                                ("u2", "i3", "5.0", "3.9", None)], ts_unit="s")
    assert rejects == []
    got = sorted((r.user_id, r.item_id, r.rating, r.ts) for r in kept)
    assert got == [("u1", "i1", 4.0, 1_000_000), ("u1", "i2", 2.5, 2000), ("u2", "i3", 5.0, 3900)]


@pytest.mark.parametrize("bad_row, reason", [
    (("", "i1", "4", "10", None), "missing_id"),
    (("u1", None, "4", "10", None), "missing_id"),
    (("u1", "i1", "abc", "10", None), "bad_rating"),
    (("u1", "i1", "NaN", "10", None), "bad_rating"),
    (("u1", "i1", "5.5", "10", None), "bad_rating"),
    (("u1", "i1", None, "10", None), "bad_rating"),
    (("u1", "i1", "4", None, None), "bad_timestamp"),
    (("u1", "i1", "4", "yesterday", None), "bad_timestamp"),
    (("u1", "i1", "4", "-1", None), "bad_timestamp"),
    (("u1", "i1", "4", "1e20", None), "bad_timestamp"),
    (("u1", "i9", "4", "10", None), "unknown_item"),
])
def test_each_bad_value_is_rejected_with_its_reason(spark, bad_row, reason):
    kept, rejects = run(spark, [bad_row, ("u2", "i2", "3", "20", None)])
    assert [r.item_id for r in kept] == ["i2"]
    assert [(r.source, r.reason) for r in rejects] == [("interactions", reason)]
    assert json.loads(rejects[0].record) == list(bad_row)  # the raw row, untouched


def test_malformed_rows_are_rejected_even_when_values_look_fine(spark):
    kept, rejects = run(spark, [("u1", "i1", "4", "10", None), ("u2", "i2", "3", "20", None)],
                        defects={0: "malformed_line: 5 fields, header has 4"})
    assert [r.user_id for r in kept] == ["u2"]
    assert [r.reason for r in rejects] == ["malformed_line: 5 fields, header has 4"]


def test_a_malformed_row_takes_no_part_in_deduplication(spark):
    # The malformed row is the latest by ts: it must neither win nor push the real row out.
    kept, rejects = run(spark, [("u1", "i1", "4", "10", None), ("u1", "i1", "5", "99", None)],
                        defects={1: "malformed_json: not one JSON object"})
    assert [(r.rating, r.ts) for r in kept] == [(4.0, 10)]
    assert [r.reason for r in rejects] == ["malformed_json: not one JSON object"]


def test_reason_counts_are_per_code(spark):
    rejects = spark.createDataFrame(
        [("interactions", "malformed_line: 5 fields, header has 4", "a"),
         ("interactions", "malformed_line: unbalanced quote", "b"), ("interactions", "bad_rating", "c"),
         ("items", "malformed_json: not one JSON object", "d")], "source string, reason string, record string")
    codes = rejects.select("source", validate.reason_code(F.col("reason")).alias("code")).collect()
    assert [(r.source, r.code) for r in codes] == [
        ("interactions", "malformed_line"), ("interactions", "malformed_line"),
        ("interactions", "bad_rating"), ("items", "malformed_json")]


def test_first_failing_check_wins(spark):
    _, rejects = run(spark, [("", "i9", "abc", "-1", None), ("u1", "i9", "abc", "-1", None),
                             ("u1", "i9", "4", "-1", None)])
    assert sorted(r.reason for r in rejects) == ["bad_rating", "bad_timestamp", "missing_id"]


def test_bad_split_only_checked_for_source_splits(spark):
    rows = [("u1", "i1", "4", "10", "holdout"), ("u1", "i2", "4", "11", "test")]
    kept, rejects = run(spark, rows, source_split=True)
    assert [(r.item_id, r.split) for r in kept] == [("i2", "test")]
    assert [r.reason for r in rejects] == ["bad_split"]
    kept, rejects = run(spark, rows, source_split=False)
    assert len(kept) == 2 and rejects == [] and {r.split for r in kept} == {None}


def test_duplicates_keep_the_latest_then_the_higher_rating(spark):
    kept, rejects = run(spark, [("u1", "i1", "2", "10", None), ("u1", "i1", "3", "30", None),
                                ("u1", "i1", "5", "30", None), ("u2", "i1", "1", "5", None)])
    assert sorted((r.user_id, r.rating, r.ts) for r in kept) == [("u1", 5.0, 30), ("u2", 1.0, 5)]
    assert [r.reason for r in rejects] == ["duplicate", "duplicate"]


def test_a_rejected_row_does_not_count_as_the_kept_duplicate(spark):
    kept, rejects = run(spark, [("u1", "i1", "9", "99", None), ("u1", "i1", "3", "10", None)])
    assert [(r.rating, r.ts) for r in kept] == [(3.0, 10)]
    assert [r.reason for r in rejects] == ["bad_rating"]


def test_input_equals_kept_plus_rejected(spark):
    rows = [("u1", "i1", "4", "10", None), ("u1", "i1", "4", "11", None), ("u2", "i9", "4", "1", None),
            ("u3", "i2", "x", "1", None), (None, "i3", "1", "1", None)]
    kept, rejects = run(spark, rows)
    assert len(kept) + len(rejects) == len(rows)
    assert len(kept) == 1


def raw_items(spark, rows, defects=None):
    data = [(*r, json.dumps(r), (defects or {}).get(i)) for i, r in enumerate(rows)]
    return spark.createDataFrame(data, validate.RAW_ITEMS)


@pytest.mark.parametrize("bad_row, reason", [
    ((" ", "T", None, "T."), "missing_id"),
    (("i2", "", None, "x"), "empty_text"),
    (("i2", "T", None, None), "empty_text"),
    (("i1", "T-b", None, "T-b."), "duplicate"),
])
def test_items_rejects(spark, bad_row, reason):
    items, rejects = validate.validate_items(raw_items(spark, [("i1", "T-a", " ", "T-a."), bad_row]))
    assert [(r.item_id, r.title, r.genres) for r in items.collect()] == [("i1", "T-a", None)]
    assert [(r.source, r.reason) for r in rejects.collect()] == [("items", reason)]


def test_malformed_items_rejected(spark):
    items, rejects = validate.validate_items(
        raw_items(spark, [("i1", "A", "g", "A."), ("i2", "B", "g", "B.")],
                  defects={1: "malformed_line: unbalanced quote"}))
    assert [r.item_id for r in items.collect()] == ["i1"]
    assert [r.reason for r in rejects.collect()] == ["malformed_line: unbalanced quote"]


def pairs(spark, rows):
    return spark.createDataFrame([(u, i, 4.0, n, "x") for n, (u, i) in enumerate(rows)],
                                 "user_id string, item_id string, rating double, ts long, record string")


def test_kcore_iterates_until_stable(spark):
    # k=2: i3 has one rating -> (u3, i3) goes; then u3 has one left -> (u3, i2) goes too.
    rows = [("u1", "i1"), ("u1", "i2"), ("u2", "i1"), ("u2", "i2"), ("u3", "i2"), ("u3", "i3")]
    kept, rejects = validate.kcore_filter(pairs(spark, rows), 2)
    assert sorted((r.user_id, r.item_id) for r in kept.collect()) == rows[:4]
    rej = rejects.collect()
    assert sorted(r.record for r in rej) == ["x", "x"] and {r.reason for r in rej} == {"kcore"}
    assert kept.columns == ["user_id", "item_id", "rating", "ts", "record"]


def test_kcore_zero_is_off_and_too_high_removes_all(spark):
    df = pairs(spark, [("u1", "i1"), ("u1", "i2"), ("u2", "i1")])
    kept, rejects = validate.kcore_filter(df, 0)
    assert kept.count() == 3 and rejects.count() == 0
    kept, rejects = validate.kcore_filter(df, 3)
    assert kept.count() == 0 and rejects.count() == 3


def test_leave_last_out_split(spark):
    df = spark.createDataFrame(
        [("u1", "a", 1), ("u1", "b", 5), ("u1", "c", 5), ("u1", "d", 2),  # b/c tie on ts: c is later
         ("u2", "a", 1), ("u2", "b", 2)],                                   # < 3 rows: all train
        "user_id string, item_id string, ts long")
    got = {(r.user_id, r.item_id): r.split for r in validate.leave_last_out_split(df).collect()}
    assert got == {("u1", "a"): "train", ("u1", "d"): "train", ("u1", "b"): "valid",
                   ("u1", "c"): "test", ("u2", "a"): "train", ("u2", "b"): "train"}


def test_parse_ts_units(spark):
    df = spark.createDataFrame([("1.5",), ("2024-01-01T00:00:01Z",)], "ts string")
    ms, s, iso = df.select(validate.parse_ts("ts", "ms"), validate.parse_ts("ts", "s"),
                           validate.parse_ts("ts", "iso")).collect()[0]
    assert (ms, s, iso) == (1.5, 1500.0, None)
    assert df.select(validate.parse_ts("ts", "iso").alias("t")).collect()[1].t == 1704067201000


def _counts(**bad):
    counts = {f"rejected_{src}_{r}": 0 for src, reasons in
              (("interactions", validate.INTERACTION_REASONS), ("items", validate.ITEM_REASONS))
              for r in reasons}
    counts.update(input_interactions=100, input_items=10, **bad)
    return counts


def test_reject_fraction_limit(spark):
    check_reject_fraction(_counts(rejected_interactions_bad_rating=5), 0.05)  # at the limit: fine
    check_reject_fraction(_counts(rejected_interactions_kcore=90), 0.05)      # kcore does not count
    with pytest.raises(RejectsExceeded, match=r"interactions: 6 of 100 .*bad_rating=4, duplicate=2"):
        check_reject_fraction(_counts(rejected_interactions_bad_rating=4,
                                      rejected_interactions_duplicate=2), 0.05)
    with pytest.raises(RejectsExceeded, match=r"items: 1 of 10"):
        check_reject_fraction(_counts(rejected_items_empty_text=1), 0.05)
