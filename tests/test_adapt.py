"""`wbc-transfer adapt`: a new lab's labelled cells -> wbc-classifier@lab-<name> with prediction
sets. Real PBC images (../shared/data/external/pbc), the tiny registered champion of
champion_helpers (EfficientNet-Lite0, 64 px), real MLflow registry, 1 + 1 epochs."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from champion_helpers import CLASSES, MODEL_NAME, MODEL_URI, register_tiny_champion
from mlflow import MlflowClient

from wbc_transfer import engine
from wbc_transfer.cli import main as cli
from wbc_transfer.data.sets import ImageSet
from wbc_transfer.evaluation import conformal
from wbc_transfer.serving import pyfunc
from wbc_transfer.serving.classifier import Classifier
from wbc_transfer.stages import adapt as stage
from wbc_transfer.training import adapt

from conftest import REPO_ROOT, terminate_when

PBC = (REPO_ROOT / ".." / "shared" / "data" / "external" / "pbc").resolve()
FAST = {"adapt.head_epochs": 1, "adapt.body_epochs": 1, "adapt.folds": 2, "adapt.batch_size": 4,
        "adapt.min_epoch_images": 8,
        "compare.bootstrap": 20, "adapt.labs": {}}


@pytest.fixture(scope="module")
def pbc() -> Path:
    if not PBC.is_dir():
        pytest.skip(f"{PBC} not found: the adapt tests need the PBC mirror")
    return PBC


def lab_folder(pbc: Path, dest: Path, per_class: dict[str, int]) -> Path:
    """dest/<CLASS>/ with the first n PBC images of each class (sorted, real JPEGs)."""
    for cls, n in per_class.items():
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for f in sorted((pbc / cls).glob("*.jpg"))[:n]:
            shutil.copyfile(f, dest / cls / f.name)
    return dest


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    return register_tiny_champion(tmp_path_factory.mktemp("champion"))


@pytest.fixture
def params_for(champion, make_params, mini_dataset, tmp_path):
    def make(**overrides):
        return make_params(mini_dataset, repo=tmp_path / "repo", **{
            "base.tracking_uri": champion.tracking_uri, **FAST, **overrides})
    return make


def versions(client: MlflowClient) -> list[str]:
    return sorted(v.version for v in client.search_model_versions(f"name = '{MODEL_NAME}'"))


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the cause, before any training


@pytest.mark.parametrize("counts, k, expected", [
    ({"EOSINOPHIL": 2, "LYMPHOCYTE": 4, "MONOCYTE": 4, "NEUTROPHIL": 4}, 2,
     "EOSINOPHIL has 2 images (2 cells)"),  # fewer than K + 1
    ({"EOSINOPHIL": 3, "LYMPHOCYTE": 3, "MONOCYTE": 3}, 2, "no images of class(es) ['NEUTROPHIL']"),
    ({"MONOCYTE": 5}, 2, "one class only (MONOCYTE)"),
    ({c: 2 for c in CLASSES}, 9, "--per-class 9 is larger than the folder"),
    ({c: 4 for c in CLASSES}, 1, "--per-class 1"),
])
def test_a_request_that_cannot_work_is_refused_naming_the_cause(pbc, tmp_path, counts, k, expected):
    folder = lab_folder(pbc, tmp_path / "lab", counts)
    index = adapt.index_lab(folder, "lab", CLASSES)
    with pytest.raises(adapt.AdaptInputError) as info:
        adapt.check_request(index, CLASSES, k, folder)
    assert expected in str(info.value)


def test_an_unknown_class_folder_an_empty_and_a_missing_folder_are_refused(pbc, tmp_path):
    folder = lab_folder(pbc, tmp_path / "lab", {c: 3 for c in CLASSES})
    shutil.copytree(folder / "MONOCYTE", folder / "BASOPHIL")
    with pytest.raises(adapt.AdaptInputError, match="BASOPHIL: unknown class folder"):
        adapt.index_lab(folder, "lab", CLASSES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(adapt.AdaptInputError, match="empty folder"):
        adapt.index_lab(tmp_path / "empty", "lab", CLASSES)
    with pytest.raises(adapt.AdaptInputError, match="no such folder"):
        adapt.index_lab(tmp_path / "nowhere", "lab", CLASSES)


def test_a_lab_name_whose_alias_is_taken_is_refused_before_anything_runs(
        pbc, tmp_path, champion, params_for):
    params = params_for()
    folder = lab_folder(pbc, tmp_path / "lab", {c: 3 for c in CLASSES})
    mlflow.set_tracking_uri(champion.tracking_uri)
    client = MlflowClient()
    client.set_registered_model_alias(MODEL_NAME, "lab-taken", champion.version)  # not an adapt
    before = versions(client)
    try:
        for replace in (False, True):
            with pytest.raises(adapt.AdaptInputError, match="lab-taken already names version"):
                stage.main(params, folder, "taken", 2, MODEL_URI, replace=replace)
    finally:
        client.delete_registered_model_alias(MODEL_NAME, "lab-taken")
    assert versions(client) == before
    assert not mlflow.search_runs(filter_string="tags.`adapt.lab` = 'taken'", search_all_experiments=True,
                                  output_format="list")


def test_the_command_line_names_what_is_missing(params_for, capsys, pbc, tmp_path) -> None:
    params = params_for()
    assert cli(["--params", str(params.root / "params.yaml"), "adapt", "--lab", "nolab"]) == 2
    assert "give FOLDER and --per-class K, or list the lab under adapt.labs" in capsys.readouterr().err
    folder = lab_folder(pbc, tmp_path / "lab", {"MONOCYTE": 3})
    assert cli(["--params", str(params.root / "params.yaml"), "adapt", str(folder), "--lab", "one",
                "--per-class", "2", "--model", MODEL_URI]) == 1
    assert "one class only (MONOCYTE)" in capsys.readouterr().err


def test_a_missing_or_empty_folder_is_named_before_the_model_and_no_champion_says_what_to_do(
        make_params, mini_dataset, tmp_path, capsys) -> None:
    """A fresh clone (no store, no champion): the folder was never checked (the registry's 'not
    found' came first); with a folder, the missing champion names `make repro`."""
    params = make_params(mini_dataset, repo=tmp_path / "fresh")
    args = ["--params", str(params.root / "params.yaml"), "adapt"]
    (tmp_path / "empty").mkdir()
    for folder, said in ((tmp_path / "nowhere", "no such folder"), (tmp_path / "empty", "empty folder")):
        assert cli([*args, str(folder), "--lab", "x", "--per-class", "2"]) == 1
        assert f"{folder}: {said}" in capsys.readouterr().err
    assert not (params.root / "mlflow.db").exists()  # refused before the store is opened
    assert cli([*args, str(mini_dataset), "--lab", "x", "--per-class", "2"]) == 1
    assert "make repro" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the split, the recipe's parts and the conformal sets


def test_the_split_takes_k_cells_per_class_by_group_and_by_seed() -> None:
    labels = torch.tensor([k for k in range(4) for _ in range(12)])
    groups = [f"c{k}-{i // 2}" for k in range(4) for i in range(12)]  # 6 cells of 2 images
    data = ImageSet(torch.zeros(48, 3, 4, 4, dtype=torch.uint8), labels,
                    [f"{i}.jpg" for i in range(48)], ["test"] * 48, list(CLASSES), groups)
    one, again, other = (adapt.split_lab(data, 2, s) for s in (1, 1, 2))
    assert one.splits == again.splits and one.splits != other.splits
    chosen = one.subset(adapt.ADAPT)
    assert np.bincount(chosen.labels.numpy()).tolist() == [4, 4, 4, 4]  # 2 cells x 2 images
    assert not set(chosen.groups) & set(one.subset(adapt.TEST).groups)
    assert adapt.split_lab(data, 0, 1).splits == ["test"] * 48


def test_adabn_reestimates_the_statistics_from_the_images_only() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.BatchNorm2d(2))
    images = torch.full((6, 3, 4, 4), 200, dtype=torch.uint8)
    before = model[1].running_mean.clone()
    adapt.adapt_batchnorm(model, images, [0.5] * 3, [0.5] * 3, torch.device("cpu"), 4)
    expected = model[0](torch.full((1, 3, 4, 4), (200 / 255 - 0.5) / 0.5)).mean((0, 2, 3))
    assert not torch.allclose(before, model[1].running_mean)
    torch.testing.assert_close(model[1].running_mean, expected.detach())
    assert not model.training


