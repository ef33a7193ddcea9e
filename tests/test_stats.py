"""wbc_transfer.evaluation.stats: cluster-bootstrap intervals, per-cell outcomes, chance baselines, the paired
bootstrap test, Holm."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from wbc_transfer.config import Params, load_params
from wbc_transfer.evaluation import stats

from conftest import write_params


def params_with(folder: Path, **overrides) -> Params:
    """The project's params.yaml (shrunk, conftest.write_params) with `overrides`."""
    return load_params(write_params(folder, "unused", **overrides))


def noisy(n: int = 200, accuracy: float = 0.7, k: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, k, n)
    wrong = rng.random(n) > accuracy
    y_pred = np.where(wrong, (y_true + rng.integers(1, k, n)) % k, y_true)
    return y_true, y_pred


def test_perfect_classifier_interval_is_one_one():
    y = np.repeat(np.arange(4), 25)
    ci = stats.bootstrap_ci(y, y, 4, n_resamples=500, confidence=0.95, seed=1)
    assert set(ci) == set(stats.CI_METRICS)
    for low, high in ci.values():
        assert (low, high) == (1.0, 1.0)


def test_bootstrap_matches_sklearn_resample_by_resample():
    y_true, y_pred = noisy()
    dist = stats.bootstrap_distribution(y_true, y_pred, 4, n_resamples=30, seed=7)
    counts = stats.bootstrap_counts(len(y_true), 30, seed=7, strata=y_true)  # image = group
    for b in (0, 13, 29):
        index = np.repeat(np.arange(len(y_true)), counts[b])
        t, p = y_true[index], y_pred[index]
        precision, recall, f1, _ = precision_recall_fscore_support(
            t, p, labels=range(4), average="macro", zero_division=0)
        assert dist["accuracy"][b] == pytest.approx(accuracy_score(t, p))
        assert dist["precision_macro"][b] == pytest.approx(precision)
        assert dist["recall_macro"][b] == pytest.approx(recall)
        assert dist["f1_macro"][b] == pytest.approx(f1)


def test_bootstrap_interval_is_seeded_and_brackets_the_estimate():
    y_true, y_pred = noisy(n=300)
    a = stats.bootstrap_ci(y_true, y_pred, 4, 400, 0.95, seed=3)
    assert a == stats.bootstrap_ci(y_true, y_pred, 4, 400, 0.95, seed=3)
    assert a != stats.bootstrap_ci(y_true, y_pred, 4, 400, 0.95, seed=4)
    low, high = a["accuracy"]
    assert low < accuracy_score(y_true, y_pred) < high
    narrow = stats.bootstrap_ci(y_true, y_pred, 4, 400, 0.5, seed=3)["accuracy"]
    assert low <= narrow[0] <= narrow[1] <= high


def test_bootstrap_switched_off_and_empty_set():
    y_true, y_pred = noisy(n=20)
    assert stats.bootstrap_ci(y_true, y_pred, 4, n_resamples=0) == {}
    empty = stats.bootstrap_ci([], [], 4, n_resamples=10)
    assert all(math.isnan(v) for pair in empty.values() for v in pair)


