"""Where is the white cell? Cell localisation and the normalised cell view.

One function, `locate`, finds the white cell in any RGB image (a 640x480 smear field, a Kaggle
320x240 crop with black augmentation fill, a 120 px tecom cell, a 360 px CellaVision cell) and
`cell_view` cuts a square crop centred on it, scaled so that the cell spans a fixed fraction of
the output side. Every place an image enters a model goes through `wbc_transfer.views.to_input`,
which calls these: prepare, `external@`, evaluate, predict, the pyfunc/HTTP path and Grad-CAM.

The method (chosen by measurement on the hand-drawn boxes of ../shared/data/bccd-wbc-boxes,
bench/LOCALISE.md) is a classical stain pipeline at a working resolution of WORK_SIDE px:

1. Nucleus: the stain score max(R, B) - G (a Romanowsky-stained nucleus is violet: high red
   and blue, low green; glass and red cells score low); the upper threshold of a three-class
   Otsu (`skimage.filters.threshold_multiotsu`) over the image's non-fill pixels, bounded below
   by an absolute floor so that an image with no nucleus (blank, red cells only) yields
   nothing. The haematoxylin channel of colour deconvolution (`skimage.color.rgb2hed`) was
   measured beside it: it separates nucleus from the rest by 2.3x, the stain score by 3x.
   Lobes of one nucleus are joined (a closing, then blobs within a nucleus radius); the
   largest blob is the nucleus.
2. Cell: the nucleus box made half-way square and scaled by CELL_MARGIN (fitted on half of the
   drawn boxes). A watershed from the nucleus into the stained pixels around it was measured
   first and lost (median IoU 0.65): the pale cytoplasm is as bright as the glass, and red
   cells touching the white cell are darker than it, so the region grew into red cells or
   stopped at the nucleus.

An image with no nucleus blob is "not found": the view falls back to the whole image (padded to
a square) and says so in the note. Two or more nucleus blobs of comparable size far apart are
"several": the largest is taken and the note says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from skimage.filters import threshold_multiotsu
from torchvision.transforms.v2 import functional as TF

from wbc_transfer.config import CELL_FRACTION, VIEWS

WORK_SIDE = 160  # px: the longer side of the working copy (speed: ~3 ms per image)
FILL_MAX = 12  # a pixel whose channels are all <= this is augmentation fill (black), not data
NUCLEUS_FLOOR = 45  # min stain score (0..255) of a nucleus pixel: red cells stay below ~40
NOT_FOUND = "no white cell found"  # the start of every not-found note
SEVERAL = "white-cell candidates"  # in every several-cells note
MIN_NUCLEUS_FRACTION = 0.002  # of the working image's pixels: smaller blobs are debris/platelets
_ELLIPSE5 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))  # closing: joins nucleus lobes
_ELLIPSE3 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))  # opening: drops specks
SECOND_CELL_AREA = 0.5  # a second blob this large (x the first) and far away: two white cells
# cell box = nucleus box, half-way to a square, x 1.3: fitted on the even-numbered rows of
# bccd-wbc-boxes (median IoU 0.813), 0.797 on the odd ones (bench/LOCALISE.md)
CELL_MARGIN = 1.3
SQUARENESS = 0.5


@dataclass(frozen=True)
class CellBox:
    """The white cell found in one image, in the image's pixel coordinates.

    box: (x0, y0, x1, y1) float px, VOC-style (origin top-left, x1/y1 exclusive) of the cell
    (nucleus and cytoplasm); the whole image when not found. nucleus: the nucleus box, same
    convention (None when not found). found: whether a nucleus was found. cells: number of
    white-cell candidates seen (0, 1 or more). note: '' or a phrase for index.csv / predict.
    """

    box: tuple[float, float, float, float]
    nucleus: tuple[float, float, float, float] | None
    found: bool
    cells: int
    note: str

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def side(self) -> float:
        """The longer side of the cell box, px."""
        x0, y0, x1, y1 = self.box
        return max(x1 - x0, y1 - y0)


def locate(pixels: torch.Tensor) -> CellBox:
    """Find the white cell in one image.

    pixels: uint8 tensor 3 x H x W, RGB (as `wbc_transfer.data.images.decode_bytes` returns it),
    any size >= 1 x 1. Returns a CellBox in the image's coordinates. Never raises for a valid
    image: an image without a white cell gives found=False and a note.
    """
    if pixels.ndim != 3 or pixels.shape[0] != 3 or pixels.dtype != torch.uint8:
        raise ValueError(f"locate expects a uint8 3 x H x W tensor, got {pixels.dtype} "
                         f"{tuple(pixels.shape)}")
    _, height, width = pixels.shape
    scale = WORK_SIDE / max(height, width)
    if scale < 1:
        work_hw = [max(1, round(height * scale)), max(1, round(width * scale))]
        small = TF.resize(pixels, work_hw, antialias=True)
    else:
        scale, small = 1.0, pixels
    rgb = small.permute(1, 2, 0).numpy()
    whole = (0.0, 0.0, float(width), float(height))
    if min(rgb.shape[:2]) < 8:
        return CellBox(whole, None, False, 0, f"{NOT_FOUND} (image {width}x{height} px is "
                       "too small to search); whole image used")
    data = rgb.max(axis=2) > FILL_MAX
    score = stain_score(rgb)
    values = score[data]
    low = int(values.min()) if values.size else 0
    counts = np.bincount(values - low) if values.size else np.zeros(0, dtype=np.int64)
    if values.size < 16 or np.count_nonzero(counts) < 3:
        return CellBox(whole, None, False, 0, f"{NOT_FOUND} (no stain contrast: a grey or uniform "
                       "image); whole image used")
    # skimage's multi-Otsu on the integer histogram (the same threshold, no re-binning)
    centres = np.arange(low, low + len(counts))
    threshold = max(float(threshold_multiotsu(classes=3, hist=(counts, centres))[1]), NUCLEUS_FLOOR)
    mask = ((score > threshold) & data).astype(np.uint8)
    # join the lobes of one nucleus (a neutrophil's lobes lie a few px apart at this scale), then
    # drop specks; OpenCV's morphology and labelling: ~5x scipy.ndimage's on these sizes
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _ELLIPSE5)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _ELLIPSE3)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
    if count <= 1:
        return CellBox(whole, None, False, 0, f"{NOT_FOUND} (no stained nucleus); "
                       "whole image used")
    areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    min_area = MIN_NUCLEUS_FRACTION * mask.size
    order = np.argsort(areas)[::-1]
    if areas[order[0]] < min_area:
        return CellBox(whole, None, False, 0, f"{NOT_FOUND} (no nucleus-sized stained "
                       "blob); whole image used")
    first = order[0] + 1
    # lobes closer than the nucleus radius belong to it (segmented neutrophils, eosinophils)
    radius = np.sqrt(areas[order[0]] / np.pi)
    distance = cv2.distanceTransform((labels != first).astype(np.uint8), cv2.DIST_L2, 5)
    near_labels = set(np.unique(labels[distance <= radius]).tolist())
    members = [first] + [k + 1 for k in order[1:]
                         if areas[k] >= min_area / 4 and k + 1 in near_labels]
    cells = 1 + sum(1 for k in order[1:] if areas[k] >= SECOND_CELL_AREA * areas[order[0]]
                    and k + 1 not in near_labels)
    nucleus_box = _box(stats[members], scale, width, height)
    box = cell_from_nucleus(nucleus_box)
    note = "" if cells == 1 else f"{cells} {SEVERAL}: the largest nucleus used"
    return CellBox(box, nucleus_box, True, cells, note)


def stain_score(rgb: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 -> H x W int16 in [-255, 255]: max(R, B) - G, the excess of the violet/blue
    of a Romanowsky-stained nucleus over green (high on nuclei, low on glass and red cells)."""
    rgb = rgb.astype(np.int16)
    return np.maximum(rgb[..., 0], rgb[..., 2]) - rgb[..., 1]


