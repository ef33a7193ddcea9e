"""Scoring one trained model on one evaluation set (the `evaluate` stage's per-set work).

`score_set` runs the model over a set and writes, per set, the predictions, the confusion
matrices (counts and row-normalised), the per-class table with its intervals, the reliability
table and diagram (`calibration_scores`) and the risk-coverage table, logs the metrics and
artifacts to the active MLflow run, and draws the Grad-CAM galleries of the sets in
`evaluate.gallery_sets`. `review_summary` chooses the review threshold on the validation cells
and `log_review` draws and logs it over every set.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import mlflow
import numpy as np
import pandas as pd
import torch

from wbc_transfer.config import Params
from wbc_transfer.data.sets import ImageSet, normalise
from wbc_transfer.engine import evaluate
from wbc_transfer.evaluation import calibration
from wbc_transfer.evaluation.explain import grad_cam, overlay
from wbc_transfer.evaluation.metrics import SUMMARY_METRICS, classification_metrics
from wbc_transfer.evaluation.stats import balanced_cell_accuracy, set_intervals
from wbc_transfer.io import read_json, write_csv
from wbc_transfer.models import registry as models
from wbc_transfer.plots import (
    confusion_matrix,
    confusion_matrix_normalised,
    gallery,
    reliability_diagram,
    risk_coverage_curves,
)

log = logging.getLogger(__name__)


class SetScores(NamedTuple):
    scores: dict  # the set's entry in metrics.json
    curve: pd.DataFrame  # risk-coverage curve
    confidence: tuple[np.ndarray, np.ndarray, list[str]]  # (confidence, correct, groups) per image


def load_trained(params: Params, name: str) -> tuple[torch.nn.Module, dict]:
    folder = params.resolve(params.train.out_dir) / name
    info = read_json(folder / "run.json")
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    return models.rebuild(info, state), info


def check_views(model: str, view: str, set_views: dict[str, str]) -> None:
    """ValueError naming prepare.view when an evaluation set was prepared with another view than
    the model was trained on (a set made before `prepare.view` changed, not yet re-prepared)."""
    wrong = {s: v for s, v in set_views.items() if v != view}
    if wrong:
        raise ValueError(f"{model} was trained on the {view!r} view (prepare.view), but "
                         + ", ".join(f"{s} was prepared with {v!r}" for s, v in wrong.items())
                         + ": rerun `dvc repro prepare` and the external@ stages")


def score_set(params: Params, model: torch.nn.Module, info: dict, name: str, set_name: str,
              data: ImageSet, device: torch.device, amp: torch.dtype | None, out: Path) -> SetScores:
    """Score `model` (trained run `name`, its run.json `info`) on one set: metrics with cluster-
    bootstrap intervals, calibration, risk-coverage; writes the set's tables and figures under
    `out`, logs them to the active MLflow run, and draws Grad-CAM galleries when asked."""
    classes = info["classes"]
    temperature = float(info.get("temperature", 1.0))  # fitted on the validation cells (train)
    data = data.resized(int(info["image_size"]))
    r = evaluate(model, data, info["mean"], info["std"], device, params.evaluate.batch_size,
                 amp, tta=params.evaluate.tta, temperature=temperature)
    groups = data.groups or data.paths
    scores = classification_metrics(r.labels, r.predictions, classes)
    scores["n_cells"] = int(len(set(groups)))
    scores["cell_accuracy"] = balanced_cell_accuracy(r.labels == r.predictions, groups, r.labels)
    # one bootstrap for the summary and the per-class intervals (same resamples)
    scores["ci"], scores["per_class_ci"] = set_intervals(params, r.labels, r.predictions,
                                                         classes, groups)
    scores["calibration"] = calibration_scores(params, r, name, set_name, out)
    confidence = r.probabilities.max(axis=1)
    correct = r.labels == r.predictions
    curve = calibration.risk_coverage(confidence, correct, groups)
    write_csv(out / "figures" / f"risk_coverage_{set_name}.csv", curve)
    frame = pd.DataFrame({
        "path": data.paths,
        "group": groups,
        "actual": [classes[i] for i in r.labels],
        "predicted": [classes[i] for i in r.predictions],
        **{f"p_{c}": np.round(r.probabilities[:, i], 6) for i, c in enumerate(classes)},
    })
    write_csv(out / "predictions" / f"{set_name}.csv", frame)
    matrix = np.array(scores["confusion_matrix"])
    write_csv(out / "figures" / f"confusion_{set_name}.csv",
              pd.DataFrame(matrix, index=classes, columns=classes).rename_axis("actual")
              .reset_index())
    title = (f"{name} on {set_name} (n={scores['n']} images, {scores['n_cells']} cells, "
             f"acc {scores['accuracy']:.3f})")
    png = confusion_matrix(matrix, classes, title, out / "figures" / f"confusion_{set_name}.png")
    normalised = confusion_matrix_normalised(
        matrix, classes, f"{name} on {set_name}, share of each true class",
        out / "figures" / f"confusion_normalised_{set_name}.png")
    per_class = per_class_frame(scores)
    write_csv(out / "figures" / f"per_class_{set_name}.csv", per_class)
    log_set_metrics(set_name, scores, per_class)
    for artifact in (png, normalised, out / "figures" / f"confusion_{set_name}.csv",
                     out / "figures" / f"per_class_{set_name}.csv",
                     out / "figures" / f"reliability_{set_name}.png",
                     out / "figures" / f"reliability_{set_name}.csv",
                     out / "figures" / f"risk_coverage_{set_name}.csv"):
        mlflow.log_artifact(str(artifact), artifact_path="evaluation")
    if set_name in params.evaluate.gallery_sets:
        for file in gradcam_galleries(model, data, r, info, name, set_name,
                                      params.evaluate.gallery_correct, device, out / "figures"):
            mlflow.log_artifact(str(file), artifact_path="gradcam")
    log.info("%s on %s: accuracy %.3f, macro-F1 %.3f, class-balanced per-cell accuracy %.3f "
             "(n=%d images, %d cells)", name, set_name, scores["accuracy"],
             scores["f1_macro"], scores["cell_accuracy"], scores["n"], scores["n_cells"])
    return SetScores(scores, curve, (confidence, correct, list(groups)))


def log_set_metrics(set_name: str, scores: dict, per_class: pd.DataFrame) -> None:
    """The set's summary metrics, their interval ends, the per-class scores and the calibration
    scores, each named `<set>_<metric>`, to the active MLflow run."""
    mlflow.log_metrics({f"{set_name}_{m}": float(scores[m])
                        for m in (*SUMMARY_METRICS, "cell_accuracy", "n_cells")})
    mlflow.log_metrics({f"{set_name}_{m}_ci_{end}": float(v)
                        for m, ci in scores["ci"].items()
                        for end, v in zip(("low", "high"), ci, strict=True)})
    mlflow.log_metrics({f"{set_name}_{c}_{m}": float(per_class_row[m])
                        for c, per_class_row in per_class.set_index("class").iterrows()
                        for m in per_class.columns if m != "class"
                        and pd.notna(per_class_row[m])})
    mlflow.log_metrics({f"{set_name}_{k}": float(v)
                        for k, v in scores["calibration"].items()
                        if isinstance(v, float) and not np.isnan(v)})


def log_review(params: Params, name: str, curves: dict[str, pd.DataFrame], review: dict,
               out: Path) -> None:
    """The risk-coverage figure of every set with the review threshold, and the threshold and
    its coverage per set as `review_*` metrics, to the active MLflow run."""
    risk_png = risk_coverage_curves(
        curves, f"{name}: risk-coverage (review below {_fmt(review['threshold'])})",
        out / "figures" / "risk_coverage.png", params.evaluate.review_accuracy,
        review["threshold"])
    mlflow.log_artifact(str(risk_png), artifact_path="evaluation")
    mlflow.log_metrics({f"review_{k}": float(v) for k, v in
                        (("threshold", review["threshold"]),
                         *((f"coverage_{s}", c["coverage"])
                           for s, c in review["sets"].items()))
                        if v is not None and not np.isnan(v)})


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f}"


def per_class_frame(scores: dict) -> pd.DataFrame:
    """class, precision, recall, f1, support and the per-class interval ends (if any)."""
    frame = pd.DataFrame(scores["per_class"]).T.rename_axis("class").reset_index()
    for metric in ("precision", "recall", "f1"):
        for k, end in enumerate(("low", "high")):
            frame[f"{metric}_ci_{end}"] = [scores.get("per_class_ci", {}).get(c, {})
                                           .get(metric, [np.nan, np.nan])[k] for c in frame["class"]]
    return frame


def calibration_scores(params: Params, r, name: str, set_name: str, out) -> dict[str, object]:
    """ECE (equal-width bins, torchmetrics), Brier score and NLL before/after temperature
    scaling for one set; writes the reliability table (CSV) and diagram (PNG)."""
    bins = params.evaluate.calibration_bins
    before = calibration.softmax(r.logits)
    after = r.probabilities
    table_before = calibration.reliability_table(before, r.labels, bins)
    table_after = calibration.reliability_table(after, r.labels, bins)
    write_csv(out / "figures" / f"reliability_{set_name}.csv",
              pd.concat([table_before.assign(scaling="uncalibrated"),
                         table_after.assign(scaling="temperature")]))
    result: dict[str, object] = {
        "binning": f"equal-width, {bins} bins", "temperature": r.temperature,
        "ece": calibration.ece(after, r.labels, bins),
        "ece_uncalibrated": calibration.ece(before, r.labels, bins),
        "brier": calibration.brier(after, r.labels),
        "brier_uncalibrated": calibration.brier(before, r.labels),
        "nll": calibration.nll(r.logits, r.labels, r.temperature) if len(r.labels) else np.nan,
        "nll_uncalibrated": calibration.nll(r.logits, r.labels) if len(r.labels) else np.nan,
    }
    reliability_diagram(table_before, table_after,
                        f"{name} on {set_name}\nECE {result['ece_uncalibrated']:.3f} -> "
                        f"{result['ece']:.3f} (T = {r.temperature:.2f})",
                        out / "figures" / f"reliability_{set_name}.png")
    return result


def review_summary(params: Params, curves: dict[str, pd.DataFrame],
                   confidences: dict[str, tuple[np.ndarray, np.ndarray, list[str]]]) -> dict:
    """The review threshold chosen on the validation cells (lowest calibrated confidence whose
    kept images reach evaluate.review_accuracy) and what it keeps on every set."""
    target = params.evaluate.review_accuracy
    threshold = calibration.review_threshold(curves["validation"], target) \
        if "validation" in curves else None
    return {"target_accuracy": target, "chosen_on": "validation", "threshold": threshold,
            "sets": {s: calibration.coverage_at(conf, correct, threshold, groups)
                     for s, (conf, correct, groups) in confidences.items()}}


def gallery_picks(labels: np.ndarray, predictions: np.ndarray, confidence: np.ndarray,
                  groups: list[str], label: int, n_correct: int) -> list[int]:
    """Image indices for one class's gallery: one image per cell (group), the most confident
    one; the first `n_correct` cells (by name) with a correctly classified image, then every
    cell with a misclassified image (its most confident mistake)."""
    frame = pd.DataFrame({"group": groups, "label": labels, "pred": predictions,
                          "conf": confidence})
    frame = frame[frame["label"] == label]
    frame["correct"] = frame["label"] == frame["pred"]
    best = frame.sort_values(["group", "conf"], ascending=[True, False], kind="stable")
    right = best[best["correct"]].drop_duplicates("group").head(n_correct)
    wrong = best[~best["correct"]].drop_duplicates("group")
    return [*right.index, *wrong.index]


def gradcam_galleries(model, data: ImageSet, r, info: dict, name: str, set_name: str,
                      n_correct: int, device, folder) -> list:
    """One Grad-CAM gallery PNG per class (`gallery_picks`; the map of the predicted class);
    returns the files written."""
    classes = info["classes"]
    groups = list(data.groups or data.paths)
    confidence = r.probabilities.max(axis=1)
    layer = models.cam_layer(info["architecture"], model)
    files = []
    for k, cls in enumerate(classes):
        picks = gallery_picks(r.labels, r.predictions, confidence, groups, k, n_correct)
        if not picks:
            continue
        pictures, captions = [], []
        for start in range(0, len(picks), 16):
            idx = picks[start:start + 16]
            x = normalise(data.images[idx].to(device), info["mean"], info["std"])
            _, cams = grad_cam(model, layer, x, torch.as_tensor(r.predictions[idx]))
            for i, cam in zip(idx, cams, strict=True):
                pictures.append(np.asarray(overlay(data.images[i], cam)))
                verdict = "ok" if r.labels[i] == r.predictions[i] else "WRONG"
                captions.append(f"{verdict}: {classes[r.predictions[i]].lower()} "
                                f"p={confidence[i]:.2f}\ncell {str(groups[i])[-24:]}")
        files.append(gallery(pictures, captions,
                             f"{name} on {set_name}, true {cls}: Grad-CAM of the predicted class "
                             f"({len(picks)} cells)", folder / f"gradcam_{set_name}_{cls}.png"))
    return files
