"""The one piece of global state: a per-Python-worker cache of loaded models.

Spark reuses Python workers across tasks (spark.python.worker.reuse, on by
default), so a model loaded inside a UDF's loader closure stays loaded for the
worker's next batch and next task instead of being loaded once per batch.

An entry may name a `slot` (say, "the scoring model on cuda:0"): loading another
entry into the same slot drops the one there first, so a worker whose settings
change between jobs holds one copy of the model on its GPU, not one per setting.
"""

from __future__ import annotations

import gc
import logging
import threading
from typing import Any, Callable

from siren_batch.backends.device import empty_cuda_cache

logger = logging.getLogger(__name__)

_CACHE: dict[str, Any] = {}
_SLOTS: dict[str, str] = {}    # slot -> the key that holds it
_LOCK = threading.Lock()


def get_or_load(key: str, loader: Callable[[], Any], slot: str | None = None) -> Any:
    """Return the object cached under `key`, calling `loader()` the first time (after
    dropping whatever held `slot`)."""
    with _LOCK:
        if key not in _CACHE:
            held = _SLOTS.get(slot) if slot else None
            if held is not None and held != key:
                logger.info("dropping %s from this worker: %s replaces it in %s", held, key, slot)
                _drop(held)
            logger.info("loading %s into this worker", key)
            _CACHE[key] = loader()
            if slot:
                _SLOTS[slot] = key
        return _CACHE[key]


def discard(obj: Any) -> bool:
    """Drop every entry holding `obj` (a model whose device broke); True when one was."""
    with _LOCK:
        keys = [k for k, v in _CACHE.items() if v is obj]
        for key in keys:
            _drop(key)
        return bool(keys)


def _drop(key: str) -> None:
    held = _CACHE.pop(key, None)
    for slot in [s for s, k in _SLOTS.items() if k == key]:
        del _SLOTS[slot]
    close = getattr(held, "close", None)
    if callable(close):   # a vLLM engine: its processes hold GPU memory the next model needs
        try:
            close()
        except Exception as err:   # noqa: BLE001 - a broken engine must not stop the swap
            logger.warning("closing %s failed: %s", key, err)
    del held
    gc.collect()
    empty_cuda_cache()   # the dropped model's GPU memory


def clear() -> None:
    """Drop every cached model (tests, or a driver that switches models)."""
    with _LOCK:
        _CACHE.clear()
        _SLOTS.clear()
