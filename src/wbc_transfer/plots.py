"""Figures people would rather look at than read: curves, confusion matrices, bar charts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_curves(history: pd.DataFrame, title: str, path: Path) -> Path:
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(history["epoch"], history["train_loss"], "o-", label="train")
    ax_loss.plot(history["epoch"], history["val_loss"], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.plot(history["epoch"], history["train_accuracy"], "o-", label="train accuracy")
    ax_acc.plot(history["epoch"], history["val_accuracy"], "o-", label="validation accuracy")
    ax_acc.plot(history["epoch"], history["val_f1_macro"], "s--", label="validation macro-F1")
    ax_acc.set(xlabel="epoch", ylim=(0, 1.02), title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def confusion_matrix(matrix: np.ndarray, classes: Sequence[str], title: str, path: Path,
                     values_format: str = "d") -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ConfusionMatrixDisplay(matrix, display_labels=[c.title() for c in classes]).plot(
        ax=ax, cmap="Blues", colorbar=False, values_format=values_format
    )
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    return _save(fig, path)


def grouped_bars(table: pd.DataFrame, title: str, path: Path, ylabel: str = "score",
                 errors: pd.DataFrame | np.ndarray | None = None) -> Path:
    """Bars of table (rows: groups on the x axis, columns: series).

    errors: symmetric (a frame shaped like table) or asymmetric (array of shape
    (series, 2, groups): distances below and above each bar). A point estimate outside its
    percentile-bootstrap interval (possible with few cells or resamples) gets no bar on that
    side; matplotlib refuses negative lengths."""
    if errors is not None:
        errors = errors.clip(lower=0) if isinstance(errors, pd.DataFrame) else np.clip(errors, 0, None)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(table)), 4.2))
    table.plot.bar(ax=ax, rot=0, yerr=errors, capsize=3)
    ax.set(ylabel=ylabel, title=title, ylim=(0, 1.05))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def pvalue_heatmap(p: pd.DataFrame, diff: pd.DataFrame, alpha: float, title: str,
                   path: Path, diff_label: str = "ΔF1") -> Path:
    """Pairwise test matrix: colour -log10(p), each cell annotated with p and the metric
    difference row minus column (`diff_label`); significant cells (p < alpha) are starred and
    framed."""
    n = len(p)
    fig, ax = plt.subplots(figsize=(1.5 * n + 2.5, 1.2 * n + 1.5))
    strength = -np.log10(np.clip(p.to_numpy(dtype=float), 1e-6, 1.0))
    image = ax.imshow(strength, cmap="Reds", vmin=0, vmax=max(3.0, np.nanmax(strength, initial=0)))
    fig.colorbar(image, ax=ax, label="-log10(adjusted p)", shrink=0.8)
    for i in range(n):
        for j in range(n):
            value = p.iat[i, j]
            if i == j or np.isnan(value):
                ax.text(j, i, "-", ha="center", va="center", color="grey")
                continue
            star = "*" if value < alpha else ""
            ax.text(j, i, f"p={value:.3g}{star}\n{diff_label} {diff.iat[i, j]:+.3f}", ha="center",
                    va="center", fontsize=8, color="white" if strength[i, j] > 2 else "black")
            if star:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2,
                                           edgecolor="black"))
    ax.set_xticks(range(n), p.columns, rotation=30, ha="right")
    ax.set_yticks(range(n), p.index)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def leakage_dumbbell(gap: pd.DataFrame, metrics: dict[str, str], title: str, path: Path) -> Path:
    """Per model, the leaky paper_test score beside the leak-free TEST score, joined by a line
    (one panel per metric), with interval bars where gap has <set>_ci_low/_ci_high columns.
    gap: leakage_gap()'s frame, one row per (architecture, metric)."""
    archs = list(dict.fromkeys(gap["architecture"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 0.6 * len(archs) + 2),
                             sharey=True, squeeze=False)
    y = np.arange(len(archs))
    for ax, (metric, label) in zip(axes[0], metrics.items(), strict=True):
        rows = gap[gap["metric"] == metric].set_index("architecture").reindex(archs)
        for k, (name, colour) in enumerate((("TEST", "tab:blue"), ("paper_test", "tab:red"))):
            low, high = f"{name}_ci_low", f"{name}_ci_high"
            err = None
            if low in rows and high in rows and rows[[low, high]].notna().all().all():
                err = np.clip(np.vstack([rows[name] - rows[low], rows[high] - rows[name]]), 0, None)
            ax.errorbar(rows[name], y + (k - 0.5) * 0.12, xerr=err, fmt="o", color=colour,
                        capsize=3, label=f"{name} (leak-free)" if name == "TEST" else
                        f"{name} (near-duplicates of training images)")
        ax.hlines(y, rows["TEST"], rows["paper_test"], color="grey", alpha=0.6)
        for i, g in enumerate(rows["gap"]):
            ax.annotate(f"gap {round(g, 3) + 0.0:+.3f}", (0.99, i), ha="right", va="center",
                        xycoords=("axes fraction", "data"), fontsize=8)
        ax.set(xlabel=label, xlim=(0, 1.15))
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(y, archs)
    axes[0][0].invert_yaxis()
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_matrix_normalised(matrix: np.ndarray, classes: Sequence[str], title: str,
                                path: Path) -> Path:
    """The confusion matrix with each row divided by its true-class total (recall on the
    diagonal); rows without images stay 0."""
    counts = np.asarray(matrix, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    return confusion_matrix(share, classes, title, path, values_format=".2f")


def reliability_diagram(before: pd.DataFrame, after: pd.DataFrame, title: str,
                        path: Path) -> Path:
    """Reliability diagram: accuracy per confidence bin before and after temperature scaling
    (frames of `calibration.reliability_table`), the diagonal is perfect calibration; bar
    widths are the bins, the lower panel the share of images per bin."""
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    width = (before["upper"] - before["lower"]).to_numpy()
    for frame, label, colour, shift in ((before, "uncalibrated", "tab:red", 0.0),
                                        (after, "temperature-scaled", "tab:blue", 0.5)):
        x = frame["lower"].to_numpy() + width * (0.25 + shift / 2)
        ax.bar(x, frame["accuracy"].fillna(0), width=width / 2, alpha=0.7, color=colour,
               label=label, edgecolor="black", linewidth=0.3)
        ax_n.bar(x, frame["images"] / max(int(frame["images"].sum()), 1), width=width / 2,
                 alpha=0.7, color=colour)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(ylabel="accuracy", ylim=(0, 1), title=title)
    ax.legend(fontsize=8, loc="upper left")
    ax_n.set(xlabel="confidence (top probability)", ylabel="share of images", xlim=(0, 1))
    for a in (ax, ax_n):
        a.grid(alpha=0.3)
    return _save(fig, path)


def risk_coverage_curves(curves: dict[str, pd.DataFrame], title: str, path: Path,
                         target: float | None = None, threshold: float | None = None) -> Path:
    """Accuracy of the kept images against the share kept (one line per evaluation set, frames
    of `calibration.risk_coverage`), with the target accuracy and, per set, the point of the
    review threshold chosen on validation."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, curve in curves.items():
        if curve.empty:
            continue
        line, = ax.plot(curve["coverage"], curve["accuracy"], "-", label=name)
        if threshold is not None:
            kept = curve[curve["threshold"] >= threshold]
            if len(kept):
                point = kept.iloc[-1]
                ax.plot(point["coverage"], point["accuracy"], "o", color=line.get_color())
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=1, label=f"target accuracy {target:g}")
    ax.set(xlabel="coverage (share of images kept, the rest sent to review)",
           ylabel="accuracy of the kept images", xlim=(0, 1.01), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, path)


def gallery(pictures: Sequence[np.ndarray], captions: Sequence[str], title: str, path: Path,
            columns: int = 4) -> Path:
    """A grid of RGB pictures (H x W x 3 uint8) with a caption under each."""
    n = max(len(pictures), 1)
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, picture, caption in zip(axes.ravel(), pictures, captions, strict=False):
        ax.imshow(picture)
        ax.set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def box_gallery(items: Sequence[tuple], path: Path, title: str = "white cell found (green), "
                "drawn by hand (yellow)", columns: int = 6) -> Path:
    """A gallery of images with boxes drawn on them.

    items: (pixels uint8 3 x H x W tensor or H x W x 3 array, found box (x0, y0, x1, y1) px or
    None, drawn boxes (a list of such tuples, may be empty), caption). Boxes are drawn 2 px wide
    at the image's own scale (PIL.ImageDraw)."""
    from PIL import Image, ImageDraw

    pictures, captions = [], []
    for pixels, found, drawn, caption in items:
        array = pixels.permute(1, 2, 0).numpy() if hasattr(pixels, "permute") else np.asarray(pixels)
        image = Image.fromarray(np.ascontiguousarray(array))
        draw = ImageDraw.Draw(image)
        width = max(1, round(max(image.size) / 160))
        for box in drawn:
            draw.rectangle(list(box), outline=(255, 215, 0), width=width)
        if found is not None:
            draw.rectangle(list(found), outline=(0, 200, 0), width=width)
        pictures.append(np.asarray(image))
        captions.append(caption)
    return gallery(pictures, captions, title, path, columns=columns)


GALLERY_PER_CLASS = 6  # images per class in a localisation gallery (prepare, external@)


def localisation_gallery(files: Sequence[Path], captions: Sequence[str], path: Path,
                         title: str = "white cell found (green box)") -> Path:
    """A gallery of image files with the white cell that `wbc_transfer.data.cells.locate` finds
    drawn on each (decoded by the product's one decoder); a file that cannot be read is left
    out. Captions: one per file (e.g. class and the localisation note)."""
    from wbc_transfer.data.cells import locate
    from wbc_transfer.data.images import ImageError, decode_file

    items = []
    for file, caption in zip(files, captions, strict=True):
        try:
            pixels = decode_file(file).pixels
        except ImageError:
            continue
        found = locate(pixels)
        items.append((pixels, found.box if found.found else None, [],
                      caption + ("" if found.found else " (no cell found)")))
    return box_gallery(items, path, title=title)
