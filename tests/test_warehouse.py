import pytest

from pyspark.sql import types as T

from siren_batch import warehouse as W

SCHEMA = T.StructType([T.StructField("k", T.StringType()), T.StructField("run_date", T.StringType())])


def test_write_is_atomic_and_replaces(spark, cfg):
    df = spark.createDataFrame([("a", "d1"), ("b", "d1")], SCHEMA)
    assert W.write_table(df, cfg, "t", SCHEMA) == 2
    assert W.write_table(df.limit(1), cfg, "t", SCHEMA) == 1
    assert W.read_table(spark, cfg, "t", SCHEMA).count() == 1
    assert W.path_exists(spark, cfg.table_path("t") + "/_config.yaml")
    assert W.list_dir(spark, f"{cfg.warehouse}/{cfg.dataset}/_staging") == []


def test_partition_replace_keeps_other_partitions(spark, cfg):
    df = spark.createDataFrame([("a", "d1"), ("b", "d2")], SCHEMA)
    W.write_table(df, cfg, "p", SCHEMA, partition_by=["run_date"])
    W.write_table(spark.createDataFrame([("c", "d2"), ("e", "d2")], SCHEMA), cfg, "p", SCHEMA,
                  partition_by=["run_date"])
    rows = sorted(tuple(r) for r in W.read_table(spark, cfg, "p").collect())
    assert rows == [("a", "d1"), ("c", "d2"), ("e", "d2")]


def test_run_record_appends_even_on_failure(spark, cfg):
    with W.run_record(spark, cfg, "demo") as rec:
        rec.input_rows, rec.output_rows = 3, 2
    try:
        with W.run_record(spark, cfg, "boom"):
            raise RuntimeError("x")
    except RuntimeError:
        pass
    runs = {r.stage: r for r in W.read_table(spark, cfg, "runs").collect()}
    assert runs["demo"].status == "ok" and runs["demo"].input_rows == 3
    assert runs["boom"].status == "failed"


def test_run_records_are_written_by_the_driver_and_read_by_every_reader(spark, cfg):
    """A night appends a runs row per step: built in the driver, no Spark job; the
    file must still read as the RUNS schema in Spark and pandas, nothing left hidden."""
    import pandas as pd
    from pathlib import Path

    from siren_batch import schemas

    sc = spark.sparkContext
    sc.setJobGroup("append-run-test", "append-run-test")
    try:
        for stage in ("a", "b"):
            W.append_run(spark, cfg, W.RunRecord(stage=stage, input_rows=5, output_rows=4, rejected_rows=1,
                                                 reads=["x", "y"]))
        assert sc.statusTracker().getJobIdsForGroup("append-run-test") == []
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    runs = W.read_table(spark, cfg, "runs", schemas.RUNS).orderBy("stage").collect()
    assert [(r.stage, r.input_rows, r.output_rows, r.rejected_rows, r.reads, r.writes) for r in runs] == \
        [("a", 5, 4, 1, "x,y", None), ("b", 5, 4, 1, "x,y", None)]
    assert list(pd.read_parquet(cfg.table_path("runs")).columns) == schemas.RUNS.names
    assert [p.name for p in Path(cfg.table_path("runs")).iterdir() if p.name.endswith(".tmp")] == []


def test_text_round_trip_for_hidden_marker_files(spark, cfg):
    path = f"{cfg.warehouse}/x/_marker"
    W.write_text(spark, path, "abc\ndef")
    assert W.read_text(spark, path) == "abc\ndef"


def test_append_adds_one_file_and_keeps_the_rows(spark, cfg):
    from pathlib import Path

    rows = lambda ks: spark.createDataFrame([(f"k{k}", "d1") for k in ks], SCHEMA)
    W.write_table(rows(range(5)), cfg, "t", SCHEMA)
    before = {p.name for p in Path(cfg.table_path("t")).glob("part-*")}
    assert W.append_table(rows(range(5, 8)).repartition(3), cfg, "t", SCHEMA) == 3
    added = {p.name for p in Path(cfg.table_path("t")).glob("part-*")} - before
    assert len(added) == 1    # one rename: readers see all three rows or none
    assert sorted(r.k for r in W.read_table(spark, cfg, "t", SCHEMA).collect()) == [f"k{k}" for k in range(8)]
    assert not W.list_dir(spark, f"{cfg.warehouse}/{cfg.dataset}/_staging")


