"""The engine's fast paths on real images: channels_last, bf16 autocast, EfficientNet BatchNorm."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from wbc_transfer import models
from wbc_transfer.data import TrainAugment, build_image_set
from wbc_transfer.engine import amp_dtype, evaluate, make_optimizer, place_model, predict, train_one_epoch

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
