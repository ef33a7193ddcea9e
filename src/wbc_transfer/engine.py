"""The training engine: one function per phase, as plain as the algorithm."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from tqdm import tqdm

from wbc_transfer.data.sets import MIN_TRAIN_BATCH, ImageSet, batch_count, batches, normalise
from wbc_transfer.io import atomic_write

log = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def configure_torch(num_threads: int = 0, deterministic: bool = True) -> dict[str, Any]:
    """Explicit, logged thread, denormal and determinism settings (denormals silently slow CPU
    training).

    `deterministic`: the same inputs give the same numbers on the same device and thread count
    (torch.use_deterministic_algorithms, warn-only for the few CUDA ops without a deterministic
    kernel; cuDNN autotuning off; CUBLAS_WORKSPACE_CONFIG as cuBLAS requires, set before any
    CUDA work). On the CPU the results still depend on the thread count (oneDNN splits its
    reductions by thread): `torch_threads` is returned for the MLflow params. Cost measured in
    bench/NOTES.md.
    """
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    torch.set_flush_denormal(True)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = False  # autotuning may pick other kernels on each run
    torch.backends.cudnn.deterministic = deterministic
    return {"torch_threads": torch.get_num_threads(), "flush_denormal": True,
            "deterministic": deterministic, "torch_version": torch.__version__}


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Move `model` to `device`, in channels_last (NHWC) memory format if asked.

    NHWC lets oneDNN pick its fast convolution kernels: 1.1-1.8x training and inference
    throughput for every architecture here on the CPU (bench/NOTES.md). Inputs may stay NCHW.
    """
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def amp_dtype(device: torch.device, setting: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `train.amp`: auto = bf16 on CUDA (no loss scaling needed), none on
    the CPU, where bf16 autocast is slower than fp32 on a CPU without AMX; bf16 forces it."""
    if setting not in ("auto", "bf16", "off"):
        raise ValueError(f"train.amp must be auto, bf16 or off, not {setting!r}")
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a uint8 batch to `device` (4x fewer bytes than float); pinned and non-blocking on CUDA."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def parameter_groups(model: nn.Module, head: nn.Module, lr: float,
                     head_lr_factor: float) -> list[dict[str, Any]]:
    """Two optimiser groups: the pretrained body at `lr`, the new head at `lr * head_lr_factor`
    (the paper's WeightLearnRateFactor/BiasLearnRateFactor)."""
    head_ids = {id(p) for p in head.parameters()}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    return [{"params": body, "lr": lr}, {"params": list(head.parameters()), "lr": lr * head_lr_factor}]


def make_optimizer(model: nn.Module, head: nn.Module, lr: float, head_lr_factor: float,
                   momentum: float, fused: bool = False) -> torch.optim.Optimizer:
    """SGD with momentum (the paper recipe); the new head learns `head_lr_factor` times faster.
    `fused`: torch's fused kernel (bench only). The modern recipe: `recipe.make_optimizer`."""
    return torch.optim.SGD(parameter_groups(model, head, lr, head_lr_factor), lr=lr,
                           momentum=momentum, **({"fused": True} if fused else {}))


def logits_of(output: Any) -> torch.Tensor:
    # GoogLeNet with aux heads returns a namedtuple in train mode
    return output.logits if hasattr(output, "logits") else output


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    f1_macro: float
    probabilities: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray
    logits: np.ndarray | None = None  # float N x K, before temperature scaling
    temperature: float = 1.0


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
            device: torch.device, batch_size: int = 64,
            amp: torch.dtype | None = None, tta: bool = False) -> torch.Tensor:
    """Batched inference on uint8 N x 3 x S x S; returns float32 N x K logits on the CPU.

    `tta`: test-time augmentation, the mean of the softmax of each image and of its horizontal
    flip; returned as log-probabilities, so that softmax() of the result is that mean."""
    model.eval()
    outputs = []
    for idx in batches(len(images), batch_size):
        x = normalise(to_device(images[idx], device), mean, std)
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            logits = logits_of(model(x)).float()
            if tta:
                flipped = logits_of(model(x.flip(-1))).float()
                logits = torch.log((logits.softmax(1) + flipped.softmax(1)) / 2)
        outputs.append(logits.cpu())
    return torch.cat(outputs) if outputs else torch.zeros((0, 0))


def evaluate(model: nn.Module, data: ImageSet, mean: Sequence[float], std: Sequence[float],
             device: torch.device, batch_size: int = 64,
             amp: torch.dtype | None = None, tta: bool = False,
             temperature: float = 1.0) -> EvalResult:
    """Loss (cross-entropy, nats), accuracy and macro-F1 of `model` on `data`, with the
    per-image probabilities (float N x K, softmax of logits / `temperature`: calibrated when
    it is the fitted temperature, see `wbc_transfer.evaluation.calibration`), predictions (int N) and the
    raw logits. The temperature never changes the predictions."""
    raw = predict(model, data.images, mean, std, device, batch_size, amp, tta)
    logits = raw / float(temperature)
    labels = data.labels
    loss = float(F.cross_entropy(logits, labels)) if len(labels) else float("nan")
    probs = torch.softmax(logits, dim=1).numpy()
    preds = probs.argmax(axis=1)
    y = labels.numpy()
    return EvalResult(
        loss=loss,
        accuracy=float(accuracy_score(y, preds)),
        f1_macro=float(f1_score(y, preds, average="macro", labels=range(len(data.classes)),
                                zero_division=0)),
        probabilities=probs, predictions=preds, labels=y, logits=raw.numpy(),
        temperature=float(temperature),
    )


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    seconds: float
    images: int


def train_one_epoch(
    model: nn.Module,
    data: ImageSet,
    optimizer: torch.optim.Optimizer,
    augment: Callable[[torch.Tensor], torch.Tensor],
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int,
    generator: torch.Generator,
    progress: tqdm | None = None,
    every: int = 0,
    on_every: Callable[[int], None] | None = None,
    start_iteration: int = 0,
    amp: torch.dtype | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> EpochStats:
    """One pass over `data` in shuffled mini-batches; `on_every(iteration)` runs each `every`.
    `loss_fn(logits, labels)`: the recipe's loss; `scheduler` is stepped after every step.

    A last batch of one image joins the batch before it (`data.batches`, min_last=2), for
    every architecture. Raises ValueError when BatchNorm layers would still see a batch of one
    (batch_size 1, or a single training image).
    """
    import time

    if (batch_size < MIN_TRAIN_BATCH or len(data) == 1) and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError(
            f"train.batch_size={batch_size} with {len(data)} training image(s): this model has "
            f"BatchNorm layers, which need at least {MIN_TRAIN_BATCH} images per training "
            f"batch; set train.batch_size >= {MIN_TRAIN_BATCH}")
    model.train()
    started = time.perf_counter()
    total_loss, correct, seen = 0.0, 0, 0
    for step, idx in enumerate(batches(len(data), batch_size, generator, shuffle=True,
                                       min_last=MIN_TRAIN_BATCH), 1):
        # augment and normalise on the training device (the GPU when there is one)
        x = normalise(augment(to_device(data.images[idx], device)), mean, std)
        y = to_device(data.labels[idx], device)
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            logits = logits_of(model(x))
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += float(loss.detach()) * len(idx)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(idx)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
        if every and on_every and (start_iteration + step) % every == 0:
            on_every(start_iteration + step)
            model.train()
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1),
                      time.perf_counter() - started, seen)


