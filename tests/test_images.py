"""One image decoder for every stage (issue 12, items 1-6).

Odd but real inputs, made in tmp from real mirror images, go through `validate` -> `split` ->
`prepare` (the tensors that train and evaluate read) and through the decoder that predict and
HTTP use (their own tests: test_predict.py, test_serve.py); each stage must read them alike.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from champion_helpers import exif_jpeg, png16_rgb, sixteen_bit_of, stored_pixels
from PIL import Image

from wbc_transfer.data import images as decoder
from wbc_transfer.data.cells import model_view
from wbc_transfer.data.sets import ImageSet, build_image_set
from wbc_transfer.data.validation import DataValidationError, scan
from wbc_transfer.io import path_text, text_path
from wbc_transfer.stages import groups as groups_stage
from wbc_transfer.stages import prepare as prepare_stage
from wbc_transfer.stages import split as split_stage
from wbc_transfer.stages import validate as validate_stage

from conftest import CLASSES, IMAGES_SUBDIR

FOLDERS = ("TRAIN", "TEST", "TEST_SIMPLE")
# split sizes for a copy with 6 TRAIN images per class
SMALL_SPLIT = {"split__paper__per_class": 3, "split__paper__test_fraction": 0.5,
               "split__val_per_class": 1, "split__heldout__train_per_class": 3}


@pytest.fixture
def root(tmp_path, kaggle_copy) -> Path:
    """A fresh real copy: 6 TRAIN and 2 TEST images per class (data.root)."""
    return kaggle_copy(tmp_path / "blood-cells", train_per_class=6, test_per_class=2)


@pytest.fixture(scope="module")
def source(mirror) -> Path:
    """A real mirror image (320 x 240 RGB JPEG) that the copies do not contain."""
    return sorted((mirror / "TEST" / "MONOCYTE").glob("*.jpeg"))[-1]


def rgb_of(file: Path) -> np.ndarray:
    with Image.open(file) as img:
        return np.array(img.convert("RGB"))


def resized(pixels: np.ndarray, prepare) -> torch.Tensor:
    """What `prepare` should store for H x W x 3 uint8 pixels: the network's view of them
    (prepare.view: torchvision's antialiased resize of the whole image, or the cell crop)."""
    chw = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).contiguous()
    return model_view(chw, prepare.image_size, prepare.view, prepare.cell_fraction)[0]


def pipeline(root: Path, make_params, policy: str = "lenient"):
    """validate -> groups -> split -> prepare on `root`, as `dvc repro` runs them; returns
    (params, report)."""
    params = make_params(root, validate__policy=policy, **SMALL_SPLIT)
    report = validate_stage.main(params)
    groups_stage.main(params)
    split_stage.main(params)
    prepare_stage.main(params)
    return params, report


def prepared(params, rel: str) -> torch.Tensor:
    """The prepared tensor of one TEST file (heldout.pt holds every TEST image)."""
    image_set = ImageSet.load(params.resolve(params.prepare.out_dir) / "heldout.pt")
    return image_set.images[image_set.paths.index(rel)]


def index_of(params) -> pd.DataFrame:
    return pd.read_csv(params.resolve(params.validate.index), keep_default_na=False)


# --- item 1: one decoder; what validate accepts, prepare reads; failures name the file -----------


def test_an_8bit_tiff_that_validate_accepts_is_prepared(root, source, make_params):
    tiff = root / IMAGES_SUBDIR / "TEST/MONOCYTE/cell.tif"
    Image.open(source).convert("RGB").save(tiff, format="TIFF")
    params, report = pipeline(root, make_params, policy="strict")
    assert report["problems"] == 0 and "TEST/MONOCYTE/cell.tif" in set(index_of(params)["path"])
    # prepare (torchvision's decoder before) crashed here with "Unsupported image file"
    assert torch.equal(prepared(params, "TEST/MONOCYTE/cell.tif"), resized(rgb_of(source), params.prepare))


