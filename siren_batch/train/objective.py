"""What the model is trained to output at the answer position, and the losses.

The model's output is the distribution over the rating tokens "1".."5" at the
answer position (the logits restricted to those tokens, softmaxed: the same
readout as scoring, siren_batch.backends.readout) and its expected value E[r].

Targets (train.target):
- rating: E[r] predicts the label: prediction = E[r].
- residual: the model learns what the user+item bias baseline misses. The scale's
  midpoint 3 is the zero: prediction = clip(base + E[r] - 3, 1, 5), so E[r] is
  trained towards t = label - base + 3 (a model that outputs 3 reproduces the
  baseline). Scoring such a model needs `base` at inference and must add it back
  (the run's training_meta.json says `target: residual`).

Losses (train.loss), per example, on t:
- ce: cross-entropy against the two-hot distribution of clip(t, 1, 5) over the
  scale (mass split between the two nearest points so its mean is exactly
  clip(t, 1, 5); for integer targets - every `rating` target - it is one-hot,
  i.e. plain cross-entropy on the label's token);
- mse: (E[r] - t)^2, the squared error of the prediction itself (for residual,
  (base + E[r] - 3 - label)^2 before clipping);
- both: ce + mse.
"""

from __future__ import annotations

import numpy as np

from siren_batch.backends import SCALE, readout

MIDPOINT = 3.0
VALUES = np.array([float(s) for s in SCALE])


def model_targets(labels, bases, target: str) -> np.ndarray:
    """The value E[r] is trained towards (see module doc).

    >>> model_targets([5.0, 1.0], [4.0, 2.5], "residual").tolist()
    [4.0, 1.5]
    """
    labels = np.asarray(labels, dtype=np.float64)
    if target == "rating":
        return labels
    if target == "residual":
        return labels - np.asarray(bases, dtype=np.float64) + MIDPOINT
    raise ValueError(f"unknown train.target {target!r}; use rating or residual")


def two_hot(values) -> np.ndarray:
    """Distribution over the scale whose mean is clip(value, 1, 5), on the two nearest points.

    >>> two_hot([4.25, 7.0]).round(2).tolist()
    [[0.0, 0.0, 0.0, 0.75, 0.25], [0.0, 0.0, 0.0, 0.0, 1.0]]
    """
    v = np.clip(np.asarray(values, dtype=np.float64), VALUES[0], VALUES[-1])
    low = np.clip(np.floor(v - VALUES[0]).astype(int), 0, len(VALUES) - 2)
    upper_weight = v - VALUES[low]
    out = np.zeros((len(v), len(VALUES)))
    out[np.arange(len(v)), low] = 1.0 - upper_weight
    out[np.arange(len(v)), low + 1] += upper_weight
    return out


def losses(scale_logits, targets, kind: str):
    """Per-example loss (torch, float32) from the logits over the scale [n, 5] and
    targets t [n] (model_targets); see module doc for ce / mse / both."""
    import torch

    logp = torch.log_softmax(scale_logits.float(), dim=-1)
    t = torch.as_tensor(np.asarray(targets, dtype=np.float32), device=logp.device)
    soft = torch.as_tensor(two_hot(targets), dtype=torch.float32, device=logp.device)
    ce = -(soft * logp).sum(-1)
    expected = logp.exp() @ torch.as_tensor(VALUES, dtype=torch.float32, device=logp.device)
    mse = (expected - t) ** 2
    if kind == "ce":
        return ce
    if kind == "mse":
        return mse
    if kind == "both":
        return ce + mse
    raise ValueError(f"unknown train.loss {kind!r}; use ce, mse or both")


def predictions(scale_logits: np.ndarray, bases, target: str) -> tuple[np.ndarray, np.ndarray]:
    """(probs, rating predictions on the label scale) from logits over the scale,
    through the scoring readout; residual adds the base back and clips."""
    probs, expected, _ = readout(scale_logits, SCALE)
    if target == "residual":
        expected = np.clip(np.asarray(bases, dtype=np.float64) + expected - MIDPOINT, VALUES[0], VALUES[-1])
    return probs, expected


def valid_metrics(scale_logits: np.ndarray, labels, bases, target: str) -> dict[str, float]:
    """MAE / RMSE of the expected-value prediction (base added back for residual) and
    NLL = mean cross-entropy against the two-hot target (for the rating target:
    -log p(label)).

    >>> m = valid_metrics(np.log([[0.1, 0.1, 0.2, 0.2, 0.4]]), [4.0], [0.0], "rating")
    >>> round(m["mae"], 3), round(m["nll"], 3)
    (0.3, 1.609)
    """
    labels = np.asarray(labels, dtype=np.float64)
    probs, pred = predictions(scale_logits, bases, target)
    soft = two_hot(model_targets(labels, bases, target))
    nll = -(soft * np.log(np.clip(probs, 1e-12, None))).sum(-1)
    err = pred - labels
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())),
            "nll": float(nll.mean()), "n": int(len(labels))}
