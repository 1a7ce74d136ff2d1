"""Benchmark plumbing: peak memory of a process tree, machine facts, and the
results files under notebooks/benchmarks/ (JSON for tools, Markdown for people)."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import sys
import threading
import time
from pathlib import Path

from siren_batch.assets import REPO_ROOT
from siren_batch.backends.device import is_cuda

# Where every bench-* writes its results file; SIREN_RESULTS_DIR elsewhere (the GPU kit's rehearsals).
RESULTS_DIR = Path(os.environ.get("SIREN_RESULTS_DIR", REPO_ROOT / "notebooks" / "benchmarks"))


def sync(device: str) -> None:
    """Wait for the work queued on a GPU, so that a timer read next sees it finished (a CPU runs
    synchronously: nothing to wait for). `device` as torch names it: cpu, cuda, cuda:1."""
    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def matmul_peak_flops(dtype: str = "float32", device: str = "cpu", n: int = 2048, repeats: int = 5,
                      budget_s: float = 2.0) -> float:
    """Best n x n matmul rate (FLOP/s) in `dtype` on `device` with the current torch threads: its
    practical peak, for the benchmarks' % of peak. A warm-up, then at most `repeats` timed runs,
    none started once `budget_s` is spent (at least one): a CPU without native bf16 takes ~2.3 s
    per 1024^3 bf16 product and ~50 s per 2048^3 one."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    best, spent, runs = float("inf"), 0.0, 0
    while runs <= repeats and (runs < 2 or spent < budget_s):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        took = time.perf_counter() - start
        best, spent, runs = min(best, took), spent + took, runs + 1
    return 2 * n**3 / best


def _tree_rss_bytes(root: int) -> int:
    """Resident memory of `root` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            ppid, pages = int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = pages * page
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


class PeakMemory:
    """Samples this process tree's RSS (driver, JVM, Python workers) in the background."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_bytes(os.getpid()))
            self._stop.wait(self.interval_s)

    def reset(self) -> None:
        self.peak = _tree_rss_bytes(os.getpid())

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return round(self.peak / 2**20, 1)


def machine_info() -> dict:
    import multiprocessing

    mem_kib = 0
    try:
        with open("/proc/meminfo") as fh:
            mem_kib = int(fh.readline().split()[1])
    except OSError:
        pass
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), cpu)
    except OSError:
        pass
    return {"host": platform.node(), "platform": platform.platform(), "cpu": cpu,
            "cpus": multiprocessing.cpu_count(), "memory_gib": round(mem_kib / 2**20, 1),
            "python": sys.version.split()[0]}


def write_results(name: str, payload: dict, markdown: str) -> Path:
    """Write <name>.json and <name>.md with the command, machine and date."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    header = {"command": " ".join(shlex.quote(a) for a in sys.argv),
              "machine": machine_info(),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps({**header, **payload}, indent=2) + "\n")
    md = (f"# {name}\n\n- command: `{header['command']}`\n- date: {header['date']}\n"
          f"- machine: {header['machine']['cpu']}, {header['machine']['cpus']} cpus, "
          f"{header['machine']['memory_gib']} GiB, {header['machine']['platform']}\n\n{markdown}\n")
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(md)
    return path


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 2)