def test_last_blocks_take_the_trailing_share_of_the_weights() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 10), torch.nn.Linear(10, 4))
    chosen = {id(p) for p in adapt.last_blocks(model, model[2], 0.5)}
    assert chosen == {id(p) for p in model[1].parameters()}
    assert adapt.last_blocks(model, model[2], 0.0) == []


def test_fit_stops_when_before_epoch_says_so_and_reseeds_each_epoch() -> None:
    torch.manual_seed(0)
    data = ImageSet(torch.randint(0, 255, (8, 3, 8, 8), dtype=torch.uint8),
                    torch.tensor([0, 1] * 4), [str(i) for i in range(8)], ["train"] * 8, ["a", "b"])

    def run(stop_at: int) -> tuple[int, torch.Tensor]:
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 2))
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        ran = engine.fit(model, data, sgd, lambda x: x.float(), [0.5] * 3, [0.5] * 3,
                         torch.device("cpu"), 4, 5, seed=3, before_epoch=lambda e: e < stop_at)
        return ran, model[1].weight.detach().clone()

    (ran2, w2), (_, w2b), (ran5, w5) = run(2), run(2), run(9)
    assert (ran2, ran5) == (2, 5)
    torch.testing.assert_close(w2, w2b)
    assert not torch.allclose(w2, w5)


