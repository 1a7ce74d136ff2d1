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
def long_tiny_model(tiny_model, tmp_path_factory):
    """tiny_model with room for real prompts (its byte-level BPE makes ~1k tokens of one). The
    scorer of the tests about the chain rather than the model (a killed driver, the nights, chunk
    resume): SmolLM2 in fp32 costs ~0.9 s a real prompt on a 2-core AVX2 CPU, this ~0.02 s."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("tiny-long") / "m"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    return folder


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


# ---- a tiny chain, ingest .. evaluate, on a 12-user CSV source (test_driver_kill, test_cluster) ----

TINY_DATASET = "tiny"


def tiny_source(folder: Path) -> list[str]:
    """12 users x 7 of 12 films of 4 genres, ratings 1-5, and one bad line (a reject)."""
    folder.mkdir(parents=True)
    genres = ["Drama|Romance", "Horror|Thriller", "Comedy", "Sci-Fi|Action"]
    items = [f"i{i},Film number {i} about {genres[i % 4].split('|')[0].lower()},{genres[i % 4]}" for i in range(12)]
    (folder / "items.csv").write_text("item_id,title,genres\n" + "\n".join(items) + "\n")
    rows = [f"u{u},i{(u + k) % 12},{(u * 3 + k * (u % 3 + 1)) % 5 + 1},{1000 + 100 * u + k}"
            for u in range(12) for k in range(7)]
    (folder / "inter.csv").write_text("user_id,item_id,rating,ts\n" + "\n".join(rows) + "\nu1,i1,nine,5\n")
    return [f"data.path={folder / 'inter.csv'}", f"data.items_path={folder / 'items.csv'}", "data.format=csv",
            "data.source=table", "data.kcore=0", f"dataset={TINY_DATASET}"]


def tiny_overrides(warehouse: Path, source: list[str], model: Path) -> list[str]:
    """Tiny everything: 3 topics; a tiny random model in fp32 (so a resumed run's ratings
    equal the reference's) in one task, 12 test pairs in 2 chunks; one baseline."""
    return [f"warehouse={warehouse}", *source, f"score.model={model}", "spark.master=local[2]",
            "spark.shuffle_partitions=4", "topics.k=3", "topics.name_top_m=4", "score.dtype=float32",
            "score.partitions=1", "score.chunk_rows=6", "score.run_date=2026-01-05", "calibrate.enabled=false",
            "evaluate.baselines=[global_mean]"]


@pytest.fixture(scope="session")
def tiny_chain(spark, tmp_path_factory, long_tiny_model):
    """The uninterrupted chain in this session's driver, once: (root, its overrides). The
    warehouse is root/wh; root/start is a copy of it before the first stage and root/<stage>
    a copy after each stage."""
    import shutil

    from siren_batch import pipeline

    root = tmp_path_factory.mktemp("tiny-chain")
    args = tiny_overrides(root / "wh", tiny_source(root / "in"), long_tiny_model)
    cfg = load_config(overrides=args)
    (root / "wh" / TINY_DATASET).mkdir(parents=True)
    shutil.copytree(root / "wh", root / "start")
    for stage in pipeline.FULL_CHAIN:
        pipeline.STAGES[stage](spark, cfg)
        spark.catalog.clearCache()
        shutil.copytree(root / "wh", root / stage)
    return root, args


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
# test scores and evaluates the same way (with the first two baselines only). ALS on ml-100k, tuned on
# valid and refit, costs ~15 s here and is checked on the full test split in test_baselines.
ML100K_SCORE = ["score.limit=12", "score.partitions=2", "score.dtype=float32", "score.run_date=2026-01-05",
                "evaluate.scope=scored", "evaluate.missing=count"]
ML100K_BASELINES = ["evaluate.baselines=[global_mean,bias,user_mean]"]


@pytest.fixture(scope="session")
def ml100k_scored(spark, ml100k, tmp_path_factory):
    """A copy of the ml-100k chain's warehouse, scored (ML100K_SCORE) and evaluated against three
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
