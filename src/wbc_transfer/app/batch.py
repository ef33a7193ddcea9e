"""One upload of the page: its files in a temporary folder, its rows, corrections and exports.

Inputs are files as the browser sends them: chosen files (always tried, whatever their
suffix, like files named to `wbc-transfer predict`), files of a chosen folder (their name
holds a `/`) and the members of a `.zip`: for these two, as for a folder given to `predict`,
only image suffixes are taken and hidden files and folders are skipped. Zip members are read
with their size checked first (a member over `wbc_transfer.data.images.MAX_BYTES` becomes an error
row, never read whole); nothing is extracted by its own name: every input is stored as
`<batch folder>/files/<index><suffix>`. The limits (`Limits`) refuse a whole upload with a
message naming the parameter.

Classification is `wbc_transfer.serving.predict.predict_items`: the rows (columns, errors, notes,
review flag) are those of `wbc-transfer predict -o` on the same files. Thumbnails are what the
network sees (`Classifier.preprocess`, the product's one decoder and resize), made when the
page asks for them; the Grad-CAM overlay of one row comes from `Classifier.classify_bytes(...,
explain=True)` and `wbc_transfer.evaluation.explain.overlay`, also on demand.

Exports: the predictions CSV (`predict.columns` of the model's classes, any further column the
rows have, then `corrected_label`) and a labelled folder as a zip, `<CLASS>/<file>` for every
row a person confirmed or corrected (what `external` reads as a folder with class
sub-folders). A label the model gave and nobody confirmed is never written as a label.
"""

from __future__ import annotations

import io
import threading
import time
import uuid
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from wbc_transfer.app.limits import Limits
from wbc_transfer.app.registry import Loaded
from wbc_transfer.data.images import IMAGE_SUFFIXES, MAX_BYTES, is_hidden
from wbc_transfer.serving.inputs import Item
from wbc_transfer.serving.predict import Writer, columns, predict_items

THUMB_QUALITY = 85  # JPEG quality of the thumbnails
CORRECTED = "corrected_label"


@dataclass(frozen=True)
class Received:
    """One input before storage: its name as shown, and its bytes or why it has none."""

    name: str
    data: bytes | None
    error: str = ""


def from_folder(name: str) -> bool:
    """Whether a name is taken by the folder rules: image suffix only, hidden parts skipped."""
    return "/" in name


def taken(name: str) -> bool:
    """The folder rules of `wbc_transfer.serving.predict` (image suffixes, no hidden part)."""
    path = PurePosixPath(name)
    return path.suffix.lower() in IMAGE_SUFFIXES and not is_hidden(Path(*path.parts))


