"""ITEM_EMBEDDINGS: one sentence-encoder vector per item, for clustering into topics.

The encoder (paper: BGE-M3; default here: the bundled all-MiniLM-L6-v2, 384 dims)
runs inside `mapInArrow`: each Python worker loads it once through
`model_cache.get_or_load` and then encodes every Arrow batch it is sent, so the
cost is one model load per worker, not per batch or per task.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame

from siren_batch import assets, model_cache, schemas
from siren_batch.backends.device import pick_device
from siren_batch.config import EmbedConfig
from siren_batch.spark import task_config, task_threads

logger = logging.getLogger(__name__)


def load_encoder(cfg: EmbedConfig):
    """Load the SentenceTransformer named by cfg.model (offline), on cfg.device."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub from a worker
    from sentence_transformers import SentenceTransformer

    path = assets.resolve_encoder(cfg.model)
    device = pick_device(cfg.device)   # already cuda:N when Spark gave the task a GPU (make_encode_fn)
    model = SentenceTransformer(path, device=device)
    model.max_seq_length = cfg.max_seq_length
    # sentence-transformers 6 renamed get_sentence_embedding_dimension; accept both.
    dims = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    logger.info("encoder %s on %s, %d dims", path, device, dims())
    return model


def make_encode_fn(cfg: EmbedConfig) -> Callable[[list[str]], np.ndarray]:
    """Return `encode(texts) -> float32 array (n, dims)`; the model loads on first call
    and stays cached in this Python process. On CPU, cfg.torch_threads (when > 0) is set
    on every call: a worker process may have run another stage's model in between."""
    on_task_gpu = task_config(cfg)   # on a cluster with GPU scheduling: the task's own GPU

    def encode(texts: list[str]) -> np.ndarray:
        task_cfg = on_task_gpu()
        key = f"encoder:{task_cfg.model}:{task_cfg.device}:{task_cfg.max_seq_length}"
        model = model_cache.get_or_load(key, lambda: load_encoder(task_cfg))
        if cfg.torch_threads and model.device.type == "cpu":
            import torch

            torch.set_num_threads(cfg.torch_threads)
        vectors = model.encode(texts, batch_size=cfg.batch_size, normalize_embeddings=cfg.normalize,
                               convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)

    return encode


def _to_batch(item_ids: pa.Array, vectors: np.ndarray) -> pa.RecordBatch:
    n, dims = vectors.shape
    offsets = pa.array(np.arange(0, (n + 1) * dims, dims, dtype=np.int32))
    values = pa.array(vectors.reshape(-1), type=pa.float32())
    embedding = pa.ListArray.from_arrays(offsets, values)
    return pa.RecordBatch.from_arrays([item_ids, embedding], names=["item_id", "embedding"])


def embed_items(items: DataFrame, cfg: EmbedConfig) -> DataFrame:
    """Encode items.text into ITEM_EMBEDDINGS (item_id, embedding array<float>).

    Unit-length vectors when cfg.normalize (so euclidean K-means ranks like cosine).
    Null or blank text (ingest rejects such rows) is encoded as the empty string
    rather than failing the batch; the count is logged by the worker.
    torch_threads=0 gives each task spark.task.cpus threads, as the score stage does:
    otherwise every concurrent task's torch takes all of the executor's cores.
    """
    encode = make_encode_fn(dataclasses.replace(cfg, torch_threads=task_threads(cfg.torch_threads,
                                                                                  items.sparkSession)))

    def encode_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            texts = batch.column("text").to_pylist()
            blank = sum(1 for t in texts if not t or not t.strip())
            if blank:
                logger.warning("%d of %d items have empty text; encoding them as ''", blank, len(texts))
            vectors = encode([t or "" for t in texts])
            yield _to_batch(batch.column("item_id"), vectors)

    return items.select("item_id", "text").mapInArrow(encode_batches, schemas.ITEM_EMBEDDINGS)
