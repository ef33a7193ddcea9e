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

from wbc_transfer.config import Params
from wbc_transfer.data.validation import check_layout, enforce_policy, validate
from wbc_transfer.io import path_text, write_csv, write_json

log = logging.getLogger(__name__)


def main(params: Params) -> dict[str, object]:
    images_dir = params.images_dir
    check_layout(images_dir)
    log.info("scanning %s", images_dir)
    validation = validate(images_dir, params.data.classes, params.data.folders)
    out = params.resolve(params.validate.report_dir)
    write_csv(out / "problems.csv", validation.problems)
    write_csv(out / "image_sizes.csv", validation.sizes)
    write_csv(out / "duplicates.csv", validation.duplicates)
    # relative to the repository when inside it, so the report is the same in every clone
    shown = path_text(images_dir.relative_to(params.root)
                      if images_dir.is_relative_to(params.root) else images_dir)
    report = validation.report(shown, params.validate.policy)
    write_json(out / "report.json", report)
    enforce_policy(validation, params.validate.policy, images_dir, out)
    write_csv(params.resolve(params.validate.index), validation.index)
    log.info("usable images: %s", report["counts"])
    return report
