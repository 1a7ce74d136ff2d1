"""What a `siren-batch` run shows on the console, and the log file that keeps the rest.

The console (stderr) shows what a person watching needs, and nothing else:

    ingest done in 41.6 s: 100,000 in, 99,287 out, 713 rejected
    score scored 40/100 rows (40.0%), 1.7 rows/s, ETA 35 s      <- one line, updated in place
    score done in 64.3 s: 100 in, 100 out

one line per stage (on a terminal it reads "ingest ..." while the stage runs, then
becomes its end line; elsewhere, such as a pipe or a file, the start is a line of its
own), a progress line (`Progress`), and warnings and errors from siren_batch itself.

Everything, at INFO and above with timestamps, goes to a log file per run, beside the
tables:

    <warehouse>/_logs/<dataset>/<YYYYmmddTHHMMSS>-<stage>.log    (a local warehouse; UTC time)
    ./logs/<dataset>/<YYYYmmddTHHMMSS>-<stage>.log               (hdfs://, s3a://, ...: a log stays local)

(Beside `<warehouse>/<dataset>/`, not in it: that folder holds tables only, and a run
that fails writes nothing there but its `runs` record. When the warehouse cannot be
written, the log goes to <tmp>/siren-batch-logs/ and the stage reports the error.)

That includes third-party loggers (py4j, transformers, torch, ...), Python warnings
(DeprecationWarning, FutureWarning, UserWarning: only those raised in siren_batch's own
code reach the console) and, through `jvm_stderr()`, the Spark JVM's own output (log4j,
native-library messages, the Python workers' stderr in local mode). `--verbose` sends
everything to the console as well and leaves the JVM's output on the console.
"""

from __future__ import annotations

import datetime as dt
import importlib.abc
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

logger = logging.getLogger("siren_batch.console")   # INFO here reaches the console

FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_LIBRARIES = ("py4j", "httpx", "urllib3", "filelock")   # INFO from these is chatter: WARNING+ only

_state: dict = {"handlers": [], "log_file": None, "verbose": False, "console": None}
_SHOWWARNING = warnings.showwarning


# ---- progress --------------------------------------------------------------------------

def format_duration(seconds: float) -> str:
    """A short human duration.

    >>> format_duration(35.2), format_duration(125), format_duration(7260), format_duration(float("inf"))
    ('35 s', '2 min 05 s', '2 h 01 min', '?')
    """
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def format_progress(done: int, total: int, elapsed_s: float, unit: str = "rows") -> str:
    """Rows done of the total, the rate so far and the time left at that rate.

    >>> format_progress(40, 100, 20.0)
    '40/100 rows (40.0%), 2.0 rows/s, ETA 30 s'
    >>> format_progress(0, 2_000_000, 0.0)
    '0/2,000,000 rows (0.0%), 0.0 rows/s, ETA ?'
    """
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("inf")
    return (f"{done:,}/{total:,} {unit} ({100 * done / max(total, 1):.1f}%), "
            f"{rate:,.1f} {unit}/s, ETA {format_duration(eta)}")


class Progress:
    """Rows done / total, rows/s and ETA. Each update redraws the line in place on a
    terminal; the log file (and a console that is not a terminal) gets a plain line at
    most every `every_s` seconds, and at the end."""

    def __init__(self, total: int, every_s: float = 30.0, label: str = "scored", clock=time.perf_counter):
        self.total, self.every_s, self.label, self.clock = total, every_s, label, clock
        self.done, self.start, self.last = 0, clock(), 0.0

    def update(self, rows: int) -> str:
        self.done += rows
        elapsed = self.clock() - self.start
        line = f"{self.label} {format_progress(self.done, self.total, elapsed)}"
        if elapsed - self.last >= self.every_s or self.done >= self.total:
            logger.info(line, extra={"live": True})
            self.last = elapsed
        elif _state["console"] is not None:
            _state["console"].live(line)
        return line


# ---- the console handler ---------------------------------------------------------------

