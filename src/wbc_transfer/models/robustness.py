"""Robustness to another lab's microscope and stain: colour/stain/scale augmentation, a stain
normalisation at the model's input, and frozen BatchNorm statistics (params `train.*`).

- ``hed_jitter``: HED-space stain augmentation (Tellez et al., "Whole-slide mitosis detection in
  H&E breast histology using PHH3 as a reference to train distilled stain-invariant CNNs", IEEE
  TMI 2018): each image's optical density is split into haematoxylin, eosin and DAB by colour
  deconvolution (Ruifrok & Johnston 2001, the `rgb_from_hed` matrix of skimage.color), each
  channel scaled by U(1-s, 1+s) and shifted by U(-s, s), and recombined. Neither kornia nor
  torchvision has it; skimage works image by image in NumPy and torchstain's augmentor fits a
  Macenko stain matrix per image, so it is these few batched tensor lines.
- ``stain_norm: lab``: Reinhard colour transfer (Reinhard et al., IEEE CG&A 2001) in CIELAB
  (kornia.color): every image's L, a, b channels are standardised to their own mean/std and
  mapped to a target mean/std fitted on the TRAINING images only. It is an `nn.Module` at the
  model's input (`StainNormalised`), its statistics stored with the weights, so training,
  evaluate, `predict` and the served pyfunc all apply the very same layer.
- ``norm_layer: frozen``: every BatchNorm2d becomes torchvision.ops.FrozenBatchNorm2d with the
  pretrained (ImageNet) statistics and affine parameters: no statistics of one lab's batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import kornia.color
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

STAIN_NORMS = ("none", "lab")
NORM_LAYERS = ("batchnorm", "frozen")

# skimage.color.rgb_from_hed (Ruifrok & Johnston 2001): rows are the RGB optical densities of
# haematoxylin, eosin and DAB.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)


class HEDJitter:
    """Random per-image stain jitter in HED space (Tellez et al. 2018).

    float N x 3 x H x W RGB in [0, 1] -> same shape, in [0, 1]. Per image and HED channel:
    s' = alpha * s + beta, alpha ~ U(1 - sigma, 1 + sigma), beta ~ U(-sigma, sigma), with s the
    optical density (natural log) deconvolved by HED_FROM_RGB. Draws from torch's global RNG
    (one call for the batch), so `torch.manual_seed` makes it reproducible. sigma 0: identity.
    """

    def __init__(self, sigma: float):
        if sigma < 0:
            raise ValueError(f"train.hed_jitter must be >= 0, got {sigma}")
        self.sigma = sigma

    def __call__(self, rgb: torch.Tensor) -> torch.Tensor:
        if self.sigma == 0:
            return rgb
        n = rgb.shape[0]
        alpha = 1 + (torch.rand(n, 1, 3) * 2 - 1) * self.sigma
        beta = (torch.rand(n, 1, 3) * 2 - 1) * self.sigma
        density = -torch.log(rgb.clamp(min=1e-6)).flatten(2).transpose(1, 2)  # N x HW x 3
        hed = density @ HED_FROM_RGB.to(rgb)
        hed = hed * alpha.to(rgb) + beta.to(rgb)
        out = torch.exp(-(hed @ RGB_FROM_HED.to(rgb))).clamp(0, 1)
        return out.transpose(1, 2).reshape(rgb.shape)


def hed_log_transform(alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`HEDJitter`'s per-image map folded into log space: for alpha, beta N x 3 (or N x 1 x 3),
    (matrix N x 3 x 3, offset N x 1 x 3) with jittered rgb = exp(log(rgb) @ matrix + offset) for
    row-vector pixels. The same map: exp(-((-log rgb) @ HED_FROM_RGB * alpha + beta) @
    RGB_FROM_HED) = exp(log rgb @ (HED_FROM_RGB diag(alpha) RGB_FROM_HED) - beta @ RGB_FROM_HED);
    one 3 x 3 product per pixel instead of two (`augment.FastAugment`)."""
    alpha, beta = alpha.reshape(-1, 1, 3), beta.reshape(-1, 1, 3)
    hed_from_rgb, rgb_from_hed = HED_FROM_RGB.to(alpha), RGB_FROM_HED.to(alpha)
    matrix = (hed_from_rgb * alpha) @ rgb_from_hed  # columns of HED_FROM_RGB scaled by alpha
    return matrix, -(beta @ rgb_from_hed)


