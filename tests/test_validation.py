"""validation.scan / inspect_image and the validate stage on real images plus real bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from wbc_transfer.data.validation import DataValidationError, inspect_image, scan
from wbc_transfer.stages import validate as validate_stage

from conftest import CLASSES, IMAGES_SUBDIR

FOLDERS = ("TRAIN", "TEST", "TEST_SIMPLE")

# path (relative to the images folder) -> words its problem must contain
BAD_FILES = {
    "TRAIN/EOSINOPHIL/truncated.jpeg": "truncated",
    "TRAIN/LYMPHOCYTE/empty.jpeg": "empty file",
    "TRAIN/MONOCYTE/alpha.png": "mode RGBA",
    "TEST/NEUTROPHIL/gray.jpeg": "mode L",
    "TRAIN/NEUTROPHIL/x.jpeg": "not an image",
}
BAD_FOLDERS = {
    "TEST/MONOCYTE": "empty class folder",
    "TRAIN/BASOPHIL": "unknown class folder",
}


def _all_files(images: Path) -> list[str]:
    return sorted(p.relative_to(images).as_posix() for p in images.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def broken_root(tmp_path_factory, kaggle_copy, mirror) -> Path:
    """A real mini copy (6 TRAIN + 3 TEST per class) with one of each kind of bad file."""
    root = kaggle_copy(tmp_path_factory.mktemp("broken") / "blood-cells",
                       train_per_class=6, test_per_class=3)
    images = root / IMAGES_SUBDIR
    source = sorted((mirror / "TRAIN" / "EOSINOPHIL").glob("*.jpeg"))[-1]
    data = source.read_bytes()
    (images / "TRAIN/EOSINOPHIL/truncated.jpeg").write_bytes(data[: len(data) // 2])
    (images / "TRAIN/LYMPHOCYTE/empty.jpeg").write_bytes(b"")
    with Image.open(source) as img:
        rgba = img.convert("RGBA")
        rgba.putalpha(128)
        rgba.save(images / "TRAIN/MONOCYTE/alpha.png")
        img.convert("L").save(images / "TEST/NEUTROPHIL/gray.jpeg")
    (images / "TRAIN/NEUTROPHIL/x.jpeg").write_text("this is not a JPEG\n")
    shutil.rmtree(images / "TEST/MONOCYTE")
    (images / "TEST/MONOCYTE").mkdir()
    (images / "TRAIN/BASOPHIL").mkdir()
    shutil.copyfile(source, images / "TRAIN/BASOPHIL" / source.name)
    return root


def test_inspect_image_on_a_real_mirror_image(mirror):
    file = sorted((mirror / "TEST" / "LYMPHOCYTE").glob("*.jpeg"))[0]
    record = inspect_image(file, "TEST/LYMPHOCYTE/" + file.name, "TEST", "LYMPHOCYTE")
    assert (record.width, record.height, record.mode, record.problem) == (320, 240, "RGB", "")
    assert record.ok


def test_bad_files_are_made_as_intended(broken_root):
    """Guard for the fixture itself: each bad file really is what its name says."""
    images = broken_root / IMAGES_SUBDIR
    with Image.open(images / "TRAIN/MONOCYTE/alpha.png") as img:
        assert (img.format, img.mode) == ("PNG", "RGBA")
    with Image.open(images / "TEST/NEUTROPHIL/gray.jpeg") as img:
        assert (img.format, img.mode) == ("JPEG", "L")
    assert (images / "TRAIN/LYMPHOCYTE/empty.jpeg").stat().st_size == 0
    with Image.open(images / "TRAIN/EOSINOPHIL/truncated.jpeg") as img, pytest.raises(OSError):
        img.load()


def test_scan_reports_every_bad_file_and_folder(broken_root):
    images = broken_root / IMAGES_SUBDIR
    records, folder_problems = scan(images, CLASSES, FOLDERS, workers=1)
    by_path = {r.path: r for r in records}
    for path, words in BAD_FILES.items():
        assert path in by_path, f"{path} not scanned"
        assert words in by_path[path].problem, (path, by_path[path].problem)
        assert not by_path[path].ok
    folder_by_path = {p.path: p.problem for p in folder_problems}
    for path, words in BAD_FOLDERS.items():
        assert words in folder_by_path.get(path, ""), (path, folder_by_path)
    # the unknown class name is reported, the known ones are listed for the user
    assert "BASOPHIL" not in str(CLASSES) and "EOSINOPHIL" in folder_by_path["TRAIN/BASOPHIL"]
    # every real mirror image is usable, with its size and label
    good = [r for r in records if r.ok]
    assert len(good) == 4 * 6 + 3 * 3
    assert all((r.width, r.height, r.mode) == (320, 240, "RGB") for r in good)
    assert all(r.path.split("/")[:2] == [r.folder, r.label] for r in records)
    # nothing but the planted problems is flagged; TEST_SIMPLE is absent and not a problem
    assert {r.path for r in records if not r.ok} == set(BAD_FILES)
    assert set(folder_by_path) == set(BAD_FOLDERS)


def test_scan_reports_missing_class_folder_and_stray_files(tmp_path, kaggle_copy):
    root = kaggle_copy(tmp_path / "blood-cells", train_per_class=2, test_per_class=1)
    images = root / IMAGES_SUBDIR
    shutil.rmtree(images / "TEST/EOSINOPHIL")
    (images / "TRAIN/readme.txt").write_text("stray")
    (images / "TRAIN/LYMPHOCYTE/notes.txt").write_text("stray")
    _, folder_problems = scan(images, CLASSES, FOLDERS, workers=1)
    problems = {p.path: p.problem for p in folder_problems}
    assert problems["TEST/EOSINOPHIL"] == "missing class folder"
    assert "outside any class folder" in problems["TRAIN/readme.txt"]
    assert "suffix" in problems["TRAIN/LYMPHOCYTE/notes.txt"]


def test_scan_in_parallel_matches_serial(mini_dataset):
    images = mini_dataset / IMAGES_SUBDIR
    serial, p1 = scan(images, CLASSES, FOLDERS, workers=1)
    assert len(serial) > 200  # above the threshold where scan uses a process pool
    parallel, p2 = scan(images, CLASSES, FOLDERS, workers=2)
    assert serial == parallel and p1 == p2 == []


def test_validate_strict_fails_naming_each_bad_path(broken_root, make_params):
    params = make_params(broken_root, validate__policy="strict")
    with pytest.raises(DataValidationError) as info:
        validate_stage.main(params)
    message = str(info.value)
    for path in [*BAD_FILES, *BAD_FOLDERS]:
        assert path in message
    assert "7 data problem(s)" in message
    # no index is written for a strict failure, but the report is there to read
    assert not params.resolve(params.validate.index).exists()
    problems = pd.read_csv(params.resolve(params.validate.report_dir) / "problems.csv")
    assert set(problems["path"]) == set(BAD_FILES) | set(BAD_FOLDERS)


def test_validate_lenient_excludes_and_lists_every_bad_file(broken_root, make_params):
    params = make_params(broken_root, validate__policy="lenient")
    report = validate_stage.main(params)
    images = params.images_dir
    index = pd.read_csv(params.resolve(params.validate.index))
    report_dir = params.resolve(params.validate.report_dir)
    problems = pd.read_csv(report_dir / "problems.csv")

    assert list(index.columns) == ["path", "folder", "label", "width", "height", "note"]
    assert not set(index["path"]) & set(BAD_FILES)
    for path, words in {**BAD_FILES, **BAD_FOLDERS}.items():
        row = problems[problems["path"] == path]
        assert len(row) == 1, path
        assert words in row["problem"].iloc[0]

    # nothing silently dropped: each file on disk is indexed or listed (itself or its folder)
    listed = set(problems["path"])
    on_disk = _all_files(images)
    unaccounted = [
        f for f in on_disk
        if f not in set(index["path"]) and f not in listed
        and not any(f.startswith(p + "/") for p in listed)
    ]
    assert unaccounted == []
    assert len(index) + len(BAD_FILES) + 1 == len(on_disk)  # + the image inside BASOPHIL/
    assert all((images / p).is_file() for p in index["path"])

    # report.json: what was scanned, kept and flagged
    on_file = json.loads((report_dir / "report.json").read_text())
    assert on_file == json.loads(json.dumps(report))
    assert on_file["policy"] == "lenient"
    assert on_file["scanned_files"] == len(index) + len(BAD_FILES)
    assert on_file["usable_images"] == len(index) == 4 * 6 + 3 * 3
    assert on_file["problems"] == len(BAD_FILES) + len(BAD_FOLDERS) == len(problems)
    assert on_file["counts"] == {
        "TEST": {"EOSINOPHIL": 3, "LYMPHOCYTE": 3, "NEUTROPHIL": 3},
        "TRAIN": {c: 6 for c in CLASSES},
    }
    assert on_file["modes"] == {"RGB": len(index)}
    sizes = pd.read_csv(report_dir / "image_sizes.csv")
    assert sizes["count"].sum() == len(index)
    assert set(zip(sizes["width"], sizes["height"], strict=True)) == {(320, 240)}


def test_validate_clean_copy_under_strict(mini_dataset, make_params):
    params = make_params(mini_dataset)
    assert params.validate.policy == "strict"
    report = validate_stage.main(params)
    index = pd.read_csv(params.resolve(params.validate.index))
    assert report["problems"] == 0
    assert report["counts"] == {"TEST": {c: 12 for c in CLASSES}, "TRAIN": {c: 40 for c in CLASSES}}
    assert sorted(index["path"]) == _all_files(params.images_dir)
    assert pd.read_csv(params.resolve(params.validate.report_dir) / "problems.csv").empty


def test_validate_names_missing_train_or_test(tmp_path, make_params):
    (tmp_path / "blood-cells" / IMAGES_SUBDIR / "TRAIN").mkdir(parents=True)
    params = make_params(tmp_path / "blood-cells")
    with pytest.raises(DataValidationError, match="TEST not found"):
        validate_stage.main(params)


def test_a_whole_smear_field_in_the_training_data_is_noted(tmp_path, kaggle_copy, make_params):
    """A field photo among the cell crops trains as if it were one cell: the index and the
    report say so, as they do for an external set (one definition: images.large_image_note)."""
    from PIL import Image

    root = kaggle_copy(tmp_path / "blood-cells", train_per_class=3, test_per_class=1)
    folder = root / "dataset2-master/dataset2-master/images/TRAIN/MONOCYTE"
    Image.open(sorted(folder.iterdir())[0]).resize((1400, 1050)).save(folder / "field.jpeg")
    params = make_params(root)
    report = validate_stage.main(params)
    index = pd.read_csv(params.resolve(params.validate.index), keep_default_na=False)
    noted = index[index["note"] != ""]
    assert list(noted["path"]) == ["TRAIN/MONOCYTE/field.jpeg"]
    assert noted["note"].iloc[0].startswith("large image 1400x1050 px")
    assert report["large_images"] == 1 and report["conversions"] == {}
