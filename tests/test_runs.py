"""MLflow runs as an operator meets them: stages killed by SIGTERM/SIGINT, several processes
opening a fresh store at once, reruns that give the same numbers, what the MLflow UI shows.

Real training (EfficientNet-Lite0 at 32 px on a few dozen real mirror images, random init),
real MLflow on a temporary SQLite store, real signals and real processes.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from wbc_transfer import cli, engine, tracking
from wbc_transfer.config import Params, load_params
from wbc_transfer.evaluation import scoring
from wbc_transfer.stages import evaluate, prepare, train

from conftest import CLASSES, class_files, prepare_tiny, terminate_when, write_params

ARCH = "efficientnet_lite0"


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> Path:
    """paper.pt / heldout.pt at 32 px from real mirror images: paper train 7, val 2, test 2
    per class (28 training images: batch_size 3 leaves a last batch of one); TEST 2/class."""
    out = tmp_path_factory.mktemp("prepared")
    prepare_tiny(mirror, out, n_train=7, n_val=2, n_test=2, n_heldout_test=2)
    return out


def run_params(repo: Path, prepared: Path, **overrides) -> Params:
    settings = {
        "base.tracking_uri": f"sqlite:///{repo / 'mlflow.db'}",
        "prepare.out_dir": str(prepared), "split.out_dir": str(prepared / "splits"),
        "train.weights": "none", "train.epochs": 2,
        "train.batch_size": 3, "train.num_threads": 1, "evaluate.max_per_class": None,
        "compare.bootstrap": 20,
    }
    settings.update(overrides)
    return load_params(write_params(repo, "unused", **settings))


def stage_runs(params: Params, stage: str) -> list:
    client = MlflowClient(tracking.tracking_uri(params))
    experiment = client.get_experiment_by_name(params.base.experiment)
    return client.search_runs([experiment.experiment_id], f"tags.dvc_stage = '{stage}'")


def cli_args(params: Params, stage: str, seed: int) -> list[str]:
    return ["--params", str(params.root / "params.yaml"), stage, "--arch", ARCH,
            "--protocol", "paper", "--seed", str(seed)]


# --- 9: SIGTERM / SIGINT ---------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_marks_the_training_run_failed_and_the_rerun_continues_it(tmp_path, prepared):
    """A real `wbc-transfer train` process, killed with SIGTERM while its run is open."""
    params = run_params(tmp_path, prepared)
    tracking.setup(params)  # the store exists before the process starts
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-m", "wbc_transfer.cli", *cli_args(params, "train", 5)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, output = terminate_when(proc, lambda: [r for r in stage_runs(params, f"train@{ARCH}-paper-5")
                                              if r.info.status == "RUNNING"], "a RUNNING run")
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "stopped by SIGTERM" in output
    [killed] = stage_runs(params, f"train@{ARCH}-paper-5")
    assert killed.info.status == "FAILED"  # was RUNNING forever

    info = train.main(params, arch=ARCH, protocol="paper", seed=5)
    [run] = stage_runs(params, f"train@{ARCH}-paper-5")  # no second run
    assert run.info.run_id == killed.info.run_id == info["run_id"]
    assert run.info.status == "FINISHED"
    assert run.data.params["last_batch"].startswith("merged: 1 image(s)")  # 28 = 8 x 3 + 4


@pytest.mark.slow
def test_sigint_before_the_first_checkpoint_then_rerun_continues_the_run(
        tmp_path, prepared, monkeypatch):
    """Ctrl-C (a real SIGINT to this process) during the first epoch, through the CLI: no
    checkpoint exists yet, and the rerun still continues the FAILED run."""
    params = run_params(tmp_path, prepared)
    original = engine.train_one_epoch  # the epoch step of engine.fit, the stage's loop

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler raises here
        pytest.fail("SIGINT did not interrupt")

    monkeypatch.setattr(engine, "train_one_epoch", interrupted)
    assert cli.main(cli_args(params, "train", 6)) == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    checkpoint = params.resolve(params.train.checkpoint_dir) / f"{ARCH}-paper-6" / "last.pt"
    assert not checkpoint.exists()
    [killed] = stage_runs(params, f"train@{ARCH}-paper-6")
    assert killed.info.status == "FAILED"

    monkeypatch.setattr(engine, "train_one_epoch", original)
    assert cli.main(cli_args(params, "train", 6)) == 0
    [run] = stage_runs(params, f"train@{ARCH}-paper-6")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    steps = MlflowClient(tracking.tracking_uri(params)).get_metric_history(
        run.info.run_id, "train_loss")
    assert [m.step for m in steps] == [1, 2]

    # evaluate opens the same run: SIGTERM there marks it FAILED, the rerun finishes it
    def terminated(*args, **kwargs):
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            pytest.fail("no SIGTERM handler: the signal would end pytest itself")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        pytest.fail("SIGTERM did not interrupt")

    score = scoring.evaluate  # the engine's scoring, as the evaluate stage calls it
    monkeypatch.setattr(scoring, "evaluate", terminated)
    assert cli.main(cli_args(params, "evaluate", 6)) == 128 + signal.SIGTERM
    assert MlflowClient(tracking.tracking_uri(params)).get_run(
        run.info.run_id).info.status == "FAILED"
    monkeypatch.setattr(scoring, "evaluate", score)
    assert cli.main(cli_args(params, "evaluate", 6)) == 0
    assert MlflowClient(tracking.tracking_uri(params)).get_run(
        run.info.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_run_left_running_by_sigkill_is_continued_by_the_rerun(tmp_path, prepared):
    """`kill -KILL` on a training process: nothing can close its run, which stayed RUNNING for
    good while the rerun opened a second run of the same name. The rerun continues it (its
    process is gone) and finishes it: one run for the stage."""
    params = run_params(tmp_path, prepared)
    tracking.setup(params)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    stage = f"train@{ARCH}-paper-7"
    proc = subprocess.Popen([sys.executable, "-m", "wbc_transfer.cli", *cli_args(params, "train", 7)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    terminate_when(proc, lambda: [r for r in stage_runs(params, stage)
                                  if r.info.status == "RUNNING"], "a RUNNING run",
                   signum=signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    [killed] = stage_runs(params, stage)
    assert killed.info.status == "RUNNING"
    # killed before its first epoch ended: no checkpoint names the run (on a fast machine the
    # first one may already be written; the case that matters is the one without it)
    for file in params.resolve(params.train.checkpoint_dir).glob(f"{ARCH}-paper-7/*"):
        file.unlink()
    assert cli.main(cli_args(params, "train", 7)) == 0
    [run] = stage_runs(params, stage)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"


# --- 10: several processes on a fresh store ---------------------------------------------------

FIRST_USE = """
import sys, time
from pathlib import Path
import mlflow
from wbc_transfer import tracking
from wbc_transfer.config import load_params

