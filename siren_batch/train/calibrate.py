"""Calibration: the scorer's rating-token log-probabilities, plus (optionally) the
baselines' predictions and the as-of counts, to a final distribution and point estimate.

    calibrator = fit_calibrator(valid_frame, ["llm", "baselines", "counts"])
    probs, rating, median = calibrator.predict(test_frame)

Fit on the valid split only (`make calibrate`), stored in the warehouse, applied by
the score stage when present (siren_batch.calibration holds the Spark edge). Two
scikit-learn models share one feature matrix:
- the distribution: multinomial logistic regression over the scale points, its
  inverse regularisation chosen by out-of-fold log-loss; `calibrated_probs`
  and their median (`calibrated_median`, the MAE-optimal point);
- the point estimate: ridge regression, alpha by cross-validation, clipped to the
  scale (`calibrated_rating`, fit for squared error: the RMSE-optimal point).
Out-of-fold predictions on valid give honest valid metrics for the model card.

Feature groups (frame columns -> features):
  llm        probs (5 per row) -> log-probabilities and the expected rating
  baselines  bias, als -> as they are (als falls back to bias)
  counts     n_history, item_count -> log1p; user_mean, item_mean -> as they are (bias when null)
  hidden     hidden (a vector per row: the frozen model's state at the answer position) -> as it is
             (the probe, siren_batch.train.probe)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from siren_batch.backends import SCALE, readout_median
from siren_batch.train.objective import VALUES, two_hot

logger = logging.getLogger(__name__)

FEATURE_GROUPS = ("llm", "baselines", "counts", "hidden")
LOG_FLOOR = 1e-6   # probabilities below this read as this: log(0) would be -inf


def feature_matrix(frame: Any, groups: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """(n, d) float matrix and the feature names for a pandas frame (see module doc).

    >>> import pandas as pd
    >>> f = pd.DataFrame({"probs": [[.1, .1, .2, .2, .4]], "bias": [3.5], "als": [None],
    ...                   "n_history": [0], "user_mean": [None], "item_count": [3], "item_mean": [4.0]})
    >>> x, names = feature_matrix(f, ["baselines", "counts"])
    >>> names, x.round(3).tolist()
    (['bias', 'als', 'log1p_n_history', 'user_mean', 'log1p_item_count', 'item_mean'],
     [[3.5, 3.5, 0.0, 3.5, 1.386, 4.0]])
    """
    unknown = [g for g in groups if g not in FEATURE_GROUPS]
    if unknown or not groups:
        raise ValueError(f"calibration feature groups {list(groups)}: use one or more of {', '.join(FEATURE_GROUPS)}")
    bias = frame["bias"].astype(float).to_numpy()
    cols: list[np.ndarray] = []
    names: list[str] = []
    if "llm" in groups:
        probs = np.array(frame["probs"].tolist(), dtype=float)
        cols += [np.log(np.clip(probs, LOG_FLOOR, 1.0)), (probs @ VALUES)[:, None]]
        names += [f"logp_{s}" for s in SCALE] + ["llm_expected"]
    if "baselines" in groups:
        als = frame["als"].astype(float).to_numpy()
        cols += [bias[:, None], np.where(np.isnan(als), bias, als)[:, None]]
        names += ["bias", "als"]
    if "hidden" in groups:
        hidden = np.array(frame["hidden"].tolist(), dtype=float)
        cols.append(hidden)
        names += [f"h{k}" for k in range(hidden.shape[1])]
    if "counts" in groups:
        for count, mean in (("n_history", "user_mean"), ("item_count", "item_mean")):
            m = frame[mean].astype(float).to_numpy()
            cols += [np.log1p(frame[count].astype(float).to_numpy())[:, None], np.where(np.isnan(m), bias, m)[:, None]]
            names += [f"log1p_{count}", mean]
    return np.hstack(cols), names


@dataclass
class Calibrator:
    """The fitted pair of models and what they were fit on (meta goes in the model card)."""

    groups: list[str]
    distribution: Any                  # sklearn pipeline: scaler + LogisticRegressionCV
    point: Any                         # sklearn pipeline: scaler + RidgeCV
    classes: list[float]               # scale points seen in the fit labels (columns of predict_proba)
    meta: dict[str, Any] = field(default_factory=dict)

    def predict(self, frame: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probs over the whole scale (n, 5), point estimate (n,), median (n,))."""
        x, _ = feature_matrix(frame, self.groups)
        return _predict(self.distribution, self.point, self.classes, x)


def _predict(distribution, point, classes: list[float], x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    seen = distribution.predict_proba(x)
    probs = np.zeros((len(x), len(VALUES)))
    for j, value in enumerate(classes):           # a point absent from the fit labels keeps probability 0
        probs[:, int(np.argmin(np.abs(VALUES - value)))] = seen[:, j]
    rating = np.clip(point.predict(x), VALUES[0], VALUES[-1])
    return probs, rating, readout_median(probs, SCALE)


def _distribution(c: float, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))


