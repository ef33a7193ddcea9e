"""The study: create it or join/resume it (one creator enqueues the baseline and the MLflow
parent run), run this process's share of the trials, wait for other workers, fail the trials
of dead ones."""

from __future__ import annotations

import logging
import time
import warnings

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from wbc_transfer import tracking
from wbc_transfer.config import Params
from wbc_transfer.training import trainer as training
from wbc_transfer.tuning.objective import (
    MLFLOW_STATUS,
    OWNER_ATTR,
    Context,
    Session,
    make_objective,
    run_params,
    training_code_digest,
)
from wbc_transfer.tuning.storage import MAX_RETRY, open_storage, public_url, storage_url

log = logging.getLogger(__name__)

#: trial states that count towards `tune.trials` (running ones too, so that concurrent workers
#: stop at exactly `tune.trials`); failed trials do not count and are redone
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
PARENT_ATTR = "mlflow_parent_run_id"
MAX_ROUNDS = 3  # search: rounds of (run the remaining trials, wait for other workers)


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
    session.client.log_batch(run_id, params=run_params({
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
    close their MLflow runs to match: every failed trial's run says failed, also one that its
    worker closed as complete or pruned just before it was killed, before it told Optuna."""
    fail_orphaned_trials(session.study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(session.study)
    for trial in session.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = trial.user_attrs.get("mlflow_run_id")
        if _run_exists(session.client, run_id) and \
                session.client.get_run(run_id).data.tags.get("trial_state") != "failed":
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
