"""Shared fixtures: one SparkSession for the whole test session (startup ~10 s)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from siren_batch.config import Config, SparkConfig, load_config

REPO = Path(__file__).resolve().parent.parent
SHARED_MOVIES = REPO.parent / "shared" / "data" / "siren-movies"

# Every driver JVM the tests start (this session's, and each `siren-batch` subprocess's, through
# spark-submit) sends a method to the C2 compiler only at 10x the usual call counts, and collects
# with ParallelGC. On two cores a test's JVM spent more CPU compiling than working: the ml-100k
# chain, six small ingests and a score took 169.5 s against 179.5 s, 293 against 340 CPU-s.
# A user's own SPARK_SUBMIT_OPTS wins.
TEST_JVM_OPTIONS = ("-XX:+UseParallelGC -XX:Tier4InvocationThreshold=50000 -XX:Tier4CompileThreshold=150000"
                    " -XX:Tier4BackEdgeThreshold=400000")
os.environ.setdefault("SPARK_SUBMIT_OPTS", TEST_JVM_OPTIONS)


@pytest.fixture(scope="session")
def spark():
    from siren_batch.spark import get_spark

    session = get_spark(SparkConfig(master="local[2]", shuffle_partitions=4, driver_memory="4g"))
    logging.getLogger("py4j").setLevel(logging.WARNING)
    yield session
    session.stop()


@pytest.fixture(autouse=True, scope="module")
def _drop_cached_tables():
    """Cached DataFrames of one module never outlive it (one JVM serves the whole session)."""
    yield
    from pyspark.sql import SparkSession

    session = SparkSession.getActiveSession()
    if session is not None:
        session.catalog.clearCache()


@pytest.fixture
def cfg(tmp_path) -> Config:
    """Defaults from conf/ with a per-test warehouse."""
    return load_config(overrides=[f"warehouse={tmp_path / 'wh'}", "spark.master=local[2]"])


@pytest.fixture(scope="session")
def shared_movies() -> Path:
    if not (SHARED_MOVIES / "train.jsonl.gz").exists():
        pytest.skip(f"siren-movies data not found at {SHARED_MOVIES} (../shared is absent)")
    return SHARED_MOVIES


# A tiny random Llama (2 layers, hidden 32) with its own byte-level BPE tokenizer and a
# chat template, built in-test so model tests run in seconds and never touch a hub.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<eos>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<pad>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>"])
    corpus = ["The user likes drama and thriller topics, rated 4 and 5.",
              "Recent ratings: Heat, Crime|Drama, 5\nAlien, Horror|Sci-Fi, 2", "<think>\n</think>\n<answer>3</answer>"]
    bpe.train_from_iterator(corpus * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.3, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (no OpenMP waits on a busy machine); the
    thread count is restored for the tests that follow."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_model, tmp_path_factory):
    """A tiny random Qwen3 (2 layers, hidden 32, q/k norms) with tiny_model's tokenizer:
    the architecture of the paper's Qwen3-4B at test size (SIREN stages 1 and 2)."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    folder = tmp_path_factory.mktemp("tiny-qwen3")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.save_pretrained(folder)
    torch.manual_seed(1)
    config = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         initializer_range=0.3, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    Qwen3ForCausalLM(config).save_pretrained(folder)
    return folder


# ---- the sketch chain on real data, once per session (tests/test_pipeline.py, test_cluster.py) ----

def _chain(spark, tmp_path_factory, *overrides):
    from siren_batch import pipeline

    wh = tmp_path_factory.mktemp("wh")
    # calibrate.enabled=false: a calibrator fit by hand beside the default model stays out of the tests
    cfg = load_config(overrides=[f"warehouse={wh}", "calibrate.enabled=false", *overrides])
    summaries = {name: pipeline.STAGES[name](spark, cfg) for name in pipeline.SKETCH_CHAIN}
    return cfg, summaries


@pytest.fixture(scope="session")
def ml100k(spark, tmp_path_factory):
    return _chain(spark, tmp_path_factory, "dataset=ml-100k", "prompts.variants=sketch,raw")


# The scored ml-100k reference: a deterministic 12-pair sample of the test split, fp32 (bf16 would
# make a comparison depend on how rows meet in a batch), two score tasks. The standalone-cluster
# test scores and evaluates the same way (with the first two baselines only: ALS took a minute there).
ML100K_SCORE = ["score.limit=12", "score.partitions=2", "score.dtype=float32", "score.run_date=2026-01-05",
                "evaluate.scope=scored", "evaluate.missing=count"]
ML100K_BASELINES = ["evaluate.baselines=[global_mean,bias,user_mean,als]", "evaluate.als_ranks=[8]",
                    "evaluate.als_reg_params=[0.1]"]


@pytest.fixture(scope="session")
def ml100k_scored(spark, ml100k, tmp_path_factory):
    """A copy of the ml-100k chain's warehouse, scored (ML100K_SCORE) and evaluated against four
    baselines, once per session: (config, score summary, evaluate summary)."""
    import shutil

    from siren_batch import pipeline

    source, _ = ml100k
    wh = tmp_path_factory.mktemp("scored")
    shutil.copytree(Path(source.warehouse) / source.dataset, wh / source.dataset)
    cfg = load_config(overrides=[f"warehouse={wh}", f"dataset={source.dataset}", "prompts.variants=sketch,raw",
                                 "calibrate.enabled=false", *ML100K_SCORE, *ML100K_BASELINES])
    return cfg, pipeline.score(spark, cfg), pipeline.evaluate(spark, cfg)


@pytest.fixture(scope="session")
def movies(spark, tmp_path_factory, shared_movies):
    return _chain(spark, tmp_path_factory, "dataset=siren-movies", f"data.path={shared_movies}",
                  "data.sample_users=0.05")
