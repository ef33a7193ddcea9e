"""Deterministic, group-aware split manifests (path, label, group, split) for the protocols.

A *group* is one original cell: every augmented copy of it (see `grouping`). Every split
made inside TRAIN keeps a group on one side only, except where a protocol reproduces the
study's leaky design on purpose:

- validation groups: one fold of scikit-learn's `StratifiedGroupKFold` over TRAIN (about
  `val_fraction` of each class's cells), shared by every protocol, so that per-epoch
  validation, checkpoint choice, early stopping, tuning and promotion all score the same
  leak-free images (at most `val_per_class` per class, spread over the cells);
- ``paper``: the study, as published: `per_class` images per class drawn at random from the
  other TRAIN groups, then a random stratified `test_fraction` test split of *images*
  (copies of one cell land on both sides: the leak the study had);
- ``paper_grouped``: the same 400-image design, but the 70/30 split is a
  `StratifiedGroupKFold` fold, so no cell is on both sides;
- ``heldout``: the leak-free protocol that uses the data: train on every non-validation TRAIN
  group (up to `train_per_class` images per class, spread evenly over the class's cells),
  validate on the validation groups, test on the whole TEST folder (+ TEST_SIMPLE).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

MANIFEST_COLUMNS = ["path", "label", "group", "split"]
SPLIT_ORDER = ["train", "val", "test", "test_simple"]


class SplitError(ValueError):
    """A split cannot be made as the parameters ask (too few images or cells)."""


def _train_pool(index: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """TRAIN images of `classes`, less the cells that are also in TEST (the groups stage found
    a few: the Kaggle TEST folder is not entirely disjoint from TRAIN)."""
    if "group" not in index.columns:
        raise SplitError("the index has no `group` column: run the `groups` stage first")
    test_cells = set(index.loc[index["folder"] != "TRAIN", "group"])
    rows = index[(index["folder"] == "TRAIN") & index["label"].isin(classes)
                 & ~index["group"].isin(test_cells)]
    return rows.sort_values("path").reset_index(drop=True)


def _n_splits(fraction: float, what: str) -> int:
    n = round(1 / fraction)
    if n < 2:
        raise SplitError(f"{what} must be at most 0.5 to make a group split, got {fraction}")
    return n


def _group_fold(rows: pd.DataFrame, fraction: float, seed: int, what: str) -> np.ndarray:
    """Boolean mask of `rows` in one `StratifiedGroupKFold` fold (~`fraction` of each class's
    groups); needs at least round(1/fraction) groups per class."""
    n_splits = _n_splits(fraction, what)
    per_class = rows.groupby("label")["group"].nunique()
    short = per_class[per_class < n_splits]
    if not short.empty:
        raise SplitError(f"{what}={fraction}: needs at least {n_splits} cells (groups) per class; "
                         f"only {short.to_dict()}")
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, held = next(folds.split(rows, rows["label"], groups=rows["group"]))
    mask = np.zeros(len(rows), dtype=bool)
    mask[held] = True
    return mask


def spread_over_groups(rows: pd.DataFrame, n: int | None, rng: np.random.Generator) -> pd.DataFrame:
    """Up to `n` rows of one class, spread evenly over its groups (round robin in a random
    group order, a random image of each group at a time); all rows when n is None."""
    if n is None or n >= len(rows):
        return rows
    order = rng.permutation(len(rows))
    shuffled = rows.iloc[order]
    rank = shuffled.groupby("group").cumcount().to_numpy()  # 0 for each group's first pick
    group_order = {g: i for i, g in enumerate(rng.permutation(shuffled["group"].unique()))}
    key = rank * len(group_order) + shuffled["group"].map(group_order).to_numpy()
    return shuffled.iloc[np.argsort(key, kind="stable")[:n]]


def validation_split(index: pd.DataFrame, classes: Sequence[str], val_fraction: float,
                     val_per_class: int | None, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(validation rows, the other TRAIN rows): validation = one group fold of TRAIN,
    capped at `val_per_class` images per class spread over its cells."""
    pool = _train_pool(index, classes)
    held = _group_fold(pool, val_fraction, seed, "split.val_fraction")
    rng = np.random.default_rng(seed)
    val = pd.concat(spread_over_groups(rows, val_per_class, rng)
                    for _, rows in pool[held].groupby("label", sort=True))
    return val, pool[~held]


