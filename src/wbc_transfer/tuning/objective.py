"""What a trial is: the shared context of one architecture's study, the study name (fingerprint
of everything a trial measures), the search space, the trial's train values, its fit and the
Optuna objective with its MLflow run."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from wbc_transfer import tracking
from wbc_transfer.config import Params, TrainParams, TuneSpaceParams, train_params_for
from wbc_transfer.data.sets import ImageSet, last_batch
from wbc_transfer.engine import Checkpoint, pick_device
from wbc_transfer.models import registry as models
from wbc_transfer.training import threads
from wbc_transfer.training import trainer as training

log = logging.getLogger(__name__)

OWNER_ATTR = "owner"  # trial user attr: the process running it (tracking.owner())
OBJECTIVE = training.OBJECTIVE  # validation macro-F1 of the kept epoch
MLFLOW_STATUS = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}


# --- data -----------------------------------------------------------------------------------

@dataclass
class Context:
    """What every trial of one architecture's study shares."""

    params: Params
    arch: str
    train_set: ImageSet  # the protocol's whole training split
    fit_set: ImageSet  # what trials and final retrains train on: the split or its proxy
    val_set: ImageSet  # the leak-free validation cells: the objective
    device: torch.device
    study_name: str
    train: TrainParams  # train_params_for(arch) with tune.epochs: what a trial's values go into


def load_context(params: Params, arch: str) -> Context:
    """Load the prepared images and split them; fails before any training on a bad name or
    search space."""
    t = params.tune
    if arch not in models.REGISTRY:
        raise KeyError(f"tune: unknown architecture {arch!r}; known: {sorted(models.REGISTRY)}")
    data = ImageSet.load(params.resolve(params.prepare.out_dir) / f"{t.protocol}.pt")
    train_set, val_set = data.subset("train"), data.subset("val")
    if len(val_set) == 0:
        raise ValueError(f"tune: the {t.protocol} manifest has no validation cells")
    fit_set = data.subset("train", t.train_per_class, t.seed)  # the proxy, when asked
    return Context(params, arch, train_set, fit_set, val_set, pick_device(params.train.device),
                   study_name(params, arch, fit_set, val_set),
                   train_params_for(params, arch).model_copy(update={"epochs": t.epochs}))



#: train parameters that cannot change what a trial measures: what to train and where outputs
#: go, the searched lr and head factor, epochs (tune.epochs), and a logging interval. Every
#: other one is in the study fingerprint and a DVC param of the tune stage (tests/test_tune.py)
NOT_IN_TRIAL = frozenset({"architectures", "protocols", "seeds", "out_dir", "checkpoint_dir",
                          "weights_report", "lr", "head_lr_factor", "epochs", "validate_every"})


def study_name(params: Params, arch: str, train_set: ImageSet, val_set: ImageSet) -> str:
    """`<arch>-<protocol>-<fingerprint>`: same configuration -> same (resumable) study."""
    t = params.tune
    resolved = train_params_for(params, arch)  # train.overrides[arch] applied
    config = {
        "arch": arch, "protocol": t.protocol, "epochs": t.epochs,
        "seed": t.seed, "space": t.space.model_dump(), "baseline": t.baseline.model_dump(),
        "train": {k: v for k, v in resolved.model_dump().items()
                  if k not in NOT_IN_TRIAL and k != "overrides"},
        "input": dataclasses.asdict(training.resolve_input(arch, resolved, train_set.size)),
        "evaluate": {"batch_size": params.evaluate.batch_size, "tta": params.evaluate.tta},
        "images": train_set.paths, "validation": val_set.paths,
        # trials of other training code are not comparable: a code change starts a new study
        "code": training_code_digest(),
    }
    return f"{arch}-{t.protocol}-{Checkpoint.fingerprint_of(config)[:8]}"


def training_code_digest(package: Path | None = None) -> str:
    """sha256 over the package's Python sources (the tune stage's DVC dep is the package
    folder): each file's content hash, sorted, so that neither names nor order count and no
    module that decides what a trial trains can be left out. `package`: another copy (tests)."""
    package = package or Path(__file__).parents[1]  # src/wbc_transfer, every subpackage
    hashes = sorted(hashlib.sha256(f.read_bytes()).hexdigest() for f in package.rglob("*.py"))
    return hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]


# --- training -------------------------------------------------------------------------------

SCALED = ("colour_jitter", "hed_jitter", "translate_px")  # x augment_strength


def suggest(trial: optuna.Trial, space: TuneSpaceParams, recipe: str) -> dict[str, float]:
    """The trial's point of the search space (weight decay only where the recipe has one)."""
    hp = {"lr": trial.suggest_float("lr", float(space.lr_low), float(space.lr_high), log=True),
          "head_lr_factor": trial.suggest_float(
              "head_lr_factor", float(space.head_lr_factor_low),
              float(space.head_lr_factor_high), log=bool(space.head_lr_factor_log))}
    if recipe == "modern":
        hp["weight_decay"] = trial.suggest_float(
            "weight_decay", float(space.weight_decay_low), float(space.weight_decay_high),
            log=True)
    hp["augment_strength"] = trial.suggest_categorical(
        "augment_strength", [float(x) for x in space.augment_strength])
    return hp


