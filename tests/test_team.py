"""A team's setup end to end: MLflow tracking server on PostgreSQL with proxied artifacts,
Optuna workers on one PostgreSQL storage, a DVC remote, DVC's experiment queue.

One tiny copy of this repository (its git-tracked files, a tiny params.yaml, a tiny real copy of
the Kaggle layout imported by `data.dvc` from `../shared/data/blood-cells` as in the real repo)
runs `dvc repro` against a real `mlflow server` (PostgreSQL backend, `--serve-artifacts`); the
other tests build on it. PostgreSQL and the MLflow server: tests/team_services.py.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from wbc_transfer.config import load_params
from wbc_transfer.training import threads
from wbc_transfer.tuning import objective
from wbc_transfer.tuning import storage as tuning_storage
from wbc_transfer.tuning import study as tuning_study

from conftest import REPO_ROOT, write_params
from team_services import Postgres, start_mlflow_server, start_postgres

pytestmark = pytest.mark.slow
ARCH = "efficientnet_lite0"
TINY = {  # the whole pipeline in about a minute on 2 cores
    "train.architectures": [ARCH], "train.protocols": ["heldout"], "train.epochs": 1,
    "prepare.image_size": 32, "evaluate.max_per_class": 3, "compare.bootstrap": 20,
    "split.heldout.train_per_class": 8, "split.paper.per_class": 8,
    "promote.protocols": ["heldout"],
    "tune.architectures": [ARCH], "tune.protocol": "heldout", "tune.epochs": 2, "tune.trials": 4,
    "tune.heartbeat_s": 2,
    # every trial but the baseline is pruned after its first epoch: pruning, deterministically
    "tune.pruner.name": "threshold", "tune.pruner.threshold": 1.01, "tune.pruner.n_warmup_steps": 0,
}


def sh(command: list[str] | str, cwd: Path, env: dict[str, str], timeout: float = 300,
       check: bool = True) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, shell=isinstance(command, str))
    if check and done.returncode != 0:
        pytest.fail(f"{command} exited {done.returncode} in {cwd}:\n"
                    f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def postgres() -> Postgres:
    pg = start_postgres()
    yield pg
    pg.stop()


@pytest.fixture(scope="module")
def server(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("mlflow-server")
    artifacts = root / "artifacts"
    artifacts.mkdir()
    proc, url = start_mlflow_server(postgres.create_database("mlflow"), artifacts,
                                    root / "server.log")
    yield {"url": url, "artifacts": artifacts, "log": root / "server.log"}
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory, kaggle_copy, server) -> dict[str, object]:
    """work/repo (a git + DVC repo, `dvc repro` done against the server) beside
    work/shared/data/blood-cells (its data.dvc import source, relative as in the real repo)."""
    work = tmp_path_factory.mktemp("team")
    kaggle_copy(work / "shared/data/blood-cells", train_per_class=24, test_per_class=4)
    repo = work / "repo"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = REPO_ROOT / name
        if source.is_file() and not name.startswith(("results/", "bench/out/")):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)
    write_params(repo, "data/blood-cells", **TINY)
    (repo / "dvc.lock").unlink()
    # the tune pipeline is run here by its command, not by DVC: without it, `dvc pull` would ask
    # for the committed study's figures (tune/dvc.lock), which this tiny cache never had
    shutil.rmtree(repo / "tune")
    (repo / "data.dvc").unlink()
    (repo / "tecom.dvc").unlink()  # the other labs' sets: params `external` is empty here
    (repo / "pbc.dvc").unlink()
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "OPTUNA_STORAGE",
                                                          "WBC_PROCESSES"}}
    env.update(MLFLOW_TRACKING_URI=str(server["url"]), WBC_TRAINERS_DIR=str(work / "trainers"),
               TORCH_HOME=str(work / "torch-home"), https_proxy="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t", DVC_NO_ANALYTICS="1")
    # data/ is git-ignored, so DVC will not write data/blood-cells.dvc: import beside, then move
    sh("git init -q -b main && dvc import-url -q ../shared/data/blood-cells imported", repo, env)
    moved_import(repo / "imported.dvc", repo / "data.dvc")
    shutil.rmtree(repo / "imported")
    shutil.copy2(REPO_ROOT / ".gitignore", repo / ".gitignore")  # without DVC's `/imported`
    sh("dvc unfreeze data.dvc", repo, env)
    sh(["dvc", "repro"], repo, env, timeout=600)
    sh("git add -A && git commit -qm tiny", repo, env)
    return {"work": work, "repo": repo, "env": env, "server": server}


def moved_import(generated: Path, target: Path) -> None:
    """Move an import's .dvc file up to the repo root (paths rewritten), as data.dvc is."""
    spec = yaml.safe_load(generated.read_text())
    spec.pop("md5", None)  # the stage checksum of the old paths; DVC writes the new one
    spec["deps"][0]["path"] = "../shared/data/blood-cells"
    spec["outs"][0]["path"] = "data/blood-cells"
    target.write_text(yaml.safe_dump(spec, sort_keys=False))
    generated.unlink()


