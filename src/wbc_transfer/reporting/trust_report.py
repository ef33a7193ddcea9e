"""The report's trust sections (issue 14), generated from each evaluate stage's metrics.json:
calibration before/after temperature scaling, the review threshold and its coverage, per-class
precision/recall/F1 with intervals, and links to the reliability diagrams, risk-coverage
curves, normalised confusion matrices and Grad-CAM galleries. Loops over whatever evaluation
sets each model's metrics.json holds."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from wbc_transfer.config import Params
from wbc_transfer.io import read_json
from wbc_transfer.models.registry import is_pretrained
from wbc_transfer.reporting.comparison import eval_folder, expected_models
from wbc_transfer.training.trainer import model_name


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def _ci(value: float, ci: list[float] | None) -> str:
    if not ci or any(v is None or math.isnan(v) for v in ci):
        return _num(value)
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _link(file: Path, report_dir: Path, text: str) -> str | None:
    return f"[{text}]({Path(os.path.relpath(file, report_dir)).as_posix()})" if file.is_file() \
        else None


def collect_trust(params: Params) -> list[tuple[str, Path, dict[str, Any]]]:
    """(model name, its evaluate folder, its metrics.json) for every expected model that has
    calibration results (older outputs without them are skipped); the name of a model without
    ImageNet weights says "(not pretrained)", as the ranking tables keep it apart."""
    found = []
    for arch, protocol, seed in expected_models(params):
        folder = eval_folder(params, arch, protocol, seed)
        file = folder / "metrics.json"
        if file.is_file():
            summary = read_json(file)
            if "review" in summary:
                name = model_name(arch, protocol, seed)
                if not is_pretrained(summary.get("weights_source", "")):
                    name += " (not pretrained)"
                found.append((name, folder, summary))
    return found


def trust_markdown(params: Params, report_dir: Path) -> str:
    """The calibration/review/explanations and per-class sections of report.md (links relative
    to `report_dir`); empty when no model has calibration results."""
    models = collect_trust(params)
    if not models:
        return ""
    target = params.evaluate.review_accuracy
    lines = [
        "", "## Calibration, review for a person, explanations", "",
        "Probabilities are temperature-scaled: one scalar T per model, fitted by negative "
        "log-likelihood on the leak-free validation cells at training time (never on a test "
        "set), stored with the model and applied by evaluate, `predict` and the served pyfunc. "
        f"ECE: top-label, {params.evaluate.calibration_bins} equal-width bins (torchmetrics); "
        "Brier: multiclass (scikit-learn; 0 best, 2 worst). Validation numbers after scaling are "
        "in-sample (T was fitted there). Review threshold: the lowest calibrated confidence "
        f"whose kept validation images reach accuracy {target:g}; images below it go to a "
        "person. Coverage: the share of each set's images the model keeps at that threshold.", "",
        "| Model | Set | n (images, cells) | T | ECE before → after | Brier before → after | "
        "Review threshold | Coverage | Accuracy of kept | Figures |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, folder, summary in models:
        review = summary["review"]
        for set_name, scores in summary["sets"].items():
            cal = scores.get("calibration", {})
            kept = review["sets"].get(set_name, {})
            figures = [link for link in (
                _link(folder / "figures" / f"reliability_{set_name}.png", report_dir, "reliability"),
                _link(folder / "figures" / f"confusion_normalised_{set_name}.png", report_dir,
                      "confusion (normalised)"),
                *[_link(g, report_dir, f"Grad-CAM {g.stem.rsplit('_', 1)[-1].lower()}")
                  for g in sorted((folder / "figures").glob(f"gradcam_{set_name}_*.png"))],
            ) if link]
            lines.append(
                f"| {name} | `{set_name}` | {scores['n']}, {scores.get('n_cells', '—')} | "
                f"{_num(summary.get('temperature'), 2)} | "
                f"{_num(cal.get('ece_uncalibrated'))} → {_num(cal.get('ece'))} | "
                f"{_num(cal.get('brier_uncalibrated'))} → {_num(cal.get('brier'))} | "
                f"{_num(review.get('threshold'))} | {_num(kept.get('coverage'))} | "
                f"{_num(kept.get('accuracy'))} | {', '.join(figures)} |")
        risk = _link(folder / "figures" / "risk_coverage.png", report_dir,
                     f"{name}: risk-coverage curves")
        if risk:
            lines.append(f"| {risk} | | | | | | | | | |")
    lines += ["", "No review threshold (—): no confidence level reaches the target accuracy on "
              "validation; every image would go to review.", ""]

    lines += ["## Per-class precision, recall and F1", "",
              f"Brackets: {params.compare.confidence:.0%} cluster-bootstrap intervals (cells "
              "resampled within their class, the resamples of the summary intervals).", "",
              "| Model | Set | Class | Precision | Recall | F1 | Images |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, _, summary in models:
        for set_name, scores in summary["sets"].items():
            cis = scores.get("per_class_ci", {})
            for cls, s in scores["per_class"].items():
                ci = cis.get(cls, {})
                lines.append(f"| {name} | `{set_name}` | {cls} | "
                             f"{_ci(s['precision'], ci.get('precision'))} | "
                             f"{_ci(s['recall'], ci.get('recall'))} | {_ci(s['f1'], ci.get('f1'))} | "
                             f"{s['support']} |")
    return "\n".join(lines) + "\n"
