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
from siren_batch.config import load_config
from tables import assert_same_frame, read_frame

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
DATASET = "killed"
STAGES = pipeline.FULL_CHAIN
# Keys no table may repeat (the tables not named here have none).
KEYS = {"interactions": ["user_id", "item_id"], "items": ["item_id"], "item_embeddings": ["item_id"],
        "topics": ["topic_id"], "item_topics": ["item_id"], "example_sketches": ["user_id", "item_id"],
        "sketches": ["user_id"], "prompts": ["user_id", "item_id", "variant", "mode"],
        "ratings": ["run_date", "user_id", "item_id"], "metrics": ["system", "segment", "metric"]}

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


def _source(folder: Path) -> list[str]:
    """12 users x 7 of 12 films of 4 genres, ratings 1-5, and one bad line (a reject)."""
    folder.mkdir(parents=True)
    genres = ["Drama|Romance", "Horror|Thriller", "Comedy", "Sci-Fi|Action"]
    items = [f"i{i},Film number {i} about {genres[i % 4].split('|')[0].lower()},{genres[i % 4]}" for i in range(12)]
    (folder / "items.csv").write_text("item_id,title,genres\n" + "\n".join(items) + "\n")
    rows = [f"u{u},i{(u + k) % 12},{(u * 3 + k * (u % 3 + 1)) % 5 + 1},{1000 + 100 * u + k}"
            for u in range(12) for k in range(7)]
    (folder / "inter.csv").write_text("user_id,item_id,rating,ts\n" + "\n".join(rows) + "\nu1,i1,nine,5\n")
    return [f"data.path={folder / 'inter.csv'}", f"data.items_path={folder / 'items.csv'}", "data.format=csv",
            "data.source=table", "data.kcore=0", f"dataset={DATASET}"]


def _overrides(warehouse: Path, source: list[str]) -> list[str]:
    """Tiny everything: 3 topics; the bundled SmolLM2 in fp32 (so a resumed run's ratings
    equal the reference's) in one task, 12 test pairs in 2 chunks; one baseline."""
    return [f"warehouse={warehouse}", *source, "spark.master=local[2]", "spark.shuffle_partitions=4",
            "topics.k=3", "topics.name_top_m=4", "score.dtype=float32", "score.partitions=1",
            "score.chunk_rows=6", "score.run_date=2026-01-05", "calibrate.enabled=false",
            "evaluate.baselines=[global_mean]"]


@pytest.fixture(scope="module")
def reference(spark, tmp_path_factory):
    """The uninterrupted chain; a copy of its warehouse before the first stage and after each."""
    root = tmp_path_factory.mktemp("driver-kill")
    args = _overrides(root / "wh", _source(root / "in"))
    cfg = load_config(overrides=args)
    (root / "wh" / DATASET).mkdir(parents=True)
    shutil.copytree(root / "wh", root / "start")
    for stage in STAGES:
        pipeline.STAGES[stage](spark, cfg)
        spark.catalog.clearCache()
        shutil.copytree(root / "wh", root / stage)
    return root, args


def _visible(folder: Path) -> set[str]:
    """Folders a reader of the tables can see: every path under the dataset without a part
    starting with '_' or '.' (Spark, pyarrow and our readers skip those), the runs table and
    the reports left out (a killed run has no runs row; report names carry the run id)."""
    found = set()
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_dir() and rel.parts[0] not in {"runs", "reports"} \
                and not any(p.startswith(("_", ".")) for p in rel.parts):
            found.add(str(rel))
    return found


def _assert_same_tables(got: Path, want: Path) -> None:
    assert _visible(got) == _visible(want), "the tables and partitions a reader sees differ"
    tables = sorted({p.split("/")[0] for p in _visible(want)})
    for table in tables:
        mine, theirs = read_frame(got / table), read_frame(want / table)
        if table in KEYS:
            assert not mine.duplicated(KEYS[table]).any(), f"{table} holds duplicate keys"
        assert_same_frame(mine, theirs, f"{table} (rerun against uninterrupted)")
    # reports/: <eval_id>.md and latest.md, once per finished evaluate
    assert len(list(got.glob("reports/*"))) == len(list(want.glob("reports/*")))


# `make test` kills the driver in two stages with more than one commit step (sketches: two
# tables; score: chunk resume); `make test-faults` in all seven, ingest's rejects-then-
# interactions too (each case starts a cold JVM: ~30 s on 2 cores).
IN_EVERY_RUN = {"sketches", "score"}


@pytest.mark.parametrize("stage", [s if s in IN_EVERY_RUN else pytest.param(s, marks=pytest.mark.faults)
                                   for s in STAGES])
def test_a_driver_killed_mid_stage_reruns_to_the_uninterrupted_tables(reference, stage):
    root, args = reference
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
        try:   # its JVM too, as a SIGKILL of the whole driver would
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL, f"{stage} was not killed at its move {KILL_BEFORE_MOVE[stage]}: " \
                                               f"{err[-3000:]}"
    assert (data / "_lock").exists()
    if stage in COMMITTED_AT_KILL:
        assert (data / COMMITTED_AT_KILL[stage]).is_dir(), "the driver died before the stage's first commit"
    assert _visible(data) != _visible(want), "the kill left the tables as the finished stage would"

    assert cli.main([stage, *args, "--break-lock"]) == 0
    _assert_same_tables(data, want)
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
    assert moves == [str(table / "run_date=d2") if partitioned else str(table)]   # the old copy, moved aside
    assert _visible(table.parent) == ({"ratings", "ratings/run_date=d1"} if partitioned else set())

    warehouse.write_table(again, cfg, "ratings", schema, partition_by=by)   # the stage run again
    got = read_frame(table)
    want = [("u1", 1.0, "d1"), ("u3", 3.0, "d2")] if partitioned else [("u3", 3.0, "d2")]
    assert [tuple(r) for r in got[["user_id", "rating", "run_date"]].itertuples(index=False)] == want
