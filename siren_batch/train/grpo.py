"""SIREN stage 1: a format warm-up, then GRPO with TRL on chain-of-thought prompts.

    summary = grpo.train(warmup_rows, grpo_rows, cfg.grpo, cfg.train, run_dir)

1. Warm-up (grpo.warmup_examples > 0): a short supervised fine-tuning (trl.SFTTrainer,
   loss on the completion only) on rationales that cite the prompt's sketch and end
   in the right answer: cot.rationale's template, or, with grpo.warmup_teacher set,
   that model's greedy chains of thought that answered within 0.5 of the label
   (the template fills in for the rest). The small default model follows the
   <think>/<answer> format in none of its zero-shot answers, so without this every
   reward in a group is equal and GRPO learns nothing. The warm-up model is merged
   into run_dir/warmup/model: GRPO's starting point and its KL reference.
2. GRPO (trl.GRPOTrainer): grpo.group_size completions per prompt at
   grpo.temperature, rewards.trl_rewards (format + rating; `parseable` logged with
   weight 0), KL weight grpo.kl_coef, LoRA (train.lora_*) or full.

Both phases checkpoint every grpo.checkpoint_every steps under run_dir and resume
from the last checkpoint when started again; a finished phase is skipped. Per
logged step: the reward's mean and spread and the share of parseable answers
(metrics.json `curve`). The result is a training run like train-sft's: best/ (the
GRPO adapter over warmup/model, or the full model) and training_meta.json, so
`siren-batch export train.name=<grpo.name>` merges it into run_dir/export: the
teacher of stage 2 (siren_batch.train.align) and a scorer like any other.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import yaml

from siren_batch.assets import resolve_llm
from siren_batch.backends.device import pick_device
from siren_batch.config import ConfigError, GrpoConfig, TrainConfig
from siren_batch.train import cot, model as M, objective
from siren_batch.train.checkpoint import atomic_dir
from siren_batch.train.rewards import parse_answer, trl_rewards

logger = logging.getLogger(__name__)

TEACHER_KEEP_WITHIN = 0.5


def warmup_examples(rows, teacher_completions: list[str] | None = None, prefill: str = "") -> tuple[list[dict], dict]:
    """prompt/completion pairs: the teacher's completion where it follows the format and
    answers within TEACHER_KEEP_WITHIN of the label, else the template rationale. With a
    prefill (the prompts end with prompts.THINK_PREFILL), a completion is what follows it.

    >>> import pandas as pd
    >>> rows = pd.DataFrame({"prompt": ["P1", "P2"], "label": [4.0, 2.0], "evidence": [
    ...     '{"candidate": "Heat", "candidate_topic": null, "liked": [], "disliked": [], "recent": []}'] * 2})
    >>> pairs, counts = warmup_examples(rows, ["<think>t</think><answer>4</answer>", "<answer>5</answer>"])
    >>> pairs[0]["completion"], counts
    ('<think>t</think><answer>4</answer>', {'teacher': 1, 'template': 1})
    >>> pairs, _ = warmup_examples(rows, ["t</think><answer>4</answer>", "x"], prefill="<think>\\n")
    >>> pairs[0]["completion"], pairs[1]["completion"].startswith("The candidate is Heat")
    ('t</think><answer>4</answer>', True)
    """
    from siren_batch.train.rewards import format_reward

    pairs, counts = [], {"teacher": 0, "template": 0}
    for i, (prompt, label, evidence) in enumerate(zip(rows["prompt"], rows["label"], rows["evidence"])):
        text = teacher_completions[i] if teacher_completions else None
        answer = parse_answer(text) if text else None
        if text and format_reward(prefill + text) > 0 and answer is not None \
                and abs(answer - label) <= TEACHER_KEEP_WITHIN:
            counts["teacher"] += 1
        else:
            text = cot.rationale(evidence, label).removeprefix(prefill)
            counts["template"] += 1
        pairs.append({"prompt": prompt, "completion": text})
    return pairs, counts


def _quiet_datasets() -> None:
    """No per-map progress bars from `datasets` in the run's log."""
    import datasets

    datasets.disable_progress_bars()


