"""Issue 14: calibrated confidence (temperature scaling, ECE, Brier), review flags, Grad-CAM.

Synthetic logits for the arithmetic; a real tiny training + evaluation (EfficientNet-Lite0,
32 px, real mirror images, real MLflow) for the stages; real registered pyfuncs (SQLite store)
for the round trip of the temperature and for `predict --review-below / --explain`.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from champion_helpers import CLASSES, bad_and_odd_files, real_images, tiny_weights
from mlflow import MlflowClient
from PIL import Image

from wbc_transfer import tracking
from wbc_transfer.cli import main
from wbc_transfer.config import load_params
from wbc_transfer.data.sets import normalise
from wbc_transfer.evaluation import calibration, scoring, stats
from wbc_transfer.models import registry as models
from wbc_transfer.serving import pyfunc
from wbc_transfer.serving.loading import load_model
from wbc_transfer.stages import evaluate, train

from conftest import prepare_tiny, write_params

PROB_COLUMNS = [f"p_{c}" for c in CLASSES]


def overconfident_logits(n: int = 600, k: int = 4, seed: int = 0):
    """Logits of a classifier right ~70 % of the time but ~99 % sure: labels drawn from
    softmax(z), logits 5 z."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * 1.5
    p = calibration.softmax(z)
    labels = np.array([rng.choice(k, p=row) for row in p])
    return 5 * z, labels


# --- the arithmetic ----------------------------------------------------------------------------


def test_temperature_scaling_lowers_nll_and_ece_and_keeps_the_argmax():
    logits, labels = overconfident_logits()
    t = calibration.fit_temperature(logits, labels)
    assert 3.5 < t < 7  # the logits were inflated 5 x
    assert calibration.nll(logits, labels, t) < calibration.nll(logits, labels) - 0.3
    before, after = calibration.softmax(logits), calibration.softmax(logits, t)
    assert (before.argmax(1) == after.argmax(1)).all()
    assert calibration.ece(after, labels) < calibration.ece(before, labels) / 2
    assert calibration.brier(after, labels) < calibration.brier(before, labels)
    # a neighbouring temperature is worse: t is the minimum
    assert calibration.nll(logits, labels, t) <= min(calibration.nll(logits, labels, t * 1.1),
                                                     calibration.nll(logits, labels, t / 1.1))


def test_ece_reliability_table_and_brier_agree_with_hand_computed_values():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 0, 1])
    # bins (equal width, 15): 0.9 holds 2 images (acc 0.5), 0.6 one (acc 1), 0.7 one (acc 1)
    expected = (2 * abs(0.5 - 0.9) + abs(1 - 0.6) + abs(1 - 0.7)) / 4
    assert calibration.ece(probs, labels) == pytest.approx(expected, abs=1e-6)
    table = calibration.reliability_table(probs, labels)
    assert table["images"].sum() == 4 and len(table) == calibration.ECE_BINS
    full = table[table["images"] > 0]
    assert np.average(abs(full["accuracy"] - full["confidence"]), weights=full["images"]) == \
        pytest.approx(expected, abs=1e-6)
    onehot = np.eye(2)[labels]
    assert calibration.brier(probs, labels) == pytest.approx(((probs - onehot) ** 2).sum(1).mean())


def test_risk_coverage_and_the_review_threshold():
    confidence = np.array([0.95, 0.9, 0.9, 0.8, 0.6, 0.5])
    correct = np.array([True, True, True, False, True, False])
    groups = ["a", "a", "b", "c", "d", "d"]
    curve = calibration.risk_coverage(confidence, correct, groups)
    assert curve["threshold"].tolist() == [0.95, 0.9, 0.8, 0.6, 0.5]
    assert curve["kept"].tolist() == [1, 3, 4, 5, 6]
    assert curve["accuracy"].tolist() == pytest.approx([1, 1, 0.75, 0.8, 4 / 6])
    assert curve["kept_cells"].tolist() == [1, 2, 3, 4, 4]
    assert calibration.review_threshold(curve, 0.99) == 0.9
    assert calibration.review_threshold(curve, 0.78) == 0.6
    assert calibration.review_threshold(calibration.risk_coverage(confidence, ~correct), 0.99) \
        is None
    kept = calibration.coverage_at(confidence, correct, 0.9, groups)
    assert kept == {"coverage": 0.5, "accuracy": 1.0, "kept_images": 3, "kept_cells": 2}
    assert calibration.coverage_at(confidence, correct, None, groups)["kept_images"] == 0


