"""DVC stage `prepare`: turn every image of each protocol into the network's view once
(`prepare.view`: the whole image resized, or the white cell found, cropped and scaled), into
uint8 tensors. With the cell view it also reports the localisation: counts per protocol of cells
found / not found / several (validate.report_dir/cells.json), every noted image (cells.csv),
and a gallery of the boxes found (cells_gallery.png; made for either view)."""

from __future__ import annotations

import logging

import pandas as pd

from wbc_transfer.config import PROTOCOLS, Params
from wbc_transfer.data.cells import localisation_summary
from wbc_transfer.data.sets import build_image_set
from wbc_transfer.io import text_path, write_csv, write_json
from wbc_transfer.plots import GALLERY_PER_CLASS, localisation_gallery

log = logging.getLogger(__name__)


def main(params: Params) -> None:
    out = params.resolve(params.prepare.out_dir)
    p = params.prepare
    summary, noted = {}, []
    for protocol in PROTOCOLS:
        manifest = pd.read_csv(params.resolve(params.split.out_dir) / f"{protocol}.csv")
        image_set = build_image_set(
            manifest, params.images_dir, params.data.classes, p.image_size, p.view, p.cell_fraction
        )
        image_set.save(out / f"{protocol}.pt")
        summary[protocol] = localisation_summary(image_set.notes, p.view)
        noted += [{"protocol": protocol, "path": path, "note": note}
                  for path, note in zip(image_set.paths, image_set.notes, strict=True) if note]
        log.info("%s: %d images, %s view at %dpx -> %s", protocol, len(image_set), p.view,
                 p.image_size, out / f"{protocol}.pt")
    report_dir = params.resolve(params.validate.report_dir)
    write_json(report_dir / "cells.json", {"view": p.view, "cell_fraction": p.cell_fraction,
                                           "protocols": summary})
    write_csv(report_dir / "cells.csv", pd.DataFrame(noted, columns=["protocol", "path", "note"]))
    manifest = pd.read_csv(params.resolve(params.split.out_dir) / "heldout.csv")
    sample = manifest.groupby("label", sort=True).head(GALLERY_PER_CLASS)
    localisation_gallery([params.images_dir / text_path(p) for p in sample["path"]],
                         sample["label"].tolist(), report_dir / "cells_gallery.png",
                         title=f"white cell found (green box), {GALLERY_PER_CLASS} images per class")