def test_conformal_sets_are_the_textbook_split_conformal_sets_and_cover_at_the_level() -> None:
    covered, classes = [], ["a", "b", "c", "d"]
    for seed in range(8):
        rng = np.random.default_rng(seed)
        logits = rng.normal(size=(2000, 4)) * 2
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        labels = np.array([rng.choice(4, p=p) for p in probs])  # calibrated: exchangeable
        entry = conformal.calibrate(probs[:500], labels[:500], "first 500", levels=(0.9,))
        sets = conformal.prediction_sets(probs[500:], entry, 0.9)
        # Angelopoulos & Bates (2021): q = the ceil((n + 1) 0.9)-th smallest score, set {1 - p <= q}
        q = np.sort(1 - probs[np.arange(500), labels[:500]])[int(np.ceil(501 * 0.9)) - 1]
        assert np.array_equal(sets, 1 - probs[500:] <= q)
        assert entry["quantiles"]["0.9"] == pytest.approx(q, abs=1e-6)
        assert (conformal.prediction_sets(probs[500:], entry, 0.5) <= sets).all()  # nested
        measured = conformal.coverage(sets, labels[500:], classes)
        assert set(measured["per_class"]) == set(classes)
        covered.append(measured["coverage"])
    assert 0.89 <= np.mean(covered) <= 0.92
    with pytest.raises(conformal.NoCalibrationError, match="no conformal calibration"):
        conformal.prediction_sets(probs[:5], None, 0.9)


# ---------------------------------------------------------------------------------------------
# end to end: adapt, register, predict with sets


@pytest.mark.slow
def test_adapt_registers_a_lab_version_that_predict_answers_with_sets(
        pbc, tmp_path, champion, params_for, capsys):
    params = params_for()
    folder = lab_folder(pbc, tmp_path / "pbc", {c: 6 for c in CLASSES})
    mlflow.set_tracking_uri(champion.tracking_uri)
    client = MlflowClient()
    champion_before = client.get_model_version_by_alias(MODEL_NAME, "champion").version
    # a base whose config has a preprocessing key this code does not know: it must travel
    base_config = {**champion.config, "view": "full"}
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("tests").experiment_id) as run:
        base = pyfunc.register_classifier(client, MODEL_NAME, run.info.run_id, champion.weights,
                                           base_config)
    client.set_registered_model_alias(MODEL_NAME, "viewbase", base.version)

    metrics = stage.main(params, folder, "pbc", 2, f"models:/{MODEL_NAME}@viewbase", seed=7)

    version = client.get_model_version_by_alias(MODEL_NAME, "lab-pbc")
    assert metrics["registered_version"] == str(version.version) != str(champion_before)
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == champion_before
    assert {k: version.tags[k] for k in ("adapt.lab", "adapt.per_class", "adapt.seed",
                                         "adapt.base_version")} == {
        "adapt.lab": "pbc", "adapt.per_class": "2", "adapt.seed": "7",
        "adapt.base_version": str(base.version)}
    assert len(version.tags["adapt.data_md5"]) == 32
    assert metrics["adapt_images"] == 8 and metrics["test_images"] == 16
    assert 0 <= metrics["selected_epoch"] <= 2 and "f1_macro_ci" in metrics  # 0: no fine-tuning
    assert 0 <= metrics["sets"]["coverage"] <= 1 and metrics["zero_shot"]["f1_macro"] >= 0
    # the run lists the images it learned from
    learned = pd.read_csv(client.download_artifacts(version.run_id, "images.csv", str(tmp_path)))
    assert (learned["split"] == "adapt").sum() == 8 and len(learned) == 24
    # the registered config: the base's whole config, calibrated anew, with the conformal scores
    config = mlflow.models.get_model_info(f"models:/{MODEL_NAME}@lab-pbc").metadata
    assert all(config[k] == v for k, v in base_config.items())  # "view" included
    assert config["conformal"]["n"] == 8 and len(config["conformal"]["scores"]) == 8

    out = tmp_path / "sets.csv"
    assert cli(["predict", str(folder / "MONOCYTE"), "--model", f"models:/{MODEL_NAME}@lab-pbc",
                "--tracking-uri", champion.tracking_uri, "--sets", "0.9", "-o", str(out),
                "-q"]) == 0
    rows = pd.read_csv(out, keep_default_na=False)
    assert "set" in rows.columns and len(rows) == 6
    assert all(set(filter(None, r.set.split("|"))) <= set(CLASSES) for r in rows.itertuples())
    jsonl = tmp_path / "sets.jsonl"
    assert cli(["predict", str(folder / "MONOCYTE"), "--model", f"models:/{MODEL_NAME}@lab-pbc",
                "--tracking-uri", champion.tracking_uri, "--sets", "0.9", "-o", str(jsonl),
                "-q"]) == 0
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [line["set"] for line in lines] == [list(filter(None, r.set.split("|")))
                                               for r in rows.itertuples()]

    # a second adapt of the same lab moves the alias only with --replace
    with pytest.raises(adapt.AdaptInputError, match="pass --replace"):
        stage.main(params, folder, "pbc", 2, MODEL_URI, seed=7)


