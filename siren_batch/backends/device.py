"""Where and in what precision a backend runs, and how long a prompt it takes:
small torch-side choices shared by the scoring backends and the benchmarks."""

from __future__ import annotations

from pathlib import Path


def pick_device(device: str) -> str:
    """`auto` -> cuda when a GPU is visible, else cpu; anything else unchanged (scoring,
    training and embedding all choose here)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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
        return torch.bfloat16 if device == "cuda" or cpu_has_bf16() else torch.float32
    return getattr(torch, dtype)


def max_positions(config, tokenizer) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else None