@pytest.mark.parametrize("arch", sorted(models.REGISTRY))
def test_every_architecture_names_a_grad_cam_layer(arch):
    from wbc_transfer.evaluation.explain import grad_cam

    torch.manual_seed(0)
    model = models.build(arch, 4, "none", 64).model.eval()  # AlexNet needs 64 px
    x = torch.randn(2, 3, 64, 64)
    logits, cams = grad_cam(model, models.cam_layer(arch, model), x)
    with torch.inference_mode():
        assert torch.allclose(logits, model(x), atol=1e-4)
    assert cams.shape == (2, 64, 64) and float(cams.min()) >= 0 and float(cams.max()) <= 1


# --- the stages: train fits the temperature, evaluate reports calibration and galleries --------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mirror):
    """One tiny real training + evaluation of EfficientNet-Lite0 (paper protocol, 32 px)."""
    repo = tmp_path_factory.mktemp("repo")
    prepared = repo / "prepared"
    prepare_tiny(mirror, prepared, n_train=6, n_val=3, n_test=2, n_heldout_test=3)
    params = load_params(write_params(repo, "unused", **{
        "base.tracking_uri": f"sqlite:///{repo / 'mlflow.db'}",
        "prepare.out_dir": str(prepared), "split.out_dir": str(prepared / "splits"),
        "train.weights": "auto", "train.epochs": 1, "train.batch_size": 4,
        "train.num_threads": 1, "evaluate.max_per_class": None, "compare.bootstrap": 20,
        "evaluate.gallery_correct": 1, "train.architectures": ["efficientnet_lite0"],
        "train.protocols": ["paper"], "train.seeds": [1]}))
    info = train.main(params, arch="efficientnet_lite0", protocol="paper", seed=1)
    draws = []  # every cluster-bootstrap draw evaluate makes (stats.bootstrap_counts calls)
    original = stats.bootstrap_counts
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stats, "bootstrap_counts", lambda *a, **k: draws.append(a) or original(*a, **k))
        summary = evaluate.main(params, arch="efficientnet_lite0", protocol="paper", seed=1)
    summary["_bootstrap_draws"] = draws
    return params, info, summary


@pytest.mark.slow
def test_evaluate_draws_the_bootstrap_once_per_set(trained):
    """Issue 25: the summary and the per-class intervals come from ONE bootstrap per set (the
    same resamples), not two draws of the same numbers."""
    _, _, summary = trained
    sets = summary["sets"]
    assert len(summary["_bootstrap_draws"]) == len(sets) == 3
    for scores in sets.values():
        assert scores["ci"]["f1_macro"][0] <= scores["f1_macro"] <= scores["ci"]["f1_macro"][1]
        assert set(scores["per_class_ci"]) == set(CLASSES)


@pytest.mark.slow
def test_training_fits_the_temperature_on_validation_and_evaluate_applies_it(trained):
    params, info, summary = trained
    folder = params.resolve(params.train.out_dir) / "efficientnet_lite0-paper-1"
    run_json = json.loads((folder / "run.json").read_text())
    assert run_json["temperature"] == info["temperature"] > 0
    assert "validation cells (12 images" in run_json["temperature_fitted_on"]
    assert json.loads((folder / "metrics.json").read_text())["temperature"] == info["temperature"]
    assert summary["temperature"] == info["temperature"]
    for name in ("validation", "paper_test", "TEST"):
        cal = summary["sets"][name]["calibration"]
        assert cal["binning"] == "equal-width, 15 bins" and cal["temperature"] == info["temperature"]
        assert 0 <= cal["ece"] <= 1 and 0 <= cal["brier"] <= 2
        # the validation NLL is what the temperature minimised
        if name == "validation":
            assert cal["nll"] <= cal["nll_uncalibrated"] + 1e-9
        per_class_ci = summary["sets"][name]["per_class_ci"]
        assert set(per_class_ci) == set(CLASSES)
        for cls, cis in per_class_ci.items():
            for metric, (low, high) in cis.items():
                value = summary["sets"][name]["per_class"][cls][metric]
                assert low - 1e-9 <= value <= high + 1e-9, (name, cls, metric)
    review = summary["review"]
    assert review["chosen_on"] == "validation" and review["target_accuracy"] == 0.99
    assert set(review["sets"]) == {"validation", "paper_test", "TEST"}


