"""Groups: which original cell each image was augmented from.

TRAIN and TEST are augmentations (flips, rotations up to ~20 degrees, shifts, shear, small
crops, black fill at the corners) of a few hundred photographed cells, so images are not
independent: the unit of evaluation is the cell. Two images are the same cell when the red
cells around the white cell line up under one affine map: the classic near-duplicate test of
keypoint matching with geometric verification (Lowe, IJCV 2004, ratio test; Fischler &
Bolles 1981, RANSAC), here with OpenCV's SIFT keypoints (Lowe 2004; rotation and scale
invariant; the horizontally flipped image is described too, which covers every flip) and
`cv2.estimateAffine2D` (which covers rotation, shift, scale and shear). Tried and rejected
(measured on synthetic siblings, see the `groups` report): ImageNet CNN embeddings do not
separate cells of one class (to them every white cell of a class looks alike), and ORB
keypoints miss more than 5 % of sibling pairs.

Per (folder, class) block:
1. candidates: each image's `candidates` nearest images by a colour histogram of its
   non-black pixels (invariant to the geometry, cheap, specific to a smear's stain and light);
2. verification: SIFT matches (ratio test 0.8) + RANSAC affine; an edge when at least
   `min_inliers` matches agree;
3. groups: connected components of the edges (scipy.sparse.csgraph), then components are
   merged when a few members of one match a few members of one of its `candidates` nearest
   components (by mean histogram), until nothing changes.
Cross-block matches (TRAIN<->TEST, one class<->another) are looked for with the same test
between the components' representatives and listed.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.metrics.cluster import pair_confusion_matrix
from tqdm import tqdm

from wbc_transfer.data.images import decode_file
from wbc_transfer.io import text_path

log = logging.getLogger(__name__)

HIST_BINS = 16
BLACK = 30  # pixels whose channels are all <= this are augmentation fill, not image
SCALE = 0.5  # images are described at half size: 5x faster, same separation (bench/NOTES.md)


@dataclass(frozen=True)
class GroupingSettings:
    """candidates: histogram neighbours verified per image (and per component in the merge
    pass); min_inliers: RANSAC inliers that make two images one cell; features: SIFT keypoints
    per view (at most); representatives: members per component compared in the merge pass;
    workers: processes that describe images."""

    candidates: int = 15
    min_inliers: int = 10
    features: int = 300
    representatives: int = 3
    workers: int = 2


@dataclass
class Described:
    """One image's colour histogram (float32, HIST_BINS^3, unit norm) and SIFT keypoints
    (float32 K x 2 px) + descriptors (float32 K x 128) of the image and of its horizontal flip."""

    histogram: np.ndarray
    views: list[tuple[np.ndarray, np.ndarray | None]]


def read_pixels(file: str | Path) -> np.ndarray:
    """uint8 H x W x 3 (RGB) pixels of an image file, through the product's one decoder
    (`wbc_transfer.data.images.decode_file`: EXIF orientation, 16-bit scaling); raises ImageError
    naming the file."""
    return np.ascontiguousarray(decode_file(file).pixels.permute(1, 2, 0).numpy())


def describe(image: np.ndarray, features: int = 300) -> Described:
    """Histogram + SIFT keypoints of a uint8 H x W x 3 image (RGB), resized by SCALE, and of its
    mirror image; keypoints only where the image is not black augmentation fill."""
    image = cv2.resize(image, None, fx=SCALE, fy=SCALE, interpolation=cv2.INTER_AREA)
    content = image.max(axis=2) > BLACK
    codes = (image[content].astype(np.int64) * HIST_BINS) // 256
    hist = np.bincount((codes[:, 0] * HIST_BINS + codes[:, 1]) * HIST_BINS + codes[:, 2],
                       minlength=HIST_BINS**3).astype(np.float32)
    hist = np.sqrt(hist / max(hist.sum(), 1.0))
    hist /= max(float(np.linalg.norm(hist)), 1e-12)
    mask = cv2.erode(content.astype(np.uint8) * 255, np.ones((5, 5), np.uint8))
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    sift = cv2.SIFT_create(nfeatures=features)
    views = []
    for g, m in ((gray, mask), (np.ascontiguousarray(gray[:, ::-1]), np.ascontiguousarray(mask[:, ::-1]))):
        keypoints, descriptors = sift.detectAndCompute(g, m)
        points = np.float32([k.pt for k in keypoints]) if keypoints else np.zeros((0, 2), np.float32)
        views.append((points, descriptors))
    return Described(hist, views)


def _describe_file(args: tuple[str, int]) -> Described:
    cv2.setNumThreads(1)
    return describe(read_pixels(args[0]), args[1])


def worker_pool(settings: GroupingSettings) -> ProcessPoolExecutor | None:
    """A pool of `settings.workers` *spawned* processes (forking a process that has used
    OpenCV's thread pool can deadlock the child), or None for one process."""
    if settings.workers < 2:
        return None
    return ProcessPoolExecutor(settings.workers, mp_context=multiprocessing.get_context("spawn"))


def describe_files(files: Sequence[str | Path], settings: GroupingSettings,
                   desc: str = "describe", pool: ProcessPoolExecutor | None = None,
                   ) -> list[Described]:
    """`describe` of each file (in `pool` when given), with a progress bar."""
    jobs = [(os.fspath(f), settings.features) for f in files]
    results = pool.map(_describe_file, jobs, chunksize=16) if pool is not None \
        else map(_describe_file, jobs)
    return list(tqdm(results, total=len(jobs), desc=desc, unit="img", mininterval=2))


_MATCHER = cv2.BFMatcher(cv2.NORM_L2)


def inliers(a: Described, b: Described) -> int:
    """Most RANSAC-affine inliers among ratio-test SIFT matches of `a` to `b` or to b's mirror
    image (0 when too few keypoints)."""
    points_a, desc_a = a.views[0]
    best = 0
    if desc_a is None or len(desc_a) < 3:
        return 0
    for points_b, desc_b in b.views:
        if desc_b is None or len(desc_b) < 3:
            continue
        pairs = _MATCHER.knnMatch(desc_a, desc_b, k=2)
        good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < 0.8 * p[1].distance]
        if len(good) < 6:
            continue
        src = points_a[[g.queryIdx for g in good]]
        dst = points_b[[g.trainIdx for g in good]]
        _, mask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=2.0)
        if mask is not None:
            best = max(best, int(mask.sum()))
    return best


