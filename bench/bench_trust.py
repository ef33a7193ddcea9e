"""Issue 14 measurements on a trained pyfunc (not part of the test suite).

1. Calibration: the temperature fitted on the leak-free validation cells of a `heldout`
   manifest, ECE (equal-width, 15 bins), Brier and NLL before/after on validation and TEST,
   the review threshold (validation accuracy >= --target) and its TEST coverage.
2. `predict --explain` cost: `wbc_transfer.serving.predict.predict_items` on N TEST files, plain and
   with Grad-CAM overlays, interleaved in one process on one loaded model (ratio, not a
   timed assertion).

    python bench/bench_trust.py --model-dir <pyfunc folder> --manifest data/splits/heldout.csv \
        --images ../shared/data/blood-cells/dataset2-master/dataset2-master/images --tta

Writes bench/out/trust.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from wbc_transfer.data.sets import build_image_set
from wbc_transfer.engine import configure_torch, predict
from wbc_transfer.evaluation import calibration
from wbc_transfer.evaluation.metrics import classification_metrics


def scores(logits: np.ndarray, labels: np.ndarray, t: float) -> dict[str, float]:
    before, after = calibration.softmax(logits), calibration.softmax(logits, t)
    return {"ece_uncalibrated": calibration.ece(before, labels), "ece": calibration.ece(after, labels),
            "brier_uncalibrated": calibration.brier(before, labels),
            "brier": calibration.brier(after, labels),
            "nll_uncalibrated": calibration.nll(logits, labels), "nll": calibration.nll(logits, labels, t)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True, help="a wbc-transfer pyfunc folder (MLmodel)")
    p.add_argument("--manifest", required=True, help="the heldout split manifest (CSV)")
    p.add_argument("--images", required=True, help="the Kaggle images folder")
    p.add_argument("--tta", action="store_true", help="as evaluate.tta (the champion's setting)")
    p.add_argument("--target", type=float, default=0.99)
    p.add_argument("--explain-images", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="bench/out/trust.json")
    args = p.parse_args()
    configure_torch()

    import mlflow

    from wbc_transfer.serving.inputs import collect
    from wbc_transfer.serving.predict import predict_items

    model = mlflow.pyfunc.load_model(args.model_dir)
    classifier = model.unwrap_python_model().classifier
    cfg = classifier.config
    manifest = pd.read_csv(args.manifest)
    result: dict[str, object] = {"model_dir": args.model_dir, "tta": args.tta,
                                 "architecture": cfg["architecture"], "image_size": cfg["image_size"]}
    logits, labels, groups = {}, {}, {}
    for name, split in (("validation", "val"), ("TEST", "test")):
        rows = manifest[manifest["split"] == split].reset_index(drop=True)
        data = build_image_set(rows, Path(args.images), cfg["classes"], int(cfg["image_size"]))
        started = time.perf_counter()
        logits[name] = predict(classifier.model, data.images, cfg["mean"], cfg["std"],
                               torch.device("cpu"), 32, tta=args.tta).numpy()
        labels[name], groups[name] = data.labels.numpy(), rows["group"].tolist()
        m = classification_metrics(labels[name], logits[name].argmax(1), cfg["classes"])
        result[f"{name}_images"] = len(rows)
        result[f"{name}_cells"] = rows["group"].nunique()
        result[f"{name}_f1_macro"] = m["f1_macro"]
        result[f"{name}_accuracy"] = m["accuracy"]
        result[f"{name}_inference_s"] = round(time.perf_counter() - started, 1)
    t = calibration.fit_temperature(logits["validation"], labels["validation"])
    result["temperature"] = t
    for name in logits:
        result[name] = scores(logits[name], labels[name], t)
    val_probs = calibration.softmax(logits["validation"], t)
    curve = calibration.risk_coverage(val_probs.max(1), val_probs.argmax(1) == labels["validation"],
                                      groups["validation"])
    threshold = calibration.review_threshold(curve, args.target)
    result["review"] = {"target_accuracy": args.target, "threshold": threshold}
    for name in logits:
        probs = calibration.softmax(logits[name], t)
        result["review"][name] = calibration.coverage_at(
            probs.max(1), probs.argmax(1) == labels[name], threshold, groups[name])

    test_rows = manifest[manifest["split"] == "test"]
    step = max(1, len(test_rows) // args.explain_images)
    files = [str(Path(args.images) / f) for f in test_rows["path"].iloc[::step][:args.explain_images]]
    items = collect(files)
    timings: dict[str, list[float]] = {"plain": [], "explain": []}
    with tempfile.TemporaryDirectory() as tmp:
        list(predict_items(model, items[:8], 32))  # warm-up
        for _ in range(args.repeats):
            for kind in ("plain", "explain"):
                started = time.perf_counter()
                rows = list(predict_items(model, items, 32, explain_dir=Path(tmp) / kind
                                          if kind == "explain" else None))
                timings[kind].append(time.perf_counter() - started)
                assert all(not r["error"] for r in rows)
        written = len(list((Path(tmp) / "explain").glob("*.png")))
    plain, explained = min(timings["plain"]), min(timings["explain"])
    result["explain"] = {"images": len(items), "overlays_written_last_run": written,
                         "plain_s": round(plain, 2), "explain_s": round(explained, 2),
                         "ratio": round(explained / plain, 2), "repeats": args.repeats,
                         "threads": torch.get_num_threads()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=float))
    print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
