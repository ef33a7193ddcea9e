"""The compare stage on synthetic evaluation outputs, and the seed matrix of the DVC pipeline."""

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
from wbc_transfer.io import write_csv, write_json
from wbc_transfer.metrics import classification_metrics
from wbc_transfer.stages import compare
from wbc_transfer.stats import bootstrap_settings, intervals

REPO = Path(__file__).resolve().parent.parent
CLASSES = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]
ACCURACY = {"resnet50": 0.9, "alexnet": 0.4}  # roughly, per architecture
SIZES = {"paper_test": 40, "TEST": 80}
CI = re.compile(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]")


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
    return pd.DataFrame({"path": [f"{eval_set}/{i}.jpeg" for i in range(n)],
                         "group": [f"{eval_set}/cell-{i // 2}" for i in range(n)],  # 2 copies a cell
                         "actual": [CLASSES[i // 2 % len(CLASSES)] for i in range(n)],
                         "predicted": [CLASSES[i] for i in predicted]})


@pytest.fixture
def synthetic_study(tmp_path: Path):
    """params.yaml in tmp_path pointing at synthetic eval outputs: 2 archs x 2 seeds."""
    file = tmp_path / "params.yaml"
    file.write_text(yaml.safe_dump({
        "train": {"architectures": ["resnet50", "alexnet"], "protocols": ["paper"], "seeds": [1, 2]},
        "validate": {"report_dir": "out/data"},
        "evaluate": {"out_dir": "out/eval"},
        "compare": {"bootstrap": 200, "confidence": 0.95, "seed": 5, "out_dir": "out/compare",
                    "figures_dir": "out/compare_figures"},
    }))
    params = load_params(file)
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
                       "weights_source": "imagenet:test" if arch == "resnet50" else "random-init",
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

    # McNemar: one pair per (set, seed), Holm within the block, resnet50 beats alexnet
    pairs = pd.read_csv(out / "mcnemar.csv")
    assert len(pairs) == 4
    assert set(pairs["seed"]) == {1, 2}
    test_pairs = pairs[pairs["eval_set"] == "TEST"]
    assert test_pairs["significant"].all()
    assert (test_pairs["p_holm"] == test_pairs["p_value"]).all()  # one pair: Holm changes nothing
    matrix = pd.read_csv(out / "mcnemar_paper_TEST.csv").set_index("architecture")
    assert matrix.loc["resnet50", "alexnet"] == matrix.loc["alexnet", "resnet50"] < 0.05
    for name in ("mcnemar_paper_TEST.png", "mcnemar_paper_paper_test.png", "leakage_gap.png",
                 "bars_paper_TEST.png"):
        assert (params.resolve(params.compare.figures_dir) / name).stat().st_size > 1000

    # the leakage gap: paper_test vs TEST per model and seed, with the near-duplicate counts
    gap = pd.read_csv(out / "leakage_gap.csv")
    assert len(gap) == 2 * 2 * 4  # archs x seeds x metrics
    np.testing.assert_allclose(gap["gap"], gap["paper_test"] - gap["TEST"])
    assert set(gap["paper_test_images_with_cell_in_train"]) == {17}

    # the report states the ranking and the significant differences from the numbers
    report = (out / "report.md").read_text()
    assert "**resnet50** > alexnet: significant in 2 of 2 seeds" in report
    assert "**resnet50** is significantly more accurate than every other architecture" in report
    assert "17 of 40 `paper/paper_test` images (42.5%; 9 of 20 cells)" in report
    assert "n = 80 images, 40 cells" in report  # the effective n beside n
    assert "McNemar tests on the same cells" in report
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (out / link).is_file(), link


def test_one_seed_table_shows_value_and_interval(synthetic_study, tmp_path: Path):
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["train"]["seeds"] = [1]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tmp_path / "params.yaml")
    compare.main(params)
    table = (params.resolve(params.compare.out_dir) / "table2.md").read_text()
    assert "±" not in table.split("Brackets:")[0]
    rows = [line for line in table.splitlines() if line.startswith("| Accuracy |")]
    assert len(rows) == 2 and all(len(CI.findall(r)) == 2 for r in rows)  # 2 sets x 2 archs
