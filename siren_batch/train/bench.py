"""The training-step benchmark behind jobs/bench_train.py (make bench-train).

Prompts: siren-movies sketch prompts (bench_score.real_prompts: per user the authors'
sketch and 10 recent ratings, ~480 shared tokens, then one of several candidates),
`users` x `batch_size` of them, so one optimizer step = one user's candidates and a
packed step is one row. Each configuration (method x precision x packing) gets a
fresh model and optimizer, one untimed warm-up step (one row), then `steps` timed
steps (forward, backward, optimizer step).

FLOPs, counted for what the kernels execute (padding included, a dense attention
mask computes masked entries too), with N = weights of the decoder's Linear layers
(not the embedding), T = batch tokens incl. padding, W = row width, L = layers,
d = attention width:
  forward = 2 N T + 4 L d sum(W^2) (QK^T and AV) + 2 d V n (output head, answer rows only)
  full:  3 x forward (backward = input and weight gradients, ~2x forward)
  LoRA:  linear part 2 x (forward + input gradients; the frozen weights get no
         weight gradients) + 6 r (d_in + d_out) T per adapted module; attention and
         head 3 x (their backward needs gradients w.r.t. both operands).
  gradient checkpointing: + the decoder layers' forward again (linear, LoRA, attention).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import time
from pathlib import Path

import numpy as np

from siren_batch.bench_score import SHARED_MOVIES, real_prompts
from siren_batch.config import TrainConfig
from siren_batch.profiling import matmul_peak_flops, sync, write_results
from siren_batch.backends.device import cpu_has_bf16, is_cuda, pick_device
from siren_batch.train import batching, model as M, objective

logger = logging.getLogger(__name__)

CONFIGS = [  # (name, method, bf16, pack, gradient checkpointing)
    ("lora fp32 unpacked", "lora", False, False, False), ("lora bf16 unpacked", "lora", True, False, False),
    ("lora fp32 packed", "lora", False, True, False), ("lora bf16 packed", "lora", True, True, False),
    ("full bf16 unpacked", "full", True, False, False), ("full bf16 packed", "full", True, True, False),
    ("align ha bf16 packed", "align", True, True, False),
    ("lora fp32 unpacked checkpointed", "lora", False, False, True),
    ("lora bf16 unpacked checkpointed", "lora", True, False, True),
    ("lora fp32 packed checkpointed", "lora", False, True, True),
    ("lora bf16 packed checkpointed", "lora", True, True, True),
    ("full bf16 packed checkpointed", "full", True, True, True)]
# The default set keeps `make bench-train` within ~5 minutes on a busy 2-core machine.
DEFAULT = ["lora fp32 unpacked", "lora bf16 unpacked", "lora bf16 packed", "full bf16 packed", "align ha bf16 packed"]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_flops(model, batch, n_examples: int, method: str, lora_r: int, checkpointed: bool = False) -> float:
    """Executed FLOPs of one training step on `batch` (module doc); gradient checkpointing
    runs the decoder layers' forward once more in backward."""
    import torch

    core = M.core_model(model)
    linear, lora = 0, 0
    for name, mod in core.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lora_" not in name and mod is not core.get_output_embeddings():
            linear += mod.weight.numel()
            if name.endswith("base_layer"):
                lora += lora_r * (mod.in_features + mod.out_features)
    cfg = core.config
    d = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    tokens, width = batch.input_ids.numel(), batch.input_ids.shape[1]
    attention = 4 * cfg.num_hidden_layers * d * width * width * batch.input_ids.shape[0]
    head = 2 * cfg.hidden_size * cfg.vocab_size * n_examples
    again = (2 * linear * tokens + 2 * lora * tokens + attention) if checkpointed else 0
    if method == "full":
        return 3 * (2 * linear * tokens + attention + head) + again
    return 2 * (2 * linear * tokens) + 6 * lora * tokens + 3 * (attention + head) + again


