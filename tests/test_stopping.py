"""SIGTERM and SIGINT stop a run without waiting for its Spark job (siren_batch.stopping):
the job is cancelled, the cleanup's own Py4J calls get their own answers, the lock is
released, the stage is recorded as failed, and the exit status is 128 + the signal."""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager

import pytest
from pyspark.sql import functions as F
from pyspark.sql.types import LongType

from siren_batch import stopping
from siren_batch.cli import main
from siren_batch.config import load_config
from siren_batch.warehouse import read_table


@contextmanager
def _signal_in(sig: int, after_s: float):
    """Send `sig` to this process after `after_s`, unless the block is over by then."""
    timer = threading.Timer(after_s, os.kill, (os.getpid(), sig))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def test_a_signal_during_a_spark_job_cancels_it_and_the_cleanup_gets_its_own_answers(spark):
    """Before: the SystemExit came at once, but the cleanup's first Py4J call waited for the
    whole job (about 100 s here) and then read the job's answer as its own."""
    slow = F.udf(lambda x: time.sleep(0.5) or x, LongType())
    job = spark.range(400).repartition(2).where(slow("id") >= 0)   # 2 tasks of 100 s each
    previous = signal.getsignal(signal.SIGTERM)
    want = spark.conf.get("spark.app.name")
    cleanup = []
    start = time.monotonic()
    with _signal_in(signal.SIGTERM, 3.0), pytest.raises(stopping.Stopped) as stopped:
        with stopping.on_signals(spark):
            try:
                job.count()
            finally:   # the lock's release and the run record are Py4J calls that start no job
                cleanup.append(spark.conf.get("spark.app.name"))
    assert time.monotonic() - start < 60
    assert cleanup == [want]
    assert stopped.value.code == 143 and "SIGTERM" in str(stopped.value)
    assert signal.getsignal(signal.SIGTERM) is previous
    assert spark.range(5).count() == 5   # nothing cancels jobs after the block


def test_a_signal_outside_spark_stops_at_once_and_one_in_a_call_that_is_no_job_at_the_next_job(spark):
    slow = F.udf(lambda x: time.sleep(0.5) or x, LongType())
    with _signal_in(signal.SIGINT, 0.5), pytest.raises(stopping.Stopped) as stopped:
        with stopping.on_signals(spark):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                time.sleep(0.05)
    assert stopped.value.code == 130

    reached, start = [], time.monotonic()
    with _signal_in(signal.SIGTERM, 0.5), pytest.raises(stopping.Stopped):
        with stopping.on_signals(spark):
            spark._jvm.java.lang.Thread.sleep(2000)   # a Py4J call that is no Spark job: it ends as it would
            reached.append("after the call")
            spark.range(400).repartition(2).where(slow("id") >= 0).count()   # the next job is cancelled
            reached.append("after the next job")
    assert reached == ["after the call"]
    assert time.monotonic() - start < 60


def _signal_once_a_job_runs(spark, sig: int, stop: threading.Event) -> None:
    while not stop.is_set():
        if spark.sparkContext.statusTracker().getActiveJobsIds():
            os.kill(os.getpid(), sig)
            return
        time.sleep(0.02)


def test_a_stage_stopped_by_sigterm_says_so_in_one_line_and_frees_the_warehouse(spark, tmp_path, capsys):
    rows = [f"u{u},i{i},{(u + i) % 5 + 1},{1000 + 10 * u + i}" for u in range(40) for i in range(8)]
    (tmp_path / "inter.csv").write_text("user_id,item_id,rating,ts\n" + "\n".join(rows) + "\n")
    (tmp_path / "items.csv").write_text("item_id,title\n" + "\n".join(f"i{i},film {i}" for i in range(8)) + "\n")
    args = [f"data.path={tmp_path / 'inter.csv'}", f"data.items_path={tmp_path / 'items.csv'}", "data.format=csv",
            "data.source=table", "data.kcore=0", "dataset=stopping", f"warehouse={tmp_path / 'wh'}"]
    done = threading.Event()
    watcher = threading.Thread(target=_signal_once_a_job_runs, args=(spark, signal.SIGTERM, done))
    watcher.start()
    try:
        code = main(["ingest", *args])
    finally:
        done.set()
        watcher.join()
    assert code == 143
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("siren-batch:")]
    assert len(err) == 1 and err[0].startswith("siren-batch: ingest stopped by SIGTERM"), err
    data = tmp_path / "wh" / "stopping"
    assert data.is_dir() and not (data / "_lock").exists()   # the next run needs no --break-lock
    runs = read_table(spark, load_config([], args), "runs").where("stage = 'ingest'").collect()
    assert [r.status for r in runs] == ["failed"]


def test_the_driver_jvm_runs_in_a_session_of_its_own(spark):
    """So a SIGTERM to the driver's process group (a scheduler's stop) reaches Python only:
    in the group, it shut the JVM down under the driver, which left the lock behind and
    printed no reason (measured before the change)."""
    launcher = spark.sparkContext._gateway.proc
    assert launcher is not None and launcher.poll() is None
    assert os.getsid(launcher.pid) == launcher.pid != os.getsid(0)