def test_every_file_validate_accepts_every_stage_reads_alike(root, source, make_params):
    """Odd files of every kind: whatever validate keeps, prepare stores, and the pixels are the
    ones the predict/HTTP decoder gives (the same decoder, the same resize)."""
    images = root / IMAGES_SUBDIR
    rgb = rgb_of(source)
    Image.fromarray(rgb).save(images / "TEST/EOSINOPHIL/cell.tif", format="TIFF")
    Image.fromarray(rgb).save(images / "TEST/EOSINOPHIL/cell.bmp")
    Image.fromarray(rgb).save(images / "TEST/LYMPHOCYTE/cell.webp", lossless=True)
    (images / "TEST/MONOCYTE/sixteen.png").write_bytes(png16_rgb(sixteen_bit_of(rgb)))
    (images / "TEST/NEUTROPHIL/exif6.jpeg").write_bytes(exif_jpeg(Image.fromarray(rgb), 6))
    Image.fromarray(rgb).convert("L").save(images / "TEST/NEUTROPHIL/gray.png")  # refused
    params, _ = pipeline(root, make_params)
    index = index_of(params)
    p = params.prepare
    for rel in index[index["folder"] == "TEST"]["path"]:
        pixels, _ = decoder.decode((images / rel).read_bytes())
        expected = model_view(pixels, p.image_size, p.view, p.cell_fraction)[0]
        assert torch.equal(prepared(params, rel), expected), rel
    assert {"TEST/EOSINOPHIL/cell.tif", "TEST/EOSINOPHIL/cell.bmp", "TEST/LYMPHOCYTE/cell.webp",
            "TEST/MONOCYTE/sixteen.png", "TEST/NEUTROPHIL/exif6.jpeg"} <= set(index["path"])
    assert "TEST/NEUTROPHIL/gray.png" not in set(index["path"])


def test_an_undecodable_file_in_a_manifest_names_the_file(root):
    images = root / IMAGES_SUBDIR
    good = sorted((images / "TEST/LYMPHOCYTE").iterdir())[0]
    bad = images / "TEST/LYMPHOCYTE/broken.jpeg"
    bad.write_bytes(good.read_bytes()[:300])
    manifest = pd.DataFrame({"path": [good.relative_to(images).as_posix(),
                                      "TEST/LYMPHOCYTE/broken.jpeg"],
                             "label": ["LYMPHOCYTE"] * 2, "split": ["test"] * 2})
    with pytest.raises(decoder.ImageError, match=r"^\S*TEST/LYMPHOCYTE/broken\.jpeg: unreadable"):
        build_image_set(manifest, images, CLASSES, 32)


# --- item 2: 16-bit-per-channel RGB PNG: scaled, not wrapped, and said ---------------------------


def test_16bit_rgb_png_is_scaled_not_wrapped_and_noted(root, source, make_params):
    rgb = rgb_of(source)
    data = png16_rgb(sixteen_bit_of(rgb))
    (root / IMAGES_SUBDIR / "TEST/MONOCYTE/sixteen.png").write_bytes(data)
    pixels, note = decoder.decode(data)
    assert torch.equal(pixels.permute(1, 2, 0), torch.from_numpy(rgb))
    assert note == "16-bit RGB reduced to 8 bits per channel (high byte, i.e. value/256)"
    params, report = pipeline(root, make_params, policy="strict")
    # the validation report says so, per file (index.csv) and counted (report.json)
    row = index_of(params).set_index("path").loc["TEST/MONOCYTE/sixteen.png"]
    assert row["note"] == note and (row["width"], row["height"]) == (320, 240)
    assert report["conversions"] == {note: 1}
    # prepare stored the 8-bit values (wrapped, every value would have been 200)
    assert torch.equal(prepared(params, "TEST/MONOCYTE/sixteen.png"),
                       resized(rgb, params.prepare))


# --- item 3: hidden folders and files at any depth are not data ---------------------------------


