"""Answer-only fine-tuning at the rating-token position (pure torch, no Spark).

    from siren_batch.train.sft import train
    summary = train(train_rows, valid_rows, cfg.train, run_dir, meta={"dataset": "ml-100k"})

Rows are pandas frames (user_id, item_id, prompt, label, base) from
siren_batch.train.data. The prompt ends with the answer-only suffix, so the
model is trained on the logits over the rating tokens at its last position
(objective.py: ce / mse / both on the rating or on the bias-baseline residual).

Under run_dir: checkpoint/ (every train.checkpoint_every steps; a second run with
the same name resumes from it and ends exactly where an uninterrupted run would),
best/ (the adapter, or the full model, with the best valid RMSE; early stopping
after train.patience evaluations without improvement), metrics.json (learning
curve), training_meta.json (what a scorer must know, e.g. `target: residual`)
and train_config.yaml.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from siren_batch.config import Config, TrainConfig
from siren_batch.train import batching, objective

logger = logging.getLogger(__name__)

# Options that change neither the numbers nor the data order: a run may resume with
# other values for them.
RESUMABLE_CHANGES = ("torch_threads", "checkpoint_every", "progress_every_s", "eval_every", "patience",
                     "max_minutes", "gradient_checkpointing")   # the last: same gradients, less memory


@dataclass
class Encoded:
    """Tokenized rows that fit train.max_seq_len."""
    ids: list[list[int]]
    labels: np.ndarray
    bases: np.ndarray
    targets: np.ndarray        # what E[r] is trained towards (objective.model_targets)
    groups: list[str]          # user ids: packing stays within a user
    skipped: int               # rows longer than max_seq_len
    kept: list[int] = field(default_factory=list)   # each encoded row's position in the input rows


def encode(rows, tokenizer, cfg: TrainConfig) -> Encoded:
    """rows: the columns prompt, label, user_id and optionally base, as a pandas DataFrame
    or a dict of arrays (a GPU machine without pandas)."""
    prompts = list(rows["prompt"])
    if not prompts:
        return Encoded([], np.zeros(0), np.zeros(0), np.zeros(0), [], 0)
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    keep = [i for i, row in enumerate(ids) if 0 < len(row) <= cfg.max_seq_len]
    labels = np.asarray(rows["label"], dtype=np.float64)[keep]
    bases = (np.asarray(rows["base"], dtype=np.float64) if "base" in rows else np.full(len(ids), np.nan))[keep]
    if cfg.target == "residual" and np.isnan(bases).any():
        raise ValueError("train.target=residual needs a `base` (bias prediction) for every row")
    return Encoded([ids[i] for i in keep], labels, bases, objective.model_targets(labels, bases, cfg.target),
                   [str(u) for u in np.asarray(rows["user_id"])[keep]], len(ids) - len(keep), keep)


def build_units(enc: Encoded, cfg: TrainConfig, pack: bool) -> list[batching.Unit]:
    if not pack:
        return batching.single_units(enc.ids)
    return batching.pack_units(enc.ids, enc.groups, cfg.batch_size, 2 * cfg.max_seq_len)


def make_order(units: list[batching.Unit], cfg: TrainConfig) -> list[list[list[int]]]:
    """The data order: optimizer steps -> micro-batches -> unit indices. Units are
    shuffled per epoch with seed + epoch; a fractional last epoch is cut."""
    if not units:
        return []
    micro: list[list[int]] = []
    per_epoch = 0
    for epoch in range(math.ceil(cfg.epochs)):
        perm = np.random.default_rng(cfg.seed + epoch).permutation(len(units)).tolist()
        batches = batching.micro_batches(perm, units, cfg.batch_size)
        per_epoch = per_epoch or len(batches)
        micro.extend(batches)
    micro = micro[:max(1, round(cfg.epochs * per_epoch))]
    return [micro[s:s + cfg.grad_accum] for s in range(0, len(micro), cfg.grad_accum)]


def lr_factor(step: int, warmup: int, total: int, schedule: str = "linear") -> float:
    """Linear warm-up over `warmup` steps, then linear decay to 0 at `total` (or constant).

    >>> [round(lr_factor(s, 2, 6), 2) for s in range(6)]
    [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    >>> [round(lr_factor(s, 2, 6, "constant"), 2) for s in range(4)]
    [0.5, 1.0, 1.0, 1.0]
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return max(0.0, (total - step) / max(1, total - warmup))


def fingerprint(cfg: TrainConfig, *encs: Encoded) -> str:
    """Hash of what fixes the numbers: the options (less RESUMABLE_CHANGES) and the data."""
    options = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for enc in encs:
        h.update(json.dumps([enc.ids, enc.labels.tolist(), np.nan_to_num(enc.bases).tolist()]).encode())
    return h.hexdigest()[:16]


def train(train_rows, valid_rows, cfg: TrainConfig, run_dir: Path, meta: dict | None = None,
          callbacks: list[Callable[[int, dict], None]] | None = None) -> dict:
    """Train (or resume, or return the summary of a finished run with the same name).
    callbacks(step, state) run after each optimizer step and its checkpoint."""
    from siren_batch.train.loop import SFTRun

    return SFTRun(train_rows, valid_rows, cfg, Path(run_dir), meta or {}, callbacks or []).run()


def write_outputs(run_dir: Path, cfg: TrainConfig, state: dict, info: dict) -> dict:
    """metrics.json (learning curve), training_meta.json and train_config.yaml."""
    (run_dir / "train_config.yaml").write_text(yaml.safe_dump({"train": asdict(cfg)}, sort_keys=False))
    metrics = {**info, "status": state["stopped"] or "running", "steps_done": state["step"],
               "examples_seen": state["examples_seen"], "wall_s": round(state["wall_s"], 1),
               "best": state["best"], "curve": state["curve"], "train_loss_by_step": state["losses"]}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    meta = {**info, **scorer_meta(cfg), "base_model_option": cfg.base_model, "lora_r": cfg.lora_r,
            "lora_alpha": cfg.lora_alpha, "lora_targets": list(cfg.lora_targets), "best": state["best"],
            "status": metrics["status"], "steps_done": state["step"], "examples_seen": state["examples_seen"]}
    (run_dir / "training_meta.json").write_text(json.dumps(meta, indent=1))
    return metrics


def run_meta(cfg: Config, name: str) -> dict:
    """What every training stage records of the run beside its options: the dataset, the
    config hash, the run name and the prompt options the scorer must repeat (priors)."""
    return {"dataset": cfg.dataset, "config_hash": cfg.hash(), "name": name, "priors": cfg.prompts.priors}


def scorer_meta(cfg: TrainConfig) -> dict:
    """What a scorer must know to read the trained model's output."""
    return {"method": cfg.method, "loss": cfg.loss, "target": cfg.target, "variant": cfg.variant,
            "scale": list(objective.SCALE),
            "prediction": ("clip(base + E[r] - 3, 1, 5) where base = the user+item bias prediction"
                           if cfg.target == "residual" else "E[r]")}
