"""Cell localisation (wbc_transfer.data.cells) on real smears with hand-drawn boxes, the bad inputs of
issue 22 (blank, red cells only, two white cells, a thumbnail, a 4000x3000 photo, grey), and the
one image path: prepare (data.decode_resized), the served Classifier and the parameter check
give the same cell view."""

from __future__ import annotations

import io

import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from wbc_transfer.config import check_view, load_params
from wbc_transfer.data.cells import NOT_FOUND, SEVERAL, cell_view, locate, model_view
from wbc_transfer.data.images import decode_file
from wbc_transfer.data.sets import decode_resized
from wbc_transfer.serving.classifier import Classifier

from conftest import REPO_ROOT, mirror_root

BOXES = mirror_root().parent / "bccd-wbc-boxes" / "wbc_boxes.csv"
SMEARS = mirror_root() / "dataset-master" / "dataset-master" / "JPEGImages"
PBC = mirror_root().parent / "external" / "pbc"


@pytest.fixture(scope="module")
def boxes() -> pd.DataFrame:
    if not BOXES.is_file():
        pytest.skip(f"{BOXES} not found (../shared/data/bccd-wbc-boxes)")
    return pd.read_csv(BOXES)


def smear(image: str) -> torch.Tensor:
    return decode_file(SMEARS / f"{image}.jpg").pixels


def inside(point: tuple[float, float], box: tuple[float, ...]) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def test_the_found_cell_is_the_drawn_one_on_real_smears(boxes: pd.DataFrame) -> None:
    single = boxes[boxes["n_wbc"] == 1].iloc[::10]  # 20 smears spread over the file
    for row in single.itertuples():
        found = locate(smear(row.image))
        drawn = (row.xmin, row.ymin, row.xmax, row.ymax)
        assert found.found and found.cells == 1, (row.image, found.note)
        assert inside(found.centre, drawn), (row.image, found.box, drawn)
        # the cell box, not the nucleus box: it covers most of the drawn box
        x0, y0, x1, y1 = found.box
        overlap = (max(0, min(x1, row.xmax) - max(x0, row.xmin))
                   * max(0, min(y1, row.ymax) - max(y0, row.ymin)))
        assert overlap > 0.6 * (row.xmax - row.xmin) * (row.ymax - row.ymin), row.image


def test_a_4000x3000_photo_finds_the_same_cell(boxes: pd.DataFrame) -> None:
    row = boxes[boxes["n_wbc"] == 1].iloc[0]
    big = TF.resize(smear(row.image), [3000, 4000], antialias=True)
    found = locate(big)
    assert found.found
    assert inside(found.centre, tuple(v * 6.25 for v in (row.xmin, row.ymin, row.xmax, row.ymax)))


def test_two_white_cells_are_noted(boxes: pd.DataFrame) -> None:
    two = boxes[boxes["n_wbc"] == 2]["image"].unique()
    found = [locate(smear(image)) for image in two]
    noted = [f for f in found if f.cells > 1]
    assert noted, "no two-cell smear noted"  # 6 of 11 (bench/LOCALISE.md)
    assert all(SEVERAL in f.note for f in noted)
    for f, image in zip(found, two, strict=True):  # either way, one of the drawn cells is taken
        drawn = boxes[boxes["image"] == image][["xmin", "ymin", "xmax", "ymax"]].to_numpy()
        assert any(inside(f.centre, tuple(d)) for d in drawn), image


