"""Groups: augmented copies of one real cell land in one group, different cells do not, and the
`groups` stage finds no cell shared by TRAIN and TEST."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from wbc_transfer.data.grouping import (
    GroupingSettings,
    cluster,
    describe,
    inliers,
    pair_scores,
    read_pixels,
    sibling_check,
)
from wbc_transfer.stages import groups as groups_stage
from wbc_transfer.stages import validate as validate_stage

from conftest import CLASSES, class_files, load_params, write_params

SETTINGS = GroupingSettings(workers=1)


def _affine(image: np.ndarray, angle: float = 0.0, shift: tuple[float, float] = (0, 0),
            shear: float = 0.0) -> np.ndarray:
    """Rotate by `angle` degrees, shear by `shear` degrees, shift by `shift` px, black fill."""
    h, w = image.shape[:2]
    a, s = np.deg2rad(angle), np.deg2rad(shear)
    linear = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.array([[1, np.tan(s)],
                                                                                     [0, 1]])
    centre = np.array([w / 2, h / 2])
    matrix = np.hstack([linear, (centre - linear @ centre + np.array(shift))[:, None]])
    return cv2.warpAffine(image, matrix, (w, h), borderValue=(0, 0, 0))


def _siblings(image: np.ndarray) -> list[np.ndarray]:
    """The augmentations the dataset was made with, one at a time and combined."""
    return [
        image,
        np.ascontiguousarray(image[:, ::-1]),  # horizontal flip
        np.ascontiguousarray(image[::-1]),  # vertical flip
        _affine(image, angle=15),
        _affine(image, angle=-15, shift=(20, -12)),
        _affine(image, shear=8),
        _affine(np.ascontiguousarray(image[:, ::-1]), angle=10, shift=(-15, 10), shear=-6),
    ]


@pytest.fixture(scope="module")
def distinct_cells(mirror) -> list[np.ndarray]:
    """Three real images that are certainly different cells: different folders and classes."""
    picks = [("TRAIN", "EOSINOPHIL"), ("TRAIN", "LYMPHOCYTE"), ("TEST", "NEUTROPHIL")]
    return [read_pixels(class_files(mirror, folder, cls)[7]) for folder, cls in picks]


def test_siblings_of_a_real_cell_land_in_one_group_and_different_cells_do_not(distinct_cells):
    images, truth = [], []
    for cell, image in enumerate(distinct_cells):
        for sibling in _siblings(image):
            images.append(sibling)
            truth.append(cell)
    labels = cluster([describe(im) for im in images], SETTINGS)
    truth = np.array(truth)
    for cell in range(len(distinct_cells)):
        assert len(set(labels[truth == cell])) == 1, f"cell {cell} split: {labels[truth == cell]}"
    assert len(set(labels)) == len(distinct_cells), labels
    assert pair_scores(truth, labels) == {"pairs_same_cell": 3 * 21, "precision": 1.0, "recall": 1.0}


def test_a_rotated_copy_matches_and_another_cell_does_not(distinct_cells):
    a, b = distinct_cells[0], distinct_cells[1]
    assert inliers(describe(a), describe(_affine(a, angle=15))) >= SETTINGS.min_inliers
    assert inliers(describe(a), describe(b)) < SETTINGS.min_inliers


def test_sibling_check_measures_precision_and_recall(distinct_cells):
    result = sibling_check(distinct_cells, SETTINGS, siblings=4, seed=1)
    assert result["images"] == 12 and result["cells"] == 3
    assert result["precision"] == 1.0 and result["recall"] >= 0.9


@pytest.fixture(scope="module")
def grouped(mini_dataset, tmp_path_factory):
    params = load_params(write_params(tmp_path_factory.mktemp("groups-repo"), mini_dataset,
                                     **{"groups.workers": 1, "groups.sibling_cells": 4,
                                        "groups.siblings_per_cell": 3}))
    validate_stage.main(params)
    report = groups_stage.main(params)
    return params, report, pd.read_csv(params.resolve(params.groups.manifest))


def test_groups_stage_writes_a_group_per_image_and_train_test_share_none(grouped):
    params, report, manifest = grouped
    index = pd.read_csv(params.resolve(params.validate.index))
    assert sorted(manifest["path"]) == sorted(index["path"])
    assert manifest["group"].notna().all()
    # a group never spans two folders or two classes
    spans = manifest.groupby("group").agg(folders=("folder", "nunique"), labels=("label", "nunique"))
    assert (spans["folders"] == 1).all() and (spans["labels"] == 1).all()
    train = set(manifest.loc[manifest["folder"] == "TRAIN", "group"])
    test = set(manifest.loc[manifest["folder"] == "TEST", "group"])
    assert not train & test
    assert report["cross_folder_matches"] == 0
    assert report["cross_class_matches"] == 0
    per_block = report["groups_per_folder_class"]
    assert set(per_block) == {f"{f}/{c}" for f in ("TEST", "TRAIN") for c in CLASSES}
    assert sum(v["images"] for v in per_block.values()) == len(manifest)
    # copies of a few TEST cells: the 12 images per class are fewer cells than images
    assert report["groups_per_folder_class"]["TEST/MONOCYTE"]["groups"] < 12
    note = params.resolve(params.validate.report_dir) / "groups.md"
    assert "precision" in note.read_text()
