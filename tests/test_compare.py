"""The compare stage on synthetic evaluation outputs (ranking by macro-F1, chance baselines,
paired-bootstrap tests among pretrained models above chance), and the seed matrix of the DVC
pipeline."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from wbc_transfer.config import load_params
from wbc_transfer.evaluation.metrics import classification_metrics
from wbc_transfer.evaluation.stats import bootstrap_settings, intervals
from wbc_transfer.io import write_csv, write_json
from wbc_transfer.stages import compare

from conftest import write_params

REPO = Path(__file__).resolve().parent.parent
CLASSES = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]
ACCURACY = {"resnet50": 0.95, "googlenet": 0.7, "vgg16": 0.0, "alexnet": 0.4}  # roughly
# vgg16: pretrained but at chance (a uniformly random guess); alexnet: not pretrained
PRETRAINED = {"resnet50": True, "googlenet": True, "vgg16": True, "alexnet": False}
SIZES = {"paper_test": 40, "TEST": 80}
CI = re.compile(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]")


def study_params(folder: Path, architectures: list[str], protocols: list[str],
                 seeds: list[int]) -> Path:
    """folder/params.yaml (the project's, shrunk) for a study of synthetic outputs under out/."""
    return write_params(folder, "unused", **{
        "train.architectures": architectures, "train.protocols": protocols, "train.seeds": seeds,
        "validate.report_dir": "out/data", "evaluate.out_dir": "out/eval",
        "compare.bootstrap": 200, "compare.confidence": 0.95, "compare.seed": 5,
        "compare.out_dir": "out/compare", "compare.figures_dir": "out/compare_figures"})


def dvc_executable() -> str | None:
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.is_file() else shutil.which("dvc")


def test_seeds_expand_the_dvc_matrix(tmp_path: Path):
    dvc = dvc_executable()
    if dvc is None:
        pytest.skip("dvc not installed")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update(architectures=["alexnet", "vgg16"], protocols=["paper"], seeds=[1, 2])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copyfile(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    listed = subprocess.run([dvc, "stage", "list", "--name-only"], cwd=tmp_path, check=True,
                            capture_output=True, text=True).stdout.split()
    expected = {f"{stage}@{arch}-paper-{seed}" for stage in ("train", "evaluate")
                for arch in ("alexnet", "vgg16") for seed in (1, 2)}
    assert expected <= set(listed)
    assert not [s for s in listed if s.startswith("train@") and s not in expected]
    assert "compare" in listed


def synthetic_predictions(arch: str, seed: int, eval_set: str) -> pd.DataFrame:
    n = SIZES[eval_set]
    rng = np.random.default_rng(zlib.crc32(f"{arch}-{seed}-{eval_set}".encode()))
    actual = np.arange(n) // 2 % len(CLASSES)
    shift = 0.05 if eval_set == "paper_test" else 0.0  # the leaky set scores a little higher
    wrong = rng.random(n) > ACCURACY[arch] + shift
    predicted = np.where(wrong, (actual + 1 + rng.integers(0, 3, n)) % len(CLASSES), actual)
    if ACCURACY[arch] == 0:
        predicted = rng.integers(0, len(CLASSES), n)
    return pd.DataFrame({"path": [f"{eval_set}/{i}.jpeg" for i in range(n)],
                         "group": [f"{eval_set}/cell-{i // 2}" for i in range(n)],  # 2 copies a cell
                         "actual": [CLASSES[i // 2 % len(CLASSES)] for i in range(n)],
                         "predicted": [CLASSES[i] for i in predicted]})


@pytest.fixture
def synthetic_study(tmp_path: Path):
    """params.yaml in tmp_path pointing at synthetic eval outputs: 4 archs x 2 seeds."""
    params = load_params(study_params(tmp_path, list(ACCURACY), ["paper"], [1, 2]))
    for arch in ACCURACY:
        for seed in (1, 2):
            folder = tmp_path / "out" / "eval" / f"{arch}-paper-{seed}"
            sets = {}
            for eval_set in SIZES:
                pred = synthetic_predictions(arch, seed, eval_set)
                write_csv(folder / "predictions" / f"{eval_set}.csv", pred)
                code = {c: i for i, c in enumerate(CLASSES)}
                y_true, y_pred = pred["actual"].map(code), pred["predicted"].map(code)
                sets[eval_set] = classification_metrics(y_true, y_pred, CLASSES)
                sets[eval_set]["n_cells"] = SIZES[eval_set] // 2
                if seed == 1:  # seed 2 mimics outputs evaluated before intervals existed
                    sets[eval_set]["ci"] = intervals(params, y_true.to_numpy(),
                                                     y_pred.to_numpy(), len(CLASSES),
                                                     pred["group"].to_numpy())
            summary = {"model": f"{arch}-paper-{seed}", "run_id": f"run-{arch}-{seed}",
                       "architecture": arch, "protocol": "paper", "seed": seed,
                       "weights_source": "imagenet:test" if PRETRAINED[arch] else "random-init",
                       "sets": sets}
            if seed == 1:
                summary["bootstrap"] = bootstrap_settings(params)
            write_json(folder / "metrics.json", summary)
    write_json(tmp_path / "out" / "data" / "leakage.json", {
        "paper_test_vs_paper_train": {"images": 40, "cells": 20, "with_sibling": 17,
                                      "cells_shared": 9, "fraction": 0.425},
        "TEST_vs_all_TRAIN": {"images": 80, "cells": 40, "with_sibling": 0},
    })
    return params


def test_compare_reports_intervals_seeds_tests_and_leakage_gap(synthetic_study):
    params = synthetic_study
    out = params.resolve(params.compare.out_dir)
    long = compare.main(params)

    # intervals: read from metrics.json (seed 1) or recomputed from predictions (seed 2)
    assert long["ci_low"].notna().all() and long["ci_high"].notna().all()
    assert (long["ci_low"] <= long["value"] + 1e-9).all()
    assert (long["value"] <= long["ci_high"] + 1e-9).all()
    pred = pd.read_csv(params.resolve("out/eval/resnet50-paper-2/predictions/TEST.csv"))
    code = {c: i for i, c in enumerate(CLASSES)}
    expected = intervals(params, pred["actual"].map(code).to_numpy(),
                         pred["predicted"].map(code).to_numpy(), len(CLASSES),
                         pred["group"].to_numpy())
    row = long[(long["architecture"] == "resnet50") & (long["seed"] == 2)
               & (long["eval_set"] == "TEST") & (long["metric"] == "accuracy")].iloc[0]
    assert [row["ci_low"], row["ci_high"]] == expected["accuracy"]

    # mean ± sd across seeds beside the per-seed values with their intervals
    table = (out / "table2.md").read_text()
    acc = long[(long["architecture"] == "resnet50") & (long["eval_set"] == "TEST")
               & (long["metric"] == "accuracy")]["value"]
    assert f"{acc.mean():.3f} ± {acc.std():.3f}" in table
    assert "| Accuracy | mean ± sd |" in table
    assert re.search(r"\|  \| 1 \| " + CI.pattern, table)
    assert re.search(r"\|  \| 2 \| " + CI.pattern, table)

    # tests: only pretrained models above chance (vgg16 is at chance, alexnet not pretrained):
    # one pair per (set, seed), Holm within the block, resnet50 beats googlenet on macro-F1
    status = pd.read_csv(out / "status.csv")
    tested = status[status["eval_set"] == "TEST"].groupby("architecture")["tested"].all()
    assert tested.to_dict() == {"alexnet": False, "googlenet": True, "resnet50": True,
                                "vgg16": False}
    vgg = status[status["architecture"] == "vgg16"]
    assert not vgg["above_chance"].any() and (vgg["ci_low"] <= vgg["chance_level"]).all()
    pairs = pd.read_csv(out / "pairwise.csv")
    assert len(pairs) == 4 and set(pairs["seed"]) == {1, 2}
    assert set(zip(pairs["arch_a"], pairs["arch_b"], strict=True)) == {("resnet50", "googlenet")}
    test_pairs = pairs[pairs["eval_set"] == "TEST"]
    assert test_pairs["significant"].all() and (test_pairs["difference"] > 0).all()
    assert (test_pairs["p_holm"] == test_pairs["p_value"]).all()  # one pair: Holm changes nothing
    assert (test_pairs["p_value"] == 2 / (200 + 1)).all()  # no resample reverses the order
    matrix = pd.read_csv(out / "pairwise_paper_TEST.csv").set_index("architecture")
    assert matrix.loc["resnet50", "googlenet"] == matrix.loc["googlenet", "resnet50"] < 0.05
    for name in ("pairwise_paper_TEST.png", "pairwise_paper_paper_test.png", "leakage_gap.png",
                 "bars_paper_TEST.png"):
        assert (params.resolve(params.compare.figures_dir) / name).stat().st_size > 1000
    chance = pd.read_csv(out / "chance.csv")
    f1 = chance[(chance["metric"] == "f1_macro") & (chance["eval_set"] == "TEST")]
    assert set(f1["baseline"]) == {"majority class", "stratified random"}
    majority = f1[f1["baseline"] == "majority class"]["value"]
    assert majority.tolist() == pytest.approx([0.1, 0.1])  # balanced: F1 2*0.25/1.25 on 1 class of 4
    stratified = f1[f1["baseline"] == "stratified random"]
    assert (abs(stratified["value"] - 0.25) < 0.05).all()
    assert (stratified["ci_low"] < stratified["value"]).all()

    # the leakage gap: paper_test vs TEST per model and seed, with the near-duplicate counts
    gap = pd.read_csv(out / "leakage_gap.csv")
    assert len(gap) == 4 * 2 * 4  # archs x seeds x metrics
    np.testing.assert_allclose(gap["gap"], gap["paper_test"] - gap["TEST"])
    assert set(gap["paper_test_images_with_cell_in_train"]) == {17}

    # the report states the ranking (macro-F1) and the significant differences from the numbers
    report = (out / "report.md").read_text()
    assert "**resnet50** > googlenet: significant in 2 of 2 seeds" in report
    assert ("**resnet50** (macro-F1 " in report and "has a significantly higher macro-F1 than "
            "every other model above chance (1 of 1 pairwise differences significant); not "
            "distinguishable from chance: vgg16; not pretrained, not ranked: alexnet.") in report
    assert "17 of 40 `paper/paper_test` images (42.5%; 9 of 20 cells)" in report
    assert "n = 80 images, 40 cells" in report  # the effective n beside n
    assert "paired cluster bootstrap of the macro-F1 difference" in report
    assert "McNemar" not in report.replace("over McNemar's test", "").replace(
        "McNemar's binomial null", "")
    section = report.split("### Trained on `paper`, evaluated on `TEST`")[1].split("###")[0]
    ranked = re.findall(r"^\| (\d) \| (\w+) \|", section, re.M)
    assert ranked == [("1", "resnet50"), ("2", "googlenet"), ("3", "vgg16")]
    assert "| 3 | vgg16 |" in section and "no: not distinguishable from chance | not tested |" \
        in section
    assert "| — | chance: majority class | 0.100" in section
    assert "Not pretrained (weights unavailable)" in section and "| alexnet |" in section
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (out / link).is_file(), link

    # Table 2: the same order, chance columns, and alexnet in a table of its own
    block = table.split("evaluated on `TEST`")[1].split("## ")[0]
    header = next(line for line in block.splitlines() if line.startswith("| Metric |"))
    assert header == ("| Metric | Seed | resnet50 | googlenet | vgg16 | chance: majority class | "
                      "chance: stratified random |")
    assert "| Metric | Seed | alexnet |" in block


def test_one_seed_table_shows_value_and_interval(synthetic_study, tmp_path: Path):
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["train"]["seeds"] = [1]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tmp_path / "params.yaml")
    compare.main(params)
    table = (params.resolve(params.compare.out_dir) / "table2.md").read_text()
    assert "±" not in table.split("Brackets:")[0]
    rows = [line for line in table.splitlines() if line.startswith("| Accuracy |")]
    # per set: 3 pretrained archs + 2 chance baselines, then alexnet's table of its own
    assert [len(CI.findall(r)) for r in rows] == [5, 1, 5, 1]


def test_a_constant_majority_predictor_does_not_win_on_an_imbalanced_set(tmp_path: Path):
    """The tecom case: 60 % of the cells in one class. A pretrained model that calls every cell
    that class has the higher accuracy (0.60 vs ~0.55) but macro-F1 0.19: it ranks below the
    real model and is not distinguishable from chance, so it takes part in no claim."""
    n, rng = 200, np.random.default_rng(0)
    actual = np.where(np.arange(n) < 120, 3, np.arange(n) % 3)  # 120 NEUTROPHIL, 80 others
    real = np.where(rng.random(n) < 0.55, actual, (actual + 1) % 4)
    predictions = {"vgg16": np.full(n, 3), "resnet50": real}
    params = load_params(study_params(tmp_path, list(predictions), ["heldout"], [42]))
    for arch, predicted in predictions.items():
        folder = tmp_path / "out" / "eval" / f"{arch}-heldout-42"
        write_csv(folder / "predictions" / "TEST.csv", pd.DataFrame({
            "path": [f"{i}.jpeg" for i in range(n)], "group": [f"cell-{i}" for i in range(n)],
            "actual": [CLASSES[i] for i in actual], "predicted": [CLASSES[i] for i in predicted]}))
        scores = classification_metrics(actual, predicted, CLASSES)
        scores["ci"] = intervals(params, actual, predicted, len(CLASSES))
        write_json(folder / "metrics.json", {
            "model": f"{arch}-heldout-42", "run_id": arch, "architecture": arch,
            "protocol": "heldout", "seed": 42, "weights_source": "imagenet:test",
            "bootstrap": bootstrap_settings(params), "sets": {"TEST": scores}})
    long = compare.main(params)
    acc = long[long["metric"] == "accuracy"].set_index("architecture")["value"]
    assert acc["vgg16"] > acc["resnet50"]  # by accuracy the constant predictor would win
    report = (params.resolve(params.compare.out_dir) / "report.md").read_text()
    assert re.search(r"^\| 1 \| resnet50 \|", report, re.M)
    assert re.search(r"^\| 2 \| vgg16 \| 0\.188 \[.*\| no: not distinguishable from chance \|",
                     report, re.M)
    assert "significantly" not in report.split("## Summary")[1].split("## ")[0]
    assert pd.read_csv(params.resolve(params.compare.out_dir) / "pairwise.csv").empty
    # class-balanced per-cell accuracy: the constant predictor gets 1 of 4 classes right
    cell = long[long["metric"] == "accuracy"].set_index("architecture")["cell_accuracy"]
    assert cell["vgg16"] == pytest.approx(0.25)