@pytest.mark.slow
def test_evaluate_writes_calibration_figures_and_grad_cam_galleries_to_mlflow(trained):
    params, info, _ = trained
    out = params.resolve(params.evaluate.out_dir) / "efficientnet_lite0-paper-1" / "figures"
    for name in ("validation", "paper_test", "TEST"):
        for stem in ("reliability", "confusion_normalised", "per_class", "risk_coverage"):
            assert any(out.glob(f"{stem}_{name}.*")), (stem, name)
    galleries = sorted(p.name for p in out.glob("gradcam_*.png"))
    assert galleries == [f"gradcam_TEST_{c}.png" for c in CLASSES]  # TEST only (gallery_sets)
    client = MlflowClient(tracking.tracking_uri(params))
    logged = {f.path for f in client.list_artifacts(info["run_id"], "gradcam")}
    assert logged == {f"gradcam/{g}" for g in galleries}
    evaluation = {f.path for f in client.list_artifacts(info["run_id"], "evaluation")}
    assert "evaluation/reliability_TEST.png" in evaluation
    assert "evaluation/risk_coverage.png" in evaluation
    metrics = client.get_run(info["run_id"]).data.metrics
    assert "TEST_ece" in metrics and "TEST_ece_uncalibrated" in metrics
    assert f"TEST_{CLASSES[0]}_f1_ci_low" in metrics and "temperature" in metrics


@pytest.mark.slow
def test_the_report_links_calibration_review_and_per_class_results(trained):
    from wbc_transfer.reporting.trust_report import trust_markdown

    params, _, summary = trained
    report_dir = params.resolve(params.compare.out_dir)
    text = trust_markdown(params, report_dir)
    for set_name in ("validation", "paper_test", "TEST"):
        cal = summary["sets"][set_name]["calibration"]
        assert f"| efficientnet_lite0-paper-1 | `{set_name}` |" in text
        assert f"{cal['ece_uncalibrated']:.3f} → {cal['ece']:.3f}" in text
        for cls in CLASSES:
            assert f"| efficientnet_lite0-paper-1 | `{set_name}` | {cls} |" in text
    assert "(../eval/efficientnet_lite0-paper-1/figures/gradcam_TEST_MONOCYTE.png)" in text
    assert "(../eval/efficientnet_lite0-paper-1/figures/risk_coverage.png)" in text
    assert "[Grad-CAM monocyte]" in text


def test_gallery_shows_every_misclassified_cell_once_and_some_correct_ones():
    labels = np.array([0, 0, 0, 0, 0, 0, 1])
    predictions = np.array([0, 1, 0, 2, 2, 0, 1])
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.95, 0.5, 0.9])
    groups = ["a", "a", "b", "c", "c", "d", "e"]
    picks = scoring.gallery_picks(labels, predictions, confidence, groups, 0, n_correct=2)
    assert picks == [0, 2, 1, 4]  # correct: a, b (most confident each); wrong: a, c (one each)


# --- the registered pyfunc: temperature round trip, review flags, explanations ----------------