def _point():
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))  # alpha by efficient LOO


def _fit_distribution(c: float, seed: int, x: np.ndarray, labels: np.ndarray):
    """The logistic regression fit on each label's two-hot distribution (objective.two_hot):
    a row per scale point with weight, so a label between two points (half stars, a scale
    mapped onto 1-5) keeps its mean; an integer label is one row of weight 1, as before. The
    scaler takes the same weights: a split row counts once in the features' mean and spread."""
    soft = two_hot(labels)
    rows, points = np.nonzero(soft > 1e-12)
    weight = soft[rows, points]
    return _distribution(c, seed).fit(x[rows], VALUES[points], standardscaler__sample_weight=weight,
                                      logisticregression__sample_weight=weight)


def _out_of_fold(x: np.ndarray, labels: np.ndarray, c: float, folds: int, seed: int) -> list[np.ndarray]:
    """(probs, point, median) for every row from models fit on the other folds."""
    from sklearn.model_selection import KFold

    oof = [np.zeros((len(x), len(VALUES))), np.zeros(len(x)), np.zeros(len(x))]
    for train, held in KFold(folds, shuffle=True, random_state=seed).split(x):
        d = _fit_distribution(c, seed, x[train], labels[train])
        p = _point().fit(x[train], labels[train])
        for out, part in zip(oof, _predict(d, p, d.classes_.tolist(), x[held])):
            out[held] = part
    return oof


def min_rows(folds: int) -> int:
    """The fewest labelled rows a fit takes: ten per cross-validation fold."""
    return 10 * folds


def fit_calibrator(frame: Any, groups: Sequence[str], folds: int = 5, seed: int = 42,
                   cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0)) -> Calibrator:
    """Fit on a labelled pandas frame (label, probs, bias, als, counts). The logistic
    regression's C is the one with the best out-of-fold NLL; meta holds that C's
    out-of-fold valid metrics (selected on the same folds, so slightly optimistic)
    beside the raw readouts' metrics on the same rows and, with the llm group and
    others, the same fit without the llm features (what the scorer adds).
    The raw readouts are the frame's `rating` and `rating_median` (the score stage's,
    base added back for a residual model) where present, else read from probs."""
    labels = frame["label"].astype(float).to_numpy()
    x, names = feature_matrix(frame, groups)
    if len(x) < min_rows(folds):
        raise ValueError(f"calibration needs at least {min_rows(folds)} labelled rows, got {len(x)}")
    outside = labels[(labels < VALUES[0]) | (labels > VALUES[-1]) | np.isnan(labels)]
    if len(outside):
        raise ValueError(f"calibration labels {sorted(set(outside.tolist()))[:5]} lie off the scale "
                         f"{VALUES[0]:g}-{VALUES[-1]:g}")
    trials = {c: _out_of_fold(x, labels, c, folds, seed) for c in cs}
    best = min(trials, key=lambda c: _metrics(labels, *trials[c])["nll"])
    distribution, point = _fit_distribution(best, seed, x, labels), _point().fit(x, labels)
    meta = {"groups": list(groups), "features": names, "rows": len(x), "folds": folds, "C": best,
            "ridge_alpha": float(point[-1].alpha_), "out_of_fold": _metrics(labels, *trials[best])}
    if "probs" in frame:
        probs = np.array(frame["probs"].tolist(), dtype=float)
        rating = frame["rating"].to_numpy(float) if "rating" in frame else probs @ VALUES
        median = frame["rating_median"].to_numpy(float) if "rating_median" in frame else readout_median(probs, SCALE)
        meta["raw"] = _metrics(labels, probs, rating, median)
    rest = [g for g in groups if g != "llm"]
    if "llm" in groups and rest:  # the ablation: what the scorer adds beyond the other features
        x_rest, _ = feature_matrix(frame, rest)
        meta["without_llm"] = _metrics(labels, *_out_of_fold(x_rest, labels, best, folds, seed))
    logger.info("calibrator on %d rows (%s), C=%g: out-of-fold %s", len(x), "+".join(groups), best,
                meta["out_of_fold"])
    return Calibrator(list(groups), distribution, point, [float(c) for c in distribution.classes_], meta)


def _metrics(labels: np.ndarray, probs: np.ndarray, rating: np.ndarray, median: np.ndarray) -> dict[str, float]:
    """MAE/RMSE of the point and median readouts and the NLL of the distribution (of the
    label's two-hot distribution: for an integer label, -log p(label))."""
    nll = -(two_hot(labels) * np.log(np.clip(probs, LOG_FLOOR, 1.0))).sum(-1)
    return {"mae": float(np.mean(np.abs(rating - labels))), "rmse": float(np.sqrt(np.mean((rating - labels) ** 2))),
            "median_mae": float(np.mean(np.abs(median - labels))),
            "median_rmse": float(np.sqrt(np.mean((median - labels) ** 2))), "nll": float(np.mean(nll))}
