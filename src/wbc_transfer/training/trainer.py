"""The one way a network is trained: built from its resolved TrainParams, fitted with
`engine.fit`, validated every epoch, stopped early and kept at its best epoch.

Every Optuna trial (`tuning/objective.py`) calls `train_model` = `build` + `fit`; the train stage
(`stages/train.py`) calls the same two, with its checkpoint resumed between them. So a trial
and a training run with the same parameters build the same model and reach the same per-epoch
numbers (tests/test_training.py). What differs between them (MLflow logging, checkpoints,
progress bars, pruning) lives in their hooks, never in the loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from wbc_transfer import engine
from wbc_transfer.config import TrainParams
from wbc_transfer.data.sets import MIN_TRAIN_BATCH, ImageSet, batch_count
from wbc_transfer.engine import (
    EpochStats,
    EvalResult,
    amp_dtype,
    evaluate,
    pick_device,
    place_model,
    seed_everything,
)
from wbc_transfer.models import registry as models
from wbc_transfer.models import robustness
from wbc_transfer.training import recipe, threads

log = logging.getLogger(__name__)

OBJECTIVE = "val_f1_macro"  # what keep-best and early stopping look at


def model_name(arch: str, protocol: str, seed: int) -> str:
    """`<arch>-<protocol>-<seed>`: the name of a trained model's folders, stage and MLflow run."""
    return f"{arch}-{protocol}-{seed}"