def test_hidden_files_and_folders_at_any_depth_are_not_data(root, make_params):
    images = root / IMAGES_SUBDIR
    sample = sorted((images / "TRAIN/EOSINOPHIL").iterdir())[0]
    planted = ["TRAIN/EOSINOPHIL/.ipynb_checkpoints/x-checkpoint.jpeg",
               "TEST/EOSINOPHIL/.ipynb_checkpoints/y-checkpoint.jpeg",
               "TEST/.ipynb_checkpoints/EOSINOPHIL/z.jpeg",
               "TRAIN/NEUTROPHIL/.hidden.jpeg",
               "TRAIN/NEUTROPHIL/sub/.cache/w.jpeg"]
    for rel in planted:
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample, images / rel)
    records, folder_problems = scan(images, CLASSES, FOLDERS, workers=1)
    assert not [r.path for r in records if "/." in r.path]
    assert folder_problems == []
    assert len(records) == 4 * (6 + 2)
    params, report = pipeline(root, make_params, policy="strict")
    assert report["problems"] == 0 and report["scanned_files"] == 4 * (6 + 2)
    assert not [p for p in index_of(params)["path"] if "/." in p]


# --- item 4: exact duplicates reported; a label conflict is a validation problem ----------------


@pytest.fixture
def duplicated_root(root) -> Path:
    images = root / IMAGES_SUBDIR
    eos = sorted((images / "TRAIN/EOSINOPHIL").iterdir())[0]
    mono = sorted((images / "TRAIN/MONOCYTE").iterdir())[0]
    neu = sorted((images / "TRAIN/NEUTROPHIL").iterdir())[0]
    shutil.copyfile(eos, images / "TEST/LYMPHOCYTE/same-as-eosinophil.jpeg")  # label conflict
    shutil.copyfile(mono, images / "TEST/MONOCYTE/same-as-train.jpeg")  # across folders
    shutil.copyfile(neu, images / "TRAIN/NEUTROPHIL/copy.jpeg")  # within one class folder
    return root


def test_exact_duplicates_are_reported_and_label_conflicts_excluded(duplicated_root, make_params):
    images = duplicated_root / IMAGES_SUBDIR
    eos = sorted((images / "TRAIN/EOSINOPHIL").iterdir())[0].relative_to(images).as_posix()
    params = make_params(duplicated_root, validate__policy="lenient")
    report = validate_stage.main(params)
    out = params.resolve(params.validate.report_dir)
    dups = pd.read_csv(out / "duplicates.csv")
    assert list(dups.columns) == ["sha256", "path", "folder", "label"]
    groups = {tuple(g["path"]) for _, g in dups.groupby("sha256")}
    assert len(dups) == 6 and len(groups) == 3
    assert ("TEST/LYMPHOCYTE/same-as-eosinophil.jpeg", eos) in groups  # sorted by path
    assert report["duplicates"] == {"groups": 3, "files": 6, "groups_across_classes": 1,
                                    "groups_across_folders": 2}
    problems = pd.read_csv(out / "problems.csv").set_index("path")["problem"]
    assert problems[eos] == ("label conflict: same bytes as TEST/LYMPHOCYTE/same-as-eosinophil"
                             ".jpeg (classes EOSINOPHIL, LYMPHOCYTE)")
    assert "label conflict: same bytes as " + eos in problems["TEST/LYMPHOCYTE/same-as-eosinophil.jpeg"]
    assert len(problems) == 2  # same-label duplicates are reported, not excluded
    index = set(index_of(params)["path"])
    assert eos not in index and "TEST/LYMPHOCYTE/same-as-eosinophil.jpeg" not in index
    assert {"TEST/MONOCYTE/same-as-train.jpeg", "TRAIN/NEUTROPHIL/copy.jpeg"} <= index


def test_a_label_conflict_stops_strict_validation(duplicated_root, make_params):
    params = make_params(duplicated_root, validate__policy="strict")
    with pytest.raises(DataValidationError,
                       match=r"2 data problem\(s\)(.|\n)*same-as-eosinophil\.jpeg: label conflict"):
        validate_stage.main(params)


# --- item 5: a non-UTF-8 file name survives every output ----------------------------------------


