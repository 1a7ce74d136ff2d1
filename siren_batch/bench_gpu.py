"""`make bench-score-gpu`: answer-only scoring on one GPU, every path, two model shapes.

    python -m siren_batch.bench_gpu                       # on a machine with one GPU
    python -m siren_batch.bench_gpu --save-inputs build/gpu-bench   # here: pack tokenizer + prompts
    python -m siren_batch.bench_gpu --inputs build/gpu-bench        # there: no data, no model needed

Needs torch and transformers only (no pyspark, no network, no weights): the models
are random-initialised in bf16 with the shapes of SmolLM2-135M (the default) and
Qwen3-4B (the paper's); speed does not depend on the weights. Prompts are real
siren-movies sketch prompts, 20 candidates per user, tokenized with the bundled
tokenizer (the Qwen3 shape keeps its own vocabulary size, so its embedding and
head cost what they cost). Per shape and path: pairs/s, achieved TFLOP/s against a
bf16 matmul peak measured in the same run, peak memory, max |probs difference|
against plain batches, and chain-of-thought vs answer-only time per pair. Without a
GPU it says so and exits 0 (`--device cpu` runs it anyway, for tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from siren_batch.backends.device import empty_cuda_cache, is_cuda
from siren_batch.bench_score import ANSWER_ONLY_SUFFIX, SHARED_MOVIES, real_prompts
from siren_batch.config import ScoreConfig
from siren_batch.profiling import matmul_peak_flops, sync, write_results

logger = logging.getLogger(__name__)

SHAPES = {  # the released configs' sizes (hub config.json of each model)
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True),
    "qwen3-4b": dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=True),
}
# Measured before cross-user batching (issue 8, one H100, the per-user shared-prefix path), pairs/s.
BEFORE_H100 = {
    "smollm2-135m": {"plain_b64": 292, "plain_b256": 692, "shared_per_user_b64": 161, "raw_forward_256": 1114},
    "qwen3-4b": {"plain_b64": 60, "plain_b256": 82, "shared_per_user_b64": 114, "raw_forward_256": 86},
}


def random_model(shape: str, tokenizer, device: str, layers: int | None = None):
    """A random-initialised causal LM of a named shape, bf16, on `device`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    if layers:
        spec["num_hidden_layers"] = layers
    spec["vocab_size"] = max(spec["vocab_size"], len(tokenizer))
    config = AutoConfig.for_model(**spec, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def _raw_forward(backend, texts: list[str], rows: int = 256) -> tuple[float, int, int]:
    """One left-padded forward of `rows` prompts, no framework: the ceiling. -> (s, pairs, tokens)."""
    import torch

    ids = backend.tokenizer(texts[:rows], add_special_tokens=False)["input_ids"]
    input_ids, mask = backend._pad(ids)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        for timed in (False, True):   # the first call warms kernels up
            sync(backend.device)
            start = time.perf_counter()
            backend.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
            sync(backend.device)
    return time.perf_counter() - start, len(ids), int(mask.sum())


def bench_shape(shape: str, tokenizer, texts: list[str], groups: list[str], device: str, peak: float,
                batch_tokens: int, cot_prompts: int, max_new_tokens: int, layers: int | None = None) -> dict:
    import torch

    from siren_batch.backends.transformers_backend import TransformersBackend

    model = random_model(shape, tokenizer, device, layers)
    nonembed = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    backend = TransformersBackend(ScoreConfig(model=shape, device=device, dtype="bfloat16"), model, tokenizer)
    paths = {"plain_b64": dict(shared_prefix=False, batch_size=64, batch_tokens=10**9),
             "plain_b256": dict(shared_prefix=False, batch_size=256, batch_tokens=10**9),
             "cross_user": dict(shared_prefix=True, batch_size=512, batch_tokens=batch_tokens)}
    backend.score(texts[:8], groups[:8])  # warm-up
    rows, probs = {}, {}
    for name, overrides in paths.items():
        backend.cfg = dataclasses.replace(backend.cfg, **overrides)
        if is_cuda(device):
            torch.cuda.reset_peak_memory_stats(device)
        before = dict(backend.stats)
        sync(device)
        start = time.perf_counter()
        results = backend.score(texts, groups)
        sync(device)
        seconds = time.perf_counter() - start
        tokens = backend.stats["tokens"] - before["tokens"]
        probs[name] = np.array([r.probs if r.probs else [np.nan] * 5 for r in results])
        rows[name] = {"pairs_per_s": round(len(texts) / seconds, 1), "seconds": round(seconds, 3),
                      "tokens": tokens, "forward_passes": backend.stats["forward_passes"] - before["forward_passes"],
                      "tflops": round(2 * nonembed * tokens / seconds / 1e12, 2),
                      "errors": sum(r.error is not None for r in results)}
        rows[name]["pct_of_peak"] = round(100 * rows[name]["tflops"] / peak, 1)
        if is_cuda(device):
            rows[name]["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        logger.info("%s %s: %s", shape, name, rows[name])
    seconds, pairs, tokens = _raw_forward(backend, texts)
    rows["raw_forward_256"] = {"pairs_per_s": round(pairs / seconds, 1), "seconds": round(seconds, 3),
                               "tokens": tokens, "tflops": round(2 * nonembed * tokens / seconds / 1e12, 2)}
    rows["raw_forward_256"]["pct_of_peak"] = round(100 * rows["raw_forward_256"]["tflops"] / peak, 1)
    for name, p in probs.items():
        rows[name]["max_abs_prob_diff_vs_plain_b64"] = float(np.nanmax(np.abs(p - probs["plain_b64"])))
    best = max(r["pairs_per_s"] for name, r in rows.items() if name != "raw_forward_256")
    cot = _bench_cot(backend, texts, groups, cot_prompts, max_new_tokens) if cot_prompts else None
    if cot:
        cot["cot_vs_best_answer_only"] = round(cot["seconds_per_pair"] * best, 1)
    del backend, model
    if is_cuda(device):
        torch.cuda.empty_cache()
    return {"params_nonembed": nonembed, "paths": rows, "cot": cot, "before_h100": BEFORE_H100.get(shape)}


def _bench_cot(backend, texts: list[str], groups: list[str], n: int, max_new_tokens: int) -> dict:
    """Greedy CoT on one prompt of each of `n` users (the answer-only suffix removed)."""
    firsts = {g: t for t, g in zip(texts, groups)}
    prompts = [t.removesuffix(ANSWER_ONLY_SUFFIX) for t in list(firsts.values())[:n]]
    backend.cfg = dataclasses.replace(backend.cfg, mode="cot", max_new_tokens=max_new_tokens,
                                      batch_size=len(prompts), batch_tokens=10**9)
    sync(backend.device)
    start = time.perf_counter()
    results = backend.generate_cot(prompts)
    sync(backend.device)
    seconds = time.perf_counter() - start
    backend.cfg = dataclasses.replace(backend.cfg, mode="answer_only")
    return {"pairs": len(prompts), "max_new_tokens": max_new_tokens,
            "seconds_per_pair": round(seconds / len(prompts), 4),
            "mean_output_tokens": round(float(np.mean([r.output_tokens or 0 for r in results])), 1)}


def load_inputs(inputs: Path | None, pairs: int, candidates: int):
    """(tokenizer, prompts, user ids): from a --save-inputs folder, else the bundled
    tokenizer and siren-movies."""
    from transformers import AutoTokenizer

    if inputs:
        rows = [json.loads(line) for line in (inputs / "prompts.jsonl").read_text().splitlines()]
        return (AutoTokenizer.from_pretrained(inputs / "tokenizer"),
                [r["prompt"] for r in rows][:pairs], [r["user_id"] for r in rows][:pairs])
    from siren_batch.assets import resolve_llm

    tokenizer = AutoTokenizer.from_pretrained(resolve_llm("default"))
    if not (SHARED_MOVIES / "test.jsonl.gz").exists():
        raise SystemExit(f"bench-score-gpu: no prompts: {SHARED_MOVIES} is absent; pass --inputs <folder "
                         "written by --save-inputs>")
    texts, groups = real_prompts(tokenizer, SHARED_MOVIES, users=pairs // candidates, candidates=candidates)
    return tokenizer, texts, groups


def save_inputs(folder: Path, tokenizer, texts: list[str], groups: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"user_id": g, "prompt": t}) + "\n"
                                                  for t, g in zip(texts, groups)))


