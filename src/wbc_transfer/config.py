"""One loader for `params.yaml`: a pydantic schema of every stage's parameters.

`params.yaml` is the one source of every value. The schema holds no defaults (one exception:
the `manifest` of an external set a user adds with `-S '++external.<name>.root=...'`): it says
what each parameter may be (type, choices, range, relations between parameters) and a key that
params.yaml lacks is an error naming it. DVC reads the same file (stage `params`, `dvc exp run
-S`, `dvc params diff`), so the code and DVC cannot disagree about a value, and a value lives
in one place.

Every problem of the file is reported at once, each naming its parameter (dotted path), its
value and what is allowed, in one `ConfigError`; a check that relates parameters of one
section runs once that section's own values are valid, one across sections once all are.

Paths in `params.yaml` are relative to the repository root (the folder that holds
`params.yaml`); `resolve()` turns them into absolute paths so stages work from any cwd,
including the temporary copies made by `dvc exp run --temp/--queue`.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    ValidationError,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

PARAMS_FILE = "params.yaml"

# the choices, each written once (pydantic checks them; code that needs the names reads them here)
Protocol = Literal["paper", "paper_grouped", "heldout"]  # the splits (wbc_transfer.data.splits)
PROTOCOLS: tuple[str, ...] = get_args(Protocol)
View = Literal["full", "cell"]  # prepare.view: the whole image resized | the white cell cropped
VIEWS: tuple[str, ...] = get_args(View)
CELL_FRACTION = 0.6  # the cell_fraction of a prepared set or model saved before the parameter
Recipe = Literal["paper", "modern"]  # wbc_transfer.training.recipe
StainNorm = Literal["none", "lab"]
NormLayer = Literal["batchnorm", "frozen"]
Keep = Literal["best", "last"]
Device = Literal["auto", "cpu", "cuda"]
Amp = Literal["auto", "bf16", "off"]
Policy = Literal["strict", "lenient"]
PrunerName = Literal["median", "threshold", "none"]
NAME = re.compile(r"[A-Za-z0-9_-]+")  # an external set's or a lab's name (a DVC stage suffix)


class ConfigError(ValueError):
    """A parameter in params.yaml is missing, unknown, of the wrong type or out of range."""


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


def _number(value: Any) -> Any:
    """Numbers may come as text: YAML 1.1 (PyYAML) reads `2e-05` (what `dvc exp run -S
    train.lr=0.00002` writes), `1e-4` or `1E-3` as strings. Whole numbers accept integral
    floats (`1e3`); a boolean is not a number."""
    if isinstance(value, bool):
        raise PydanticCustomError("not_a_number", "a boolean is not a number")
    number = _as_number(value) if isinstance(value, str) else None
    return value if number is None else number


def _refuse(*problems: str) -> NoReturn:
    """Fail a validator with problems written in full; `{at}` stands for the dotted path of the
    checked parameter or section."""
    raise PydanticCustomError("params", "{text}", {"text": "; ".join(problems),
                                                   "problems": list(problems)})


def _zoom_range(scale: tuple[float, ...]) -> tuple[float, ...]:
    if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
        _refuse(f"{{at}} must be [low, high] with 0 < low <= high, got {list(scale)}")
    return scale


def _none_is_empty(value: Any) -> Any:
    return {} if value is None else value


Int = Annotated[int, BeforeValidator(_number)]
Float = Annotated[float, BeforeValidator(_number)]
Fraction = Annotated[float, BeforeValidator(_number), Field(gt=0, le=1)]  # (0, 1]
# an image side in px; each architecture's minimum (models/registry.py) is checked by Params
Side = Annotated[int, BeforeValidator(_number), Field(ge=1)]
Zoom = Annotated[tuple[Float, ...], AfterValidator(_zoom_range)]  # [low, high]


def _known_architectures(names: Any) -> Any:
    from wbc_transfer.models.registry import REGISTRY  # torch: imported only when params are checked

    unknown = sorted(set(names) - set(REGISTRY))
    if unknown:
        _refuse(f"{{at}}: unknown architecture(s) {unknown}; known: {sorted(REGISTRY)}")
    return names


Architectures = Annotated[tuple[str, ...], AfterValidator(_known_architectures)]


class Section(BaseModel):
    """A params.yaml section: frozen, every key required, an unknown key is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class BaseParams(Section):
    seed: Int
    experiment: str
    tracking_uri: str | None  # null: sqlite:///<repo>/mlflow.db; env MLFLOW_TRACKING_URI wins


