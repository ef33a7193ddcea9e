"""Cell localisation measured: hit rate and IoU on the hand-drawn BCCD white-cell boxes, centre
offset and "no cell" rate on centred single-cell sets (tecom, pbc), time per image, a gallery.

    python bench/bench_localise.py [--shared ../shared/data] [--out bench/out/localise]

One thread. Writes <out>/summary.json, <out>/boxes.csv (one row per BCCD image) and <out>/gallery.png;
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

from wbc_transfer.data.cells import locate
from wbc_transfer.data.images import decode_file
from wbc_transfer.plots import box_gallery

SMEARS = "blood-cells/dataset-master/dataset-master/JPEGImages"
KAGGLE_TEST = "blood-cells/dataset2-master/dataset2-master/images/TEST"


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


def kaggle_crops(shared: Path) -> dict[str, float]:
    """The Kaggle TEST crops (320 x 240, augmented): cells found, several, ms per image."""
    files = sorted((shared / KAGGLE_TEST).glob("*/*.jpeg"))
    found = several = 0
    times = []
    for file in files:
        pixels = decode_file(file).pixels
        start = time.perf_counter()
        cell = locate(pixels)
        times.append(time.perf_counter() - start)
        found += cell.found
        several += cell.cells > 1
    return {"images": len(files), "no_cell": 1 - found / len(files), "several": several / len(files),
            "ms_per_image_320x240_median": 1000 * float(np.median(times)),
            "ms_per_image_320x240_p95": 1000 * float(np.percentile(times, 95))}


def predict_speed(shared: Path, repeats: int = 3) -> dict[str, float]:
    """images/s of the served path (Classifier.predict_bytes: decode, view, EfficientNet-Lite0
    at 128 px, batch 32, one thread) on 400 Kaggle TEST files, full vs cell view, alternated."""
    from wbc_transfer.models import registry as models
    from wbc_transfer.serving.classifier import Classifier

    files = sorted((shared / KAGGLE_TEST).glob("*/*.jpeg"))[::6][:400]
    blobs = [f.read_bytes() for f in files]
    built = models.build("efficientnet_lite0", 4, "auto", 128)
    config = {"architecture": "efficientnet_lite0", "image_size": 128, "mean": list(built.mean),
              "std": list(built.std), "classes": ["E", "L", "M", "N"]}
    classifiers = {view: Classifier(built.model.eval(), {**config, "view": view}, torch.device("cpu"))
                   for view in ("full", "cell")}
    seconds: dict[str, list[float]] = {view: [] for view in classifiers}
    for _ in range(repeats):
        for view, classifier in classifiers.items():
            start = time.perf_counter()
            classifier.predict_bytes(blobs, batch_size=32)
            seconds[view].append(time.perf_counter() - start)
    rates = {view: len(blobs) / min(s) for view, s in seconds.items()}
    return {**{f"{v}_images_per_s": round(r, 1) for v, r in rates.items()},
            "drop": round(1 - rates["cell"] / rates["full"], 3)}


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
    summary["kaggle_test"] = kaggle_crops(args.shared)
    summary["predict"] = predict_speed(args.shared)
    box_gallery(shown, args.out / "gallery.png")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
