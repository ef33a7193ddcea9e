"""External test sets (params `external`, stage external@<name>) through the real pipeline, and
the stain-normalisation layer giving the same answers in evaluate, predict and the served pyfunc.

The external folder is made from real shared images (PNG copies in <CLASS>/ folders, one
enlarged to a smear-field size) plus one truncated file; the model is a tiny EfficientNet-Lite0
(random init, 32 px, 1 epoch) trained with `train.stain_norm: lab` and frozen BatchNorm.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from PIL import Image

from wbc_transfer.config import Params, load_params
from wbc_transfer.data.validation import DataValidationError
from wbc_transfer.io import read_json
from wbc_transfer.serving import classifier, pyfunc
from wbc_transfer.serving.inputs import collect
from wbc_transfer.serving.loading import load_model
from wbc_transfer.serving.predict import predict_items
from wbc_transfer.stages import compare, evaluate, external, train

from conftest import CLASSES, REPO_ROOT, class_files, prepare_tiny, spread, write_params

ARCH = "efficientnet_lite0"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> Path:
    """Another lab's folder: 3 PNGs per class from TEST (one NEUTROPHIL enlarged to 700 x 525,
    a whole-field size) and one truncated PNG (a bad file)."""
    root = tmp_path_factory.mktemp("lab") / "mylab"
    for cls in CLASSES:
        (root / cls).mkdir(parents=True)
        for i, file in enumerate(spread(class_files(mirror, "TEST", cls), 3, offset=1)):
            image = Image.open(file).convert("RGB")
            if cls == "NEUTROPHIL" and i == 0:
                image = image.resize((700, 525))
            image.save(root / cls / f"{file.stem}.png")
    good = next((root / "EOSINOPHIL").iterdir()).read_bytes()
    (root / "MONOCYTE" / "broken.png").write_bytes(good[: len(good) // 3])
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare_tiny(mirror, out, n_train=5, n_val=2, n_test=2, n_heldout_test=2)
    return out


def lab_params(repo: Path, prepared: Path, lab: Path, **overrides) -> Params:
    settings = {
        "base.tracking_uri": f"sqlite:///{repo / 'mlflow.db'}",
        "prepare.out_dir": str(prepared), "split.out_dir": str(prepared / "splits"),
        "prepare.image_size": 32, "train.weights": "none", "train.epochs": 1,
        "train.batch_size": 4, "train.num_threads": 1, "evaluate.max_per_class": None,
        "train.architectures": [ARCH], "train.protocols": ["paper"],
        "train.stain_norm": "lab", "train.norm_layer": "frozen",
        "compare.bootstrap": 20, "external": {"mylab": {"root": str(lab)}},
        "prepare.view": "full",  # as conftest.prepare_tiny made the Kaggle sets
    }
    settings.update(overrides)
    return load_params(write_params(repo, "unused", **settings))


def test_strict_policy_stops_on_the_bad_file_of_an_external_set(tmp_path, prepared, lab):
    params = lab_params(tmp_path, prepared, lab)
    with pytest.raises(DataValidationError, match="broken.png"):
        external.main(params, "mylab")
    problems = pd.read_csv(tmp_path / "results/data/external/mylab/problems.csv")
    assert list(problems["path"]) == ["MONOCYTE/broken.png"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, prepared: Path, lab: Path) -> Params:
    """external (lenient) -> train (stain_norm lab, frozen BN) -> evaluate -> compare."""
    repo = tmp_path_factory.mktemp("repo")
    params = lab_params(repo, prepared, lab, **{"validate.policy": "lenient"})
    external.main(params, "mylab")
    train.main(params, ARCH, "paper", 42)
    evaluate.main(params, ARCH, "paper", 42)
    compare.main(params)
    return params


def test_external_set_is_validated_scored_and_in_table2(pipeline: Params):
    root = pipeline.root
    report = read_json(root / "results/data/external/mylab/report.json")
    assert report["usable_images"] == 12 and report["problems"] == 1
    assert report["cells"] == 12 and report["cells_from"] == "one cell per image"
    assert report["large_images"] == 1
    index = pd.read_csv(root / "data/prepared_external/mylab.csv", keep_default_na=False)
    large = index[index["note"].str.contains("large image")]
    assert list(large["width"]) == [700] and "smear field" in large["note"].iloc[0]

    metrics = read_json(root / f"results/eval/{ARCH}-paper-42/metrics.json")
    scores = metrics["sets"]["mylab"]
    assert scores["n"] == 12 and scores["n_cells"] == 12
    assert set(scores["ci"]) >= {"f1_macro", "accuracy"}
    table = (root / "results/compare/table2.md").read_text()
    assert "evaluated on `mylab`" in table
    text = (root / "results/compare/report.md").read_text()
    assert "## Another lab's cells: external test sets" in text
    assert "Drop `TEST` → `mylab`" in text and "chose nothing" in text
    mlflow.set_tracking_uri(pipeline.base.tracking_uri)
    run = mlflow.get_run(read_json(root / f"results/eval/{ARCH}-paper-42/run.json")["run_id"])
    assert "mylab_f1_macro" in run.data.metrics and "mylab_f1_macro_ci_low" in run.data.metrics


def test_stain_normalisation_is_the_same_in_evaluate_predict_and_the_pyfunc(pipeline: Params,
                                                                             lab: Path):
    root = pipeline.root
    folder = root / f"results/train/{ARCH}-paper-42"
    info = read_json(folder / "run.json")
    assert info["stain_norm"] == "lab" and info["norm_layer"] == "frozen"
    evaluated = pd.read_csv(root / f"results/eval/{ARCH}-paper-42/predictions/mylab.csv")
    p_cols = [f"p_{c}" for c in CLASSES]

    # the served pyfunc (models-from-code), loaded the way `wbc-transfer predict` loads it
    mlflow.set_tracking_uri(pipeline.base.tracking_uri)
    with mlflow.start_run(run_id=info["run_id"]):
        logged = pyfunc.log_classifier(folder / "model.pt", pyfunc.config_from_run_json(info))
    model = load_model(logged.model_uri, pipeline.base.tracking_uri)
    files = [lab / p for p in evaluated["path"]]
    rows = pd.DataFrame(list(predict_items(model, collect([str(f) for f in files]))))
    assert (rows["error"].fillna("") == "").all()
    assert list(rows["predicted"]) == list(evaluated["predicted"])
    pd.testing.assert_frame_equal(rows[p_cols].astype(float).reset_index(drop=True),
                                  evaluated[p_cols].reset_index(drop=True), atol=2e-5, rtol=0)

    # and the pyfunc itself on raw bytes (what HTTP serving runs)
    blobs = [f.read_bytes() for f in files]
    served = model.predict(pd.DataFrame({"image": blobs}))
    pd.testing.assert_frame_equal(served[p_cols].astype(float).reset_index(drop=True),
                                  evaluated[p_cols].reset_index(drop=True), atol=2e-5, rtol=0)

    # a config that forgets the layer does not fit these weights: the layer is really there
    with pytest.raises(RuntimeError, match="stain"):
        classifier.Classifier.from_files(folder / "model.pt", _config(tmp=folder, info=info))


def _config(tmp: Path, info: dict) -> Path:
    """A pyfunc config that forgets the stain layer (keys `stain.*` then do not fit)."""
    file = tmp / "config-without-stain.json"
    config = pyfunc.config_from_run_json(info)
    config["stain_norm"] = "none"
    file.write_text(json.dumps(config))
    return file


def test_one_set_param_adds_a_lab_folder(tmp_path: Path):
    """`dvc exp run -S '++external.mylab.root=/data/mylab'` (DVC's own override code) adds a
    set beside tecom and pbc, typed and checked by the loader."""
    from dvc.utils.hydra import apply_overrides

    file = tmp_path / "params.yaml"
    shutil.copyfile(REPO_ROOT / "params.yaml", file)
    apply_overrides(file, ["++external.mylab.root=/data/mylab"])
    params = load_params(file)
    assert set(params.external) == {"tecom", "pbc", "mylab"}
    assert params.external["mylab"].root == "/data/mylab"
    raw = yaml.safe_load(io.StringIO(file.read_text()))
    raw["external"]["TEST"] = {"root": "x"}
    file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="external.TEST"):
        load_params(file)


def test_the_cell_view_of_an_external_set_notes_what_it_did_not_find(tmp_path, prepared, lab):
    """prepare.view cell in external@: every image localised; a blank image is kept with the
    'no white cell found' note in its index row and counted in report.json; a gallery."""
    from wbc_transfer.data.cells import NOT_FOUND
    from wbc_transfer.data.sets import ImageSet

    root = tmp_path / "lab"
    shutil.copytree(lab, root)
    (root / "MONOCYTE" / "broken.png").unlink()
    Image.new("RGB", (120, 120), (235, 230, 225)).save(root / "LYMPHOCYTE" / "blank.png")
    params = lab_params(tmp_path, prepared, root, **{"prepare.view": "cell", "prepare.image_size": 48})
    info = external.main(params, "mylab")
    assert info["usable_images"] == 13
    assert info["localisation"] == {"view": "cell", "images": 13, "no_cell": 1, "several_cells": 0}
    index = pd.read_csv(tmp_path / "data/prepared_external/mylab.csv", keep_default_na=False)
    blank = index[index["path"] == "LYMPHOCYTE/blank.png"]["note"].iloc[0]
    assert blank.startswith(NOT_FOUND)
    large = index[index["note"].str.contains("large image")]["note"].iloc[0]
    assert NOT_FOUND not in large  # the 700 px field's cell is found, the size note kept
    images = ImageSet.load(tmp_path / "data/prepared_external/mylab.pt")
    assert images.view == "cell" and tuple(images.images.shape[1:]) == (3, 48, 48)
    assert (tmp_path / "results/data/external/mylab/cells_gallery.png").stat().st_size > 1000
