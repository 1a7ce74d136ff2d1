"""Where and in what precision a backend runs, and how long a prompt it takes:
small torch-side choices shared by the scoring backends and the benchmarks."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

# Where the GPUs the process started with are kept once narrow_visible_gpus has narrowed
# CUDA_VISIBLE_DEVICES ("" = it was unset), so a later task's GPU is still found in them.
STARTED_WITH = "SIREN_CUDA_VISIBLE_DEVICES_AT_START"


def is_cuda(device: str) -> bool:
    """Whether `device`, as torch names it, is a GPU.

    >>> is_cuda("cuda"), is_cuda("cuda:1"), is_cuda("cpu")
    (True, True, False)
    """
    return device == "cuda" or device.startswith("cuda:")


def empty_cuda_cache() -> None:
    """Hand the CUDA allocator's cached memory back: a no-op where torch is not imported (it
    never imports it) or CUDA never started; on a broken CUDA context it does nothing, so the
    caller's own error is the one seen."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        try:
            torch.cuda.empty_cache()
        except RuntimeError:
            pass


def pick_device(device: str, gpu: int | None = None) -> str:
    """`auto` -> cuda when a GPU is visible, else cpu (scoring, training and embedding all
    choose here). `gpu`, the GPU Spark gave the running task (spark.task_gpu), makes auto and
    cuda that GPU, `cuda:<gpu>`; cpu and an explicit cuda:N stay as they are."""
    if device not in ("auto", "cuda"):
        return device
    if gpu is not None:
        # In an executor, before vLLM may fork its engine: asking the CUDA runtime whether there is
        # a GPU would start CUDA in this process ("poisons fork"); NVML answers without starting it.
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    if not torch.cuda.is_available():
        return "cpu" if device == "auto" else device
    if gpu is None:
        return "cuda"
    seen = torch.cuda.device_count()
    if gpu >= seen:
        raise ValueError(f"Spark gave this task GPU address {gpu}, but this process sees {seen} GPU(s) "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): the "
                         "discovery script's addresses must index the GPUs the executor sees")
    return f"cuda:{gpu}"


def on_gpu(cfg, gpu: int | None):
    """A stage config (a dataclass with `device`) on `gpu`, the GPU Spark gave the running task
    (spark.task_gpu): auto and cuda become cuda:<gpu>, so a worker's model sits on its own
    task's GPU and its model-cache key names it. Without one, `cfg` itself."""
    if gpu is None:
        return cfg
    device = pick_device(cfg.device, gpu)
    if not is_cuda(device):
        logger.warning("%s: Spark gave this task GPU %d, but torch sees no CUDA device (a CPU build of torch "
                       "on the executors?): running on %s", type(cfg).__name__, gpu, device)
    return dataclasses.replace(cfg, device=device)


def gpu_ordinal(addresses: list[str]) -> int:
    """Torch's number for the first of the GPU addresses Spark gave a task. Spark's own
    convention (pyspark/ml/torch/distributor.py, `_get_gpus_owned`): an address is an integer;
    with CUDA_VISIBLE_DEVICES set it indexes that list, else it is the GPU's index. Torch numbers
    the visible GPUs the same way, so the number is the address either way.

    >>> gpu_ordinal(["1"]), gpu_ordinal(["0", "3"])
    (1, 0)
    """
    if not addresses or not all(re.fullmatch(r"0|[1-9][0-9]*", a) for a in addresses):
        raise ValueError(f"Spark's GPU addresses {addresses} are not GPU indices (0, 1, ...): the discovery "
                         "script must print the indices nvidia-smi shows")
    return int(addresses[0])


def narrow_visible_gpus(device: str, environ=os.environ) -> None:
    """For an engine that starts its own processes (vLLM), which pick their GPU from
    CUDA_VISIBLE_DEVICES rather than a device name: on `cuda:N` leave only GPU N of those the
    process started with visible, so the engine's first GPU is that one; other devices leave
    the environment alone.

    >>> env = {"CUDA_VISIBLE_DEVICES": "4,5,6"}
    >>> narrow_visible_gpus("cuda:1", env); env["CUDA_VISIBLE_DEVICES"]
    '5'
    >>> narrow_visible_gpus("cuda:2", env); env["CUDA_VISIBLE_DEVICES"]   # a later task, another GPU
    '6'
    >>> env = {}; narrow_visible_gpus("cuda:1", env); env["CUDA_VISIBLE_DEVICES"]
    '1'
    """
    if not device.startswith("cuda:"):
        return
    ordinal = int(device.removeprefix("cuda:"))
    started = environ.setdefault(STARTED_WITH, environ.get("CUDA_VISIBLE_DEVICES", ""))
    visible = started.split(",") if started else None
    if visible is not None and ordinal >= len(visible):
        raise ValueError(f"{device}: the process started with CUDA_VISIBLE_DEVICES={started}")
    environ["CUDA_VISIBLE_DEVICES"] = visible[ordinal] if visible is not None else str(ordinal)


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX). Without it
    torch emulates bf16 and runs slower than fp32.

    >>> cpu_has_bf16("flags : fpu avx2 avx512f avx512_bf16"), cpu_has_bf16("flags : fpu avx2")
    (True, False)
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:     # not Linux: stay with fp32
            return False
    flags = set(cpuinfo.split())
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(dtype: str, device: str):
    """auto: bf16 on a GPU and on a CPU with native bf16 (2.4x fp32 on the dev machine,
    ratings within 0.15 of fp32: tests/test_scoring.py), else fp32."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if is_cuda(device) or cpu_has_bf16() else torch.float32
    return getattr(torch, dtype)


def max_positions(config, tokenizer) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else None
