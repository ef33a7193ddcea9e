"""Grad-CAM heat maps (Selvaraju et al. 2017) with captum's `LayerGradCam`, and their overlays.

The layer explained is the architecture's last convolutional feature map, named per
architecture in the registry (`wbc_transfer.models.registry.Architecture.cam_layer`). One forward and
one backward pass give both the logits (for the prediction) and the map: captum is handed a
forward function that returns the explained class's logit and keeps the full logits aside, so
`--explain` costs one backward pass more than plain prediction, not a second forward.
captum, not the `grad-cam` package: the latter depends on `opencv-python`, which would clash
with this project's `opencv-python-headless`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from matplotlib import colormaps
from PIL import Image
from torch import nn

from wbc_transfer.engine import logits_of

OVERLAY_ALPHA = 0.45  # heat-map weight in the overlay


def grad_cam(model: nn.Module, layer: nn.Module, x: torch.Tensor,
             targets: Sequence[int] | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of `model` at `layer` for a normalised float batch `x` (N x 3 x H x W).

    targets: the class explained per image (int N); None: each image's top class.
    Returns (logits float32 N x K, heat maps float32 N x H x W in [0, 1], each scaled by its own
    maximum; all zero where no location weighs for the class), both on the CPU. The model is put
    in eval mode; gradients flow only through this call (no parameter is changed)."""
    model.eval()
    kept: dict[str, torch.Tensor] = {}
    chosen = None if targets is None else torch.as_tensor(targets, dtype=torch.long,
                                                          device=x.device).view(-1, 1)

    def explained_logit(inputs: torch.Tensor) -> torch.Tensor:
        logits = logits_of(model(inputs)).float()
        kept["logits"] = logits.detach()
        index = logits.argmax(dim=1, keepdim=True) if chosen is None else chosen
        return logits.gather(1, index)  # N x 1: the explained class's logit

    with torch.enable_grad():
        cam = LayerGradCam(explained_logit, layer).attribute(x, target=0, relu_attributions=True)
        cam = LayerAttribution.interpolate(cam.detach(), tuple(x.shape[-2:]),
                                           interpolate_mode="bilinear")
    cam = cam.sum(dim=1).float().clamp_min(0)  # N x H x W
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    return kept["logits"].cpu(), (cam / peak).cpu()


def overlay(image: torch.Tensor | np.ndarray, heat: torch.Tensor | np.ndarray,
            alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """An RGB picture of `image` (uint8 3 x H x W) with `heat` (float H x W in [0, 1]) over it in
    the 'jet' colour map (red: where the class evidence is), `alpha` its weight."""
    rgb = np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
    rgb = rgb.transpose(1, 2, 0)
    heat = np.asarray(heat.cpu() if isinstance(heat, torch.Tensor) else heat, dtype=np.float32)
    colour = colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255
    mixed = (1 - alpha) * rgb + alpha * colour
    return Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8))


def save_overlay(image: torch.Tensor | np.ndarray, heat: torch.Tensor | np.ndarray,
                 path: Path) -> Path:
    """Write `overlay(image, heat)` as PNG to `path` (folders made); returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, heat).save(path, format="PNG")
    return path
