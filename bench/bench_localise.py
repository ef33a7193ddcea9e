"""Cell localisation measured: hit rate and IoU on the hand-drawn BCCD white-cell boxes, centre
offset and "no cell" rate on centred single-cell sets (tecom, pbc), time per image, a gallery.

    python bench/bench_localise.py [--shared ../shared/data] [--out bench/out/localise]

Writes <out>/summary.json, <out>/boxes.csv (one row per BCCD image) and <out>/gallery.png;
the numbers go to bench/LOCALISE.md by hand.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from wbc_transfer.cells import locate
from wbc_transfer.images import decode_file
from wbc_transfer.plots import box_gallery

SMEARS = "blood-cells/dataset-master/dataset-master/JPEGImages"


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def clipped(box: tuple[float, ...], width: int, height: int) -> tuple[float, ...]:
    return (max(0.0, box[0]), max(0.0, box[1]), min(float(width), box[2]), min(float(height), box[3]))


def bccd(shared: Path) -> tuple[pd.DataFrame, list]:
    boxes = pd.read_csv(shared / "bccd-wbc-boxes" / "wbc_boxes.csv")
    rows, shown = [], []
    for image, drawn in boxes.groupby("image", sort=True):
        pixels = decode_file(shared / SMEARS / f"{image}.jpg").pixels
        start = time.perf_counter()
        found = locate(pixels)
        elapsed = time.perf_counter() - start
        truth = [tuple(map(float, r)) for r in drawn[["xmin", "ymin", "xmax", "ymax"]].to_numpy()]
        cx, cy = found.centre
        hit = found.found and any(t[0] <= cx <= t[2] and t[1] <= cy <= t[3] for t in truth)
        _, h, w = pixels.shape
        box = clipped(found.box, w, h)
        best = max(iou(box, t) for t in truth) if found.found else 0.0
        nbest = max(iou(found.nucleus, t) for t in truth) if found.found else 0.0
        rows.append({"image": image, "drawn": len(truth), "found": found.found, "cells": found.cells,
                     "hit": hit, "iou": best, "nucleus_iou": nbest, "ms": 1000 * elapsed,
                     "note": found.note})
        if len(shown) < 24:
            shown.append((pixels, box, truth, f"{image} IoU {best:.2f}"))
    return pd.DataFrame(rows), shown


def centred(root: Path) -> dict[str, float]:
    rows = []
    for file in sorted(root.glob("*/*")):
        pixels = decode_file(file).pixels
        found = locate(pixels)
        _, h, w = pixels.shape
        cx, cy = found.centre
        rows.append({"found": found.found, "cells": found.cells,
                     "offset": float(np.hypot(cx - w / 2, cy - h / 2) / max(w, h)),
                     "side": found.side / max(w, h)})
    frame = pd.DataFrame(rows)
    return {"images": len(frame), "no_cell": float((~frame["found"]).mean()),
            "several": float((frame["cells"] > 1).mean()),
            "median_offset_of_side": float(frame.loc[frame["found"], "offset"].median()),
            "p95_offset_of_side": float(frame.loc[frame["found"], "offset"].quantile(0.95)),
            "median_cell_side_of_image": float(frame.loc[frame["found"], "side"].median())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    parser.add_argument("--shared", type=Path, default=shared)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "localise")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    frame, shown = bccd(args.shared)
    frame.to_csv(args.out / "boxes.csv", index=False)
    summary = {
        "bccd": {"images": len(frame), "hit_rate": float(frame["hit"].mean()),
                 "found": float(frame["found"].mean()),
                 "median_iou": float(frame["iou"].median()),
                 "median_iou_even_rows_fit": float(frame["iou"].iloc[::2].median()),
                 "median_iou_odd_rows_held": float(frame["iou"].iloc[1::2].median()),
                 "iou_p25": float(frame["iou"].quantile(0.25)),
                 "median_nucleus_iou": float(frame["nucleus_iou"].median()),
                 "ms_per_image_640x480_median": float(frame["ms"].median())},
    }
    for name in ("tecom", "pbc"):
        summary[name] = centred(args.shared / "external" / name)
    box_gallery(shown, args.out / "gallery.png")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