def _components(n: int, edges: list[tuple[int, int]]) -> np.ndarray:
    rows = [i for i, _ in edges]
    cols = [j for _, j in edges]
    graph = coo_matrix((np.ones(len(edges)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def _representatives(labels: np.ndarray, k: int) -> dict[int, np.ndarray]:
    return {int(c): np.flatnonzero(labels == c)[:k] for c in np.unique(labels)}


def nearest(vectors: np.ndarray, k: int, excluded: np.ndarray | None = None) -> np.ndarray:
    """(N, k) int indices: for each row of unit vectors (N x D), the k others of highest
    cosine similarity; pairs where `excluded` (bool N x N) is True are never chosen."""
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    if excluded is not None:
        similarity[excluded] = -np.inf
    return np.argpartition(-similarity, k - 1, axis=1)[:, :k]


def cluster(described: Sequence[Described], settings: GroupingSettings,
            desc: str = "match") -> np.ndarray:
    """Component label (int64, N) per image of one block: same label = same cell."""
    n = len(described)
    if n < 2:
        return np.zeros(n, dtype=np.int64)
    hist = np.stack([d.histogram for d in described])
    neighbours = nearest(hist, min(settings.candidates, n - 1))
    checked: set[tuple[int, int]] = set()
    edges: list[tuple[int, int]] = []
    for i in tqdm(range(n), desc=desc, unit="img", mininterval=2):
        for j in neighbours[i]:
            pair = (min(i, int(j)), max(i, int(j)))
            if pair in checked:
                continue
            checked.add(pair)
            if inliers(described[pair[0]], described[pair[1]]) >= settings.min_inliers:
                edges.append(pair)
    return merge_components(described, _components(n, edges), settings)


def merge_components(described: Sequence[Described], labels: np.ndarray,
                     settings: GroupingSettings) -> np.ndarray:
    """Merge components of one cell that the per-image candidates did not connect: each
    component is compared with its `candidates` nearest components by mean histogram, through
    up to `representatives` x `representatives` member pairs; repeated until nothing merges."""
    rng = np.random.default_rng(0)
    hist = np.stack([d.histogram for d in described])
    while True:
        ids = np.unique(labels)
        if len(ids) < 2:
            return labels
        members = {int(c): np.flatnonzero(labels == c) for c in ids}
        reps = {c: (m if len(m) <= settings.representatives
                    else rng.choice(m, settings.representatives, replace=False))
                for c, m in members.items()}
        centroids = np.stack([hist[members[int(c)]].mean(0) for c in ids])
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
        edges: list[tuple[int, int]] = []
        for a, near in enumerate(nearest(centroids, min(settings.candidates, len(ids) - 1))):
            for b in near:
                if a < b and any(inliers(described[i], described[j]) >= settings.min_inliers
                                 for i in reps[int(ids[a])] for j in reps[int(ids[b])]):
                    edges.append((int(members[int(ids[a])][0]), int(members[int(ids[b])][0])))
        if not edges:
            return labels
        same = [(int(i), int(j)) for c in ids for i, j in zip(members[int(c)][:-1], members[int(c)][1:],
                                                             strict=True)]
        labels = _components(len(labels), same + edges)


def assign_groups(index: pd.DataFrame, images_dir: Path, settings: GroupingSettings,
                  ) -> tuple[pd.Series, pd.DataFrame]:
    """(group id per row of `index` (columns path, folder, label), cross-block matches).

    Group ids are '<folder>/<label>/<nnn>', numbered by each component's first path, so the
    same images always get the same ids."""
    groups = pd.Series("", index=index.index, dtype=object)
    reps: list[tuple[str, Described]] = []
    pool = worker_pool(settings)
    try:
        for (folder, label), block in index.groupby(["folder", "label"], sort=True):
            rows = block.sort_values("path")
            described = describe_files([images_dir / text_path(p) for p in rows["path"]], settings,
                                       f"describe {folder}/{label}", pool)
            labels = cluster(described, settings, desc=f"match {folder}/{label}")
            first = pd.Series(rows["path"].to_numpy()).groupby(labels).min().sort_values()
            number = {lab: i for i, lab in enumerate(first.index)}
            groups[rows.index] = [f"{folder}/{label}/{number[lab]:03d}" for lab in labels]
            for lab, members in _representatives(labels, 1).items():
                reps.append((f"{folder}/{label}/{number[lab]:03d}", described[int(members[0])]))
            log.info("%s/%s: %d images -> %d cells", folder, label, len(rows), len(number))
    finally:
        if pool is not None:
            pool.shutdown()
    return groups, cross_block_matches(reps, settings)


def match_kind(a: str, b: str) -> str:
    """How two matched groups '<folder>/<class>/<n>' relate: "cross-class" (two white cells of
    one photo, or a label error), "original" (a TEST cell and its TEST_SIMPLE original:
    expected), else "cross-folder" (one cell in TRAIN and a test folder: a leak)."""
    (folder_a, class_a, _), (folder_b, class_b, _) = a.split("/"), b.split("/")
    if class_a != class_b:
        return "cross-class"
    if {folder_a, folder_b} == {"TEST", "TEST_SIMPLE"}:
        return "original"
    return "cross-folder"


def cross_block_matches(reps: Sequence[tuple[str, Described]], settings: GroupingSettings,
                        ) -> pd.DataFrame:
    """Pairs of groups from different (folder, class) blocks whose representatives are one
    cell by the same test (each group against its `candidates` nearest other-block groups by
    histogram)."""
    rows = []
    if len(reps) > 1:
        hist = np.stack([d.histogram for _, d in reps])
        block = np.array([g.rsplit("/", 1)[0] for g, _ in reps])
        seen: set[tuple[int, int]] = set()
        neighbours = nearest(hist, min(settings.candidates, len(reps) - 1),
                             excluded=block[:, None] == block[None, :])
        for i, near in enumerate(neighbours):
            for j in near:
                pair = (min(i, int(j)), max(i, int(j)))
                if block[pair[0]] == block[pair[1]] or pair in seen:
                    continue
                seen.add(pair)
                n = inliers(reps[pair[0]][1], reps[pair[1]][1])
                if n >= settings.min_inliers:
                    a, b = reps[pair[0]][0], reps[pair[1]][0]
                    rows.append({"group_a": a, "group_b": b, "inliers": n, "kind": match_kind(a, b)})
    return pd.DataFrame(rows, columns=["group_a", "group_b", "inliers", "kind"])


def sibling_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One augmented copy of a uint8 H x W x 3 image, in the family the dataset was made with
    (Keras-style): random horizontal/vertical flips, rotation up to 20 degrees, shift up to 10 %,
    shear up to 10 degrees, zoom 0.9-1.1, black fill (cv2.warpAffine)."""
    h, w = image.shape[:2]
    if rng.random() < 0.5:
        image = image[:, ::-1]
    if rng.random() < 0.5:
        image = image[::-1]
    angle = np.deg2rad(rng.uniform(-20, 20))
    shear = np.deg2rad(rng.uniform(-10, 10))
    zoom = rng.uniform(0.9, 1.1)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    linear = zoom * rotation @ np.array([[1.0, np.tan(shear)], [0.0, 1.0]])
    centre = np.array([w / 2, h / 2])
    shift = rng.uniform(-0.1, 0.1, size=2) * (w, h)
    matrix = np.hstack([linear, (centre - linear @ centre + shift)[:, None]])
    return cv2.warpAffine(np.ascontiguousarray(image), matrix, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def pair_scores(true_ids: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Pairwise precision and recall of "same cell" (scikit-learn `pair_confusion_matrix`)."""
    (_, fp), (fn, tp) = pair_confusion_matrix(true_ids, predicted)
    return {"pairs_same_cell": int(tp + fn) // 2,
            "precision": float(tp / (tp + fp)) if tp + fp else 1.0,
            "recall": float(tp / (tp + fn)) if tp + fn else 1.0}


def sibling_check(sources: Sequence[np.ndarray], settings: GroupingSettings, siblings: int,
                  seed: int) -> dict[str, object]:
    """Precision/recall of "same cell" on synthetic siblings: `siblings` augmented copies of
    each source image (uint8 H x W x 3 RGB; one source = one distinct cell), all clustered
    together as one block with `settings`."""
    rng = np.random.default_rng(seed)
    images, source = [], []
    for i, image in enumerate(sources):
        for _ in range(siblings):
            images.append(sibling_augment(image, rng))
            source.append(i)
    described = [describe(im, settings.features) for im in tqdm(images, desc="siblings",
                                                                   unit="img", mininterval=2)]
    predicted = cluster(described, settings)
    return {"cells": len(sources), "siblings_per_cell": siblings, "images": len(images),
            "clusters_found": int(len(set(predicted.tolist()))),
            **pair_scores(np.array(source), predicted)}
