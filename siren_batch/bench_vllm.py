"""vLLM answer-only scoring benchmark (make bench-score-vllm), run in .venv-vllm:

    .venv-vllm/bin/python -m siren_batch.bench_vllm [--users 8] [--candidates 8] [--no-compare]

pairs/s on real siren-movies prompts with the prefix cache emptied before each
repeat, and the transformers backend on the same prompts in the same run.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np

from siren_batch.backends.base import ScoreResult
from siren_batch.backends.vllm_backend import RECORDED_ENV, VLLMBackend, vllm_dtype
from siren_batch.config import ScoreConfig

logger = logging.getLogger(__name__)


def run_bench(users: int, candidates: int, repeats: int, data_dir: Path, compare: bool) -> dict:
    """pairs/s of answer-only scoring on real siren-movies prompts (users x candidates,
    long shared user prefixes), prefix cache emptied before each repeat; optionally the
    transformers backend (shared prefix) on the same prompts, same machine, same minute."""
    import time

    from siren_batch.bench_score import real_prompts

    start = time.perf_counter()
    backend = VLLMBackend(ScoreConfig(backend="vllm"))
    engine_s = time.perf_counter() - start
    try:
        texts, groups = real_prompts(backend.tokenizer, data_dir, users, candidates)
        backend.score(["Rate this: ", "Hello"], ["warm", "up"])  # first-step overheads, no shared prefix
        runs, results = [], []
        for _ in range(repeats):
            backend.llm.reset_prefix_cache()
            before, start = dict(backend.stats), time.perf_counter()
            results = backend.score(texts, groups)
            seconds = time.perf_counter() - start
            done = {k: backend.stats[k] - before[k] for k in before}
            runs.append({"seconds": round(seconds, 2), "pairs_per_s": round(len(texts) / seconds, 2),
                         "prompt_tokens": done["prompt_tokens"], "cached_tokens": done["cached_tokens"]})
            logger.info("bench run: %s", runs[-1])
    finally:
        backend.close()
    payload = {"backend": "vllm", "model": backend.model_id, "dtype": vllm_dtype("auto", backend.on_cpu),
               "device": "cpu" if backend.on_cpu else "gpu",
               "block_size": backend.block_size, "env": {k: os.environ.get(k) for k in RECORDED_ENV},
               "users": users, "candidates_per_user": candidates, "pairs": len(texts),
               "mean_prompt_tokens": round(runs[-1]["prompt_tokens"] / len(texts), 1),
               "errors": sum(r.error is not None for r in results), "engine_start_s": round(engine_s, 1),
               "runs": runs, "pairs_per_s": max(r["pairs_per_s"] for r in runs)}
    if compare:
        payload["transformers"] = _bench_transformers(texts, groups, results)
    return payload


def _bench_transformers(texts: list[str], groups: list[str], vllm_results: list[ScoreResult]) -> dict:
    import time

    from siren_batch.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(ScoreConfig(device="cpu", dtype="float32"))  # vLLM on CPU runs fp32
    backend.score(texts[:2], groups[:2])  # warm-up
    start = time.perf_counter()
    results = backend.score(texts, groups)
    seconds = time.perf_counter() - start
    diff = max(float(np.abs(np.array(a.probs) - np.array(b.probs)).max())
               for a, b in zip(results, vllm_results) if a.probs and b.probs)
    return {"path": "batched_shared_prefix", "seconds": round(seconds, 2),
            "pairs_per_s": round(len(texts) / seconds, 2), "max_abs_prob_diff_vs_vllm": diff}


def main(argv: list[str]) -> int:
    import argparse

    from siren_batch.bench_score import SHARED_MOVIES
    from siren_batch.profiling import write_results

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description="vLLM answer-only scoring benchmark (default model)")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=8, help="candidates per user")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", type=Path, default=SHARED_MOVIES)
    parser.add_argument("--no-compare", action="store_true", help="skip the transformers backend run")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]  # the machine may be shared: record how busy it was
    payload = run_bench(args.users, args.candidates, args.repeats, args.data, not args.no_compare)
    payload["load_average_1min"] = {"before": round(load_before, 1), "after": round(os.getloadavg()[0], 1)}
    tf = payload.get("transformers", {})
    markdown = (f"vLLM ({payload['device']}, {payload['dtype']}, prefix caching) answer-only: "
                f"**{payload['pairs_per_s']} pairs/s** on {payload['pairs']} pairs ({payload['users']} users x "
                f"{payload['candidates_per_user']} candidates, {payload['mean_prompt_tokens']} prompt tokens); "
                f"runs {payload['runs']}; engine start {payload['engine_start_s']} s; env {payload['env']}.\n\n"
                f"transformers (shared prefix, same prompts): {tf.get('pairs_per_s')} pairs/s; max |probs "
                f"difference| vs vLLM {tf.get('max_abs_prob_diff_vs_vllm')}.\n\n"
                f"Machine load (1-min average, before/after): {payload['load_average_1min']}.")
    path = write_results("bench-score-vllm", payload, markdown)
    logger.info("results written to %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
