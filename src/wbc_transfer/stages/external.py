"""DVC stage `external@<name>`: validate and prepare one external test set (params `external`).

The same check and bad-input policy as `validate` (validate.policy: strict stops on any
problem, lenient excludes and lists), then the same decode and view as `prepare`
(prepare.image_size, prepare.view, prepare.cell_fraction; with the cell view, each image's
localisation note joins its index row and the report counts cells not found / several).
Writes validate.report_dir/external/<name>/{report.json, problems.csv}
and prepare.external_dir/<name>.{csv,pt} (index of usable images with notes; uint8 tensors).
Nothing is chosen by these sets: evaluate only scores them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from wbc_transfer.config import Params
from wbc_transfer.data.cells import localisation_summary
from wbc_transfer.data.external import index_set, report
from wbc_transfer.data.images import joined
from wbc_transfer.data.sets import build_image_set
from wbc_transfer.data.validation import DataValidationError
from wbc_transfer.io import path_text, text_path, write_csv, write_json
from wbc_transfer.plots import GALLERY_PER_CLASS, localisation_gallery

log = logging.getLogger(__name__)


def list_sets(params: Params) -> Path:
    """DVC stage `external-sets`: write prepare.external_dir/sets.json, the external sets that
    params.yaml names (name -> root, manifest), and return its path.

    evaluate depends on the folder prepare.external_dir: this file makes that folder exist, and
    come back with `dvc pull`, also when `external` is empty (before, `dvc repro` then stopped at
    evaluate: "No such file or directory: .../prepared_external")."""
    out = params.resolve(params.prepare.external_dir) / "sets.json"
    write_json(out, {name: {"root": entry.root, "manifest": entry.manifest}
                     for name, entry in params.external.items()})
    return out


def main(params: Params, name: str) -> dict[str, object]:
    """Validate and prepare external set `name`; returns its report. Raises KeyError for an
    unknown name, DataValidationError under validate.policy=strict when a file is bad."""
    if name not in params.external:
        raise KeyError(f"external set {name!r} is not in params.yaml `external` "
                       f"(known: {sorted(params.external)})")
    entry = params.external[name]
    root = params.resolve(entry.root)
    manifest = root / entry.manifest if entry.manifest else None
    index, problems = index_set(name, root, manifest, params.data.classes)
    source = path_text(_shown(params, manifest or root))
    info = report(name, source, index, problems, params.validate.policy)
    out = params.resolve(params.validate.report_dir) / "external" / name
    write_csv(out / "problems.csv", problems)
    write_json(out / "report.json", info)
    if len(problems):
        listing = "\n".join(f"  {r.path}: {r.problem}" for r in problems.head(50).itertuples())
        if params.validate.policy == "strict":
            raise DataValidationError(
                f"{len(problems)} data problem(s) in external set {name} ({source}; "
                f"validate.policy=strict; list in {out / 'problems.csv'}):\n{listing}\n"
                "Fix or remove these files, or run with -S validate.policy=lenient to exclude them.")
        log.warning("external set %s: excluding %d problem file(s) (validate.policy=lenient):\n%s",
                    name, len(problems), listing)
    if info["large_images"]:
        log.warning("external set %s: %d image(s) larger than a single-cell crop (notes in the "
                    "index): likely whole smear fields", name, info["large_images"])
    if not len(index):
        raise DataValidationError(f"external set {name} ({source}) has no usable image")
    prep = params.prepare
    images = build_image_set(index, root, params.data.classes, prep.image_size, prep.view,
                             prep.cell_fraction)
    # the localisation's notes (no cell found, several cells) join the index and the report
    index["note"] = [joined(a, b) for a, b in zip(index["note"], images.notes, strict=True)]
    info["notes"] = report(name, source, index, problems, params.validate.policy)["notes"]
    info["localisation"] = localisation_summary(images.notes, prep.view)
    write_json(out / "report.json", info)
    sample = index.groupby("label", sort=True).head(GALLERY_PER_CLASS)
    localisation_gallery([root / text_path(p) for p in sample["path"]],
                         [f"{label} {note}"[:60] for label, note in zip(sample["label"], sample["note"],
                                                                        strict=True)],
                         out / "cells_gallery.png", title=f"{name}: white cell found (green box)")
    prepared = params.resolve(params.prepare.external_dir)
    write_csv(prepared / f"{name}.csv", index)
    images.save(prepared / f"{name}.pt")
    log.info("external set %s: %d images, %d cells (%s) at %d px -> %s", name, len(images),
             info["cells"], info["cells_from"], params.prepare.image_size, prepared / f"{name}.pt")
    return info


def _shown(params: Params, path: Path) -> Path:
    return path.relative_to(params.root) if path.is_relative_to(params.root) else path
