"""The driver killed in each stage in turn (issue 10, "Scale and faults").

One uninterrupted chain, ingest .. evaluate, on a tiny CSV source is the reference,
with a copy of its warehouse after every stage. Then, for each stage, a copy of the
warehouse as it stood before that stage is handed to `siren-batch <stage>` in a
subprocess that SIGKILLs itself just before its n-th commit step
(SIREN_KILL_BEFORE_RENAME, siren_batch/warehouse.py): in the middle of the stage's
writes, one table committed and the next staged, or one score chunk committed.
The stage is started again (`--break-lock`: the dead driver's lock is left behind)
and the warehouse must hold what the reference run's held: the same tables and
partitions, the same rows (floats within 1e-6), no duplicates, nothing left where
a reader of a table would see it. Two small in-process cases kill a write that
replaces a table (or a partition) between moving the old copy aside and moving the
new one in.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from siren_batch import cli, pipeline
from conftest import TINY_DATASET as DATASET
from tables import assert_same_tables, read_frame, visible

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
STAGES = pipeline.FULL_CHAIN
# Where each stage's driver dies: just before its n-th move_path (a commit step), on a
# warehouse holding the tables of the stages before it.
KILL_BEFORE_MOVE = {
    "ingest": 2,     # rejects committed, interactions staged, items not written
    "embed": 1,      # item_embeddings staged, not moved in
    "topics": 2,     # topics committed, item_topics staged
    "sketches": 2,   # example_sketches committed, sketches staged
    "prompts": 1,    # prompts staged
    "score": 2,      # chunk 0 of 2 committed, chunk 1 written to its tmp folder
    "evaluate": 1,   # the metrics staged
}
# What the killed driver had committed (under the dataset): it died mid-stage, not before it.
COMMITTED_AT_KILL = {"ingest": "rejects", "topics": "topics", "sketches": "example_sketches",
                     "score": "_staging/ratings-2026-01-05/chunks/chunk=00000"}
# The killed driver only: a JVM that lives a few seconds starts faster without the C2 compiler.
QUICK_JVM = "spark.extra={spark.driver.extraJavaOptions: -XX:TieredStopAtLevel=1, spark.ui.enabled: 'false'}"


# `make test` kills the driver in two stages with more than one commit step (sketches: two
# tables; score: chunk resume); `make test-faults` in all seven, ingest's rejects-then-
# interactions too (each case starts a cold JVM: ~30 s on 2 cores).
IN_EVERY_RUN = {"sketches", "score"}


@pytest.mark.parametrize("stage", [s if s in IN_EVERY_RUN else pytest.param(s, marks=pytest.mark.faults)
                                   for s in STAGES])
def test_a_driver_killed_mid_stage_reruns_to_the_uninterrupted_tables(tiny_chain, stage):
    root, args = tiny_chain
    before = (["start", *STAGES])[STAGES.index(stage)]
    wh = root / f"killed-in-{stage}"
    shutil.copytree(root / before, wh)
    args = [a if not a.startswith("warehouse=") else f"warehouse={wh}" for a in args]
    data, want = wh / DATASET, root / stage / DATASET
    env = {**os.environ, "PYTHONPATH": str(REPO), "SIREN_LOG_LEVEL": "WARNING",
           "SIREN_KILL_BEFORE_RENAME": str(KILL_BEFORE_MOVE[stage])}
    proc = subprocess.Popen([sys.executable, "-m", "siren_batch.cli", stage, *args, QUICK_JVM], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            text=True)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        try:   # what is left of its group; its JVM (a session of its own) exits when the driver's pipe closes
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL, f"{stage} was not killed at its move {KILL_BEFORE_MOVE[stage]}: " \
                                               f"{err[-3000:]}"
    assert (data / "_lock").exists()
    if stage in COMMITTED_AT_KILL:
        assert (data / COMMITTED_AT_KILL[stage]).is_dir(), "the driver died before the stage's first commit"
    assert visible(data) != visible(want), "the kill left the tables as the finished stage would"

    assert cli.main([stage, *args, "--break-lock"]) == 0
    assert_same_tables(data, want, "rerun against uninterrupted")
    if stage == "score":   # the committed chunk was kept, not scored again
        logs = "".join(p.read_text() for p in (wh / "_logs" / DATASET).glob("*-score.log"))
        assert "resume: chunk=00000 already committed, skipping" in logs


class _Killed(BaseException):
    """A SIGKILL, in-process: nothing catches it, as nothing runs on after a kill."""


@pytest.mark.parametrize("partitioned", [False, True], ids=["table", "partition"])
def test_a_replace_killed_between_its_two_moves_leaves_nothing_a_reader_sees(spark, cfg, monkeypatch,
                                                                              partitioned):
    """A stage run again over its own tables moves the old copy aside, then the new one in:
    killed in between, the old copy must not lie where a reader of the table looks (a
    `ratings/run_date=D.old-x` folder read as one more partition, duplicating D's rows)."""
    from pyspark.sql import types as T

    from siren_batch import warehouse

    schema = T.StructType([T.StructField("user_id", T.StringType()), T.StructField("rating", T.DoubleType()),
                           T.StructField("run_date", T.StringType())])
    frame = lambda rows: spark.createDataFrame(rows, schema)
    by = ["run_date"] if partitioned else None
    warehouse.write_table(frame([("u1", 1.0, "d1"), ("u2", 2.0, "d2")]), cfg, "ratings", schema, partition_by=by)
    again = frame([("u3", 3.0, "d2")])
    moves, move = [], warehouse.move_path

    def killed_after_one_move(spark_, src, dst):
        if moves:
            raise _Killed
        moves.append(src)
        move(spark_, src, dst)

    monkeypatch.setattr(warehouse, "move_path", killed_after_one_move)
    with pytest.raises(_Killed):
        warehouse.write_table(again, cfg, "ratings", schema, partition_by=by)
    monkeypatch.undo()
    table = Path(cfg.table_path("ratings"))
    moved = str(table / "run_date=d2") if partitioned else str(table)
    assert moves == [moved]   # the old copy, moved aside
    assert visible(table.parent) == ({"ratings", "ratings/run_date=d1"} if partitioned else set())

    # The next run, under the lock, first puts the old copy back: a stage that reads the table
    # and writes it back (a night's embeddings, the evaluations) must not find it empty.
    assert warehouse.restore_swaps(spark, cfg) == [moved]
    assert [tuple(r) for r in read_frame(table)[["user_id", "rating", "run_date"]].itertuples(index=False)] \
        == [("u1", 1.0, "d1"), ("u2", 2.0, "d2")]
    assert not list(table.parent.glob("_staging/**/*.old-*")), "the old copy or its note is still aside"
    assert warehouse.restore_swaps(spark, cfg) == []

    warehouse.write_table(again, cfg, "ratings", schema, partition_by=by)   # the stage run again
    got = read_frame(table)
    want = [("u1", 1.0, "d1"), ("u3", 3.0, "d2")] if partitioned else [("u3", 3.0, "d2")]
    assert [tuple(r) for r in got[["user_id", "rating", "run_date"]].itertuples(index=False)] == want


def test_a_replace_killed_after_its_two_moves_drops_the_old_copy(spark, cfg, monkeypatch):
    """Killed after the new copy is in, before the old one is deleted: the next run deletes it."""
    from pyspark.sql import types as T

    from siren_batch import warehouse

    schema = T.StructType([T.StructField("user_id", T.StringType())])
    warehouse.write_table(spark.createDataFrame([("u1",)], schema), cfg, "items", schema)

    def killed(spark_, path):
        raise _Killed

    monkeypatch.setattr(warehouse, "delete_path", killed)
    with pytest.raises(_Killed):
        warehouse.write_table(spark.createDataFrame([("u2",)], schema), cfg, "items", schema)
    monkeypatch.undo()
    staging = Path(cfg.table_path("items")).parent / "_staging"
    aside = [p for p in staging.glob("*.old-*") if not p.name.startswith(".")]   # not Hadoop's .crc files
    assert sorted(p.is_dir() for p in aside) == [False, True]   # the old copy and its note
    assert warehouse.restore_swaps(spark, cfg) == []   # nothing to put back: the new copy is in
    assert list(read_frame(Path(cfg.table_path("items"))).user_id) == ["u2"]
    assert not list(staging.glob("*.old-*"))
