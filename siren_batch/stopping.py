"""Stopping a run on SIGTERM or SIGINT without waiting for the Spark job it is in.

Python runs a signal handler in the main thread, between bytecodes. A driver that waits
for a Spark job waits inside a Py4J call, and raising there leaves the call's answer
unread on the thread's Py4J connection: the cleanup that follows (the warehouse lock's
release, the failed run's record) then waits for the whole job, and reads the job's
answer as its own. So from the first signal on, another thread cancels the session's
jobs until the run has unwound. A signal that lands inside a Py4J call lets that call
go on, and it fails at once with the cancelled job's error (a call that is not a job
ends as it would have, and the next job fails); anywhere else the signal raises
SystemExit there, as in a plain Python program (an Arrow collect's read of its socket
is such a place: the job behind it is cancelled too). The cleanup starts no Spark job
(a run record is written by the driver, the lock is a file), so the cancelling cannot
cut it short. Later signals are only logged, so they cannot break into the cleanup
either. `on_signals` turns what comes out of the block into `Stopped`: the command line
prints one line and exits with 128 + the signal's number, as a shell reports a process
the signal ended.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
CANCEL_EVERY_S = 0.1   # a job shorter than this may still finish; a longer one is cancelled


def exit_code(signum: int) -> int:
    """The status a shell reports for a process a signal stopped: 128 + its number."""
    return 128 + signum


class Stopped(Exception):
    """The run was stopped by a signal; `code` is the exit status to report."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}: Spark jobs cancelled, any stage that was "
                         "running recorded as failed, the warehouse lock released")

    @property
    def code(self) -> int:
        return exit_code(self.signum)


def in_py4j_call(frame) -> bool:
    """Whether `frame` or one of its callers is Py4J's (a call into the JVM)."""
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("py4j."):
            return True
        frame = frame.f_back
    return False


def _cancel_until(spark, done: threading.Event) -> None:
    """Cancel the session's jobs every CANCEL_EVERY_S until `done` (a job that starts
    after one cancel is caught by the next)."""
    while not done.is_set():
        try:
            spark.sparkContext.cancelAllJobs()
        except Exception:  # the session is gone: nothing is left to cancel
            logger.debug("cancelAllJobs failed", exc_info=True)
            return
        done.wait(CANCEL_EVERY_S)


class Watch:
    """What `on_signals` yields: the first signal taken (None before one), and `check`, for
    the points between stages where a run can stop cleanly."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def check(self, *_) -> None:
        """Raise SystemExit (128 + the signal) when a signal came; else nothing."""
        if self.signum is not None:
            raise SystemExit(exit_code(self.signum))


@contextmanager
def on_signals(spark, signals=SIGNALS):
    """Within the block, SIGTERM and SIGINT stop the run as the module doc says; yields a
    `Watch`. Only the main thread can take signals, so elsewhere (a test's worker thread)
    the block runs as it is. The previous handlers come back afterwards."""
    watch = Watch()
    if threading.current_thread() is not threading.main_thread():
        yield watch
        return
    unwound = threading.Event()
    canceller = threading.Thread(target=_cancel_until, args=(spark, unwound), name="siren-batch-stop", daemon=True)

    def handle(signum, frame):
        name = signal.Signals(signum).name
        if watch.signum is not None:
            logger.warning("%s: already stopping (SIGKILL stops at once, then --break-lock)", name)
            return
        watch.signum = signum
        logger.warning("%s: stopping: cancelling the running Spark jobs", name)
        canceller.start()
        if not in_py4j_call(frame):
            raise SystemExit(exit_code(signum))

    previous = {s: signal.signal(s, handle) for s in signals}
    try:
        yield watch
    except BaseException as err:
        if watch.signum is not None:
            raise Stopped(watch.signum) from err
        raise
    else:
        if watch.signum is not None:   # it landed in a call that was no job, after the last point where a run stops
            logger.warning("%s came when the run's work was done: it finished", signal.Signals(watch.signum).name)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        unwound.set()
        if canceller.is_alive():   # its last cancel reaches the JVM before anything after the block
            canceller.join()
