"""Optuna search over the learning rate, the new head's learning-rate factor, the weight decay
and the augmentation strength; the epoch to keep comes from keep-best.

The paper fixed lr 1e-4 and head factor 10 and named tuning them as future work. Here:

- **One training code**: a trial trains with `training.train_model`, the train stage's own
  build and loop (input size and `train.overrides` of the architecture, robustness options,
  recipe, early stopping `train.patience`, keep-best), with the trial's values put into the
  resolved train parameters. A train stage run with the values `--apply` prints (and
  `train.epochs` = `tune.epochs`) builds the same model and reaches the same validation scores
  (tests/test_training.py).
- **Search space** (`tune.space`): lr and head factor (log-uniform), weight decay (log-uniform;
  modern recipe only: the paper recipe's SGD has none), and `augment_strength`, a categorical
  multiplier of `train.colour_jitter`, `hed_jitter` and `translate_px` (rotation and flips as
  they are). Sampled values are rounded to 4 significant digits before training, so that what
  `--apply` prints is what was measured.
- **Objective**: macro-F1 on the protocol's validation cells (the leak-free validation groups
  every protocol shares; no cell of them is in any training split) of the epoch keep-best
  keeps (`train.keep: best`: the best epoch; recorded as the trial's user attr `best_epoch`).
  The test splits are never seen during the search. Every trial trains with the same seed, so
  trials differ only by their hyperparameters.
- **Baseline**: the untuned settings (`tune.baseline` lr and head factor, the paper's; the train
  section's weight decay; augmentation x1) are enqueued as trial 0 and never pruned, so the
  best trial is compared with them under the same procedure.
- **Pruning**: `trial.report(val_f1, epoch)` + `trial.should_prune()` after every epoch.
- **Storage**: persistent (SQLite at the repo root by default, any RDB URL, or a journal file),
  so an interrupted study resumes where it stopped and several worker processes can share one
  study. `tune.trials` caps the total over all workers: trials that are complete, pruned,
  running or waiting count; failed ones (e.g. Ctrl-C) are redone. The study name carries a
  fingerprint of everything that changes what a trial measures (search space, epochs, seeds,
  every train parameter a trial reads, the input, the images, the package's code), so a
  changed configuration starts a new study instead of mixing results.
- **MLflow**: one parent run per study; one nested run per trial with its params, per-epoch
  validation metrics (step = epoch) and tag `trial_state` = complete / pruned / failed; the
  two final retrains (best and baseline settings, trained as a trial is, scored once on the
  test sets) are nested runs too; the parent holds the best params, the table and Optuna's
  plots.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import torch
import yaml
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import FrozenTrial, TrialState

from wbc_transfer import tracking
from wbc_transfer.config import Params, TrainParams, TuneSpaceParams, train_params_for
from wbc_transfer.data.sets import ImageSet, last_batch
from wbc_transfer.engine import Checkpoint, amp_dtype, evaluate, pick_device
from wbc_transfer.evaluation.metrics import SUMMARY_METRICS, classification_metrics
from wbc_transfer.io import write_csv, write_json, write_text
from wbc_transfer.models import registry as models
from wbc_transfer.training import threads
from wbc_transfer.training import trainer as training

log = logging.getLogger(__name__)

#: trial states that count towards `tune.trials` (running ones too, so that concurrent workers
#: stop at exactly `tune.trials`); failed trials do not count and are redone
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
PARENT_ATTR = "mlflow_parent_run_id"
OWNER_ATTR = "owner"  # trial user attr: the process running it (tracking.owner())
HEARTBEAT_S = 30  # default tune.heartbeat_s
OBJECTIVE = training.OBJECTIVE  # validation macro-F1 of the kept epoch
MLFLOW_STATUS = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}
MAX_RETRY = 2  # a failed trial (dead worker) is enqueued again at most this often
MAX_ROUNDS = 3  # search: rounds of (run the remaining trials, wait for other workers)


# --- storage, sampler, pruner ---------------------------------------------------------------

def storage_url(params: Params) -> str:
    """Env OPTUNA_STORAGE wins (as in Optuna's CLI), then `tune.storage`, else SQLite at the
    repo root. Relative sqlite/journal paths are resolved at the user's repo root (like the
    MLflow store: also from a `dvc exp run --temp/--queue` copy), never the cwd."""
    home = tracking.home_root(params.root)
    url = os.environ.get("OPTUNA_STORAGE") or params.tune.storage
    if not url:
        return f"sqlite:///{home / 'optuna.db'}"
    if url.startswith("journal:"):
        return f"journal:{home / os.path.expanduser(url.removeprefix('journal:'))}"
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        path = url.removeprefix("sqlite:///")
        if path and not path.startswith(":memory:"):
            return f"sqlite:///{home / path}"
    return url


def open_storage(url: str, heartbeat_s: int = HEARTBEAT_S) -> optuna.storages.BaseStorage:
    """`journal:<file>` -> JournalStorage on a file (safe for many processes, also over NFS);
    anything else is an RDB URL (SQLite, PostgreSQL: `postgresql://user@host:port/db`, driver
    psycopg2), opened with heartbeats every `heartbeat_s` seconds: the trial of a worker silent
    for 4x that long (killed, machine lost) is failed by the next worker that starts a trial
    and enqueued again with the same params (Optuna's RetryHeartbeatStaleTrialCallback, at
    most twice), so it is redone, not lost."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    engine_kwargs = None
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if path and not path.startswith(":memory:"):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": tracking.SQLITE_TIMEOUT_S}}  # workers share it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s,
            grace_period=4 * heartbeat_s,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=MAX_RETRY))


