"""Faults outside the data: a full disk and an unwritable warehouse give one clear
line and leave the tables already written as they were (writes are staged, then
renamed into place). Killed workers and clusters: tests/test_cluster.py; damaged
input files: tests/test_bad_input.py."""

from __future__ import annotations

import os
import random
import resource
import string
import subprocess
import sys

import pytest

from siren_batch.cli import main

# bytes: above what Spark itself writes (its native snappy library ~0.3 MB), below the items table
FILE_LIMIT = 1024 * 1024


def _source(folder, users: int) -> list[str]:
    """A CSV source whose items table is ~1.8 MB of hardly compressible text."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [f"u{u},i{i},{(u + i) % 5 + 1},{1000 + 10 * u + i}" for u in range(users) for i in range(6)]
    (folder / "inter.csv").write_text("user_id,item_id,rating,ts\n" + "\n".join(rows) + "\n")
    titles = ["".join(rng.choices(string.ascii_letters, k=400_000)) for _ in range(6)]
    (folder / "items.csv").write_text("item_id,title\n" + "\n".join(f"i{i},{t}" for i, t in enumerate(titles)) + "\n")
    return [f"data.path={folder / 'inter.csv'}", f"data.items_path={folder / 'items.csv'}", "data.format=csv",
            "data.source=table", "data.kcore=0", "dataset=faults"]


def _snapshot(table_root) -> dict[str, bytes]:
    return {str(p.relative_to(table_root)): p.read_bytes() for p in sorted(table_root.rglob("*"))
            if p.is_file() and p.parts[len(table_root.parts)] != "runs"}


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("siren-batch")]


def test_a_full_disk_fails_in_one_line_and_leaves_the_tables_intact(spark, tmp_path, capsys):
    wh = tmp_path / "wh"
    assert main(["ingest", f"warehouse={wh}", *_source(tmp_path / "night1", users=3)]) == 0
    capsys.readouterr()
    before = _snapshot(wh / "faults")
    assert any(name.startswith("items/") for name in before)

    def full_disk() -> None:   # the JVM ignores SIGXFSZ, so a write past the limit fails like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))

    night2 = _source(tmp_path / "night2", users=4)   # a changed input: the tables would change
    run = subprocess.run([sys.executable, "-m", "siren_batch.cli", "ingest", f"warehouse={wh}", *night2],
                         capture_output=True, text=True, preexec_fn=full_disk, timeout=600,
                         env={**os.environ, "SIREN_LOG_LEVEL": "ERROR"})
    assert run.returncode == 1, run.stderr[-2000:]
    lines = _errors(run.stderr)
    assert len(lines) == 1 and "storage error" in lines[0] and "File too large" in lines[0], lines
    assert _snapshot(wh / "faults") == before      # byte for byte, nothing half-written beside them


def test_an_unwritable_warehouse_fails_in_one_line(spark, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    rc = main(["ingest", f"warehouse={blocker / 'wh'}", *_source(tmp_path / "in", users=3)])
    lines = _errors(capsys.readouterr().err)
    assert rc == 1 and len(lines) == 1 and "storage error" in lines[0], lines


def test_a_read_only_warehouse_fails_in_one_line_and_keeps_its_tables(spark, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("running as root, which ignores file permissions (the full-disk test covers the path)")
    wh = tmp_path / "wh"
    assert main(["ingest", f"warehouse={wh}", *_source(tmp_path / "night1", users=3)]) == 0
    before = _snapshot(wh / "faults")
    for folder in [wh, *wh.rglob("*")]:
        if folder.is_dir():
            folder.chmod(0o555)
    try:
        rc = main(["ingest", f"warehouse={wh}", *_source(tmp_path / "night2", users=4)])
        lines = _errors(capsys.readouterr().err)
        assert rc == 1 and len(lines) == 1 and "storage error" in lines[0], lines
        assert _snapshot(wh / "faults") == before
    finally:
        for folder in [wh, *wh.rglob("*")]:
            if folder.is_dir():
                folder.chmod(0o755)
