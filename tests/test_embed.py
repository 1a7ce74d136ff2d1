"""embed_items: the bundled all-MiniLM-L6-v2 through mapInArrow, and the loader closure."""

from __future__ import annotations

import os

import numpy as np
import pytest
from pyspark.sql import types as T

from siren_batch import embed, model_cache, schemas
from siren_batch.config import EmbedConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CFG = EmbedConfig(device="cpu", batch_size=4)
ITEMS_NULLABLE_TEXT = T.StructType([*schemas.ITEMS.fields[:3], T.StructField("text", T.StringType(), True)])


def _vectors(df) -> dict[str, np.ndarray]:
    return {r["item_id"]: np.asarray(r["embedding"], dtype=np.float64) for r in df.collect()}


def test_embed_items_unit_vectors_same_text_same_vector(spark):
    items = spark.createDataFrame([
        ("1", "Toy Story", "Animation", "Title: Toy Story. Category: Animation, Children's, Comedy."),
        ("2", "Toy Story", "Animation", "Title: Toy Story. Category: Animation, Children's, Comedy."),
        ("3", "Scream", "Horror", "Title: Scream. Category: Horror, Thriller."),
        ("4", "Casablanca", "Drama", "Title: Casablanca. Category: Drama, Romance, War."),
    ], schemas.ITEMS)
    out = embed.embed_items(items, CFG)
    assert out.schema == schemas.ITEM_EMBEDDINGS
    vecs = _vectors(out)
    assert sorted(vecs) == ["1", "2", "3", "4"]
    assert all(v.shape == (384,) for v in vecs.values())
    assert all(abs(np.linalg.norm(v) - 1.0) < 1e-5 for v in vecs.values())
    assert np.allclose(vecs["1"], vecs["2"], atol=1e-5)
    assert float(vecs["1"] @ vecs["3"]) < 0.9  # different text, different direction
    assert float(vecs["3"] @ vecs["4"]) < 0.9


def test_embed_items_blank_text_does_not_crash(spark):
    items = spark.createDataFrame([
        ("1", "A", None, ""), ("2", "B", None, None), ("3", "C", "Drama", "Title: C. Category: Drama."),
    ], ITEMS_NULLABLE_TEXT)
    vecs = _vectors(embed.embed_items(items, CFG))
    assert sorted(vecs) == ["1", "2", "3"]
    assert all(np.isfinite(v).all() and v.shape == (384,) for v in vecs.values())
    assert np.allclose(vecs["1"], vecs["2"], atol=1e-5)  # both encoded as ""


def test_embed_items_empty_frame(spark):
    assert embed.embed_items(spark.createDataFrame([], schemas.ITEMS), CFG).count() == 0


class _FakeEncoder:
    def __init__(self):
        import torch

        self.calls = []
        self.device = torch.device("cpu")

    def encode(self, texts, **kwargs):
        self.calls.append(kwargs)
        return np.array([[len(t), 1.0] for t in texts])


def test_make_encode_fn_loads_once_and_passes_config(monkeypatch):
    model_cache.clear()
    loads = []
    fake = _FakeEncoder()
    monkeypatch.setattr(embed, "load_encoder", lambda cfg: loads.append(cfg) or fake)
    cfg = EmbedConfig(model="fake-model", batch_size=7, normalize=False, device="cpu")
    encode = embed.make_encode_fn(cfg)
    first, second = encode(["ab", "abcd"]), encode(["x"])
    model_cache.clear()
    assert len(loads) == 1
    assert first.dtype == np.float32 and first[:, 0].tolist() == [2.0, 4.0] and second.shape == (1, 2)
    assert fake.calls[0]["batch_size"] == 7 and fake.calls[0]["normalize_embeddings"] is False


