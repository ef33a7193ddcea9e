"""The one image decoder of the product: file or bytes -> uint8 RGB pixels and a note.

`validate` (what it accepts), `split` (leakage fingerprints), `prepare` (hence train and
evaluate), `wbc-transfer predict` and the served pyfunc (HTTP) all decode through `decode_bytes`,
so a file that validation accepts is read the same way by every later stage, and a file that
cannot be read fails with the same reason everywhere (`decode_file` puts the file's path in
front of it).

Pillow does the decoding (JPEG, PNG, BMP, TIFF, GIF, WebP). What it converts, it says in the
note: EXIF orientation applied (`PIL.ImageOps.exif_transpose`), 16 bits per channel reduced to
8, palette/grayscale/CMYK/1-bit -> RGB, alpha dropped, first frame of a multi-frame file.
Whether a converted image is fit for *training* is the caller's policy (`validation` accepts
RGB files only; predict/HTTP classify any of them).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from wbc_transfer.io import path_text

# file suffixes taken as images when a folder is searched (validate, predict)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"})

MAX_SIDE = 20_000  # px; larger images are refused before decoding
MAX_PIXELS = 40_000_000  # width x height; protects against decompression bombs
MAX_BYTES = 64 * 1024 * 1024  # encoded size; files are refused before being read

# EXIF Orientation -> what `exif_transpose` does to the stored pixels to show them upright
ORIENTATIONS = {
    2: "mirrored left-right",
    3: "turned 180°",
    4: "mirrored top-bottom",
    5: "transposed (mirrored along the main diagonal)",
    6: "turned 90° clockwise",
    7: "transversed (mirrored along the anti-diagonal)",
    8: "turned 90° counter-clockwise",
}
_GRAY16 = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageError(ValueError):
    """A file or byte string cannot be turned into an RGB image; the message says why."""


@dataclass(frozen=True)
class Decoded:
    """One decoded image.

    pixels: uint8 tensor 3 x H x W, RGB (a channels-last view of a H x W x 3 array), upright
    (EXIF orientation applied, so H x W may be the stored size transposed).
    mode: Pillow's mode of the file as stored, before any conversion ("RGB", "L", "I;16", ...).
    note: what was converted, "" when nothing was ("; "-separated phrases).
    """

    pixels: torch.Tensor
    mode: str
    note: str

    @property
    def height(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[2])


def decode_bytes(data: bytes) -> Decoded:
    """Image bytes -> Decoded. Raises ImageError with a short reason (no file name).

    Refused: empty input, more than MAX_BYTES bytes, a side over MAX_SIDE px or more than
    MAX_PIXELS px (before decoding), unidentified formats, truncated/corrupt files, 32-bit
    float images.
    """
    if data is None or len(data) == 0:
        raise ImageError("empty file (0 bytes)")
    if len(data) > MAX_BYTES:
        raise ImageError(f"file too large ({len(data)} bytes > {MAX_BYTES})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if max(width, height) > MAX_SIDE:
                raise ImageError(f"image too large: {width}x{height} px "
                                 f"(limit {MAX_SIDE} px a side)")
            if width * height > MAX_PIXELS:
                raise ImageError(f"image too large: {width}x{height} = {width * height} px "
                                 f"(limit {MAX_PIXELS}; possible decompression bomb)")
            if width < 1 or height < 1:
                raise ImageError(f"image has no pixels ({width}x{height})")
            sixteen = _sixteen_bit_channels(image)  # the tile list is gone after load()
            image.load()
            mode = image.mode
            notes = []
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                notes.append(f"first of {frames} frames used")
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
            if orientation in ORIENTATIONS:
                image = ImageOps.exif_transpose(image)
                notes.append(f"EXIF orientation {orientation} applied "
                             f"({ORIENTATIONS[orientation]})")
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"refused as a decompression bomb: {exc}") from None
    except Exception as exc:  # truncated/corrupt files: OSError, SyntaxError, ValueError ...
        raise ImageError(f"unreadable image: {type(exc).__name__}: {exc}") from None
    if sixteen:
        notes.append(f"16-bit {mode} reduced to 8 bits per channel (high byte, i.e. value/256)")
    array, note = _to_rgb(image)
    if note:
        notes.append(note)
    # a channels-last view: a uint8 .contiguous() copy costs more than the resize that follows
    return Decoded(torch.from_numpy(array).permute(2, 0, 1), mode, "; ".join(notes))


def decode(data: bytes) -> tuple[torch.Tensor, str]:
    """Image bytes -> (uint8 tensor 3 x H x W, note); see `decode_bytes`."""
    decoded = decode_bytes(data)
    return decoded.pixels, decoded.note


REFERENCE_SIZE = (320, 240)  # width, height of a Kaggle (BCCD) single-cell crop, px
LARGE_FACTOR = 2  # larger than this times REFERENCE_SIZE on a side: noted as a likely smear field


def large_image_note(width: int, height: int) -> str:
    """The note for an image much larger than one cell crop (a side over LARGE_FACTOR times
    the Kaggle crop's longer side), '' when it is not: most likely a whole smear field, which
    every stage, `predict` and HTTP resize as a whole, so a single-cell classifier sees a
    shrunken field. Sizes in px, upright (after the EXIF orientation)."""
    max_w, max_h = (LARGE_FACTOR * s for s in REFERENCE_SIZE)
    if max(width, height) > max(max_w, max_h):
        return (f"large image {width}x{height} px (> {LARGE_FACTOR}x a {REFERENCE_SIZE[0]}x"
                f"{REFERENCE_SIZE[1]} cell crop): likely a whole smear field, not one cell")
    return ""


def joined(*notes: str) -> str:
    """Notes of one image ("; "-separated phrases) joined with '; ', each phrase once, in order,
    empty ones left out."""
    phrases: list[str] = []
    for note in notes:
        phrases += [n for n in (note or "").split("; ") if n and n not in phrases]
    return "; ".join(phrases)


def is_hidden(rel: Path) -> bool:
    """Whether any part of a relative path starts with "." (.ipynb_checkpoints/, .DS_Store):
    such files are not data anywhere (validate, predict)."""
    return any(part.startswith(".") for part in rel.parts)


def read_file(file: str | os.PathLike[str]) -> bytes:
    """A file's bytes, refusing files over MAX_BYTES before reading them.

    Raises ImageError with a short reason (missing, unreadable, too large), no file name."""
    try:
        size = os.stat(file).st_size
        if size > MAX_BYTES:
            raise ImageError(f"file too large ({size} bytes > {MAX_BYTES})")
        return Path(file).read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from None


def decode_file(file: str | os.PathLike[str]) -> Decoded:
    """Read and decode one file. Raises ImageError "<path>: <reason>" naming the file
    (its path as `wbc_transfer.io.path_text` writes it)."""
    try:
        return decode_bytes(read_file(file))
    except ImageError as exc:
        raise ImageError(f"{path_text(file)}: {exc}") from None


def _sixteen_bit_channels(image: Image.Image) -> bool:
    """Whether Pillow reads a multi-channel 16-bit file (e.g. PNG 'RGB;16B') into 8-bit mode.

    Pillow keeps the high byte of each value (a scaling by 1/256, never a wrap-around); this
    only detects it, from the raw mode of the decoder tiles, so that the note can say so."""
    if image.mode in _GRAY16:
        return False  # gray 16-bit stays 16-bit in Pillow; `_to_rgb` scales it
    for tile in getattr(image, "tile", None) or []:
        args = tile.args
        raw = args if isinstance(args, str) else (args[0] if args else "")
        if isinstance(raw, str) and ";16" in raw:
            return True
    return False


def _to_rgb(image: Image.Image) -> tuple[np.ndarray, str]:
    mode = image.mode
    if mode == "RGB":
        return np.array(image, dtype=np.uint8), ""
    if mode in _GRAY16:
        values = np.asarray(image)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ImageError(f"unsupported {mode} image with values {low}..{high}")
        if high <= 255:
            gray, how = values.astype(np.uint8), "values already 0..255, kept"
        else:
            gray = np.round(values.astype(np.float64) / 257.0).astype(np.uint8)
            how = "scaled /257 to 8 bits"
        return np.repeat(gray[:, :, None], 3, axis=2), f"converted {mode} to RGB ({how})"
    if mode in {"F"}:
        raise ImageError("unsupported mode F (32-bit float image)")
    note = f"converted {mode} to RGB"
    if "A" in mode or (mode == "P" and "transparency" in image.info):
        alpha = np.asarray(image.convert("RGBA"))[:, :, 3]
        note += " (alpha dropped" + (", image had transparent pixels)" if alpha.min() < 255
                                     else ", fully opaque)")
    try:
        return np.array(image.convert("RGB"), dtype=np.uint8), note
    except Exception as exc:
        raise ImageError(f"cannot convert mode {mode} to RGB: {exc}") from None


def link_problem(link: Path) -> str:
    """Why a symbolic link met inside a scanned folder is not read, or "" when it is: a link
    to a file is read like the file (DVC's symlink cache type makes every file one); a broken
    link and a link to a folder are problems (DVC does not version what a linked folder
    holds, and folder links can loop), stated with where the link points."""
    target = path_text(os.readlink(link))
    if not link.exists():
        return f"broken symbolic link (to {target}): nothing to read"
    if link.is_dir():
        return (f"symbolic link to a folder ({target}): not followed (DVC does not version "
                "what a linked folder holds); move or copy its images into the class folder")
    return ""


def walk(folder: Path) -> tuple[list[Path], list[tuple[Path, str]], int]:
    """Every file under `folder` at any depth, as every stage and `predict` scan folders:
    returns (files, refused, hidden). `files`: regular files and links to files, sorted;
    `refused`: (path, reason) of broken links and links to folders (`link_problem`), which are
    not followed; `hidden`: how many hidden files and folders (`is_hidden`) were skipped."""
    files: list[Path] = []
    refused: list[tuple[Path, str]] = []
    hidden = 0
    for dirpath, dirnames, filenames in os.walk(folder):  # does not descend into links
        base = Path(dirpath)
        for name in list(dirnames):
            if name.startswith(".") or (base / name).is_symlink():
                dirnames.remove(name)
                if name.startswith("."):
                    hidden += 1
                else:
                    refused.append((base / name, link_problem(base / name)))
        for name in filenames:
            path = base / name
            if name.startswith("."):
                hidden += 1
            elif path.is_symlink() and (reason := link_problem(path)):
                refused.append((path, reason))
            else:
                files.append(path)
    return sorted(files), sorted(refused), hidden
