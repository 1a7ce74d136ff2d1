"""The training stages, `(spark, cfg) -> dict` like every stage in siren_batch.pipeline.

    siren-batch train-sft [key=value ...]   # make train-sft
    siren-batch export [key=value ...]      # make export
    # after scoring the export and `siren-batch evaluate evaluate.system=sft:<name>`:
    siren-batch export evaluate.system=sft:<name>   # the model card gains the test metrics

Outputs live under <train.out_dir>/<dataset>/<train.name>/ (run_dir):
best/ (adapter), checkpoint/, export/, metrics.json, training_meta.json,
config.yaml (the resolved config of the run) and train_config.yaml.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from siren_batch import schemas
from siren_batch.config import Config, save_config
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
                        meta={"dataset": cfg.dataset, "config_hash": cfg.hash(), "name": cfg.train.name})
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
