"""The Optuna stage through its real code: Optuna, MLflow (temporary SQLite store) and training
for real on a few dozen real mirror images at 32 px, 1-2 epochs per trial."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from wbc_transfer import cli, tracking
from wbc_transfer.config import ConfigError, Params, TrainParams, load_params
from wbc_transfer.stages import tune
from wbc_transfer.tuning import objective
from wbc_transfer.tuning import storage as tuning_storage
from wbc_transfer.tuning import study as tuning_study

from conftest import REPO_ROOT, prepare_tiny, terminate_when, write_params

ARCH = "efficientnet_lite0"


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> dict[str, Path]:
    """Prepared tensors (32 px) from real mirror images: paper train 8/class, validation
    2/class, paper test 3/class, TEST 3/class; one MLflow store for the module."""
    root = tmp_path_factory.mktemp("tune")
    prepared = root / "prepared"
    prepare_tiny(mirror, prepared, n_train=8, n_val=2, n_test=3, n_heldout_test=3)
    return {"prepared": prepared, "mlflow": root / "mlflow.db"}


def tune_params(repo: Path, tiny: dict[str, Path], **overrides) -> Params:
    settings = {
        "base.tracking_uri": f"sqlite:///{tiny['mlflow']}",
        "prepare.out_dir": str(tiny["prepared"]),
        "train.weights": "none", "train.num_threads": 1,
        "evaluate.max_per_class": None,
        "tune.protocol": "paper", "tune.trials": 3, "tune.epochs": 2,
        "tune.storage": "sqlite:///optuna.db",
        "tune.pruner.name": "none",
    }
    settings.update(overrides)
    return load_params(write_params(repo, "unused", **settings))


def runs_of(params: Params, parent_run_id: str) -> list:
    client = MlflowClient(tracking.tracking_uri(params))
    experiment = client.get_experiment_by_name(params.base.experiment)
    return client.search_runs([experiment.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def trial_runs(params: Params, parent_run_id: str) -> dict[int, object]:
    return {int(r.data.tags["trial_number"]): r for r in runs_of(params, parent_run_id)
            if r.data.tags.get("role") == "trial"}


# --- configuration: fails before any training -----------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    ({"tune.space.lr_low": -0.001}, r"tune\.space\.lr_low must be > 0"),
    ({"tune.space.lr_low": 0.1, "tune.space.lr_high": 0.001},
     r"tune\.space\.lr_low \(0\.1\) must not exceed tune\.space\.lr_high \(0\.001\)"),
    ({"tune.space.head_lr_factor_low": 50, "tune.space.head_lr_factor_high": 5},
     r"tune\.space\.head_lr_factor_low .* inverted"),
    ({"tune.trials": 0}, r"tune\.trials must be a whole number >= 1, got 0"),
    ({"tune.space.weight_decay_low": 0.5, "tune.space.weight_decay_high": 0.01},
     r"tune\.space\.weight_decay_low .* inverted"),
    ({"tune.space.augment_strength": [0.5, 2.0]}, r"tune\.space\.augment_strength must include 1\.0"),
    ({"tune.epochs": 0}, r"tune\.epochs must be"),
    ({"tune.space.lr_high": "abc"}, r"tune\.space\.lr_high must be a number, got .abc."),
    ({"tune.pruner.name": "hyperband"}, r"tune\.pruner\.name"),
    ({"tune.storage": "optuna.db"}, r"tune\.storage must be"),
])
def test_bad_tune_params_are_refused_naming_the_parameter(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_params(write_params(tmp_path, "unused", **overrides))


def test_bad_search_space_stops_the_cli_before_any_study(tmp_path, capsys):
    file = write_params(tmp_path, "unused", **{"tune.space.lr_low": 0.5,
                                                "tune.space.lr_high": 0.01})
    assert cli.main(["--params", str(file), "tune", "--arch", ARCH]) == 2
    assert "tune.space.lr_low (0.5) must not exceed" in capsys.readouterr().err
    assert not (tmp_path / "optuna.db").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_storage_urls_resolve_at_the_repo_root(tmp_path, monkeypatch):
    def url(storage):
        return tuning_storage.storage_url(load_params(write_params(tmp_path, "x", **{
            "tune.storage": storage})))

    assert url(None) == f"sqlite:///{tmp_path / 'optuna.db'}"
    assert url("sqlite:///optuna.db") == f"sqlite:///{tmp_path / 'optuna.db'}"
    assert url("sqlite:////abs/o.db") == "sqlite:////abs/o.db"
    assert url("journal:./runs/journal.log") == f"journal:{tmp_path / 'runs/journal.log'}"
    assert url("postgresql://u:secret@db/optuna") == "postgresql://u:secret@db/optuna"
    assert tuning_storage.public_url("postgresql://u:secret@db/optuna") == "postgresql://***@db/optuna"
    exp_copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc"  # dvc exp run --temp
    assert tuning_storage.storage_url(load_params(write_params(exp_copy, "x"))) == \
        f"sqlite:///{tmp_path / 'optuna.db'}"
    monkeypatch.setenv("OPTUNA_STORAGE", "sqlite:////elsewhere.db")
    assert url(None) == "sqlite:////elsewhere.db"


def test_tune_pipeline_is_not_part_of_the_default_dvc_repro():
    default = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    assert not any(name.startswith("tune") for name in default["stages"])
    separate = yaml.safe_load((REPO_ROOT / "tune" / "dvc.yaml").read_text())
    stage = separate["stages"]["tune"]
    assert stage["foreach"] == "${tune.architectures}"
    assert stage["do"]["wdir"] == ".."
    assert stage["do"]["cmd"] == "wbc-transfer tune --arch ${item}"


def test_tune_stage_depends_on_every_train_param_a_trial_reads():
    """(Its code deps: tests/test_pipeline_deps.py.)"""
    stage = yaml.safe_load((REPO_ROOT / "tune" / "dvc.yaml").read_text())["stages"]["tune"]["do"]
    read = {f"train.{name}" for name in TrainParams.model_fields} - {
        f"train.{k}" for k in objective.NOT_IN_TRIAL}
    assert {p for p in stage["params"] if p.startswith("train.")} == read


def write_study_results(repo: Path, studies: dict[str, tuple[float, float]]) -> None:
    """results/tune/<arch>/ as the tune stage writes them: {arch: (validation macro-F1, lr)}."""
    for arch, (value, lr) in studies.items():
        folder = repo / "results" / "tune" / arch
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"best": {"val_f1_macro": value}}))
        (folder / "best_params.yaml").write_text(yaml.safe_dump({"train": {
            "lr": lr, "head_lr_factor": 3.0, "weight_decay": 0.01, "colour_jitter": 0.15,
            "hed_jitter": 0.0, "translate_px": 45, "epochs": 3}}, sort_keys=False))


def test_apply_names_the_architecture_whose_study_won(tmp_path, capsys):
    write_params(tmp_path, "unused", **{
        "tune.architectures": ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]})
    write_study_results(tmp_path, {"efficientnet_lite0": (0.61, 0.001),
                                   "efficientnet_lite1": (0.72, 0.002)})
    assert cli.main(["--params", str(tmp_path / "params.yaml"), "tune", "--apply"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "# efficientnet_lite2: no " in printed[2]
    assert printed[-2] == "# best of the 2 tuned architectures on validation: efficientnet_lite1"
    assert printed[-1] == ("dvc exp run -S train.lr=0.002 -S train.head_lr_factor=3 "
                           "-S train.weight_decay=0.01 -S train.colour_jitter=0.15 "
                           "-S train.hed_jitter=0 -S train.translate_px=45 -S train.epochs=3 "
                           "-S 'train.architectures=[efficientnet_lite1]'")


def test_apply_settings_are_the_winners_options_without_the_proxys_epochs(tmp_path, capsys):
    """`tune --apply --settings` is what the Makefile's TUNED reads for `make best`."""
    write_params(tmp_path, "unused", **{
        "tune.architectures": ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]})
    write_study_results(tmp_path, {"efficientnet_lite0": (0.81, 0.001),
                                   "efficientnet_lite2": (0.72, 0.002)})
    argv = ["--params", str(tmp_path / "params.yaml"), "tune", "--apply", "--settings"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [
        "-S train.lr=0.001 -S train.head_lr_factor=3 -S train.weight_decay=0.01 "
        "-S train.colour_jitter=0.15 -S train.hed_jitter=0 -S train.translate_px=45 "
        "-S 'train.architectures=[efficientnet_lite0]'"]


def test_apply_settings_without_a_study_or_with_arch_are_refused(tmp_path, capsys):
    write_params(tmp_path, "unused")
    argv = ["--params", str(tmp_path / "params.yaml"), "tune", "--apply", "--settings"]
    assert cli.main(argv) != 0
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing a Makefile could take for settings
    assert "no tuned study in" in captured.err and "run `dvc repro tune/dvc.yaml`" in captured.err
    write_study_results(tmp_path, {"efficientnet_lite0": (0.81, 0.001)})
    assert cli.main([*argv, "--arch", "efficientnet_lite0"]) != 0
    assert "--settings goes with --apply and without --arch" in capsys.readouterr().err
    assert cli.main(argv[:-2] + ["--settings"]) != 0
    assert "--settings goes with --apply" in capsys.readouterr().err
    # --apply alone: nothing studied is an error too; an architecture outside the list is named
    write_params(tmp_path / "none", "unused")
    assert cli.main(["--params", str(tmp_path / "none" / "params.yaml"), "tune", "--apply"]) == 2
    assert "no tuned study in" in capsys.readouterr().err
    assert cli.main([*argv[:-1], "--arch", "nosuch"]) == 2
    assert "tune --arch nosuch: not one of tune.architectures" in capsys.readouterr().err


def test_apply_for_one_architecture_restricts_the_line_to_it(tmp_path, capsys):
    """Without `train.architectures=[<arch>]` the printed line trained params.yaml's own
    architectures with another architecture's tuned values."""
    write_params(tmp_path, "unused")
    write_study_results(tmp_path, {"efficientnet_lite2": (0.8, 0.003)})
    argv = ["--params", str(tmp_path / "params.yaml"), "tune", "--apply"]
    assert cli.main([*argv, "--arch", "efficientnet_lite2"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(
        "-S train.epochs=3 -S 'train.architectures=[efficientnet_lite2]'")


def test_a_trial_killed_after_its_run_was_closed_as_pruned_ends_failed_in_both(tmp_path):
    """The race of a SIGKILL between the worker closing its MLflow run (pruned: KILLED) and
    telling Optuna: Optuna fails the trial, so its run must say failed too, not pruned."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("e")
    runs = {}
    for state in ("pruned", "complete", "failed", "running"):
        trial = study.ask()
        run_id = client.create_run(experiment, tags={"trial_state": state}).info.run_id
        if state != "running":
            client.set_terminated(run_id, objective.MLFLOW_STATUS[state])
        trial.set_user_attr("mlflow_run_id", run_id)
        study.tell(trial, state=TrialState.FAIL)  # the rerun found its process gone
        runs[state] = run_id
    done = study.ask()
    done_run = client.create_run(experiment, tags={"trial_state": "complete"}).info.run_id
    client.set_terminated(done_run, "FINISHED")
    done.set_user_attr("mlflow_run_id", done_run)
    study.tell(done, 0.5)
    tuning_study.close_dead_trials(objective.Session(study, client, experiment, "", "sqlite"))
    for state, run_id in runs.items():
        run = client.get_run(run_id)
        assert (run.info.status, run.data.tags["trial_state"]) == ("FAILED", "failed"), state
    assert client.get_run(done_run).info.status == "FINISHED"  # a told trial keeps its run


# --- the study --------------------------------------------------------------------------------

@pytest.mark.slow
def test_stage_searches_then_reports_best_and_baseline_on_the_tests(tmp_path, tiny, capsys):
    params = tune_params(tmp_path, tiny)
    summary = tune.main(params, arch=ARCH)

    out = tmp_path / "results" / "tune" / ARCH
    assert summary["trials"] == {"total": 3, "complete": 3, "pruned": 0, "failed": 0,
                                 "running": 0}
    assert summary["baseline"]["trial"] == 0
    assert (summary["baseline"]["lr"], summary["baseline"]["head_lr_factor"]) == (1e-4, 10.0)
    assert summary["best"]["val_f1_macro"] >= summary["baseline"]["val_f1_macro"]
    for row in ("best", "baseline"):
        assert set(summary[row]["test"]) == {"paper_test", "TEST"}
        assert summary[row]["test"]["paper_test"]["n"] == 12
    assert summary["val_images"] == 8 and summary["fit_images"] == 32  # validation: its own cells
    best = yaml.safe_load((out / "best_params.yaml").read_text())["train"]
    assert best["lr"] == pytest.approx(summary["best"]["lr"], rel=1e-3)
    assert "| untuned (paper) | 0 | 0.0001 | 10 |" in (out / "summary.md").read_text()
    assert {p.name for p in (out / "figures").iterdir()} >= {
        "optimization_history.png", "param_importances.png"}
    assert len(pd.read_csv(out / "trials.csv")) == 3

    client = MlflowClient(tracking.tracking_uri(params))
    assert "mlflow_parent_run_id" not in summary and "mlflow_run_id" not in pd.read_csv(
        out / "trials.csv").columns  # run ids live in runs.json, not in DVC's metrics/plots
    runs = json.loads((out / "runs.json").read_text())
    assert [t["number"] for t in runs["trials"]] == [0, 1, 2]
    parent = client.get_run(runs["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["optuna_study"] == summary["study_name"]
    best_val = summary["best"]["val_f1_macro"]
    assert parent.data.metrics["best_val_f1_macro"] == pytest.approx(best_val)
    assert parent.data.params["space.lr_low"] == "1e-05"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert {"tune/optimization_history.png", "tune/param_importances.png",
            "tune/best_params.yaml", "tune/summary.md"} <= artifacts
    trials = trial_runs(params, parent.info.run_id)
    assert sorted(trials) == [0, 1, 2]
    for run in trials.values():
        assert run.data.tags["trial_state"] == "complete"
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "val_f1_macro")
        assert [m.step for m in history] == [1, 2]
    assert trials[0].data.tags["baseline"] == "true"
    assert trials[0].data.params["lr"] == "0.0001"
    roles = {r.data.tags["role"] for r in runs_of(params, parent.info.run_id)}
    assert {"final-best"} <= roles  # final-baseline too unless the baseline won

    capsys.readouterr()
    assert cli.main(["--params", str(tmp_path / "params.yaml"), "tune", "--apply"]) == 0
    printed = capsys.readouterr().out
    assert f"-S train.lr={objective.fmt(best['lr'])} -S train.head_lr_factor=" in printed


@pytest.mark.slow
def test_pruned_trial_is_recorded_as_pruned(tmp_path, tiny):
    # a threshold above any macro-F1 prunes every trial after its first epoch, except the
    # baseline (trial 0), which is never pruned
    params = tune_params(tmp_path, tiny, **{
        "tune.trials": 2, "tune.pruner.name": "threshold", "tune.pruner.threshold": 1.01,
        "tune.pruner.n_warmup_steps": 0})
    ctx = objective.load_context(params, ARCH)
    session = tuning_study.search(ctx)
    states = [t.state for t in session.study.trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED]
    trials = trial_runs(params, session.parent_run_id)
    assert trials[0].data.tags["trial_state"] == "complete"
    assert trials[1].data.tags["trial_state"] == "pruned"
    assert trials[1].info.status == "KILLED"
    client = MlflowClient(tracking.tracking_uri(params))
    assert [m.step for m in client.get_metric_history(trials[1].info.run_id, "val_f1_macro")] == [1]


@pytest.mark.slow
def test_interrupted_study_resumes_and_continues_the_trial_count(tmp_path, tiny, monkeypatch):
    params = tune_params(tmp_path, tiny, **{"tune.epochs": 1})
    original, calls = objective.fit, []

    def fit_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated Ctrl-C in trial 1")
        return original(*args, **kwargs)

    monkeypatch.setattr(objective, "fit", fit_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        tuning_study.search(objective.load_context(params, ARCH))
    monkeypatch.setattr(objective, "fit", original)

    first = tuning_study.open_study(objective.load_context(params, ARCH))
    assert [t.state for t in first.study.trials] == [TrialState.COMPLETE, TrialState.FAIL]
    client = MlflowClient(tracking.tracking_uri(params))
    assert client.get_run(first.parent_run_id).info.status == "FAILED"
    assert trial_runs(params, first.parent_run_id)[1].data.tags["trial_state"] == "failed"

    session = tuning_study.search(objective.load_context(params, ARCH))  # a fresh process would do this
    assert session.parent_run_id == first.parent_run_id  # the same study and parent run
    states = [t.state for t in session.study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE,
                      TrialState.COMPLETE]  # 3 counted trials; the failed one was redone
    trials = session.study.trials
    assert trials[2].params != trials[1].params  # the resumed sampler does not redraw them
    assert sorted(trial_runs(params, session.parent_run_id)) == [0, 1, 2, 3]
    assert tuning_study.search(objective.load_context(params, ARCH)).study.trials[-1].number == 3


@pytest.mark.slow
def test_sigterm_fails_the_running_trial_and_the_parent_run(tmp_path, tiny):
    """A real `wbc-transfer tune` process gets SIGTERM during trial 1: its MLflow runs end
    FAILED (they stayed RUNNING forever), the Optuna trial FAIL, and the rerun continues."""
    # 8 epochs, as below: with 2 a fast machine (CI) finished trial 1 between two polls
    params = tune_params(tmp_path, tiny, **{"tune.epochs": 8})
    tracking.setup(params)
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI",
                                                              "OPTUNA_STORAGE"}}
    proc = subprocess.Popen([sys.executable, "-m", "wbc_transfer.cli", "--params",
                             str(tmp_path / "params.yaml"), "tune", "--arch", ARCH],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = MlflowClient(tracking.tracking_uri(params))
    experiment = client.get_experiment_by_name(params.base.experiment).experiment_id
    started_ms = int(time.time() * 1000)  # the module's store holds other tests' runs too
    running, output = terminate_when(proc, lambda: client.search_runs(
        [experiment], f"tags.trial_number = '1' AND attributes.status = 'RUNNING' "
                      f"AND attributes.start_time >= {started_ms}"), "trial 1 running")
    assert proc.returncode == 128 + signal.SIGTERM, output
    parent = client.get_run(running[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED"
    trials = trial_runs(params, parent.info.run_id)
    assert trials[0].info.status == "FINISHED"
    assert trials[1].info.status == "FAILED" and trials[1].data.tags["trial_state"] == "failed"
    session = tuning_study.open_study(objective.load_context(params, ARCH))
    assert [t.state for t in session.study.trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert session.parent_run_id == parent.info.run_id  # a rerun continues the same study


@pytest.mark.slow
def test_sigkill_mid_trial_then_rerun_fails_that_trial_and_runs_the_study_to_its_count(
        tmp_path, tiny, caplog):
    """`kill -KILL` on the tune stage during trial 1, rerun at once: the killed trial stayed
    RUNNING (its heartbeat was still fresh), the rerun waited ~50 s for "other workers" and
    exited 0 with 2 of 3 trials. Now the trial whose process is gone is failed at once and
    redone with the same params; the study ends with tune.trials finished trials."""
    # 8 epochs: a trial lasts seconds, so the 0.5 s poll sees trial 1 RUNNING (with 2 epochs a
    # quiet machine finished it in 0.8 s, unseen)
    params = tune_params(tmp_path, tiny, **{"tune.epochs": 8})
    tracking.setup(params)
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI",
                                                              "OPTUNA_STORAGE"}}
    args = ["--params", str(tmp_path / "params.yaml"), "tune", "--arch", ARCH]
    proc = subprocess.Popen([sys.executable, "-m", "wbc_transfer.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = MlflowClient(tracking.tracking_uri(params))
    experiment = client.get_experiment_by_name(params.base.experiment).experiment_id
    started_ms = int(time.time() * 1000)
    running, output = terminate_when(proc, lambda: client.search_runs(
        [experiment], f"tags.trial_number = '1' AND attributes.status = 'RUNNING' "
                      f"AND attributes.start_time >= {started_ms}"), "trial 1 running",
        signum=signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, output
    with caplog.at_level(logging.INFO, logger="wbc_transfer"):
        assert cli.main(args) == 0
    assert "waiting for" not in caplog.text  # no trial of a live worker to wait for
    ctx = objective.load_context(params, ARCH)
    study = optuna.load_study(study_name=ctx.study_name,
                              storage=tuning_storage.open_storage(tuning_storage.storage_url(params)))
    trials = study.get_trials()
    assert trials[1].state == TrialState.FAIL
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(finished) == 3 and not [t for t in trials if t.state == TrialState.RUNNING]
    [retry] = [t for t in finished if t.system_attrs.get("failed_trial") == 1]
    assert retry.params == trials[1].params  # redone with the same settings
    assert client.get_run(running[0].info.run_id).info.status == "FAILED"


@pytest.mark.slow
def test_two_workers_share_one_study_without_losing_or_duplicating_trials(tmp_path, tiny):
    params = tune_params(tmp_path, tiny, **{
        "tune.trials": 4, "tune.epochs": 1, "tune.storage": "journal:optuna-journal.log"})
    tracking.setup(params)  # the experiment exists before the workers start
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI",
                                                              "OPTUNA_STORAGE"}}
    command = [sys.executable, "-m", "wbc_transfer.cli", "--params",
               str(tmp_path / "params.yaml"), "tune", "--arch", ARCH, "--worker"]
    workers = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=240)[0] for w in workers]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output

    ctx = objective.load_context(params, ARCH)
    study = optuna.load_study(study_name=ctx.study_name,
                              storage=tuning_storage.open_storage(tuning_storage.storage_url(params)))
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sum(bool(t.user_attrs.get("baseline")) for t in trials) == 1
    runs = trial_runs(params, study.user_attrs[tuning_study.PARENT_ATTR])
    assert sorted(runs) == [0, 1, 2, 3]  # one MLflow run per trial, all under one parent
    assert {r.data.tags["trial_state"] for r in runs.values()} == {"complete"}
    assert {r.info.run_id for r in runs.values()} == {t.user_attrs["mlflow_run_id"]
                                                       for t in trials}
    print("trials per worker:", pd.Series([r.data.tags["worker"] for r in runs.values()])
          .value_counts().to_dict())


def test_a_proxy_study_trains_on_at_most_train_per_class_images_of_each_class(tmp_path, tiny):
    """tune.train_per_class: trials train on a per-class sample of the training split (the
    same one every trial), validated on all the validation cells; another study than the
    whole split's."""
    whole = objective.load_context(tune_params(tmp_path / "whole", tiny), ARCH)
    proxy = objective.load_context(tune_params(tmp_path / "proxy", tiny,
                                               **{"tune.train_per_class": 5}), ARCH)
    assert torch.bincount(proxy.fit_set.labels).tolist() == [5, 5, 5, 5]
    assert set(proxy.fit_set.paths) < set(whole.fit_set.paths) == set(proxy.train_set.paths)
    assert proxy.val_set.paths == whole.val_set.paths
    assert proxy.study_name != whole.study_name
    again = objective.load_context(tune_params(tmp_path / "again", tiny,
                                               **{"tune.train_per_class": 5}), ARCH)
    assert again.fit_set.paths == proxy.fit_set.paths and again.study_name == proxy.study_name
