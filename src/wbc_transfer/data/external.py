"""External labelled test sets (other labs): read, check and index one set.

A set (params `external.<name>`) is a folder `root/<CLASS>/...` of image files (any depth
below the class folder, any format the project reads) or, with `manifest`, a folder `root` and
a CSV (relative to root) with columns `path,label` and optionally `group` (paths relative to
root). Every file goes
through the same check as the `validate` stage (`wbc_transfer.data.validation.inspect_image`: the
project's one decoder, the same problems, the same strict/lenient `validate.policy`).

Cells: each image of an external set is its own cell (group = its path) unless the manifest
has a `group` column; intervals then resample images as independent cells.

An image larger than images.LARGE_FACTOR times the Kaggle crop (320 x 240) on a side is most likely a
whole smear field, not a single-cell crop: it is kept, and its index row and the report say so
(it is resized to the model's input like every image; a classifier of single cells then sees
a shrunken field).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from wbc_transfer.data.images import IMAGE_SUFFIXES, joined, large_image_note
from wbc_transfer.io import path_text, text_path
from wbc_transfer.data.validation import ImageRecord, inspect_image, scan

RESERVED = ("validation", "paper_test", "TEST", "TEST_SIMPLE")  # evaluate's own set names


def scan_folder(root: Path, classes: Sequence[str]) -> tuple[list[ImageRecord], list[dict[str, str]]]:
    """Records of every image under root/<CLASS>/ (paths relative to `root`, folder = root's
    name) and folder problems. A class with no folder is allowed (a lab may have no
    eosinophils); other folder problems are those of `validate`."""
    records, folder_problems = scan(root.parent, classes, [root.name])
    prefix = f"{path_text(root.name)}/"
    relative = [ImageRecord(**{**asdict(r), "path": r.path.removeprefix(prefix)}) for r in records]
    problems = [{"path": p.path.removeprefix(prefix), "problem": p.problem}
                for p in folder_problems if p.problem != "missing class folder"]
    return relative, problems


def scan_manifest(root: Path, manifest: Path, name: str,
                  classes: Sequence[str]) -> tuple[list[ImageRecord], list[dict[str, str]], dict[str, str]]:
    """Records of every manifest row (path relative to `root`), row problems
    (unknown label, unknown suffix), and path -> group when the manifest has a `group` column.
    Raises ValueError naming the file when `path` or `label` is missing."""
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    missing = {"path", "label"} - set(frame.columns)
    if missing:
        raise ValueError(f"{manifest}: external manifest lacks column(s) {sorted(missing)} "
                         "(expected path,label[,group])")
    records: list[ImageRecord] = []
    problems: list[dict[str, str]] = []
    groups: dict[str, str] = {}
    for row in frame.itertuples(index=False):
        rel, label = str(row.path), str(row.label)
        if label not in classes:
            problems.append({"path": rel, "problem": f"label {label!r} not in data.classes"})
            continue
        file = root / text_path(rel)
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append({"path": rel, "problem": f"not an image file suffix ({file.suffix})"})
            continue
        records.append(inspect_image(file, rel, name, label))
        if "group" in frame.columns and str(row.group):
            groups[rel] = f"{name}:{row.group}"
    return records, problems, groups


def index_set(name: str, root: Path, manifest: Path | None,
              classes: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(index of usable images: path, label, group, width, height, note, split; problems: path,
    problem) of one external set, paths relative to `root`. Groups: the manifest's, else one
    cell per image. Raises FileNotFoundError naming external.<name>.root / .manifest."""
    if not root.is_dir():
        raise FileNotFoundError(f"external.{name}.root: folder {root} not found")
    if manifest is not None:
        if not manifest.is_file():
            raise FileNotFoundError(f"external.{name}.manifest: file {manifest} not found")
        records, problems, groups = scan_manifest(root, manifest, name, classes)
    else:
        records, problems = scan_folder(root, classes)
        groups = {}
    rows = []
    for r in records:
        if r.problem:
            problems.append({"path": r.path, "problem": r.problem})
            continue
        note = joined(r.note, large_image_note(r.width, r.height))
        rows.append({"path": r.path, "label": r.label, "group": groups.get(r.path, f"{name}:{r.path}"),
                     "width": r.width, "height": r.height, "note": note, "split": name})
    index = pd.DataFrame(rows, columns=["path", "label", "group", "width", "height", "note", "split"])
    return index, pd.DataFrame(problems, columns=["path", "problem"])


def report(name: str, source: str, index: pd.DataFrame, problems: pd.DataFrame,
           policy: str) -> dict[str, object]:
    """The set's report.json: counts per class, cells, sizes, notes, problems."""
    large = index["note"].str.contains("large image", regex=False) if len(index) else pd.Series([])
    return {
        "name": name, "source": source, "policy": policy,
        "usable_images": int(len(index)), "problems": int(len(problems)),
        "cells": int(index["group"].nunique()) if len(index) else 0,
        "cells_from": "one cell per image" if not len(index) or
        (index["group"] == name + ":" + index["path"]).all() else "manifest group column",
        "counts": {c: int(n) for c, n in sorted(Counter(index["label"]).items())},
        "max_width": int(index["width"].max()) if len(index) else 0,
        "max_height": int(index["height"].max()) if len(index) else 0,
        "large_images": int(large.sum()) if len(index) else 0,
        "notes": {n: int(k) for n, k in sorted(Counter(index["note"][index["note"] != ""]).items())}
        if len(index) else {},
    }
