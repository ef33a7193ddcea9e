"""DVC stage `validate`: scan every image, write the dataset report and the index of usable files.

Writes (under validate.report_dir) problems.csv (path, problem), image_sizes.csv,
duplicates.csv (exact duplicates: sha256, path, folder, label) and report.json, and
validate.index (path, folder, label, width, height, note) of the usable images (`note`: the
decoder's conversions and, for an image far larger than a cell crop, `images.large_image_note`:
a whole smear field trains as one cell; counted as `large_images` in report.json). Under
validate.policy=strict any problem (a bad file or folder, a label conflict) stops the stage.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import fields

import pandas as pd

from wbc_transfer.config import Params
from wbc_transfer.data.images import joined, large_image_note
from wbc_transfer.data.validation import DataValidationError, ImageRecord, as_rows, duplicates, scan
from wbc_transfer.io import path_text, write_csv, write_json

log = logging.getLogger(__name__)


def main(params: Params) -> dict[str, object]:
    images_dir = params.images_dir
    for required in ("TRAIN", "TEST"):
        if not (images_dir / required).is_dir():
            raise DataValidationError(
                f"{images_dir / required} not found. Is the dataset in place? "
                f"Run `dvc repro` (imports it via data.dvc) or set data.root in params.yaml "
                f"to a copy of the Kaggle layout (see docs/pipeline.md, 'Data')."
            )
    log.info("scanning %s", images_dir)
    records, folder_problems = scan(images_dir, params.data.classes, params.data.folders)
    records, duplicate_rows = duplicates(records)
    frame = pd.DataFrame(as_rows(records), columns=[f.name for f in fields(ImageRecord)])
    bad = frame[frame["problem"] != ""] if len(frame) else frame
    good = frame[frame["problem"] == ""] if len(frame) else frame
    problems = pd.concat(
        [
            bad[["path", "problem"]] if len(bad) else pd.DataFrame(columns=["path", "problem"]),
            pd.DataFrame([{"path": p.path, "problem": p.problem} for p in folder_problems],
                         columns=["path", "problem"]),
        ]
    ).reset_index(drop=True)

    out = params.resolve(params.validate.report_dir)
    write_csv(out / "problems.csv", problems)
    sizes = (
        good.groupby(["folder", "width", "height"]).size().rename("count").reset_index()
        if len(good) else pd.DataFrame(columns=["folder", "width", "height", "count"])
    )
    write_csv(out / "image_sizes.csv", sizes)
    dups = pd.DataFrame(duplicate_rows, columns=["sha256", "path", "folder", "label"])
    write_csv(out / "duplicates.csv", dups)
    conversions = Counter(good["note"][good["note"] != ""]) if len(good) else Counter()
    if len(good):  # a whole smear field trains as if it were one cell: say so in the index
        large = [large_image_note(w, h) for w, h in zip(good["width"], good["height"],
                                                          strict=True)]
        good = good.assign(note=[joined(n, extra) for n, extra in zip(good["note"], large,
                                                                       strict=True)])
        for path, extra in zip(good["path"], large, strict=True):
            if extra:
                log.warning("%s: %s", path, extra)
    counts = {
        folder: {c: int(n) for c, n in sorted(Counter(g["label"]).items())}
        for folder, g in good.groupby("folder")
    }
    report = {
        # relative to the repository when inside it, so the report is the same in every clone
        "images_dir": path_text(images_dir.relative_to(params.root)
                                if images_dir.is_relative_to(params.root) else images_dir),
        "policy": params.validate.policy,
        "scanned_files": int(len(frame)),
        "usable_images": int(len(good)),
        "problems": int(len(problems)),
        "counts": counts,
        "modes": {m: int(n) for m, n in Counter(good["mode"]).items()} if len(good) else {},
        # usable images that were converted on decoding (every stage converts them alike)
        "conversions": {note: int(n) for note, n in sorted(conversions.items())},
        "large_images": int(sum(map(bool, large))) if len(good) else 0,
        # exact duplicates (same bytes); the groups are listed in duplicates.csv
        "duplicates": {
            "groups": int(dups["sha256"].nunique()),
            "files": int(len(dups)),
            "groups_across_classes": _groups_spanning(dups, "label"),
            "groups_across_folders": _groups_spanning(dups, "folder"),
        },
    }
    write_json(out / "report.json", report)

    if len(problems):
        listing = "\n".join(f"  {r.path}: {r.problem}" for r in problems.head(50).itertuples())
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        if params.validate.policy == "strict":
            raise DataValidationError(
                f"{len(problems)} data problem(s) under {images_dir} (validate.policy=strict; "
                f"full list in {out / 'problems.csv'}):\n{listing}{more}\n"
                "Fix or remove these files, or run with -S validate.policy=lenient to exclude "
                "them (they stay listed in problems.csv)."
            )
        log.warning("excluding %d problem file(s) (validate.policy=lenient):\n%s%s",
                    len(problems), listing, more)
    if conversions:
        log.warning("converted on decoding (every stage reads them so):\n%s",
                    "\n".join(f"  {n} image(s): {note}" for note, n in sorted(conversions.items())))
    if len(dups):
        log.warning("%d exact duplicate file(s) in %d group(s), listed in %s",
                    len(dups), dups["sha256"].nunique(), out / "duplicates.csv")
    write_csv(params.resolve(params.validate.index),
              good[["path", "folder", "label", "width", "height", "note"]])
    log.info("usable images: %s", counts)
    return report


def _groups_spanning(dups: pd.DataFrame, column: str) -> int:
    """Duplicate groups whose files lie under more than one value of `column`."""
    return int((dups.groupby("sha256")[column].nunique() > 1).sum()) if len(dups) else 0