def public_url(url: str) -> str:
    """The storage URL without credentials (for logs, tags and summary files)."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def make_pruner(params: Params) -> optuna.pruners.BasePruner:
    p = params.tune.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials,
                                           n_warmup_steps=p.n_warmup_steps)
    if p.name == "threshold":
        return optuna.pruners.ThresholdPruner(lower=float(p.threshold),
                                              n_warmup_steps=p.n_warmup_steps)
    return optuna.pruners.NopPruner()


def make_sampler(params: Params, worker: bool, done: int = 0) -> optuna.samplers.BaseSampler:
    """TPE, random for the first half of the trials (at most 10). Seeded by `tune.seed` plus
    the number of trials already in the study: a fresh study is reproducible, and a resumed
    one does not redraw the points of its first run. Extra workers get an unseeded sampler,
    or they would all draw the same points."""
    startup = max(2, min(10, params.tune.trials // 2))
    return optuna.samplers.TPESampler(seed=None if worker else params.tune.seed + done,
                                      n_startup_trials=startup)


# --- data -----------------------------------------------------------------------------------

@dataclass
class Context:
    """What every trial of one architecture's study shares."""

    params: Params
    arch: str
    train_set: ImageSet  # the protocol's training split (trials and final retrains)
    fit_set: ImageSet  # what trials train on: the whole training split
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
    return Context(params, arch, train_set, train_set, val_set, pick_device(params.train.device),
                   study_name(params, arch, train_set, val_set),
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


def _metrics(row: Mapping[str, float], step: int) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in row.items() if k != "epoch"]


def _params(values: Mapping[str, Any]) -> list[Param]:
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
        client.log_batch(run_id, params=_params({
            **values, "augment_strength": hp["augment_strength"],
            "lr_head": values["lr"] * values["head_lr_factor"],
            "trial_number": trial.number, "baseline": baseline, "epochs": ctx.train.epochs,
            "fit_images": len(ctx.fit_set), "val_images": len(ctx.val_set),
            "last_batch": last_batch(len(ctx.fit_set), ctx.train.batch_size),
            **threads.policy_for(ctx.train.num_threads).describe(),
        }))

        def on_epoch(row: dict[str, float], run: training.Training) -> None:
            epoch, value = int(row["epoch"]), row[OBJECTIVE]
            client.log_batch(run_id, metrics=_metrics(row, epoch))  # MLflow step: epoch 1, 2, ..
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