def test_sweep_staging_removes_old_leftovers_only(spark, cfg):
    import os
    import time
    from pathlib import Path

    root = Path(cfg.warehouse) / cfg.dataset / "_staging"
    old = time.time() - W.STAGING_MAX_AGE_S - 60
    abandoned = time.time() - W.RESUMABLE_MAX_AGE_S - 60
    for name in ("items-1a2b3c4d", "interactions-append-9f8e7d6c", "ratings-2030-01-01", "sketches-fresh0001",
                 "ratings-2029-12-01", "prompts-s3a00001"):
        (root / name).mkdir(parents=True)
        (root / name / "part-0.parquet").write_text("x")
        if "fresh" not in name:
            stamp = abandoned if name == "ratings-2029-12-01" else old
            for path in (root / name / "part-0.parquet", root / name):
                os.utime(path, (stamp, stamp))
    # A folder's time as S3A reports it (0), a file written just now inside: live, judged by the file.
    (root / "prompts-s3a00001" / "part-1.parquet").write_text("x")
    os.utime(root / "prompts-s3a00001", (0, 0))
    assert W.sweep_staging(spark, cfg) == ["interactions-append-9f8e7d6c", "items-1a2b3c4d", "ratings-2029-12-01"]
    assert sorted(p.name for p in root.iterdir()) == ["prompts-s3a00001", "ratings-2030-01-01",
                                                      "sketches-fresh0001"]   # live, resumable, live
    assert W.sweep_staging(spark, cfg) == []


def test_the_lock_goes_where_hadoop_puts_the_tables(spark, tmp_path, monkeypatch):
    """A warehouse path without a scheme is fs.defaultFS's: on YARN that is HDFS, and a lock on
    the driver's own disk would let drivers on two hosts both hold it."""
    import types

    from siren_batch import lock

    assert lock._Store(spark, str(tmp_path / "_lock")).local == str(tmp_path / "_lock")   # defaultFS file:///
    assert lock._Store(spark, "hdfs:///user/siren/wh/_lock").local is None

    class Hdfs:
        def getUri(self):
            return types.SimpleNamespace(getScheme=lambda: "hdfs")

    monkeypatch.setattr(W, "_fs_path", lambda spark_, path: (Hdfs(), None))   # fs.defaultFS=hdfs://...
    assert lock._Store(spark, "/user/siren/wh/_lock").local is None and not W.on_local_disk(spark, "/user/siren")


def test_the_lock_through_hadoop_sees_a_released_lock_as_free(spark, cfg, monkeypatch):
    """On HDFS the holder can let go between our create and our read: the read finds no file
    (FileNotFoundError through Hadoop, not a Java stack trace) and the next try takes the lock.
    An empty lock file (a holder killed while taking it) is still held, by someone unknown."""
    from siren_batch import lock

    monkeypatch.setattr(W, "on_local_disk", lambda spark_, path: False)   # the Hadoop code path, on file:
    path = lock.lock_path(cfg)
    with pytest.raises(FileNotFoundError, match="no such file"):
        W.read_text(spark, path)
    store = lock._Store(spark, path)
    assert store.local is None and store.read() == {}
    assert store.create('{"run_id": "other"}') and not store.create('{"run_id": "late"}')
    real_read = lock._Store.read

    def read_after_release(self):
        W.delete_path(spark, path)   # the holder releases just before we read
        return real_read(self)

    monkeypatch.setattr(lock._Store, "read", read_after_release)
    assert lock.acquire(spark, cfg, "mine", "test")["run_id"] == "mine"
    monkeypatch.setattr(lock._Store, "read", real_read)
    assert store.read()["run_id"] == "mine"
    W.write_text(spark, path, "")
    with pytest.raises(lock.LockHeld, match="empty lock file"):
        lock.acquire(spark, cfg, "third", "test")


def test_a_small_file_is_replaced_whole(spark, tmp_path):
    """write_text replaces the old file and leaves no temporary behind."""
    from pathlib import Path

    path = str(tmp_path / "latest.json")
    W.write_text(spark, path, "night 1")
    W.write_text(spark, path, "night 2")
    assert W.read_text(spark, path) == "night 2"
    assert sorted(p.name for p in Path(tmp_path).iterdir() if not p.name.endswith(".crc")) == ["latest.json"]
