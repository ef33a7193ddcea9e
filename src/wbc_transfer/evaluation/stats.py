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
- `cell_outcomes` / `balanced_cell_accuracy`: a cell is right when more than half of its images
  are; the class-balanced per-cell accuracy is the mean over classes of each class's share of
  right cells (so the class with the most cells does not dominate it).
- `chance_distribution`: what a predictor that never looks at the image scores on the same
  resamples: scikit-learn's `DummyClassifier` ("most_frequent": the set's majority class;
  "stratified": random labels in the set's class proportions, a fresh draw per resample).
- `paired_difference`: the paired cluster bootstrap of a metric difference between two models
  scored on the same cells: both models' bootstrap distributions come from the SAME resamples
  (same seed, same cells in the same order), so their difference per resample is the paired
  bootstrap; its percentile interval and the two-sided p-value of test inversion, the share of
  resamples on the far side of zero, twice ((k + 1) / (B + 1) convention; Davison & Hinkley
  1997, sec. 4.4).
- `holm`: Holm-Bonferroni adjusted p-values (statsmodels `multipletests(method="holm")`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.dummy import DummyClassifier
from sklearn.metrics import precision_recall_fscore_support
from statsmodels.stats.multitest import multipletests

from wbc_transfer.config import Params

CI_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro")
CHANCE_STRATEGIES = {"majority class": "most_frequent", "stratified random": "stratified"}
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
    the stratified cluster-bootstrap resamples (see the module docstring). y_pred: (n,), or
    (n_resamples, n) for predictions that differ per resample (a random chance predictor)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.ndim != 1 or y_pred.shape[-1:] != y_true.shape or y_pred.ndim > 2 or (
            y_pred.ndim == 2 and len(y_pred) != n_resamples):
        raise ValueError(f"y_true must be 1-D and y_pred (n,) or (n_resamples, n): "
                         f"{y_true.shape}, {y_pred.shape}")
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
        pred = np.broadcast_to(y_pred[start:start + b] if y_pred.ndim == 2 else y_pred, (b, n))
        offset = (np.arange(b, dtype=np.int64) * n_classes)[:, None]
        precision, recall, f1, _ = precision_recall_fscore_support(
            (y_true[None, :] + offset).ravel(), (pred + offset).ravel(),
            labels=np.arange(b * n_classes), average=None, zero_division=0,
            sample_weight=weights.ravel(),
        )
        yield ((weights * (y_true == pred)).sum(1) / weights.sum(1),
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


def set_intervals(params: Params, y_true: np.ndarray, y_pred: np.ndarray,
                  classes: Sequence[str], groups: Sequence[str] | np.ndarray | None = None,
                  ) -> tuple[dict[str, list[float]], dict[str, dict[str, list[float]]]]:
    """ONE pass of the cluster bootstrap (params' settings) for one model on one set:
    (metric -> [low, high] as `intervals`, class -> {precision, recall, f1} -> [low, high]).
    Both from the same resamples (cells drawn within their class); ({}, {}) when
    compare.bootstrap is 0; per-class {} for an empty set."""
    c = params.compare
    if c.bootstrap < 1:
        return {}, {}
    parts: dict[str, list[np.ndarray]] = {"accuracy": [np.empty(0)], "precision": [],
                                          "recall": [], "f1": []}
    for accuracy, precision, recall, f1 in _resampled_scores(y_true, y_pred, len(classes),
                                                             c.bootstrap, c.seed, groups):
        for name, value in zip(parts, (accuracy, precision, recall, f1), strict=True):
            parts[name].append(value)
    if not parts["f1"]:
        return _rounded(dict.fromkeys(CI_METRICS, np.empty(0)), c.confidence), {}
    stacked = {m: np.concatenate(v) for m, v in parts.items()}
    summary = {"accuracy": stacked["accuracy"],
               **{f"{m}_macro": stacked[m].mean(axis=1) for m in ("precision", "recall", "f1")}}
    per_class = {cls: _rounded({m: stacked[m][:, k] for m in ("precision", "recall", "f1")},
                               c.confidence)
                 for k, cls in enumerate(classes)}
    return _rounded(summary, c.confidence), per_class


def _rounded(dist: dict[str, np.ndarray], confidence: float) -> dict[str, list[float]]:
    return {m: [round(v, 6) for v in percentile_interval(values, confidence)]
            for m, values in dist.items()}


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
    if c.bootstrap < 1:
        return {}
    dist = bootstrap_distribution(y_true, y_pred, n_classes, c.bootstrap, c.seed, groups)
    return _rounded(dist, c.confidence)


def cell_outcomes(correct: Sequence[bool] | np.ndarray,
                  groups: Sequence[str] | np.ndarray) -> pd.Series:
    """group -> True when more than half of the group's images are right (bool, sorted by group)."""
    frame = pd.DataFrame({"group": np.asarray(groups, dtype=object),
                          "correct": np.asarray(correct, dtype=float)})
    return frame.groupby("group", sort=True)["correct"].mean() > 0.5


def balanced_cell_accuracy(correct: Sequence[bool] | np.ndarray,
                           groups: Sequence[str] | np.ndarray,
                           labels: Sequence[int] | Sequence[str] | np.ndarray) -> float:
    """Class-balanced per-cell accuracy: per class, the share of its cells that are right (a cell
    is right when more than half of its images are, `cell_outcomes`), averaged over the classes
    present. A cell's class is the label of its images (groups never span classes). NaN for an
    empty set."""
    if len(correct) == 0:
        return float("nan")
    right = cell_outcomes(correct, groups)
    label = pd.Series(np.asarray(labels, dtype=object), index=np.asarray(groups, dtype=object))
    label = label[~label.index.duplicated()]
    return float(right.groupby(label.reindex(right.index).to_numpy()).mean().mean())


def chance_predictions(y_true: Sequence[int] | np.ndarray, strategy: str, n_resamples: int = 1,
                       seed: int = 42) -> np.ndarray:
    """Predictions of a predictor that never looks at the image: scikit-learn
    `DummyClassifier(strategy)` fitted on this set's labels. "most_frequent": (n,), the set's
    majority class everywhere; "stratified": (n_resamples, n), labels drawn at random in the
    set's class proportions, a fresh draw per resample (seeded). Knowing the set's own
    proportions makes it the strongest chance predictor of its kind."""
    y_true = np.asarray(y_true, dtype=np.int64)
    n = len(y_true)
    dummy = DummyClassifier(strategy=strategy, random_state=seed).fit(np.zeros((n, 1)), y_true)
    if strategy == "stratified":
        return dummy.predict(np.zeros((n_resamples * n, 1))).reshape(n_resamples, n)
    return dummy.predict(np.zeros((n, 1)))


def chance_distribution(y_true: Sequence[int] | np.ndarray, n_classes: int, strategy: str,
                        n_resamples: int = 1000, seed: int = 42,
                        groups: Sequence[str] | np.ndarray | None = None,
                        ) -> dict[str, np.ndarray]:
    """metric -> its value on each cluster-bootstrap resample (the resamples of
    `bootstrap_distribution` with the same seed and groups) for `chance_predictions(strategy)`.
    Empty arrays for an empty set or no resamples."""
    if len(y_true) == 0 or n_resamples < 1:
        return {m: np.empty(0) for m in CI_METRICS}
    y_pred = chance_predictions(y_true, strategy, n_resamples, seed)
    return bootstrap_distribution(y_true, y_pred, n_classes, n_resamples, seed, groups)


@dataclass(frozen=True)
class PairedDifference:
    difference: float  # observed metric of a minus metric of b
    low: float  # percentile interval of the difference over the paired resamples
    high: float
    p_value: float  # two-sided, by test inversion; nan without resamples
    resamples: int


def paired_difference(observed_a: float, observed_b: float, dist_a: np.ndarray,
                      dist_b: np.ndarray, confidence: float = 0.95) -> PairedDifference:
    """Paired cluster bootstrap of a metric difference a - b (see the module docstring).

    dist_a, dist_b: (B,) the two models' metric on the SAME B resamples of the same cells.
    With k_le / k_ge the resamples whose difference is <= 0 / >= 0:
    p = min(1, 2 (min(k_le, k_ge) + 1) / (B + 1)), so the smallest p is 2 / (B + 1). ValueError
    when the two distributions differ in length."""
    if np.shape(dist_a) != np.shape(dist_b):
        raise ValueError(f"paired distributions must have one length: {np.shape(dist_a)} vs "
                         f"{np.shape(dist_b)}")
    d = np.asarray(dist_a, dtype=float) - np.asarray(dist_b, dtype=float)
    low, high = percentile_interval(d, confidence)
    if len(d) == 0:
        return PairedDifference(observed_a - observed_b, low, high, float("nan"), 0)
    far = min(int((d <= 0).sum()), int((d >= 0).sum()))
    p = min(1.0, 2 * (far + 1) / (len(d) + 1))
    return PairedDifference(float(observed_a - observed_b), low, high, p, len(d))


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values (statsmodels); NaN entries stay NaN and do
    not count towards the family size."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    valid = ~np.isnan(p)
    if valid.any():
        adjusted[valid] = multipletests(p[valid], method="holm")[1]
    return adjusted
