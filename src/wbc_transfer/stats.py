"""Statistics for a comparison one can trust: cluster-bootstrap intervals, paired tests on cells,
Holm correction.

Images of one cell (group) are augmented copies, not independent observations, so every
interval resamples *groups* and every paired test pairs *cells*:

- `bootstrap_distribution` / `bootstrap_ci`: percentile cluster bootstrap (Davison & Hinkley
  1997, sec. 3.8; "resample clusters, keep their members"), stratified by class: each resample
  draws, within each class, that class's G_c groups with replacement (multinomial counts), so
  every resample has the set's cells per class (TEST has 4 monocyte cells: an unstratified
  draw would often have none and score macro-F1 on three classes); an image's weight is its
  group's count. Every
  resample is scored with scikit-learn's `precision_recall_fscore_support(sample_weight=...)`;
  all resamples go through ONE call by giving resample b its own copy of the labels (class k of
  resample b becomes label b*K + k). Without groups each image is its own group (the ordinary
  bootstrap). Three groups of 100 identical outcomes give exactly the interval of three images.
- `cell_outcomes`: a cell is right when more than half of its images are.
- `mcnemar`: McNemar's test of two classifiers on paired units (statsmodels
  `contingency_tables.mcnemar`: exact binomial when b + c < `EXACT_BELOW`, else chi-square with
  continuity correction); the comparison applies it to per-cell outcomes.
- `holm`: Holm-Bonferroni adjusted p-values (statsmodels `multipletests(method="holm")`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_fscore_support
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests

from wbc_transfer.config import Params

CI_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro")
EXACT_BELOW = 25  # McNemar: exact binomial test when b + c < EXACT_BELOW
_CHUNK_ITEMS = 2_000_000  # resampled items scored per sklearn call (bounds memory)


def group_codes(groups: Sequence[str] | np.ndarray | None, n: int) -> np.ndarray:
    """int64 code per item (0..G-1, in order of first appearance); each item its own group when
    `groups` is None or empty."""
    if groups is None or len(groups) == 0:
        return np.arange(n, dtype=np.int64)
    if len(groups) != n:
        raise ValueError(f"groups must have one entry per item: {len(groups)} vs {n}")
    return pd.factorize(np.asarray(groups, dtype=object))[0].astype(np.int64)


def bootstrap_counts(n_groups: int, n_resamples: int, seed: int,
                     strata: np.ndarray | None = None) -> np.ndarray:
    """(n_resamples, n_groups) int64: how often each group is drawn in each resample; within
    each stratum (int per group; one stratum when None) its groups are drawn with replacement
    as often as it has groups. Same seed, same draws."""
    rng = np.random.default_rng(seed)
    strata = np.zeros(n_groups, dtype=np.int64) if strata is None else np.asarray(strata)
    counts = np.zeros((n_resamples, n_groups), dtype=np.int64)
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        k = len(members)
        counts[:, members] = rng.multinomial(k, np.full(k, 1.0 / k), size=n_resamples)
    return counts


def _resampled_scores(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                      n_classes: int, n_resamples: int, seed: int,
                      groups: Sequence[str] | np.ndarray | None):
    """Yield, chunk by chunk of resamples, (accuracy (b,), precision, recall, f1 (b, K)) of
    the stratified cluster-bootstrap resamples (see the module docstring)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D of one length: {y_true.shape}, "
                         f"{y_pred.shape}")
    n = len(y_true)
    if n == 0 or n_resamples < 1:
        return
    codes = group_codes(groups, n)
    n_groups = int(codes.max()) + 1
    strata = np.zeros(n_groups, dtype=np.int64)
    strata[codes] = y_true  # a group's class (groups never span classes)
    counts = bootstrap_counts(n_groups, n_resamples, seed, strata)
    chunk = max(1, _CHUNK_ITEMS // n)
    for start in range(0, n_resamples, chunk):
        weights = counts[start:start + chunk][:, codes].astype(np.float64)  # (b, n)
        b = len(weights)
        offset = (np.arange(b, dtype=np.int64) * n_classes)[:, None]
        precision, recall, f1, _ = precision_recall_fscore_support(
            (y_true[None, :] + offset).ravel(), (y_pred[None, :] + offset).ravel(),
            labels=np.arange(b * n_classes), average=None, zero_division=0,
            sample_weight=weights.ravel(),
        )
        yield ((weights * (y_true == y_pred)).sum(1) / weights.sum(1),
               precision.reshape(b, n_classes), recall.reshape(b, n_classes),
               f1.reshape(b, n_classes))


def bootstrap_distribution(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                           n_classes: int, n_resamples: int = 1000, seed: int = 42,
                           groups: Sequence[str] | np.ndarray | None = None) -> dict[str, np.ndarray]:
    """metric -> its value on each of n_resamples cluster-bootstrap resamples (groups drawn
    with replacement within their class; images are the groups when `groups` is None)."""
    out: dict[str, list[np.ndarray]] = {m: [np.empty(0)] for m in CI_METRICS}
    for accuracy, precision, recall, f1 in _resampled_scores(y_true, y_pred, n_classes,
                                                             n_resamples, seed, groups):
        out["accuracy"].append(accuracy)
        out["precision_macro"].append(precision.mean(axis=1))
        out["recall_macro"].append(recall.mean(axis=1))
        out["f1_macro"].append(f1.mean(axis=1))
    return {m: np.concatenate(v) for m, v in out.items()}


def per_class_intervals(params: Params, y_true: np.ndarray, y_pred: np.ndarray,
                        classes: Sequence[str],
                        groups: Sequence[str] | np.ndarray | None = None,
                        ) -> dict[str, dict[str, list[float]]]:
    """class -> {precision, recall, f1} -> [low, high]: the same resamples as `intervals` (same
    seed, cells drawn within their class), scored per class. Empty when compare.bootstrap is 0."""
    c = params.compare
    parts: dict[str, list[np.ndarray]] = {"precision": [], "recall": [], "f1": []}
    for _, precision, recall, f1 in _resampled_scores(y_true, y_pred, len(classes), c.bootstrap,
                                                      c.seed, groups):
        parts["precision"].append(precision)
        parts["recall"].append(recall)
        parts["f1"].append(f1)
    if not parts["f1"]:
        return {}
    stacked = {m: np.concatenate(v) for m, v in parts.items()}
    return {cls: {m: [round(v, 6) for v in percentile_interval(stacked[m][:, k], c.confidence)]
                  for m in stacked}
            for k, cls in enumerate(classes)}


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
                 seed: int = 42, groups: Sequence[str] | np.ndarray | None = None,
                 ) -> dict[str, tuple[float, float]]:
    """metric -> (low, high): percentile (cluster) bootstrap interval.

    Empty when n_resamples is 0 (bootstrap switched off); (nan, nan) for an empty set."""
    if n_resamples < 1:
        return {}
    dist = bootstrap_distribution(y_true, y_pred, n_classes, n_resamples, seed, groups)
    return {m: percentile_interval(v, confidence) for m, v in dist.items()}


