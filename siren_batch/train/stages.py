"""The training stages, `(spark, cfg) -> dict` like every stage in siren_batch.pipeline.

    siren-batch train-sft [key=value ...]   # make train-sft
    siren-batch train-grpo [key=value ...]  # make train-grpo   (SIREN stage 1)
    siren-batch train-align [key=value ...] # make train-align  (SIREN stage 2)
    siren-batch export [key=value ...]      # make export
    # after scoring the export and `siren-batch evaluate evaluate.system=sft:<name>`:
    siren-batch export evaluate.system=sft:<name>   # the model card gains the test metrics

Outputs live under <train.out_dir>/<dataset>/<train.name>/ (run_dir):
best/ (adapter), checkpoint/, export/, metrics.json, training_meta.json,
config.yaml (the resolved config of the run) and train_config.yaml.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from siren_batch import schemas
from siren_batch.config import Config, save_config
from siren_batch.prompts import THINK_PREFILL
from siren_batch.train.sft import run_meta
from siren_batch.warehouse import read_table, run_record, table_exists

logger = logging.getLogger(__name__)


def run_dir(cfg: Config) -> Path:
    return Path(cfg.train.out_dir) / cfg.dataset / cfg.train.name


def train_sft(spark: SparkSession, cfg: Config) -> dict:
    """Train rows and valid rows from the warehouse -> answer-only fine-tuning."""
    from siren_batch.train.data import training_rows
    from siren_batch.train.sft import train

    out = run_dir(cfg)
    with run_record(spark, cfg, "train-sft") as rec:
        train_rows = training_rows(spark, cfg, "train")
        valid_rows = training_rows(spark, cfg, "valid")
        rec.input_rows = len(train_rows) + len(valid_rows)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        summary = train(train_rows, valid_rows, cfg.train, out,
                        meta=run_meta(cfg, cfg.train.name))
        rec.output_rows = summary["examples_seen"]
    return {"run_dir": str(out), "best": summary["best"], "status": summary["status"],
            "steps": summary["steps_done"], "examples_seen": summary["examples_seen"],
            "train_rows": summary["train_rows"], "valid_rows": summary["valid_rows"],
            "adapter": str(out / "best"), "device": summary["device"]}


def test_metrics(spark: SparkSession, cfg: Config) -> dict | None:
    """The newest test evaluation (segment all) of system evaluate.system from the
    `metrics` table; None when evaluate.system is unset or has none."""
    if not cfg.evaluate.system or not table_exists(spark, cfg, "metrics"):
        return None
    mine = (F.col("split") == "test") & (F.col("system") == cfg.evaluate.system) & (F.col("segment") == "all")
    rows = read_table(spark, cfg, "metrics", schemas.METRICS).where(mine)
    newest = rows.agg(F.max("eval_id")).first()[0]
    if newest is None:
        return None
    values = {r.metric: (r.value, r.n) for r in rows.where(F.col("eval_id") == newest).collect()}
    if "mae" not in values or "rmse" not in values:
        return None
    return {"mae": values["mae"][0], "rmse": values["rmse"][0], "n": values["mae"][1], "split": "test",
            "eval_id": newest, "system": cfg.evaluate.system}


def export(spark: SparkSession, cfg: Config) -> dict:
    """The best weights of run `train.name` merged into a plain HF folder (run_dir/export).
    With evaluate.system naming the scored export, its newest test metrics from the
    `metrics` table go into run_dir/test_metrics.json and the model card."""
    from siren_batch.train.export import TEST_METRICS, export_model

    with run_record(spark, cfg, "export") as rec:
        tested = test_metrics(spark, cfg)
        if tested:
            (run_dir(cfg) / TEST_METRICS).write_text(json.dumps(tested, indent=1))
        folder = export_model(run_dir(cfg))
        rec.output_rows = 1
    return {"export": str(folder), "score_with": f"score.model={folder}", "card": str(folder / "README.md")}


def _with_train(cfg: Config, **changes) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


def grpo_rows(spark: SparkSession, cfg: Config):
    """(warm-up rows, GRPO rows): one seeded sample of the train split's chain-of-thought
    rows, shuffled with train.seed and cut in two, so GRPO never sees a prompt whose
    answer the warm-up taught."""
    from siren_batch.train.data import cot_rows

    g = cfg.grpo
    limit = None if g.examples is None else g.warmup_examples + g.examples
    rows = cot_rows(spark, cfg, "train", limit).sample(frac=1.0, random_state=cfg.train.seed)
    return rows.iloc[:g.warmup_examples].reset_index(drop=True), rows.iloc[g.warmup_examples:].reset_index(drop=True)


def train_grpo(spark: SparkSession, cfg: Config) -> dict:
    """SIREN stage 1 (siren_batch.train.grpo) on the train split's chain-of-thought prompts."""
    from siren_batch.train import grpo

    out = Path(cfg.train.out_dir) / cfg.dataset / cfg.grpo.name
    with run_record(spark, cfg, "train-grpo") as rec:
        warm, rows = grpo_rows(spark, cfg)
        rec.input_rows = len(warm) + len(rows)
        teacher_texts = None
        if cfg.grpo.warmup_teacher and len(warm):
            teacher_texts = _teacher_rationales(spark, cfg, warm)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        prefill = THINK_PREFILL if cfg.prompts.think_prefill else ""
        summary = grpo.train(warm, rows, cfg.grpo, cfg.train, out, teacher_completions=teacher_texts, prefill=prefill,
                             meta=run_meta(cfg, cfg.grpo.name))
        rec.output_rows = summary["examples_seen"]
    last = summary["curve"][-1] if summary["curve"] else {}
    return {"run_dir": str(out), "status": summary["status"], "steps": summary["steps_done"],
            "warmup": summary["warmup"], "grpo_prompts": summary["grpo_prompts"],
            "last_reward_mean": last.get("reward_mean"), "last_parseable": last.get("parseable"),
            "next": f"siren-batch export train.name={cfg.grpo.name}   # then make train-align"}


