"""SIREN stage 2: hidden-state alignment of the answer-only pass to the chain of thought.

    summary = align.train(cot_rows, valid_rows, cfg.align, student_cfg, run_dir)

1. Teacher chain of thought: the frozen stage-1 model writes a greedy completion for
   every training prompt (run_dir/teacher/cot-NNNNN.json, align.generate_batch at a
   time); rows whose answer lies within align.keep_within of the label are kept.
2. Teacher states: one forward pass over prompt + chain of thought up to `<answer>`;
   the output of every decoder layer and the rating-token logits at that last
   position (run_dir/teacher/states-NNNNN.pt, align.shard_rows rows each, bf16
   states). Both caches are written shard by shard with an atomic rename, so a
   killed run resumes at the next shard; teacher/manifest.json pins the teacher,
   the rows and the generation options, and a mismatch is refused.
3. Student: the stage-1 model plus LoRA on align.lora_targets (k_proj, v_proj) on
   the answer-only prompt (prompts.answer_only_of the cot prompt), trained by the
   fine-tuning loop (siren_batch.train.loop: checkpoints, resume, valid early
   stopping, best/ adapter, metrics.json) with the loss of align.variant:

       ha     mean over layers of 1 - cos(teacher state, student state)   (the paper's)
       ce     cross-entropy of the label's rating token
       kd     KL(teacher rating distribution || student's), at align.kd_temperature
       ha+ce, kd+ce   the sum, the CE term weighted by align.ce_weight

A step therefore costs one student forward and backward, like a fine-tuning step:
the teacher's work is done once, in the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from siren_batch.backends.device import pick_device
from siren_batch.config import AlignConfig, TrainConfig
from siren_batch.prompts import answer_only_of
from siren_batch.train import batching, cot, model as M, objective
from siren_batch.train.loop import SFTRun
from siren_batch.train.rewards import format_reward, parse_answer

logger = logging.getLogger(__name__)


# ---- the teacher's cache ------------------------------------------------------------

def manifest(rows, teacher: str, cfg: AlignConfig) -> dict:
    """What fixes the cache: the teacher, the prompts and labels, the generation options."""
    h = hashlib.sha256(json.dumps([list(rows["prompt"]), [float(x) for x in rows["label"]]]).encode())
    return {"teacher": str(teacher), "rows": len(rows), "rows_hash": h.hexdigest()[:16],
            "max_new_tokens": cfg.max_new_tokens, "generate_batch": cfg.generate_batch,
            "shard_rows": cfg.shard_rows}


def open_cache(folder: Path, expected: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.json"
    if path.exists():
        found = json.loads(path.read_text())
        if found != expected:
            changed = sorted(k for k in expected if found.get(k) != expected[k])
            raise ValueError(f"teacher cache {folder} was built with other {', '.join(changed)}: pick another "
                             f"align.name, or delete {folder} to rebuild it")
    else:
        _atomic_write(path, json.dumps(expected, indent=1).encode())
    return folder


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def teacher_cot(model, tokenizer, prompts: list[str], cfg: AlignConfig, folder: Path, device: str) -> list[str]:
    """Greedy chain of thought for every prompt, cached in shards of align.shard_rows."""
    out: list[str] = []
    for shard, start in enumerate(range(0, len(prompts), cfg.shard_rows)):
        path = folder / f"cot-{shard:05d}.json"
        if not path.exists():
            texts = cot.generate(model, tokenizer, prompts[start:start + cfg.shard_rows], cfg.max_new_tokens,
                                 cfg.generate_batch, device=device)
            _atomic_write(path, json.dumps(texts).encode())
            logger.info("teacher chain of thought: %d/%d prompts", min(start + cfg.shard_rows, len(prompts)),
                        len(prompts))
        out.extend(json.loads(path.read_text()))
    return out


def select(completions: list[str], labels, keep_within: float, prefill: str = "") -> tuple[list[int], dict]:
    """Rows whose teacher answer parses and lies within keep_within of the label, in a
    well-formed chain of thought (stage 1's format rule: one <think>…</think>, then one
    <answer>…</answer>, so the state taken at `<answer>` is the answer's); and counts.
    prefill: the text the prompts end with that belongs to the answer (`<think>\\n`).

    >>> t = "<think>x</think><answer>{}</answer>"
    >>> select([t.format(4), t.format(2), "no", "<answer>4</answer>"], [4.0, 5.0, 3.0, 4.0], 0.0)
    ([0], {'rows': 4, 'parsed': 3, 'well_formed': 2, 'kept': 1, 'teacher_mae': 1.5})
    """
    answers = [parse_answer(prefill + c) for c in completions]
    parsed = [(i, a) for i, a in enumerate(answers) if a is not None]
    formed = [(i, a) for i, a in parsed if format_reward(prefill + completions[i]) > 0]
    errors = [abs(min(max(a, 1.0), 5.0) - float(labels[i])) for i, a in formed]
    kept = [i for (i, _), e in zip(formed, errors) if e <= keep_within + 1e-9]
    return kept, {"rows": len(completions), "parsed": len(parsed), "well_formed": len(formed), "kept": len(kept),
                  "teacher_mae": round(float(np.mean(errors)), 4) if errors else None}


def states_folder(folder: Path, kept: list[int], keep_within: float) -> Path:
    """Where the states of these kept rows are cached: a folder per selection, so a run with
    another align.keep_within never reads shards whose rows were other rows."""
    key = hashlib.sha256(json.dumps([kept, keep_within]).encode()).hexdigest()[:12]
    path = folder / f"states-{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def teacher_states(model, tokenizer, texts: list[str], rating_ids: list[int], cfg: AlignConfig, folder: Path,
                   device: str, bf16: bool):
    """(states [n, L, H] bf16, rating logits [n, 5] fp32) at the last token of each text
    (prompt + chain of thought up to `<answer>`), cached in shards of `folder`
    (states_folder: one per selection of rows)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    states, logits = [], []
    model.eval()
    for shard, start in enumerate(range(0, len(texts), cfg.shard_rows)):
        path = folder / f"states-{shard:05d}.pt"
        if not path.exists():
            part_s, part_l = [], []
            chunk = texts[start:start + cfg.shard_rows]
            ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
            for b in range(0, len(ids), cfg.generate_batch):
                batch = batching.collate(batching.single_units(ids[b:b + cfg.generate_batch]), pad, device)
                with torch.no_grad(), M.autocast(device, bf16):
                    s, lg = M.answer_states(model, batch, rating_ids)
                part_s.append(s.to(torch.bfloat16).cpu())
                part_l.append(lg.float().cpu())
            tmp = path.with_name(path.name + ".tmp")
            torch.save({"states": torch.cat(part_s), "logits": torch.cat(part_l)}, tmp)
            os.replace(tmp, path)
            logger.info("teacher states: %d/%d rows", min(start + cfg.shard_rows, len(texts)), len(texts))
        saved = torch.load(path, weights_only=True)
        states.append(saved["states"])
        logits.append(saved["logits"])
    states, logits = torch.cat(states), torch.cat(logits)
    if len(states) != len(texts):
        raise ValueError(f"teacher cache {folder} holds {len(states)} rows for {len(texts)} texts: delete it")
    return states, logits


# ---- the objective ----------------------------------------------------------------------

def align_losses(variant: str, s_states, s_logits, t_states, t_logits, targets, kd_temperature: float = 1.0,
                 ce_weight: float = 1.0):
    """Per-example losses [n] of align.variant (module doc). States [n, L, H], logits [n, 5],
    targets: numpy ratings [n] (the CE term's two-hot labels)."""
    import torch
    import torch.nn.functional as F

    parts = []
    if "ha" in variant:
        cos = F.cosine_similarity(s_states.float(), t_states.float().detach(), dim=-1)   # [n, L]
        parts.append((1.0 - cos).mean(dim=1))
    if "kd" in variant:
        t = kd_temperature
        teacher = F.log_softmax(t_logits.float().detach() / t, dim=-1)
        student = F.log_softmax(s_logits.float() / t, dim=-1)
        parts.append((teacher.exp() * (teacher - student)).sum(dim=-1) * t * t)
    if "ce" in variant:
        ce = objective.losses(s_logits.float(), targets, "ce")
        parts.append(ce if variant == "ce" else ce_weight * ce)
    return torch.stack(parts).sum(dim=0)


class AlignRun(SFTRun):
    """The fine-tuning loop with align.variant's loss against cached teacher outputs.
    Row i of train_rows has teacher states[i] and logits[i]."""

    def __init__(self, train_rows, valid_rows, cfg: TrainConfig, run_dir: Path, meta: dict, callbacks: list,
                 align: AlignConfig, states, logits):
        super().__init__(train_rows, valid_rows, cfg, run_dir, meta, callbacks)
        self.align = align
        self.t_states, self.t_logits = states[self.train_enc.kept], logits[self.train_enc.kept]
        tail = json.dumps([self.state["fingerprint"], align.variant, align.kd_temperature, align.ce_weight,
                           meta.get("teacher_cache")])
        self.state["fingerprint"] = hashlib.sha256(tail.encode()).hexdigest()[:16]

    def _losses(self, batch: batching.Batch):
        rows = batch.rows
        with M.autocast(self.device, self.bf16):
            s_states, s_logits = M.answer_states(self.model, batch, self.rating_ids)
        return align_losses(self.align.variant, s_states, s_logits, self.t_states[rows].to(self.device),
                            self.t_logits[rows].to(self.device), self.train_enc.targets[rows],
                            self.align.kd_temperature, self.align.ce_weight)


# ---- the run --------------------------------------------------------------------------

def student_rows(rows, kept: list[int]):
    """The kept rows with answer-only prompts (prompts.answer_only_of their cot prompt)."""
    out = rows.iloc[kept].reset_index(drop=True).copy()
    out["prompt"] = out["prompt"].map(answer_only_of)
    return out


def train(rows, valid_rows, align: AlignConfig, student: TrainConfig, run_dir: Path, meta: dict | None = None,
          callbacks: list | None = None, prefill: str = "") -> dict:
    """Steps 1-3 of the module doc. rows: chain-of-thought prompts with labels
    (train.data.cot_rows); valid_rows: answer-only prompts (train.data.training_rows);
    student.base_model is the teacher (stage-1) model; prefill: the text the cot prompts
    end with that belongs to the answer (prompts.THINK_PREFILL with prompts.think_prefill)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from siren_batch.assets import resolve_llm
    from siren_batch.backends import rating_token_ids

    run_dir = Path(run_dir)
    teacher_path = resolve_llm(student.base_model)
    folder = open_cache(run_dir / "teacher", manifest(rows, teacher_path, align))
    device = pick_device(student.device)
    if student.torch_threads and device == "cpu":
        torch.set_num_threads(student.torch_threads)
    bf16 = M.use_bf16(student.dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).to(device)
    completions = teacher_cot(teacher, tokenizer, list(rows["prompt"]), align, folder, device)
    kept, counts = select(completions, rows["label"].to_numpy(), align.keep_within, prefill)
    logger.info("teacher answers: %d rows, %d parsed, %d well formed, %d within %.2f of the label (teacher MAE %s)",
                counts["rows"], counts["parsed"], counts["well_formed"], counts["kept"], align.keep_within,
                counts["teacher_mae"])
    if not kept:
        raise ValueError(f"the teacher answered none of {counts['rows']} prompts within align.keep_within="
                         f"{align.keep_within} ({counts['parsed']} parsed): train stage 1 further (make train-grpo),"
                         " raise align.keep_within or align.max_new_tokens")
    texts = [rows["prompt"].iloc[i] + cot.until_answer(completions[i]) for i in kept]
    states, logits = teacher_states(teacher, tokenizer, texts, rating_token_ids(tokenizer), align,
                                    states_folder(folder, kept, align.keep_within), device, bf16)
    del teacher
    info = {**(meta or {}), "stage": "align", "align_variant": align.variant, "teacher": teacher_path,
            "teacher_cache": str(folder), "teacher_counts": counts}
    run = AlignRun(student_rows(rows, kept), valid_rows, student, run_dir, info, callbacks or [], align,
                   states, logits)
    return run.run()
