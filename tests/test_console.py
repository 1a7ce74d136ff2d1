"""The console of a run shows its stages and our own warnings; the details, third-party
warnings and the JVM's output go to the run's log file (siren_batch/console.py)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

from siren_batch import console
from siren_batch.console import ConsoleHandler, Progress, format_duration, format_progress

REPO = Path(__file__).resolve().parents[1]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def record(name: str, msg: str, *args, level: int = logging.INFO, **extra) -> logging.LogRecord:
    rec = logging.LogRecord(name, level, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


def stage_records(stage: str = "ingest") -> list[logging.LogRecord]:
    return [record("siren_batch", "stage %s: start (dataset=%s, config %s)", stage, "ml-100k", "abc"),
            record("siren_batch.data", "ingest movielens100k: %s", {"kept": 99287}),
            record("siren_batch.warehouse", "run %s %s: %s in %.1fs (in=%d out=%d rejected=%d)",
                   stage, "20261126T1-ab", "ok", 12.0, 100000, 99287, 713),
            record("siren_batch", "stage %s: done in %.1fs", stage, 12.3)]


# ---- pure formatting ---------------------------------------------------------------------

def test_progress_formats_rows_done_rate_and_eta():
    assert format_progress(40, 100, 20.0) == "40/100 rows (40.0%), 2.0 rows/s, ETA 30 s"
    assert format_progress(1_500_000, 2_000_000, 600.0) == \
        "1,500,000/2,000,000 rows (75.0%), 2,500.0 rows/s, ETA 3 min 20 s"
    assert format_progress(100, 100, 60.0).endswith("ETA 0 s")
    assert format_progress(0, 10, 5.0).endswith("0.0 rows/s, ETA ?")   # no rate yet: no guess
    assert [format_duration(s) for s in (0.4, 59.6, 3599, 3600 * 25)] == ["0 s", "1 min 00 s", "59 min 59 s",
                                                                          "25 h 00 min"]


def test_progress_logs_at_most_every_n_seconds_and_at_the_end(caplog):
    now = [0.0]
    progress = Progress(total=100, every_s=30, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="siren_batch.console"):
        for t, rows in [(10, 10), (20, 10), (31, 10), (40, 10), (70, 60)]:
            now[0] = t
            line = progress.update(rows)
    assert line == "scored 100/100 rows (100.0%), 1.4 rows/s, ETA 0 s"
    assert [r.getMessage().split(" rows")[0] for r in caplog.records] == ["scored 30/100", "scored 100/100"]


# ---- the console handler -----------------------------------------------------------------

def test_a_stage_is_one_line_on_a_terminal_and_two_elsewhere():
    plain, tty = io.StringIO(), Tty()
    for stream in (plain, tty):
        handler = ConsoleHandler(stream)
        for rec in stage_records():
            handler.handle(rec)
    done = "ingest done in 12.3 s: 100,000 in, 99,287 out, 713 rejected"
    assert plain.getvalue() == f"ingest ...\n{done}\n"
    assert tty.getvalue().endswith(f"\r\033[K{done}\n") and tty.getvalue().count("\n") == 1
    assert "ingest ..." in tty.getvalue()


def test_a_stage_made_of_others_shows_each_ones_counts():
    """score-calibrate writes a score run record, then a calibrate one; neither is its own name."""
    out = io.StringIO()
    handler = ConsoleHandler(out)
    run = "run %s %s: %s in %.1fs (in=%d out=%d rejected=%d)"
    for rec in (record("siren_batch", "stage %s: start (dataset=%s, config %s)", "score-calibrate", "d", "abc"),
                record("siren_batch.warehouse", run, "score", "r1", "ok", 9.0, 1000, 1000, 0),
                record("siren_batch.warehouse", run, "calibrate", "r2", "ok", 2.0, 997, 0, 0),
                record("siren_batch", "stage %s: done in %.1fs", "score-calibrate", 11.5),
                *stage_records("score")):   # the next stage shows only its own record's counts
        handler.handle(rec)
    assert out.getvalue().splitlines() == [
        "score-calibrate ...", "score-calibrate done in 11.5 s: score 1,000 in, 1,000 out; calibrate 997 in, 0 out",
        "score ...", "score done in 12.3 s: 100,000 in, 99,287 out, 713 rejected"]


def test_progress_redraws_in_place_on_a_terminal(monkeypatch):
    tty = Tty()
    handler = ConsoleHandler(tty)
    monkeypatch.setitem(console._state, "console", handler)
    handler.handle(stage_records("score")[0])
    now = [0.0]
    progress = Progress(total=100, every_s=1000, clock=lambda: now[0])
    now[0] = 10.0
    progress.update(20)   # not due for the log: drawn on the terminal only
    assert tty.getvalue().endswith("\r\033[Kscore ... scored 20/100 rows (20.0%), 2.0 rows/s, ETA 40 s")
    assert "\n" not in tty.getvalue()


def test_the_console_shows_our_warnings_not_third_party_ones_nor_info():
    out = io.StringIO()
    handler = ConsoleHandler(out)
    for rec in [record("siren_batch.data", "wrote %d rows", 5),
                record("py4j.clientserver", "closing", level=logging.WARNING),
                record("transformers.modeling_utils", "deprecated", level=logging.WARNING),
                record("py.warnings", "FutureWarning: x", level=logging.WARNING),
                record("siren_batch.ratings", "staging is from another config", level=logging.WARNING)]:
        handler.handle(rec)
    assert out.getvalue() == "WARNING: staging is from another config\n"
    verbose = io.StringIO()
    handler = ConsoleHandler(verbose, verbose=True)
    handler.handle(record("py4j.clientserver", "closing", level=logging.WARNING))
    assert "WARNING py4j.clientserver: closing" in verbose.getvalue()


def test_python_warnings_from_other_packages_go_to_the_log_file_only(tmp_path):
    out = io.StringIO()
    try:
        log_file = console.setup_logging(tmp_path, stage="unit", stream=out)
        warnings.warn_explicit("old API", DeprecationWarning, "/site-packages/somelib/api.py", 3)
        warnings.warn_explicit("check this", UserWarning, console.__file__, 7)
        logging.getLogger("siren_batch.data").info("a detail")
    finally:
        console.teardown_logging()
    assert log_file.parent == tmp_path and log_file.name.endswith("-unit.log")
    text = log_file.read_text()
    assert "old API" in text and "check this" in text and "a detail" in text
    assert "old API" not in out.getvalue() and "check this" in out.getvalue()
    assert "a detail" not in out.getvalue()


# ---- a real stage, in a subprocess ---------------------------------------------------------

def _source(folder: Path) -> list[str]:
    """A small CSV source with one bad rating, so the run has a reject to report."""
    folder.mkdir(parents=True)
    rows = [f"u{u},i{i},{(u + i) % 5 + 1},{1000 + 10 * u + i}" for u in range(4) for i in range(5)]
    (folder / "inter.csv").write_text("user_id,item_id,rating,ts\n" + "\n".join(rows) + "\nu9,i1,nine,5\n")
    (folder / "items.csv").write_text("item_id,title\n" + "\n".join(f"i{i},Film {i}" for i in range(5)) + "\n")
    return [f"data.path={folder / 'inter.csv'}", f"data.items_path={folder / 'items.csv'}", "data.format=csv",
            "data.source=table", "data.kcore=0", "data.max_reject_fraction=1", "dataset=tiny"]


def test_a_stage_run_prints_its_stage_and_the_log_holds_the_details(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SIREN_LOG_LEVEL", None)
    args = ["ingest", f"warehouse={tmp_path / 'wh'}", *_source(tmp_path / "in")]
    run = subprocess.run([sys.executable, "-m", "siren_batch.cli", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stderr.splitlines()
    assert len(lines) == 2 and lines[0] == "ingest ..." and lines[1].startswith("ingest done in "), lines
    assert lines[1].endswith(" s: 21 in, 20 out, 1 rejected"), lines
    for noise in ("WARN", "Warning", "netlib", "log4j", "Setting default log level", "NativeCodeLoader"):
        assert noise not in run.stderr and noise not in run.stdout, noise
    assert run.stdout.lstrip().startswith("{") and '"ingest"' in run.stdout   # the result JSON, as before
    logs = list((tmp_path / "wh" / "_logs" / "tiny").glob("*-ingest.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    for detail in ("INFO siren_batch.warehouse: wrote interactions", "stage ingest: done", "spark session"):
        assert detail in text, detail
    assert {p.name for p in (tmp_path / "wh" / "tiny").iterdir()} >= {"interactions", "items", "rejects"}
    assert "_logs" not in {p.name for p in (tmp_path / "wh" / "tiny").iterdir()}   # tables only there


def test_verbose_shows_every_log_line(tmp_path, capsys):
    """prepare-model (the model is prepared already: no Spark, a second) logs at INFO only."""
    from siren_batch.cli import main

    try:
        runs = {flags: (main(["prepare-model", *flags, f"warehouse={tmp_path}"]), capsys.readouterr().err)
                for flags in [(), ("--verbose",)]}
    finally:
        console.teardown_logging()
    assert runs[()] == (0, "")
    rc, err = runs[("--verbose",)]
    assert rc == 0 and "INFO siren_batch.assets: default LLM already at" in err
    assert len(list((tmp_path / "_logs" / "ml-100k").glob("*-prepare-model.log"))) >= 1


def test_a_nights_steps_are_lines_too():
    out = io.StringIO()
    handler = ConsoleHandler(out)
    for rec in [record("siren_batch.nightly", "nightly %s %s: already done", "1998-04-06", "ingest"),
                record("siren_batch.nightly", "nightly %s %s: start", "1998-04-06", "embed"),
                record("siren_batch.warehouse", "wrote %s: %d rows -> %s", "item_embeddings", 3, "/wh"),
                record("siren_batch.warehouse", "run %s %s: %s in %.1fs (in=%d out=%d rejected=%d)",
                       "nightly-embed", "r1", "ok", 4.25, 12, 3, 0)]:
        handler.handle(rec)
    assert out.getvalue().splitlines() == ["nightly 1998-04-06 ingest: already done",
                                           "nightly 1998-04-06 embed ...",
                                           "nightly 1998-04-06 embed done in 4.2 s: 12 in, 3 out"]


def test_the_demo_summary_ends_with_the_logs_the_notebook_and_the_report(tmp_path):
    from siren_batch.config import load_config
    from siren_batch.summary import where_next

    overrides = [f"warehouse={tmp_path}"]
    text = where_next(load_config(overrides=overrides), overrides)
    assert f"logs:      {tmp_path}/_logs/ml-100k/" in text and "explore_ratings.ipynb" in text
    assert f"{tmp_path}/ml-100k/reports/latest.html (not written yet: python -m siren_batch.report " \
           f"warehouse={tmp_path})" in text
    (tmp_path / "ml-100k" / "reports").mkdir(parents=True)
    (tmp_path / "ml-100k" / "reports" / "latest.html").write_text("<html></html>")
    assert where_next(load_config(overrides=overrides), overrides).endswith("reports/latest.html")