def client_of(team: dict) -> MlflowClient:
    return MlflowClient(str(team["server"]["url"]))


def test_pipeline_runs_on_the_postgres_tracking_server_and_predict_needs_no_artifact_folder(team):
    repo, client = team["repo"], client_of(team)
    experiment = client.get_experiment_by_name("wbc-transfer")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server
    assert not (repo / "mlflow.db").exists() and not (repo / "mlruns").exists()  # nothing local
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.dvc_stage = 'train@{ARCH}-heldout-42'")
    assert [r.info.status for r in runs] == ["FINISHED"]
    run = runs[0]
    assert run.data.params["thread_policy"] == "live trainers"
    assert run.data.params["sharing_processes"] == "1"  # alone on the machine: every core
    assert run.data.params["torch_threads"] == str(threads.CORES)
    assert "TEST_f1_macro" in run.data.metrics and "torch_threads" in run.data.metrics
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    version = client.get_model_version_by_alias("wbc-classifier", "champion")
    assert version.run_id == run.info.run_id

    # Classify through the registry alias from a process that cannot see the server's
    # artifact folder: a private mount namespace with an empty tmpfs over it, another cwd/HOME.
    elsewhere = team["work"] / "client"
    (elsewhere / "home").mkdir(parents=True)
    images = sorted((team["work"] / "shared/data/blood-cells").rglob("TEST/*/*.jpeg"))[:3]
    artifacts = team["server"]["artifacts"]
    predict = (f"mount -t tmpfs none {artifacts} && test -z \"$(ls -A {artifacts})\" && "
               f"exec wbc-transfer predict {' '.join(map(str, images))} "
               f"--model models:/wbc-classifier@champion")
    env = {**team["env"], "HOME": str(elsewhere / "home")}
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", predict],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, ("predict without the artifact folder failed (unshare needs root "
                                  f"or CAP_SYS_ADMIN):\n{done.stdout}\n{done.stderr[-3000:]}")
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [Path(r["path"]).name for r in rows] == [p.name for p in images]
    assert all(r["predicted"] in {"EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"} and
               not r["error"] for r in rows)
    assert any(artifacts.rglob("MLmodel"))  # the model lives only on the server's side