# --- the study ------------------------------------------------------------------------------

def counted(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


def baseline_point(ctx: Context) -> dict[str, float]:
    """The untuned settings as a point of the search space: `tune.baseline`'s lr and head
    factor, the train section's weight decay, the augmentation as it is (x1)."""
    point = {"lr": float(ctx.params.tune.baseline.lr),
             "head_lr_factor": float(ctx.params.tune.baseline.head_lr_factor)}
    if ctx.train.recipe == "modern":
        point["weight_decay"] = float(ctx.train.weight_decay)
    return {**point, "augment_strength": 1.0}


def ensure_baseline(study: optuna.Study, ctx: Context) -> None:
    """Enqueue the untuned settings unless a live or finished baseline trial exists."""
    live = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
    if any(t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False, states=live)):
        return
    study.enqueue_trial(baseline_point(ctx), user_attrs={"baseline": True})


def _parent_run(ctx: Context, session: Session, url: str) -> str:
    """Create the study's parent run, record it in the study, and return its id."""
    t = ctx.params.tune
    run = session.client.create_run(session.experiment_id, run_name=f"tune-{ctx.study_name}", tags={
        "role": "study", "optuna_study": ctx.study_name, "optuna_storage": public_url(url),
        "architecture": ctx.arch, "protocol": t.protocol, "dvc_stage": f"tune@{ctx.arch}",
    })
    run_id = run.info.run_id
    session.client.log_batch(run_id, params=_params({
        "architecture": ctx.arch, "protocol": t.protocol, "epochs": t.epochs,
        "seed": t.seed, "space": t.space.model_dump(),
        "pruner": t.pruner.model_dump(), "baseline": t.baseline.model_dump(),
        "fit_images": len(ctx.fit_set), "val_images": len(ctx.val_set),
        "train_images": len(ctx.train_set),
        "input_size": training.resolve_input(ctx.arch, ctx.train, ctx.train_set.size).size,
        "weights": ctx.train.weights, "recipe": ctx.train.recipe,
        "batch_size": ctx.train.batch_size, "code": training_code_digest(),
        "git_commit": tracking.git_commit(ctx.params.root),
        "data_md5": tracking.data_md5(ctx.params.root),
    }))
    session.study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


def _run_exists(client: MlflowClient, run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        client.get_run(run_id)
    except Exception:  # deleted, or another tracking store
        return False
    return True


def open_study(ctx: Context, worker: bool = False, wait_s: float = 60.0) -> Session:
    """Create the study, or join/resume it (Optuna's load_if_exists, but knowing who created
    it: only the creator enqueues the baseline and creates the parent run; others wait for it)."""
    params = ctx.params
    url = storage_url(params)
    storage = open_storage(url, params.tune.heartbeat_s)
    sampler, pruner = make_sampler(params, worker), make_pruner(params)
    try:
        study = optuna.create_study(storage=storage, study_name=ctx.study_name,
                                    direction="maximize", sampler=sampler, pruner=pruner)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=ctx.study_name, storage=storage, sampler=sampler,
                                  pruner=pruner)
        study.sampler = make_sampler(params, worker, len(study.trials))
        created = False
    experiment_id = tracking.setup(params)
    client = MlflowClient(tracking.tracking_uri(params))
    session = Session(study, client, experiment_id, "", public_url(url))
    if created:
        study.set_user_attr("architecture", ctx.arch)
        study.set_user_attr("protocol", params.tune.protocol)
        ensure_baseline(study, ctx)
        session.parent_run_id = _parent_run(ctx, session, url)
        log.info("created study %s in %s (MLflow parent run %s)", ctx.study_name,
                 session.storage, session.parent_run_id)
        return session
    deadline = time.monotonic() + (0 if not worker else wait_s)
    parent = study.user_attrs.get(PARENT_ATTR)
    while not _run_exists(client, parent) and time.monotonic() < deadline:
        time.sleep(1)  # its creator is between create_study and recording the parent run
        parent = study.user_attrs.get(PARENT_ATTR)
    if not _run_exists(client, parent):
        parent = _parent_run(ctx, session, url)
    session.parent_run_id = parent
    finished = len(study.get_trials(deepcopy=False,
                                    states=(TrialState.COMPLETE, TrialState.PRUNED)))
    log.info("resuming study %s in %s: %d trial(s) finished (MLflow parent run %s)",
             ctx.study_name, session.storage, finished, session.parent_run_id)
    return session