@pytest.mark.parametrize("case", ["blank", "white", "red cells only", "thumbnail", "grey"])
def test_no_white_cell_is_a_note_and_the_whole_image(boxes: pd.DataFrame, case: str) -> None:
    row = boxes[boxes["n_wbc"] == 1].iloc[0]  # BloodImage_00004: the cell is in the left half
    pixels = smear(row.image)
    image = {
        "blank": torch.zeros((3, 240, 320), dtype=torch.uint8),
        "white": torch.full((3, 240, 320), 250, dtype=torch.uint8),
        "red cells only": pixels[:, 250:, 350:],
        "thumbnail": TF.resize(pixels[:, 300:, 400:], [16, 16], antialias=True),
        "grey": pixels.float().mean(0, keepdim=True).expand(3, -1, -1).to(torch.uint8),
    }[case].contiguous()
    found = locate(image)
    assert not found.found and found.note.startswith(NOT_FOUND), found.note
    view, note, _ = model_view(image, 64, "cell")
    assert view.shape == (3, 64, 64) and view.dtype == torch.uint8 and note == found.note
    # fallback: the whole image, padded to a square, nothing cropped away
    if case != "thumbnail":
        assert torch.equal(view, cell_view(image, found, 64, 0.6))


def test_the_cell_view_centres_and_scales_the_cell() -> None:
    file = sorted((PBC / "LYMPHOCYTE").glob("*"))[0] if PBC.is_dir() else None
    if file is None:
        pytest.skip("../shared/data/external/pbc not found")
    pixels = decode_file(file).pixels
    view, note, found = model_view(pixels, 96, "cell", 0.5)
    assert note == "" and found is not None and found.found
    again = locate(view)  # in the view, the cell sits in the middle at about half the side
    cx, cy = again.centre
    assert abs(cx - 48) < 10 and abs(cy - 48) < 10
    assert 0.35 < again.side / 96 < 0.7
    full, _, none = model_view(pixels, 96, "full")
    assert none is None and torch.equal(full, TF.resize(pixels, [96, 96], antialias=True))


def test_prepare_and_the_served_classifier_make_the_same_cell_view(tmp_path, boxes) -> None:
    """One image path: the tensor the `prepare` stage stores and the one the registered
    pyfunc/HTTP/predict path builds from the same bytes are identical, note included."""
    from wbc_transfer.models import registry as models

    row = boxes.iloc[3]
    file = SMEARS / f"{row.image}.jpg"
    prepared, note = decode_resized(file, 80, "cell", 0.6)
    config = {"architecture": "efficientnet_lite0", "image_size": 80, "mean": [0.5] * 3,
              "std": [0.5] * 3, "classes": ["A", "B"], "view": "cell", "cell_fraction": 0.6}
    built = models.build("efficientnet_lite0", 2, "none", 80)
    classifier = Classifier(model=built.model.eval(), config=config, device=torch.device("cpu"))
    served, served_note = classifier.preprocess(file.read_bytes())
    assert torch.equal(prepared, served) and note == served_note
    # an older model (no view in its config) keeps the whole image
    old = Classifier(model=built.model, config={k: v for k, v in config.items() if k != "view"},
                     device=torch.device("cpu"))
    assert torch.equal(old.preprocess(file.read_bytes())[0], decode_resized(file, 80)[0])
    # a greyscale PNG through the served path: a note, not an error
    buffer = io.BytesIO()
    Image.open(file).convert("L").save(buffer, format="PNG")
    pixels, grey_note = classifier.preprocess(buffer.getvalue())
    assert pixels.shape == (3, 80, 80) and NOT_FOUND in grey_note and "converted L to RGB" in grey_note


def test_view_parameters_are_checked() -> None:
    assert check_view(load_params(REPO_ROOT / "params.yaml").prepare) == []
    problems = check_view({"view": "nucleus", "cell_fraction": 1.5})  # e.g. a model's config
    assert any("prepare.view" in p and "'nucleus'" in p for p in problems)
    assert any("prepare.cell_fraction" in p and "1.5" in p for p in problems)
    with pytest.raises(ValueError, match="prepare.view"):
        model_view(torch.zeros((3, 8, 8), dtype=torch.uint8), 8, "crop")


def test_evaluate_refuses_a_set_prepared_with_another_view() -> None:
    from wbc_transfer.evaluation.scoring import check_views

    check_views("m", "cell", {"validation": "cell", "tecom": "cell"})
    with pytest.raises(ValueError, match=r"prepare\.view.*tecom was prepared with 'full'"):
        check_views("m", "cell", {"validation": "cell", "tecom": "full"})
