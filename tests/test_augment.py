"""The modern recipe's augmentation on the CPU (wbc_transfer.training.augment.FastAugment): the
distributions of the kornia pipeline it replaces (training.recipe.KorniaAugment) and, given the
same parameters, the same images. The paper recipe's flip-and-shift: tests/test_sets.py."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare, ks_2samp

from wbc_transfer.config import TrainParams, load_params
from wbc_transfer.data.sets import TrainAugment
from wbc_transfer.models.robustness import HEDJitter, hed_log_transform
from wbc_transfer.training.augment import (
    AugmentSpec,
    Draw,
    FastAugment,
    affine_matrices,
    jitter_colour,
    warp,
)
from wbc_transfer.training.recipe import KorniaAugment, ModernAugment, make_augment

from conftest import REPO_ROOT

BASE = load_params(REPO_ROOT / "params.yaml").train  # the repository's train section


def with_(t: TrainParams, **changes: Any) -> TrainParams:
    return t.model_copy(update=changes)


# --------------------------------------------------------------------------------------------
# the modern recipe's augmentation (issue 26): augment.FastAugment on the CPU must draw from the
# distributions of the kornia pipeline it replaces (recipe.KorniaAugment) and, given the same
# parameters, produce the same images (up to the uint8 rounding of its warp)

STRONG = with_(BASE, recipe="modern", rotation_deg=180.0, translate_px=40,
                 colour_jitter=0.3, hue_jitter=0.1, grayscale_p=0.3, scale=(0.7, 1.3))


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """n smooth colour images, uint8 n x 3 x size x size (bicubic upsampling of 6 x 6 noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g)
    up = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (up.clamp(0, 1) * 255).round().to(torch.uint8)


def kornia_draw(kornia_augment: KorniaAugment, n: int) -> Draw:
    """The parameters kornia drew on its last call, as a `Draw` (HED jitter off)."""
    p = {item.name.rsplit("_", 1)[0]: item.data for item in kornia_augment.pipeline._params}
    affine, jitter = p["RandomAffine"], p.get("ColorJitter")
    factors = (torch.stack([jitter[k] for k in ("brightness_factor", "contrast_factor",
                                                "saturation_factor", "hue_factor")], dim=1)
               if jitter and "order" in jitter else torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(n, 1))
    return Draw(hflip=p["RandomHorizontalFlip"]["batch_prob"] > 0.5,
                vflip=p["RandomVerticalFlip"]["batch_prob"] > 0.5,
                angle=affine["angle"].double(), shift=affine["translations"].double(),
                scale=affine["scale"][:, 0].double(), factors=factors,
                order=jitter["order"].tolist() if jitter and "order" in jitter else [0, 1, 2, 3],
                grey=p["RandomGrayscale"]["batch_prob"] > 0.5,
                hed_alpha=torch.ones(n, 3), hed_beta=torch.zeros(n, 3))


def fast_given(batch: torch.Tensor, draw: Draw, spec: AugmentSpec) -> torch.Tensor:
    _, _, h, w = batch.shape
    return jitter_colour(warp(batch, affine_matrices(draw, h, w)).float(), draw, spec)


@pytest.mark.parametrize("t", [STRONG, with_(STRONG, colour_jitter=0.0, hue_jitter=0.0,
                                               grayscale_p=0.0, scale=(1.0, 1.0)),
                               with_(BASE, recipe="modern")],
                         ids=["every-option", "geometry-only", "train-defaults"])
def test_fast_path_reproduces_kornia_given_kornias_parameters(t: TrainParams) -> None:
    """Flip, rotation sign and centre, shift, zoom, reflection padding, the colour steps' order
    and formulas, grayscale: kornia's output within the fast path's uint8 rounding."""
    kornia_augment, spec = KorniaAugment(t, 48), AugmentSpec.from_train(t)
    for seed in range(3):
        batch = smooth_images(16, 48, seed)
        torch.manual_seed(seed)
        expected = kornia_augment(batch)
        diff = (fast_given(batch, kornia_draw(kornia_augment, 16), spec) - expected).abs()
        assert float(diff.mean()) < 0.4 and float(diff.max()) < 3.0, (seed, diff.mean(), diff.max())