class DataParams(Section):
    root: str
    images_subdir: str
    classes: tuple[str, ...] = Field(min_length=2)
    folders: tuple[str, ...]


class ValidateParams(Section):
    policy: Policy
    index: str
    report_dir: str


class GroupsParams(Section):
    """The `groups` stage: fingerprint size, clustering threshold, the sibling check."""

    candidates: Int = Field(ge=1)  # colour-histogram neighbours verified by keypoint matching
    min_inliers: Int = Field(ge=1)  # RANSAC-affine inliers that make two images one cell
    features: Int = Field(ge=1)  # SIFT keypoints per view
    workers: Int = Field(ge=1)  # processes that describe images
    manifest: str
    siblings_per_cell: Int = Field(ge=1)
    sibling_cells: Int = Field(ge=1)
    seed: Int
    target_recall: Fraction
    target_precision: Fraction


class PaperSplitParams(Section):
    per_class: Int = Field(ge=2)
    test_fraction: Float = Field(gt=0, le=0.5)


class HeldoutSplitParams(Section):
    train_per_class: Int | None = Field(ge=1)  # None: every image of the training cells


class SplitParams(Section):
    seed: Int
    out_dir: str
    val_fraction: Float = Field(gt=0, le=0.5)  # share of each class's TRAIN cells for validation
    val_per_class: Int | None = Field(ge=1)  # validation images per class (None: all)
    paper: PaperSplitParams
    heldout: HeldoutSplitParams


class ViewParams(Section):
    """What the network sees (wbc_transfer.data.cells.model_view)."""

    view: View  # full: the whole image resized | cell: the white cell found, cropped, scaled
    cell_fraction: Fraction  # view cell: the cell box's longer side spans this share of the side


class PrepareParams(ViewParams):
    image_size: Side
    out_dir: str
    external_dir: str  # stage `external@<name>`: <name>.csv index, <name>.pt


class ExternalSetParams(Section):
    """One external labelled test set (another lab): a folder root/<CLASS>/, or root plus a
    manifest CSV (path,label[,group], paths relative to root; the file in root, so that DVC
    tracks it). Scored by evaluate, never chosen by. An entry is a user's own (`dvc exp run -S
    '++external.mylab.root=...'`): `manifest` may be left out (the one default of the schema)."""

    root: str = Field(min_length=1)
    manifest: str | None = None  # relative to root


class _TrainRecipe(Section):
    """The `train` parameters that `train.overrides.<arch>` may set for one architecture."""

    weights: str  # imagenet | none | auto | /path/to/state_dict.pth
    recipe: Recipe  # paper | modern (see wbc_transfer.training.recipe)
    epochs: Int = Field(ge=1)
    batch_size: Int = Field(ge=1)
    lr: Float = Field(gt=0)
    momentum: Float = Field(ge=0, lt=1)
    head_lr_factor: Float = Field(gt=0)
    weight_decay: Float = Field(ge=0)  # modern: AdamW's decoupled weight decay
    warmup_epochs: Float = Field(ge=0)  # modern: linear warm-up, then cosine decay to 0
    label_smoothing: Float = Field(ge=0, lt=1)  # modern
    rotation_deg: Float = Field(ge=0)  # modern augmentation: random rotation in [-x, x] degrees
    colour_jitter: Float = Field(ge=0)  # modern augmentation: brightness/contrast/saturation +- x
    # robustness to another lab (wbc_transfer.models.robustness; modern recipe's augmentation)
    hue_jitter: Float = Field(ge=0, le=0.5)  # kornia ColorJitter hue +- x (share of the circle)
    grayscale_p: Float = Field(ge=0, le=1)  # kornia RandomGrayscale probability
    hed_jitter: Float = Field(ge=0, lt=1)  # HED-space stain jitter sigma (Tellez et al. 2018)
    scale: Zoom  # kornia RandomAffine zoom range (>1: zoom in)
    stain_norm: StainNorm  # lab: Reinhard LAB standardisation layer at the input
    norm_layer: NormLayer  # frozen: torchvision FrozenBatchNorm2d with the ImageNet statistics
    patience: Int = Field(ge=0)  # early stopping: epochs without a better val macro-F1 (0: off)
    keep: Keep  # best: the weights of the best validation epoch; last: the last epoch
    translate_px: Int = Field(ge=0)  # at reference_size
    reference_size: Int = Field(ge=1)
    input_size: Side | None  # px the network sees (None: prepare.image_size)
    validate_every: Int = Field(ge=0)  # iterations between validations (0: once per epoch)
    device: Device
    num_threads: Int = Field(ge=0)  # 0: torch's default
    channels_last: StrictBool
    amp: Amp


