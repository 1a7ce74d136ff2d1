"""Export a training run: the best adapter merged into a plain HF folder with the
tokenizer and a model card (README.md), so any scorer loads it without peft.

    export_model(run_dir)  ->  run_dir/export/   (score.model=<run_dir>/export)

The adapter stays in run_dir/best/ (score.adapter=<run_dir>/best with the base
model as score.model); both give the same logits (tests/test_train_sft.py). The
card lists the base model, dataset, training rows, config hash, loss and target,
the valid metrics of the best step, and test metrics when run_dir/test_metrics.json
(keys mae, rmse and optionally n, split, eval_id) has been written by an evaluation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from siren_batch.train.checkpoint import atomic_dir

logger = logging.getLogger(__name__)

TEST_METRICS = "test_metrics.json"


def export_model(run_dir: Path, out: Path | None = None) -> Path:
    """Merge run_dir/best into `out` (default run_dir/export), written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = Path(run_dir)
    meta_path, best = run_dir / "training_meta.json", run_dir / "best"
    if not meta_path.exists() or not best.exists():
        raise FileNotFoundError(f"no finished training run at {run_dir} (training_meta.json and best/ "
                                "are written by `siren-batch train-sft`): train first or fix train.name")
    meta = json.loads(meta_path.read_text())
    out = Path(out) if out else run_dir / "export"
    if meta["method"] == "lora":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(meta["base_model"], dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(best)).merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(meta["base_model"])
    else:
        model = AutoModelForCausalLM.from_pretrained(best, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(best)
    test = _test_metrics(run_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "siren_training.json").write_text(json.dumps({**meta, "test": test}, indent=1))
        (tmp / "README.md").write_text(model_card(meta, test, run_dir))
    logger.info("exported %s (%s, best step %s) -> %s", run_dir.name, meta["method"],
                (meta.get("best") or {}).get("step"), out)
    return out


def _test_metrics(run_dir: Path) -> dict | None:
    path = run_dir / TEST_METRICS
    return json.loads(path.read_text()) if path.exists() else None


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _loss(meta: dict) -> str:
    """The training loss as the card names it (stage 2 names its alignment variant).

    >>> _loss({"loss": "ce"}), _loss({"loss": "ce", "stage": "align", "align_variant": "ha"})
    ('ce', 'alignment: ha')
    """
    return f"alignment: {meta['align_variant']}" if meta.get("stage") == "align" else meta["loss"]


def model_card(meta: dict, test: dict | None, run_dir: Path) -> str:
    """README.md of the export: what it is, how to read its output, how it scored."""
    best = meta.get("best") or {}
    lora = (f"LoRA r={meta.get('lora_r')} alpha={meta.get('lora_alpha')} on {', '.join(meta.get('lora_targets', []))}"
            if meta["method"] == "lora" else "full fine-tuning")
    rows = [("base model", f"`{meta.get('base_model_option', meta['base_model'])}` ({meta['base_model']})"),
            ("dataset", meta.get("dataset", "?")), ("training rows", meta.get("train_rows")),
            ("valid rows", meta.get("valid_rows")), ("method", lora),
            ("loss / target", f"{_loss(meta)} / {meta['target']}"),
            ("prompt variant", f"{meta.get('variant')} (answer-only)"), ("config hash", meta.get("config_hash")),
            ("best step", best.get("step")), ("examples seen (run)", meta.get("examples_seen")),
            ("device / autocast", f"{meta.get('device')} / {meta.get('autocast')}")]
    table = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in rows)
    valid = " / ".join(_fmt(best.get(f"valid_{k}")) for k in ("mae", "rmse", "nll"))
    tested = (f"MAE {_fmt(test.get('mae'))} / RMSE {_fmt(test.get('rmse'))} on {test.get('n', '?')} pairs "
              f"({test.get('split', 'test')}{', eval ' + str(test['eval_id']) if test.get('eval_id') else ''})"
              if test else f"not measured yet (no {TEST_METRICS} in {run_dir}): score this folder with "
                           "`siren-batch score score.model=<this folder>` and evaluate")
    residual = ("\n**Residual model**: the rating is `clip(base + E[r] - 3, 1, 5)` where `base` is the user+item "
                "bias baseline's prediction; a scorer must add the base back.\n" if meta["target"] == "residual"
                else "")
    adapter = (f"; the adapter alone is in `{run_dir / 'best'}` (`score.model=<base model> "
               f"score.adapter={run_dir / 'best'}`)" if meta["method"] == "lora" else "")
    return f"""---
base_model: {meta['base_model']}
library_name: transformers
tags: [siren-batch, rating-prediction, answer-only]
---
# siren-batch rating model: {meta.get('name', run_dir.name)}

Answer-only rating prediction (SIREN-style prompts from `siren_batch.prompts`): the prompt ends
with `<think>\\n</think>\\n<answer>` and the rating is read from the logits of the tokens
"1".."5" at that position: `probs` = their softmax, rating = {meta.get('prediction', 'E[r]')}.
{residual}
| | |
|---|---|
{table}

Valid (best step), MAE / RMSE / NLL: {valid}

Test: {tested}

Use: `siren-batch score score.model=<this folder>`{adapter}.
"""
