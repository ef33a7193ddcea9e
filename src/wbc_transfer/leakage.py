"""Near-duplicate detection between splits.

TRAIN was generated with flips, rotations up to 20 degrees, shifts and shear of the same
smear crops, so pixel hashes miss siblings and global CNN embeddings of these look-alike
images do not separate them either (measured: median nearest-neighbour cosine 0.85 within
TRAIN vs 0.81 TEST->TRAIN). The colour distribution of a crop, however, is invariant to
all of those geometric transforms and differs between smears (staining, lighting, the cells
around the WBC). The fingerprint is the square root of a normalised RGB histogram of the
inner crop (the border is dropped: augmentation fill artefacts live there); two images are
near-duplicates when the cosine of their fingerprints reaches `threshold`.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wbc_transfer.images import decode_file

BINS = 24
THUMBNAIL = (160, 120)
BORDER = 10


def fingerprint(file: str | Path) -> np.ndarray:
    """The fingerprint of one image file (decoded by `wbc_transfer.images`, as every stage)."""
    rgb = Image.fromarray(decode_file(file).pixels.permute(1, 2, 0).numpy())
    pixels = np.asarray(rgb.resize(THUMBNAIL), dtype=np.int64)
    pixels = pixels[BORDER:-BORDER, BORDER:-BORDER].reshape(-1, 3) * BINS // 256
    codes = (pixels[:, 0] * BINS + pixels[:, 1]) * BINS + pixels[:, 2]
    hist = np.bincount(codes, minlength=BINS**3).astype(np.float32)
    hist = np.sqrt(hist / hist.sum())
    return hist / np.linalg.norm(hist)


def fingerprints(files: Sequence[str | Path], workers: int = 2) -> np.ndarray:
    if workers > 1 and len(files) > 200:
        with ProcessPoolExecutor(workers) as pool:
            rows = list(pool.map(fingerprint, files, chunksize=128))
    else:
        rows = [fingerprint(f) for f in files]
    return np.stack(rows) if rows else np.zeros((0, BINS**3), np.float32)


def nearest_similarity(queries: np.ndarray, references: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """For each query fingerprint, the highest cosine similarity to any reference."""
    if len(references) == 0:
        return np.full(len(queries), -1.0, np.float32)
    ref = torch.from_numpy(references)
    out = []
    for start in range(0, len(queries), chunk):
        q = torch.from_numpy(queries[start : start + chunk])
        out.append((q @ ref.T).max(dim=1).values)
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)