def cell_from_nucleus(nucleus: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """The cell box from the nucleus box: the nucleus box made SQUARENESS of the way to a square
    (on its longer side), then scaled by CELL_MARGIN about its centre. Not clipped to the image:
    a cell at the border keeps its centre and size."""
    x0, y0, x1, y1 = nucleus
    w, h = x1 - x0, y1 - y0
    side = max(w, h)
    w = CELL_MARGIN * (SQUARENESS * side + (1 - SQUARENESS) * w)
    h = CELL_MARGIN * (SQUARENESS * side + (1 - SQUARENESS) * h)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def _box(stats: np.ndarray, scale: float, width: int, height: int) -> tuple[float, float, float, float]:
    """The union of OpenCV component boxes (rows of connectedComponentsWithStats' stats) at the
    working scale -> (x0, y0, x1, y1) in the image's pixels, clipped to it."""
    x0 = stats[:, cv2.CC_STAT_LEFT].min()
    y0 = stats[:, cv2.CC_STAT_TOP].min()
    x1 = (stats[:, cv2.CC_STAT_LEFT] + stats[:, cv2.CC_STAT_WIDTH]).max()
    y1 = (stats[:, cv2.CC_STAT_TOP] + stats[:, cv2.CC_STAT_HEIGHT]).max()
    return (max(0.0, x0 / scale), max(0.0, y0 / scale), min(float(width), x1 / scale),
            min(float(height), y1 / scale))


def cell_view(pixels: torch.Tensor, found: CellBox, size: int, fraction: float) -> torch.Tensor:
    """The square crop centred on the cell, scaled so that the cell box's longer side spans
    `fraction` of the output side, resized to size x size.

    pixels: uint8 3 x H x W; returns uint8 3 x size x size. Outside the image the crop is filled
    with the image's background colour (the median of its brightest pixels), not black, so that
    a cell at the border or filling its image (tecom) looks like a cell on glass. Resize:
    torchvision, bilinear, antialiased (the resize of every view). When the cell was not found,
    the whole image is padded to a square the same way (fraction ignored).
    Raises ValueError for fraction outside (0, 1] or size < 1.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"prepare.cell_fraction must be in (0, 1], got {fraction}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    _, height, width = pixels.shape
    if found.found:
        cx, cy = found.centre
        side = max(found.side / fraction, 8.0)
    else:
        cx, cy, side = width / 2, height / 2, float(max(width, height))
    x0, y0 = round(cx - side / 2), round(cy - side / 2)
    s = max(1, round(side))
    pad = (max(0, -x0), max(0, -y0), max(0, x0 + s - width), max(0, y0 + s - height))
    crop = pixels
    if any(pad):
        fill = background_colour(pixels)
        canvas = fill.view(3, 1, 1).expand(3, height + pad[1] + pad[3], width + pad[0] + pad[2])
        canvas = canvas.clone()
        canvas[:, pad[1] : pad[1] + height, pad[0] : pad[0] + width] = pixels
        crop, x0, y0 = canvas, x0 + pad[0], y0 + pad[1]
    crop = crop[:, y0 : y0 + s, x0 : x0 + s]
    return TF.resize(crop, [size, size], antialias=True)


def background_colour(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 3-vector: the median colour of the brightest quarter of the image's non-fill
    pixels (the plasma/glass between cells), on every 4th pixel of every 4th row."""
    flat = pixels[:, ::4, ::4].reshape(3, -1).numpy()
    flat = flat[:, flat.max(axis=0) > FILL_MAX]
    if not flat.size:
        return torch.zeros(3, dtype=torch.uint8)
    brightness = flat.sum(axis=0, dtype=np.int32)
    bright = flat[:, brightness >= np.percentile(brightness, 75)]
    return torch.from_numpy(np.median(bright, axis=1).astype(np.uint8))


def model_view(pixels: torch.Tensor, size: int, view: str = "full",
               fraction: float = CELL_FRACTION) -> tuple[torch.Tensor, str, CellBox | None]:
    """The network's view of one decoded image: the one place where every stage, `predict`, the
    pyfunc/HTTP path and Grad-CAM turn pixels into a model input.

    pixels: uint8 3 x H x W (`wbc_transfer.data.images.decode_bytes`). view "full": the whole image
    resized to size x size (torchvision, bilinear, antialiased: the paper's resize); "cell": the
    white cell found by `locate`, cropped square and scaled so that it spans `fraction` of the
    side (`cell_view`). Returns (uint8 3 x size x size, note, CellBox or None for "full"); the
    note is '' or the localisation's phrase (no cell found: whole image used; several cells).
    Raises ValueError for an unknown view (naming prepare.view) or a fraction outside (0, 1].
    """
    if view == "full":
        return TF.resize(pixels, [size, size], antialias=True), "", None
    if view != "cell":
        raise ValueError(f"prepare.view must be one of {VIEWS}, got {view!r}")
    found = locate(pixels)
    return cell_view(pixels, found, size, fraction), found.note, found


def localisation_summary(notes: list[str], view: str) -> dict[str, int | str]:
    """Counts of a set's per-image notes (as `model_view` / `decode_resized` write them):
    images, cells not found (whole image used), several candidates (the largest used)."""
    return {"view": view, "images": len(notes),
            "no_cell": sum(NOT_FOUND in n for n in notes),
            "several_cells": sum(SEVERAL in n for n in notes)}
