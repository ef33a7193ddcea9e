"""One loader for `params.yaml`: a typed, validated view of every stage's parameters.

Paths in `params.yaml` are relative to the repository root (the folder that holds
`params.yaml`); `resolve()` turns them into absolute paths so stages work from any cwd,
including the temporary copies made by `dvc exp run --temp/--queue`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

PARAMS_FILE = "params.yaml"
VIEWS = ("full", "cell")  # prepare.view: the whole image resized | the white cell cropped and scaled
CELL_FRACTION = 0.6  # prepare.cell_fraction default: the cell spans 60 % of the crop side


class ConfigError(ValueError):
    """A parameter in params.yaml is missing or out of range."""


@dataclass(frozen=True)
class BaseParams:
    seed: int = 42
    experiment: str = "wbc-transfer"
    tracking_uri: str | None = None


@dataclass(frozen=True)
class DataParams:
    root: str = "data/blood-cells"
    images_subdir: str = "dataset2-master/dataset2-master/images"
    classes: tuple[str, ...] = ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")
    folders: tuple[str, ...] = ("TRAIN", "TEST", "TEST_SIMPLE")


@dataclass(frozen=True)
class ValidateParams:
    policy: str = "strict"
    index: str = "data/index.csv"
    report_dir: str = "results/data"


@dataclass(frozen=True)
class GroupsParams:
    """The `groups` stage: fingerprint size, clustering threshold, the sibling check."""

    candidates: int = 15  # colour-histogram neighbours verified by keypoint matching, per image
    min_inliers: int = 10  # RANSAC-affine inliers that make two images one cell
    features: int = 300  # SIFT keypoints per view
    workers: int = 2  # processes that describe images
    manifest: str = "data/groups.csv"
    siblings_per_cell: int = 8
    sibling_cells: int = 60
    seed: int = 42
    target_recall: float = 0.97
    target_precision: float = 0.99


@dataclass(frozen=True)
class PaperSplitParams:
    per_class: int = 100
    test_fraction: float = 0.3


@dataclass(frozen=True)
class HeldoutSplitParams:
    train_per_class: int | None = None  # None: every image of the training cells


@dataclass(frozen=True)
class SplitParams:
    seed: int = 42
    out_dir: str = "data/splits"
    val_fraction: float = 0.2  # share of each class's TRAIN cells held out for validation
    val_per_class: int | None = 100  # validation images per class, spread over its cells
    paper: PaperSplitParams = field(default_factory=PaperSplitParams)
    heldout: HeldoutSplitParams = field(default_factory=HeldoutSplitParams)


@dataclass(frozen=True)
class PrepareParams:
    image_size: int = 224
    view: str = "full"  # full: the whole image resized | cell: the white cell found, cropped, scaled
    cell_fraction: float = CELL_FRACTION  # view cell: the cell box's longer side spans this share of the side
    out_dir: str = "data/prepared"
    external_dir: str = "data/prepared_external"  # stage `external@<name>`: <name>.csv index, <name>.pt


@dataclass(frozen=True)
class ExternalSetParams:
    """One external labelled test set (another lab): a folder root/<CLASS>/, or root plus a
    manifest CSV (path,label[,group], paths relative to root; the file in root, so that DVC
    tracks it). Scored by evaluate, never chosen by."""

    root: str = ""
    manifest: str | None = None  # relative to root


@dataclass(frozen=True)
class TrainParams:
    architectures: tuple[str, ...] = (
        "alexnet", "googlenet", "resnet50", "vgg16", "efficientnet_lite0",
    )
    protocols: tuple[str, ...] = ("paper",)
    seeds: tuple[int, ...] = (42,)
    weights: str = "auto"
    recipe: str = "paper"  # paper | modern (see wbc_transfer.recipe)
    weights_report: str = "results/weights.json"  # stage `weights`: what each architecture gets
    epochs: int = 30
    batch_size: int = 10
    lr: float = 1e-4
    momentum: float = 0.9
    head_lr_factor: float = 10.0
    weight_decay: float = 0.05  # modern: AdamW's decoupled weight decay
    warmup_epochs: float = 1.0  # modern: linear warm-up, then cosine decay to 0
    label_smoothing: float = 0.1  # modern
    rotation_deg: float = 20.0  # modern augmentation: random rotation in [-x, x] degrees
    colour_jitter: float = 0.1  # modern augmentation: brightness/contrast/saturation +- x
    # robustness to another lab (wbc_transfer.robustness; modern recipe's augmentation)
    hue_jitter: float = 0.0  # kornia ColorJitter hue +- x (fraction of the hue circle, <= 0.5)
    grayscale_p: float = 0.0  # kornia RandomGrayscale probability
    hed_jitter: float = 0.0  # HED-space stain jitter sigma (Tellez et al. 2018); 0: off
    scale: tuple[float, ...] = (1.0, 1.0)  # kornia RandomAffine zoom range (>1: zoom in)
    stain_norm: str = "none"  # none | lab: Reinhard LAB standardisation layer at the input
    norm_layer: str = "batchnorm"  # batchnorm | frozen (torchvision FrozenBatchNorm2d, ImageNet stats)
    patience: int = 0  # early stopping: epochs without a better validation macro-F1 (0: off)
    keep: str = "best"  # best: the weights of the best validation epoch; last: the last epoch
    translate_px: int = 30
    reference_size: int = 224
    input_size: int | None = None  # px the network sees (None: prepare.image_size)
    # architecture -> {train parameter: value}: what differs for that architecture
    overrides: dict[str, dict[str, Any]] | None = field(default_factory=dict)  # null: none
    validate_every: int = 0
    device: str = "auto"
    num_threads: int = 0
    channels_last: bool = True
    amp: str = "auto"
    out_dir: str = "results/train"
    checkpoint_dir: str = "checkpoints"


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 16
    max_per_class: int | None = None
    channels_last: bool = True
    tta: bool = False  # average the softmax of the image and its horizontal flip
    out_dir: str = "results/eval"
    calibration_bins: int = 15  # equal-width confidence bins of ECE and the reliability diagram
    review_accuracy: float = 0.99  # accuracy the review threshold must reach on validation
    gallery_sets: tuple[str, ...] = ("TEST",)  # evaluation sets that get Grad-CAM galleries
    gallery_correct: int = 3  # correctly classified cells shown per class (every wrong cell is)


@dataclass(frozen=True)
class CompareParams:
    bootstrap: int = 1000  # bootstrap resamples of the test images per CI (0: no CIs)
    confidence: float = 0.95  # CI level; significance level of the tests = 1 - confidence
    seed: int = 42  # bootstrap resampling seed
    out_dir: str = "results/compare"
    figures_dir: str = "results/compare_figures"  # PNGs: a DVC-cached output, not in git


@dataclass(frozen=True)
class PromoteParams:
    model_name: str = "wbc-classifier"
    alias: str = "champion"
    metric: str = "f1_macro"
    eval_set: str = "validation"  # the leak-free validation groups; never a test set
    protocols: tuple[str, ...] = ("paper", "paper_grouped", "heldout")  # candidates
    out: str = "results/promotion.json"


@dataclass(frozen=True)
class TuneSpaceParams:
    """Search space: lr log-uniform in [lr_low, lr_high], head factor in its range, weight
    decay log-uniform (modern recipe), and a multiplier of the augmentation strengths."""

    lr_low: float = 1e-5
    lr_high: float = 1e-2
    head_lr_factor_low: float = 1.0
    head_lr_factor_high: float = 100.0
    head_lr_factor_log: bool = True
    weight_decay_low: float = 1e-4
    weight_decay_high: float = 0.1
    # scales train.colour_jitter, hed_jitter and translate_px (rotation and flips as they are)
    augment_strength: tuple[float, ...] = (0.5, 1.0, 1.5)


@dataclass(frozen=True)
class TunePrunerParams:
    name: str = "median"  # median | threshold | none
    n_startup_trials: int = 3
    n_warmup_steps: int = 1
    threshold: float = 0.0  # threshold pruner: prune below this validation macro-F1


@dataclass(frozen=True)
class TuneBaselineParams:
    """The untuned reference (the paper's settings), enqueued as the study's first trial."""

    lr: float = 1e-4
    head_lr_factor: float = 10.0


@dataclass(frozen=True)
class TuneParams:
    architectures: tuple[str, ...] = ("efficientnet_lite0",)
    protocol: str = "paper"
    trials: int = 7
    epochs: int = 3
    seed: int = 42
    timeout: float | None = None
    storage: str | None = None
    heartbeat_s: int = 30  # RDB storages: a worker silent for 4x this has its trial failed and retried
    out_dir: str = "results/tune"
    space: TuneSpaceParams = field(default_factory=TuneSpaceParams)
    pruner: TunePrunerParams = field(default_factory=TunePrunerParams)
    baseline: TuneBaselineParams = field(default_factory=TuneBaselineParams)


@dataclass(frozen=True)
class AdaptLabParams:
    """One lab to adapt the champion to (stage `adapt@<lab>`): its labelled folder (class
    sub-folders, or root plus a manifest CSV path,label[,group]) and K, the labelled cells per
    class to adapt on (the rest is that lab's test)."""

    root: str = ""
    manifest: str | None = None  # relative to root
    per_class: int = 25


@dataclass(frozen=True)
class AdaptCurveParams:
    """The learning curve (bench/bench_adapt.py): K x seeds per lab."""

    per_class: tuple[int, ...] = (0, 5, 10, 25, 50)
    seeds: tuple[int, ...] = (1, 2, 3)
    out_dir: str = "results/adapt/curve"


@dataclass(frozen=True)
class AdaptParams:
    """`wbc-transfer adapt` (wbc_transfer.adapt): the few-label recipe and the registry entry."""

    model: str = "models:/wbc-classifier@champion"  # the base model (a pyfunc URI)
    seed: int = 42  # split of the lab's cells and training seed
    folds: int = 3  # cross-validation folds inside the K labelled cells: choose the epoch
    head_epochs: int = 3  # the new head alone first
    body_epochs: int = 6  # then the head and the last blocks
    unfreeze_fraction: float = 0.3  # last blocks: trailing parameters holding this share of weights
    lr: float = 1e-3  # last blocks (AdamW, cosine decay)
    head_lr_factor: float = 10.0  # the head learns this many times faster
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    batch_size: int = 16
    min_epoch_images: int = 64  # an epoch repeats the labelled images to at least this many
    rotation_deg: float = 180.0  # strong augmentation: a cell has no up
    translate_px: int = 20  # at train.reference_size
    colour_jitter: float = 0.2
    hed_jitter: float = 0.05
    scale: tuple[float, ...] = (0.9, 1.1)
    sets: float = 0.9  # confidence level of the prediction sets measured on the lab's test
    alias_prefix: str = "lab-"  # registry alias of an adapted model: <prefix><lab>
    out_dir: str = "results/adapt"
    labs: dict[str, AdaptLabParams] = field(default_factory=dict)
    curve: AdaptCurveParams = field(default_factory=AdaptCurveParams)


@dataclass(frozen=True)
class Params:
    root: Path
    base: BaseParams = field(default_factory=BaseParams)
    data: DataParams = field(default_factory=DataParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    groups: GroupsParams = field(default_factory=GroupsParams)
    split: SplitParams = field(default_factory=SplitParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    compare: CompareParams = field(default_factory=CompareParams)
    promote: PromoteParams = field(default_factory=PromoteParams)
    tune: TuneParams = field(default_factory=TuneParams)
    # name -> external test set (wbc_transfer.external); evaluate scores every model on each
    external: dict[str, ExternalSetParams] = field(default_factory=dict)
    adapt: AdaptParams = field(default_factory=AdaptParams)
    raw: dict[str, Any] = field(default_factory=dict)

    def resolve(self, path: str | os.PathLike[str]) -> Path:
        """An absolute path for a path written relative to the repository root."""
        p = Path(os.path.expanduser(os.fspath(path)))
        return p if p.is_absolute() else self.root / p

    @property
    def images_dir(self) -> Path:
        return self.resolve(self.data.root) / self.data.images_subdir


def _build(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    """Instantiate a (nested) dataclass from a mapping, rejecting unknown keys and converting
    each value to its field's declared type (see `_coerce`). `where`: the dotted section name
    ("train", "tune.space") that errors name."""
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of parameters, got {values!r}")
    values = dict(values or {})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown parameter(s) {unknown}; known: {sorted(known)}")
    hints = get_type_hints(cls)
    return cls(**{name: _coerce(value, hints[name], f"{where}.{name}")
                  for name, value in values.items()})


def _describe(hint: Any) -> str:
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    if get_origin(hint) is tuple:
        return "a list"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """`value` as the type `hint` of parameter `name`, or ConfigError naming the parameter.

    Numbers may come as text: YAML 1.1 (PyYAML) reads `2e-05` (what `dvc exp run -S
    train.lr=0.00002` writes), `1e-4` or `1E-3` as strings; they are parsed here. Whole numbers
    accept integral floats (`1e3`). Lists become tuples, nested sections nested dataclasses.
    """
    if is_dataclass(hint):
        return _build(hint, value, name)
    if get_origin(hint) in (Union, UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        others = [o for o in options if o is not type(None)]
        for option in others:
            try:
                return _coerce(value, option, name)
            except ConfigError:
                pass
        expected = " or ".join(_describe(o) for o in others)
        nullable = " or null" if type(None) in options else ""
        raise ConfigError(f"{name} must be {expected}{nullable}, got {value!r}")
    if get_origin(hint) is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        item = get_args(hint)[0]
        return tuple(_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value))
    if get_origin(hint) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping ({{key: value}}), got {value!r}")
        item = get_args(hint)[1]
        return {k: _coerce(v, item, f"{name}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if hint in (int, float):
        number = _as_number(value)
        if number is None:
            raise ConfigError(f"{name} must be {_describe(hint)}, got {value!r}")
        if hint is float:
            return float(number)
        if number != int(number):
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
        return int(number)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    return value


def _as_number(value: Any) -> int | float | None:
    """An int/float (not bool), or text that parses as one (`2e-05`, `1E-3`); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def find_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: cwd) that holds params.yaml."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / PARAMS_FILE).is_file():
            return folder
    raise ConfigError(f"no {PARAMS_FILE} found in {start} or any parent folder")


def load_params(path: str | os.PathLike[str] | None = None) -> Params:
    """Load and validate params.yaml (default: the one found from the cwd upwards)."""
    file = Path(path) if path else find_root() / PARAMS_FILE
    if file.is_dir():
        file = file / PARAMS_FILE
    if not file.is_file():
        raise ConfigError(f"parameter file not found: {file}")
    raw = yaml.safe_load(file.read_text()) or {}
    sections = {f.name for f in fields(Params)} - {"root", "raw"}
    hints = get_type_hints(Params)
    kwargs: dict[str, Any] = {}
    try:
        for name in sections:
            if is_dataclass(hints[name]):
                kwargs[name] = _build(hints[name], raw.get(name), name)
            else:  # external: name -> entry; null/absent: none
                kwargs[name] = _coerce(raw.get(name) or {}, hints[name], name)
    except ConfigError as exc:
        raise ConfigError(f"{file.name}: {exc}") from None
    params = Params(root=file.resolve().parent, raw=raw, **kwargs)
    check(params)
    return params


NOT_OVERRIDABLE = {"architectures", "protocols", "seeds", "overrides", "out_dir", "checkpoint_dir",
                   "weights_report"}


def train_params_for(params: Params, arch: str) -> TrainParams:
    """`params.train` with `train.overrides[arch]` applied (each value typed like its field).

    Raises ConfigError naming `train.overrides.<arch>.<key>` for an unknown key or a wrong type."""
    over = (params.train.overrides or {}).get(arch) or {}
    if not isinstance(over, dict):
        raise ConfigError(f"train.overrides.{arch} must be a mapping of train parameters, got {over!r}")
    hints = get_type_hints(TrainParams)
    unknown = sorted(set(over) - (set(hints) - NOT_OVERRIDABLE))
    if unknown:
        raise ConfigError(f"train.overrides.{arch}: unknown or not overridable {unknown}")
    values = {k: _coerce(v, hints[k], f"train.overrides.{arch}.{k}") for k, v in over.items()}
    return replace(params.train, **values)


def check_input_sizes(params: Params, registry: dict[str, Any]) -> list[str]:
    """Each trained or tuned architecture's input side (`train.overrides.<arch>.input_size`,
    else `train.input_size`, else `prepare.image_size`) against its registry minimum
    (`models.Architecture.min_input_size`): AlexNet at 32-62 px used to crash at train time."""
    problems = []
    for arch in dict.fromkeys((*params.train.architectures, *params.tune.architectures)):
        if arch not in registry:
            continue  # reported as unknown
        try:
            sized = train_params_for(params, arch).input_size
        except ConfigError:
            continue  # reported with the overrides
        least = registry[arch].min_input_size
        over = (params.train.overrides or {}).get(arch) or {}
        if over.get("input_size") is not None:
            name, value = f"train.overrides.{arch}.input_size", int(sized)
        elif sized is not None:
            name, value = "train.input_size", int(sized)
        else:
            name, value = "prepare.image_size", params.prepare.image_size
        if value < least:
            problems.append(f"{name}={value} is too small for {arch}: its input must be at least "
                            f"{least} px (allowed: {least} and up; a smaller image leaves a pooling "
                            f"layer with nothing to pool)")
    return problems


def check(params: Params) -> None:
    """Range checks that would otherwise fail deep inside a stage."""
    problems: list[str] = []
    from wbc_transfer.models import REGISTRY  # torch: imported only when params are checked

    for name, archs in (("train.architectures", params.train.architectures),
                        ("train.overrides", tuple(params.train.overrides or {})),
                        ("tune.architectures", params.tune.architectures)):
        unknown = sorted(set(archs) - set(REGISTRY))
        if unknown:
            problems.append(f"{name}: unknown architecture(s) {unknown}; known: {sorted(REGISTRY)}")
    if params.validate.policy not in {"strict", "lenient"}:
        problems.append(f"validate.policy must be 'strict' or 'lenient', got {params.validate.policy!r}")
    paper = params.split.paper
    if paper.per_class < 2:
        problems.append(f"split.paper.per_class must be >= 2, got {paper.per_class}")
    if not 0 < paper.test_fraction <= 0.5:
        problems.append(f"split.paper.test_fraction must be in (0, 0.5], got {paper.test_fraction}")
    if not 0 < params.split.val_fraction <= 0.5:
        problems.append(f"split.val_fraction must be in (0, 0.5], got {params.split.val_fraction}")
    for name, value in (("split.val_per_class", params.split.val_per_class),
                        ("split.heldout.train_per_class", params.split.heldout.train_per_class)):
        if value is not None and value < 1:
            problems.append(f"{name} must be >= 1 or null (all), got {value}")
    for name in ("candidates", "min_inliers", "features", "workers", "siblings_per_cell",
                 "sibling_cells"):
        if getattr(params.groups, name) < 1:
            problems.append(f"groups.{name} must be >= 1, got {getattr(params.groups, name)}")
    t = params.train
    if t.epochs < 1:
        problems.append(f"train.epochs must be >= 1, got {t.epochs}")
    if t.batch_size < 1:
        problems.append(f"train.batch_size must be >= 1, got {t.batch_size}")
    if t.lr <= 0:
        problems.append(f"train.lr must be > 0, got {t.lr}")
    if t.head_lr_factor <= 0:
        problems.append(f"train.head_lr_factor must be > 0, got {t.head_lr_factor}")
    if t.amp not in {"auto", "bf16", "off"}:
        problems.append(f"train.amp must be auto, bf16 or off, got {t.amp!r}")
    if not 0 <= t.momentum < 1:
        problems.append(f"train.momentum must be in [0, 1), got {t.momentum}")
    if params.prepare.image_size < 32:
        problems.append(f"prepare.image_size must be >= 32, got {params.prepare.image_size}")
    known_protocols = {"paper", "paper_grouped", "heldout"}
    unknown_protocols = (set(t.protocols) | set(params.promote.protocols)) - known_protocols
    if unknown_protocols:
        problems.append(f"train.protocols / promote.protocols: unknown {sorted(unknown_protocols)}; "
                        f"use {sorted(known_protocols)}")
    if t.recipe not in {"paper", "modern"}:
        problems.append(f"train.recipe must be paper or modern, got {t.recipe!r}")
    for arch in t.overrides or {}:
        try:
            sized = train_params_for(params, arch).input_size
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        if sized is not None and sized < 32:
            problems.append(f"train.overrides.{arch}.input_size must be >= 32 px, got {sized}")
    if t.input_size is not None and t.input_size < 32:
        problems.append(f"train.input_size must be >= 32 px or null, got {t.input_size}")
    problems.extend(check_input_sizes(params, REGISTRY))
    problems.extend(check_robustness(t))
    problems.extend(check_view(params.prepare))
    if t.keep not in {"best", "last"}:
        problems.append(f"train.keep must be best or last, got {t.keep!r}")
    if t.patience < 0:
        problems.append(f"train.patience must be >= 0 (0: no early stopping), got {t.patience}")
    if not 0 <= t.label_smoothing < 1:
        problems.append(f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    if params.promote.eval_set != "validation":
        problems.append(f"promote.eval_set must be 'validation' (the leak-free validation cells): "
                        f"a test set ({params.promote.eval_set!r}) may be reported, never used to "
                        f"choose the champion")
    e = params.evaluate
    if e.calibration_bins < 1:
        problems.append(f"evaluate.calibration_bins must be >= 1, got {e.calibration_bins}")
    if not 0 < e.review_accuracy <= 1:
        problems.append(f"evaluate.review_accuracy must be in (0, 1], got {e.review_accuracy}")
    if e.gallery_correct < 0:
        problems.append(f"evaluate.gallery_correct must be >= 0, got {e.gallery_correct}")
    if params.compare.bootstrap < 0:
        problems.append("compare.bootstrap must be >= 0")
    if not 0 < params.compare.confidence < 1:
        problems.append(f"compare.confidence must be in (0, 1), got {params.compare.confidence}")
    problems.extend(check_tune(params.tune))
    problems.extend(check_external(params.external))
    problems.extend(check_adapt(params.adapt))
    if problems:
        raise ConfigError("invalid params.yaml:\n  " + "\n  ".join(problems))


def check_external(external: dict[str, ExternalSetParams]) -> list[str]:
    """Problems of the `external` section, each naming its parameter (empty: fine)."""
    from wbc_transfer.external import RESERVED

    problems: list[str] = []
    for name, entry in external.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(name)) or name in RESERVED:
            problems.append(f"external.{name}: a set name must be letters, digits, _ or - and not "
                            f"one of evaluate's own sets {list(RESERVED)}")
        if not entry.root:
            problems.append(f"external.{name}.root must name the set's folder (with class "
                            f"sub-folders, or with the files of its manifest)")
    return problems


def check_view(prepare: PrepareParams) -> list[str]:
    """Problems of prepare.view / prepare.cell_fraction, each naming its parameter."""
    problems: list[str] = []
    if prepare.view not in VIEWS:
        problems.append(f"prepare.view must be one of {list(VIEWS)}, got {prepare.view!r}")
    if not 0 < prepare.cell_fraction <= 1:
        problems.append(f"prepare.cell_fraction must be in (0, 1], got {prepare.cell_fraction}")
    return problems


def check_adapt(a: AdaptParams) -> list[str]:
    """Problems of the `adapt` section, each naming its parameter (empty: fine)."""
    problems: list[str] = []
    if a.folds < 2:
        problems.append(f"adapt.folds must be >= 2, got {a.folds}")
    if a.head_epochs < 0 or a.body_epochs < 0 or a.head_epochs + a.body_epochs < 1:
        problems.append("adapt.head_epochs and adapt.body_epochs must be >= 0, with at least one "
                        f"epoch in all (got {a.head_epochs}, {a.body_epochs})")
    if not 0 <= a.unfreeze_fraction <= 1:
        problems.append(f"adapt.unfreeze_fraction must be in [0, 1], got {a.unfreeze_fraction}")
    if not 0 < a.sets < 1:
        problems.append(f"adapt.sets must be in (0, 1), got {a.sets}")
    if a.batch_size < 2:
        problems.append(f"adapt.batch_size must be >= 2 (BatchNorm), got {a.batch_size}")
    for name, lab in a.labs.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(name)):
            problems.append(f"adapt.labs.{name}: a lab name must be letters, digits, _ or -")
        if not lab.root:
            problems.append(f"adapt.labs.{name}.root must name the lab's folder")
        if lab.per_class < 0:
            problems.append(f"adapt.labs.{name}.per_class must be >= 0, got {lab.per_class}")
    if any(k < 0 for k in a.curve.per_class) or not a.curve.seeds:
        problems.append("adapt.curve.per_class must be >= 0 and adapt.curve.seeds not empty")
    return problems


def check_robustness(t: TrainParams) -> list[str]:
    """Problems of the robustness options of `train` (wbc_transfer.robustness), each naming its
    parameter (empty: fine)."""
    problems: list[str] = []
    if not 0 <= t.hue_jitter <= 0.5:
        problems.append(f"train.hue_jitter must be in [0, 0.5], got {t.hue_jitter}")
    if not 0 <= t.grayscale_p <= 1:
        problems.append(f"train.grayscale_p must be in [0, 1], got {t.grayscale_p}")
    if not 0 <= t.hed_jitter < 1:
        problems.append(f"train.hed_jitter must be in [0, 1), got {t.hed_jitter}")
    if len(t.scale) != 2 or not 0 < t.scale[0] <= t.scale[1]:
        problems.append(f"train.scale must be [low, high] with 0 < low <= high, got {list(t.scale)}")
    if t.stain_norm not in {"none", "lab"}:
        problems.append(f"train.stain_norm must be none or lab, got {t.stain_norm!r}")
    if t.norm_layer not in {"batchnorm", "frozen"}:
        problems.append(f"train.norm_layer must be batchnorm or frozen, got {t.norm_layer!r}")
    augmenting = t.hue_jitter or t.grayscale_p or t.hed_jitter or tuple(t.scale) != (1.0, 1.0)
    if augmenting and t.recipe != "modern":
        problems.append("train.hue_jitter / grayscale_p / hed_jitter / scale are part of the modern "
                        f"recipe's augmentation; train.recipe is {t.recipe!r}")
    return problems


def check_tune(tune: TuneParams) -> list[str]:
    """Problems of the `tune` section, each naming its parameter (empty: fine)."""
    problems: list[str] = []
    space, pruner = tune.space, tune.pruner
    # types are already checked and converted by the loader (`_coerce`)
    numbers = {"tune.trials": tune.trials, "tune.epochs": tune.epochs,
               "tune.heartbeat_s": tune.heartbeat_s}
    for name in numbers:
        if numbers[name] < 1 or numbers[name] != int(numbers[name]):
            problems.append(f"{name} must be a whole number >= 1, got {numbers[name]}")
    if tune.timeout is not None and tune.timeout <= 0:
        problems.append(f"tune.timeout must be > 0 seconds or null, got {tune.timeout}")
    for name in ("lr", "head_lr_factor"):
        low, high = getattr(space, f"{name}_low"), getattr(space, f"{name}_high")
        if low <= 0:
            problems.append(f"tune.space.{name}_low must be > 0, got {low}")
        if high <= 0:
            problems.append(f"tune.space.{name}_high must be > 0, got {high}")
        if low > high:
            problems.append(f"tune.space.{name}_low ({low}) must not exceed "
                            f"tune.space.{name}_high ({high}): the range is inverted")
    for name in ("lr", "head_lr_factor"):
        if getattr(tune.baseline, name) <= 0:
            problems.append(f"tune.baseline.{name} must be > 0, got {getattr(tune.baseline, name)}")
    if pruner.name not in {"median", "threshold", "none"}:
        problems.append(f"tune.pruner.name must be median, threshold or none, got {pruner.name!r}")
    for name in ("n_startup_trials", "n_warmup_steps"):
        if getattr(pruner, name) < 0:
            problems.append(f"tune.pruner.{name} must be >= 0, got {getattr(pruner, name)}")
    if tune.protocol not in {"paper", "paper_grouped", "heldout"}:
        problems.append(f"tune.protocol must be paper, paper_grouped or heldout, got {tune.protocol!r}")
    if not tune.architectures:
        problems.append("tune.architectures must name at least one architecture")
    if tune.storage is not None and not (
        tune.storage.startswith("journal:") or "://" in tune.storage
    ):
        problems.append(f"tune.storage must be null, an RDB URL (sqlite:///optuna.db) or "
                        f"journal:<file>, got {tune.storage!r}")
    return problems
