"""Where a stage's time goes: seconds by phase, on the driver and summed over tasks.

Executor-side code (the pandas functions of `prompts` and `scoring`) adds the seconds
of each phase of each Arrow batch to a Spark accumulator; the driver reads the sums
once the jobs are done. It costs a few perf_counter calls per batch (hundreds of rows),
so the score stage keeps it on and logs the totals of every run.

    timers = StageTimers(spark, ["render", "render_tokenize"])
    frame.mapInPandas(make_fn(timers), schema)   # executor code calls timers.add(...)
    timers.task_seconds()                         # {"render": 12.3, ...}: task-seconds

Task-seconds are summed over tasks that run side by side, so on P task slots they add
up to at most P x the wall time of the jobs that ran them. `StageTimers()` (no
session) is the disabled form: every call is a no-op.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator


class StageTimers:
    def __init__(self, spark=None, names: Iterable[str] = ()):
        self._acc = {name: spark.sparkContext.accumulator(0.0) for name in names} if spark is not None else {}
        self.driver: dict[str, float] = {}   # wall seconds of driver-side phases (not shipped to tasks)

    def __getstate__(self) -> dict:
        return {"_acc": self._acc, "driver": {}}

    def add(self, name: str, seconds: float) -> None:
        """Executor side: add `seconds` to phase `name` (no-op when disabled or unknown)."""
        acc = self._acc.get(name)
        if acc is not None:
            acc.add(seconds)

    @contextmanager
    def phase(self, name: str):
        """Driver side: add the wall time of the block to `driver[name]`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.driver[name] = self.driver.get(name, 0.0) + time.perf_counter() - start

    def map_batches(self, batches: Iterable, fn: Callable, read: str, write: str) -> Iterator:
        """mapInPandas body: fn(batch) for each input batch, adding the time spent waiting
        for each input (the JVM's upstream work, Arrow -> pandas) to `read` and the time
        the consumer holds each output (pandas -> Arrow, the write downstream) to `write`.

        >>> timers = StageTimers()     # disabled (no session): the batches pass through
        >>> list(timers.map_batches([1, 2], lambda batch: 10 * batch, read="in", write="out"))
        [10, 20]
        """
        source = iter(batches)
        while True:
            start = time.perf_counter()
            batch = next(source, None)
            if batch is None:
                return
            self.add(read, time.perf_counter() - start)
            out = fn(batch)
            start = time.perf_counter()
            yield out
            self.add(write, time.perf_counter() - start)

    def task_seconds(self) -> dict[str, float]:
        """Driver side: task-seconds per phase so far."""
        return {name: acc.value for name, acc in self._acc.items()}
