"""Small file helpers: every output is written completely or not at all."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

_ESCAPE = re.compile(r"\\(\\|x[89a-f][0-9a-f])")


def path_text(path: str | os.PathLike[str]) -> str:
    r"""The text form of a file path in everything the product writes (CSV, JSON, Markdown,
    MLflow params and tags, error messages): always valid UTF-8, and reversible.

    A name whose bytes are UTF-8 is written as it is, except that a backslash is doubled. A
    byte that is not UTF-8 (Python holds it as a surrogate, a Latin-1 e-acute 0xE9 as U+DCE9)
    is written as the four characters ``\xe9``: the file named by the bytes b"caf\xe9.jpeg"
    is written as the text ``caf\xe9.jpeg``. `text_path` turns the text back into the name
    of the same file.
    """
    raw = os.fsencode(path)
    return raw.replace(b"\\", b"\\\\").decode("utf-8", errors="backslashreplace")


def text_path(text: str) -> str:
    """The path (str, with surrogates for non-UTF-8 bytes) that `path_text` wrote as `text`."""
    if "\\" not in text:
        return text

    def back(match: re.Match[str]) -> str:
        code = match.group(1)
        return "\\" if code == "\\" else chr(0xDC00 + int(code[1:], 16))

    return _ESCAPE.sub(back, text)


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a temp file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_torch(path: Path, obj: Any) -> Path:
    """`torch.save(obj)` to `path`, atomically and byte-reproducibly: serialised in memory first,
    because torch.save into a file records that file's name inside the archive (here the random
    temporary name), so two saves of the same tensors would differ in bytes."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: Path, data: Any) -> Path:
    text = json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_csv(path: Path, frame: pd.DataFrame) -> Path:
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
