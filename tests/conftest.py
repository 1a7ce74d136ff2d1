"""Shared fixtures: one SparkSession for the whole test session (startup ~10 s)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from siren_batch.config import Config, SparkConfig, load_config

REPO = Path(__file__).resolve().parent.parent
SHARED_MOVIES = REPO.parent / "shared" / "data" / "siren-movies"


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


@pytest.fixture(scope="session")
def movies(spark, tmp_path_factory, shared_movies):
    return _chain(spark, tmp_path_factory, "dataset=siren-movies", f"data.path={shared_movies}")