def test_each_task_gets_the_cores_spark_reserves_for_it(spark, monkeypatch):
    """torch_threads=0 resolves on the driver to spark.task.cpus (as the score stage's does),
    and the encoder sets it on every call: a worker's earlier model may have set another count."""
    import torch

    from siren_batch.spark import task_threads

    assert spark.conf.get("spark.task.cpus", "1") == "1"   # local mode: one core per task
    assert task_threads(EmbedConfig().torch_threads, spark) == 1
    assert task_threads(EmbedConfig(torch_threads=3).torch_threads, spark) == 3
    model_cache.clear()
    monkeypatch.setattr(embed, "load_encoder", lambda cfg: _FakeEncoder())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        embed.make_encode_fn(EmbedConfig(model="fake-model", device="cpu", torch_threads=1))(["a"])
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        embed.make_encode_fn(EmbedConfig(model="fake-model", device="cpu"))(["a"])   # 0: left alone
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
        model_cache.clear()
    with pytest.raises(ValueError, match="embed.torch_threads"):
        EmbedConfig(torch_threads=-1)


def test_pick_device():
    from siren_batch.backends.device import pick_device

    assert pick_device("cpu") == "cpu"
    assert pick_device("cuda") == "cuda"
    import torch

    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def _gpus(monkeypatch, count: int) -> None:
    """torch as a machine with `count` visible GPUs shows it to pick_device."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_a_task_gpu_puts_the_model_on_that_gpu(monkeypatch, caplog):
    from siren_batch.backends.device import on_gpu, pick_device
    from siren_batch.config import ScoreConfig

    _gpus(monkeypatch, 2)
    assert [pick_device(d, 1) for d in ("auto", "cuda", "cpu", "cuda:0")] == ["cuda:1", "cuda:1", "cpu", "cuda:0"]
    assert pick_device("auto", None) == "cuda"
    with pytest.raises(ValueError, match="GPU address 2, but this process sees 2 GPU"):
        pick_device("auto", 2)
    # The stage's config moves to the task's GPU, so the model cache keys it apart, and is validated again.
    assert on_gpu(CFG, 1) == CFG       # device=cpu stays
    moved = on_gpu(EmbedConfig(), 1)
    assert moved.device == "cuda:1" and on_gpu(EmbedConfig(), None) == EmbedConfig()
    from siren_batch.scoring import backend_key

    assert backend_key(on_gpu(ScoreConfig(), 0)) != backend_key(on_gpu(ScoreConfig(), 1))
    _gpus(monkeypatch, 0)    # GPUs scheduled, but a CPU build of torch: auto runs on the CPU and says why
    with caplog.at_level("WARNING", logger="siren_batch.backends.device"):
        assert on_gpu(EmbedConfig(), 1).device == "cpu"
    assert "EmbedConfig: Spark gave this task GPU 1, but torch sees no CUDA device" in caplog.text


def test_spark_gpu_addresses_follow_sparks_own_convention():
    from siren_batch.backends.device import gpu_ordinal

    assert gpu_ordinal(["3", "5"]) == 3
    for bad in ([], ["GPU-8f2c"], ["01"]):
        with pytest.raises(ValueError, match="not GPU indices"):
            gpu_ordinal(bad)


def test_a_local_mode_task_has_no_gpu_and_keeps_its_device(spark):
    from siren_batch.spark import task_gpu

    assert task_gpu() is None       # the driver
    assert spark.sparkContext.parallelize([0], 1).map(lambda _: task_gpu()).collect() == [None]


def test_device_names_in_config():
    from siren_batch.config import ScoreConfig, TrainConfig

    assert ScoreConfig(device="cuda:1").device == "cuda:1" and TrainConfig(device="cuda:0").device == "cuda:0"
    for bad in ("cuda:", "cuda:x", "gpu"):
        with pytest.raises(ValueError, match="score.device must be auto, cpu, cuda or cuda:N"):
            ScoreConfig(device=bad)


def test_embed_config_rejects_bad_device():
    with pytest.raises(ValueError, match="embed.device"):
        EmbedConfig(device="tpu")
