"""Statistics for a comparison one can trust: bootstrap intervals, McNemar tests, Holm correction.

- `bootstrap_ci`: percentile bootstrap over the test images (resampled with replacement, seeded).
  Every resample is scored with scikit-learn's `precision_recall_fscore_support`; all resamples
  go through ONE call by giving resample b its own copy of the labels (class k of resample b
  becomes label b*K + k), so per-label counts never mix resamples and the per-resample macro
  average is the mean of its K labels: exactly sklearn's macro score, zero_division included,
  at the cost of one vectorised call instead of one call per resample.
- `mcnemar`: paired test of two classifiers on the same images (correct/incorrect). Exact
  two-sided binomial test (scipy.stats.binomtest) when the discordant count b + c is below
  `EXACT_BELOW` (25), chi-square with continuity correction otherwise.
- `holm`: Holm-Bonferroni step-down adjusted p-values (family-wise error rate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest, chi2
from sklearn.metrics import precision_recall_fscore_support

from wbc_transfer.config import Params

CI_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro")
EXACT_BELOW = 25  # McNemar: exact binomial test when b + c < EXACT_BELOW
_CHUNK_ITEMS = 2_000_000  # resampled items scored per sklearn call (bounds memory)


def bootstrap_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, n) indices drawn with replacement from range(n); same seed, same draws."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def bootstrap_distribution(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                           n_classes: int, n_resamples: int = 1000,
                           seed: int = 42) -> dict[str, np.ndarray]:
    """metric -> its value on each of n_resamples bootstrap resamples of the images."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D of one length: {y_true.shape}, "
                         f"{y_pred.shape}")
    n = len(y_true)
    if n == 0 or n_resamples < 1:
        return {m: np.empty(0) for m in CI_METRICS}
    index = bootstrap_indices(n, n_resamples, seed)
    out: dict[str, list[np.ndarray]] = {m: [] for m in CI_METRICS}
    chunk = max(1, _CHUNK_ITEMS // n)
    for start in range(0, n_resamples, chunk):
        rows = index[start:start + chunk]
        b = len(rows)
        offset = (np.arange(b, dtype=np.int64) * n_classes)[:, None]
        precision, recall, f1, _ = precision_recall_fscore_support(
            (y_true[rows] + offset).ravel(), (y_pred[rows] + offset).ravel(),
            labels=np.arange(b * n_classes), average=None, zero_division=0,
        )
        out["accuracy"].append((y_true[rows] == y_pred[rows]).mean(axis=1))
        out["precision_macro"].append(precision.reshape(b, n_classes).mean(axis=1))
        out["recall_macro"].append(recall.reshape(b, n_classes).mean(axis=1))
        out["f1_macro"].append(f1.reshape(b, n_classes).mean(axis=1))
    return {m: np.concatenate(v) for m, v in out.items()}


def percentile_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The central `confidence` percentile interval of a bootstrap distribution."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if len(values) == 0:
        return (float("nan"), float("nan"))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return (float(low), float(high))


def bootstrap_ci(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                 n_classes: int, n_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 42) -> dict[str, tuple[float, float]]:
    """metric -> (low, high): percentile bootstrap interval over the images.

    Empty when n_resamples is 0 (bootstrap switched off); (nan, nan) for an empty set."""
    if n_resamples < 1:
        return {}
    dist = bootstrap_distribution(y_true, y_pred, n_classes, n_resamples, seed)
    return {m: percentile_interval(v, confidence) for m, v in dist.items()}


def bootstrap_settings(params: Params) -> dict[str, object]:
    """How the intervals are computed; stored beside them in every evaluate metrics.json."""
    c = params.compare
    return {"method": "percentile", "resamples": int(c.bootstrap),
            "confidence": float(c.confidence), "seed": int(c.seed), "unit": "test image"}


def intervals(params: Params, y_true: np.ndarray, y_pred: np.ndarray,
              n_classes: int) -> dict[str, list[float]]:
    """metric -> [low, high] for one model on one evaluation set (params' bootstrap settings)."""
    c = params.compare
    ci = bootstrap_ci(y_true, y_pred, n_classes, c.bootstrap, c.confidence, c.seed)
    return {m: [round(low, 6), round(high, 6)] for m, (low, high) in ci.items()}


@dataclass(frozen=True)
class McNemar:
    n: int  # paired images
    b: int  # first classifier right, second wrong
    c: int  # first wrong, second right
    statistic: float  # chi-square statistic (nan for the exact test)
    p_value: float
    method: str  # "exact" | "chi2-cc" | "none" (no discordant pair)


def mcnemar(correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray,
            exact_below: int = EXACT_BELOW) -> McNemar:
    """McNemar's test of two classifiers scored on the same images.

    correct_a[i], correct_b[i]: whether each classifier got image i right. Exact two-sided
    binomial test (scipy.stats.binomtest, p = 0.5) when b + c < exact_below, else the
    chi-square test with continuity correction, (|b - c| - 1)^2 / (b + c), 1 degree of freedom.
    No discordant pair at all: p = 1."""
    a, b_ = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b_.shape:
        raise ValueError(f"paired results must have one shape: {a.shape} vs {b_.shape}")
    b = int(np.sum(a & ~b_))
    c = int(np.sum(~a & b_))
    discordant = b + c
    if discordant == 0:
        return McNemar(len(a), b, c, float("nan"), 1.0, "none")
    if discordant < exact_below:
        p = binomtest(b, discordant, 0.5, alternative="two-sided").pvalue
        return McNemar(len(a), b, c, float("nan"), float(min(1.0, p)), "exact")
    statistic = (abs(b - c) - 1) ** 2 / discordant
    return McNemar(len(a), b, c, float(statistic), float(chi2.sf(statistic, df=1)), "chi2-cc")


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the input order (NaNs stay NaN, not counted)."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    if m == 0:
        return adjusted
    order = valid[np.argsort(p[valid], kind="stable")]
    steps = (m - np.arange(m)) * p[order]
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(steps))
    return adjusted
