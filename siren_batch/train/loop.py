"""The training loop behind siren_batch.train.sft.train: one object per run.

Order of work per optimizer step: forward/backward over its micro-batches (loss
summed over examples, divided by the step's example count), gradient clipping,
optimizer and scheduler step; then a valid evaluation every train.eval_every
steps (and at the last), then a checkpoint every train.checkpoint_every steps,
then the callbacks. Evaluations use no randomness, so restoring the RNG state
saved with a checkpoint reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from siren_batch.assets import resolve_llm
from siren_batch.backends import rating_token_ids
from siren_batch.backends.device import pick_device
from siren_batch.config import TrainConfig
from siren_batch.train import batching, checkpoint, model as M, objective
from siren_batch.train.sft import build_units, encode, fingerprint, lr_factor, make_order, scorer_meta, write_outputs

logger = logging.getLogger(__name__)

TIME_BUDGET = "time_budget"   # state["stopped"] of an invocation that spent train.max_minutes
_now = time.perf_counter    # the loop's clock (a test's fake clock replaces it)
REPLAN_EVERY = 10             # steps between estimates of where train.decay_to_budget ends the decay


def decay_end(step: int, total: int, per_step_s: float, left_s: float) -> int:
    """The step at which train.decay_to_budget's linear decay reaches 0: where the time left
    runs out at the measured pace, never past the run's last step nor before the next one.

    >>> decay_end(100, 600, 0.5, 100.0), decay_end(100, 600, 0.5, 1000.0), decay_end(100, 600, 0.5, -5.0)
    (300, 600, 101)
    """
    return int(min(total, max(step + 1, step + max(left_s, 0.0) / max(per_step_s, 1e-9))))


class SFTRun:
    def __init__(self, train_rows, valid_rows, cfg: TrainConfig, run_dir: Path, meta: dict, callbacks: list):
        import torch
        from transformers import AutoTokenizer

        self.cfg, self.run_dir, self.callbacks = cfg, run_dir, callbacks
        self.born = _now()   # train.max_minutes counts from here: loading and evaluations too
        self.device = pick_device(cfg.device)
        if cfg.torch_threads and self.device == "cpu":
            torch.set_num_threads(cfg.torch_threads)
        self.bf16 = M.use_bf16(cfg.dtype, self.device)
        self.path = resolve_llm(cfg.base_model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.rating_ids = rating_token_ids(self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self.train_enc = encode(train_rows, self.tokenizer, cfg)
        self.valid_enc = encode(valid_rows, self.tokenizer, cfg)
        if not self.train_enc.ids:
            raise ValueError(f"no training rows fit train.max_seq_len={cfg.max_seq_len} "
                             f"({self.train_enc.skipped} skipped): raise it or check the prompts")
        self.model = M.build_model(cfg, self.path, self.device)
        self.mask_kind = M.mask_kind(self.model)
        pack = cfg.pack and self.mask_kind is not None
        if cfg.pack and not pack:
            logger.warning("packing off: this attention implementation takes no custom 4D mask")
        self.units = build_units(self.train_enc, cfg, pack)
        self.valid_units = build_units(self.valid_enc, cfg, pack)
        self.order = make_order(self.units, cfg)
        self.params = M.trainable_params(self.model)
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
        total = len(self.order)
        self.decay_end = total   # where the linear decay reaches 0 (train.decay_to_budget moves it)
        warmup = cfg.warmup_steps
        if total and warmup * 2 > total:   # the peak rate would come late or never: a tenth of the run
            warmup = max(1, total // 10)
            logger.warning("train.warmup_steps=%d is over half of this run's %d steps: warming up over %d",
                           cfg.warmup_steps, total, warmup)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup, self.decay_end, cfg.schedule))
        self.info = {**meta, "base_model": self.path, "device": self.device,
                     "autocast": "bfloat16" if self.bf16 else "off (float32)",
                     "train_rows": len(self.train_enc.ids), "valid_rows": len(self.valid_enc.ids),
                     "skipped_too_long": self.train_enc.skipped + self.valid_enc.skipped,
                     "packed_rows": len(self.units), "total_steps": total, "warmup_steps": warmup,
                     "trainable_params": int(sum(p.numel() for p in self.params.values())),
                     "all_params": int(sum(p.numel() for p in self.model.parameters()))}
        self.state = {"step": 0, "examples_seen": 0, "wall_s": 0.0, "curve": [], "losses": [], "best": None,
                      "bad_evals": 0, "stopped": None, "fingerprint": fingerprint(cfg, self.train_enc, self.valid_enc)}
        logger.info("training %s (%s, %s params trainable of %s) on %s, autocast %s: %d train rows in %d packed "
                    "rows, %d valid rows, %d skipped (> %d tokens), %d steps", self.path, cfg.method,
                    f"{self.info['trainable_params']:,}", f"{self.info['all_params']:,}", self.device,
                    self.info["autocast"], self.info["train_rows"], len(self.units), self.info["valid_rows"],
                    self.info["skipped_too_long"], cfg.max_seq_len, total)

    # ---- the run -------------------------------------------------------------------

    def run(self) -> dict:
        self._resume()
        if self.state["stopped"]:
            logger.info("run %s already finished (%s); nothing to do", self.run_dir, self.state["stopped"])
            return write_outputs(self.run_dir, self.cfg, self.state, self.info)
        if self.state["step"] == 0 and self.cfg.eval_at_start and not self.state["curve"]:
            self._eval_and_select(train_loss=None)
        started, done_here = _now(), 0
        last_log = started - self.cfg.progress_every_s
        while self.state["step"] < len(self.order) and not self.state["stopped"]:
            step_start = _now()
            loss = self._train_step(self.order[self.state["step"]])
            self.state["wall_s"] += _now() - step_start
            done_here += 1
            step = self.state["step"]
            if self.cfg.decay_to_budget and self.cfg.max_minutes and done_here % REPLAN_EVERY == 0:
                self._replan_decay(step, started, done_here)
            out_of_time = self._out_of_time() and step < len(self.order)
            if step % self.cfg.eval_every == 0 or step == len(self.order) or out_of_time:
                self._eval_and_select(self._recent_loss())
            if step == len(self.order) and not self.state["stopped"]:
                self.state["stopped"] = "done"
            elif out_of_time and not self.state["stopped"]:
                logger.info("time budget train.max_minutes=%s spent at step %d/%d: stopping; run again to "
                            "continue", self.cfg.max_minutes, step, len(self.order))
                self.state["stopped"] = TIME_BUDGET
            if step % self.cfg.checkpoint_every == 0 or self.state["stopped"]:
                self._checkpoint()
            if _now() - last_log >= self.cfg.progress_every_s or self.state["stopped"]:
                last_log = _now()
                self._log_progress(loss, started, done_here)
            for callback in self.callbacks:
                callback(step, self.state)
        if self.state["best"] is None:   # no valid rows: the last weights are the result
            self._save_best()
        return write_outputs(self.run_dir, self.cfg, self.state, self.info)

    def _replan_decay(self, step: int, started: float, done_here: int) -> None:
        """train.decay_to_budget: this invocation's pace so far (evaluations included) and the
        budget left say at which step the decay should end; the next step's lr follows it."""
        now = _now()
        left = self.born + 60 * self.cfg.max_minutes - now
        end = decay_end(step, len(self.order), (now - started) / done_here, left)
        if end != self.decay_end:
            logger.info("decay_to_budget: the lr now reaches 0 at step %d of %d (%.0f s left)", end,
                        len(self.order), left)
        self.decay_end = end

    def _out_of_time(self) -> bool:
        budget = self.cfg.max_minutes
        return budget is not None and _now() - self.born >= 60 * budget

    def _train_step(self, micro: list[list[int]]) -> float:
        import torch

        n = sum(len(self.units[u].rows) for batch in micro for u in batch)
        total = 0.0
        for batch_units in micro:
            batch = self._batch([self.units[u] for u in batch_units])
            losses = self._losses(batch)
            (losses.sum() / n).backward()
            total += float(losses.detach().sum())
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state["step"] += 1
        self.state["examples_seen"] += n
        self.state["losses"].append([self.state["step"], round(total / n, 6)])
        return total / n

    def _losses(self, batch: batching.Batch):
        """Per-example training losses [n] of a batch (batch.rows order)."""
        with M.autocast(self.device, self.bf16):
            logits = M.rating_logits(self.model, batch, self.rating_ids)
        return objective.losses(logits, self.train_enc.targets[batch.rows], self.cfg.loss)

    def _batch(self, units: list[batching.Unit]) -> batching.Batch:
        return batching.collate(units, self.pad_id, self.device, self.mask_kind or "bool")

    def _recent_loss(self) -> float:
        last_eval = self.state["curve"][-1]["step"] if self.state["curve"] else 0
        recent = [loss for step, loss in self.state["losses"] if step > last_eval]
        return round(float(np.mean(recent)), 6) if recent else None

    def _log_progress(self, loss: float, started: float, done_here: int) -> None:
        elapsed = _now() - started
        per_step = elapsed / max(done_here, 1)
        left = len(self.order) - self.state["step"]
        examples = sum(len(self.units[u].rows) for micro in self.order[self.state["step"] - done_here:
                                                                        self.state["step"]]
                       for batch in micro for u in batch)
        logger.info("step %d/%d: loss %.4f, %.2f examples/s, %.1f s/step, ETA %.0f s", self.state["step"],
                    len(self.order), loss, examples / max(elapsed, 1e-9), per_step, left * per_step)

    # ---- evaluation and selection ---------------------------------------------------

    def evaluate(self) -> dict | None:
        """Valid metrics of the current weights (None without valid rows)."""
        import torch

        if not self.valid_enc.ids:
            return None
        self.model.eval()
        logits = np.zeros((len(self.valid_enc.ids), len(objective.SCALE)))
        order = list(range(len(self.valid_units)))
        with torch.no_grad():
            for batch_units in batching.micro_batches(order, self.valid_units, 2 * self.cfg.batch_size):
                batch = self._batch([self.valid_units[u] for u in batch_units])
                with M.autocast(self.device, self.bf16):
                    out = M.rating_logits(self.model, batch, self.rating_ids)
                logits[batch.rows] = out.float().cpu().numpy()
        self.model.train()
        return objective.valid_metrics(logits, self.valid_enc.labels, self.valid_enc.bases, self.cfg.target)

    def _eval_and_select(self, train_loss: float | None) -> None:
        metrics = self.evaluate()
        point = {"step": self.state["step"], "train_loss": train_loss,
                 "examples_seen": self.state["examples_seen"], "wall_s": round(self.state["wall_s"], 2),
                 "lr": self.scheduler.get_last_lr()[0], "device": self.device}
        if metrics is None:
            self.state["curve"].append(point)
            return
        point.update({f"valid_{k}": round(v, 6) if k != "n" else v for k, v in metrics.items()})
        self.state["curve"].append(point)
        logger.info("eval at step %d: valid MAE %.4f RMSE %.4f NLL %.4f (n=%d)", self.state["step"],
                    metrics["mae"], metrics["rmse"], metrics["nll"], metrics["n"])
        best = self.state["best"]
        if best is None or metrics["rmse"] < best["valid_rmse"]:
            self.state["best"] = {"step": self.state["step"], **{f"valid_{k}": v for k, v in metrics.items()}}
            self.state["bad_evals"] = 0
            self._save_best()
        elif self.state["step"] > 0:
            self.state["bad_evals"] += 1
            if self.state["bad_evals"] >= self.cfg.patience:
                logger.info("early stop at step %d: %d evaluations without improvement (best step %d)",
                            self.state["step"], self.state["bad_evals"], best["step"])
                self.state["stopped"] = "early_stop"

    def _save_best(self) -> None:
        """The weights plus siren_training.json, so a scorer handed only this folder
        knows how to read it (target: residual means add the base back)."""
        with checkpoint.atomic_dir(self.run_dir / "best") as tmp:
            M.save_model(self.model, self.tokenizer, tmp, self.cfg.method)
            (tmp / "siren_training.json").write_text(json.dumps(
                {**scorer_meta(self.cfg), "priors": self.info.get("priors"), "base_model": self.path,
                 "step": self.state["step"]}, indent=1))
        logger.info("best weights (step %d) -> %s", self.state["step"], self.run_dir / "best")

    # ---- checkpoints -----------------------------------------------------------------

    def _checkpoint(self) -> None:
        checkpoint.save_checkpoint(self.run_dir / "checkpoint", self.params, self.optimizer, self.scheduler,
                                   self.order, self.state)
        write_outputs(self.run_dir, self.cfg, self.state, self.info)

    def _resume(self) -> None:
        import torch

        folder = checkpoint.existing(self.run_dir / "checkpoint")
        if folder is None:
            return
        saved = checkpoint.load_checkpoint(folder)
        if saved["state"]["fingerprint"] != self.state["fingerprint"] or saved["order"] != self.order:
            raise ValueError(f"checkpoint {folder} was written with other options or data: "
                             f"pick another train.name, or delete {self.run_dir} to start over")
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(saved["trainable"][name].to(param.device))
        self.optimizer.load_state_dict(saved["optim"]["optimizer"])
        self.scheduler.load_state_dict(saved["optim"]["scheduler"])
        checkpoint.set_rng_state(saved["rng"])
        self.state = saved["state"]
        if self.state["stopped"] == TIME_BUDGET:   # a budget ends one invocation, not the run
            self.state["stopped"] = None
        logger.info("resumed %s at step %d/%d", folder, self.state["step"], len(self.order))