def fit(
    model: nn.Module,
    data: ImageSet,
    optimizer: torch.optim.Optimizer,
    augment: Callable[[torch.Tensor], torch.Tensor],
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int,
    epochs: int,
    seed: int,
    start_epoch: int = 0,
    amp: torch.dtype | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    progress: tqdm | None = None,
    every: int = 0,
    on_every: Callable[[int], None] | None = None,
    before_epoch: Callable[[int], bool] | None = None,
    after_epoch: Callable[[int, EpochStats], None] | None = None,
) -> int:
    """Train `model` on `data` for epochs `start_epoch` .. `epochs` - 1 (0-based), one
    `train_one_epoch` each; returns the number of epochs run in this call.

    Before epoch e the RNGs are reseeded with seed * 1000 + e (torch's global RNG for the
    augmentation, a generator for the batch order), so a resumed or repeated run draws the same
    batches and augmentations. `before_epoch(e)` may return False to stop before epoch e (early
    stopping); `after_epoch(e, stats)` sees each finished epoch (validation, checkpoints,
    logging). The one training loop of the train stage and `wbc_transfer.training.adapt`."""
    iterations_per_epoch = batch_count(len(data), batch_size, MIN_TRAIN_BATCH)
    ran = 0
    for epoch in range(start_epoch, epochs):
        if before_epoch is not None and before_epoch(epoch) is False:
            break
        torch.manual_seed(seed * 1000 + epoch)
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        stats = train_one_epoch(
            model, data, optimizer, augment, mean, std, device, batch_size, generator, progress,
            every=every, on_every=on_every, start_iteration=epoch * iterations_per_epoch, amp=amp,
            loss_fn=loss_fn, scheduler=scheduler,
        )
        ran += 1
        if after_epoch is not None:
            after_epoch(epoch, stats)
    return ran


@dataclass
class Checkpoint:
    """Per-epoch training state, so an interrupted stage resumes where it stopped."""

    path: Path
    fingerprint: str
    state: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def fingerprint_of(config: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def load(self) -> dict[str, Any] | None:
        """The saved state when it belongs to the same configuration, else None."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a torn file from a hard kill: start over, say so
            log.warning("ignoring unreadable checkpoint %s: %s", self.path, exc)
            return None
        if state.get("fingerprint") != self.fingerprint:
            log.info("checkpoint %s is for another configuration; starting afresh", self.path)
            return None
        return state

    def save(self, **state: Any) -> None:
        state["fingerprint"] = self.fingerprint
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        if self.path.parent.is_dir() and not any(self.path.parent.iterdir()):
            os.rmdir(self.path.parent)
