"""The upload limits of `wbc-transfer app` (a light module: the CLI reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass


class LimitError(ValueError):
    """An upload beyond the limits; the message names the limit and its option."""


@dataclass(frozen=True)
class Limits:
    """Upload limits (options of `wbc-transfer app`)."""

    max_upload_bytes: int = 512 * 1024 * 1024  # request size, and image bytes after unzipping
    max_images: int = 2000  # images (files + zip members) in one upload

    def check_size(self, size: int) -> None:
        """Raise LimitError when `size` bytes exceed `max_upload_bytes`."""
        if size > self.max_upload_bytes:
            raise LimitError(f"upload too large: {size / 2**20:.1f} MiB, the limit is "
                             f"{self.max_upload_bytes / 2**20:.1f} MiB (option --max-upload-mb)")

    def check_count(self, count: int) -> None:
        """Raise LimitError when `count` images exceed `max_images`."""
        if count > self.max_images:
            raise LimitError(f"too many images: {count}, the limit is {self.max_images} per "
                             f"upload (option --max-images); upload them in parts")