def fail_orphaned_trials(study: optuna.Study) -> list[int]:
    """Fail now the RUNNING trials whose process is gone (killed on this machine, e.g. with
    SIGKILL: nothing could end them), and enqueue each again with the same params and user
    attrs (baseline flag), as Optuna's RetryHeartbeatStaleTrialCallback does after the heartbeat grace
    period (4 x tune.heartbeat_s; a trial of another machine still waits for that). Returns
    the failed trials' numbers. Uses the storage and trial id as optuna.storages.
    fail_stale_trials does (no public API sets another process's trial state)."""
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if tracking.owner_alive(trial.user_attrs.get(OWNER_ATTR)) is not False:
            continue
        try:
            if not study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                continue
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # it finished meanwhile
        # enqueued again exactly as the heartbeat path does it (system attr failed_trial)
        optuna.storages.RetryFailedTrialCallback(max_retry=MAX_RETRY)(study, trial)
        log.warning("trial %d was RUNNING but its process (%s) is gone: failed, and enqueued "
                    "again with the same params", trial.number, trial.user_attrs.get(OWNER_ATTR))
        failed.append(trial.number)
    return failed


def close_dead_trials(session: Session) -> None:
    """Fail trials of killed workers (this machine: at once; elsewhere: RDB heartbeat) and
    close their MLflow runs to match."""
    fail_orphaned_trials(session.study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(session.study)
    for trial in session.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = trial.user_attrs.get("mlflow_run_id")
        if _run_exists(session.client, run_id) and \
                session.client.get_run(run_id).data.tags.get("trial_state") == "running":
            session.client.set_tag(run_id, "trial_state", "failed")
            session.client.set_terminated(run_id, MLFLOW_STATUS["failed"])


def search(ctx: Context, worker: bool = False) -> Session:
    """Run this process's share of the study: trials until `tune.trials` count (all workers)."""
    t = ctx.params.tune
    session = open_study(ctx, worker)
    study = session.study
    close_dead_trials(session)
    if not worker:
        ensure_baseline(study, ctx)  # e.g. it failed in an interrupted run
        session.client.update_run(session.parent_run_id, status="RUNNING")
    if t.trials - counted(study) <= 0:
        log.info("study %s already has %d trial(s) of %d: nothing to run", ctx.study_name,
                 counted(study), t.trials)
    try:
        for _ in range(MAX_ROUNDS):
            remaining = t.trials - counted(study)
            if remaining > 0:
                study.optimize(
                    make_objective(ctx, session), n_trials=remaining, timeout=t.timeout,
                    callbacks=[optuna.study.MaxTrialsCallback(t.trials, states=COUNTED)],
                    gc_after_trial=True,
                )
            if worker or t.timeout is not None:
                break
            # the stage: other workers' trials that died meanwhile are failed and enqueued
            # again; run them too, so that the study ends with tune.trials finished trials
            wait_for_workers(study)
            if counted(study) >= t.trials:
                break
        close_dead_trials(session)
    except BaseException:
        if not worker:  # the stage owns the parent run; a rerun resumes it
            session.client.set_terminated(session.parent_run_id, "FAILED")
        raise
    return session


def wait_for_workers(study: optuna.Study, poll_s: float = 5.0) -> None:
    """Wait for trials other workers are still running. RDB storages fail a killed worker's
    trial by heartbeat; elsewhere a trial running for twice the longest finished trial (+1 min)
    is taken for dead and left out."""
    while True:
        fail_orphaned_trials(study)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        durations = [t.duration.total_seconds() for t in trials if t.duration is not None]
        limit = 2 * max(durations, default=0.0) + 60
        now = time.time()
        running = [t for t in trials if t.state == TrialState.RUNNING and t.datetime_start
                   and now - t.datetime_start.timestamp() < limit]
        if not running:
            return
        log.info("waiting for %d trial(s) of other workers: %s", len(running),
                 [t.number for t in running])
        time.sleep(poll_s)


# --- after the search -----------------------------------------------------------------------

def baseline_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return next((t for t in complete if t.user_attrs.get("baseline")), None)


def final_run(ctx: Context, session: Session, role: str, values: Mapping[str, float | int],
              test_sets: Mapping[str, ImageSet]) -> tuple[dict[str, dict[str, float]], int]:
    """Retrain with the trial values `values` as a trial trains (keep-best on the validation
    cells), score each test set once; returns the scores and the kept epoch."""
    client = session.client
    run_id = client.create_run(session.experiment_id, run_name=f"final-{role}", tags={
        MLFLOW_PARENT_RUN_ID: session.parent_run_id, "role": f"final-{role}",
        "optuna_study": ctx.study_name, "architecture": ctx.arch,
        "protocol": ctx.params.tune.protocol,
    }).info.run_id
    client.log_batch(run_id, params=_params({
        **values, "lr_head": values["lr"] * values["head_lr_factor"], "epochs": ctx.train.epochs,
        "train_images": len(ctx.train_set),
    }))
    try:
        run = fit(ctx, values, on_epoch=lambda row, _: client.log_batch(
            run_id, metrics=_metrics(row, int(row["epoch"]))))
        client.log_metric(run_id, "best_epoch", run.kept_epoch)
        scores: dict[str, dict[str, float]] = {}
        for name, data in test_sets.items():
            r = evaluate(run.model, data.resized(run.spec.size), run.built.mean, run.built.std,
                         ctx.device, ctx.params.evaluate.batch_size,
                         amp_dtype(ctx.device, ctx.train.amp), tta=ctx.params.evaluate.tta)
            full = classification_metrics(r.labels, r.predictions, data.classes)
            scores[name] = {"n": int(full["n"]), **{m: float(full[m]) for m in SUMMARY_METRICS}}
            client.log_batch(run_id, metrics=[
                Metric(f"{name}_{m}", scores[name][m], int(time.time() * 1000), 0)
                for m in SUMMARY_METRICS])
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id, "FINISHED")
    log.info("%s final %s (%s; kept epoch %d): %s", ctx.study_name, role,
             ", ".join(f"{k} {v:.3g}" for k, v in values.items()), run.kept_epoch,
             ", ".join(f"{n} macro-F1 {s['f1_macro']:.3f}" for n, s in scores.items()))
    return scores, run.kept_epoch


