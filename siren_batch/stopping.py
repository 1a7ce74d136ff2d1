"""Stopping a run on SIGTERM or SIGINT without waiting for the Spark job it is in.

Python runs a signal handler in the main thread, between bytecodes. A driver that waits
for a Spark job waits inside a Py4J call, and raising there leaves the call's answer
unread on the thread's Py4J connection: the cleanup that follows (the warehouse lock's
release, the failed run's record) then waits for the whole job, and reads the job's
answer as its own. So a signal that lands inside a Py4J call asks another thread to
cancel the session's jobs, until that call returns; the call then fails at once with
the cancelled job's error (a call that is not a job ends as it would have; the run
then stops at its next stage or night step, `Watch.check`). A signal anywhere else
raises SystemExit there, as a plain Python program would. Either way the run unwinds
through its cleanup, and `on_signals` turns what comes out into `Stopped`: the command
line prints one line and exits with 128 + the signal's number, as a shell reports a
process the signal ended.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from contextlib import contextmanager

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
CANCEL_EVERY_S = 0.5


class Stopped(Exception):
    """The run was stopped by a signal; `code` is the exit status to report."""

    def __init__(self, signum: int):
        self.signum = signum
        self.code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}: the running Spark job was cancelled, "
                         "the warehouse lock released and the run recorded as failed")


def in_py4j_call(frame) -> object | None:
    """The outermost Py4J frame on the stack that `frame` belongs to, else None."""
    found = None
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("py4j."):
            found = frame
        frame = frame.f_back
    return found


def on_stack(target, frame) -> bool:
    """Whether `target` is `frame` or one of its callers."""
    while frame is not None:
        if frame is target:
            return True
        frame = frame.f_back
    return False


def _cancel_while_waiting(spark, call, main_ident: int) -> None:
    """Cancel the session's jobs until the main thread leaves the Py4J call `call`
    (a job that starts after one cancel is caught by the next)."""
    while on_stack(call, sys._current_frames().get(main_ident)):
        try:
            spark.sparkContext.cancelAllJobs()
        except Exception:  # the session is gone: nothing is left to cancel
            logger.debug("cancelAllJobs failed", exc_info=True)
            return
        time.sleep(CANCEL_EVERY_S)


class Watch:
    """What `on_signals` yields: the signals taken so far, and `check`, for the points
    between stages where a run can stop cleanly."""

    def __init__(self) -> None:
        self.got: list[int] = []

    def check(self, *_) -> None:
        """Raise SystemExit (128 + the signal) when a signal came; else nothing."""
        if self.got:
            raise SystemExit(128 + self.got[0])


@contextmanager
def on_signals(spark, signals=SIGNALS):
    """Within the block, SIGTERM and SIGINT stop the run as the module doc says; yields a
    `Watch`. Only the main thread can take signals, so elsewhere (a test's worker thread)
    the block runs as it is. The previous handlers come back afterwards."""
    watch = Watch()
    if threading.current_thread() is not threading.main_thread():
        yield watch
        return
    got = watch.got
    canceller: list[threading.Thread] = []
    main_ident = threading.get_ident()

    def handle(signum, frame):
        got.append(signum)
        call = in_py4j_call(frame)
        if call is None:
            raise SystemExit(128 + signum)
        if not (canceller and canceller[-1].is_alive()):
            logger.warning("%s: cancelling the running Spark job", signal.Signals(signum).name)
            thread = threading.Thread(target=_cancel_while_waiting, args=(spark, call, main_ident),
                                      name="siren-batch-stop", daemon=True)
            canceller.append(thread)
            thread.start()

    previous = {s: signal.signal(s, handle) for s in signals}
    try:
        yield watch
    except BaseException as err:
        if got:
            raise Stopped(got[0]) from err
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