def unzip(name: str, data: bytes, limits: Limits) -> tuple[list[Received], int]:
    """The image members of zip `name` as Received (`<name>/<member>`) and how many entries
    were skipped (folders aside). A corrupt zip is one error row; a member over MAX_BYTES an
    error row (not read); LimitError when the members' total size is over the limit."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        return [Received(name, None, f"unreadable zip: {exc}")], 0
    images = [m for m in members if taken(m.filename) and "__MACOSX" not in m.filename]
    limits.check_count(len(images))
    limits.check_size(sum(m.file_size for m in images))
    out: list[Received] = []
    read = 0
    for member in images:
        shown = f"{name}/{member.filename}"
        if member.file_size > MAX_BYTES:
            out.append(Received(shown, None, f"file too large ({member.file_size} bytes > "
                                             f"{MAX_BYTES})"))
            continue
        try:
            with archive.open(member) as f:
                content = f.read(MAX_BYTES + 1)  # a size field that lies is caught here
        except Exception as exc:  # bad CRC, unsupported compression, encrypted member
            out.append(Received(shown, None, f"unreadable zip member: {exc}"))
            continue
        read += len(content)
        limits.check_size(read)  # sizes the zip declared may be wrong
        if len(content) > MAX_BYTES:
            out.append(Received(shown, None, f"file too large (> {MAX_BYTES} bytes)"))
        else:
            out.append(Received(shown, content))
    return out, len(members) - len(images)


def expand(files: Iterable[tuple[str, bytes]], limits: Limits) -> tuple[list[Received], int]:
    """(name, bytes) of each uploaded file -> the inputs to classify, in order, and the number
    of entries skipped by the folder rules. Zips (by suffix) are expanded; LimitError when
    the images are too many or too large."""
    out: list[Received] = []
    skipped = 0
    for name, data in files:
        if name.lower().endswith(".zip"):
            members, n = unzip(name, data, limits)
            out += members
            skipped += n
        elif from_folder(name) and not taken(name):
            skipped += 1
        else:
            out.append(Received(name, data))
        limits.check_count(len(out))
    limits.check_size(sum(len(r.data or b"") for r in out))
    return out, skipped


@dataclass
class Batch:
    """One upload: inputs stored under `folder`, rows filled in input order as they come."""

    id: str
    folder: Path
    model: Loaded
    version: str | None
    review_below: float
    items: list[Item]
    skipped: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    corrections: dict[int, str] = field(default_factory=dict)
    state: str = "queued"  # queued, running, done, failed
    error: str = ""
    seconds: float = 0.0

    @property
    def classes(self) -> list[str]:
        return self.model.classes

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "error": self.error, "total": len(self.items),
                "done": len(self.rows), "skipped": self.skipped, "seconds": round(self.seconds, 3),
                "model": self.model.uri, "version": self.version, "classes": self.classes,
                "review_below": self.review_below}

    def run(self, batch_size: int = 32, tta: bool = False) -> None:
        """Classify every item (predict's rows), one chunk at a time under the model's lock.
        An exception marks the batch failed; rows done so far stay."""
        self.state = "running"
        started = time.perf_counter()
        rows = predict_items(self.model.pyfunc, self.items, batch_size, tta,
                             review_below=self.review_below)
        try:
            while True:
                with self.model.lock:
                    row = next(rows, None)
                if row is None:
                    break
                self.rows.append({"index": len(self.rows), **row})
                self.seconds = time.perf_counter() - started
            self.state = "done"
        except Exception as exc:
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            self.seconds = time.perf_counter() - started

    def data(self, index: int) -> bytes:
        """The stored bytes of input `index`; IndexError/FileNotFoundError when none."""
        if not 0 <= index < len(self.items):
            raise IndexError(f"no row {index} (rows: {len(self.items)})")
        file = self.items[index].file
        if file is None:
            raise FileNotFoundError(f"row {index} has no image")
        return file.read_bytes()

    def thumbnail(self, index: int) -> bytes:
        """JPEG of the image as the network sees it (decoded and resized by the classifier),
        cached in the batch folder. Raises wbc_transfer.data.images.ImageError for a bad file."""
        from PIL import Image

        cached = self.folder / "thumbs" / f"{index:05d}.jpeg"
        if not cached.is_file():
            pixels, _ = self.model.classifier.preprocess(self.data(index))
            cached.parent.mkdir(exist_ok=True)
            buffer = io.BytesIO()
            Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy()).save(
                buffer, format="JPEG", quality=THUMB_QUALITY)
            cached.write_bytes(buffer.getvalue())
        return cached.read_bytes()

    def explanation(self, index: int, tta: bool = False) -> bytes:
        """PNG of the Grad-CAM overlay of row `index`'s predicted class, cached in the batch
        folder. Raises ValueError when the row has no classification."""
        from wbc_transfer.evaluation.explain import overlay

        cached = self.folder / "cams" / f"{index:05d}.png"
        if not cached.is_file():
            with self.model.lock:
                frame, maps = self.model.classifier.classify_bytes([self.data(index)], tta, 1,
                                                                   explain=True)
            if 0 not in maps:
                raise ValueError(frame.loc[0, "error"] or "not classified")
            cached.parent.mkdir(exist_ok=True)
            buffer = io.BytesIO()
            overlay(*maps[0]).save(buffer, format="PNG")
            cached.write_bytes(buffer.getvalue())
        return cached.read_bytes()

    def correct(self, index: int, label: str | None) -> None:
        """Set (or with None / "" clear) the corrected label of row `index`. ValueError for an
        unknown class or a row without classification."""
        if not 0 <= index < len(self.rows):
            raise ValueError(f"no row {index} (rows: {len(self.rows)})")
        if not label:
            self.corrections.pop(index, None)
            return
        if label not in self.classes:
            raise ValueError(f"unknown class {label!r}; one of {self.classes}")
        if self.rows[index]["error"]:
            raise ValueError(f"row {index} has no image to label: {self.rows[index]['error']}")
        self.corrections[index] = label

    def export_columns(self) -> list[str]:
        """predict's columns for these classes, any further column of the rows, corrected_label."""
        base = columns(self.classes)
        extra = [k for row in self.rows[:1] for k in row if k not in base and k != "index"]
        return [*base, *extra, CORRECTED]

    def export_rows(self, review_below: float | None = None) -> list[dict[str, Any]]:
        """The rows with corrected_label; `review` re-flagged at `review_below` when given (the
        rule of `serving.Classifier`: confidence below the threshold)."""
        out = []
        for row in self.rows:
            row = {**row, CORRECTED: self.corrections.get(row["index"], "")}
            if review_below is not None and row.get("confidence") is not None:
                row["review"] = bool(row["confidence"] < review_below)
            out.append(row)
        return out

    def write_csv(self, review_below: float | None = None) -> str:
        """The predictions CSV (text) with `predict.Writer`."""
        stream = io.StringIO()
        writer = Writer(stream, "csv", self.export_columns())
        for row in self.export_rows(review_below):
            writer.write(row)
        return stream.getvalue()

    def write_labelled_zip(self) -> tuple[Path, int]:
        """A zip `<CLASS>/<file name>` of every confirmed or corrected row, in the batch
        folder; returns (its path, number of images). Names that repeat get the row index."""
        target = self.folder / "labelled.zip"
        used: set[str] = set()
        with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
            for index, label in sorted(self.corrections.items()):
                base = PurePosixPath(self.rows[index]["path"]).name or f"image{index}"
                name = f"{label}/{base}"
                if name in used:
                    name = f"{label}/{index:05d}-{base}"
                used.add(name)
                archive.writestr(name, self.data(index))
        return target, len(used)


class Store:
    """The batches of one running app, under one temporary folder (removed by `close`); one
    worker thread classifies them in turn."""

    def __init__(self, limits: Limits, batch_size: int = 32, tta: bool = False):
        import tempfile
        from concurrent.futures import ThreadPoolExecutor

        self.limits, self.batch_size, self.tta = limits, batch_size, tta
        self.root = Path(tempfile.mkdtemp(prefix="wbc-app-"))
        self.batches: dict[str, Batch] = {}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wbc-app-batch")
        self._lock = threading.Lock()

    def create(self, inputs: Sequence[Received], skipped: int, model: Loaded,
               version: str | None, review_below: float) -> Batch:
        """Store the inputs and queue their classification; returns the batch."""
        batch_id = uuid.uuid4().hex[:12]
        folder = self.root / batch_id
        (folder / "files").mkdir(parents=True)
        items = []
        for i, received in enumerate(inputs):
            if received.data is None:
                items.append(Item(received.name, None, received.error))
                continue
            suffix = PurePosixPath(received.name).suffix.lower()
            file = folder / "files" / f"{i:05d}{suffix if suffix in IMAGE_SUFFIXES else ''}"
            file.write_bytes(received.data)
            items.append(Item(received.name, file))
        batch = Batch(batch_id, folder, model, version, review_below, items, skipped)
        with self._lock:
            self.batches[batch_id] = batch
        self._worker.submit(batch.run, self.batch_size, self.tta)
        return batch

    def get(self, batch_id: str) -> Batch:
        """The batch; KeyError when unknown."""
        return self.batches[batch_id]

    def close(self) -> None:
        """Stop the worker and remove the temporary folder."""
        import shutil

        self._worker.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.root, ignore_errors=True)