def fmt(value: float) -> str:
    """4 significant digits, never in e-notation (YAML 1.1 reads `1e-05` as a string)."""
    return np.format_float_positional(float(f"{float(value):.4g}"), trim="-")


def apply_epochs(t: TrainParams, best_epoch: int) -> int:
    """`train.epochs` that reproduces the kept epoch of a trial of `t.epochs` epochs: the kept
    epoch itself where the learning rate does not depend on the number of epochs (paper
    recipe: constant; the first k epochs of a longer run are the same), else `t.epochs` (modern
    recipe: the cosine decay ends at the last epoch, so a shorter run decays faster and
    differs; keep-best then keeps epoch `best_epoch` of the train stage's run too)."""
    return int(best_epoch) if t.recipe != "modern" else int(t.epochs)


def apply_command(values: Mapping[str, float | int], arch: str | None = None) -> str:
    """`dvc exp run -S train.<key>=<value> ...` for each of `values` (the trial values and
    epochs), restricted to architecture `arch` when given."""
    line = "dvc exp run " + " ".join(f"-S train.{k}={fmt(v)}" for k, v in values.items())
    return line + (f" -S 'train.architectures=[{arch}]'" if arch else "")


def plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optuna's own figures (matplotlib backend); importances need >= 2 complete trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    folder.mkdir(parents=True, exist_ok=True)
    made = []
    figures = {"optimization_history": ov.plot_optimization_history,
               "intermediate_values": ov.plot_intermediate_values,
               "param_importances": ov.plot_param_importances}
    for name, plot in figures.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot(study)
            fig = np.ravel(ax)[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            fig.savefig(folder / f"{name}.png", dpi=110)
            plt.close(fig)
            made.append(folder / f"{name}.png")
        except Exception as exc:  # e.g. too few complete trials for importances
            log.warning("no %s plot: %s: %s", name, type(exc).__name__, exc)
            plt.close("all")
    return made


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: its settings and results (the DVC plot; no timings or run ids, which
    differ on every rerun: see `runs_record`)."""
    rows = [{"number": t.number, "state": t.state.name.lower(),
             **{k: t.params.get(k) for k in ("lr", "head_lr_factor", "weight_decay",
                                              "augment_strength")},
             OBJECTIVE: t.value, "best_epoch": t.user_attrs.get("best_epoch"),
             "epochs_run": len(t.intermediate_values),
             "baseline": bool(t.user_attrs.get("baseline"))}
            for t in study.get_trials(deepcopy=False)]
    return pd.DataFrame(rows)


def runs_record(study: optuna.Study, parent_run_id: str) -> dict[str, Any]:
    """The MLflow parent run and each trial's run id and duration (runs.json, beside the
    metrics rather than in them)."""
    return {"mlflow_parent_run_id": parent_run_id,
            "trials": [{"number": t.number, "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
                        "seconds": t.duration.total_seconds() if t.duration else None}
                       for t in study.get_trials(deepcopy=False)]}


def markdown(summary: Mapping[str, Any]) -> str:
    sets = list(summary["best"]["test"])
    head = ["settings", "trial", "lr", "head lr factor", "weight decay", "augmentation",
            "kept epoch", "val macro-F1"]
    for s in sets:
        head += [f"{s} accuracy", f"{s} macro-F1"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key, label in (("baseline", "untuned (paper)"), ("best", "tuned (best trial)")):
        row = summary[key]
        val = row["val_f1_macro"]
        cells = [label, str(row["trial"]), fmt(row["lr"]), fmt(row["head_lr_factor"]),
                 fmt(row["weight_decay"]) if "weight_decay" in row else "-",
                 f"x{fmt(row['augment_strength'])}", str(row["best_epoch"]),
                 "-" if val is None else f"{val:.3f}"]
        for s in sets:
            cells += [f"{row['test'][s]['accuracy']:.3f}", f"{row['test'][s]['f1_macro']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    n = summary["trials"]
    return (
        f"# Tuning {summary['architecture']} ({summary['protocol']} protocol)\n\n"
        f"Optuna study `{summary['study_name']}`: {n['total']} trials ({n['complete']} complete, "
        f"{n['pruned']} pruned, {n['failed']} failed), up to {summary['epochs']} epochs each. "
        f"Objective: macro-F1 on the {summary['val_images']} images of the leak-free validation "
        f"cells (in no training split) at the epoch keep-best keeps; the test sets were not "
        f"used in the search. Each row was then retrained as its trial was, on the "
        f"{summary['train_images']} training images, and scored once on each test set.\n\n"
        + "\n".join(lines) + "\n\n"
        f"Apply the tuned settings to the training stage:\n\n    {summary['apply']}\n"
    )


def finalise(ctx: Context, session: Session, test_sets: Mapping[str, ImageSet]) -> dict[str, Any]:
    """Best vs baseline: retrain both as their trials trained, test once, write outputs."""
    study, client, params = session.study, session.client, ctx.params
    wait_for_workers(study)
    try:
        best = study.best_trial
    except ValueError as exc:
        raise RuntimeError(f"study {ctx.study_name} has no complete trial to report") from exc
    base = baseline_trial(study)
    base_point = baseline_point(ctx)
    best_values, base_values = trial_values(ctx.train, best.params), trial_values(ctx.train, base_point)
    best_test, best_kept = final_run(ctx, session, "best", best_values, test_sets)
    best_epoch = int(best.user_attrs.get("best_epoch", best_kept))
    if best_values == base_values:
        base_test, base_kept = best_test, best_kept
    else:
        base_test, base_kept = final_run(ctx, session, "baseline", base_values, test_sets)
    base_epoch = int(base.user_attrs.get("best_epoch", base_kept)) if base else base_kept
    train = {**best_values, "epochs": apply_epochs(ctx.train, best_epoch)}

    states = [t.state for t in study.get_trials(deepcopy=False)]
    summary: dict[str, Any] = {
        "architecture": ctx.arch, "protocol": params.tune.protocol,
        "study_name": ctx.study_name, "storage": session.storage, "epochs": params.tune.epochs,
        "objective": f"{OBJECTIVE} (validation macro-F1 of the kept epoch)",
        "train_images": len(ctx.train_set), "fit_images": len(ctx.fit_set),
        "val_images": len(ctx.val_set),
        "trials": {"total": len(states), "complete": states.count(TrialState.COMPLETE),
                   "pruned": states.count(TrialState.PRUNED),
                   "failed": states.count(TrialState.FAIL),
                   "running": states.count(TrialState.RUNNING)},
        "best": {"trial": best.number, **best_values,
                 "augment_strength": float(best.params["augment_strength"]),
                 "best_epoch": best_epoch, "val_f1_macro": best.value, "test": best_test},
        "baseline": {"trial": base.number if base else None, **base_values,
                     "augment_strength": base_point["augment_strength"], "best_epoch": base_epoch,
                     "val_f1_macro": base.value if base else None, "test": base_test},
        "apply": apply_command(train),
    }
    out = params.resolve(params.tune.out_dir) / ctx.arch
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", markdown(summary))
    write_csv(out / "trials.csv", trials_frame(study))
    write_json(out / "runs.json", runs_record(study, session.parent_run_id))
    base_val = "n/a" if base is None else f"{base.value:.3f}"
    write_text(out / "best_params.yaml",
               f"# Best trial {best.number} of Optuna study {ctx.study_name}: validation "
               f"macro-F1 {best.value:.3f} at epoch {best_epoch} of {ctx.train.epochs} "
               f"(untuned baseline {base_val}; augmentation x{fmt(best.params['augment_strength'])})."
               f"\n# Train with it: {summary['apply']}\n"
               + yaml.safe_dump({"train": train}, sort_keys=False))
    figures = plots(study, out / "figures")

    run_id = session.parent_run_id
    client.log_batch(run_id, metrics=[
        Metric(k, float(v), int(time.time() * 1000), len(states)) for k, v in {
            **{f"best_{k}": v for k, v in best.params.items()}, "best_epoch": best_epoch,
            "best_val_f1_macro": best.value, "best_trial": best.number,
            **({"baseline_val_f1_macro": base.value} if base else {}),
            **{f"best_{s}_{m}": best_test[s][m] for s in best_test for m in SUMMARY_METRICS},
            **{f"baseline_{s}_{m}": base_test[s][m] for s in base_test for m in SUMMARY_METRICS},
        }.items()])
    for key, value in {**{f"best.{k}": fmt(v) for k, v in train.items()},
                       "best.trial": str(best.number), "apply": summary["apply"]}.items():
        client.set_tag(run_id, key, value)
    for file in (out / "summary.md", out / "summary.json", out / "best_params.yaml",
                 out / "trials.csv", out / "runs.json", *figures):
        client.log_artifact(run_id, str(file), artifact_path="tune")
    client.set_terminated(run_id, "FINISHED")
    return summary
