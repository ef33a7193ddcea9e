"""Scan every image of the Kaggle layout once: decode it, record size/mode/class, flag problems.

Decoding is `wbc_transfer.data.images.decode_bytes`, the decoder of every later stage, so what
validation accepts, `split`, `prepare`, predict and HTTP read the same way. Accepted: files that
decode and are stored as RGB (8 bits per channel, or 16 reduced to 8, stated in `note`); the EXIF
orientation is applied and noted. Hidden files and folders (a name starting with "."), at any
depth, are not data and are not scanned. A symbolic link to a file is read as the file; a
broken link or a link to a folder is a problem naming where it points (`images.walk`). Each
file's SHA-256 finds exact duplicates (`duplicates`); the same bytes under two classes is a
label conflict, a problem. Paths are written as `wbc_transfer.io.path_text` gives them (valid
UTF-8 whatever the name's bytes). `validate` turns a scan into the `validate` stage's tables
(problems, sizes, duplicates, the index of usable images) and `Validation.report` into its
report.json; `enforce_policy` stops or warns on problems.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import pandas as pd

from wbc_transfer.data.images import (
    IMAGE_SUFFIXES,
    ImageError,
    decode_bytes,
    joined,
    large_image_note,
    link_problem,
    read_file,
    walk,
)
from wbc_transfer.io import path_text

log = logging.getLogger(__name__)

class DataValidationError(RuntimeError):
    """The data cannot be used as it is (a required folder missing, no usable image, a bad file
    under validate.policy=strict); the message names the file or folder."""


@dataclass(frozen=True)
class ImageRecord:
    path: str  # relative to the images folder, POSIX separators, as `path_text` writes it
    folder: str  # TRAIN / TEST / TEST_SIMPLE
    label: str
    width: int  # px, upright (after the EXIF orientation)
    height: int
    mode: str  # Pillow mode as stored
    problem: str  # "" when the image is usable
    note: str = ""  # conversions made when decoding (EXIF orientation, 16-bit -> 8-bit)
    sha256: str = ""  # of the file's bytes ("" when it could not be read or decoded)

    @property
    def ok(self) -> bool:
        return not self.problem


@dataclass(frozen=True)
class FolderProblem:
    path: str
    problem: str


def inspect_image(file: Path, rel: str, folder: str, label: str) -> ImageRecord:
    """Read and decode one file completely (the product's decoder); a problem string says why
    it cannot be used: unreadable, empty, truncated, not an image, too large, or not RGB."""
    try:
        data = read_file(file)
    except ImageError as exc:
        return ImageRecord(rel, folder, label, 0, 0, "", str(exc))
    digest = hashlib.sha256(data).hexdigest()
    try:
        decoded = decode_bytes(data)
    except ImageError as exc:  # the same reason predict and HTTP give for this file
        return ImageRecord(rel, folder, label, 0, 0, "", str(exc))
    mode = decoded.mode
    problem = "" if mode == "RGB" else f"mode {mode}, expected RGB"
    return ImageRecord(rel, folder, label, decoded.width, decoded.height, mode, problem,
                       decoded.note, digest)


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
    hidden = 0
    for folder in folders:
        base = images_dir / folder
        if not base.is_dir():
            continue
        for entry in sorted(base.iterdir()):
            if entry.name.startswith("."):
                hidden += 1  # .ipynb_checkpoints, .DS_Store, ...: not data
                continue
            rel_dir = path_text(f"{folder}/{entry.name}")
            if entry.is_symlink() and (reason := link_problem(entry)):  # a linked class folder
                problems.append(FolderProblem(rel_dir, reason))
                continue
            if not entry.is_dir():
                problems.append(FolderProblem(rel_dir, "file outside any class folder"))
                continue
            if entry.name not in classes:
                problems.append(FolderProblem(rel_dir, f"unknown class folder (known: {list(classes)})"))
                continue
            files, refused, skipped = walk(entry)
            hidden += skipped
            problems += [FolderProblem(path_text(link.relative_to(images_dir).as_posix()), reason)
                         for link, reason in refused]
            if not files and not refused:
                problems.append(FolderProblem(rel_dir, "empty class folder"))
            for file in files:
                rel = path_text(file.relative_to(images_dir).as_posix())
                if file.suffix.lower() not in IMAGE_SUFFIXES:
                    problems.append(FolderProblem(
                        rel, f"not an image file suffix ({path_text(file.suffix)})"))
                    continue
                jobs.append((str(file), rel, folder, entry.name))
        for cls in classes:
            if not (base / cls).is_dir():
                problems.append(FolderProblem(f"{folder}/{cls}", "missing class folder"))
    if hidden:
        log.info("skipped %d hidden file(s)/folder(s) (names starting with '.'): not data", hidden)
    if workers > 1 and len(jobs) > 200:
        with ProcessPoolExecutor(workers) as pool:
            records = list(pool.map(_inspect, jobs, chunksize=256))
    else:
        records = [_inspect(job) for job in jobs]
    return records, problems


def as_rows(records: Iterable[ImageRecord]) -> list[dict[str, object]]:
    return [asdict(r) for r in records]


def duplicates(records: Sequence[ImageRecord]) -> tuple[list[ImageRecord], list[dict[str, str]]]:
    """Exact duplicates (same SHA-256 of the bytes), within and across classes and folders.

    Returns (records, rows): the records with a label conflict (the same bytes under two or more
    classes) turned into problems naming the other copies, and one row per file of each group
    of two or more (columns sha256, path, folder, label; sorted by sha256, path). Files that
    could not be decoded take no part."""
    groups: dict[str, list[ImageRecord]] = {}
    for record in records:
        if record.sha256:
            groups.setdefault(record.sha256, []).append(record)
    rows: list[dict[str, str]] = []
    conflicts: dict[str, str] = {}
    for digest, members in sorted(groups.items()):
        if len(members) < 2:
            continue
        members = sorted(members, key=lambda r: r.path)
        rows += [{"sha256": digest, "path": r.path, "folder": r.folder, "label": r.label}
                 for r in members]
        labels = sorted({r.label for r in members})
        if len(labels) > 1:
            for r in members:
                others = ", ".join(o.path for o in members if o is not r)
                conflicts[r.path] = (f"label conflict: same bytes as {others} "
                                     f"(classes {', '.join(labels)})")
    if conflicts:
        records = [replace(r, problem=conflicts[r.path]) if r.path in conflicts and r.ok else r
                   for r in records]
    return list(records), rows


def check_layout(images_dir: Path) -> None:
    """DataValidationError unless `images_dir` holds the TRAIN and TEST folders."""
    for required in ("TRAIN", "TEST"):
        if not (images_dir / required).is_dir():
            raise DataValidationError(
                f"{images_dir / required} not found. Is the dataset in place? "
                f"Run `dvc repro` (imports it via data.dvc) or set data.root in params.yaml "
                f"to a copy of the Kaggle layout (see docs/pipeline.md, 'Data')."
            )


@dataclass
class Validation:
    """One validation of the images folder: the tables the `validate` stage writes."""

    scanned_files: int
    problems: pd.DataFrame  # path, problem (files, then folders)
    sizes: pd.DataFrame  # folder, width, height, count of the usable images
    duplicates: pd.DataFrame  # sha256, path, folder, label (exact duplicates)
    usable: pd.DataFrame  # the usable images, `note` with the large-image note added
    modes: dict[str, int]
    conversions: Counter  # note -> usable images converted so on decoding
    large_images: int

    @property
    def index(self) -> pd.DataFrame:
        """validate.index: path, folder, label, width, height, note of the usable images."""
        return self.usable[["path", "folder", "label", "width", "height", "note"]]

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        return {folder: {c: int(n) for c, n in sorted(Counter(g["label"]).items())}
                for folder, g in self.usable.groupby("folder")}

    def report(self, images_dir: str, policy: str) -> dict[str, object]:
        """report.json (`images_dir` as it should be written)."""
        dups = self.duplicates
        return {
            "images_dir": images_dir,
            "policy": policy,
            "scanned_files": self.scanned_files,
            "usable_images": int(len(self.usable)),
            "problems": int(len(self.problems)),
            "counts": self.counts,
            "modes": self.modes,
            # usable images that were converted on decoding (every stage converts them alike)
            "conversions": {note: int(n) for note, n in sorted(self.conversions.items())},
            "large_images": self.large_images,
            # exact duplicates (same bytes); the groups are listed in duplicates.csv
            "duplicates": {
                "groups": int(dups["sha256"].nunique()),
                "files": int(len(dups)),
                "groups_across_classes": _groups_spanning(dups, "label"),
                "groups_across_folders": _groups_spanning(dups, "folder"),
            },
        }


def validate(images_dir: Path, classes: Sequence[str], folders: Sequence[str]) -> Validation:
    """Scan `images_dir` (`scan`, `duplicates`) and tabulate what the `validate` stage writes;
    warns about every image far larger than a cell crop (`images.large_image_note`)."""
    records, folder_problems = scan(images_dir, classes, folders)
    records, duplicate_rows = duplicates(records)
    frame = pd.DataFrame(as_rows(records), columns=[f.name for f in fields(ImageRecord)])
    bad = frame[frame["problem"] != ""] if len(frame) else frame
    good = frame[frame["problem"] == ""] if len(frame) else frame
    problems = pd.concat(
        [
            bad[["path", "problem"]] if len(bad) else pd.DataFrame(columns=["path", "problem"]),
            pd.DataFrame([{"path": p.path, "problem": p.problem} for p in folder_problems],
                         columns=["path", "problem"]),
        ]
    ).reset_index(drop=True)
    sizes = (
        good.groupby(["folder", "width", "height"]).size().rename("count").reset_index()
        if len(good) else pd.DataFrame(columns=["folder", "width", "height", "count"])
    )
    dups = pd.DataFrame(duplicate_rows, columns=["sha256", "path", "folder", "label"])
    conversions = Counter(good["note"][good["note"] != ""]) if len(good) else Counter()
    large_images = 0
    if len(good):  # a whole smear field trains as if it were one cell: say so in the index
        large = [large_image_note(w, h) for w, h in zip(good["width"], good["height"],
                                                          strict=True)]
        good = good.assign(note=[joined(n, extra) for n, extra in zip(good["note"], large,
                                                                       strict=True)])
        for path, extra in zip(good["path"], large, strict=True):
            if extra:
                log.warning("%s: %s", path, extra)
        large_images = int(sum(map(bool, large)))
    modes = {m: int(n) for m, n in Counter(good["mode"]).items()} if len(good) else {}
    return Validation(int(len(frame)), problems, sizes, dups, good, modes, conversions, large_images)


def enforce_policy(validation: Validation, policy: str, images_dir: Path, out: Path) -> None:
    """DataValidationError listing the problems under validate.policy=strict; otherwise
    warnings: the excluded files, the conversions on decoding, the exact duplicates (the
    tables are under `out`)."""
    problems, dups = validation.problems, validation.duplicates
    if len(problems):
        listing = "\n".join(f"  {r.path}: {r.problem}" for r in problems.head(50).itertuples())
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        if policy == "strict":
            raise DataValidationError(
                f"{len(problems)} data problem(s) under {images_dir} (validate.policy=strict; "
                f"full list in {out / 'problems.csv'}):\n{listing}{more}\n"
                "Fix or remove these files, or run with -S validate.policy=lenient to exclude "
                "them (they stay listed in problems.csv)."
            )
        log.warning("excluding %d problem file(s) (validate.policy=lenient):\n%s%s",
                    len(problems), listing, more)
    if validation.conversions:
        log.warning("converted on decoding (every stage reads them so):\n%s",
                    "\n".join(f"  {n} image(s): {note}"
                              for note, n in sorted(validation.conversions.items())))
    if len(dups):
        log.warning("%d exact duplicate file(s) in %d group(s), listed in %s",
                    len(dups), dups["sha256"].nunique(), out / "duplicates.csv")


def _groups_spanning(dups: pd.DataFrame, column: str) -> int:
    """Duplicate groups whose files lie under more than one value of `column`."""
    return int((dups.groupby("sha256")[column].nunique() > 1).sum()) if len(dups) else 0
