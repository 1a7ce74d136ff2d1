"""The backend layer: what every scoring backend shares, with no Spark and no
model imports at module level (it runs wherever numpy runs).

Answer-only (the SIREN serving path): the prompt ends with
"\\n<think>\\n</think>\\n<answer>", so the next token is the rating. One forward
step gives the logits there; restricted to the rating tokens and softmaxed they
give `probs` (one per scale point), `rating` = the expected value (the RMSE-optimal
point), `rating_median` = the distribution's median (the MAE-optimal point) and
`rating_argmax` = the most probable point. The reference code reads only the
argmax digit and maps anything unparseable to 5.0 (shared/REFERENCE.md); the
distribution costs nothing extra and gives better point estimates.

CoT mode generates, then parses the last <answer>x</answer>; an unparseable
answer is an error row, never a silent 5.0.

Every backend implements `Backend` and is built as `Backend(cfg: ScoreConfig)`:
`backends.transformers_backend.TransformersBackend` (CPU or one GPU) and
`backends.vllm_backend.VLLMBackend`. Prompts are complete rendered strings (chat
template included), so backends tokenize them WITHOUT adding special tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from siren_batch.config import ScoreConfig

SCALE = ("1", "2", "3", "4", "5")
ANSWER_OPEN = "<answer>"   # the rating token follows this text in every answer-only prompt


class ScoringError(ValueError):
    """The model/tokenizer cannot score this scale, or the backend is unknown."""


@dataclass
class ScoreResult:
    """One prompt's outcome; on error only `error` (and maybe prompt_tokens) is set."""

    probs: list[float] | None = None       # one per scale point, sums to 1 (None in CoT mode)
    rating: float | None = None            # expected rating (CoT: the parsed answer)
    rating_argmax: float | None = None     # most probable scale point (CoT: the parsed answer)
    prompt_tokens: int | None = None
    output_tokens: int | None = None       # 1 for answer-only; generated tokens for CoT
    error: str | None = None               # one line, e.g. "prompt_too_long: 9000 tokens > 8192"

    @classmethod
    def failed(cls, error: str, prompt_tokens: int | None = None) -> "ScoreResult":
        return cls(prompt_tokens=prompt_tokens, error=error.splitlines()[0] if error else "error")


class Backend(Protocol):
    model_id: str
    adapter_id: str | None

    def score(self, prompts: list[str], groups: list[str]) -> list[ScoreResult]:
        """Answer-only readout, one result per prompt, in order. `groups` (user ids) mark
        prompts that may share a prefix; a backend may ignore them."""
        ...

    def generate_cot(self, prompts: list[str]) -> list[ScoreResult]:
        """Generate a reasoning trace per prompt and parse its last <answer>."""
        ...


def rating_token_ids(tokenizer, scale: Sequence[str] = SCALE, context: str = ANSWER_OPEN) -> list[int]:
    """Token id the model emits for each label right after `context`.

    Read in context because some tokenizers (SentencePiece) spell a label alone
    differently ("▁5") from the same label after other text ("5").
    """
    base = tokenizer.encode(context, add_special_tokens=False)
    ids, bad = [], []
    for label in scale:
        full = tokenizer.encode(context + label, add_special_tokens=False)
        tail = full[len(base):] if full[:len(base)] == base else full
        if len(tail) == 1:
            ids.append(tail[0])
        else:
            bad.append(f"{label!r} -> {tokenizer.convert_ids_to_tokens(tail)}")
    if bad:
        raise ScoringError(f"rating labels must be single tokens after {context!r} for this tokenizer; "
                           f"got {'; '.join(bad)}. Use a scale whose labels are single tokens (e.g. 1..5)")
    if len(set(ids)) != len(ids):
        raise ScoringError(f"rating labels {list(scale)} map to repeated token ids {ids}")
    return ids


def readout(logits_over_scale: np.ndarray, scale: Sequence[str] = SCALE
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Softmax over the scale's logits -> (probs, expected rating, argmax rating).

    Works on one row (k,) or a batch (n, k); ties in the argmax go to the lower point.

    >>> probs, expected, best = readout(np.log([0.1, 0.1, 0.2, 0.2, 0.4]))
    >>> round(float(expected), 6), float(best)
    (3.7, 5.0)
    """
    logits = np.asarray(logits_over_scale, dtype=np.float64)
    if logits.shape[-1] != len(scale):
        raise ValueError(f"readout: {logits.shape[-1]} logits for a {len(scale)}-point scale")
    values = np.array([float(s) for s in scale])
    shifted = logits - logits.max(axis=-1, keepdims=True)
    weights = np.exp(shifted)
    probs = weights / weights.sum(axis=-1, keepdims=True)
    return probs, probs @ values, values[probs.argmax(axis=-1)]


def readout_median(probs: np.ndarray, scale: Sequence[str] = SCALE) -> np.ndarray:
    """Median of each distribution over the scale: the lowest point whose cumulative
    probability reaches 1/2 (the MAE-optimal point; the expected value is the RMSE one).

    >>> float(readout_median(np.array([0.1, 0.1, 0.2, 0.2, 0.4])))
    4.0
    >>> readout_median(np.array([[0.5, 0.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.2, 0.2, 0.6]])).tolist()
    [1.0, 5.0]
    """
    probs = np.asarray(probs, dtype=np.float64)
    values = np.array([float(s) for s in scale])
    cdf = np.cumsum(probs, axis=-1)
    # 1e-9 absorbs rounding in a cumulative sum that should reach exactly 1/2
    return values[np.argmax(cdf >= 0.5 - 1e-9, axis=-1)]


_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")


def parse_answer(text: str, lo: float = 1.0, hi: float = 5.0) -> float | None:
    """First number inside the LAST <answer>…</answer>, clipped to [lo, hi]; None if none.

    >>> parse_answer("<think>liked the genre</think><answer> 4.5 </answer>")
    4.5
    >>> parse_answer("<answer>5</answer> then <answer>9</answer>"), parse_answer("<answer>great</answer>")
    (5.0, None)
    """
    blocks = _ANSWER.findall(text or "")
    if not blocks:
        return None
    number = _NUMBER.search(blocks[-1])
    if number is None:
        return None
    return min(max(float(number.group()), lo), hi)


def load_backend(cfg: ScoreConfig) -> Backend:
    """Build the configured backend (heavy imports happen here, on the worker)."""
    if cfg.backend == "transformers":
        from siren_batch.backends.transformers_backend import TransformersBackend
        return TransformersBackend(cfg)
    if cfg.backend == "vllm":
        from siren_batch.backends.vllm_backend import VLLMBackend
        return VLLMBackend(cfg)
    raise ScoringError(f"unknown score.backend {cfg.backend!r}; use transformers or vllm")
