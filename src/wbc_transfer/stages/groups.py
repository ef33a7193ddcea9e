"""DVC stage `groups`: assign every indexed image to its original cell, and say how well
(see `wbc_transfer.data.grouping` for the method).

Writes `groups.manifest` (path, label, folder, group), `groups.json` (metrics: groups per
folder and class, group sizes, sibling precision/recall, cross-folder/cross-class matches) and
`groups.md` (the same for people).
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from wbc_transfer.config import Params
from wbc_transfer.data.grouping import (
    GroupingSettings,
    assign_groups,
    pair_scores,
    read_pixels,
    sibling_check,
)
from wbc_transfer.io import text_path, write_csv, write_json, write_text

log = logging.getLogger(__name__)

ORIGINALS = "dataset-master/dataset-master"  # the Kaggle archive's 366 original smear photos
SIZE = (320, 240)  # the size of the augmented TRAIN/TEST images


def settings_of(params: Params) -> GroupingSettings:
    g = params.groups
    return GroupingSettings(candidates=g.candidates, min_inliers=g.min_inliers,
                            features=g.features, workers=g.workers)


METHOD = ("SIFT keypoints (image + mirror image) matched with the ratio test, RANSAC affine "
          "verification (>= {min_inliers} inliers = same cell) between each image and its "
          "{candidates} nearest images by colour histogram, connected components per folder and "
          "class, then components merged the same way")


def original_images(root: Path, n: int, seed: int) -> list[np.ndarray]:
    """Up to `n` distinct original smear photos (the archive's dataset-master JPEGImages, one
    white cell each), resized to 320 x 240 as the TRAIN/TEST images were before augmentation;
    [] when the archive lacks them."""
    folder = root / ORIGINALS / "JPEGImages"
    files = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    if not files:
        return []
    rng = np.random.default_rng(seed)
    return [cv2.resize(read_pixels(files[i]), SIZE, interpolation=cv2.INTER_AREA)
            for i in np.sort(rng.choice(len(files), size=min(n, len(files)), replace=False))]


def sibling_sources(params: Params, index: pd.DataFrame, groups: pd.Series) -> tuple[list, str]:
    """(images of distinct cells, where they come from): original smear crops when the archive
    has them, else one image of each of `sibling_cells` groups."""
    g = params.groups
    originals = original_images(params.resolve(params.data.root), g.sibling_cells, g.seed)
    if originals:
        return originals, (f"{len(originals)} distinct original smear photos (dataset-master "
                           f"JPEGImages, resized to 320 x 240)")
    one = index.assign(group=groups.to_numpy()).sort_values("path").groupby("group").head(1)
    one = one.sample(n=min(g.sibling_cells, len(one)), random_state=g.seed).sort_values("path")
    return ([read_pixels(params.images_dir / text_path(p)) for p in one["path"]],
            f"{len(one)} images, each of a different group")


def unite_across_folders(groups: pd.Series, matches: pd.DataFrame) -> pd.Series:
    """One id for a cell found in two folders (a same-class match across folders): the TRAIN
    (or TEST_SIMPLE) copies take the id of the TEST group, so the splits keep that cell out of
    training and a TEST cell and its TEST_SIMPLE original are one cell in the statistics.
    Cross-class matches (two white cells of one photo) keep their ids; they are only listed."""
    same_cell = matches[matches["kind"].isin(["cross-folder", "original"])]
    rename: dict[str, str] = {}
    for a, b in zip(same_cell["group_a"], same_cell["group_b"], strict=True):
        keep, drop = sorted((a, b), key=lambda g: (not g.startswith("TEST/"), g))
        rename[drop] = rename.get(keep, keep)
    return groups.replace(rename)


def file_name_agreement(index: pd.DataFrame, groups: pd.Series) -> dict[str, float] | None:
    """Pairwise precision/recall of the groups against the Kaggle file-name prefix k of
    `_<k>_<n>.jpeg` (per folder and class), when every file is named that way. The mirror's
    README says the names do not identify the cell; this measures how far they agree."""
    k = index["path"].str.extract(r"/_(\d+)_\d+\.[^/]+$")[0]
    if k.isna().any() or index.empty:
        return None
    key = index["folder"] + "/" + index["label"] + "/" + k
    return pair_scores(pd.factorize(key)[0], pd.factorize(groups)[0])


def main(params: Params) -> dict[str, object]:
    g = params.groups
    settings = settings_of(params)
    index = pd.read_csv(params.resolve(params.validate.index))
    index = index[index["label"].isin(params.data.classes)].sort_values("path").reset_index(drop=True)
    log.info("grouping %d images: SIFT + RANSAC affine, %d inliers", len(index), settings.min_inliers)
    groups, matches = assign_groups(index, params.images_dir, settings)
    groups = unite_across_folders(groups, matches)
    manifest = index[["path", "label", "folder"]].assign(group=groups.to_numpy())
    write_csv(params.resolve(g.manifest), manifest)

    sources, origin = sibling_sources(params, index, groups)
    siblings = {**sibling_check(sources, settings, g.siblings_per_cell, g.seed), "sources": origin}
    sizes = manifest.groupby("group").size()
    per_block = manifest.groupby(["folder", "label"]).agg(
        images=("path", "size"), groups=("group", "nunique"))
    report = {
        "method": METHOD.format(min_inliers=settings.min_inliers, candidates=settings.candidates),
        "images": int(len(manifest)), "groups": int(manifest["group"].nunique()),
        "groups_per_folder_class": {
            f"{folder}/{label}": {"images": int(r.images), "groups": int(r.groups)}
            for (folder, label), r in per_block.iterrows()},
        "group_size": {"min": int(sizes.min()), "median": float(np.median(sizes)),
                       "max": int(sizes.max()), "singletons": int((sizes == 1).sum())},
        "synthetic_siblings": siblings,
        "cross_folder_matches": int((matches["kind"] == "cross-folder").sum()),
        "test_simple_originals_matched": int((matches["kind"] == "original").sum()),
        "cross_class_matches": int((matches["kind"] == "cross-class").sum()),
        "matches": matches.to_dict(orient="records"),
        "file_name_agreement": file_name_agreement(index, groups),
    }
    report_dir = params.resolve(params.validate.report_dir)
    write_json(report_dir / "groups.json", report)
    write_text(report_dir / "groups.md", groups_note(report, g.target_recall, g.target_precision))
    log.info("groups: %d images -> %d cells; siblings P %.4f R %.4f; %d cross-block matches",
             report["images"], report["groups"], siblings["precision"], siblings["recall"],
             len(matches))
    return report


def groups_note(report: dict, target_recall: float, target_precision: float) -> str:
    """The groups report in Markdown."""
    s = report["synthetic_siblings"]
    ok = s["recall"] >= target_recall and s["precision"] >= target_precision
    lines = [
        "# Groups: one group per original cell", "",
        f"Method: {report['method']}.", "",
        f"{report['images']} images -> **{report['groups']} cells (groups)**; group size min "
        f"{report['group_size']['min']}, median {report['group_size']['median']:g}, max "
        f"{report['group_size']['max']} ({report['group_size']['singletons']} singletons).", "",
        "| folder / class | images | cells |", "| --- | ---: | ---: |",
        *[f"| {k} | {v['images']} | {v['groups']} |" for k, v in report["groups_per_folder_class"].items()],
        "",
        "## How well \"same cell\" is recognised", "",
        f"Synthetic siblings: {s['sources']}, {s['siblings_per_cell']} "
        f"augmented copies each (flips, rotation <= 20 deg, shift <= 10 %, shear <= 10 deg, zoom "
        f"0.9-1.1, black fill), clustered with the same settings: pairwise **precision {s['precision']:.4f}, "
        f"recall {s['recall']:.4f}** ({s['clusters_found']} clusters for {s['cells']} cells; goal "
        f"recall >= {target_recall} at precision >= {target_precision}: "
        f"{'met' if ok else 'NOT met'}).", "",
        f"Cross-folder (TRAIN<->TEST) matches: {report['cross_folder_matches']}; cross-class "
        f"matches: {report['cross_class_matches']} (expected 0 for both).",
    ]
    if report["matches"]:
        lines += ["", "| group a | group b | RANSAC inliers | kind |", "| --- | --- | ---: | --- |",
                  *[f"| {m['group_a']} | {m['group_b']} | {m['inliers']} | {m['kind']} |"
                    for m in report["matches"]]]
    agreement = report.get("file_name_agreement")
    if agreement:
        lines += ["", f"Agreement with the Kaggle file-name prefix `_<k>_` (per folder and class; "
                      f"not used to group): pairwise precision {agreement['precision']:.4f}, "
                      f"recall {agreement['recall']:.4f}."]
    return "\n".join(lines) + "\n"
