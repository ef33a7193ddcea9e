"""Calibrated confidence: temperature scaling, ECE, Brier score, reliability and risk-coverage.

- Temperature scaling (Guo et al. 2017, "On calibration of modern neural networks"): one
  scalar T > 0 divides every logit; T is the minimiser of the negative log-likelihood (NLL) of
  the leak-free validation cells' labels, found by scipy's bounded Brent search over log T
  (`scipy.optimize.minimize_scalar`). One scalar on a few hundred logits is a 1-D convex
  problem: a bracketed search is exact and deterministic, needs no learning rate or iteration
  budget (torch LBFGS does), and works on the logits we already have (scikit-learn's
  temperature calibration wraps a fitted estimator, not saved logits). Dividing by T never
  changes the argmax, so accuracy and F1 are untouched.
- ECE: torchmetrics' `MulticlassCalibrationError` (top-label, L1, **equal-width** bins over
  [0, 1]), the usual definition: sum over bins of |accuracy - confidence| x share of images.
- Brier score: scikit-learn's multiclass `brier_score_loss` (mean over images of the squared
  distance between the probability vector and the one-hot label; 0 best, 2 worst).
- Reliability table: the same equal-width bins, with each bin's mean confidence and accuracy.
- Risk-coverage (Geifman & El-Yaniv 2017): keep the images whose calibrated top probability is
  at least t, for every t; coverage = share kept, accuracy of the kept images, cells kept.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from scipy.optimize import minimize_scalar
from sklearn.metrics import brier_score_loss
from torchmetrics.functional.classification import multiclass_calibration_error

log = logging.getLogger(__name__)

ECE_BINS = 15  # equal-width bins of ECE and the reliability diagram (Guo et al. 2017 use 15)
LOG_T_BOUNDS = (-3.0, 3.0)  # T searched in [0.05, 20]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """float64 N x K probabilities of N x K logits divided by `temperature`."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (nats) of int labels under softmax(logits / temperature)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(z)), np.asarray(labels, dtype=np.int64)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T that minimises the NLL of `labels` (int N) under softmax(logits / T)
    (float N x K). Fit it on validation cells only, never on a test set. Returns 1.0 for an
    empty set. Raises ValueError on mismatched shapes or non-finite logits."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(f"temperature scaling needs N x K logits and N labels, got "
                         f"{logits.shape} and {labels.shape}")
    if len(labels) == 0:
        return 1.0
    if not np.isfinite(logits).all():
        raise ValueError("temperature scaling: the validation logits are not all finite")
    result = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))),
                             bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    if min(abs(result.x - b) for b in LOG_T_BOUNDS) < 1e-3:
        log.warning("temperature scaling: T = %.3g is at the edge of the searched range "
                    "[%.3g, %.3g] (a model near chance wants T -> infinity)",
                    np.exp(result.x), *np.exp(LOG_T_BOUNDS))
    return float(np.exp(result.x))


def ece(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error, equal-width bins (torchmetrics); nan when empty."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if len(probabilities) == 0:
        return float("nan")
    return float(multiclass_calibration_error(
        torch.from_numpy(probabilities), torch.as_tensor(np.asarray(labels), dtype=torch.long),
        num_classes=probabilities.shape[1], n_bins=n_bins, norm="l1"))


def brier(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Multiclass Brier score (scikit-learn; 0 best, 2 worst); nan when empty."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if len(probabilities) == 0:
        return float("nan")
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)  # float32 rounding
    return float(brier_score_loss(np.asarray(labels), probabilities,
                                  labels=list(range(probabilities.shape[1])),
                                  scale_by_half=False))  # the multiclass sum, for K = 2 too


def reliability_table(probabilities: np.ndarray, labels: np.ndarray,
                      n_bins: int = ECE_BINS) -> pd.DataFrame:
    """One row per equal-width confidence bin (right-closed, as torchmetrics bins): lower,
    upper, images, confidence (mean top probability) and accuracy (nan for empty bins)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1) if len(probabilities) else np.empty(0)
    correct = (probabilities.argmax(axis=1) == np.asarray(labels)) if len(probabilities) \
        else np.empty(0, dtype=bool)
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        mask = which == b
        rows.append({"lower": edges[b], "upper": edges[b + 1], "images": int(mask.sum()),
                     "confidence": float(confidence[mask].mean()) if mask.any() else np.nan,
                     "accuracy": float(correct[mask].mean()) if mask.any() else np.nan})
    return pd.DataFrame(rows)


def risk_coverage(confidence: np.ndarray, correct: np.ndarray,
                  groups: Sequence[str] | np.ndarray | None = None) -> pd.DataFrame:
    """The risk-coverage curve: one row per distinct confidence t (descending), for the images
    whose confidence is >= t: threshold, kept (images), coverage (share of images kept),
    accuracy (of the kept images), kept_cells (distinct groups among them)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    n = len(confidence)
    if n == 0:
        return pd.DataFrame(columns=["threshold", "kept", "coverage", "accuracy", "kept_cells"])
    order = np.argsort(-confidence, kind="stable")
    conf, hits = confidence[order], correct[order]
    group_arr = np.asarray(groups if groups is not None and len(groups) else np.arange(n),
                           dtype=object)[order]
    seen: set[object] = set()
    cells = np.empty(n, dtype=np.int64)
    for i, g in enumerate(group_arr):
        seen.add(g)
        cells[i] = len(seen)
    kept = np.arange(1, n + 1)
    accuracy = np.cumsum(hits) / kept
    last = np.r_[conf[1:] != conf[:-1], True]  # the last image of each distinct threshold
    return pd.DataFrame({"threshold": conf[last], "kept": kept[last], "coverage": kept[last] / n,
                         "accuracy": accuracy[last], "kept_cells": cells[last]})


def review_threshold(curve: pd.DataFrame, target_accuracy: float) -> float | None:
    """The lowest threshold whose kept images reach `target_accuracy` (the largest coverage
    that does), from a `risk_coverage` curve; None when no threshold reaches it."""
    ok = curve[curve["accuracy"] >= target_accuracy]
    return float(ok["threshold"].min()) if len(ok) else None


def coverage_at(confidence: np.ndarray, correct: np.ndarray, threshold: float | None,
                groups: Sequence[str] | np.ndarray | None = None) -> dict[str, float]:
    """coverage, accuracy of the kept images and kept cells when images with confidence below
    `threshold` go to review (None: everything goes to review)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    keep = np.zeros(len(confidence), dtype=bool) if threshold is None else confidence >= threshold
    correct = np.asarray(correct, dtype=bool)
    kept_groups = set(np.asarray(groups, dtype=object)[keep]) if groups is not None \
        and len(groups) else set(np.flatnonzero(keep))
    return {"coverage": float(keep.mean()) if len(keep) else float("nan"),
            "accuracy": float(correct[keep].mean()) if keep.any() else float("nan"),
            "kept_images": int(keep.sum()), "kept_cells": len(kept_groups)}