def bootstrap_settings(params: Params) -> dict[str, object]:
    """How the intervals are computed; stored beside them in every evaluate metrics.json."""
    c = params.compare
    return {"method": "percentile cluster bootstrap", "resamples": int(c.bootstrap),
            "confidence": float(c.confidence), "seed": int(c.seed),
            "unit": "cell (group of augmented copies)"}


def intervals(params: Params, y_true: np.ndarray, y_pred: np.ndarray, n_classes: int,
              groups: Sequence[str] | np.ndarray | None = None) -> dict[str, list[float]]:
    """metric -> [low, high] for one model on one evaluation set (params' bootstrap settings)."""
    c = params.compare
    ci = bootstrap_ci(y_true, y_pred, n_classes, c.bootstrap, c.confidence, c.seed, groups)
    return {m: [round(low, 6), round(high, 6)] for m, (low, high) in ci.items()}


def cell_outcomes(correct: Sequence[bool] | np.ndarray,
                  groups: Sequence[str] | np.ndarray) -> pd.Series:
    """group -> True when more than half of the group's images are right (bool, sorted by group)."""
    frame = pd.DataFrame({"group": np.asarray(groups, dtype=object),
                          "correct": np.asarray(correct, dtype=float)})
    return frame.groupby("group", sort=True)["correct"].mean() > 0.5


@dataclass(frozen=True)
class McNemar:
    n: int  # paired units (cells, or images when there are no groups)
    b: int  # first classifier right, second wrong
    c: int  # first wrong, second right
    statistic: float  # chi-square statistic (nan for the exact test)
    p_value: float
    method: str  # "exact" | "chi2-cc" | "none" (no discordant pair)


def mcnemar(correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray,
            exact_below: int = EXACT_BELOW) -> McNemar:
    """McNemar's test of two classifiers scored on the same units.

    correct_a[i], correct_b[i]: whether each classifier got unit i right. statsmodels'
    `mcnemar`: exact two-sided binomial test when b + c < exact_below, else chi-square with
    continuity correction, (|b - c| - 1)^2 / (b + c), 1 degree of freedom. No discordant pair:
    p = 1."""
    a, b_ = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b_.shape:
        raise ValueError(f"paired results must have one shape: {a.shape} vs {b_.shape}")
    b = int(np.sum(a & ~b_))
    c = int(np.sum(~a & b_))
    discordant = b + c
    if discordant == 0:
        return McNemar(len(a), b, c, float("nan"), 1.0, "none")
    table = [[int(np.sum(a & b_)), b], [c, int(np.sum(~a & ~b_))]]
    exact = discordant < exact_below
    result = sm_mcnemar(table, exact=exact, correction=True)
    return McNemar(len(a), b, c, float("nan") if exact else float(result.statistic),
                   float(min(1.0, result.pvalue)), "exact" if exact else "chi2-cc")


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values (statsmodels); NaN entries stay NaN and do
    not count towards the family size."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    valid = ~np.isnan(p)
    if valid.any():
        adjusted[valid] = multipletests(p[valid], method="holm")[1]
    return adjusted
