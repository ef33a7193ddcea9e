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


def confusion_matrix(matrix: np.ndarray, classes: Sequence[str], title: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ConfusionMatrixDisplay(matrix, display_labels=[c.title() for c in classes]).plot(
        ax=ax, cmap="Blues", colorbar=False, values_format="d"
    )
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    return _save(fig, path)


def grouped_bars(table: pd.DataFrame, title: str, path: Path, ylabel: str = "score",
                 errors: pd.DataFrame | None = None) -> Path:
    """Bars of table (rows: groups on the x axis, columns: series)."""
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(table)), 4.2))
    table.plot.bar(ax=ax, rot=0, yerr=errors, capsize=3)
    ax.set(ylabel=ylabel, title=title, ylim=(0, 1.05))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)
