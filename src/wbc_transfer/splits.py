"""Deterministic split manifests (path, label, split) for the two evaluation protocols.

- ``paper``: `per_class` images per class sampled from TRAIN, stratified train/test
  (the study's protocol, near-duplicate leakage included), plus an optional validation
  set drawn from the rest of TRAIN.
- ``heldout``: train and validation drawn from TRAIN, test = the whole TEST folder
  (augmentations of other smears), plus TEST_SIMPLE when present.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

MANIFEST_COLUMNS = ["path", "label", "split"]


class SplitError(ValueError):
    pass


def _take(
    pool: pd.DataFrame, n: int, rng: np.random.Generator, what: str, label: str
) -> pd.DataFrame:
    if len(pool) < n:
        raise SplitError(f"{what}: asked for {n} images of {label}, only {len(pool)} available")
    picked = rng.choice(len(pool), size=n, replace=False)
    return pool.iloc[np.sort(picked)]


def _per_class(index: pd.DataFrame, folder: str, classes: Sequence[str]) -> dict[str, pd.DataFrame]:
    rows = index[index["folder"] == folder].sort_values("path")
    return {c: rows[rows["label"] == c] for c in classes}


def paper_split(
    index: pd.DataFrame,
    classes: Sequence[str],
    per_class: int,
    test_fraction: float,
    val_per_class: int,
    seed: int,
) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sampled, validation = [], []
    for cls, pool in _per_class(index, "TRAIN", classes).items():
        chosen = _take(pool, per_class, rng, "split.paper.per_class", cls)
        sampled.append(chosen)
        rest = pool.drop(chosen.index)
        if val_per_class:
            validation.append(_take(rest, val_per_class, rng, "split.paper.val_per_class", cls))
    sample = pd.concat(sampled)
    train, test = train_test_split(
        sample, test_size=test_fraction, stratify=sample["label"], random_state=seed
    )
    parts = [train.assign(split="train"), test.assign(split="test")]
    if validation:
        parts.append(pd.concat(validation).assign(split="val"))
    return _finish(parts)


def heldout_split(
    index: pd.DataFrame,
    classes: Sequence[str],
    train_per_class: int,
    val_per_class: int,
    seed: int,
) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    parts = []
    for cls, pool in _per_class(index, "TRAIN", classes).items():
        chosen = _take(pool, train_per_class + val_per_class, rng, "split.heldout train+val", cls)
        order = rng.permutation(len(chosen))
        parts.append(chosen.iloc[np.sort(order[:train_per_class])].assign(split="train"))
        if val_per_class:
            parts.append(chosen.iloc[np.sort(order[train_per_class:])].assign(split="val"))
    test = index[index["folder"] == "TEST"]
    if test.empty:
        raise SplitError("heldout protocol: the TEST folder has no usable images")
    parts.append(test.assign(split="test"))
    simple = index[index["folder"] == "TEST_SIMPLE"]
    if not simple.empty:
        parts.append(simple.assign(split="test_simple"))
    return _finish(parts)


def _finish(parts: list[pd.DataFrame]) -> pd.DataFrame:
    manifest = pd.concat(parts)[MANIFEST_COLUMNS]
    order = ["train", "val", "test", "test_simple"]
    manifest["split"] = pd.Categorical(manifest["split"], categories=order, ordered=True)
    manifest = manifest.sort_values(["split", "label", "path"])
    manifest["split"] = manifest["split"].astype(str)
    duplicated = manifest["path"][manifest["path"].duplicated()]
    if not duplicated.empty:
        raise SplitError(f"files in two splits: {duplicated.tolist()[:5]}")
    return manifest.reset_index(drop=True)


def counts(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for (split, label), n in manifest.groupby(["split", "label"]).size().items():
        table.setdefault(str(split), {})[str(label)] = int(n)
    return table
