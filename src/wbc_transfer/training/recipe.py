"""Training recipes: the optimiser, learning-rate schedule, loss and augmentation of a run.

- ``paper``: the study's MATLAB settings: SGD with momentum, a constant learning rate (the new
  head `head_lr_factor` times faster), cross-entropy, random horizontal reflection and
  +-30 px translation (at 224 px).
- ``modern``: AdamW (decoupled weight decay; Loshchilov & Hutter, ICLR 2019), linear warm-up
  then cosine decay per iteration (torch `LinearLR` + `CosineAnnealingLR` in `SequentialLR`),
  label smoothing (Szegedy et al., CVPR 2016; torch's `cross_entropy(label_smoothing=...)`),
  and stronger per-image augmentation on the batch: horizontal and vertical flips, rotation,
  translation, colour jitter (`ModernAugment`: `wbc_transfer.training.augment` on the CPU, kornia on a
  GPU).

Both recipes validate on the leak-free validation cells every epoch; `train.keep: best` keeps
the weights of the best validation epoch and `train.patience` stops early (engine/train stage).
"""

from __future__ import annotations

from collections.abc import Callable

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn

from wbc_transfer.config import TrainParams
from wbc_transfer.data.sets import TrainAugment
from wbc_transfer.engine import make_optimizer as engine_make_optimizer
from wbc_transfer.engine import parameter_groups
from wbc_transfer.models.robustness import HEDJitter
from wbc_transfer.training.augment import MAX_SHIFT, AugmentSpec, FastAugment

RECIPES = ("paper", "modern")


# train.norm_layer frozen: the pretrained body learns at this share of train.lr. Without batch
# statistics the layers are no longer invariant to the scale of their weights, and AdamW moves
# every weight by ~lr per step whatever its size: at lr 1e-3 EfficientNet-Lite0 collapses to a
# constant output within a few steps (loss ln 4; bench/ROBUSTNESS.md, tests/test_robustness.py).
FROZEN_BODY_LR_SCALE = 0.1


def make_optimizer(t: TrainParams, model: nn.Module, head: nn.Module, lr: float | None = None,
                   head_lr_factor: float | None = None, fused: bool = False) -> torch.optim.Optimizer:
    """SGD with momentum (paper) or AdamW (modern); `lr`/`head_lr_factor` override `t`'s
    (tuning). `fused`: torch's fused kernel (benchmark only)."""
    lr = t.lr if lr is None else lr
    factor = t.head_lr_factor if head_lr_factor is None else head_lr_factor
    if t.norm_layer == "frozen":  # the head keeps its rate, the body learns slower (see below)
        lr, factor = lr * FROZEN_BODY_LR_SCALE, factor / FROZEN_BODY_LR_SCALE
    if t.recipe != "modern":
        return engine_make_optimizer(model, head, lr, factor, t.momentum, fused)
    return torch.optim.AdamW(parameter_groups(model, head, lr, factor), lr=lr,
                             weight_decay=t.weight_decay, **({"fused": True} if fused else {}))


def make_scheduler(t: TrainParams, optimizer: torch.optim.Optimizer,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-iteration schedule: none (paper) or linear warm-up over `warmup_epochs` then cosine
    decay to 0 at the end of `epochs` (modern). Step it after every optimiser step."""
    if t.recipe != "modern":
        return None
    total = max(1, t.epochs * steps_per_epoch)
    warmup = min(total - 1, round(t.warmup_epochs * steps_per_epoch))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    if warmup < 1:
        return cosine
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


def make_loss(t: TrainParams) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy; with label smoothing `t.label_smoothing` in the modern recipe."""
    smoothing = t.label_smoothing if t.recipe == "modern" else 0.0
    return lambda logits, y: F.cross_entropy(logits, y, label_smoothing=smoothing)


class KorniaAugment:
    """The modern augmentation with kornia on float batches: per-image random flips (h and v),
    rotation in [-rotation_deg, rotation_deg], translation (train.translate_px at
    reference_size, reflection padding), and brightness/contrast/saturation jitter (+ hue,
    random grayscale, zoom, HED jitter when set).

    uint8 or float N x 3 x H x W in [0, 255] -> float32 in [0, 255] (what `normalise` expects).
    Random parameters come from torch's global RNG (seeded per epoch by the train stage).
    `ModernAugment` uses it for batches on a GPU; on the CPU `augment.FastAugment` does the
    same in about half its time per batch (17 vs 33 ms at 224 px, batch 32, bench/AUGMENT.md)."""

    def __init__(self, t: TrainParams, size: int):
        shift = min(MAX_SHIFT, t.translate_px / t.reference_size)
        jitter = t.colour_jitter
        self.pipeline = K.AugmentationSequential(
            K.RandomHorizontalFlip(), K.RandomVerticalFlip(),
            K.RandomAffine(degrees=t.rotation_deg, translate=(shift, shift), p=1.0,
                           scale=tuple(t.scale) if tuple(t.scale) != (1.0, 1.0) else None,
                           padding_mode="reflection"),
            # hue off by default: kornia's RGB<->HSV round trip cost 4x the rest of the
            # augmentation (0.27 s vs 0.065 s per 32 images at 128 px on one core)
            K.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter,
                          hue=t.hue_jitter, p=1.0 if jitter > 0 or t.hue_jitter > 0 else 0.0),
            K.RandomGrayscale(p=t.grayscale_p),
        )
        self.hed = HEDJitter(t.hed_jitter)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.hed(self.pipeline(batch.float().div(255.0)).clamp_(0, 1))
        return x.clamp_(0, 1).mul_(255.0)


class ModernAugment:
    """The modern recipe's augmentation (`augment` module docstring): on the CPU
    `augment.FastAugment` (OpenCV warp of the uint8 images, colour steps as 3 x 3 matrices),
    on any other device `KorniaAugment` on the device. The same distributions either way.

    uint8 (or float in [0, 255]) N x 3 x H x W -> float32 N x 3 x H x W in [0, 255]."""

    def __init__(self, t: TrainParams, size: int):
        self.spec = AugmentSpec.from_train(t)
        self.fast = FastAugment(self.spec)
        self._t, self._size = t, size
        self._kornia: KorniaAugment | None = None  # built on first use (GPU batches)

    @property
    def kornia(self) -> KorniaAugment:
        if self._kornia is None:
            self._kornia = KorniaAugment(self._t, self._size)
        return self._kornia

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.device.type == "cpu":
            return self.fast(batch)
        return self.kornia(batch)


def make_augment(t: TrainParams, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training augmentation of the recipe (a callable on uint8 N x 3 x S x S batches)."""
    if t.recipe == "modern":
        return ModernAugment(t, size)
    return TrainAugment(t.translate_px, t.reference_size)
