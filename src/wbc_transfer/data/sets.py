"""Manifests, the decoded-image cache and batch augmentation.

Every image is decoded and resized once by the `prepare` stage and stored as a uint8 tensor
file (a DVC output); training and evaluation then index tensors in memory, so JPEG decoding
never competes with the model for the CPU.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from wbc_transfer.data.cells import model_view
from wbc_transfer.config import CELL_FRACTION, Params
from wbc_transfer.data.images import decode_file, joined
from wbc_transfer.io import text_path, write_torch

log = logging.getLogger(__name__)


@dataclass
class ImageSet:
    """Decoded images of one manifest (all its splits), resized to `size` x `size`."""

    images: torch.Tensor  # uint8, N x 3 x S x S
    labels: torch.Tensor  # int64, N
    paths: list[str]
    splits: list[str]
    classes: list[str]
    groups: list[str] = field(default_factory=list)  # the cell of each image (see grouping)
    view: str = "full"  # prepare.view the images were made with (wbc_transfer.data.cells.model_view)
    cell_fraction: float = CELL_FRACTION  # prepare.cell_fraction (view "cell" only)
    notes: list[str] = field(default_factory=list)  # per image: decoding + localisation notes

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, split: str, max_per_class: int | None = None, seed: int = 0) -> ImageSet:
        """Rows of one split, optionally capped per class (deterministic, by `seed`)."""
        idx = np.array([i for i, s in enumerate(self.splits) if s == split], dtype=np.int64)
        return self.take(self._capped(idx, max_per_class, seed))

    def _capped(self, idx: np.ndarray, max_per_class: int | None, seed: int) -> np.ndarray:
        if max_per_class is not None and len(idx):
            rng = np.random.default_rng(seed)
            labels = self.labels[idx].numpy()
            keep = []
            for c in np.unique(labels):
                members = idx[labels == c]
                if len(members) > max_per_class:
                    members = np.sort(rng.choice(members, max_per_class, replace=False))
                keep.append(members)
            idx = np.sort(np.concatenate(keep))
        return idx

    def resized(self, size: int) -> ImageSet:
        """The same images resized to size x size (torchvision, bilinear, antialiased; uint8);
        itself when already that size."""
        if size == self.size:
            return self
        images = TF.resize(self.images, [size, size], antialias=True) if len(self) else \
            self.images.new_zeros((0, 3, size, size))
        return ImageSet(images=images, labels=self.labels, paths=self.paths, splits=self.splits,
                        classes=self.classes, groups=self.groups, view=self.view,
                        cell_fraction=self.cell_fraction, notes=self.notes)

    def take(self, idx: np.ndarray | Sequence[int]) -> ImageSet:
        """The rows `idx` (int64 positions), in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        index = torch.from_numpy(idx)
        return ImageSet(
            images=self.images[index],
            labels=self.labels[index],
            paths=[self.paths[i] for i in idx],
            splits=[self.splits[i] for i in idx],
            classes=self.classes,
            groups=[self.groups[i] for i in idx] if self.groups else [],
            view=self.view, cell_fraction=self.cell_fraction,
            notes=[self.notes[i] for i in idx] if self.notes else [],
        )

    def save(self, path: Path) -> None:
        payload = {
            "images": self.images, "labels": self.labels, "paths": self.paths,
            "splits": self.splits, "classes": self.classes, "groups": self.groups,
            "view": self.view, "cell_fraction": self.cell_fraction, "notes": self.notes,
        }
        write_torch(path, payload)  # same tensors, same bytes (DVC sees no change)

    @classmethod
    def load(cls, path: Path) -> ImageSet:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `dvc repro prepare` first")
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return cls(**payload)