def register(folder: Path, arch: str, temperature: float) -> tuple[str, Path, dict]:
    """A random-init `arch` at 64 px (BatchNorm statistics from one noise batch), logged and
    registered with the real serving code under a fresh SQLite store; returns (store, weights,
    config)."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "model.pt"
    config = pyfunc.config_from_run_json(
        {**tiny_weights(weights, arch, head_std=0.5), "temperature": temperature})
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("t", artifact_location=(folder / "mlruns").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    client = MlflowClient()
    version = pyfunc.register_classifier(client, "wbc-classifier", run.info.run_id, weights,
                                          config)
    client.set_registered_model_alias("wbc-classifier", "champion", version.version)
    return uri, weights, config


@pytest.fixture(scope="module")
def calibrated_champion(tmp_path_factory):
    return register(tmp_path_factory.mktemp("calibrated"), "efficientnet_lite0", 2.5)


def test_the_temperature_round_trips_through_the_registered_model(calibrated_champion, mirror,
                                                                  tmp_path):
    uri, weights, config = calibrated_champion
    model = load_model("models:/wbc-classifier@champion", uri)
    assert float(model.metadata.metadata["temperature"]) == 2.5
    classifier = model.unwrap_python_model().classifier
    assert classifier.temperature == 2.5
    files = real_images(mirror, tmp_path / "cells", per_class=1)
    out = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    # the served probabilities are softmax(logits / 2.5) of the very network in model.pt
    net = models.build("efficientnet_lite0", 4, "none", 64).model
    net.load_state_dict(torch.load(weights, weights_only=True))
    images = torch.stack([classifier.preprocess(f.read_bytes())[0] for f in files])
    with torch.inference_mode():
        logits = net.eval()(normalise(images, config["mean"], config["std"])).numpy()
    expected = calibration.softmax(logits, 2.5)
    assert np.allclose(out[PROB_COLUMNS].to_numpy(dtype=float), expected, atol=1e-5)
    assert not np.allclose(expected, calibration.softmax(logits), atol=1e-3)


def run_predict(args, capsys):
    code = main(["predict", *map(str, args)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_review_below_flags_exactly_the_rows_under_the_threshold(calibrated_champion, mirror,
                                                                 tmp_path, capsys, fmt):
    uri = calibrated_champion[0]
    files = real_images(mirror, tmp_path / "cells", per_class=2)
    bad = bad_and_odd_files(files[0], tmp_path / "odd")["empty"]
    plain = run_predict([*files, "--tracking-uri", uri, "-q"], capsys)
    confidences = sorted(float(r["confidence"]) for r in csv.DictReader(io.StringIO(plain)))
    threshold = float(np.median(confidences))
    below = sum(c < threshold for c in confidences)
    assert 0 < below < len(confidences)
    out = run_predict([*files, bad, "--tracking-uri", uri, "-q", "--format", fmt,
                       "--review-below", threshold], capsys)
    rows = list(csv.DictReader(io.StringIO(out))) if fmt == "csv" else \
        [json.loads(line) for line in out.splitlines()]
    assert len(rows) == len(files) + 1
    for row in rows[:-1]:
        flagged = row["review"] in (True, "True")
        assert flagged == (float(row["confidence"]) < threshold), row
        assert row["predicted"] in CLASSES  # the class stays visible
    assert sum(r["review"] in (True, "True") for r in rows) == below
    assert rows[-1]["error"] and rows[-1]["review"] in (None, "")


def test_review_below_out_of_range_is_refused(calibrated_champion, mirror, tmp_path, capsys):
    files = real_images(mirror, tmp_path / "cells", per_class=1)
    code = main(["predict", str(files[0]), "--tracking-uri", calibrated_champion[0],
                 "--review-below", "1.5"])
    assert code == 2 and "--review-below must be between 0 and 1" in capsys.readouterr().err


def test_review_below_on_a_model_older_than_the_review_flag_is_refused(mirror, tmp_path, capsys,
                                                                      monkeypatch):
    """A format-2 model (registered before `review` existed) runs its own logged code, which
    dropped review_below silently: every row came back review=False (seen on the champion)."""
    monkeypatch.setattr(pyfunc, "FORMAT_VERSION", 2)
    uri = register(tmp_path / "old", "efficientnet_lite0", 1.0)[0]
    monkeypatch.undo()
    files = real_images(mirror, tmp_path / "cells", per_class=1)
    code = main(["predict", str(files[0]), "--tracking-uri", uri, "--review-below", "0.99"])
    err = capsys.readouterr().err
    assert code == 2 and "format-2 model" in err and "dvc repro promote" in err


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "googlenet"])
def test_explain_writes_one_overlay_per_classified_image(arch, mirror, tmp_path, capsys):
    uri = register(tmp_path / "store", arch, 1.7)[0]
    files = real_images(mirror, tmp_path / "cells", per_class=1)
    bad = bad_and_odd_files(files[0], tmp_path / "odd")
    inputs = [files[0], bad["truncated"], *files[1:], bad["text"]]
    plain = run_predict([*inputs, "--tracking-uri", uri, "-q"], capsys)
    explained = run_predict([*inputs, "--tracking-uri", uri, "-q", "--batch-size", "3",
                             "--explain", tmp_path / "maps"], capsys)
    rows = list(csv.DictReader(io.StringIO(explained)))
    written = sorted((tmp_path / "maps").glob("*.png"))
    assert len(written) == len(files) == sum(1 for r in rows if not r["error"])
    for row, before in zip(rows, csv.DictReader(io.StringIO(plain)), strict=True):
        if row["error"]:
            assert row["explanation"] == ""
            continue
        picture = Path(row["explanation"])
        assert picture in written and picture.stem.endswith(Path(row["path"]).stem)
        with Image.open(picture) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
        assert row["predicted"] == before["predicted"]  # same answers with or without maps
        for c in PROB_COLUMNS:
            assert float(row[c]) == pytest.approx(float(before[c]), abs=1e-5)
