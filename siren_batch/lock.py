"""One writer per warehouse and dataset: `<warehouse>/<dataset>/_lock`.

    with hold(spark, cfg, run_id, "nightly"):      # LockHeld: one line naming the holder
        ...

The lock is a small JSON file (host, pid, started_at, run_id, what) created only if
absent: `O_CREAT | O_EXCL` on a local disk, `FileSystem.create(overwrite=false)` on
HDFS and object stores. A second run fails at once with one line that names the
holder. A lock whose holder is a process on this host that no longer runs is
reported as stale; `--break-lock` (break_stale=True) removes it and goes on. A lock
from another host cannot be checked from here: the message says so, and breaking it
is the operator's call (`--break-lock` removes it whatever its state).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
from contextlib import contextmanager

from siren_batch.config import Config, local_path

logger = logging.getLogger(__name__)


class LockHeld(RuntimeError):
    """Another run holds the warehouse's lock (the message is the one line to print)."""


def lock_path(cfg: Config) -> str:
    return f"{cfg.warehouse.rstrip('/')}/{cfg.dataset}/_lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def describe(holder: dict) -> str:
    """'run R (host H, pid P, started T, nightly)' for messages.

    >>> describe({"run_id": "r1", "host": "h", "pid": 7, "started_at": "t", "what": "score"})
    'run r1 (host h, pid 7, started t, score)'
    """
    return (f"run {holder.get('run_id', '?')} (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {holder.get('started_at', '?')}, {holder.get('what', '?')})")


def is_stale(holder: dict) -> bool | None:
    """True: its process is gone; False: it runs; None: another host, unknown from here."""
    if holder.get("host") != socket.gethostname():
        return None
    return not _alive(int(holder.get("pid", -1)))


class _Store:
    """Create-if-absent, read and delete of the lock file, local or through Hadoop."""

    def __init__(self, spark, path: str):
        from siren_batch.warehouse import on_local_disk

        self.spark, self.path = spark, path
        # On the disk Hadoop writes the tables to: with fs.defaultFS on HDFS (YARN), a path
        # without a scheme is there, and a lock on the driver's disk would not be shared.
        self.local = local_path(path) if on_local_disk(spark, path) else None

    def create(self, text: str) -> bool:
        if self.local is not None:
            os.makedirs(os.path.dirname(self.local) or ".", exist_ok=True)
            try:
                fd = os.open(self.local, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as out:
                out.write(text)
            return True
        from siren_batch.warehouse import _fs_path

        fs, hpath = _fs_path(self.spark, self.path)
        try:
            stream = fs.create(hpath, False)
        except Exception as err:  # FileAlreadyExistsException through py4j
            if "AlreadyExists" in str(err) or fs.exists(hpath):
                return False
            raise
        try:
            stream.write(bytearray(text.encode("utf-8")))
        finally:
            stream.close()
        return True

    def read(self) -> dict:
        try:
            if self.local is not None:
                with open(self.local) as src:
                    text = src.read()
            else:
                from siren_batch.warehouse import read_text
                text = read_text(self.spark, self.path)
            # A holder killed between create and write leaves an empty file: held, by someone unknown.
            return json.loads(text) if text.strip() else {"run_id": "?", "what": "empty lock file"}
        except FileNotFoundError:   # nobody holds it (through Hadoop too: warehouse.read_text)
            return {}
        except ValueError:
            return {"run_id": "?", "what": "unreadable lock file"}

    def delete(self) -> None:
        if self.local is not None:
            try:
                os.remove(self.local)
            except FileNotFoundError:
                pass
            return
        from siren_batch.warehouse import delete_path
        delete_path(self.spark, self.path)


def acquire(spark, cfg: Config, run_id: str, what: str, *, break_lock: bool = False) -> dict:
    """Take the lock or raise LockHeld; returns what was written into it."""
    store = _Store(spark, lock_path(cfg))
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id, "what": what,
            "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    for _ in range(3):  # tried again only after breaking a lock, or when the holder just let go
        if store.create(json.dumps(mine)):
            return mine
        holder = store.read()
        if not holder:   # released between our create and read: it is free now
            continue
        if break_lock:
            logger.warning("breaking the lock of %s at %s", describe(holder), store.path)
            store.delete()
            break_lock = False
            continue
        stale = is_stale(holder)
        where = f"{cfg.warehouse.rstrip('/')}/{cfg.dataset}"
        if stale:
            raise LockHeld(f"{where} is locked by {describe(holder)}, which is no longer running: "
                           "rerun with --break-lock to take over")
        state = "is running" if stale is False else "may still be running on another host"
        raise LockHeld(f"{where} is locked by {describe(holder)}, which {state}: wait for it, "
                       "or if it is dead rerun with --break-lock")
    raise LockHeld(f"{store.path}: other runs took the lock as soon as it was free: try again")


def release(spark, cfg: Config, run_id: str) -> None:
    """Remove the lock if it is still ours (a broken-and-retaken lock is left alone)."""
    store = _Store(spark, lock_path(cfg))
    if store.read().get("run_id") == run_id:
        store.delete()


@contextmanager
def hold(spark, cfg: Config, run_id: str, what: str, *, break_lock: bool = False):
    acquire(spark, cfg, run_id, what, break_lock=break_lock)
    try:
        yield
    finally:
        release(spark, cfg, run_id)
