"""Atomic folders for checkpoints, the best adapter and exports (local file system).

A folder is written under a temporary name beside its destination and renamed
into place; the previous copy is moved aside first and deleted last, so a crash
leaves either the old or the new folder, never a half-written one. A crash
between the two renames leaves only `<dest>.old-*`; `existing()` finds it.

Checkpoint contents (torch.save files; tensors-only ones load with weights_only=True):
trainable.pt (the trainable parameters: LoRA weights, or every weight for full
fine-tuning), optim.pt (optimizer and scheduler state), rng.pt (torch CPU/CUDA,
numpy and Python RNG states), order.pt (the data order: micro-batches of unit
indices per optimizer step) and state.json (step, learning curve, best metric,
evaluations without improvement, examples seen, wall time, fingerprint).
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = dest.with_name(f"{dest.name}.old-{uuid.uuid4().hex[:8]}")
        dest.rename(old)
    tmp.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def existing(dest: Path) -> Path | None:
    """`dest` if present, else a copy left aside by a crash mid-swap, else None."""
    dest = Path(dest)
    if dest.exists():
        return dest
    aside = sorted(dest.parent.glob(f"{dest.name}.old-*")) if dest.parent.exists() else []
    return aside[-1] if aside else None


def rng_state() -> dict:
    import random

    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, trainable: dict, optimizer, scheduler, order: list, state: dict) -> None:
    import torch

    with atomic_dir(folder) as tmp:
        torch.save({k: v.detach().cpu() for k, v in trainable.items()}, tmp / "trainable.pt")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        torch.save(order, tmp / "order.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    logger.info("checkpoint at step %d -> %s", state["step"], folder)


def load_checkpoint(folder: Path) -> dict:
    """Everything save_checkpoint wrote, as plain objects (tensors on CPU)."""
    import torch

    # numpy/python RNG states are not plain tensors: rng.pt needs the full unpickler
    # (our own file, written by save_checkpoint).
    return {"trainable": torch.load(folder / "trainable.pt", weights_only=True),
            "optim": torch.load(folder / "optim.pt", weights_only=False),
            "rng": torch.load(folder / "rng.pt", weights_only=False),
            "order": torch.load(folder / "order.pt", weights_only=True),
            "state": json.loads((folder / "state.json").read_text())}