def test_set_intervals_is_one_bootstrap_for_summary_and_per_class(monkeypatch, tmp_path: Path):
    y_true, y_pred = noisy(n=120)
    groups = np.arange(120) // 3
    y_true = np.repeat(y_true[::3], 3)  # 40 cells of 3 images, one class each
    params = params_with(tmp_path / "a", **{"compare.bootstrap": 300, "compare.confidence": 0.9,
                                             "compare.seed": 4})
    calls = []
    original = stats.bootstrap_counts
    monkeypatch.setattr(stats, "bootstrap_counts",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    summary, per_class = stats.set_intervals(params, y_true, y_pred, list("ABCD"), groups)
    assert len(calls) == 1
    assert summary == stats.intervals(params, y_true, y_pred, 4, groups)
    counts = original(40, 300, 4, strata=y_true[::3])
    f1_a = []
    for b in range(300):
        index = np.repeat(np.arange(120), counts[b][groups])
        f1_a.append(precision_recall_fscore_support(y_true[index], y_pred[index], labels=range(4),
                                                    zero_division=0)[2][0])
    assert per_class["A"]["f1"] == [round(v, 6) for v in stats.percentile_interval(
        np.array(f1_a), 0.9)]
    off = params_with(tmp_path / "b", **{"compare.bootstrap": 0})
    assert stats.set_intervals(off, y_true, y_pred, list("ABCD"), groups) == ({}, {})


def test_balanced_cell_accuracy_counts_each_class_once():
    # class 0: 3 cells, all right; class 1: 1 cell, wrong (2 images): plain per-cell 0.75
    correct = [1, 1, 1, 0, 0]
    groups = ["a", "b", "c", "d", "d"]
    labels = [0, 0, 0, 1, 1]
    assert stats.cell_outcomes(correct, groups).mean() == 0.75
    assert stats.balanced_cell_accuracy(correct, groups, labels) == 0.5
    assert math.isnan(stats.balanced_cell_accuracy([], [], []))


def test_chance_baselines_score_what_never_looks_at_the_image():
    y_true = np.array([3] * 60 + [0] * 20 + [1] * 10 + [2] * 10)
    majority = stats.chance_distribution(y_true, 4, "most_frequent", 50, seed=1)
    assert (majority["accuracy"] == 0.6).all()  # stratified resamples keep the class counts
    np.testing.assert_allclose(majority["f1_macro"], 2 * 0.6 / 1.6 / 4)
    stratified = stats.chance_distribution(y_true, 4, "stratified", 400, seed=1)
    assert abs(stratified["f1_macro"].mean() - 0.25) < 0.02  # E[F1_k] ~ p_k: mean 1/K
    assert stratified["f1_macro"].std() > 0.01  # a fresh draw per resample
    draws = stats.chance_predictions(y_true, "stratified", 3, seed=1)
    assert draws.shape == (3, 100) and not (draws[0] == draws[1]).all()
    assert stats.chance_distribution([], 4, "stratified", 10)["f1_macro"].size == 0


def test_paired_difference_pairs_resamples():
    a = np.array([0.8, 0.7, 0.9, 0.85])
    same = stats.paired_difference(0.8, 0.8, a, a)
    assert same.difference == 0 and same.p_value == 1.0  # every resample ties: both sides
    better = stats.paired_difference(0.8, 0.5, a, a - 0.3)
    assert better.p_value == pytest.approx(2 / 5) and better.low == pytest.approx(0.3)
    # unpaired spreads overlap, yet b is below a in every resample: the pairing detects it
    rng = np.random.default_rng(0)
    base = rng.normal(0.7, 0.1, 999)
    result = stats.paired_difference(0.70, 0.68, base, base - 0.02)
    assert result.p_value == pytest.approx(2 / 1000)
    with pytest.raises(ValueError, match="one length"):
        stats.paired_difference(0.5, 0.5, a, a[:3])


def test_holm_on_known_p_values():
    adjusted = stats.holm([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, 1*0.04 -> monotone max
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(stats.holm([0.5, 0.9]), [1.0, 1.0])  # capped at 1
    np.testing.assert_allclose(stats.holm([0.02]), [0.02])
    with_nan = stats.holm([0.01, float("nan"), 0.02])
    assert math.isnan(with_nan[1])
    np.testing.assert_allclose(with_nan[[0, 2]], [0.02, 0.02])
    assert len(stats.holm([])) == 0


def test_cluster_bootstrap_resamples_groups_not_their_copies():
    # 3 cells of one class, 100 identical copies each (2 right, 1 wrong): the 3-cell interval
    y_true = np.array([0, 0, 0])
    y_pred = np.array([0, 0, 3])
    copies_true, copies_pred = np.repeat(y_true, 100), np.repeat(y_pred, 100)
    groups = np.repeat(["a", "b", "c"], 100)
    clustered = stats.bootstrap_ci(copies_true, copies_pred, 4, 500, 0.95, seed=5, groups=groups)
    three = stats.bootstrap_ci(y_true, y_pred, 4, 500, 0.95, seed=5)
    assert clustered == three
    assert clustered["accuracy"] == (0.0, 1.0)  # three cells: anything from 0 to 3 right
    # the 300 copies taken as independent images give a far narrower (wrong) interval
    naive = stats.bootstrap_ci(copies_true, copies_pred, 4, 500, 0.95, seed=5)
    assert naive["accuracy"][1] - naive["accuracy"][0] < 0.15


def test_cluster_bootstrap_matches_sklearn_on_the_drawn_cells():
    y_true, y_pred = noisy(n=60)
    y_true = np.repeat(y_true[:15], 4)  # 15 cells of 4 images, one class each
    groups = np.arange(60) // 4
    dist = stats.bootstrap_distribution(y_true, y_pred, 4, n_resamples=10, seed=2, groups=groups)
    first = np.arange(0, 60, 4)
    counts = stats.bootstrap_counts(15, 10, seed=2, strata=y_true[first])
    for b in (0, 9):
        index = np.concatenate([np.repeat(np.flatnonzero(groups == g), counts[b, g]) for g in range(15)])
        f1 = precision_recall_fscore_support(y_true[index], y_pred[index], labels=range(4),
                                             average="macro", zero_division=0)[2]
        assert dist["f1_macro"][b] == pytest.approx(f1)
        assert dist["accuracy"][b] == pytest.approx(accuracy_score(y_true[index], y_pred[index]))


def test_a_cell_is_right_when_most_of_its_images_are():
    outcome = stats.cell_outcomes([1, 1, 0, 0, 0, 1, 1, 0, 0], list("aaabbcccc"))
    assert outcome.to_dict() == {"a": True, "b": False, "c": False}  # c: 2 of 4 is no majority


def test_cluster_bootstrap_keeps_every_class_in_every_resample():
    # one cell of class 3 among 9 of class 0: an unstratified draw often leaves it out
    y_true = np.array([0] * 9 + [3])
    dist = stats.bootstrap_distribution(y_true, y_true, 4, n_resamples=200, seed=1,
                                        groups=np.arange(10))
    assert (dist["recall_macro"] == 0.5).all()  # classes 0 and 3 present and right, 1 and 2 absent