def _sample_per_class(pool: pd.DataFrame, classes: Sequence[str], n: int,
                      rng: np.random.Generator, what: str) -> pd.DataFrame:
    parts = []
    for cls in classes:
        rows = pool[pool["label"] == cls]
        if len(rows) < n:
            raise SplitError(f"{what}: asked for {n} images of {cls}, only {len(rows)} available")
        parts.append(rows.iloc[np.sort(rng.choice(len(rows), size=n, replace=False))])
    return pd.concat(parts)


def paper_split(index: pd.DataFrame, classes: Sequence[str], per_class: int, test_fraction: float,
                val_fraction: float, val_per_class: int | None, seed: int,
                grouped: bool = False) -> pd.DataFrame:
    """The study's design: `per_class` random TRAIN images per class split `test_fraction`
    stratified; by image (leaky, as published) or, `grouped`, by cell. Validation: the shared
    validation groups, whose cells are in neither part."""
    val, pool = validation_split(index, classes, val_fraction, val_per_class, seed)
    rng = np.random.default_rng(seed)
    sample = _sample_per_class(pool, classes, per_class, rng, "split.paper.per_class")
    if grouped:
        held = _group_fold(sample.reset_index(drop=True), test_fraction, seed,
                           "split.paper.test_fraction (paper_grouped)")
        sample = sample.reset_index(drop=True)
        train, test = sample[~held], sample[held]
    else:
        train, test = train_test_split(sample, test_size=test_fraction, stratify=sample["label"],
                                       random_state=seed)
    return _finish([train.assign(split="train"), test.assign(split="test"),
                    val.assign(split="val")])


def heldout_split(index: pd.DataFrame, classes: Sequence[str], train_per_class: int | None,
                  val_fraction: float, val_per_class: int | None, seed: int) -> pd.DataFrame:
    """Leak-free: train on the non-validation TRAIN groups (up to `train_per_class` per class,
    spread over the cells), validate on the validation groups, test on TEST (+ TEST_SIMPLE)."""
    val, pool = validation_split(index, classes, val_fraction, val_per_class, seed)
    rng = np.random.default_rng(seed + 1)
    train = pd.concat(spread_over_groups(pool[pool["label"] == c], train_per_class, rng)
                      for c in classes)
    parts = [train.assign(split="train"), val.assign(split="val")]
    test = index[(index["folder"] == "TEST") & index["label"].isin(classes)]
    if test.empty:
        raise SplitError("heldout protocol: the TEST folder has no usable images")
    parts.append(test.assign(split="test"))
    simple = index[(index["folder"] == "TEST_SIMPLE") & index["label"].isin(classes)]
    if not simple.empty:
        parts.append(simple.assign(split="test_simple"))
    return _finish(parts)


def _finish(parts: list[pd.DataFrame]) -> pd.DataFrame:
    manifest = pd.concat(parts)[MANIFEST_COLUMNS].copy()
    manifest["split"] = pd.Categorical(manifest["split"], categories=SPLIT_ORDER, ordered=True)
    manifest = manifest.sort_values(["split", "label", "path"])
    manifest["split"] = manifest["split"].astype(str)
    duplicated = manifest["path"][manifest["path"].duplicated()]
    if not duplicated.empty:
        raise SplitError(f"files in two splits: {duplicated.tolist()[:5]}")
    return manifest.reset_index(drop=True)


def shared_groups(manifest: pd.DataFrame, query: str, reference: str) -> dict[str, object]:
    """How many `query` images (and cells) have their cell (group) in the `reference` split:
    the exact leakage count, by groups."""
    q = manifest[manifest["split"] == query]
    ref = set(manifest.loc[manifest["split"] == reference, "group"])
    hit = q["group"].isin(ref)
    return {"images": int(len(q)), "cells": int(q["group"].nunique()),
            "with_sibling": int(hit.sum()), "cells_shared": int(q.loc[hit, "group"].nunique()),
            "fraction": round(float(hit.mean()), 4) if len(q) else 0.0}


def counts(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    """split -> class -> number of images."""
    table: dict[str, dict[str, int]] = {}
    for (split, label), n in manifest.groupby(["split", "label"]).size().items():
        table.setdefault(str(split), {})[str(label)] = int(n)
    return table


def group_counts(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    """split -> class -> number of cells (groups)."""
    table: dict[str, dict[str, int]] = {}
    for (split, label), n in manifest.groupby(["split", "label"])["group"].nunique().items():
        table.setdefault(str(split), {})[str(label)] = int(n)
    return table