def test_predict_sets_on_a_model_without_calibration_is_a_clear_error(
        champion, tmp_path, pbc, capsys):
    folder = lab_folder(pbc, tmp_path / "x", {"MONOCYTE": 1})
    code = cli(["predict", str(folder), "--model", MODEL_URI, "--tracking-uri",
                champion.tracking_uri, "--sets", "0.9", "-q"])
    assert code == 2
    assert "no conformal calibration" in capsys.readouterr().err


@pytest.mark.slow
def test_an_interrupted_adapt_leaves_the_registry_untouched(pbc, tmp_path, champion, params_for):
    params = params_for(**{"adapt.head_epochs": 30, "adapt.body_epochs": 30})
    folder = lab_folder(pbc, tmp_path / "lab", {c: 4 for c in CLASSES})
    mlflow.set_tracking_uri(champion.tracking_uri)
    client = MlflowClient()
    before = versions(client)
    proc = subprocess.Popen(
        [sys.executable, "-m", "wbc_transfer.cli", "--params", str(params.root / "params.yaml"),
         "adapt", str(folder), "--lab", "stopped", "--per-class", "2", "--model", MODEL_URI],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def running():
        return mlflow.search_runs(filter_string="tags.`adapt.lab` = 'stopped'",
                                  search_all_experiments=True, output_format="list")

    found, output = terminate_when(proc, running, "the adapt MLflow run")
    assert proc.returncode != 0, output
    assert versions(client) == before
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(MODEL_NAME, "lab-stopped")
    assert mlflow.get_run(found[0].info.run_id).info.status == "FAILED"


@pytest.mark.slow
def test_the_labelled_cells_keep_the_base_when_fine_tuning_only_hurts(pbc, tmp_path, champion,
                                                                      params_for) -> None:
    """Epoch 0 (the adapted statistics alone) is a cross-validation candidate. On cells
    labelled with what the base already predicts, fine-tuning at a destructive learning rate
    can only lose: the cross-validation keeps epoch 0, its out-of-fold logits are the base's.
    Before, epoch >= 1 was forced, whatever the labelled cells said of it."""
    params = params_for(**{"adapt.lr": 5.0, "adapt.head_lr_factor": 10.0})
    folder = lab_folder(pbc, tmp_path / "lab", {c: 12 for c in CLASSES})
    (tmp_path / "config.json").write_text(json.dumps(champion.config))
    base = Classifier.from_files(champion.weights, tmp_path / "config.json", "cpu")
    data = adapt.read_lab(folder, adapt.index_lab(folder, "lab", CLASSES), CLASSES,
                          base.preprocess)
    mean, std = base.config["mean"], base.config["std"]
    device = torch.device("cpu")
    torch.manual_seed(0)
    start = adapt.adapt_batchnorm(copy.deepcopy(base.model), data.images, mean, std, device, 16)
    predicted = engine.evaluate(start, data, mean, std, device).predictions
    counts = np.bincount(predicted, minlength=len(CLASSES))
    keep = np.flatnonzero(counts[predicted] >= 4)  # classes the base predicts >= 4 times
    assert len(set(predicted[keep].tolist())) >= 2, counts  # else one class: nothing to choose
    labelled = replace(data.take(keep), labels=torch.as_tensor(predicted[keep]))

    chosen, table, oof = adapt.choose_epoch(start, base.config["architecture"], labelled,
                                            adapt.recipe_params(params), params, 3, mean, std,
                                            device)
    scores = table.groupby("epoch")["val_f1_macro"].mean()
    assert list(scores.index) == [0, 1, 2]  # the unchanged model, then each fine-tuning epoch
    assert chosen == 0, scores
    assert scores[0] > scores[1:].max()
    expected = engine.predict(start, labelled.images, mean, std, device).numpy()
    np.testing.assert_allclose(oof, expected, rtol=1e-4, atol=1e-4)
