"""The modern recipe's training augmentation, cheap on the CPU (issue 26).

The same random transforms as the kornia pipeline it replaces on the CPU (kept for other
devices: `recipe.KorniaAugment`), drawn per image from the same distributions:

1. horizontal and vertical flips, p = 0.5 each (kornia RandomHorizontalFlip/RandomVerticalFlip);
2. an affine warp (kornia RandomAffine, p = 1): angle ~ U(-rotation_deg, rotation_deg) about
   the image centre, zoom ~ U(scale) (isotropic), shift ~ U(-f, f) x side on each axis
   (f = translate_px / reference_size, at most 0.45), bilinear, reflection padding;
3. colour jitter (kornia ColorJitter, torchvision's formulas, p = 1 when any jitter is set):
   brightness, contrast, saturation factors ~ U(1 - j, 1 + j), hue ~ U(-h, h) turns, applied
   in one random order per batch, each step clamped to the valid range;
4. grayscale with probability grayscale_p (kornia RandomGrayscale, BT.601 weights);
5. HED stain jitter (`robustness.HEDJitter`, Tellez et al. 2018).

What makes it cheap (bench/AUGMENT.md): the flips and the affine warp are one 2 x 3 matrix
per image (flips are exact pixel permutations, so flipping then warping is warping with the
composed matrix), applied by OpenCV's `warpAffine` to the uint8 image planes (BORDER_REFLECT is
torch's grid_sample reflection with align_corners=False; bilinear, 1/32 px fixed point,
output rounded to uint8); every colour step is a per-image 3 x 3 matrix plus an offset on the
planar float image (one batched matmul and a clamp: brightness b I; contrast c I plus
(1 - c) x its grey mean; saturation s I + (1 - s) w 1^T with w the grey weights), in [0, 255]
rather than [0, 1] (the formulas are homogeneous, so only the clamp bound changes); the HED
jitter is one 3 x 3 matrix in log space (`robustness.hed_log_transform`). Not bit-identical
to kornia (uint8 rounding after the warp, other random numbers), the same distributions
(tests/test_augment.py).

Random numbers come from torch's global (CPU) RNG, one draw per batch, so `torch.manual_seed`
(reseeded per epoch by `engine.fit`) makes an epoch reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import kornia.enhance
import numpy as np
import torch

from wbc_transfer.config import TrainParams
from wbc_transfer.models.robustness import hed_log_transform

GREY = (0.299, 0.587, 0.114)  # kornia.color.rgb_to_grayscale (ITU-R BT.601 luma)
MAX_SHIFT = 0.45  # largest shift as a fraction of the side (the former ModernAugment's cap)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # kornia ColorJitter's step indices


@dataclass(frozen=True)
class AugmentSpec:
    """The ranges of the modern augmentation (from `TrainParams`: `from_train`)."""

    rotation_deg: float = 0.0
    shift: float = 0.0  # fraction of the side
    scale: tuple[float, float] = (1.0, 1.0)
    colour_jitter: float = 0.0  # brightness, contrast and saturation
    hue_jitter: float = 0.0  # fraction of the hue circle
    grayscale_p: float = 0.0
    hed_jitter: float = 0.0
    flip_p: float = 0.5

    @classmethod
    def from_train(cls, t: TrainParams) -> AugmentSpec:
        if t.hed_jitter < 0:
            raise ValueError(f"train.hed_jitter must be >= 0, got {t.hed_jitter}")
        return cls(rotation_deg=float(t.rotation_deg),
                   shift=min(MAX_SHIFT, t.translate_px / t.reference_size),
                   scale=(float(t.scale[0]), float(t.scale[1])),
                   colour_jitter=float(t.colour_jitter), hue_jitter=float(t.hue_jitter),
                   grayscale_p=float(t.grayscale_p), hed_jitter=float(t.hed_jitter))

    @property
    def jitters(self) -> bool:
        return self.colour_jitter > 0 or self.hue_jitter > 0

    def draw(self, n: int, height: int, width: int) -> Draw:
        """Per-image parameters for a batch of n images (torch's global RNG)."""

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return low + (high - low) * torch.rand(n, *shape, dtype=torch.float64)

        j, s = self.colour_jitter, self.hed_jitter
        return Draw(
            hflip=torch.rand(n) < self.flip_p,
            vflip=torch.rand(n) < self.flip_p,
            angle=uniform(-self.rotation_deg, self.rotation_deg),
            shift=uniform(-self.shift, self.shift, 2) * torch.tensor([width, height]),
            scale=uniform(*self.scale),
            factors=torch.stack([uniform(max(0.0, 1 - j), 1 + j), uniform(max(0.0, 1 - j), 1 + j),
                                 uniform(max(0.0, 1 - j), 1 + j),
                                 uniform(-self.hue_jitter, self.hue_jitter)], dim=1).float(),
            order=torch.randperm(4).tolist(),
            grey=torch.rand(n) < self.grayscale_p,
            hed_alpha=uniform(1 - s, 1 + s, 3).float(),
            hed_beta=uniform(-s, s, 3).float(),
        )


@dataclass
class Draw:
    """The random parameters of one batch (N images)."""

    hflip: torch.Tensor  # bool N
    vflip: torch.Tensor  # bool N
    angle: torch.Tensor  # float64 N, degrees (kornia RandomAffine's sign)
    shift: torch.Tensor  # float64 N x 2, pixels (x, y)
    scale: torch.Tensor  # float64 N
    factors: torch.Tensor  # float32 N x 4: brightness, contrast, saturation, hue (turns)
    order: list[int]  # the colour steps' order (one per batch, as kornia ColorJitter)
    grey: torch.Tensor  # bool N
    hed_alpha: torch.Tensor  # float32 N x 3
    hed_beta: torch.Tensor  # float32 N x 3


def affine_matrices(draw: Draw, height: int, width: int) -> np.ndarray:
    """float64 N x 2 x 3 forward (source -> output pixel) matrices: flips, then kornia
    RandomAffine's rotation by `angle` and zoom about the centre ((w - 1) / 2, (h - 1) / 2)
    and the shift (kornia.geometry.get_affine_matrix2d: cv2.getRotationMatrix2D(centre,
    -angle, scale) plus the translation)."""
    n = len(draw.angle)
    theta = torch.deg2rad(-draw.angle)
    a, b = draw.scale * torch.cos(theta), draw.scale * torch.sin(theta)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    affine = torch.zeros((n, 3, 3), dtype=torch.float64)
    affine[:, 0, 0], affine[:, 0, 1] = a, b
    affine[:, 1, 0], affine[:, 1, 1] = -b, a
    affine[:, 0, 2] = (1 - a) * cx - b * cy + draw.shift[:, 0]
    affine[:, 1, 2] = b * cx + (1 - a) * cy + draw.shift[:, 1]
    affine[:, 2, 2] = 1
    flips = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
    flips[draw.hflip, 0, 0], flips[draw.hflip, 0, 2] = -1.0, width - 1.0
    flips[draw.vflip, 1, 1], flips[draw.vflip, 1, 2] = -1.0, height - 1.0
    return (affine @ flips)[:, :2].numpy()


def warp(batch: torch.Tensor, matrices: np.ndarray) -> torch.Tensor:
    """uint8 N x C x H x W, forward matrices N x 2 x 3 -> uint8 N x C x H x W: bilinear,
    reflection padding (cv2.BORDER_REFLECT = grid_sample reflection with align_corners=False),
    one `cv2.warpAffine` per channel plane (planar: no transposes; the same output as warping
    the interleaved image, and faster)."""
    n, c, h, w = batch.shape
    source = batch.contiguous().numpy()
    out = np.empty_like(source)
    for i in range(n):
        for j in range(c):
            cv2.warpAffine(source[i, j], matrices[i], (w, h), dst=out[i, j],
                           flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return torch.from_numpy(out)


def _grey(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(GREY, dtype=x.dtype)


def colour_step(x: torch.Tensor, step: int, factor: torch.Tensor, top: float) -> torch.Tensor:
    """One kornia ColorJitter step on planar float N x 3 x H x W in [0, top], clamped to it.
    Brightness, contrast and saturation as one per-image 3 x 3 matrix plus offset."""
    n = len(x)
    if step == HUE:
        return kornia.enhance.adjust_hue(x / top, factor * 2 * math.pi).clamp_(0, 1).mul_(top)
    eye = torch.eye(3, dtype=x.dtype)
    f = factor.to(x.dtype).view(n, 1, 1)
    offset = torch.zeros((n, 3, 1), dtype=x.dtype)
    if step == BRIGHTNESS:  # x * b
        matrix = f * eye
    elif step == CONTRAST:  # c x + (1 - c) mean(grey(x))
        matrix = f * eye
        offset += (1 - f) * (x.mean((2, 3)) @ _grey(x)).view(n, 1, 1)
    else:  # SATURATION: s x + (1 - s) grey(x)
        matrix = f * eye + (1 - f) * _grey(x).view(1, 1, 3)
    flat = x.view(n, 3, -1)
    return torch.baddbmm(offset, matrix, flat).clamp_(0, top).view_as(x)


def jitter_colour(x: torch.Tensor, draw: Draw, spec: AugmentSpec, top: float = 255.0) -> torch.Tensor:
    """Colour jitter, grayscale and HED jitter of planar float N x 3 x H x W in [0, top]."""
    if spec.jitters:
        neutral = (1.0, 1.0, 1.0, 0.0)
        for step in draw.order:
            factor = draw.factors[:, step]
            if bool((factor != neutral[step]).any()):  # kornia skips a step neutral everywhere
                x = colour_step(x, step, factor, top)
    if bool(draw.grey.any()):
        grey = (x[draw.grey] * _grey(x).view(1, 3, 1, 1)).sum(1, keepdim=True)
        x[draw.grey] = grey.expand(-1, 3, -1, -1)
    if spec.hed_jitter > 0:
        n = len(x)
        matrix, offset = hed_log_transform(draw.hed_alpha, draw.hed_beta)
        # in [0, top]: log(x / top) = log(x) - log(top), exp(...) * top
        log_top = math.log(top)
        offset = offset - log_top * matrix.sum(1, keepdim=True) + log_top  # N x 1 x 3
        density = torch.log(x.clamp(min=1e-6 * top)).view(n, 3, -1)
        x = torch.baddbmm(offset.transpose(1, 2), matrix.transpose(1, 2), density) \
            .exp_().clamp_(0, top).view_as(x)
    return x


class FastAugment:
    """The modern augmentation on the CPU: uint8 N x 3 x H x W -> float32 N x 3 x H x W in
    [0, 255] (what `data.normalise` expects), planar (contiguous) like the input."""

    def __init__(self, spec: AugmentSpec):
        self.spec = spec

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        n, _, h, w = batch.shape
        if batch.dtype != torch.uint8:  # float in [0, 255]: round to the warp's uint8
            batch = batch.round().clamp(0, 255).to(torch.uint8)
        draw = self.spec.draw(n, h, w)
        x = warp(batch, affine_matrices(draw, h, w)).float()
        return jitter_colour(x, draw, self.spec)
