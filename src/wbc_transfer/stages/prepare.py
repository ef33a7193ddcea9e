"""DVC stage `prepare`: decode and resize every image of each protocol once, into uint8 tensors."""

from __future__ import annotations

import logging

import pandas as pd

from wbc_transfer.config import Params
from wbc_transfer.data import build_image_set
from wbc_transfer.splits import PROTOCOLS

log = logging.getLogger(__name__)


def main(params: Params) -> None:
    out = params.resolve(params.prepare.out_dir)
    for protocol in PROTOCOLS:
        manifest = pd.read_csv(params.resolve(params.split.out_dir) / f"{protocol}.csv")
        image_set = build_image_set(
            manifest, params.images_dir, params.data.classes, params.prepare.image_size
        )
        image_set.save(out / f"{protocol}.pt")
        log.info("%s: %d images at %dpx -> %s", protocol, len(image_set),
                 params.prepare.image_size, out / f"{protocol}.pt")
