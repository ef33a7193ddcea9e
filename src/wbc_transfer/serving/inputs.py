"""What `wbc-transfer predict` (and the web page's batch) classifies: files, folders (scanned as
every stage scans) and globs, as one `Item` per output row, and the note on skipped files."""


from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# (torch, MLflow and wbc_transfer.serving.classifier are imported lazily: `wbc-transfer --help` stays fast)
log = logging.getLogger(__name__)

GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Item:
    """One output row to be: a file to classify, or an input that already failed."""

    path: str
    file: Path | None = None
    error: str = ""



def _folder_files(folder: Path) -> tuple[list[Path], list[tuple[Path, str]], list[Path]]:
    """(image files, refused links with their reason, files skipped by suffix) under `folder`,
    scanned as every stage scans (`images.walk`: hidden files skipped, links to files read,
    broken links and links to folders refused)."""
    from wbc_transfer.data.images import IMAGE_SUFFIXES, walk

    files, refused, _ = walk(folder)
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    return images, refused, [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]


def collect(paths: Sequence[str], skipped: list[str] | None = None) -> list[Item]:
    """Expand files, folders (recursive; image suffixes only) and globs, in the order given.

    Files named explicitly are always tried, whatever their suffix; a path that does not exist,
    a glob that matches nothing, a broken symbolic link or a link to a folder met inside a
    folder becomes an error row. Files inside folders skipped for their suffix (`.heic`,
    `.txt`) are appended to `skipped` (their paths, as text) when a list is given."""
    from wbc_transfer.io import path_text

    items: list[Item] = []
    seen: set[Path] = set()

    def add(file: Path, shown: str) -> None:
        key = file.resolve()
        if key not in seen:
            seen.add(key)
            items.append(Item(path_text(shown), file))

    def add_folder(folder: Path) -> None:
        images, refused, other = _folder_files(folder)
        merged = sorted([(f, "") for f in images] + refused)
        for file, reason in merged:
            if reason:
                items.append(Item(path_text(str(file)), None, reason))
            else:
                add(file, str(file))
        if skipped is not None:
            skipped.extend(path_text(str(f)) for f in other)

    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            add_folder(path)
        elif path.exists():
            add(path, raw)
        elif GLOB_CHARS & set(raw):
            matches = sorted(glob.glob(os.path.expanduser(raw), recursive=True))
            if not matches:
                items.append(Item(path_text(raw), None, "no file matches this pattern"))
            for match in matches:
                m = Path(match)
                if m.is_dir():
                    add_folder(m)
                else:
                    add(m, match)
        elif path.is_symlink():
            items.append(Item(path_text(raw), None, f"broken symbolic link (to "
                                                    f"{path_text(os.readlink(path))})"))
        else:
            items.append(Item(path_text(raw), None, "file not found"))
    return items


def skipped_note(skipped: Sequence[str], shown: int = 5) -> str:
    """', N skipped (not an image file suffix: a.heic, b.txt, ...)' for the summary, or ''."""
    if not skipped:
        return ""
    names = ", ".join(skipped[:shown]) + (f" and {len(skipped) - shown} more"
                                          if len(skipped) > shown else "")
    return f", {len(skipped)} skipped (not an image file suffix: {names})"
