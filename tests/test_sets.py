"""The training augmentation (per-image random reflection and integer translation, zero fill)
and the input normalisation."""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as TF

from wbc_transfer.data.sets import TrainAugment, flip_and_shift, normalise


def coordinate_images(n: int, h: int, w: int) -> torch.Tensor:
    """n identical images whose pixel value encodes its position (1-based, 0 = fill)."""
    grid = torch.arange(1, h * w + 1, dtype=torch.int64).reshape(h, w)
    return grid.expand(n, 3, h, w).clone()


def recover(image: torch.Tensor, w: int) -> tuple[bool, int, int]:
    """(flipped, dx, dy) of one augmented coordinate image."""
    rows, cols = torch.nonzero(image[0], as_tuple=True)
    r, c = int(rows[0]), int(cols[0])
    source = int(image[0, r, c]) - 1
    src_row, src_col = divmod(source, w)
    same_row = image[0, r][image[0, r] > 0]
    flipped = len(same_row) > 1 and bool(same_row[1] < same_row[0])
    dx = c - (w - 1 - src_col) if flipped else c - src_col
    return flipped, dx, r - src_row


def test_flip_and_shift_matches_torchvision() -> None:
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (6, 3, 17, 23), dtype=torch.uint8)
    for _ in range(20):
        flip = torch.rand(6) < 0.5
        dx, dy = torch.randint(-9, 10, (6,)), torch.randint(-9, 10, (6,))
        out = flip_and_shift(batch, flip, dx, dy)
        assert out.dtype == batch.dtype and out.shape == batch.shape
        for i in range(6):
            image = TF.horizontal_flip(batch[i]) if flip[i] else batch[i]
            expected = TF.affine(image, angle=0.0, translate=[int(dx[i]), int(dy[i])], scale=1.0,
                                 shear=[0.0, 0.0])
            assert torch.equal(out[i], expected)


def test_shift_out_of_frame_is_all_zero() -> None:
    batch = torch.ones(2, 3, 8, 8)
    out = flip_and_shift(batch, torch.tensor([False, True]), torch.tensor([8, 0]),
                         torch.tensor([0, -9]))
    assert not out.any()


def test_bounds_and_both_directions() -> None:
    h = w = 64
    augment = TrainAugment(translate_px=30, reference_size=224)
    m = augment.max_shift(w)
    assert m == 8  # floor(30 * 64 / 224)
    assert TrainAugment(30, 224).max_shift(224) == 30
    torch.manual_seed(1)
    seen_dx, seen_dy, flips = set(), set(), []
    for _ in range(40):
        out = augment(coordinate_images(25, h, w))
        for image in out:
            flipped, dx, dy = recover(image, w)
            seen_dx.add(dx)
            seen_dy.add(dy)
            flips.append(flipped)
    assert seen_dx == set(range(-m, m + 1))
    assert seen_dy == set(range(-m, m + 1))
    assert 0.4 < sum(flips) / len(flips) < 0.6


def test_parameters_are_drawn_per_image() -> None:
    torch.manual_seed(2)
    out = TrainAugment(30, 224)(coordinate_images(32, 64, 64))
    params = [recover(image, 64) for image in out]
    assert len(set(params)) > 16  # identical inputs, mostly different transforms
    assert {p[0] for p in params} == {True, False}


def test_deterministic_under_torch_seed() -> None:
    batch = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    augment = TrainAugment(30, 224)
    torch.manual_seed(42)
    first = augment(batch)
    torch.manual_seed(42)
    second = augment(batch)
    torch.manual_seed(43)
    third = augment(batch)
    assert torch.equal(first, second)
    assert not torch.equal(first, third)
    assert torch.equal(augment(batch, torch.Generator().manual_seed(5)),
                       augment(batch, torch.Generator().manual_seed(5)))


def test_normalise_is_the_out_of_place_formula_and_leaves_input_alone() -> None:
    batch = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    before = batch.clone()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = TF.normalize(batch.float() / 255.0, list(mean), list(std))
    assert torch.equal(normalise(batch, mean, std), expected)
    assert torch.equal(batch, before)