def lab_statistics(images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Per-image CIELAB mean and std: uint8 N x 3 x H x W RGB -> float32 N x 2 x 3
    ([:, 0] means, [:, 1] standard deviations of L, a, b; kornia.color.rgb_to_lab)."""
    out = []
    for start in range(0, len(images), batch_size):
        lab = kornia.color.rgb_to_lab(images[start:start + batch_size].float() / 255)
        std, mean = torch.std_mean(lab.flatten(2), dim=2)
        out.append(torch.stack([mean, std], dim=1))
    return torch.cat(out) if out else torch.zeros((0, 2, 3))


def fit_lab_target(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """The Reinhard target: the mean over TRAINING images of their per-image LAB means and
    standard deviations (uint8 N x 3 x H x W). Raises ValueError on an empty set."""
    if len(images) == 0:
        raise ValueError("train.stain_norm=lab needs training images to fit its target")
    stats = lab_statistics(images).mean(dim=0)
    return stats[0].tolist(), stats[1].tolist()


class LabStandardise(nn.Module):
    """Reinhard stain normalisation in CIELAB at the network input.

    Input and output: float32 N x 3 x H x W normalised as the network expects
    ((rgb/255 - mean) / std); inside, each image's L, a, b are standardised and mapped to the
    stored target mean/std, then converted back (kornia.color, differentiable, exportable).
    The buffers (normalisation and target) travel in the state dict."""

    def __init__(self, mean: Sequence[float], std: Sequence[float],
                 target_mean: Sequence[float] = (0.0, 0.0, 0.0),
                 target_std: Sequence[float] = (1.0, 1.0, 1.0), eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("target_mean", torch.tensor(list(target_mean), dtype=torch.float32))
        self.register_buffer("target_std", torch.tensor(list(target_std), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = (x * self.std + self.mean).clamp(0, 1)
        lab = kornia.color.rgb_to_lab(rgb)
        std, mean = torch.std_mean(lab.flatten(2), dim=2)
        scale = (self.target_std / std.clamp(min=self.eps))[..., None, None]
        lab = (lab - mean[..., None, None]) * scale + self.target_mean[None, :, None, None]
        out = kornia.color.lab_to_rgb(lab, clip=True)
        return (out - self.mean) / self.std


class StainNormalised(nn.Module):
    """`net` behind an input layer `stain`; state-dict keys `stain.*` and `net.*`."""

    def __init__(self, stain: nn.Module, net: nn.Module):
        super().__init__()
        self.stain = stain
        self.net = net

    def forward(self, x: torch.Tensor) -> Any:
        return self.net(self.stain(x))


def freeze_batchnorm(model: nn.Module) -> int:
    """Replace every nn.BatchNorm2d of `model` in place by torchvision.ops.FrozenBatchNorm2d
    holding its current statistics and affine parameters (no longer trained or updated);
    returns how many were replaced."""
    count = 0
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                value = getattr(child, key)
                if value is not None:
                    getattr(frozen, key).copy_(value.detach())
            setattr(model, name, frozen)
            count += 1
        else:
            count += freeze_batchnorm(child)
    return count


def check_options(stain_norm: str, norm_layer: str) -> None:
    """ValueError naming the parameter for an unknown `train.stain_norm` / `train.norm_layer`."""
    if stain_norm not in STAIN_NORMS:
        raise ValueError(f"train.stain_norm must be one of {STAIN_NORMS}, got {stain_norm!r}")
    if norm_layer not in NORM_LAYERS:
        raise ValueError(f"train.norm_layer must be one of {NORM_LAYERS}, got {norm_layer!r}")


def adapt(model: nn.Module, mean: Sequence[float], std: Sequence[float], stain_norm: str,
          norm_layer: str, train_images: torch.Tensor | None = None) -> nn.Module:
    """The network as trained and served: BatchNorm frozen if `norm_layer` is frozen, behind a
    LabStandardise input layer if `stain_norm` is lab (target fitted on `train_images`, uint8
    N x 3 x H x W; None: placeholder buffers that a state dict then fills). Returns `model`
    itself when neither option is on."""
    check_options(stain_norm, norm_layer)
    net = model
    if stain_norm == "lab":
        target = fit_lab_target(train_images) if train_images is not None else \
            ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
        model = StainNormalised(LabStandardise(mean, std, *target), model)
    if norm_layer == "frozen":
        if train_images is not None and len(train_images):
            estimate_batchnorm(model, train_images, mean, std)
        freeze_batchnorm(net)
    return model


BN_ESTIMATE_IMAGES = 512  # training images whose statistics the frozen BatchNorm layers keep


def estimate_batchnorm(model: nn.Module, images: torch.Tensor, mean: Sequence[float],
                       std: Sequence[float], batch_size: int = 64) -> int:
    """Re-estimate every BatchNorm2d's running mean/variance on `images` (uint8 N x 3 x H x W,
    at most BN_ESTIMATE_IMAGES, evenly spaced), as a cumulative average over batches
    (momentum None), in place, without gradients; returns the number of images used.

    Why (train.norm_layer frozen): with the ImageNet statistics frozen, EfficientNet-Lite0's
    activations on these smears are off-scale and AdamW at lr 1e-3 drives the network to a
    constant output within a few steps (loss ln 4 for good: bench/ROBUSTNESS.md). Frozen at the
    training images' own statistics, the layers normalise as train-mode BatchNorm does at the
    start, and the network learns (tests/test_robustness.py); nothing is then re-estimated on
    any other lab's batches, which is the point of the option."""
    from wbc_transfer.data.sets import MIN_TRAIN_BATCH, batches, normalise

    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not layers or not len(images):
        return 0
    step = max(1, len(images) // BN_ESTIMATE_IMAGES)
    sample = images[::step][:BN_ESTIMATE_IMAGES]
    momenta = [m.momentum for m in layers]
    was_training = model.training
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    model.train()
    with torch.no_grad():
        for index in batches(len(sample), batch_size, min_last=MIN_TRAIN_BATCH):
            model(normalise(sample[index], mean, std))
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    model.train(was_training)
    return len(sample)


def options_of(config: Mapping[str, Any]) -> dict[str, str]:
    """`stain_norm` and `norm_layer` of a run.json / pyfunc config (defaults: none, batchnorm,
    what every model trained before these options were)."""
    return {"stain_norm": str(config.get("stain_norm", "none")),
            "norm_layer": str(config.get("norm_layer", "batchnorm"))}