def _markdown(p: dict) -> str:
    on_gpu = p["device_name"] != "cpu"   # the H100 "before" figures compare only with a GPU run
    lines = ["| shape | path | pairs/s | TFLOP/s | % of peak | peak memory GiB | forward passes "
             "| max abs probs diff vs plain_b64 | before (H100, issue 8) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    if not on_gpu:
        lines.insert(0, "**Run on the CPU** (`--device cpu`): no GPU was available. The paths and their "
                        "agreement are real; the GPU figures, and the H100 'before' column, need a GPU run.\n")
    for shape, s in p["shapes"].items():
        if "error" in s:
            lines.append(f"| {shape} | failed: {s['error'][:200]} | | | | | | | |")
            continue
        for name, r in s["paths"].items():
            before = (s["before_h100"] or {}).get("shared_per_user_b64" if name == "cross_user" else name, "")
            before = before if on_gpu else "–"
            lines.append(f"| {shape} | {name} | {r['pairs_per_s']} | {r['tflops']} | {r.get('pct_of_peak', '')} | "
                         f"{r.get('peak_memory_gib', '')} | {r.get('forward_passes', 1)} | "
                         f"{r.get('max_abs_prob_diff_vs_plain_b64', '')} | {before} |")
    cot = {shape: s["cot"] for shape, s in p["shapes"].items() if "cot" in s}
    return "\n".join(lines) + (
        f"\n\n{p['device_name']}; bf16 matmul peak {p['matmul_peak_tflops']} TFLOP/s (measured in this run); "
        f"{p['pairs']} pairs, {p['candidates']} candidates per user, cross_user token budget {p['batch_tokens']}.\n"
        "TFLOP/s = 2 x non-embedding params x real tokens / s (attention and padding not counted). "
        "`before` is the per-user shared-prefix path for cross_user.\n\n"
        f"Chain of thought (random weights, so every trace runs to max_new_tokens): {json.dumps(cot)}.")


def main(argv: list[str] | None = None) -> int:
    import torch

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1200)
    parser.add_argument("--candidates", type=int, default=20, help="candidates per user")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--batch-tokens", type=int, default=65536, help="token budget of the cross-user path")
    parser.add_argument("--cot-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (CPU smoke runs)")
    parser.add_argument("--inputs", type=Path, help="a folder written by --save-inputs")
    parser.add_argument("--save-inputs", type=Path, help="write the tokenizer and prompts there, then exit")
    parser.add_argument("--name", default="bench-score-gpu")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available() and not args.save_inputs:
        print("bench-score-gpu: no CUDA GPU on this machine; nothing measured (make bench-score for the CPU)")
        return 0
    tokenizer, texts, groups = load_inputs(args.inputs, args.pairs, args.candidates)
    if args.save_inputs:
        save_inputs(args.save_inputs, tokenizer, texts, groups)
        logger.info("wrote %d prompts and the tokenizer to %s", len(texts), args.save_inputs)
        return 0
    peak = matmul_peak_flops("bfloat16", args.device, n=8192 if args.device == "cuda" else 1024, repeats=10) / 1e12
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    payload = {"device_name": name, "matmul_peak_tflops": round(peak, 1), "pairs": len(texts),
               "candidates": args.candidates, "batch_tokens": args.batch_tokens, "shapes": {}}
    failed = 0
    for shape in args.shapes.split(","):
        # the file is rewritten after every shape: a later shape that fails or is cut off by
        # the machine's time limit leaves the earlier shapes' figures in place
        try:
            payload["shapes"][shape] = bench_shape(shape, tokenizer, texts, groups, args.device, peak,
                                                   args.batch_tokens, args.cot_prompts, args.max_new_tokens,
                                                   args.layers)
        except (RuntimeError, ValueError, OSError) as err:
            logger.exception("shape %s failed", shape)
            payload["shapes"][shape] = {"error": f"{type(err).__name__}: {err}"}
            failed += 1
        empty_cuda_cache()   # a broken context leaves it be: the shape's error is written below all the same
        path = write_results(args.name, payload, _markdown(payload))
        logger.info("results so far (%s) written to %s", ", ".join(payload["shapes"]), path)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