def decode_resized(file: Path, size: int, view: str = "full",
                   fraction: float = CELL_FRACTION) -> tuple[torch.Tensor, str]:
    """Decode an image file and make the network's view of it (`wbc_transfer.data.cells.model_view`:
    the whole image resized, or the white cell found, cropped and scaled): (uint8 tensor
    3 x size x size, note).

    Decoding is `wbc_transfer.data.images.decode_file`, the decoder of validate, predict and HTTP
    (EXIF orientation applied, 16-bit scaled to 8, conversions stated in the note); the note
    also carries the localisation's ("no white cell found ...", "2 white-cell candidates ...").
    Raises ImageError "<file>: <reason>" naming the file."""
    decoded = decode_file(file)
    pixels, note, _ = model_view(decoded.pixels, size, view, fraction)
    return pixels, joined(decoded.note, note)


def build_image_set(
    manifest: pd.DataFrame, images_dir: Path, classes: Sequence[str], size: int,
    view: str = "full", fraction: float = CELL_FRACTION,
) -> ImageSet:
    """Decode every manifest row (columns path, label, split; paths as
    `wbc_transfer.io.path_text` writes them, relative to images_dir) into one ImageSet, each
    image turned into the network's view by `decode_resized` (view, fraction: prepare.view,
    prepare.cell_fraction); the per-image notes are kept in `ImageSet.notes`.

    Raises ValueError for labels outside `classes`, ImageError naming the first file that
    cannot be decoded. Conversions (EXIF orientation, 16-bit, ...) are logged, counted by kind.
    """
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = set(manifest["label"]) - set(lookup)
    if unknown:
        raise ValueError(f"manifest has labels not in data.classes: {sorted(unknown)}")
    images = torch.empty((len(manifest), 3, size, size), dtype=torch.uint8)
    notes: Counter[str] = Counter()
    row_notes: list[str] = []
    for i, rel in enumerate(tqdm(manifest["path"], desc=f"decode + {view} view {size}px", unit="img",
                                 mininterval=2, leave=False)):
        images[i], note = decode_resized(images_dir / text_path(rel), size, view, fraction)
        row_notes.append(note)
        notes.update([note] if note else [])
    for note, n in sorted(notes.items()):
        log.info("%d image(s): %s", n, note)
    return ImageSet(
        images=images,
        labels=torch.tensor([lookup[c] for c in manifest["label"]], dtype=torch.int64),
        paths=manifest["path"].tolist(),
        splits=manifest["split"].tolist(),
        classes=list(classes),
        groups=manifest["group"].astype(str).tolist() if "group" in manifest else [],
        view=view, cell_fraction=fraction, notes=row_notes,
    )


