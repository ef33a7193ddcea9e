"""Scan every image of the Kaggle layout once: decode it, record size/mode/class, flag problems."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class ImageRecord:
    path: str  # relative to the images folder, POSIX separators
    folder: str  # TRAIN / TEST / TEST_SIMPLE
    label: str
    width: int
    height: int
    mode: str
    problem: str  # "" when the image is usable

    @property
    def ok(self) -> bool:
        return not self.problem


@dataclass(frozen=True)
class FolderProblem:
    path: str
    problem: str


def inspect_image(file: Path, rel: str, folder: str, label: str) -> ImageRecord:
    """Decode one file completely; a problem string says why it cannot be used."""
    if file.stat().st_size == 0:
        return ImageRecord(rel, folder, label, 0, 0, "", "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as img:
                img.load()  # full decode: catches truncated files
                width, height, mode = img.width, img.height, img.mode
    except UnidentifiedImageError:
        return ImageRecord(rel, folder, label, 0, 0, "", "not an image (unidentified format)")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        return ImageRecord(rel, folder, label, 0, 0, "", f"unreadable: {exc}")
    problem = "" if mode == "RGB" else f"mode {mode}, expected RGB"
    return ImageRecord(rel, folder, label, width, height, mode, problem)


def _inspect(args: tuple[str, str, str, str]) -> ImageRecord:
    file, rel, folder, label = args
    return inspect_image(Path(file), rel, folder, label)


def scan(
    images_dir: Path,
    classes: Sequence[str],
    folders: Iterable[str],
    workers: int = 2,
) -> tuple[list[ImageRecord], list[FolderProblem]]:
    """Inspect every file under images_dir/<folder>/<class>/; folders absent on disk are skipped
    (TEST_SIMPLE is optional), but a missing TRAIN or TEST is the caller's problem to judge."""
    jobs: list[tuple[str, str, str, str]] = []
    problems: list[FolderProblem] = []
    for folder in folders:
        base = images_dir / folder
        if not base.is_dir():
            continue
        for entry in sorted(base.iterdir()):
            rel_dir = f"{folder}/{entry.name}"
            if not entry.is_dir():
                problems.append(FolderProblem(rel_dir, "file outside any class folder"))
                continue
            if entry.name not in classes:
                problems.append(FolderProblem(rel_dir, f"unknown class folder (known: {list(classes)})"))
                continue
            files = sorted(p for p in entry.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not files:
                problems.append(FolderProblem(rel_dir, "empty class folder"))
            for file in files:
                rel = file.relative_to(images_dir).as_posix()
                if file.suffix.lower() not in IMAGE_SUFFIXES:
                    problems.append(FolderProblem(rel, f"not an image file suffix ({file.suffix})"))
                    continue
                jobs.append((str(file), rel, folder, entry.name))
        for cls in classes:
            if not (base / cls).is_dir():
                problems.append(FolderProblem(f"{folder}/{cls}", "missing class folder"))
    if workers > 1 and len(jobs) > 200:
        with ProcessPoolExecutor(workers) as pool:
            records = list(pool.map(_inspect, jobs, chunksize=256))
    else:
        records = [_inspect(job) for job in jobs]
    return records, problems


def as_rows(records: Iterable[ImageRecord]) -> list[dict[str, object]]:
    return [asdict(r) for r in records]
