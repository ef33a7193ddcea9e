"""Symbolic links in image folders, met the same way by `validate`, `external@<name>` and
`predict`: a link to an image file is read as the file; a broken link and a link to a folder
are refused with where they point, in problems.csv and in predict's rows and summary (they
were skipped with nothing said). Real mirror images, real links."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from champion_helpers import register_tiny_champion

from wbc_transfer.cli import main as cli_main
from wbc_transfer.stages import external as external_stage
from wbc_transfer.stages import validate as validate_stage

from conftest import CLASSES, IMAGES_SUBDIR, class_files

LINKED_FOLDER = "symbolic link to a folder"
BROKEN = "broken symbolic link"


def add_links(class_dir: Path, images: list[Path], elsewhere: Path) -> dict[str, Path]:
    """In `class_dir`: a link to an image file, a link to a folder of images and a broken
    link; returns name -> link."""
    elsewhere.mkdir(parents=True, exist_ok=True)
    for image in images[1:3]:
        (elsewhere / image.name).write_bytes(image.read_bytes())
    links = {"file": class_dir / "linked.jpeg", "folder": class_dir / "more",
             "broken": class_dir / "gone.jpeg"}
    links["file"].symlink_to(images[0])
    links["folder"].symlink_to(elsewhere, target_is_directory=True)
    links["broken"].symlink_to(class_dir / "deleted-long-ago.jpeg")
    return links


@pytest.fixture
def linked_root(tmp_path, kaggle_copy, mirror) -> tuple[Path, dict[str, Path]]:
    root = kaggle_copy(tmp_path / "blood-cells", train_per_class=4, test_per_class=2)
    cls_dir = root / IMAGES_SUBDIR / "TRAIN" / "MONOCYTE"
    sources = class_files(mirror, "TRAIN", "MONOCYTE")[-3:]
    return root, add_links(cls_dir, sources, tmp_path / "elsewhere")


def test_validate_reads_a_linked_file_and_refuses_a_linked_folder_and_a_broken_link(
        linked_root, make_params):
    root, links = linked_root
    params = make_params(root, validate__policy="lenient")
    validate_stage.main(params)
    index = pd.read_csv(params.resolve(params.validate.index))
    problems = pd.read_csv(params.resolve(params.validate.report_dir) / "problems.csv")
    reasons = dict(zip(problems["path"], problems["problem"], strict=True))
    assert "TRAIN/MONOCYTE/linked.jpeg" in set(index["path"])
    assert reasons["TRAIN/MONOCYTE/more"].startswith(LINKED_FOLDER)
    assert str(links["folder"].resolve()) in reasons["TRAIN/MONOCYTE/more"]
    assert reasons["TRAIN/MONOCYTE/gone.jpeg"].startswith(BROKEN)
    assert "deleted-long-ago.jpeg" in reasons["TRAIN/MONOCYTE/gone.jpeg"]
    strict = make_params(root)
    with pytest.raises(Exception, match="gone.jpeg"):
        validate_stage.main(strict)


def test_an_external_set_meets_links_as_validate_does(tmp_path, mirror, make_params):
    lab = tmp_path / "lab"
    for cls in CLASSES:
        (lab / cls).mkdir(parents=True)
        for f in class_files(mirror, "TEST", cls)[:2]:
            (lab / cls / f.name).write_bytes(f.read_bytes())
    add_links(lab / "LYMPHOCYTE", class_files(mirror, "TEST", "LYMPHOCYTE")[-3:],
              tmp_path / "elsewhere")
    params = make_params(tmp_path / "unused", validate__policy="lenient",
                         external={"mylab": {"root": str(lab)}})
    external_stage.main(params, "mylab")
    out = params.resolve(params.validate.report_dir) / "external" / "mylab"
    problems = pd.read_csv(out / "problems.csv")
    reasons = dict(zip(problems["path"], problems["problem"], strict=True))
    assert reasons["LYMPHOCYTE/more"].startswith(LINKED_FOLDER)
    assert reasons["LYMPHOCYTE/gone.jpeg"].startswith(BROKEN)
    index = pd.read_csv(params.resolve(params.prepare.external_dir) / "mylab.csv")
    assert "LYMPHOCYTE/linked.jpeg" in set(index["path"])


def test_predict_classifies_a_linked_file_and_reports_the_refused_links(
        tmp_path, mirror, capsys):
    champion = register_tiny_champion(tmp_path / "champion")
    folder = tmp_path / "cells"
    folder.mkdir()
    plain = class_files(mirror, "TEST", "EOSINOPHIL")[0]
    (folder / plain.name).write_bytes(plain.read_bytes())
    links = add_links(folder, class_files(mirror, "TEST", "NEUTROPHIL")[-3:],
                      tmp_path / "elsewhere")
    code = cli_main(["predict", str(folder), "--tracking-uri", champion.tracking_uri,
                     "-o", str(tmp_path / "out.csv")])
    err = capsys.readouterr().err
    assert code == 0, err
    rows = pd.read_csv(tmp_path / "out.csv", keep_default_na=False).set_index("path")
    assert rows.loc[str(links["file"]), "error"] == ""
    assert rows.loc[str(folder / plain.name), "error"] == ""
    assert rows.loc[str(links["folder"]), "error"].startswith(LINKED_FOLDER)
    assert rows.loc[str(links["broken"]), "error"].startswith(BROKEN)
    assert "2 classified, 2 failed" in err
    assert os.path.islink(links["broken"])  # nothing was changed on disk