class ConsoleHandler(logging.Handler):
    """Renders stage starts/ends, progress and siren_batch's warnings on one stream.

    The stage loop in siren_batch.cli logs "stage %s: start ..." and "stage %s: done in
    %.1fs" on the "siren_batch" logger; the run record (siren_batch.warehouse) logs
    "run %s %s: %s in %.1fs (in=%d out=%d rejected=%d)" just before the end; a night's
    steps (siren_batch.nightly) log "nightly %s %s: start" and end with their run record.
    Those records are recognised by their format strings and their arguments read, so
    the stage code need not know about the console."""

    def __init__(self, stream=None, verbose: bool = False):
        super().__init__(logging.INFO)
        self.stream = stream if stream is not None else sys.stderr
        self.verbose = verbose
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.shown = False           # a live line is on the terminal
        self.counts: dict = {}       # run record stage -> (in, out, rejected), since the stage started
        self.stage = ""              # the running stage, named in front of progress lines
        self.run_stage = ""          # its name in the run records ("nightly-ingest" for a night's step)
        self.setFormatter(logging.Formatter(FILE_FORMAT))

    def live(self, text: str) -> None:
        """Redraw the live line (a terminal only; elsewhere a no-op)."""
        if self.tty:
            width = shutil.get_terminal_size((120, 20)).columns - 1
            shown = (f"{self.stage} ... " if self.stage else "") + text
            self._write("\r\033[K" + shown[:width])   # clear the line, then draw
            self.shown = True

    def line(self, text: str) -> None:
        self._write(("\r\033[K" if self.shown else "") + text + "\n")
        self.shown = False

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):   # a closed pipe must not fail the run
            pass

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self.verbose:
                if getattr(record, "live", False) and self.tty:
                    self.live(record.getMessage())
                else:
                    self.line(self.format(record))
                return
            self._quiet(record)
        except Exception:
            self.handleError(record)

    def _quiet(self, record: logging.LogRecord) -> None:
        msg, args = str(record.msg), record.args if isinstance(record.args, tuple) else ()
        if record.name == "siren_batch" and msg.startswith("stage %s: start") and args:
            self._start(args[0], record=args[0])
        elif record.name == "siren_batch" and msg.startswith("stage %s: done") and len(args) >= 2:
            self._done(args[0], float(args[1]), self._stage_counts(args[0]))
        elif record.name == "siren_batch.warehouse" and msg.startswith("run %s %s:") and len(args) >= 7:
            if args[0] == self.run_stage and args[0].startswith("nightly-"):   # a night's step ends here
                self._done(self.stage, float(args[3]), _counts(tuple(args[4:7])), status=args[2])
            else:
                self.counts[args[0]] = tuple(args[4:7])
        elif record.name == "siren_batch.nightly" and msg.startswith("nightly %s %s: start") and len(args) >= 2:
            self._start(f"nightly {args[0]} {args[1]}", record=f"nightly-{args[1]}")
        elif record.name == "siren_batch.nightly" and msg.startswith("nightly %s %s: already"):
            self.line(record.getMessage())
        elif getattr(record, "live", False):
            self.live(record.getMessage()) if self.tty else self.line(
                f"{self.stage}: {record.getMessage()}" if self.stage else record.getMessage())
        elif record.name == "siren_batch.console" and record.levelno < logging.WARNING:
            self.line(record.getMessage())
        elif record.levelno >= logging.WARNING and record.name.startswith("siren_batch"):
            where = f" (traceback in {_state['log_file']})" if record.exc_info and _state["log_file"] else ""
            self.line(f"{record.levelname}: {record.getMessage()}{where}")

    def _start(self, stage: str, record: str) -> None:
        self.counts = {}
        self.stage, self.run_stage = stage, record
        self.live("") if self.tty else self.line(f"{stage} ...")

    def _stage_counts(self, stage: str) -> str:
        """The stage's own run record's counts; a stage made of others (score-calibrate runs
        score, then calibrate) shows each of theirs: ': score 1,000 in, 1,000 out; calibrate ...'."""
        if stage in self.counts:
            return _counts(self.counts[stage])
        parts = [f"{name} {_counts(c).removeprefix(': ')}" for name, c in self.counts.items()]
        return f": {'; '.join(parts)}" if parts else ""

    def _done(self, stage: str, seconds: float, counts: str, status: str = "ok") -> None:
        self.stage = self.run_stage = ""
        ended = "done in" if status == "ok" else f"{status} after"
        self.line(f"{stage} {ended} {seconds:.1f} s{counts}")


def _counts(counts) -> str:
    """': 100,000 in, 99,287 out, 713 rejected' from a run record's counts."""
    if not counts:
        return ""
    rows_in, rows_out, rejected = counts
    return f": {rows_in:,} in, {rows_out:,} out" + (f", {rejected:,} rejected" if rejected else "")