def _lora(train: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(r=train.lora_r, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
                      target_modules=list(train.lora_targets), bias="none", task_type="CAUSAL_LM")


def _common_args(out: Path, grpo: GrpoConfig, train: TrainConfig, device: str, bf16: bool) -> dict:
    """TrainingArguments shared by both phases."""
    return dict(output_dir=str(out), save_strategy="steps", save_steps=grpo.checkpoint_every, save_total_limit=2,
                logging_steps=1, report_to="none", use_cpu=device == "cpu", bf16=bf16, seed=train.seed,
                data_seed=train.seed, disable_tqdm=True, max_grad_norm=train.max_grad_norm or 1e9)


def _resume_point(out: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(out)) if out.exists() else None


def _progress_callback(phase: str):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "reward" in logs:
                logger.info("%s step %d/%d: reward %.3f ± %.3f, parseable %.0f%%, format %.2f, rating %.2f, kl %s",
                            phase, state.global_step, state.max_steps, logs["reward"], logs.get("reward_std", 0),
                            100 * logs.get("rewards/parseable/mean", 0), logs.get("rewards/format/mean", 0),
                            logs.get("rewards/rating/mean", 0), logs.get("kl"))
            elif "loss" in logs:
                logger.info("%s step %d/%d: loss %.4f", phase, state.global_step, state.max_steps, logs["loss"])
    return Progress()


def _save_merged(model, tokenizer, folder: Path) -> None:
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    with atomic_dir(folder) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def run_warmup(pairs: list[dict], grpo: GrpoConfig, train: TrainConfig, base: str, run_dir: Path,
               device: str, bf16: bool) -> Path:
    """Phase 1 -> run_dir/warmup/model (skipped when it exists)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    folder = run_dir / "warmup" / "model"
    if folder.exists():
        logger.info("warm-up done earlier: %s", folder)
        return folder
    _quiet_datasets()
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(train.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    out = run_dir / "warmup" / "checkpoints"
    args = SFTConfig(**_common_args(out, grpo, train, device, bf16), num_train_epochs=grpo.warmup_epochs,
                     learning_rate=grpo.warmup_lr, per_device_train_batch_size=train.batch_size,
                     lr_scheduler_type="linear", warmup_steps=0, completion_only_loss=True,
                     max_length=grpo.max_prompt_tokens + grpo.max_completion_tokens)
    prompts = without_template_bos([p["prompt"] for p in pairs], tokenizer)   # TRL adds the tokenizer's own
    pairs = [{**p, "prompt": q} for p, q in zip(pairs, prompts)]
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer,
                         peft_config=_lora(train) if grpo.method == "lora" else None,
                         callbacks=[_progress_callback("warm-up")])
    trainer.train(resume_from_checkpoint=_resume_point(out))
    _save_merged(trainer.model, tokenizer, folder)
    (run_dir / "warmup" / "log.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    logger.info("warm-up: %d examples, %d steps -> %s", len(pairs), trainer.state.global_step, folder)
    return folder


def without_template_bos(prompts: list[str], tokenizer) -> list[str]:
    """The prompts as TRL should get them: TRL tokenizes plain-string prompts with special
    tokens, so with a tokenizer that adds BOS itself (Llama 3) the BOS the chat template
    wrote would come twice. Such a tokenizer gets the prompts without it; others, as they are."""
    bos = tokenizer.bos_token
    if not bos or tokenizer("x")["input_ids"][:1] != [tokenizer.bos_token_id]:
        return prompts
    return [p[len(bos):] if p.startswith(bos) else p for p in prompts]


def run_grpo(prompts: list[str], labels: list[float], grpo: GrpoConfig, train: TrainConfig, start: Path,
             run_dir: Path, device: str, bf16: bool, prefill: str = "") -> list[dict]:
    """Phase 2 -> run_dir/best (adapter or full model); returns TRL's log history."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    _quiet_datasets()
    tokenizer = AutoTokenizer.from_pretrained(start)
    torch.manual_seed(train.seed)
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
    funcs, weights = trl_rewards(float(objective.VALUES[0]), float(objective.VALUES[-1]), prefill)
    out = run_dir / "grpo-checkpoints"
    args = GRPOConfig(**_common_args(out, grpo, train, device, bf16), num_train_epochs=grpo.epochs,
                      learning_rate=grpo.learning_rate, beta=grpo.kl_coef, num_generations=grpo.group_size,
                      per_device_train_batch_size=grpo.batch_size, max_completion_length=grpo.max_completion_tokens,
                      temperature=grpo.temperature, reward_weights=weights, lr_scheduler_type="constant")
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": without_template_bos(prompts, tokenizer),
                                                           "label": labels}),
                          peft_config=_lora(train) if grpo.method == "lora" else None,
                          callbacks=[_progress_callback("grpo")])
    trainer.train(resume_from_checkpoint=_resume_point(out))
    with atomic_dir(run_dir / "best") as tmp:
        trainer.model.save_pretrained(tmp)
        if grpo.method == "full":
            tokenizer.save_pretrained(tmp)
    return trainer.state.log_history