def run_config(name: str, method: str, bf16: bool, pack: bool, checkpointed: bool, ids, groups, targets, args,
               path) -> dict:
    import torch

    from siren_batch.train.align import align_losses

    align = method == "align"    # SIREN stage 2: LoRA on k/v, HA loss against cached teacher states
    cfg = TrainConfig(method="lora" if align else method, batch_size=args.batch_size, max_seq_len=4096, lr=1e-4,
                      gradient_checkpointing=checkpointed,
                      **({"lora_targets": ["k_proj", "v_proj"]} if align else {}))
    device = pick_device("auto")
    model = M.build_model(cfg, path, device)
    params = list(M.trainable_params(model).values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    units = (batching.pack_units(ids, groups, cfg.batch_size, 2 * cfg.max_seq_len) if pack
             else batching.single_units(ids))
    kind = M.mask_kind(model) or "bool"
    batches = [batching.collate([units[u] for u in micro], args.pad_id, device, kind)
               for micro in batching.micro_batches(list(range(len(units))), units, cfg.batch_size)]

    core = M.core_model(model).config
    teacher = torch.randn(len(ids), core.num_hidden_layers, core.hidden_size)   # stands in for the cache

    def step(batch):
        if align:
            with M.autocast(device, bf16):
                states, logits = M.answer_states(model, batch, args.rating_ids)
            align_losses("ha", states, logits, teacher[batch.rows].to(device), None, None).mean().backward()
        else:
            with M.autocast(device, bf16):
                logits = M.rating_logits(model, batch, args.rating_ids)
            objective.losses(logits, targets[batch.rows], "ce").mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)

    step(batching.collate(units[:1], args.pad_id, device, kind))   # warm-up: first-call allocations, kernels
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
    timed = batches[:args.steps]
    seconds = [_timed(lambda b=b: step(b)) for b in timed]
    examples = sum(len(b.rows) for b in timed)
    flops = sum(step_flops(model, b, len(b.rows), cfg.method, cfg.lora_r, checkpointed) for b in timed)
    # This process runs only this configuration (run_isolated), so its peak RSS is the config's.
    peak_mem = (torch.cuda.max_memory_allocated(device) if is_cuda(device)
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    row = {"config": name, "method": method, "precision": "bf16 autocast" if bf16 else "fp32", "packed": pack,
           "gradient_checkpointing": checkpointed,
           "device": device, "steps": len(timed), "examples": examples,
           "rows_per_step": round(float(np.mean([b.input_ids.shape[0] for b in timed])), 1),
           "tokens_per_step": round(float(np.mean([b.tokens for b in timed])), 1),
           "padded_tokens_per_step": round(float(np.mean([b.input_ids.numel() for b in timed])), 1),
           "s_per_step": round(float(np.mean(seconds)), 2), "examples_per_s": round(examples / sum(seconds), 3),
           "gflops": round(flops / sum(seconds) / 1e9, 1), "peak_memory_mib": round(peak_mem, 1),
           "trainable_params": int(sum(p.numel() for p in params))}
    row["examples_per_hour"] = round(row["examples_per_s"] * 3600)
    logger.info("bench %s: %s", name, row)
    return row


def _child(config: tuple, ids, groups, targets, args, path) -> dict:
    import torch

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    return run_config(*config, ids, groups, targets, args, path)


def run_isolated(config: tuple, *inputs) -> dict:
    """run_config in a fresh process: its peak memory is not inflated by the configs
    before it (freed tensors stay in the allocator's pools)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_child, config, *inputs).result()


def run_bench(args) -> dict:
    import torch
    from transformers import AutoTokenizer

    from siren_batch.assets import resolve_llm
    from siren_batch.backends import rating_token_ids

    path = resolve_llm("default")
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts, groups = real_prompts(tokenizer, args.data, users=args.users, candidates=args.batch_size)
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    args.rating_ids, args.pad_id = rating_token_ids(tokenizer), tokenizer.pad_token_id or 0
    targets = objective.model_targets(np.arange(len(ids)) % 5 + 1.0, None, "rating")
    chosen = [c for c in CONFIGS if c[0] in args.configs]
    # only the precisions measured (an emulated bf16 product takes ~50 s on a CPU without bf16)
    peaks = {name: round(matmul_peak_flops(dtype) / 1e9, 1)
             for name, dtype, bf16 in (("fp32", "float32", False), ("bf16", "bfloat16", True))
             if any(c[2] == bf16 for c in chosen)}
    rows = [run_isolated(c, ids, groups, targets, args, path) for c in chosen]
    for row in rows:
        peak = peaks["bf16" if row["precision"].startswith("bf16") else "fp32"]
        row["pct_of_matmul_peak"] = round(100 * row["gflops"] / peak, 1)
    return {"model": path, "torch_threads": torch.get_num_threads(), "cpu_native_bf16": cpu_has_bf16(),
            "prompts": len(ids), "users": args.users, "batch_size": args.batch_size,
            "mean_prompt_tokens": round(float(np.mean([len(r) for r in ids])), 1),
            "matmul_peak_gflops": peaks, "configs": rows, "speedups": ratios(rows),
            "peak_memory_ratios": ratios(rows, "peak_memory_mib"),
            "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


RATIOS = [  # (label, numerator config, denominator config), in examples/s
    ("packed vs unpacked, LoRA bf16", "lora bf16 packed", "lora bf16 unpacked"),
    ("packed vs unpacked, LoRA fp32", "lora fp32 packed", "lora fp32 unpacked"),
    ("packed vs unpacked, full bf16", "full bf16 packed", "full bf16 unpacked"),
    ("bf16 vs fp32, LoRA unpacked", "lora bf16 unpacked", "lora fp32 unpacked"),
    ("bf16 vs fp32, LoRA packed", "lora bf16 packed", "lora fp32 packed"),
    ("LoRA vs full, bf16 packed", "lora bf16 packed", "full bf16 packed"),
    ("stage-2 alignment (HA, k/v LoRA) vs answer-only SFT (LoRA q/k/v/o), bf16 packed", "align ha bf16 packed",
     "lora bf16 packed"),
    ("gradient checkpointing vs not, LoRA fp32 unpacked", "lora fp32 unpacked checkpointed", "lora fp32 unpacked"),
    ("gradient checkpointing vs not, LoRA bf16 unpacked", "lora bf16 unpacked checkpointed", "lora bf16 unpacked"),
    ("gradient checkpointing vs not, LoRA fp32 packed", "lora fp32 packed checkpointed", "lora fp32 packed"),
    ("gradient checkpointing vs not, LoRA bf16 packed", "lora bf16 packed checkpointed", "lora bf16 packed"),
    ("gradient checkpointing vs not, full bf16 packed", "full bf16 packed checkpointed", "full bf16 packed")]


def ratios(rows: list[dict], key: str = "examples_per_s") -> dict[str, float]:
    """The RATIOS whose two configurations both ran, of `key` (examples/s, or peak memory)."""
    by = {r["config"]: r[key] for r in rows}
    return {label: round(by[a] / by[b], 2) for label, a, b in RATIOS if a in by and b in by}


def markdown(p: dict) -> str:
    lines = ["| config | s/step | examples/s | examples/h | rows x tokens/step (padded) | GFLOP/s | % of peak "
             "| peak memory MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in p["configs"]:
        lines.append(f"| {r['config']} | {r['s_per_step']} | {r['examples_per_s']} | {r['examples_per_hour']:,} | "
                     f"{r['rows_per_step']} x {r['padded_tokens_per_step'] / r['rows_per_step']:.0f} "
                     f"({r['padded_tokens_per_step']:.0f}) | {r['gflops']} | {r['pct_of_matmul_peak']}% | "
                     f"{r['peak_memory_mib']} |")
    rows = p["configs"]
    return "\n".join(lines) + (
        f"\n\nSmolLM2-135M-Instruct ({p['model']}), {p['prompts']} siren-movies prompts "
        f"({p['users']} users x {p['batch_size']} candidates, {p['mean_prompt_tokens']} tokens on average), "
        f"batch {p['batch_size']} examples = one user's candidates; torch threads {p['torch_threads']}, "
        f"native bf16 on this CPU: {p['cpu_native_bf16']}.\n"
        f"Matmul peak measured in this run (2048^3): {p['matmul_peak_gflops']} GFLOP/s.\n"
        "Speed-ups in examples/s: " + "; ".join(f"{k} {v}x" for k, v in ratios(rows).items()) + ".\n"
        "Peak memory ratios: " + "; ".join(f"{k} {v}x" for k, v in ratios(rows, "peak_memory_mib").items())
        + ".\n"
        "GFLOP/s counts executed work (padding and masked attention entries included; see "
        "siren_batch/train/bench.py for the LoRA / full formulas). Peak memory: peak RSS of a fresh process "
        f"per configuration, model load included (CUDA: max allocated); driver ru_maxrss {p['ru_maxrss_mib']} MiB.\n"
        f"Machine load (1-min average, before/after): {p.get('load_average_1min')}.")


def main(argv: list[str]) -> int:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description="answer-only training-step benchmark (default model)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step (one user's candidates)")
    parser.add_argument("--users", type=int, default=2, help="users = distinct steps (>= --steps)")
    parser.add_argument("--configs", default=",".join(DEFAULT),
                        help=f"comma-separated, of: {', '.join(c[0] for c in CONFIGS)}")
    parser.add_argument("--data", type=Path, default=SHARED_MOVIES)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--name", default="bench-train", help="results file under notebooks/benchmarks")
    args = parser.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",")]
    args.users = max(args.users, args.steps)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    payload = run_bench(args)
    payload["load_average_1min"] = {"before": round(load_before, 1), "after": round(os.getloadavg()[0], 1)}
    path = write_results(args.name, payload, markdown(payload))
    logger.info("results written to %s", path)
    return 0