def _teacher_rationales(spark: SparkSession, cfg: Config, warm) -> list[str]:
    """grpo.warmup_teacher's greedy chains of thought for the warm-up rows, on prompts
    rendered with the teacher's own chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from siren_batch.assets import resolve_llm
    from siren_batch.backends.device import pick_device
    from siren_batch.train import cot
    from siren_batch.train.data import cot_rows

    path = resolve_llm(cfg.grpo.warmup_teacher)
    theirs = cot_rows(spark, _with_train(cfg, base_model=path), "train", None)
    prompts = warm[["user_id", "item_id"]].merge(theirs[["user_id", "item_id", "prompt"]], how="left")["prompt"]
    device = pick_device(cfg.train.device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    return cot.generate(model, AutoTokenizer.from_pretrained(path), list(prompts), cfg.grpo.max_completion_tokens,
                        cfg.align.generate_batch, device=device)


def _stage1_run(cfg: Config) -> Path:
    """Where a stage-1 run named by align.teacher lives (it is one when training_meta.json is there)."""
    return Path(cfg.train.out_dir) / cfg.dataset / cfg.align.teacher


def align_teacher(cfg: Config) -> str:
    """align.teacher: a folder, or a stage-1 run name (its export/, made by `siren-batch export`)."""
    named = _stage1_run(cfg)
    if (named / "training_meta.json").exists():
        if not (named / "export").exists():
            raise FileNotFoundError(f"stage-1 run {named} has no export/: run `siren-batch export "
                                    f"train.name={cfg.align.teacher}` first")
        return str(named / "export")
    return cfg.align.teacher


def stage1_meta(cfg: Config) -> dict:
    """training_meta.json of the stage-1 run align.teacher names ({} for a plain folder).
    Refuses a run trained with another prompts.think_prefill: its chain of thought would
    start from prompts it never saw."""
    path = _stage1_run(cfg) / "training_meta.json"
    if not path.exists():
        return {}
    meta = json.loads(path.read_text())
    if meta.get("stage") == "grpo" and "warmup_pairs" not in meta:
        logger.warning("stage-1 run %s predates the record of its warm-up pairs: stage 2 cannot leave them "
                       "out (train stage 1 again to have them left out)", cfg.align.teacher)
    if meta.get("stage") == "grpo" and bool(meta.get("think_prefill")) != cfg.prompts.think_prefill:
        raise ValueError(f"stage-1 run {cfg.align.teacher} was trained with prompts.think_prefill="
                         f"{str(bool(meta.get('think_prefill'))).lower()}: run train-align with the same setting")
    return meta


def align_rows(spark: SparkSession, cfg: Config, student: Config, leave_out: list):
    """align.examples seeded chain-of-thought train rows, without the stage-1 warm-up's pairs
    (`leave_out`): the warm-up taught their answers, so the teacher's states there hold a
    memorised label rather than its reasoning."""
    from siren_batch.train.data import cot_rows

    limit = cfg.align.examples
    rows = cot_rows(spark, student, "train", None if limit is None else limit + len(leave_out))
    if leave_out:
        taught = {(str(u), str(i)) for u, i in leave_out}
        keep = [(str(u), str(i)) not in taught for u, i in zip(rows["user_id"], rows["item_id"])]
        rows = rows[keep]
    if limit is not None and len(rows) > limit:
        rows = rows.sample(n=limit, random_state=cfg.train.seed).sort_values(["user_id", "item_id"], kind="stable")
    return rows.reset_index(drop=True)


def student_config(cfg: Config) -> Config:
    """cfg with `train` set for the stage-2 student: the teacher as base model, LoRA on
    align.lora_targets, align's lr / warm-up / epochs, constant schedule, every kept row."""
    a = cfg.align
    return _with_train(cfg, base_model=align_teacher(cfg), name=a.name, method="lora", lora_r=a.lora_r,
                       lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout, lora_targets=list(a.lora_targets),
                       lr=a.lr, warmup_steps=a.warmup_steps, epochs=a.epochs, schedule="constant",
                       max_examples=None, target="rating", loss="ce")


def train_align(spark: SparkSession, cfg: Config) -> dict:
    """SIREN stage 2 (siren_batch.train.align): teacher chain of thought on train prompts,
    then the k/v LoRA student on answer-only prompts, selected on valid."""
    from siren_batch.train import align
    from siren_batch.train.data import training_rows

    student = student_config(cfg)
    out = run_dir(student)
    teacher_meta = stage1_meta(cfg)
    with run_record(spark, cfg, "train-align") as rec:
        rows = align_rows(spark, cfg, student, teacher_meta.get("warmup_pairs") or [])
        valid = training_rows(spark, student, "valid")
        rec.input_rows = len(rows) + len(valid)
        out.mkdir(parents=True, exist_ok=True)
        save_config(student, out / "config.yaml")
        summary = align.train(rows, valid, cfg.align, student.train, out, meta=run_meta(cfg, cfg.align.name),
                              prefill=THINK_PREFILL if cfg.prompts.think_prefill else "")
        rec.output_rows = summary["examples_seen"]
    return {"run_dir": str(out), "variant": cfg.align.variant, "teacher": student.train.base_model,
            "teacher_counts": summary.get("teacher_counts"), "best": summary["best"], "status": summary["status"],
            "steps": summary["steps_done"], "adapter": str(out / "best"),
            "score_with": f"score.model={student.train.base_model} score.adapter={out / 'best'}"}