def test_a_latin1_file_name_survives_validate_split_and_prepare(root, source, make_params):
    images = root / IMAGES_SUBDIR
    folder = os.fsencode(images / "TEST/NEUTROPHIL")
    with open(folder + b"/caf\xe9.jpeg", "wb") as f:  # Latin-1 e-acute: not UTF-8
        f.write(source.read_bytes())
    params, report = pipeline(root, make_params, policy="strict")  # crashed: UnicodeEncodeError
    text = "TEST/NEUTROPHIL/caf\\xe9.jpeg"  # the written form: a backslash, x, e, 9
    assert report["problems"] == 0
    raw = params.resolve(params.validate.index).read_bytes().decode("utf-8")  # valid UTF-8
    assert text in raw
    assert text in set(index_of(params)["path"])
    heldout = pd.read_csv(params.resolve(params.split.out_dir) / "heldout.csv")
    assert text in set(heldout["path"])
    assert os.fsencode(images / text_path(text)) == folder + b"/caf\xe9.jpeg"
    assert torch.equal(prepared(params, text), resized(rgb_of(source), params.prepare))
    # the reports are valid UTF-8 and JSON too
    json.loads((params.resolve(params.validate.report_dir) / "report.json").read_bytes())


def test_path_text_round_trips_any_name():
    for raw in (b"caf\xe9.jpeg", "café.jpeg".encode(), b"a\\b.png", b"lit\\xe9.png",
                b"x/\xff\xfe/y.tif"):
        name = os.fsdecode(raw)
        text = path_text(name)
        text.encode("utf-8")  # never raises
        assert os.fsencode(text_path(text)) == raw
    assert path_text("café.jpeg") == "café.jpeg"  # UTF-8 names are written as they are


def test_a_bad_latin1_file_is_named_in_the_problems(root, make_params):
    images = root / IMAGES_SUBDIR
    with open(os.fsencode(images / "TRAIN/EOSINOPHIL") + b"/\xe9t\xe9.jpeg", "wb") as f:
        f.write(b"not an image")
    params = make_params(root, validate__policy="strict")
    with pytest.raises(DataValidationError,
                       match=r"TRAIN/EOSINOPHIL/\\xe9t\\xe9\.jpeg: not an image"):
        validate_stage.main(params)
    problems = (params.resolve(params.validate.report_dir) / "problems.csv").read_bytes()
    assert "TRAIN/EOSINOPHIL/\\xe9t\\xe9.jpeg" in problems.decode("utf-8")


# --- item 6: EXIF orientation applied everywhere, and noted -------------------------------------


def test_exif_orientation_is_applied_and_noted(root, source, make_params):
    data = exif_jpeg(Image.open(source).convert("RGB"), 6)
    (root / IMAGES_SUBDIR / "TEST/EOSINOPHIL/phone.jpeg").write_bytes(data)
    upright = np.rot90(stored_pixels(data), k=-1)  # orientation 6: turn 90 degrees clockwise
    assert upright.shape == (320, 240, 3)
    pixels, note = decoder.decode(data)
    assert torch.equal(pixels.permute(1, 2, 0), torch.from_numpy(upright.copy()))
    assert note == "EXIF orientation 6 applied (turned 90° clockwise)"
    params, report = pipeline(root, make_params, policy="strict")
    row = index_of(params).set_index("path").loc["TEST/EOSINOPHIL/phone.jpeg"]
    assert (row["width"], row["height"], row["note"]) == (240, 320, note)
    assert report["conversions"] == {note: 1}
    assert torch.equal(prepared(params, "TEST/EOSINOPHIL/phone.jpeg"),
                       resized(upright, params.prepare))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_gives_the_upright_image(source, orientation):
    """Stored pixels transformed so that orientation `o` shows them upright again."""
    upright = Image.open(source).convert("RGB")
    inverse = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
               6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_270}[orientation]
    stored = upright.transpose(inverse) if inverse is not None else upright
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=_exif(orientation))  # lossless: exact pixels
    pixels, note = decoder.decode(buffer.getvalue())
    assert torch.equal(pixels.permute(1, 2, 0), torch.from_numpy(np.array(upright)))
    assert (note == "") == (orientation == 1)


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()
