"""The engine's fast paths on real images: channels_last, bf16 autocast, EfficientNet BatchNorm."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from wbc_transfer.data.sets import (
    MIN_TRAIN_BATCH,
    TrainAugment,
    batch_count,
    batches,
    build_image_set,
    last_batch,
)
from wbc_transfer.engine import amp_dtype, evaluate, make_optimizer, place_model, predict, train_one_epoch
from wbc_transfer.models import registry as models

from conftest import CLASSES, class_files, spread

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def real_images(mirror: Path):
    """Three real TRAIN images per class at 48 px."""
    images = mirror  # the images folder of the Kaggle layout
    rows = [{"path": str(f.relative_to(images)), "label": c, "split": "train"}
            for c in CLASSES for f in spread(class_files(images, "TRAIN", c), 3)]
    return build_image_set(pd.DataFrame(rows), images, CLASSES, 48)


def test_amp_policy() -> None:
    assert amp_dtype(CPU, "auto") is None
    assert amp_dtype(torch.device("cuda"), "auto") is torch.bfloat16
    assert amp_dtype(torch.device("cuda"), "off") is None
    assert amp_dtype(CPU, "bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="train.amp"):
        amp_dtype(CPU, "fp8")


def test_channels_last_gives_the_same_logits(real_images) -> None:
    torch.manual_seed(0)
    built = models.build("resnet50", len(CLASSES), "none", real_images.size)
    model = built.model.eval()
    plain = predict(model, real_images.images, built.mean, built.std, CPU, batch_size=5)
    fast = place_model(model, CPU, channels_last=True)
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    nhwc = predict(fast, real_images.images, built.mean, built.std, CPU, batch_size=5)
    torch.testing.assert_close(nhwc, plain, rtol=1e-3, atol=1e-3)


def test_bf16_autocast_trains_and_evaluates(real_images) -> None:
    torch.manual_seed(0)
    built = models.build("efficientnet_lite0", len(CLASSES), "none", real_images.size)
    model = place_model(built.model, CPU, channels_last=True)
    before = [p.detach().clone() for p in built.head.parameters()]
    optimizer = make_optimizer(model, built.head, 1e-3, 10, 0.9)
    stats = train_one_epoch(model, real_images, optimizer, TrainAugment(30, 224),
                            built.mean, built.std, CPU, 4, torch.Generator().manual_seed(0),
                            amp=torch.bfloat16)
    assert stats.images == len(real_images)
    assert torch.isfinite(torch.tensor(stats.loss))
    assert any(not torch.equal(b, p) for b, p in zip(before, built.head.parameters(), strict=True))
    assert built.head.weight.dtype is torch.float32  # autocast leaves the master weights alone
    result = evaluate(model, real_images, built.mean, built.std, CPU, 8, amp=torch.bfloat16)
    assert result.probabilities.shape == (len(real_images), len(CLASSES))
    assert result.probabilities.dtype.kind == "f" and abs(result.probabilities.sum(1) - 1).max() < 1e-3


def test_efficientnet_batchnorm_uses_pytorch_momentum() -> None:
    model = models.build("efficientnet_lite0", len(CLASSES), "none", 64).model
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.momentum == pytest.approx(0.1) for m in norms)


def test_a_last_batch_of_one_joins_the_previous_batch() -> None:
    # 280 training images in batches of 3 (the paper protocol with -S train.batch_size=3)
    sizes = [len(b) for b in batches(280, 3, torch.Generator().manual_seed(0), shuffle=True,
                                     min_last=MIN_TRAIN_BATCH)]
    assert sizes == [3] * 92 + [4] and batch_count(280, 3, MIN_TRAIN_BATCH) == 93
    assert torch.cat(list(batches(280, 3, min_last=2))).tolist() == list(range(280))
    assert [len(b) for b in batches(281, 3, min_last=2)] == [3] * 93 + [2]  # 2 is enough
    assert [len(b) for b in batches(280, 3)] == [3] * 93 + [1]  # evaluation: unchanged
    assert last_batch(280, 3) == "merged: 1 image(s) into the previous batch (93 batches, last of 4)"
    assert last_batch(280, 10) == "full (28 batches of 10)"


@pytest.mark.parametrize("arch", sorted(models.REGISTRY))
def test_every_architecture_trains_when_the_last_batch_would_hold_one_image(arch, real_images):
    """12 images in batches of 11: one step of 12. At the smallest image size each network takes
    (32 px: a 1 x 1 final feature map), BatchNorm crashed on the lone last image ("Expected
    more than 1 value per channel when training")."""
    torch.manual_seed(0)
    data = real_images.subset("train")
    size = 64 if arch == "alexnet" else 32  # AlexNet's pooling needs more than 32 px
    built = models.build(arch, len(CLASSES), "none", size)
    model = place_model(built.model, CPU, channels_last=False)
    images = torch.nn.functional.interpolate(data.images.float(), size=size).to(torch.uint8)
    data = type(data)(images, data.labels, data.paths, data.splits, data.classes)
    steps: list[int] = []
    stats = train_one_epoch(model, data, make_optimizer(model, built.head, 1e-4, 10, 0.9),
                            TrainAugment(30, 224), built.mean, built.std, CPU, len(data) - 1,
                            torch.Generator().manual_seed(0), every=1, on_every=steps.append)
    assert stats.images == len(data) == 12
    assert steps == [1]  # one optimiser step over all 12 images
    assert torch.isfinite(torch.tensor(stats.loss))


def test_batch_size_one_on_a_batchnorm_model_is_a_clear_error(real_images) -> None:
    built = models.build("resnet50", len(CLASSES), "none", real_images.size)
    with pytest.raises(ValueError, match=r"train\.batch_size=1 .*BatchNorm.*>= 2"):
        train_one_epoch(built.model, real_images,
                        make_optimizer(built.model, built.head, 1e-4, 10, 0.9),
                        TrainAugment(30, 224), built.mean, built.std, CPU, 1,
                        torch.Generator().manual_seed(0))
