"""The answer-only scoring benchmark behind jobs/bench_score.py.

Realistic prompts from data/siren-movies: per user, the authors' sketch text plus
the 10 most recent ratings (a ~300-500 token prefix), then one of several
candidates (~30 tokens) and the answer-only suffix. Measures pairs/s for
one-at-a-time, batched and batched+shared-prefix on the same prompts, in fp32 and bf16, achieved
GFLOP/s against a matmul peak measured in the same run, and CoT vs answer-only
seconds per pair.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from siren_batch.assets import REPO_ROOT
from siren_batch.config import ScoreConfig
from siren_batch.profiling import matmul_peak_flops, write_results

logger = logging.getLogger(__name__)

SHARED_MOVIES = REPO_ROOT.parent / "shared" / "data" / "siren-movies"
SYSTEM = ("You are a recommender assistant. From the user's past behaviour, predict the rating from 1.0 "
          "to 5.0 that the user will give the candidate item. Reason first: put your reasoning in "
          "<think> </think> and the rating in <answer> </answer>. The rating must be a number between "
          "1.0 and 5.0.")
ANSWER_ONLY_SUFFIX = "\n<think>\n</think>\n<answer>"
# Where the candidate sits in the user turn. candidate-first is the reference code's order;
# question-first is this project's prompts.py order (the fixed question before the candidate,
# so a pair's own tokens after its user's shared prefix are only the candidate line and the
# template's tail). Held here rather than imported: prompts.py needs pyspark, this file must not.
ORDERS = {
    "candidate-first": "The candidate is described as: {target}\n"
                       "Based on the above information, what rating will the user give?",
    "question-first": "Based on the above information, what rating will the user give the candidate below?\n"
                      "The candidate is described as: {target}",
}


def _jsonl(path: Path, limit: int):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        for k, line in enumerate(fh):
            if k >= limit:
                return
            yield json.loads(line)


def real_prompts(tokenizer, data_dir: Path = SHARED_MOVIES, users: int = 4, candidates: int = 10,
                 recent: int = 10, answer_only: bool = True, max_tokens: int = 560,
                 order: str = "candidate-first") -> tuple[list[str], list[str]]:
    """`users` x `candidates` chat-templated prompts; candidates are the user's own test
    target plus other items' targets; users whose prompt exceeds `max_tokens` are skipped
    (keeps the shared prefix near the 300-500 tokens of real sketch prompts); `order`: a key
    of ORDERS. The same users are chosen in either order. Returns (prompts, user ids)."""
    if order not in ORDERS:
        raise ValueError(f"unknown prompt order {order!r}; use one of {', '.join(ORDERS)}")
    sketches = {r["user_id"]: r["user_profile_prompt"] for r in _jsonl(data_dir / "user_feature.jsonl", 10**6)}
    others = [r["target"] for r in _jsonl(data_dir / "train.jsonl.gz", 400)]

    def render(history: list[str], sketch: str, target: str, order: str) -> str:
        user = (f"{sketch}\n\nBelow are the user's recent ratings in the format: Title, Genres, Rating\n"
                + "\n".join(history) + "\n\n" + ORDERS[order].format(target=target))
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + ANSWER_ONLY_SUFFIX if answer_only else text

    texts, groups = [], []
    for row in _jsonl(data_dir / "test.jsonl.gz", 10**6):
        history = row["history"].splitlines()[-recent:]
        sketch = sketches.get(row["user_id"], "")
        if len(history) < recent or sketch.count("\n- ") < 3:   # want a full, prefix-heavy prompt
            continue
        targets = [row["target"], *others[len(groups) % 300:][:candidates - 1]]
        mine = [render(history, sketch, target, order) for target in targets]
        if len(tokenizer(render(history, sketch, row["target"], "candidate-first"),
                         add_special_tokens=False)["input_ids"]) > max_tokens:  # same users in either order
            continue
        texts.extend(mine)
        groups.extend([row["user_id"]] * len(mine))
        if len(set(groups)) == users:
            break
    return texts, groups


def _timed(backend, texts, groups, **overrides) -> dict:
    backend.cfg = dataclasses.replace(backend.cfg, **overrides)
    before = dict(backend.stats)
    start, cpu = time.perf_counter(), time.process_time()
    results = (backend.generate_cot(texts) if backend.cfg.mode == "cot" else backend.score(texts, groups))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    done = {k: backend.stats[k] - before[k] for k in before}
    return {"seconds": seconds, "cpu_seconds": cpu, "results": results, **done}


def run_bench(users: int, candidates: int, batch_size: int, cot_prompts: int, max_new_tokens: int,
              data_dir: Path, dtypes: tuple[str, ...] = ("float32", "bfloat16"),
              orders: tuple[str, ...] = ("candidate-first",)) -> dict:
    import torch

    from siren_batch.backends.transformers_backend import TransformersBackend

    peak = matmul_peak_flops() / 1e9
    rows, probs, agree, tokens = {}, {}, {}, {}
    paths = {"one_at_a_time": dict(batch_size=1, shared_prefix=False),
             "batched": dict(batch_size=batch_size, shared_prefix=False),
             "batched_shared_prefix": dict(batch_size=batch_size, shared_prefix=True)}
    for dtype, order in ((d, o) for d in dtypes for o in orders):
        backend = TransformersBackend(ScoreConfig(device="cpu", dtype=dtype, batch_size=batch_size))
        texts, groups = real_prompts(backend.tokenizer, data_dir, users, candidates, order=order)
        tokens[order] = _token_stats(backend, texts, groups)
        n_params = sum(p.numel() for p in backend.model.parameters())
        n_nonembed = n_params - backend.model.get_input_embeddings().weight.numel()
        backend.score(texts[:2], groups[:2])  # warm-up
        for path, overrides in paths.items():
            name = f"{path}/{dtype}" + (f"/{order}" if len(orders) > 1 else "")
            run = _timed(backend, texts, groups, **overrides)
            probs[name] = np.array([r.probs for r in run["results"]])
            same_prompts = f"one_at_a_time/{dtypes[0]}" + (f"/{order}" if len(orders) > 1 else "")
            agree[name] = float(np.abs(probs[name] - probs[same_prompts]).max())
            rows[name] = {"pairs": len(texts), "seconds": round(run["seconds"], 2),
                          "cpu_seconds": round(run["cpu_seconds"], 2),
                          "pairs_per_s": round(len(texts) / run["seconds"], 2),
                          "tokens_processed": run["tokens"], "tokens_with_padding": run["padded_tokens"],
                          "forward_passes": run["forward_passes"], "prefix_passes": run["prefix_passes"],
                          "gflops_nonembed": round(2 * n_nonembed * run["tokens"] / run["seconds"] / 1e9, 1),
                          "gflops_all_params": round(2 * n_params * run["tokens"] / run["seconds"] / 1e9, 1)}
            rows[name]["pct_of_peak"] = round(100 * rows[name]["gflops_nonembed"] / peak, 1)
            logger.info("bench %s: %s", name, rows[name])
    first = next(iter(rows))
    base = rows[first]
    for row in rows.values():
        row["speedup_vs_one_at_a_time"] = round(row["pairs_per_s"] / base["pairs_per_s"], 2)
        row["cpu_speedup_vs_one_at_a_time"] = round(base["cpu_seconds"] / row["cpu_seconds"], 2)
    cot = _bench_cot(backend, data_dir, cot_prompts, max_new_tokens)
    mean_tokens, mean_prefix = tokens[orders[0]]
    best = max(rows, key=lambda name: rows[name]["pairs_per_s"])
    return {"model": backend.model_id, "device": backend.device, "dtypes": list(dtypes), "cot_dtype": dtypes[-1],
            "torch_threads": torch.get_num_threads(), "users": users, "candidates_per_user": candidates,
            "pairs": len(texts), "mean_prompt_tokens": mean_tokens, "shared_prefix_tokens_mean": mean_prefix,
            "params": n_params, "params_nonembed": n_nonembed, "matmul_peak_gflops": round(peak, 1),
            "orders": {o: {"mean_prompt_tokens": t, "shared_prefix_tokens_mean": pre,
                           "own_tokens_after_prefix_mean": round(t - pre, 1)} for o, (t, pre) in tokens.items()},
            "paths": rows, "max_abs_prob_diff_vs_one_at_a_time": agree, "cot": cot,
            "cot_vs_answer_only_ratio": {
                name: round(cot["seconds_per_pair"] / (rows[name]["seconds"] / len(texts)), 1)
                for name in rows if name.endswith(dtypes[-1])}, "fastest": best}


def _token_stats(backend, texts, groups) -> tuple[float, float]:
    """Mean prompt tokens, and mean shared prefix per user."""
    from siren_batch.backends.plan import shared_prefix_len

    ids = backend.tokenizer(texts, add_special_tokens=False)["input_ids"]
    by_user: dict[str, list] = {}
    for g, row in zip(groups, ids):
        by_user.setdefault(g, []).append(row)
    prefix = np.mean([shared_prefix_len(rows) for rows in by_user.values()])
    return round(float(np.mean([len(r) for r in ids])), 1), round(float(prefix), 1)


def _bench_cot(backend, data_dir: Path, n: int, max_new_tokens: int) -> dict:
    texts, _ = real_prompts(backend.tokenizer, data_dir, users=n, candidates=1, answer_only=False)
    run = _timed(backend, texts, texts, mode="cot", max_new_tokens=max_new_tokens, batch_size=len(texts))
    backend.cfg = dataclasses.replace(backend.cfg, mode="answer_only")
    outputs = [r.output_tokens for r in run["results"]]
    return {"pairs": len(texts), "max_new_tokens": max_new_tokens, "batch_size": len(texts),
            "seconds": round(run["seconds"], 2), "seconds_per_pair": round(run["seconds"] / len(texts), 3),
            "mean_output_tokens": round(float(np.mean(outputs)), 1),
            "parsed": sum(r.error is None for r in run["results"])}


def _markdown(p: dict) -> str:
    lines = ["| path | pairs/s | speedup (wall) | speedup (CPU time) | s/pair | tokens processed "
             "| GFLOP/s | % of peak |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in p["paths"].items():
        lines.append(f"| {name} | {r['pairs_per_s']} | {r['speedup_vs_one_at_a_time']}x | "
                     f"{r['cpu_speedup_vs_one_at_a_time']}x | {round(r['seconds'] / r['pairs'], 3)} | "
                     f"{r['tokens_processed']} | {r['gflops_nonembed']} | {r['pct_of_peak']}% |")
    cot = p["cot"]
    return "\n".join(lines) + (
        f"\n\n{p['model']} on {p['device']} ({', '.join(p['dtypes'])}; torch threads: {p['torch_threads']}); "
        f"{p['users']} users x {p['candidates_per_user']} candidates = {p['pairs']} pairs, "
        f"{p['mean_prompt_tokens']} prompt tokens, of which {p['shared_prefix_tokens_mean']} shared per user. "
        f"Speedups are against the first row.\n"
        f"GFLOP/s = 2 x {p['params_nonembed']:,} non-embedding params x real tokens / s (attention and "
        f"padding not counted); peak = best {p['matmul_peak_gflops']} GFLOP/s of a 2048^3 fp32 matmul.\n"
        f"Prompt orders (tokens per pair, shared per user, a pair's own after the prefix): {p['orders']}.\n"
        f"Max |probs difference| vs one_at_a_time in the first dtype on the same prompts: "
        f"{p['max_abs_prob_diff_vs_one_at_a_time']}.\n\n"
        f"CoT ({p['cot_dtype']}, greedy, max_new_tokens={cot['max_new_tokens']}, {cot['pairs']} prompts in one "
        f"batch): {cot['seconds_per_pair']} s/pair, {cot['mean_output_tokens']} output tokens, "
        f"{cot['parsed']}/{cot['pairs']} answers parsed. CoT / answer-only time per pair: "
        f"{p['cot_vs_answer_only_ratio']}.\n\nMachine load (1-min average, before/after): "
        f"{p.get('load_average_1min')}.")


def main(argv: list[str]) -> int:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description="answer-only scoring benchmark (CPU, default model)")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=10, help="candidates per user")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cot-prompts", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--data", type=Path, default=SHARED_MOVIES)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch default")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated; CoT runs in the last")
    parser.add_argument("--orders", default="candidate-first",
                        help=f"comma-separated prompt orders, each measured in the same run: {', '.join(ORDERS)}")
    parser.add_argument("--name", default="bench-score", help="results file name under notebooks/benchmarks")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # the machine may be shared: record how busy it was
    payload = run_bench(args.users, args.candidates, args.batch_size, args.cot_prompts,
                        args.max_new_tokens, args.data, tuple(args.dtypes.split(",")),
                        tuple(args.orders.split(",")))
    payload["load_average_1min"] = {"before": round(load_before, 1), "after": round(os.getloadavg()[0], 1)}
    path = write_results(args.name, payload, _markdown(payload))
    logger.info("results written to %s", path)
    return 0