def test_tuning_workers_share_one_postgres_study_and_a_killed_workers_trial_is_redone(
        team, postgres):
    """Two real worker processes on one PostgreSQL Optuna storage, MLflow on the server; one is
    SIGKILLed in the middle of a trial; after both stopped, the stage resumes the study."""
    repo, client = team["repo"], client_of(team)
    env = {**team["env"], "OPTUNA_STORAGE": postgres.create_database("optuna")}
    command = ["wbc-transfer", "tune", "--arch", ARCH, "--worker"]
    first = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    experiment = client.get_experiment_by_name("wbc-transfer").experiment_id
    deadline = time.monotonic() + 180
    victim = None
    while victim is None and time.monotonic() < deadline and first.poll() is None:
        found = client.search_runs([experiment], "tags.role = 'trial' AND tags.trial_state = "
                                   f"'running' AND tags.worker LIKE '%:{first.pid}'")
        victim = found[0] if found and found[0].data.tags["trial_number"] != "0" else None
        time.sleep(0.1)
    second = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    if victim is None:
        first.kill()
        pytest.fail(f"no trial of worker 1 seen running:\n{first.communicate()[0][-3000:]}")
    first.send_signal(signal.SIGKILL)
    first.wait()
    output = second.communicate(timeout=300)[0]
    assert second.returncode == 0, output
    time.sleep(4 * TINY["tune.heartbeat_s"] + 1)  # the dead worker's heartbeat expires
    sh(["wbc-transfer", "tune", "--arch", ARCH], repo, env, timeout=300)  # resumes, then reports

    params = load_params(repo / "params.yaml")
    ctx = objective.load_context(params, ARCH)
    study = optuna.load_study(study_name=ctx.study_name,
                              storage=tuning_storage.open_storage(env["OPTUNA_STORAGE"]))
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(len(trials)))  # none lost, none twice
    states = [t.state for t in trials]
    killed = int(victim.data.tags["trial_number"])
    assert trials[killed].state == TrialState.FAIL
    assert states.count(TrialState.FAIL) == 1
    redone = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(redone) == 1 and redone[0].params == trials[killed].params  # same point, redone
    assert redone[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert sum(s in tuning_study.COUNTED for s in states) == TINY["tune.trials"]
    assert states.count(TrialState.PRUNED) >= 2 and states[0] == TrialState.COMPLETE  # baseline
    parent = study.user_attrs[tuning_study.PARENT_ATTR]
    nested = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")
    by_number = {int(r.data.tags["trial_number"]): r for r in nested
                 if r.data.tags.get("role") == "trial"}
    assert sorted(by_number) == [t.number for t in trials]  # every trial nested under one parent
    run = by_number[killed]  # the killed worker's run was closed as failed, also when SIGKILL fell
    # between the worker closing it as pruned and telling Optuna (test_tune: ..._ends_failed_in_both)
    assert (run.info.status, run.data.tags.get("trial_state")) == ("FAILED", "failed"), run.info
    assert client.get_run(parent).info.status == "FINISHED"
    assert (repo / "results/tune" / ARCH / "summary.md").is_file()
    assert {r.data.params["thread_policy"] for r in by_number.values()
            if r.data.tags["worker"].endswith(f":{second.pid}")} == {"live trainers"}


@pytest.fixture(scope="module")
def published(team) -> dict[str, object]:
    """The tiny repo pushed to a bare git remote and a local-folder DVC remote, then cloned
    beside it (so that the clone's data.dvc source `../shared/...` exists too) and pulled."""
    work, repo, env = team["work"], team["repo"], team["env"]
    sh(f"git init -q --bare {work / 'origin.git'} && dvc remote add -d store {work / 'dvc-store'}"
       f" && git commit -qam 'DVC remote' && git remote add origin {work / 'origin.git'} && "
       "git push -q origin main && dvc push -q", repo, env)
    clone = work / "clone"
    sh(f"git clone -q -b main {work / 'origin.git'} {clone}", work, env)
    sh("dvc pull -q", clone, env)
    return {**team, "clone": clone}


def test_fresh_clone_pulls_every_stage_up_to_date_with_its_figures(published):
    clone, env = published["clone"], published["env"]
    # `weights` is always_changed by design (it looks at $TORCH_HOME every time); nothing else
    status = sh(["dvc", "status"], clone, env)
    assert status.split() == ["weights:", "always", "changed"], status
    repro = sh(["dvc", "repro"], clone, env)
    ran = [line for line in repro.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'weights':"], repro  # its output unchanged: nothing after it
    assert list((clone / "results/compare_figures").glob("*.png"))
    assert (clone / f"results/train/{ARCH}-heldout-42/model.pt").is_file()
    assert list((clone / f"results/eval/{ARCH}-heldout-42/figures").glob("*.png"))


def test_two_queued_experiments_run_without_freezing_the_import_then_push_and_pull(published):
    repo, clone, env = published["repo"], published["clone"], published["env"]
    for name, lr in (("lr-a", "0.002"), ("lr-b", "0.003")):
        sh(["dvc", "exp", "run", "--queue", "--allow-missing", "-n", name, "-S", f"train.lr={lr}"],
           repo, env)
    sh(["dvc", "queue", "start", "-j", "2"], repo, {**env, threads.PROCESSES_ENV: "2"})
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            status = sh(["dvc", "queue", "status"], repo, env)
            if "Queued" not in status and "Running" not in status:
                break
            time.sleep(2)
    finally:
        sh(["dvc", "queue", "stop", "--kill"], repo, env, check=False)
    assert status.count("Success") == 2, status + sh(["dvc", "queue", "logs", "lr-a"], repo, env,
                                                     check=False)
    assert yaml.safe_load((repo / "data.dvc").read_text()).get("frozen") is None  # not frozen
    runs = client_of(published).search_runs(
        [client_of(published).get_experiment_by_name("wbc-transfer").experiment_id],
        f"tags.dvc_stage = 'train@{ARCH}-heldout-42' AND params.lr != '0.001'")
    assert sorted(r.data.params["lr"] for r in runs) == ["0.002", "0.003"]
    assert {r.data.params["thread_policy"] for r in runs} == {f"env {threads.PROCESSES_ENV}"}
    assert {r.data.params["torch_threads"] for r in runs} == {str(threads.threads_for(2))}

    sh(["dvc", "exp", "push", "origin", "lr-a"], repo, env)
    sh(["dvc", "exp", "pull", "origin", "lr-a"], clone, env)
    assert "lr-a" in sh(["dvc", "exp", "list", "--name-only"], clone, env)
    sh(["dvc", "exp", "apply", "lr-a"], clone, env)
    assert load_params(clone / "params.yaml").train.lr == pytest.approx(0.002)
    sh(["dvc", "checkout"], clone, env)
    assert sh(["dvc", "status"], clone, env).split() == ["weights:", "always", "changed"]