def curve(log_history: list[dict]) -> list[dict]:
    """Per logged GRPO step: reward mean and spread, parseable share, format and rating
    means, KL (TRL's log keys -> ours).

    >>> curve([{"step": 1, "reward": 0.5, "reward_std": 1.0, "rewards/parseable/mean": 0.25}, {"loss": 1}])
    [{'step': 1, 'reward_mean': 0.5, 'reward_std': 1.0, 'parseable': 0.25, 'format_mean': None,
      'rating_mean': None, 'kl': None}]
    """
    keys = {"reward_mean": "reward", "reward_std": "reward_std", "parseable": "rewards/parseable/mean",
            "format_mean": "rewards/format/mean", "rating_mean": "rewards/rating/mean", "kl": "kl"}
    return [{"step": h["step"], **{k: h.get(v) for k, v in keys.items()}} for h in log_history if "reward" in h]


def train(warm_rows, grpo_rows, grpo: GrpoConfig, train_cfg: TrainConfig, run_dir: Path, meta: dict | None = None,
          teacher_completions: list[str] | None = None, prefill: str = "") -> dict:
    """Both phases (module doc); returns the summary written to metrics.json.
    warm_rows / grpo_rows: chain-of-thought rows (train.data.cot_rows: prompt, label, evidence);
    prefill: the text those prompts end with that belongs to the answer (prompts.THINK_PREFILL
    with prompts.think_prefill), seen by the rewards and cut from the warm-up completions."""
    import torch
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    done = run_dir / "metrics.json"
    if done.exists() and (run_dir / "best").exists() and json.loads(done.read_text()).get("status") == "done":
        logger.info("run %s already finished; nothing to do", run_dir)
        return {k: v for k, v in json.loads(done.read_text()).items() if k != "log_history"}
    device = pick_device(train_cfg.device)
    if device.startswith("cuda:"):   # TRL's trainer (accelerate) takes the process's first visible GPU
        raise ConfigError(f"train.device={device}: the GRPO stage cannot pick a GPU by number; set "
                          f"CUDA_VISIBLE_DEVICES={device[5:]} and train.device=cuda")
    if train_cfg.torch_threads and device == "cpu":
        torch.set_num_threads(train_cfg.torch_threads)
    bf16 = M.use_bf16(train_cfg.dtype, device)
    base = resolve_llm(train_cfg.base_model)
    info = {**(meta or {}), "stage": "grpo", "base_model_option": train_cfg.base_model, "device": device,
            "autocast": "bfloat16" if bf16 else "off (float32)"}
    start, warm_counts = Path(base), None
    if grpo.warmup_examples > 0 and len(warm_rows):
        pairs, warm_counts = warmup_examples(warm_rows, teacher_completions, prefill)
        start = run_warmup(pairs, grpo, train_cfg, base, run_dir, device, bf16)
    tokenizer = AutoTokenizer.from_pretrained(start)
    lengths = [len(ids) for ids in tokenizer(list(grpo_rows["prompt"]), add_special_tokens=False)["input_ids"]]
    fits = [n <= grpo.max_prompt_tokens for n in lengths]
    prompts = [p for p, ok in zip(grpo_rows["prompt"], fits) if ok]
    labels = [float(r) for r, ok in zip(grpo_rows["label"], fits) if ok]
    if not prompts:
        raise ValueError(f"no GRPO prompt fits grpo.max_prompt_tokens={grpo.max_prompt_tokens}: raise it")
    history = run_grpo(prompts, labels, grpo, train_cfg, start, run_dir, device, bf16, prefill)
    summary = {**info, "status": "done", "think_prefill": bool(prefill), "warmup": warm_counts,
               "warmup_model": str(start), "grpo_prompts": len(prompts), "skipped_too_long": len(fits) - len(prompts),
               "steps_done": max((h.get("step", 0) for h in history), default=0),
               "examples_seen": len(prompts) * grpo.group_size, "curve": curve(history)}
    (run_dir / "metrics.json").write_text(json.dumps({**summary, "log_history": history}, indent=1))
    resolved = {**asdict(grpo), "lr": grpo.learning_rate}   # the default for the method, when unset
    (run_dir / "train_config.yaml").write_text(yaml.safe_dump({"grpo": resolved, "train": asdict(train_cfg)},
                                                              sort_keys=False))
    scorer = {"method": grpo.method, "loss": "grpo", "target": "rating", "variant": train_cfg.variant,
              "scale": list(objective.SCALE), "prediction": "E[r] answer-only, or the <answer> of a chain of thought"}
    (run_dir / "training_meta.json").write_text(json.dumps(
        {**summary, **scorer, "base_model": str(start), "lora_r": train_cfg.lora_r, "lora_alpha": train_cfg.lora_alpha,
         "lora_targets": list(train_cfg.lora_targets), "best": None, "train_rows": len(prompts),
         # the pairs whose answers the warm-up taught: stage 2 leaves them out of its teacher's rows
         "warmup_pairs": warm_rows[["user_id", "item_id"]].astype(str).values.tolist() if len(warm_rows) else []},
        indent=1))
    return summary