@dataclass(frozen=True)
class InputSpec:
    """What the network sees: side in px, and the per-channel mean and std it normalises with."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def resolve_input(arch: str, t: TrainParams, prepared_size: int) -> InputSpec:
    """The input of `arch` under `t` (from `train_params_for`, so `train.overrides.<arch>`
    included), decided here and nowhere else (as timm's `resolve_data_config`): side
    `t.input_size`, else the prepared images' side; mean and std from the registry."""
    if arch not in models.REGISTRY:
        raise KeyError(f"unknown architecture {arch!r}; known: {sorted(models.REGISTRY)}")
    entry = models.REGISTRY[arch]
    return InputSpec(int(t.input_size or prepared_size), entry.mean, entry.std)


@dataclass
class Training:
    """A network being fitted (and, once `train_model` returns, fitted) with what it was built
    from and what it went through: one row per epoch in `history`, the best epoch's weights."""

    arch: str
    t: TrainParams
    seed: int  # of the weights' initialisation and of every epoch's batches and augmentation
    spec: InputSpec
    built: models.Built
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    device: torch.device
    amp: torch.dtype | None
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0  # 1-based; 0: no validated epoch yet
    best_value: float = -1.0  # its validation macro-F1
    best_weights: dict[str, torch.Tensor] | None = None
    stopped_early: bool = False

    @property
    def kept_epoch(self) -> int:
        """The epoch whose weights `model` holds after `train_model`: the best validation
        epoch under `train.keep: best` (with a validation set), else the last one."""
        if self.t.keep == "best" and self.best_weights is not None:
            return self.best_epoch
        return len(self.history)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed fit needs (the train stage's checkpoint)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "epoch": len(self.history), "history": self.history,
                "best": {"epoch": self.best_epoch, OBJECTIVE: self.best_value,
                         "model": self.best_weights}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.history = list(state["history"])
        best = state.get("best") or {}
        self.best_epoch = int(best.get("epoch", 0))
        self.best_value = float(best.get(OBJECTIVE, -1.0))
        self.best_weights = best.get("model")


def build(t: TrainParams, arch: str, train_set: ImageSet, seed: int,
          device: torch.device | None = None) -> Training:
    """`arch` as `t` says, ready to fit on `train_set` (at the prepared size; the side is
    `resolve_input`'s): seeded, its weights (`t.weights`), a new head, the robustness input
    layer / frozen BatchNorm (`robustness.adapt`, fitted on the training images), placed on the
    device; the recipe's optimiser and schedule. Nothing else decides how a model is built."""
    spec = resolve_input(arch, t, train_set.size)
    train_set = train_set.resized(spec.size)
    device = device or pick_device(t.device)
    seed_everything(seed)
    built = models.build(arch, len(train_set.classes), t.weights, spec.size)
    adapted = robustness.adapt(built.model, built.mean, built.std, t.stain_norm, t.norm_layer,
                               train_set.images)
    model = place_model(adapted, device, t.channels_last)
    optimizer = recipe.make_optimizer(t, model, built.head)
    scheduler = recipe.make_scheduler(
        t, optimizer, batch_count(len(train_set), t.batch_size, MIN_TRAIN_BATCH))
    return Training(arch, t, seed, spec, built, model, optimizer, scheduler, device,
                    amp_dtype(device, t.amp))


def fit(
    run: Training,
    train_set: ImageSet,
    val_set: ImageSet | None = None,
    *,
    eval_batch_size: int = 16,
    tta: bool = False,
    on_epoch: Callable[[dict[str, float], Training], None] | None = None,
    on_iteration: Callable[[int, dict[str, float]], None] | None = None,
    progress: tqdm | None = None,
) -> Training:
    """Fit `run` (from `build`, perhaps resumed with `load_state_dict`) on `train_set` for
    epochs `len(run.history)` .. `t.epochs` with `engine.fit` (reseeded per epoch by `run.seed`).

    Both sets come at the prepared size and are resized to `run.spec.size`. With `val_set`,
    each epoch is scored on it (macro-F1, `eval_batch_size`, `tta`); `t.patience` > 0 stops
    after that many epochs without a better score; `t.keep == "best"` leaves the best epoch's
    weights in `run.model`. Without it: no early stopping, the last epoch is kept.

    Hooks: `on_epoch(row, run)` after each epoch with its history row (1-based `epoch`, train
    and validation loss/accuracy, `val_f1_macro`, `lr`, `torch_threads`, `train_images_per_s`),
    the best epoch already updated: it may save a checkpoint, or raise (optuna.TrialPruned) to
    stop; `on_iteration(i, metrics)` every `t.validate_every` iterations with the validation
    loss/accuracy. `progress` advances by one per batch."""
    t = run.t
    train_set = train_set.resized(run.spec.size)
    val_set = val_set.resized(run.spec.size) if val_set is not None and len(val_set) else None
    policy = threads.policy_for(t.num_threads)  # shares the cores with other trainers
    used = {"threads": torch.get_num_threads()}

    def score(data: ImageSet) -> EvalResult:
        return evaluate(run.model, data, run.built.mean, run.built.std, run.device,
                        eval_batch_size, run.amp, tta=tta)

    def before_epoch(epoch: int) -> bool:
        if val_set is not None and t.patience and epoch - run.best_epoch >= t.patience:
            run.stopped_early = True
            log.info("%s: early stop after epoch %d: no better validation macro-F1 since epoch %d",
                     run.arch, epoch, run.best_epoch)
            return False
        used["threads"] = policy.rebalance()  # other trainers may have started or ended
        return True

    def after_epoch(epoch: int, stats: EpochStats) -> None:
        row = {"epoch": epoch + 1, "train_loss": stats.loss, "train_accuracy": stats.accuracy}
        if val_set is not None:
            r = score(val_set)
            row.update(val_loss=r.loss, val_accuracy=r.accuracy, val_f1_macro=r.f1_macro)
            if r.f1_macro > run.best_value:
                run.best_epoch, run.best_value = epoch + 1, r.f1_macro
                run.best_weights = {k: v.detach().clone()
                                    for k, v in run.model.state_dict().items()}
        row.update(lr=run.optimizer.param_groups[0]["lr"], torch_threads=used["threads"],
                   train_images_per_s=stats.images / max(stats.seconds, 1e-9))
        run.history.append(row)
        if on_epoch is not None:
            on_epoch(row, run)

    def validate_now(iteration: int) -> None:
        r = score(val_set)
        on_iteration(iteration, {"val_iter_loss": r.loss, "val_iter_accuracy": r.accuracy})

    every = t.validate_every if val_set is not None and on_iteration is not None else 0
    engine.fit(run.model, train_set, run.optimizer, recipe.make_augment(t, run.spec.size),
               run.built.mean, run.built.std, run.device, t.batch_size, t.epochs, run.seed,
               start_epoch=len(run.history), amp=run.amp, loss_fn=recipe.make_loss(t),
               scheduler=run.scheduler, progress=progress, every=every, on_every=validate_now,
               before_epoch=before_epoch, after_epoch=after_epoch)
    if run.kept_epoch != len(run.history):
        run.model.load_state_dict(run.best_weights)
    return run


def train_model(
    t: TrainParams,
    arch: str,
    train_set: ImageSet,
    val_set: ImageSet | None = None,
    *,
    seed: int,
    device: torch.device | None = None,
    eval_batch_size: int = 16,
    tta: bool = False,
    on_epoch: Callable[[dict[str, float], Training], None] | None = None,
) -> Training:
    """`build` then `fit`: fine-tune `arch` with its resolved train parameters `t`
    (`config.train_params_for`: epochs, recipe, lr, augmentation, input size, robustness
    options, patience, keep) on `train_set`, validated on `val_set`; returns the `Training`
    (`model` with the kept epoch's weights, `built`, `spec`, `history`, `best_epoch`). The
    train stage runs the same two steps with a checkpoint between them."""
    run = build(t, arch, train_set, seed, device)
    return fit(run, train_set, val_set, eval_batch_size=eval_batch_size, tta=tta,
               on_epoch=on_epoch)
