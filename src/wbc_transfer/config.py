"""One loader for `params.yaml`: a typed, validated view of every stage's parameters.

Paths in `params.yaml` are relative to the repository root (the folder that holds
`params.yaml`); `resolve()` turns them into absolute paths so stages work from any cwd,
including the temporary copies made by `dvc exp run --temp/--queue`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = "params.yaml"


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
class PaperSplitParams:
    per_class: int = 100
    test_fraction: float = 0.3
    val_per_class: int = 25


@dataclass(frozen=True)
class HeldoutSplitParams:
    train_per_class: int = 100
    val_per_class: int = 25


@dataclass(frozen=True)
class LeakageParams:
    threshold: float = 0.98


@dataclass(frozen=True)
class SplitParams:
    seed: int = 42
    out_dir: str = "data/splits"
    paper: PaperSplitParams = field(default_factory=PaperSplitParams)
    heldout: HeldoutSplitParams = field(default_factory=HeldoutSplitParams)
    leakage: LeakageParams = field(default_factory=LeakageParams)


@dataclass(frozen=True)
class PrepareParams:
    image_size: int = 224
    out_dir: str = "data/prepared"


@dataclass(frozen=True)
class TrainParams:
    architectures: tuple[str, ...] = (
        "alexnet", "googlenet", "resnet50", "vgg16", "efficientnet_lite0",
    )
    protocols: tuple[str, ...] = ("paper",)
    seeds: tuple[int, ...] = (42,)
    weights: str = "auto"
    epochs: int = 30
    batch_size: int = 10
    lr: float = 1e-4
    momentum: float = 0.9
    head_lr_factor: float = 10.0
    translate_px: int = 30
    reference_size: int = 224
    validate_every: int = 0
    device: str = "auto"
    num_threads: int = 0
    out_dir: str = "results/train"
    checkpoint_dir: str = "checkpoints"


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 64
    max_per_class: int | None = None
    out_dir: str = "results/eval"


@dataclass(frozen=True)
class CompareParams:
    bootstrap: int = 1000
    confidence: float = 0.95
    out_dir: str = "results/compare"


@dataclass(frozen=True)
class PromoteParams:
    model_name: str = "wbc-classifier"
    alias: str = "champion"
    metric: str = "f1_macro"
    eval_set: str = "paper_test"
    protocol: str = "paper"
    out: str = "results/promotion.json"


@dataclass(frozen=True)
class Params:
    root: Path
    base: BaseParams = field(default_factory=BaseParams)
    data: DataParams = field(default_factory=DataParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    split: SplitParams = field(default_factory=SplitParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    compare: CompareParams = field(default_factory=CompareParams)
    promote: PromoteParams = field(default_factory=PromoteParams)
    raw: dict[str, Any] = field(default_factory=dict)

    def resolve(self, path: str | os.PathLike[str]) -> Path:
        """An absolute path for a path written relative to the repository root."""
        p = Path(os.path.expanduser(os.fspath(path)))
        return p if p.is_absolute() else self.root / p

    @property
    def images_dir(self) -> Path:
        return self.resolve(self.data.root) / self.data.images_subdir


def _build(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    """Instantiate a (nested) dataclass from a mapping, rejecting unknown keys."""
    values = dict(values or {})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown parameter(s) {unknown}; known: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        default = getattr(cls(), name) if name in known else None
        if hasattr(default, "__dataclass_fields__"):
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


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
    kwargs: dict[str, Any] = {}
    for name in sections:
        default = getattr(Params(root=Path()), name)
        kwargs[name] = _build(type(default), raw.get(name), f"{file.name}:{name}")
    params = Params(root=file.resolve().parent, raw=raw, **kwargs)
    check(params)
    return params


def check(params: Params) -> None:
    """Range checks that would otherwise fail deep inside a stage."""
    problems: list[str] = []
    if params.validate.policy not in {"strict", "lenient"}:
        problems.append(f"validate.policy must be 'strict' or 'lenient', got {params.validate.policy!r}")
    paper = params.split.paper
    if paper.per_class < 2:
        problems.append(f"split.paper.per_class must be >= 2, got {paper.per_class}")
    if not 0 < paper.test_fraction < 1:
        problems.append(f"split.paper.test_fraction must be in (0, 1), got {paper.test_fraction}")
    for name in ("val_per_class",):
        if getattr(paper, name) < 0 or getattr(params.split.heldout, name) < 0:
            problems.append(f"split.*.{name} must be >= 0")
    if params.split.heldout.train_per_class < 1:
        problems.append("split.heldout.train_per_class must be >= 1")
    if not 0 < params.split.leakage.threshold <= 1:
        problems.append(f"split.leakage.threshold must be in (0, 1], got {params.split.leakage.threshold}")
    t = params.train
    if t.epochs < 1:
        problems.append(f"train.epochs must be >= 1, got {t.epochs}")
    if t.batch_size < 1:
        problems.append(f"train.batch_size must be >= 1, got {t.batch_size}")
    if t.lr <= 0:
        problems.append(f"train.lr must be > 0, got {t.lr}")
    if t.head_lr_factor <= 0:
        problems.append(f"train.head_lr_factor must be > 0, got {t.head_lr_factor}")
    if not 0 <= t.momentum < 1:
        problems.append(f"train.momentum must be in [0, 1), got {t.momentum}")
    if params.prepare.image_size < 32:
        problems.append(f"prepare.image_size must be >= 32, got {params.prepare.image_size}")
    unknown_protocols = set(t.protocols) - {"paper", "heldout"}
    if unknown_protocols:
        problems.append(f"train.protocols: unknown {sorted(unknown_protocols)}; use paper, heldout")
    if params.compare.bootstrap < 0:
        problems.append("compare.bootstrap must be >= 0")
    if problems:
        raise ConfigError("invalid params.yaml:\n  " + "\n  ".join(problems))
