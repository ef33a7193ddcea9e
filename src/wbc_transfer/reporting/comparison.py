"""Collect evaluation results of every trained model into one long table, and the statistics
that say how far to trust it: cluster-bootstrap intervals, a chance baseline per evaluation set,
pairwise paired-bootstrap tests of macro-F1 among the pretrained models above chance, the
leakage gap.

Why a paired cluster bootstrap of the macro-F1 difference (and not McNemar on per-cell
correctness): the ranking is by macro-F1, so the test compares the very quantity ranked; it is
class-balanced by construction (on tecom, 176 of 299 cells are neutrophils: per-cell
correctness lets a constant "neutrophil" predictor beat a real model); it pairs by cell and
draws cells within their class exactly like the intervals beside it; and it needs no ad-hoc
class weights (McNemar's exact test counts discordant cells, and weighted counts break its
binomial null)."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from wbc_transfer.config import Params
from wbc_transfer.evaluation import stats
from wbc_transfer.evaluation.metrics import SUMMARY_METRICS, classification_metrics
from wbc_transfer.evaluation.stats import bootstrap_settings, intervals
from wbc_transfer.io import read_json
from wbc_transfer.models import registry as models
from wbc_transfer.training.trainer import model_name

BLOCK = ["protocol", "eval_set", "seed"]

# leakage.json (split stage) entries that describe each (protocol, evaluation set)
LEAKAGE_KEYS = {("paper", "paper_test"): "paper_test_vs_paper_train",
                ("paper_grouped", "paper_test"): "paper_grouped_test_vs_paper_grouped_train",
                ("heldout", "TEST"): "heldout_test_vs_heldout_train",
                ("any", "validation"): "heldout_val_vs_heldout_train"}


def expected_models(params: Params) -> list[tuple[str, str, int]]:
    t = params.train
    return [(a, p, s) for a in t.architectures for p in t.protocols for s in t.seeds]


def eval_folder(params: Params, arch: str, protocol: str, seed: int) -> Path:
    return params.resolve(params.evaluate.out_dir) / model_name(arch, protocol, seed)


def collect(params: Params) -> pd.DataFrame:
    """One row per (model, evaluation set, metric); ci_low/ci_high from metrics.json when it
    holds intervals computed with the current bootstrap settings (else NaN); cell_accuracy:
    class-balanced per-cell accuracy (`stats.balanced_cell_accuracy`) from the saved
    predictions (metrics.json's value when there are none); pretrained: whether the model
    started from ImageNet weights (`models.is_pretrained`)."""
    rows = []
    settings = bootstrap_settings(params)
    for arch, protocol, seed in expected_models(params):
        file = eval_folder(params, arch, protocol, seed) / "metrics.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file} missing: run `dvc repro` (evaluate stages) first")
        summary = read_json(file)
        run_file = file.with_name("run.json")  # the MLflow run id (older outputs: metrics.json)
        run_id = read_json(run_file)["run_id"] if run_file.is_file() else summary.get("run_id")
        current = summary.get("bootstrap") == settings
        for eval_set, scores in summary["sets"].items():
            ci = scores.get("ci", {}) if current else {}
            cell_accuracy = _balanced_cell_accuracy(params, arch, protocol, seed, eval_set,
                                                    scores.get("cell_accuracy", np.nan))
            for metric in SUMMARY_METRICS:
                low, high = ci.get(metric, (np.nan, np.nan))
                rows.append({
                    "architecture": arch, "protocol": protocol, "seed": seed,
                    "eval_set": eval_set, "metric": metric, "value": scores[metric],
                    "ci_low": low, "ci_high": high,
                    "n": scores["n"], "n_cells": scores.get("n_cells", scores["n"]),
                    "cell_accuracy": cell_accuracy,
                    "weights_source": summary["weights_source"],
                    "pretrained": models.is_pretrained(summary["weights_source"]),
                    "recipe": summary.get("recipe", "paper"), "run_id": run_id,
                    "view": summary.get("view", "full"),
                })
    return pd.DataFrame(rows)


def _balanced_cell_accuracy(params: Params, arch: str, protocol: str, seed: int, eval_set: str,
                            fallback: float) -> float:
    file = eval_folder(params, arch, protocol, seed) / "predictions" / f"{eval_set}.csv"
    if not file.is_file():
        return fallback
    pred = pd.read_csv(file)
    groups = pred["group"] if "group" in pred else pred["path"]
    return stats.balanced_cell_accuracy((pred["actual"] == pred["predicted"]).to_numpy(),
                                        groups.to_numpy(), pred["actual"].to_numpy())


def load_predictions(params: Params, arch: str, protocol: str, seed: int,
                     eval_set: str) -> pd.DataFrame:
    """The evaluate stage's per-image predictions (path, actual, predicted, p_<class>...)."""
    file = eval_folder(params, arch, protocol, seed) / "predictions" / f"{eval_set}.csv"
    if not file.is_file():
        raise FileNotFoundError(f"{file} missing: rerun the evaluate stage of this model")
    return pd.read_csv(file)


def fill_missing_ci(params: Params, long: pd.DataFrame) -> pd.DataFrame:
    """Compute intervals from the saved predictions where metrics.json has none (evaluated
    before intervals existed, or with other bootstrap settings): same function, same seed."""
    if params.compare.bootstrap < 1 or not long["ci_low"].isna().any():
        return long
    long = long.copy()
    missing = long[long["ci_low"].isna()]
    for (arch, protocol, seed, eval_set), _ in missing.groupby(
            ["architecture", "protocol", "seed", "eval_set"], sort=False):
        summary = read_json(eval_folder(params, arch, protocol, seed) / "metrics.json")
        classes = list(summary["sets"][eval_set]["per_class"])
        code = {c: i for i, c in enumerate(classes)}
        pred = load_predictions(params, arch, protocol, seed, eval_set)
        ci = intervals(params, pred["actual"].map(code).to_numpy(),
                       pred["predicted"].map(code).to_numpy(), len(classes),
                       pred["group"].to_numpy() if "group" in pred else None)
        for metric, (low, high) in ci.items():
            where = ((long["architecture"] == arch) & (long["protocol"] == protocol)
                     & (long["seed"] == seed) & (long["eval_set"] == eval_set)
                     & (long["metric"] == metric))
            long.loc[where, ["ci_low", "ci_high"]] = [low, high]
    return long


def seed_summary(long: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample standard deviation (ddof=1; NaN for one seed) across seeds."""
    keys = ["protocol", "eval_set", "architecture", "metric"]
    grouped = long.groupby(keys, sort=False)["value"]
    return grouped.agg(mean="mean", sd="std", seeds="count").reset_index()


def ranking(long: pd.DataFrame) -> pd.DataFrame:
    """Per (protocol, eval_set): the PRETRAINED architectures by mean macro-F1 across seeds
    (ties: accuracy, then name), rank 1 = best. Models that did not start from ImageNet weights
    are left out (the report lists them apart)."""
    summary = seed_summary(long[long["pretrained"]])
    wide = summary.pivot_table(index=["protocol", "eval_set", "architecture"], columns="metric",
                               values="mean", sort=False).reset_index()
    if wide.empty:
        return wide.assign(rank=pd.Series(dtype=int))
    wide = wide.sort_values(["protocol", "eval_set", "f1_macro", "accuracy", "architecture"],
                            ascending=[True, True, False, False, True], kind="stable")
    wide["rank"] = wide.groupby(["protocol", "eval_set"]).cumcount() + 1
    return wide.reset_index(drop=True)


def _aligned(params: Params, archs: list[str], protocol: str, seed: int, eval_set: str,
             ) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Each model's predictions on the cells every model of the block has, in the first
    model's order (the order evaluate scored and bootstrapped them in), and the class names."""
    preds = {a: load_predictions(params, a, protocol, seed, eval_set) for a in archs}
    common = set.intersection(*(set(p["path"]) for p in preds.values()))
    reference = preds[archs[0]]
    order = reference.loc[reference["path"].isin(common), "path"]
    summary = read_json(eval_folder(params, archs[0], protocol, seed) / "metrics.json")
    classes = list(summary["sets"][eval_set]["per_class"])
    return {a: p.set_index("path").loc[order].reset_index() for a, p in preds.items()}, classes


def _codes(pred: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    code = {c: i for i, c in enumerate(classes)}
    groups = pred["group"] if "group" in pred else pred["path"]
    return (pred["actual"].map(code).to_numpy(), pred["predicted"].map(code).to_numpy(),
            groups.to_numpy())


def significance(params: Params, long: pd.DataFrame,
                 ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per (protocol, eval_set, seed) block: (chance, status, pairs).

    chance: one row per chance predictor (`stats.CHANCE_STRATEGIES`) and metric: value and
    cluster-bootstrap interval on the block's cells (majority class: its score on the set;
    stratified random: the mean over the resamples, each a fresh draw). status: per model,
    its macro-F1 interval, the chance level (the highest upper interval end of the chance
    predictors' macro-F1), `above_chance` (lower end above that level), `pretrained`, and
    `tested` (both). pairs: paired cluster bootstrap of the macro-F1 difference for every pair
    of tested models (same resamples for both), Holm-adjusted within the block; significant:
    p_holm < 1 - compare.confidence. Without resamples (compare.bootstrap 0) nothing is
    above chance and nothing is tested."""
    c = params.compare
    alpha = 1 - c.confidence
    chance_rows, status_rows, pair_rows = [], [], []
    f1 = long[long["metric"] == "f1_macro"]
    for (protocol, eval_set, seed), block in f1.groupby(BLOCK, sort=False):
        archs = [a for a in params.train.architectures if a in set(block["architecture"])]
        preds, classes = _aligned(params, archs, protocol, seed, eval_set)
        y_true, _, groups = _codes(preds[archs[0]], classes)
        key = {"protocol": protocol, "eval_set": eval_set, "seed": seed}
        level = -np.inf
        for name, strategy in stats.CHANCE_STRATEGIES.items():
            dist = stats.chance_distribution(y_true, len(classes), strategy, c.bootstrap, c.seed,
                                             groups)
            for metric, values in dist.items():
                value = (float(values.mean()) if len(values) else np.nan) \
                    if strategy == "stratified" else _majority_score(y_true, classes, metric)
                low, high = stats.percentile_interval(values, c.confidence)
                chance_rows.append({**key, "baseline": name, "metric": metric, "value": value,
                                    "ci_low": low, "ci_high": high, "n": len(y_true),
                                    "n_cells": len(set(groups))})
                if metric == "f1_macro":
                    level = max(level, high if len(values) else value)
        dists = {}
        for arch in archs:
            row = block[block["architecture"] == arch].iloc[0]
            above = bool(len(y_true) and c.bootstrap > 0 and row["ci_low"] > level)
            tested = above and bool(row["pretrained"])
            status_rows.append({**key, "architecture": arch, "pretrained": bool(row["pretrained"]),
                                "f1_macro": row["value"], "ci_low": row["ci_low"],
                                "ci_high": row["ci_high"], "chance_level": level,
                                "above_chance": above, "tested": tested})
            if tested:
                _, y_pred, _ = _codes(preds[arch], classes)
                dists[arch] = (row["value"], stats.bootstrap_distribution(
                    y_true, y_pred, len(classes), c.bootstrap, c.seed, groups)["f1_macro"])
        block_pairs = []
        for a, b in combinations(dists, 2):
            d = stats.paired_difference(dists[a][0], dists[b][0], dists[a][1], dists[b][1],
                                        c.confidence)
            block_pairs.append({**key, "arch_a": a, "arch_b": b, "n_cells": len(set(groups)),
                                "f1_a": dists[a][0], "f1_b": dists[b][0],
                                "difference": d.difference, "diff_ci_low": d.low,
                                "diff_ci_high": d.high, "resamples": d.resamples,
                                "p_value": d.p_value})
        for r, p in zip(block_pairs, stats.holm([r["p_value"] for r in block_pairs]), strict=True):
            r.update(p_holm=float(p), significant=bool(p < alpha))
        pair_rows += block_pairs
    pair_columns = [*BLOCK, "arch_a", "arch_b", "n_cells", "f1_a", "f1_b", "difference",
                    "diff_ci_low", "diff_ci_high", "resamples", "p_value", "p_holm", "significant"]
    return (pd.DataFrame(chance_rows), pd.DataFrame(status_rows),
            pd.DataFrame(pair_rows, columns=pair_columns))


def _majority_score(y_true: np.ndarray, classes: list[str], metric: str) -> float:
    """`metric` of always predicting the set's most frequent class, on the set itself."""
    if not len(y_true):
        return float("nan")
    majority = stats.chance_predictions(y_true, "most_frequent")
    return float(classification_metrics(y_true, majority, classes)[metric])


def pvalue_matrix(pairs: pd.DataFrame, archs: list[str],
                  column: str = "p_holm") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(symmetric matrix of `column`, matrix of macro-F1 row minus column) for one block."""
    p = pd.DataFrame(np.nan, index=archs, columns=archs)
    diff = pd.DataFrame(0.0, index=archs, columns=archs)
    for r in pairs.itertuples(index=False):
        p.loc[r.arch_a, r.arch_b] = p.loc[r.arch_b, r.arch_a] = getattr(r, column)
        diff.loc[r.arch_a, r.arch_b] = r.difference
        diff.loc[r.arch_b, r.arch_a] = -r.difference
    return p, diff


def leakage_counts(params: Params) -> dict[str, dict[str, object]]:
    """'<protocol>/<eval_set>' -> leakage by cells from the split stage's leakage.json ({} if
    absent): images (and cells) of the set whose cell is in that protocol's training split."""
    file = params.resolve(params.validate.report_dir) / "leakage.json"
    if not file.is_file():
        return {}
    report = read_json(file)
    return {f"{protocol}/{s}": {**report[key], "compared_with": key.split("_vs_", 1)[1]}
            for (protocol, s), key in LEAKAGE_KEYS.items() if key in report}


def leakage_gap(long: pd.DataFrame, counts: dict[str, dict[str, object]]) -> pd.DataFrame:
    """Per paper-protocol model and metric: paper_test (leaky) vs TEST (leak-free) and the gap
    paper_test - TEST, with both intervals and the near-duplicate counts of both sets."""
    paper = long[(long["protocol"] == "paper") & long["eval_set"].isin(["paper_test", "TEST"])]
    if paper.empty or paper["eval_set"].nunique() < 2:
        return pd.DataFrame()
    wide = paper.pivot_table(index=["architecture", "seed", "metric"], columns="eval_set",
                             values=["value", "ci_low", "ci_high"], sort=False, dropna=False)
    wide.columns = [f"{s}_{v}" if v != "value" else s for v, s in wide.columns]
    wide = wide.reset_index()
    wide["gap"] = wide["paper_test"] - wide["TEST"]
    info = counts.get("paper/paper_test", {})
    wide["paper_test_images_with_cell_in_train"] = info.get("with_sibling", np.nan)
    wide["paper_test_images"] = info.get("images", np.nan)
    order = ["architecture", "seed", "metric", "paper_test", "TEST", "gap",
             "paper_test_ci_low", "paper_test_ci_high", "TEST_ci_low", "TEST_ci_high",
             "paper_test_images_with_cell_in_train", "paper_test_images"]
    return wide[[c for c in order if c in wide.columns]]