def test_flips_alone_are_exact_and_rotation_by_90_is_a_transpose() -> None:
    batch = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8)
    spec = AugmentSpec()
    draw = spec.draw(4, 12, 12)
    draw.hflip = torch.tensor([False, True, False, True])
    draw.vflip = torch.tensor([False, False, True, True])
    out = fast_given(batch, draw, spec)
    assert torch.equal(out[0], batch[0].float()) and torch.equal(out[1], batch[1].flip(-1).float())
    assert torch.equal(out[2], batch[2].flip(-2).float())
    assert torch.equal(out[3], batch[3].flip(-1, -2).float())
    draw.hflip[:], draw.vflip[:], draw.angle[:] = False, False, 90.0  # kornia's sign: clockwise
    assert torch.equal(fast_given(batch, draw, spec), batch.rot90(-1, (-2, -1)).float())


def ks(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(ks_2samp(a.double().numpy(), b.double().numpy()).pvalue)


def test_parameters_have_kornias_distributions() -> None:
    """Per-image parameters of 3000 images, ours against kornia's own draws (fixed seeds): the
    same ranges, and two-sample Kolmogorov-Smirnov tests that do not tell them apart."""
    n, size = 3000, 8
    kornia_augment = KorniaAugment(STRONG, size)
    torch.manual_seed(0)
    kornia_augment(torch.zeros(n, 3, size, size, dtype=torch.uint8))
    theirs = kornia_draw(kornia_augment, n)
    torch.manual_seed(1)
    ours = AugmentSpec.from_train(STRONG).draw(n, size, size)
    shift = 40 / 224 * size
    assert float(ours.angle.abs().max()) <= 180 and float(ours.angle.abs().max()) > 179
    assert float(ours.shift.abs().max()) <= shift and float(ours.shift.abs().max()) > 0.99 * shift
    assert 0.7 <= float(ours.scale.min()) < 0.71 and 1.29 < float(ours.scale.max()) <= 1.3
    for name, a, b in [("angle", ours.angle, theirs.angle),
                       ("shift x", ours.shift[:, 0], theirs.shift[:, 0]),
                       ("shift y", ours.shift[:, 1], theirs.shift[:, 1]),
                       ("scale", ours.scale, theirs.scale)]:
        assert ks(a, b) > 1e-3, name
    for step, name in enumerate(("brightness", "contrast", "saturation", "hue")):
        assert ks(ours.factors[:, step], theirs.factors[:, step]) > 1e-3, name
        low, high = (0.7, 1.3) if step < 3 else (-0.1, 0.1)
        factor = ours.factors[:, step]
        assert low <= float(factor.min()) < low + 0.01 and high - 0.01 < float(factor.max()) <= high
    for name, a, b, p in [("hflip", ours.hflip, theirs.hflip, 0.5), ("vflip", ours.vflip, theirs.vflip, 0.5),
                          ("grey", ours.grey, theirs.grey, 0.3)]:
        tolerance = 4 * (p * (1 - p) / n) ** 0.5
        assert abs(a.float().mean() - p) < tolerance and abs(b.float().mean() - p) < tolerance, name
    assert abs(float((ours.hflip & ours.vflip).float().mean()) - 0.25) < 0.04  # independent
    sigma = 0.1  # HED jitter: robustness.HEDJitter's draws, alpha ~ U(1 - s, 1 + s), beta ~ U(-s, s)
    ours = AugmentSpec(hed_jitter=sigma).draw(n, size, size)
    torch.manual_seed(2)
    alpha = 1 + (torch.rand(n, 3) * 2 - 1) * sigma
    beta = (torch.rand(n, 3) * 2 - 1) * sigma
    for channel in range(3):
        assert ks(ours.hed_alpha[:, channel], alpha[:, channel]) > 1e-3
        assert ks(ours.hed_beta[:, channel], beta[:, channel]) > 1e-3
    assert 1 - sigma <= float(ours.hed_alpha.min()) < 1 - 0.99 * sigma
    assert 1 + 0.99 * sigma < float(ours.hed_alpha.max()) <= 1 + sigma
    assert -sigma <= float(ours.hed_beta.min()) < -0.99 * sigma < 0.99 * sigma < float(ours.hed_beta.max())


def test_colour_order_is_a_uniform_permutation_per_batch() -> None:
    spec = AugmentSpec.from_train(STRONG)
    torch.manual_seed(0)
    orders = Counter(tuple(spec.draw(2, 8, 8).order) for _ in range(2400))
    assert len(orders) == 24  # every order of brightness, contrast, saturation, hue
    assert chisquare(list(orders.values())).pvalue > 1e-3


def test_hed_log_transform_is_hed_jitter() -> None:
    """The HED jitter folded into one log-space matrix is the same map as
    robustness.HEDJitter's two products, for the same draws (and in the [0, 255] scale)."""
    rgb = smooth_images(6, 16, 0).float().div(255)
    sigma = 0.2
    torch.manual_seed(5)
    expected = HEDJitter(sigma)(rgb)
    torch.manual_seed(5)  # HEDJitter's draws: alpha, then beta, each n x 1 x 3
    alpha = 1 + (torch.rand(6, 1, 3) * 2 - 1) * sigma
    beta = (torch.rand(6, 1, 3) * 2 - 1) * sigma
    matrix, offset = hed_log_transform(alpha, beta)
    log = torch.log(rgb.clamp(min=1e-6)).flatten(2).transpose(1, 2)
    folded = torch.exp(log @ matrix + offset).clamp(0, 1).transpose(1, 2).reshape(rgb.shape)
    assert torch.allclose(folded, expected, atol=1e-5)
    spec = AugmentSpec(hed_jitter=sigma)
    draw = spec.draw(6, 16, 16)
    draw.hed_alpha, draw.hed_beta = alpha.view(6, 3), beta.view(6, 3)
    assert torch.allclose(jitter_colour(rgb * 255, draw, spec), expected * 255, atol=1e-3)


def optical_density(images: torch.Tensor) -> torch.Tensor:
    """Per image and channel, the mean optical density -log(rgb) (N x 3)."""
    return -torch.log(images.float().clamp(min=1.0) / 255).mean((2, 3))


def both_paths(t: TrainParams, batch: torch.Tensor, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`draws` augmentations of `batch` by ModernAugment's CPU path and by kornia (other seeds)."""
    fast, kornia_augment = ModernAugment(t, batch.shape[-1]), KorniaAugment(t, batch.shape[-1])
    ours, theirs = [], []
    for seed in range(draws):
        torch.manual_seed(seed)
        ours.append(fast(batch))
        torch.manual_seed(10_000 + seed)
        theirs.append(kornia_augment(batch))
    return torch.cat(ours), torch.cat(theirs)


def test_hed_jitter_effect_has_kornia_paths_statistics() -> None:
    """The stain jitter alone (sigma 0.1, with the flips, which keep each image's mean optical
    density): the change of each image's mean optical density per channel has the same
    distribution on both paths (1600 images each, two-sample KS)."""
    t = with_(BASE, recipe="modern", rotation_deg=0.0, translate_px=0,
                colour_jitter=0.0, hed_jitter=0.1)
    batch = smooth_images(8, 16, 3)
    ours, theirs = both_paths(t, batch, 200)
    before = optical_density(batch).repeat(200, 1)
    for channel in range(3):
        change_ours = optical_density(ours)[:, channel] - before[:, channel]
        change_theirs = optical_density(theirs)[:, channel] - before[:, channel]
        assert ks(change_ours, change_theirs) > 1e-3, channel
        assert float(change_ours.abs().mean()) > 0.01  # it does jitter


def test_outputs_have_kornias_statistics() -> None:
    """End to end with adapt's strong augmentation (any rotation, shift, zoom, colour and stain
    jitter), 100 draws of 8 images: the per-image mean colour, contrast and optical density
    have the same distributions on both paths (two-sample KS)."""
    t = with_(BASE, recipe="modern", rotation_deg=180.0, translate_px=20,
                colour_jitter=0.2, hed_jitter=0.05, scale=(0.9, 1.1))
    a, b = both_paths(t, smooth_images(8, 24, 3), 100)
    for name, fa, fb in [("mean", a.mean((2, 3)), b.mean((2, 3))),
                         ("std", a.std((2, 3)), b.std((2, 3))),
                         ("density", optical_density(a), optical_density(b))]:
        for channel in range(3):
            assert ks(fa[:, channel], fb[:, channel]) > 1e-3, (name, channel)


def test_make_augment_is_fast_on_the_cpu_and_kornia_elsewhere() -> None:
    t = with_(BASE, recipe="modern")
    augment = make_augment(t, 16)
    assert isinstance(augment, ModernAugment) and isinstance(augment.fast, FastAugment)
    batch = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    torch.manual_seed(0)
    out = augment(batch)
    assert out.dtype == torch.float32 and out.shape == batch.shape and out.is_contiguous()
    assert float(out.min()) >= 0 and float(out.max()) <= 255
    torch.manual_seed(0)
    assert torch.equal(augment(batch), out)
    torch.manual_seed(0)
    assert torch.equal(augment(batch.float()), out)  # float batches in [0, 255] too
    calls = []
    augment._kornia = lambda b: calls.append(b.device.type) or b  # type: ignore[assignment]
    augment(torch.empty(2, 3, 16, 16, device="meta"))
    assert calls == ["meta"]  # any device but the CPU: kornia on that device
    assert isinstance(make_augment(with_(t, recipe="paper"), 16), TrainAugment)