params = load_params(sys.argv[1])
barrier = Path(sys.argv[2])
(barrier / sys.argv[3]).touch()
while len(list(barrier.iterdir())) < 4:  # all four begin at the same moment
    time.sleep(0.001)
with tracking.run(params, run_name=f"worker-{sys.argv[3]}"):
    mlflow.log_param("worker", sys.argv[3])
"""


def test_a_signal_while_the_run_is_tagged_with_its_owner_ends_it_failed(tmp_path, prepared,
                                                                         monkeypatch):
    """SIGTERM right after the run appears in the store (what an adapt test saw under load: the
    run stayed RUNNING) lands in the owner-tag write; the run must still end FAILED."""
    params = run_params(tmp_path, prepared)
    real_set_tag = tracking.mlflow.set_tag

    def set_tag(key, value):
        if key == tracking.OWNER_TAG:
            raise cli.Terminated(signal.SIGTERM)
        return real_set_tag(key, value)

    monkeypatch.setattr(tracking.mlflow, "set_tag", set_tag)
    with pytest.raises(cli.Terminated), tracking.run(params, run_name="signalled"):
        pytest.fail("the body must not run")
    client = MlflowClient(tracking.tracking_uri(params))
    [run] = client.search_runs([tracking.setup(params)], "attributes.run_name = 'signalled'")
    assert run.info.status == "FAILED"


def test_four_processes_open_a_fresh_store_at_once(tmp_path):
    """Parallel `dvc exp` / tuning workers on a new mlflow.db: all four succeed (3 of 4 died in
    MLflow's schema migration or experiment creation: "duplicate column name", "table ...
    already exists", "Online migration expected to match one row")."""
    params = load_params(write_params(tmp_path, "unused", **{
        "base.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    barrier = tmp_path / "ready"  # each worker says it has imported mlflow, then waits
    barrier.mkdir()
    workers = [subprocess.Popen([sys.executable, "-c", FIRST_USE, str(tmp_path / "params.yaml"),
                                 str(barrier), str(i)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(4)]
    outputs = [w.communicate(timeout=180)[0] for w in workers]
    failed = [out[-600:] for w, out in zip(workers, outputs, strict=True) if w.returncode]
    assert not failed, failed
    client = MlflowClient(tracking.tracking_uri(params))
    [experiment] = [e for e in client.search_experiments() if e.name == params.base.experiment]
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.params["worker"] for r in runs) == ["0", "1", "2", "3"]
    assert {r.info.status for r in runs} == {"FINISHED"}


BUSY_WRITER = """
import sys, time
from pathlib import Path
from mlflow import MlflowClient
from wbc_transfer import tracking
from wbc_transfer.config import load_params
params = load_params(sys.argv[1])
folder = Path(sys.argv[2])
(folder / f"ready-{sys.argv[3]}").touch()
while not (folder / "go").exists():  # the store is locked from now on
    time.sleep(0.05)
tracking.setup(params)
MlflowClient(tracking.tracking_uri(params)).log_metric(sys.argv[3], "busy", 1.0)
"""


@pytest.mark.slow
def test_writers_wait_for_a_busy_sqlite_store(tmp_path):
    """Another process holds the SQLite write lock for 15 s (a long commit, a UI query, a
    backup); two processes that open the store meanwhile and log a metric wait for it. Without
    a busy timeout on the store's URI they died with "database is locked" after ~10 s."""
    import sqlite3

    params = load_params(write_params(tmp_path, "unused", **{
        "base.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}))
    tracking.setup(params)
    client = MlflowClient(tracking.tracking_uri(params))
    experiment = client.get_experiment_by_name(params.base.experiment)
    runs = [client.create_run(experiment.experiment_id).info.run_id for _ in range(2)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    writers = [subprocess.Popen([sys.executable, "-c", BUSY_WRITER, str(tmp_path / "params.yaml"),
                                 str(tmp_path), run_id], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for run_id in runs]
    deadline = time.monotonic() + 180
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    blocker = sqlite3.connect(tmp_path / "mlflow.db", timeout=0, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    (tmp_path / "go").touch()
    time.sleep(15)
    blocker.execute("COMMIT")
    blocker.close()
    outputs = [w.communicate(timeout=180)[0] for w in writers]
    failed = [out[-800:] for w, out in zip(writers, outputs, strict=True) if w.returncode]
    assert not failed, failed
    assert [client.get_run(r).data.metrics["busy"] for r in runs] == [1.0, 1.0]


# --- 12: reruns give the same bytes ---------------------------------------------------------

def test_two_prepares_give_identical_bytes(tmp_path, mini_dataset):
    """torch.save into the temporary file recorded its random name in the archive: every
    `prepare` wrote other bytes, and dvc.lock changed on a rerun of the same commit."""
    params = load_params(write_params(tmp_path, mini_dataset, **{"prepare.image_size": 32,
                                                             "train.architectures": [ARCH]}))
    images = params.images_dir
    for protocol, folder in (("paper", "TRAIN"), ("paper_grouped", "TRAIN"), ("heldout", "TEST")):
        rows = [(f"{folder}/{c}/{f.name}", c, "train" if i % 3 else "test")
                for c in CLASSES for i, f in enumerate(class_files(images, folder, c)[:6])]
        manifest = params.resolve(params.split.out_dir) / f"{protocol}.csv"
        manifest.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(manifest, index=False)
    outputs = []
    for name in ("first", "second"):
        rerun = load_params(write_params(tmp_path, mini_dataset, **{
            "prepare.image_size": 32, "prepare.out_dir": f"prepared-{name}",
            "train.architectures": [ARCH]}))
        prepare.main(rerun)
        outputs.append({p: (rerun.resolve(rerun.prepare.out_dir) / f"{p}.pt").read_bytes()
                        for p in prepare.PROTOCOLS})
    for protocol in prepare.PROTOCOLS:
        assert outputs[0][protocol] == outputs[1][protocol], protocol


@pytest.mark.slow
def test_two_tiny_trainings_give_identical_metrics(tmp_path, prepared):
    """Same inputs, code and params on the same device: the files DVC compares are equal to
    the byte (metrics.json carried the images/s timing, evaluate's metrics.json the run id)."""
    files = []
    for name in ("first", "second"):
        params = run_params(tmp_path, prepared, **{
            "train.epochs": 1, "train.out_dir": f"train-{name}", "evaluate.out_dir": f"eval-{name}"})
        info = train.main(params, arch=ARCH, protocol="paper", seed=9)
        evaluate.main(params, arch=ARCH, protocol="paper", seed=9)
        train_out = params.resolve(params.train.out_dir) / f"{ARCH}-paper-9"
        eval_out = params.resolve(params.evaluate.out_dir) / f"{ARCH}-paper-9"
        files.append({"train metrics": (train_out / "metrics.json").read_bytes(),
                      "history": (train_out / "history.csv").read_bytes(),
                      "eval metrics": (eval_out / "metrics.json").read_bytes(),
                      "predictions": (eval_out / "predictions" / "TEST.csv").read_bytes(),
                      "run_id": info["run_id"]})
    first, second = files
    assert first.pop("run_id") != second.pop("run_id")  # two MLflow runs ...
    assert first == second  # ... the same numbers, the same bytes
    assert b"run_id" not in first["eval metrics"]
    client = MlflowClient(tracking.tracking_uri(params))
    runs = stage_runs(params, f"train@{ARCH}-paper-9")
    assert len(runs) == 2 and {r.data.params["deterministic"] for r in runs} == {"True"}
    metrics = [{k: v for k, v in r.data.metrics.items() if k != "train_images_per_s"}
               for r in runs]
    assert metrics[0] == metrics[1] and "paper_test_accuracy" in metrics[0]
    assert client.get_run(runs[0].info.run_id).info.status == "FINISHED"


# --- 13: what the MLflow UI shows ------------------------------------------------------------

@pytest.mark.slow
def test_the_experiment_holds_training_runs_with_their_datasets(tmp_path, prepared):
    """The UI opened on its GenAI view (traces) and the runs table's Dataset column was empty."""
    params = run_params(tmp_path, prepared, **{"train.epochs": 1})
    train.main(params, arch=ARCH, protocol="paper", seed=3)
    client = MlflowClient(tracking.tracking_uri(params))
    experiment = client.get_experiment_by_name(params.base.experiment)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    [run] = stage_runs(params, f"train@{ARCH}-paper-3")
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["paper-test", "paper-train", "paper-val"]
    manifest = prepared / "splits" / "paper.csv"
    md5 = hashlib.md5(manifest.read_bytes()).hexdigest()  # what dvc.lock records for it
    contexts = {}
    for name, item in inputs.items():
        assert item.dataset.digest == md5
        assert str(manifest) in item.dataset.source
        contexts[name] = {t.key: t.value for t in item.tags}["mlflow.data.context"]
    assert contexts == {"paper-train": "training", "paper-val": "validation",
                        "paper-test": "testing"}
    assert '"num_rows": 28' in inputs["paper-train"].dataset.profile  # 7 per class

    assert tracking.ui_url(params).endswith(
        f"/#/experiments/{experiment.experiment_id}?workflowType=machine_learning")

    # an experiment made before this change gets the tag on its next use
    client.delete_experiment_tag(experiment.experiment_id, "mlflow.experimentKind")
    tracking.setup(params)
    assert client.get_experiment(experiment.experiment_id).tags["mlflow.experimentKind"] == \
        "custom_model_development"


# --- 26: the GPU run's settings on the CPU ----------------------------------------------------

@pytest.mark.slow
def test_the_gpu_runs_settings_train_and_evaluate_on_the_cpu(tmp_path, prepared):
    """`make gpu GPU_DEVICE=cpu`'s train settings (bf16 autocast forced, channels_last weights)
    run the train and evaluate stages on the CPU; the run records them; cuda without a GPU is
    refused naming the parameter."""
    params = run_params(tmp_path, prepared, **{
        "train.device": "cpu", "train.amp": "bf16", "train.channels_last": True,
        "evaluate.channels_last": True, "train.epochs": 1})
    info = train.main(params, arch=ARCH, protocol="paper", seed=5)
    metrics = evaluate.main(params, arch=ARCH, protocol="paper", seed=5)
    run = MlflowClient(tracking.tracking_uri(params)).get_run(info["run_id"])
    assert run.data.params["amp"] == "bf16" and run.data.params["device"] == "cpu"
    assert run.data.params["channels_last"] == "True"
    assert 0.0 <= run.data.metrics["paper_test_accuracy"] <= 1.0
    assert metrics  # evaluate wrote its summary
    if not torch.cuda.is_available():
        cuda = run_params(tmp_path / "cuda", prepared, **{"train.device": "cuda"})
        with pytest.raises(RuntimeError, match="train.device=cuda"):
            train.main(cuda, arch=ARCH, protocol="paper", seed=6)