class _SetOnly(Section):
    @model_serializer(mode="wrap")
    def _only_set(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}


# train.overrides.<arch>: any of those parameters, each checked like its `train` counterpart
TrainOverride = create_model(
    "TrainOverride", __base__=_SetOnly,
    **{name: (Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation,
              None) for name, info in _TrainRecipe.model_fields.items()})


class TrainParams(_TrainRecipe):
    architectures: Architectures
    protocols: tuple[Protocol, ...]
    seeds: tuple[Int, ...]
    weights_report: str  # stage `weights`: what each architecture gets
    # architecture -> {train parameter: value}: what differs for that architecture (null: none)
    overrides: Annotated[dict[str, TrainOverride | None], BeforeValidator(_none_is_empty)]
    out_dir: str
    checkpoint_dir: str

    @field_validator("overrides")
    @classmethod
    def _overrides_name_architectures(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        _known_architectures(overrides)
        return {arch: over or TrainOverride() for arch, over in overrides.items()}

    @model_validator(mode="after")
    def _robustness_needs_the_modern_recipe(self) -> TrainParams:
        augmenting = (self.hue_jitter or self.grayscale_p or self.hed_jitter
                      or tuple(self.scale) != (1.0, 1.0))
        if augmenting and self.recipe != "modern":
            _refuse("{at}.hue_jitter / grayscale_p / hed_jitter / scale are part of the modern "
                    f"recipe's augmentation; {{at}}.recipe is {self.recipe!r}")
        return self


NOT_OVERRIDABLE = frozenset(TrainParams.model_fields) - frozenset(_TrainRecipe.model_fields)


class EvaluateParams(Section):
    batch_size: Int = Field(ge=1)
    max_per_class: Int | None = Field(ge=1)  # cap per class per evaluation set (None: all)
    channels_last: StrictBool
    tta: StrictBool  # average the softmax of the image and its horizontal flip
    out_dir: str
    calibration_bins: Int = Field(ge=1)  # equal-width confidence bins of ECE
    review_accuracy: Fraction  # accuracy the review threshold must reach on validation
    gallery_sets: tuple[str, ...]  # evaluation sets that get Grad-CAM galleries
    gallery_correct: Int = Field(ge=0)  # correctly classified cells shown per class


class CompareParams(Section):
    bootstrap: Int = Field(ge=0)  # cluster-bootstrap resamples per CI (0: no CIs)
    confidence: Float = Field(gt=0, lt=1)  # CI level; tests' significance level = 1 - confidence
    seed: Int  # bootstrap resampling seed
    out_dir: str
    figures_dir: str  # PNGs: a DVC-cached output, not in git


class PromoteParams(Section):
    model_name: str
    alias: str
    metric: str
    eval_set: str  # the leak-free validation cells; never a test set
    protocols: tuple[Protocol, ...]  # candidates
    out: str

    @field_validator("eval_set")
    @classmethod
    def _never_a_test_set(cls, value: str) -> str:
        if value != "validation":
            _refuse(f"{{at}} must be 'validation' (the leak-free validation cells): a test set "
                    f"({value!r}) may be reported, never used to choose the champion")
        return value


class TuneSpaceParams(Section):
    """Search space: lr log-uniform in [lr_low, lr_high], head factor in its range, weight
    decay log-uniform (modern recipe), and a multiplier of the augmentation strengths
    (train.colour_jitter, hed_jitter and translate_px; rotation and flips as they are)."""

    lr_low: Float = Field(gt=0)
    lr_high: Float = Field(gt=0)
    head_lr_factor_low: Float = Field(gt=0)
    head_lr_factor_high: Float = Field(gt=0)
    head_lr_factor_log: StrictBool
    weight_decay_low: Float = Field(gt=0)
    weight_decay_high: Float = Field(gt=0)
    augment_strength: tuple[Annotated[float, BeforeValidator(_number), Field(ge=0)], ...] = Field(
        min_length=1)

    @field_validator("augment_strength")
    @classmethod
    def _includes_the_baseline(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if 1.0 not in value:
            _refuse(f"{{at}} must include 1.0 (the baseline trial's augmentation), got {list(value)}")
        return value

    @model_validator(mode="after")
    def _ranges_are_not_inverted(self) -> TuneSpaceParams:
        inverted = [name for name in ("lr", "head_lr_factor", "weight_decay")
                    if getattr(self, f"{name}_low") > getattr(self, f"{name}_high")]
        if inverted:  # low == high fixes that parameter while the other is searched
            _refuse(*(f"{{at}}.{n}_low ({getattr(self, f'{n}_low')}) must not exceed {{at}}.{n}_high "
                      f"({getattr(self, f'{n}_high')}): the range is inverted" for n in inverted))
        return self


class TunePrunerParams(Section):
    name: PrunerName
    n_startup_trials: Int = Field(ge=0)  # median: no pruning before this many finished trials
    n_warmup_steps: Int = Field(ge=0)  # this many first epochs of a trial are never pruned
    threshold: Float  # threshold pruner: prune below this validation macro-F1


class TuneBaselineParams(Section):
    """The untuned reference (the paper's settings), enqueued as the study's first trial."""

    lr: Float = Field(gt=0)
    head_lr_factor: Float = Field(gt=0)


class TuneParams(Section):
    architectures: Annotated[Architectures, Field(min_length=1)]
    protocol: Protocol
    trials: Int = Field(ge=1)
    epochs: Int = Field(ge=1)
    # a proxy: trials (and the final retrains) train on at most this many images per class of
    # the training split (None: all of it)
    train_per_class: Int | None = Field(ge=1)
    seed: Int
    timeout: Float | None = Field(gt=0)  # seconds per worker (None: until `trials` are done)
    storage: str | None  # None: sqlite:///<repo>/optuna.db; an RDB URL; journal:<file>
    heartbeat_s: Int = Field(ge=1)  # RDB: a worker silent for 4x this has its trial retried
    out_dir: str
    space: TuneSpaceParams
    pruner: TunePrunerParams
    baseline: TuneBaselineParams

    @field_validator("storage")
    @classmethod
    def _storage_url(cls, value: str | None) -> str | None:
        if value is not None and not (value.startswith("journal:") or "://" in value):
            _refuse(f"{{at}} must be null, an RDB URL (sqlite:///optuna.db) or journal:<file>, "
                    f"got {value!r}")
        return value


def _names(entries: dict[str, Any], what: str, reserved: tuple[str, ...] = ()) -> dict[str, Any]:
    bad = [name for name in entries if not NAME.fullmatch(str(name)) or name in reserved]
    if bad:
        _refuse(*(f"{{at}}.{name}: {what} name must be letters, digits, _ or -"
                  + (f" and not one of evaluate's own sets {list(reserved)}" if reserved else "")
                  for name in bad))
    return entries


class AdaptLabParams(Section):
    """One lab to adapt the champion to (stage `adapt@<lab>`): its labelled folder (class
    sub-folders, or root plus a manifest CSV path,label[,group]) and K, the labelled cells per
    class to adapt on (the rest is that lab's test)."""

    root: str = Field(min_length=1)
    manifest: str | None  # relative to root
    per_class: Int = Field(ge=0)


class AdaptCurveParams(Section):
    """The learning curve (bench/bench_adapt.py): K x seeds per lab."""

    per_class: tuple[Annotated[Int, Field(ge=0)], ...]
    seeds: tuple[Int, ...] = Field(min_length=1)
    out_dir: str


class AdaptParams(Section):
    """`wbc-transfer adapt` (wbc_transfer.training.adapt): the few-label recipe and the registry entry."""

    model: str  # the base model (a pyfunc URI)
    seed: Int  # split of the lab's cells and training seed
    folds: Int = Field(ge=2)  # cross-validation folds inside the K labelled cells: the epoch
    head_epochs: Int = Field(ge=0)  # the new head alone first
    body_epochs: Int = Field(ge=0)  # then the head and the last blocks
    unfreeze_fraction: Float = Field(ge=0, le=1)  # last blocks: this share of the weights
    lr: Float = Field(gt=0)  # last blocks (AdamW, cosine decay)
    head_lr_factor: Float = Field(gt=0)  # the head learns this many times faster
    weight_decay: Float = Field(ge=0)
    label_smoothing: Float = Field(ge=0, lt=1)
    batch_size: Int = Field(ge=2)  # BatchNorm needs two images
    min_epoch_images: Int = Field(ge=1)  # an epoch repeats the labelled images to this many
    rotation_deg: Float = Field(ge=0)  # strong augmentation: a cell has no up
    translate_px: Int = Field(ge=0)  # at train.reference_size
    colour_jitter: Float = Field(ge=0)
    hed_jitter: Float = Field(ge=0, lt=1)
    scale: Zoom
    sets: Float = Field(gt=0, lt=1)  # confidence level of the prediction sets on the lab's test
    alias_prefix: str  # registry alias of an adapted model: <prefix><lab>
    out_dir: str
    labs: dict[str, AdaptLabParams]
    curve: AdaptCurveParams

    @field_validator("labs")
    @classmethod
    def _lab_names(cls, labs: dict[str, Any]) -> dict[str, Any]:
        return _names(labs, "a lab")

    @model_validator(mode="after")
    def _at_least_one_epoch(self) -> AdaptParams:
        if self.head_epochs + self.body_epochs < 1:
            _refuse("{at}.head_epochs and {at}.body_epochs must give at least one epoch in all "
                    f"(got {self.head_epochs}, {self.body_epochs})")
        return self


with warnings.catch_warnings():  # the section `validate` shadows BaseModel.validate (deprecated)
    warnings.filterwarnings("ignore", 'Field name "validate"', UserWarning)

    class _Sections(Section):
        validate: ValidateParams  # type: ignore[assignment]


class Params(_Sections):
    base: BaseParams
    data: DataParams
    groups: GroupsParams
    split: SplitParams
    prepare: PrepareParams
    train: TrainParams
    evaluate: EvaluateParams
    compare: CompareParams
    promote: PromoteParams
    tune: TuneParams
    # name -> external test set (wbc_transfer.data.external); evaluate scores every model on each
    external: Annotated[dict[str, ExternalSetParams], BeforeValidator(_none_is_empty)]
    adapt: AdaptParams
    _root: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def root(self) -> Path:
        """The repository root: the folder of the params.yaml loaded."""
        return self._root

    def resolve(self, path: str | os.PathLike[str]) -> Path:
        """An absolute path for a path written relative to the repository root."""
        p = Path(os.path.expanduser(os.fspath(path)))
        return p if p.is_absolute() else self.root / p

    @property
    def images_dir(self) -> Path:
        return self.resolve(self.data.root) / self.data.images_subdir

    @field_validator("external")
    @classmethod
    def _set_names(cls, external: dict[str, Any]) -> dict[str, Any]:
        from wbc_transfer.data.external import RESERVED

        return _names(external, "a set", RESERVED)

    @model_validator(mode="after")
    def _inputs_fit_the_architectures(self) -> Params:
        """Each trained or tuned architecture's input side, and each side an override sets,
        against the architecture's minimum (`models.Architecture.min_input_size`): AlexNet at
        32-62 px used to crash at train time."""
        from wbc_transfer.models.registry import REGISTRY

        problems = []
        used = dict.fromkeys((*self.train.architectures, *self.tune.architectures))
        sized = [a for a, over in self.train.overrides.items() if over.input_size is not None]
        for arch in dict.fromkeys((*used, *sized)):
            name, value = input_size(self, arch)
            least = REGISTRY[arch].min_input_size
            if value < least:
                problems.append(f"{name}={value} is too small for {arch}: its input must be at "
                                f"least {least} px (allowed: {least} and up; a smaller image "
                                f"leaves a pooling layer with nothing to pool)")
        if problems:
            _refuse(*problems)
        return self


def train_params_for(params: Params, arch: str) -> TrainParams:
    """`params.train` with `train.overrides[arch]` applied (checked when params.yaml loaded)."""
    over = params.train.overrides.get(arch)
    return params.train.model_copy(update=over.model_dump() if over else {})


def input_size(params: Params, arch: str) -> tuple[str, int]:
    """The parameter that decides the side `arch` is trained at, and that side:
    `train.overrides.<arch>.input_size`, else `train.input_size`, else `prepare.image_size`."""
    over = params.train.overrides.get(arch)
    if over is not None and over.input_size is not None:
        return f"train.overrides.{arch}.input_size", over.input_size
    if params.train.input_size is not None:
        return "train.input_size", params.train.input_size
    return "prepare.image_size", params.prepare.image_size


def check_view(values: Mapping[str, Any] | BaseModel) -> list[str]:
    """Problems of `view` / `cell_fraction` in `values` (prepare's, or a model's config), each
    naming its parameter (empty: fine)."""
    if isinstance(values, BaseModel):
        values = values.model_dump()
    try:
        ViewParams.model_validate({k: values.get(k) for k in ViewParams.model_fields})
    except ValidationError as exc:
        return problems_of(exc, ViewParams, ("prepare",))
    return []


# --- error messages: the parameter, its value, what is allowed --------------------------------

TYPES = {
    "a whole number": {"int_type", "int_parsing", "int_from_float"},
    "a number": {"float_type", "float_parsing", "finite_number"},
    "true or false": {"bool_type", "bool_parsing"},
    "a string": {"string_type"},
    "a list": {"list_type", "tuple_type", "set_type"},
    "a mapping of parameters": {"dict_type", "model_type", "model_attributes_type"},
}
RANGES = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _dotted(loc: tuple[Any, ...]) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in loc).lstrip(".")


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the type inside Annotated / Optional, whether None is allowed)."""
    nullable = False
    while get_origin(annotation) in (Annotated, Union, types.UnionType):
        args = get_args(annotation)
        options = args[:1] if get_origin(annotation) is Annotated else [
            a for a in args if a is not type(None)]
        nullable = nullable or type(None) in args
        if len(options) != 1:
            break
        annotation = options[0]
    return annotation, nullable


def _field_at(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[Any, Any, bool]:
    """(type, FieldInfo or None, nullable) of the parameter at `loc` under `model`."""
    annotation, info, nullable = model, None, False
    for key in loc:
        annotation, _ = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            info = annotation.model_fields.get(key)
            if info is None:
                return None, None, False
            annotation = info.annotation
        elif get_origin(annotation) in (dict, tuple):
            annotation, info = get_args(annotation)[-1 if get_origin(annotation) is dict else 0], None
        else:
            return None, None, False
        annotation, nullable = _unwrap(annotation)
    return annotation, info, nullable


def _bounds(info: Any, error: dict[str, Any]) -> str:
    """'>= 1', '> 0', 'in [0, 1)': the allowed range of a field (else the error's own bound)."""
    limits = {key: getattr(item, key) for item in (info.metadata if info else ())
              for key in ("gt", "ge", "lt", "le") if getattr(item, key, None) is not None}
    limits = limits or dict(error.get("ctx", {}))
    low = ("(", limits["gt"]) if "gt" in limits else ("[", limits["ge"]) if "ge" in limits else None
    high = (")", limits["lt"]) if "lt" in limits else ("]", limits["le"]) if "le" in limits else None
    if low and high:
        return f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    if low:
        return f"{'>' if low[0] == '(' else '>='} {low[1]:g}"
    return f"{'<' if high[0] == ')' else '<='} {high[1]:g}" if high else ""


def _unknown(model: type[BaseModel], parent: tuple[Any, ...], name: str, names: list[str]) -> str:
    kind, _, _ = _field_at(model, parent)
    known = sorted(kind.model_fields) if kind else []
    what = ("unknown or not overridable" if parent[:2] == ("train", "overrides")
            else "unknown parameter(s)" if parent else "unknown section(s)")
    close = [m for n in names for m in difflib.get_close_matches(str(n), known, 1)]
    hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else f"; known: {known}"
    return f"{name + ': ' if name else ''}{what} {sorted(map(str, names))}{hint}"


def _describe(model: type[BaseModel], loc: tuple[Any, ...], name: str,
              error: dict[str, Any]) -> str:
    kind = error["type"]
    annotation, info, nullable = _field_at(model, loc)
    if kind == "missing":
        return f"{name} is missing: {PARAMS_FILE} must set it (the schema has no defaults)"
    whole = annotation is int
    expected = next((words for words, kinds in TYPES.items() if kind in kinds), None)
    if kind == "not_a_number":
        expected = "a whole number" if whole else "a number"
    elif kind == "literal_error":
        expected = f"one of {error['ctx']['expected']}"
    elif kind in RANGES:
        expected = f"{'a whole number ' if whole else ''}{_bounds(info, error)}"
    elif kind in ("string_too_short", "too_short"):
        return f"{name} must not be empty, got {error['input']!r}"
    elif expected is None:
        return f"{name}: {error['msg']}, got {error['input']!r}"
    return f"{name} must be {expected}{' or null' if nullable else ''}, got {error['input']!r}"


def problems_of(error: ValidationError, model: type[BaseModel] = Params,
                prefix: tuple[Any, ...] = ()) -> list[str]:
    """Every problem of a failed validation of `model` (named as if under `prefix`), one line
    each, in the schema's order; the unknown keys of one section together."""
    problems: list[str | tuple[Any, ...]] = []
    unknown: dict[tuple[Any, ...], list[str]] = {}
    for e in error.errors():
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            if loc[:-1] not in unknown:
                problems.append(loc[:-1])  # its line is written below, once all are known
            unknown.setdefault(loc[:-1], []).append(loc[-1])
        elif e["type"] == "params":
            problems += [p.replace("{at}", _dotted(prefix + loc)) for p in e["ctx"]["problems"]]
        else:
            problems.append(_describe(model, loc, _dotted(prefix + loc), e))
    return [_unknown(model, p, _dotted(prefix + p), unknown[p]) if isinstance(p, tuple) else p
            for p in problems]


def find_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: cwd) that holds params.yaml."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / PARAMS_FILE).is_file():
            return folder
    raise ConfigError(f"no {PARAMS_FILE} found in {start} or any parent folder")


def load_params(path: str | os.PathLike[str] | None = None) -> Params:
    """Load and validate params.yaml (default: the one found from the cwd upwards). Raises
    ConfigError listing every problem (`params.yaml: <problem>`, or `params.yaml: N problems:`
    and one indented line each)."""
    file = Path(path) if path else find_root() / PARAMS_FILE
    if file.is_dir():
        file = file / PARAMS_FILE
    if not file.is_file():
        raise ConfigError(f"parameter file not found: {file}")
    raw = yaml.safe_load(file.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{file.name}: must be a mapping of sections, got {raw!r}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        problems = problems_of(exc)
        if len(problems) == 1:
            raise ConfigError(f"{file.name}: {problems[0]}") from None
        raise ConfigError(f"{file.name}: {len(problems)} problems:\n  "
                          + "\n  ".join(problems)) from None
    params._root = file.resolve().parent
    return params