class TrainAugment:
    """Random horizontal reflection (p=0.5) and random integer x/y translation, drawn per image.

    The shift is uniform in {-m, ..., m} pixels on each axis, m = floor(translate_px * size /
    reference_size) (30 px at 224 px, as in the paper), with zero fill. Parameters are drawn
    from torch's global (CPU) RNG for the whole batch at once, so `torch.manual_seed` makes an
    epoch reproducible; each image is then one slice copy (the former image-by-image
    torchvision v2 affine warp cost a large share of a small model's training step; see
    bench/NOTES.md). Works on uint8 or float batches, on any device.
    """

    def __init__(self, translate_px: int, reference_size: int, flip_p: float = 0.5):
        self.translate_px, self.reference_size, self.flip_p = translate_px, reference_size, flip_p

    def max_shift(self, size: int) -> int:
        return self.translate_px * size // self.reference_size

    def __call__(self, batch: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        n, _, h, w = batch.shape
        flip = torch.rand(n, generator=generator) < self.flip_p
        mx, my = self.max_shift(w), self.max_shift(h)
        dx = torch.randint(-mx, mx + 1, (n,), generator=generator)
        dy = torch.randint(-my, my + 1, (n,), generator=generator)
        return flip_and_shift(batch, flip, dx, dy)


def flip_and_shift(batch: torch.Tensor, flip: torch.Tensor, dx: torch.Tensor,
                   dy: torch.Tensor) -> torch.Tensor:
    """Per image i: reflect horizontally if flip[i], then shift right by dx[i] and down by dy[i]
    pixels (negative: left/up), filling with zeros. batch: N x C x H x W.

    One slice copy per image: for batch-sized inputs this beats a batched gather (which is
    also slower on uint8 and stalls when other processes hold the cores), see bench/NOTES.md.
    """
    _, _, h, w = batch.shape
    out = torch.zeros_like(batch)
    for i, (f, x, y) in enumerate(zip(flip.tolist(), dx.tolist(), dy.tolist(), strict=True)):
        if abs(x) >= w or abs(y) >= h:
            continue  # shifted out entirely: all zeros
        image = batch[i].flip(-1) if f else batch[i]
        out[i, :, max(y, 0) : h + min(y, 0), max(x, 0) : w + min(x, 0)] = \
            image[:, max(-y, 0) : h + min(-y, 0), max(-x, 0) : w + min(-x, 0)]
    return out


def normalise(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float32, scaled to [0, 1] and normalised per channel.

    In place on the one float copy (same arithmetic as out of place, half the memory traffic:
    64 images at 224 px normalise in ~13 ms instead of ~23 ms, see bench/NOTES.md).
    """
    return TF.normalize(batch.float().div_(255.0), list(mean), list(std), inplace=True)


MIN_TRAIN_BATCH = 2  # BatchNorm in train mode needs more than one value per channel


def batches(n: int, batch_size: int, generator: torch.Generator | None = None,
            shuffle: bool = False, min_last: int = 1) -> Iterator[torch.Tensor]:
    """Index batches (int64 tensors) over range(n), shuffled by `generator` if asked.

    A last batch smaller than `min_last` is merged into the one before it (training passes
    MIN_TRAIN_BATCH: a lone last image crashes BatchNorm, "Expected more than 1 value per
    channel"), so every image is still seen once; see `last_batch`.
    """
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < min_last:
        starts.pop()  # the remainder joins the previous batch
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else n
        yield order[start:end]


def batch_count(n: int, batch_size: int, min_last: int = 1) -> int:
    """How many batches `batches(n, batch_size, min_last=min_last)` yields."""
    count = -(-n // batch_size)
    return count - 1 if count > 1 and n - (count - 1) * batch_size < min_last else count


def last_batch(n: int, batch_size: int, min_last: int = MIN_TRAIN_BATCH) -> str:
    """How an epoch of n images ends, for MLflow params: e.g. 'merged: 1 image into the
    previous batch (92 batches, last of 4)' or 'full' / 'partial: 2 images'."""
    if n == 0:
        return "no images"
    count = batch_count(n, batch_size, min_last)
    last = n - (count - 1) * batch_size
    if last == batch_size:
        return f"full ({count} batches of {batch_size})"
    if last > batch_size:
        return (f"merged: {last - batch_size} image(s) into the previous batch "
                f"({count} batches, last of {last})")
    return f"partial ({count} batches, last of {last})"


def evaluation_sets(params: Params, protocol: str) -> dict[str, ImageSet]:
    """The sets a model of `protocol` is scored on: validation, paper_test (paper protocols), TEST,
    TEST_SIMPLE when present, and every external set of params `external`; name -> images,
    capped per class by evaluate.max_per_class (deterministic). FileNotFoundError names the
    stage to run when a prepared set is missing."""
    prepared = params.resolve(params.prepare.out_dir)
    cap, seed = params.evaluate.max_per_class, params.split.seed
    heldout = ImageSet.load(prepared / "heldout.pt")
    own = heldout if protocol == "heldout" else ImageSet.load(prepared / f"{protocol}.pt")
    sets: dict[str, ImageSet] = {"validation": own.subset("val")}
    if protocol != "heldout":
        sets["paper_test"] = own.subset("test", cap, seed)
    sets["TEST"] = heldout.subset("test", cap, seed)
    simple = heldout.subset("test_simple", cap, seed)
    if len(simple):
        sets["TEST_SIMPLE"] = simple
    # other labs' sets (stage external@<name>): scored whole, each image its own cell unless a
    # manifest gave groups; reported only, never chosen by
    external = params.resolve(params.prepare.external_dir)
    for name in params.external:
        if not (external / f"{name}.pt").is_file():
            raise FileNotFoundError(f"{external / name}.pt not found: run `dvc repro "
                                    f"external@{name}` (params `external.{name}`)")
        sets[name] = ImageSet.load(external / f"{name}.pt")
    return sets