# ---- set-up ----------------------------------------------------------------------------

def log_dir(cfg_or_dir) -> Path:
    """Where a run's log goes: `<warehouse>/_logs/<dataset>` for a local warehouse,
    `./logs/<dataset>` for a remote one (hdfs://, s3a://, gs://, ...), or the folder given.

    >>> from siren_batch.config import Config
    >>> str(log_dir(Config(warehouse="/data/wh"))), str(log_dir(Config(warehouse="s3a://bucket/wh")))
    ('/data/wh/_logs/ml-100k', 'logs/ml-100k')
    """
    if isinstance(cfg_or_dir, (str, Path)):
        return Path(cfg_or_dir)
    warehouse = cfg_or_dir.warehouse.removeprefix("file://")
    if "://" in warehouse or warehouse.startswith("file:"):
        return Path("logs") / cfg_or_dir.dataset
    return Path(warehouse) / "_logs" / cfg_or_dir.dataset


def setup_logging(cfg_or_dir=None, verbose: bool = False, stage: str = "run", stream=None) -> Path | None:
    """Route logging for one run; returns the log file (None when `cfg_or_dir` is None,
    as for show-config: console only). Calling it again replaces the earlier set-up."""
    teardown_logging()
    root = logging.getLogger()
    root.setLevel(os.environ.get("SIREN_LOG_LEVEL", "INFO"))
    console = ConsoleHandler(stream, verbose=verbose)
    handlers: list[logging.Handler] = [console]
    log_file = None
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    # An unwritable warehouse is the stage's error to report (in one line): log to /tmp then.
    fallback = Path(tempfile.gettempdir()) / "siren-batch-logs"
    for folder in ([log_dir(cfg_or_dir), fallback] if cfg_or_dir is not None else []):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            file_handler = logging.FileHandler(folder / f"{stamp}-{stage}.log", encoding="utf-8")
        except OSError:
            continue
        file_handler.setFormatter(logging.Formatter(FILE_FORMAT))
        handlers.append(file_handler)
        log_file = Path(file_handler.baseFilename)
        break
    for handler in handlers:
        root.addHandler(handler)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    _state.update(handlers=handlers, log_file=log_file, verbose=verbose, console=console)
    warnings.showwarning = _showwarning
    if not verbose:
        # Progress bars (transformers' "Loading weights", also in the Spark workers,
        # which inherit this environment) would fill the log file with redraws.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        _adopt_library_handlers()
    return log_file


def teardown_logging() -> None:
    """Undo setup_logging: its handlers closed and removed, Python warnings shown as before."""
    for handler in _state["handlers"]:
        logging.getLogger().removeHandler(handler)
        handler.close()
    _state.update(handlers=[], log_file=None, verbose=False, console=None)
    warnings.showwarning = _SHOWWARNING


def jvm_stderr() -> Path | None:
    """The file the Spark JVM's stderr should go to: this run's log, unless verbose or
    logging was not set up here (a notebook, the tests)."""
    return None if _state["verbose"] else _state["log_file"]


def _showwarning(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning: from siren_batch's own code to the console (and file), from
    any other package to the file only."""
    ours = Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent)
    text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
    logging.getLogger("siren_batch.warnings" if ours else "py.warnings").warning("%s", text)


# ---- libraries that print to stderr themselves -----------------------------------------

def _adopt_transformers(module) -> None:
    module.disable_default_handler()   # it prints WARNINGs to stderr itself, and does not propagate
    module.enable_propagation()


def _adopt_torch(module) -> None:
    for name in [n for n in list(logging.root.manager.loggerDict) if n == "torch" or n.startswith("torch.")]:
        log = logging.getLogger(name)
        for handler in [h for h in log.handlers if type(h) is logging.StreamHandler]:
            log.removeHandler(handler)
        log.propagate = True


_ADOPT = {"transformers.utils.logging": _adopt_transformers, "torch": _adopt_torch}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a hook right after a module has been imported (transformers and torch attach
    their own stderr handlers on import, so routing them must wait for it)."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _ADOPT or fullname in sys.modules:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_adopt(module):
            exec_module(module)
            if not _state["verbose"]:
                _ADOPT[fullname](module)

        spec.loader.exec_module = exec_then_adopt
        return spec


def _adopt_library_handlers() -> None:
    for name, adopt in _ADOPT.items():
        if name in sys.modules:
            adopt(sys.modules[name])
    if not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
