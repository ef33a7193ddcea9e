"""`wbc-transfer predict`: classify image files, folders and globs with a registered pyfunc.

One output row per image: ``path, predicted, confidence, p_<class>..., review, note, error``
(``confidence``: the temperature-calibrated top probability; ``review``: true when it is below
``--review-below``; ``set``: with ``--sets P``, the classes of the split-conformal prediction
set that holds the true class for a share P of images, for models adapted to a lab), plus
``explanation`` (the Grad-CAM overlay PNG written under ``--explain DIR``), as CSV or JSON
lines, to stdout or a file. Files go through the model in batches (``--batch-size``) and the
very same pyfunc that `mlflow models serve` runs, so the command line and HTTP answer alike.

A file that cannot be classified (missing, unreadable, empty, truncated, not an image, absurdly
large) gets a row with its ``error`` and the others are still classified; conversions that were
safe to make (EXIF orientation, 16-bit -> 8-bit, grayscale, RGBA, palette -> RGB) are stated in
``note``. Images are decoded by `wbc_transfer.data.images`, the decoder of every pipeline stage.
Hidden files and folders (names starting with ".") inside a folder are skipped. A path is
written as `wbc_transfer.io.path_text` gives it (valid UTF-8 whatever the file name's bytes).

Trust: before loading, the model's MLmodel metadata must carry the marker written by
`wbc_transfer.serving.pyfunc.log_classifier` (a models-from-code pyfunc whose weights are a state_dict
read with ``torch.load(weights_only=True)``); anything else, e.g. the pickled/pt2 `model`
artifact of a training run, is refused without being loaded. Loading still executes the
model's own `pyfunc_model.py` from the artifact store, as MLflow's models-from-code format
requires, so point ``--model`` only at stores you trust.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from wbc_transfer.serving.inputs import Item, collect, skipped_note
from wbc_transfer.serving.loading import (
    DEFAULT_MODEL,
    REVIEW_FORMAT,
    ModelUnavailableError,
    classes_of,
    format_of,
    load_model,
    resolve_tracking_uri,
    sets_problem,
)

# (torch, MLflow and wbc_transfer.serving.classifier are imported lazily: `wbc-transfer --help` stays fast)
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# prediction


def columns(classes: Sequence[str], explain: bool = False, sets: bool = False) -> list[str]:
    from wbc_transfer.serving.classifier import output_columns

    return ["path", *output_columns(classes, sets), *(["explanation"] if explain else [])]


def explanation_file(folder: Path, index: int, path: str) -> Path:
    """Where the overlay of output row `index` (input `path`) goes: <folder>/<index>-<stem>.png
    (the index keeps files of one name in different folders apart)."""
    stem = Path(path).stem or "image"
    return folder / f"{index:05d}-{stem}.png"


def predict_items(model, items: Sequence[Item], batch_size: int = 32, tta: bool = False,
                  progress: bool = False, review_below: float = 0.0,
                  explain_dir: Path | None = None, sets: float = 0.0) -> Iterator[dict[str, Any]]:
    """Rows (dicts, in input order), one per item, computed `batch_size` files at a time.

    `review_below`: rows whose calibrated confidence is below it get review = true.
    `explain_dir`: a Grad-CAM overlay PNG per classified image is written there (named by
    `explanation_file`) and its path put in the row's `explanation`; error rows get none.
    `sets`: each classified row gets `set`, its prediction set at that confidence level."""
    import pandas as pd
    from tqdm import tqdm

    from wbc_transfer.data.images import ImageError, read_file
    from wbc_transfer.evaluation.explain import save_overlay

    cols = columns(classes_of(model), explain_dir is not None, bool(sets))
    bar = tqdm(total=len(items), unit="img", desc="predict", file=sys.stderr,
               disable=not progress, mininterval=0.5, smoothing=0.1)
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            rows = [dict.fromkeys(cols, None) | {"path": it.path, "note": "", "error": it.error}
                    for it in chunk]
            todo: list[int] = []
            data: list[bytes] = []
            for i, it in enumerate(chunk):
                if it.error or it.file is None:
                    continue
                try:
                    data.append(read_file(it.file))
                    todo.append(i)
                except ImageError as exc:
                    rows[i]["error"] = str(exc)
            if todo:
                try:
                    maps: dict[int, Any] = {}
                    if explain_dir is None:
                        out = model.predict(pd.DataFrame({"image": data}),
                                            params={"tta": tta, "batch_size": batch_size,
                                                    "review_below": review_below, "sets": sets})
                    else:  # the same rows, from the pyfunc's classifier, with Grad-CAM maps
                        out, maps = model.unwrap_python_model().classifier.classify_bytes(
                            data, tta, batch_size, review_below, explain=True, sets=sets)
                    for k, (i, record) in enumerate(zip(todo, out.to_dict(orient="records"),
                                                        strict=True)):
                        rows[i].update({key: v for key, v in record.items() if key in rows[i]})
                        if k in maps:
                            file = explanation_file(explain_dir, start + i, rows[i]["path"])
                            rows[i]["explanation"] = str(save_overlay(*maps[k], file))
                except Exception as exc:  # the model itself failed: these rows say so
                    for i in todo:
                        rows[i]["error"] = f"prediction failed: {type(exc).__name__}: {exc}"
            yield from rows
            bar.update(len(chunk))
    finally:
        bar.close()


class Writer:
    """CSV or JSON lines, row by row, with empty cells/nulls for missing values."""

    def __init__(self, stream: TextIO, fmt: str, cols: Sequence[str]):
        self.stream, self.fmt, self.cols = stream, fmt, list(cols)
        if fmt == "csv":
            self.csv = csv.DictWriter(stream, fieldnames=self.cols, lineterminator="\n")
            self.csv.writeheader()

    def write(self, row: dict[str, Any]) -> None:
        if self.fmt == "csv":  # a list (the prediction set) as its items joined by "|"
            self.csv.writerow({k: "" if row.get(k) is None else
                               "|".join(row[k]) if isinstance(row[k], list) else row[k]
                               for k in self.cols})
        else:
            self.stream.write(json.dumps({k: row.get(k) for k in self.cols}) + "\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"pyfunc model URI (default: {DEFAULT_MODEL})")
    p.add_argument("--output", "-o", default=None, help="output file (default: stdout)")
    p.add_argument("--format", choices=("csv", "jsonl"), default=None,
                   help="output format (default: jsonl for *.jsonl/*.json outputs, else csv)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average with the horizontally flipped image")
    p.add_argument("--review-below", type=float, default=0.0, metavar="P",
                   help="flag rows whose calibrated confidence is below P (0-1) for human "
                        "review: column `review` (default 0: none)")
    p.add_argument("--sets", type=float, default=0.0, metavar="P",
                   help="add column `set`: the split-conformal prediction set that holds the true "
                        "class for a share P (e.g. 0.90) of images (models adapted with "
                        "`wbc-transfer adapt`, calibrated on the lab's labelled cells; CSV: "
                        "classes joined by |)")
    p.add_argument("--explain", default=None, metavar="DIR",
                   help="write a Grad-CAM overlay PNG per classified image into DIR "
                        "(column `explanation`)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI, else the "
                        "project's mlflow.db)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")


def main(args: argparse.Namespace) -> int:
    """Run `predict` for parsed CLI args; returns the exit code (2: no model / no input)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.batch_size < 1:
        print("wbc-transfer predict: --batch-size must be >= 1", file=sys.stderr)
        return 2
    if not 0.0 <= args.review_below <= 1.0:
        print(f"wbc-transfer predict: --review-below must be between 0 and 1, got "
              f"{args.review_below}", file=sys.stderr)
        return 2
    if args.sets and not 0.0 < args.sets < 1.0:
        print(f"wbc-transfer predict: --sets must be a confidence level between 0 and 1 (e.g. "
              f"0.90), got {args.sets}", file=sys.stderr)
        return 2
    explain_dir = Path(args.explain) if args.explain else None
    fmt = args.format or ("jsonl" if args.output and args.output.endswith((".jsonl", ".json"))
                          else "csv")
    skipped: list[str] = []
    items = collect(args.paths, skipped)
    if not items:
        print(f"wbc-transfer predict: no images found{skipped_note(skipped)}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        model = load_model(args.model, resolve_tracking_uri(args.tracking_uri, args.params))
    except ModelUnavailableError as exc:
        print(f"wbc-transfer predict: {exc}", file=sys.stderr)
        return 2
    if args.review_below > 0 and (found := format_of(model)) < REVIEW_FORMAT:
        # an older pyfunc runs its own logged code, which drops the review_below param silently
        print(f"wbc-transfer predict: {args.model} is a format-{found} model, older than the review "
              f"flag and temperature (format {REVIEW_FORMAT}); re-register it with `dvc repro "
              "promote` (or `wbc-transfer promote`), or leave out --review-below", file=sys.stderr)
        return 2
    if args.sets:
        problem = sets_problem(model, args.model)
        if problem:
            print(f"wbc-transfer predict: {problem}", file=sys.stderr)
            return 2
    loaded = time.perf_counter()
    stream = open(args.output, "w", newline="") if args.output else sys.stdout  # noqa: SIM115
    n_ok = n_err = 0
    try:
        writer = Writer(stream, fmt, columns(classes_of(model), explain_dir is not None,
                                             bool(args.sets)))
        progress = not args.quiet and len(items) > args.batch_size
        for row in predict_items(model, items, args.batch_size, args.tta, progress,
                                 args.review_below, explain_dir, args.sets):
            writer.write(row)
            if row["error"]:
                n_err += 1
            else:
                n_ok += 1
        stream.flush()
    finally:
        if args.output:
            stream.close()
    done = time.perf_counter()
    if not args.quiet:
        rate = n_ok / (done - loaded) if done > loaded else float("nan")
        print(f"wbc-transfer predict: {n_ok} classified, {n_err} failed{skipped_note(skipped)} "
              f"({args.model}, model load {loaded - started:.1f}s, {rate:.1f} img/s"
              f"{', tta' if args.tta else ''}{', explained' if explain_dir else ''})",
              file=sys.stderr)
    return 0