def trial_values(t: TrainParams, hp: Mapping[str, float]) -> dict[str, float | int]:
    """The train parameters a trial at point `hp` trains with, as `--apply` prints them: lr,
    head factor (and weight decay) at 4 significant digits, the augmentation of `t` scaled by
    `augment_strength`."""
    values: dict[str, float | int] = {k: float(fmt(hp[k])) for k in
                                      ("lr", "head_lr_factor", "weight_decay") if k in hp}
    strength = float(hp.get("augment_strength", 1.0))
    for key in SCALED:  # translate_px stays whole pixels
        scaled = getattr(t, key) * strength
        values[key] = round(scaled) if key == "translate_px" else float(fmt(scaled))
    return values


def fit(ctx: Context, values: Mapping[str, float | int],
        on_epoch: Callable[[dict[str, float], training.Training], None] | None = None,
        ) -> training.Training:
    """Train `ctx.arch` with the trial's `values` in its resolved train parameters: the train
    stage's model and loop (`training.train_model`), `tune.epochs` epochs, seed `tune.seed`,
    validated (early stopping, keep-best) on the validation cells; `on_epoch` sees each row."""
    t = ctx.train.model_copy(update=dict(values))
    return training.train_model(t, ctx.arch, ctx.fit_set, ctx.val_set, seed=ctx.params.tune.seed,
                                device=ctx.device, eval_batch_size=ctx.params.evaluate.batch_size,
                                tta=ctx.params.evaluate.tta, on_epoch=on_epoch)


def run_metrics(row: Mapping[str, float], step: int) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in row.items() if k != "epoch"]


def run_params(values: Mapping[str, Any]) -> list[Param]:
    return [Param(k, v) for k, v in tracking.flat_params("", dict(values)).items()]


@dataclass
class Session:
    """An open study and where its MLflow runs go."""

    study: optuna.Study
    client: MlflowClient
    experiment_id: str
    parent_run_id: str
    storage: str


def make_objective(ctx: Context, session: Session) -> Callable[[optuna.Trial], float]:
    space, client = ctx.params.tune.space, session.client

    def objective(trial: optuna.Trial) -> float:
        hp = suggest(trial, space, ctx.train.recipe)
        values = trial_values(ctx.train, hp)
        trial.set_user_attr("train", values)  # what it trains with (what --apply would print)
        baseline = bool(trial.user_attrs.get("baseline"))
        trial.set_user_attr(OWNER_ATTR, tracking.owner())  # see fail_orphaned_trials
        run_id = client.create_run(session.experiment_id, run_name=f"trial-{trial.number}", tags={
            MLFLOW_PARENT_RUN_ID: session.parent_run_id, "role": "trial",
            "optuna_study": ctx.study_name, "trial_number": str(trial.number),
            "baseline": str(baseline).lower(), "architecture": ctx.arch,
            "protocol": ctx.params.tune.protocol, "trial_state": "running",
            "worker": f"{socket.gethostname()}:{os.getpid()}",
        }).info.run_id
        trial.set_user_attr("mlflow_run_id", run_id)
        client.log_batch(run_id, params=run_params({
            **values, "augment_strength": hp["augment_strength"],
            "lr_head": values["lr"] * values["head_lr_factor"],
            "trial_number": trial.number, "baseline": baseline, "epochs": ctx.train.epochs,
            "fit_images": len(ctx.fit_set), "val_images": len(ctx.val_set),
            "last_batch": last_batch(len(ctx.fit_set), ctx.train.batch_size),
            **threads.policy_for(ctx.train.num_threads).describe(),
        }))

        def on_epoch(row: dict[str, float], run: training.Training) -> None:
            epoch, value = int(row["epoch"]), row[OBJECTIVE]
            client.log_batch(run_id, metrics=run_metrics(row, epoch))  # MLflow step: epoch 1, 2, ..
            trial.report(value, epoch - 1)  # Optuna step: epoch index 0, 1, .. (n_warmup_steps)
            if not baseline and trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: validation macro-F1 {value:.3f}")

        state = "failed"
        try:
            run = fit(ctx, values, on_epoch)
            value = float(run.history[run.kept_epoch - 1][OBJECTIVE])  # the kept epoch's
            trial.set_user_attr("best_epoch", run.kept_epoch)
            trial.set_user_attr("epochs_run", len(run.history))
            client.log_metric(run_id, "objective", value)
            client.log_metric(run_id, "best_epoch", run.kept_epoch)
            state = "complete"
            return value
        except optuna.TrialPruned:
            state = "pruned"
            raise
        finally:  # also on Ctrl-C: the run says what became of the trial
            client.set_tag(run_id, "trial_state", state)
            client.set_terminated(run_id, MLFLOW_STATUS[state])
            log.info("%s trial %d (%s%s): %s", ctx.study_name, trial.number,
                     ", ".join(f"{k} {v:.3g}" for k, v in values.items()),
                     ", baseline" if baseline else "", state)

    return objective



def fmt(value: float) -> str:
    """4 significant digits, never in e-notation (YAML 1.1 reads `1e-05` as a string)."""
    return np.format_float_positional(float(f"{float(value):.4g}"), trim="-")
