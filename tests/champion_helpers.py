"""A tiny registered champion for the predict/serve tests (built once per test session).

No training: an EfficientNet-Lite0 at 64 px with random weights, its BatchNorm statistics set
from one batch of noise (random init makes its features vanish otherwise, and every image would
get the same answer) and a random head. It goes through the project's real logging and
registration code (wbc_transfer.serving.classifier) into a SQLite store under a tmp folder.
"""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]
MODEL_NAME = "wbc-classifier"
ALIAS = "champion"
MODEL_URI = f"models:/{MODEL_NAME}@{ALIAS}"

_CACHE: dict[str, Champion] = {}


@dataclass(frozen=True)
class Champion:
    tracking_uri: str
    run_id: str
    version: str
    weights: Path
    config: dict


def tiny_weights(file: Path, arch: str = "efficientnet_lite0", head_std: float = 0.05) -> dict:
    """Random-init `arch` at 64 px saved to `file`; returns its pyfunc config."""
    import torch

    from wbc_transfer.models import registry as models

    torch.manual_seed(0)
    built = models.build(arch, len(CLASSES), "none", 64)
    for module in built.model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = 1.0
    built.model.train()
    with torch.no_grad():
        built.model(torch.rand(4, 3, 64, 64) * 2 - 1)
        torch.nn.init.normal_(built.head.weight, std=head_std)
    torch.save(built.model.eval().state_dict(), file)
    return {"architecture": arch, "image_size": 64, "mean": list(built.mean),
            "std": list(built.std), "classes": CLASSES}


def register_tiny_champion(folder: Path) -> Champion:
    """Log + register the tiny pyfunc with the real code; cached for the session."""
    if "champion" in _CACHE:
        return _CACHE["champion"]
    import mlflow
    from mlflow import MlflowClient

    from wbc_transfer.serving import pyfunc

    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("tests", artifact_location=(folder / "mlruns").as_uri())
    weights = folder / "model.pt"
    config = tiny_weights(weights)
    with mlflow.start_run(experiment_id=experiment, run_name="tiny") as run:
        mlflow.log_param("architecture", config["architecture"])
    client = MlflowClient()
    version = pyfunc.register_classifier(client, MODEL_NAME, run.info.run_id, weights, config,
                                          description="tiny test model")
    client.set_registered_model_alias(MODEL_NAME, ALIAS, version.version)
    _CACHE["champion"] = Champion(uri, run.info.run_id, str(version.version), weights, config)
    return _CACHE["champion"]


def real_images(mirror: Path, dest: Path, per_class: int = 2) -> list[Path]:
    """A few real TEST images copied under dest/<class>/ (sorted, deterministic)."""
    out = []
    for cls in CLASSES:
        files = sorted((mirror / "TEST" / cls).glob("*.jpeg"))[:per_class]
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for f in files:
            out.append(Path(shutil.copyfile(f, dest / cls / f.name)))
    return out


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data): a size/bomb probe."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def bad_and_odd_files(source: Path, dest: Path) -> dict[str, Path]:
    """name -> file: the bad-input cases (and convertible modes) made from one real image."""
    dest.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()
    rgb = Image.open(source).convert("RGB")
    files = {
        "empty": dest / "empty.jpeg",
        "truncated": dest / "truncated.jpeg",
        "text": dest / "notes.jpeg",
        "huge_side": dest / "huge_side.png",
        "bomb": dest / "bomb.png",
        "gray": dest / "gray.png",
        "rgba": dest / "rgba.png",
        "i16": dest / "sixteen.png",
    }
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(data[: len(data) // 3])
    files["text"].write_text("this is not an image\n")
    files["huge_side"].write_bytes(png_with_size(20_001, 10))
    files["bomb"].write_bytes(png_with_size(10_000, 10_000))
    rgb.convert("L").save(files["gray"])
    rgb.convert("RGBA").save(files["rgba"])
    sixteen = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(sixteen).save(files["i16"])  # mode I;16
    return files


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png16_rgb(values: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one) of an H x W x 3 uint16 array."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    height, width, _ = values.shape
    big_endian = values.astype(">u2")
    raw = b"".join(b"\x00" + big_endian[y].tobytes() for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def sixteen_bit_of(rgb: np.ndarray) -> np.ndarray:
    """uint16 values whose high byte is the 8-bit value and whose low byte is 200: read right
    (scaled) they give the 8-bit image back; wrapped into 8 bits they are all 200."""
    return rgb.astype(np.uint16) * 256 + 200


def exif_jpeg(image: Image.Image, orientation: int) -> bytes:
    """JPEG bytes of `image` (pixels as stored) with an EXIF Orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def stored_pixels(data: bytes) -> np.ndarray:
    """H x W x 3 uint8 pixels of image bytes exactly as stored (no EXIF orientation applied)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("RGB"))
