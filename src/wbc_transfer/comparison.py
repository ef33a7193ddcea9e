"""Collect evaluation results of every trained model into one long table, and the statistics
that say how far to trust it: cluster-bootstrap intervals, pairwise McNemar tests on cells, the
leakage gap."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from wbc_transfer import stats
from wbc_transfer.config import Params
from wbc_transfer.io import read_json
from wbc_transfer.metrics import SUMMARY_METRICS
from wbc_transfer.stages.train import model_name
from wbc_transfer.stats import bootstrap_settings, intervals

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
    holds intervals computed with the current bootstrap settings (else NaN)."""
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
            for metric in SUMMARY_METRICS:
                low, high = ci.get(metric, (np.nan, np.nan))
                rows.append({
                    "architecture": arch, "protocol": protocol, "seed": seed,
                    "eval_set": eval_set, "metric": metric, "value": scores[metric],
                    "ci_low": low, "ci_high": high,
                    "n": scores["n"], "n_cells": scores.get("n_cells", scores["n"]),
                    "cell_accuracy": scores.get("cell_accuracy", np.nan),
                    "weights_source": summary["weights_source"],
                    "recipe": summary.get("recipe", "paper"), "run_id": run_id,
                })
    return pd.DataFrame(rows)


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
    """Per (protocol, eval_set): architectures by mean accuracy across seeds (ties: macro-F1,
    then name), with rank 1 = best."""
    summary = seed_summary(long)
    wide = summary.pivot_table(index=["protocol", "eval_set", "architecture"], columns="metric",
                               values="mean", sort=False).reset_index()
    wide = wide.sort_values(["protocol", "eval_set", "accuracy", "f1_macro", "architecture"],
                            ascending=[True, True, False, False, True], kind="stable")
    wide["rank"] = wide.groupby(["protocol", "eval_set"]).cumcount() + 1
    return wide.reset_index(drop=True)


def cells_correct(pred: pd.DataFrame) -> pd.Series:
    """group -> whether the model got the cell right (more than half of its images), from the
    evaluate stage's predictions; each image its own cell when there is no group column."""
    groups = pred["group"] if "group" in pred else pred["path"]
    return stats.cell_outcomes((pred["actual"] == pred["predicted"]).to_numpy(), groups.to_numpy())


def pairwise_mcnemar(params: Params, long: pd.DataFrame) -> pd.DataFrame:
    """McNemar test for every pair of architectures on the same cells (per-cell outcomes: a cell
    is right when more than half of its images are), per (protocol, eval_set, seed) block,
    Holm-adjusted within the block. b: cells only arch_a got right, c: cells only arch_b got
    right; accuracy_a/b: per-cell accuracy; significant: p_holm < 1 - compare.confidence."""
    alpha = 1 - params.compare.confidence
    rows = []
    blocks = long[["protocol", "eval_set", "seed"]].drop_duplicates()
    for protocol, eval_set, seed in blocks.itertuples(index=False):
        archs = [a for a in params.train.architectures
                 if ((long["architecture"] == a) & (long["protocol"] == protocol)
                     & (long["eval_set"] == eval_set) & (long["seed"] == seed)).any()]
        correct = {}
        for arch in archs:
            correct[arch] = cells_correct(load_predictions(params, arch, protocol, seed, eval_set))
        block = []
        for a, b in combinations(archs, 2):
            paired = pd.concat([correct[a], correct[b]], axis=1, join="inner")
            test = stats.mcnemar(paired.iloc[:, 0].to_numpy(), paired.iloc[:, 1].to_numpy())
            block.append({
                "protocol": protocol, "eval_set": eval_set, "seed": seed,
                "arch_a": a, "arch_b": b, "n": test.n,
                "accuracy_a": float(paired.iloc[:, 0].mean()),
                "accuracy_b": float(paired.iloc[:, 1].mean()),
                "b": test.b, "c": test.c, "method": test.method,
                "statistic": test.statistic, "p_value": test.p_value,
            })
        adjusted = stats.holm([r["p_value"] for r in block])
        for r, p in zip(block, adjusted, strict=True):
            r["p_holm"] = float(p)
            r["significant"] = bool(p < alpha)
        rows += block
    columns = ["protocol", "eval_set", "seed", "arch_a", "arch_b", "n", "accuracy_a",
               "accuracy_b", "b", "c", "method", "statistic", "p_value", "p_holm", "significant"]
    return pd.DataFrame(rows, columns=columns)


def pvalue_matrix(pairs: pd.DataFrame, archs: list[str],
                  column: str = "p_holm") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(symmetric matrix of `column`, matrix of accuracy row minus column) for one block."""
    p = pd.DataFrame(np.nan, index=archs, columns=archs)
    diff = pd.DataFrame(0.0, index=archs, columns=archs)
    for r in pairs.itertuples(index=False):
        p.loc[r.arch_a, r.arch_b] = p.loc[r.arch_b, r.arch_a] = getattr(r, column)
        diff.loc[r.arch_a, r.arch_b] = r.accuracy_a - r.accuracy_b
        diff.loc[r.arch_b, r.arch_a] = r.accuracy_b - r.accuracy_a
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
