"""Split-conformal prediction sets: "the true class is in this set for 90 % of cells".

Method: split (inductive) conformal classification with the hinge non-conformity score
1 - p(class) (Vovk, Gammerman & Shafer, "Algorithmic Learning in a Random World", 2005;
Angelopoulos & Bates, "A Gentle Introduction to Conformal Prediction", 2021, sec. 1), computed by
the `crepes` library (Boström, `crepes.ConformalClassifier` and `crepes.extras.hinge`,
non-smoothed p-values, so a set is the same on every call). A class is in the set of an image
when its p-value, the share of calibration scores at least as large as its own score (+1 over
n + 1), is at least 1 - confidence. With calibration images exchangeable with the new ones,
the set holds the true class with probability >= confidence (marginally, over images).

The calibration is stored in the registered model's config (key ``conformal``): the sorted
calibration scores (so that any confidence level can be asked at prediction time), how many
there were, what they were computed on, and the score threshold at the level the adapt run
measured (``quantiles``: confidence -> largest score still in a set).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from crepes import ConformalClassifier
from crepes.extras import hinge

SCORE = "hinge"  # 1 - calibrated probability of the class


class NoCalibrationError(ValueError):
    """Prediction sets were asked of a model that carries no conformal calibration."""


def scores(probabilities: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """Hinge non-conformity scores (crepes.extras.hinge): float N x K probabilities -> float N
    (1 - p of the true class, `labels` int N) or N x K (every class) when `labels` is None."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if labels is None:
        return hinge(probabilities)
    return hinge(probabilities, np.arange(probabilities.shape[1]), np.asarray(labels))


def calibrate(probabilities: np.ndarray, labels: np.ndarray, source: str,
              levels: Sequence[float] = (0.9,)) -> dict[str, Any]:
    """The ``conformal`` config entry from calibration images' calibrated probabilities (float
    N x K) and true labels (int N); `source` says which images they were (stored as is).
    Raises ValueError for fewer than 2 images."""
    if len(labels) < 2:
        raise ValueError(f"conformal calibration needs at least 2 labelled images, got {len(labels)}")
    alphas = np.sort(scores(probabilities, labels))
    entry = {"score": SCORE, "method": "split conformal (crepes, non-smoothed p-values)",
             "n": int(len(alphas)), "calibrated_on": source,
             "scores": [round(float(a), 6) for a in alphas]}
    entry["quantiles"] = {f"{c:g}": threshold(entry, c) for c in levels}
    return entry


def _fitted(conformal: dict[str, Any]) -> ConformalClassifier:
    return ConformalClassifier().fit(np.asarray(conformal["scores"], dtype=np.float64))


def prediction_sets(probabilities: np.ndarray, conformal: dict[str, Any] | None,
                    confidence: float) -> np.ndarray:
    """bool N x K: class k is in image i's set (crepes `predict_set`, no smoothing).

    Raises NoCalibrationError when `conformal` is missing, ValueError for a confidence outside
    (0, 1)."""
    if not conformal or not conformal.get("scores"):
        raise NoCalibrationError(
            "this model has no conformal calibration (config key 'conformal'): prediction sets "
            "need a model adapted with labelled images (`wbc-transfer adapt ... --per-class K`, "
            "K >= 2)")
    if not 0 < confidence < 1:
        raise ValueError(f"sets confidence must be in (0, 1), got {confidence}")
    alphas = scores(np.asarray(probabilities), None)
    sets = _fitted(conformal).predict_set(alphas, confidence=confidence, smoothing=False)
    return np.asarray(sets, dtype=bool).reshape(alphas.shape)


def threshold(conformal: dict[str, Any], confidence: float) -> float:
    """The largest score that is still in a set at `confidence` (-1 when none is): a class is in
    the set iff its probability >= 1 - threshold. For reading; `prediction_sets` decides."""
    alphas = np.asarray(conformal["scores"], dtype=np.float64)
    candidates = np.unique(np.concatenate([alphas, [0.0]]))
    inside = prediction_sets(1.0 - candidates[:, None], conformal, confidence)[:, 0]
    return round(float(candidates[inside].max()), 6) if inside.any() else -1.0


def coverage(sets: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Empirical coverage (share of images whose set holds the true class) and mean set size,
    overall and per true class, on held-out images. sets: bool N x K, labels: int N."""
    sets, labels = np.asarray(sets, dtype=bool), np.asarray(labels)
    covered = sets[np.arange(len(labels)), labels] if len(labels) else np.zeros(0, dtype=bool)
    size = sets.sum(axis=1)
    per_class = {
        cls: {"n": int((labels == k).sum()),
              "coverage": float(covered[labels == k].mean()) if (labels == k).any() else float("nan"),
              "mean_set_size": float(size[labels == k].mean()) if (labels == k).any() else float("nan")}
        for k, cls in enumerate(classes)}
    return {"n": int(len(labels)),
            "coverage": float(covered.mean()) if len(labels) else float("nan"),
            "mean_set_size": float(size.mean()) if len(labels) else float("nan"),
            "empty_sets": int((size == 0).sum()), "per_class": per_class}
