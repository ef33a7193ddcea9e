"""MLflow set-up (tracking URI resolved to the repo root), run provenance and logging helpers."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import psutil
import yaml
from filelock import FileLock
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from wbc_transfer.config import Params


def home_root(root: Path) -> Path:
    """The user's repository, also when running inside a DVC temporary experiment copy
    (`dvc exp run --temp/--queue` runs in <repo>/.dvc/tmp/exps/<tmpdir>/, deleted afterwards)."""
    parts = root.resolve().parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


#: seconds a SQLite client waits for another process's write lock before "database is locked"
#: (MLflow's and Optuna's local stores; sqlite3's default is 5 s)
SQLITE_TIMEOUT_S = 60


def with_busy_timeout(uri: str) -> str:
    """`uri` with `timeout=SQLITE_TIMEOUT_S` added when it is a SQLite file URL without one
    (SQLAlchemy's pysqlite dialect passes it to `sqlite3.connect`); other URIs unchanged.

    MLflow sets a busy timeout inside its sessions only; a process that opens the store (engine
    creation, schema check) while another one holds the write lock used sqlite3's 5 s default
    and died with "database is locked" (tests/test_runs.py)."""
    if not uri.startswith("sqlite:///") or ":memory:" in uri or "timeout=" in uri:
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}timeout={SQLITE_TIMEOUT_S}"


def tracking_uri(params: Params) -> str:
    """MLFLOW_TRACKING_URI wins; then base.tracking_uri; else SQLite at the repo root. A SQLite
    store gets a busy timeout (`with_busy_timeout`).

    Relative SQLite paths would land in DVC's temporary copies (`dvc exp run --temp`), so the
    default is always absolute and points at the user's repository.
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return with_busy_timeout(os.environ["MLFLOW_TRACKING_URI"])
    if params.base.tracking_uri:
        return with_busy_timeout(params.base.tracking_uri)
    return with_busy_timeout(f"sqlite:///{home_root(params.root) / 'mlflow.db'}")


# The MLflow 3 UI opens an experiment on its GenAI view (traces, token usage) unless the
# experiment says it holds model training runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

# MLflow 3.17's UI picks its GenAI or model-training view from a browser-side switch (default
# GenAI, kept in localStorage), not from the tag above (mlflow/mlflow#24498); this URL parameter
# opens the training view.
UI_TRAINING_VIEW = "?workflowType=machine_learning"

# manifest split -> MLflow dataset context (the runs table's Dataset column)
DATASET_CONTEXTS = {"train": "training", "val": "validation", "test": "testing",
                    "test_simple": "testing"}


def is_server(uri: str) -> bool:
    """Whether `uri` is an MLflow tracking server (http/https), not a local store."""
    return uri.startswith(("http://", "https://"))


def artifact_location(params: Params, uri: str | None = None) -> str | None:
    """Where a new experiment keeps its artifacts: `mlruns/` at the repo root for a local
    store; None for a tracking server, which then gives its own default (with
    `--serve-artifacts`, a proxied `mlflow-artifacts:/<id>` location, so clients need no access
    to the server's folder)."""
    if is_server(uri or tracking_uri(params)):
        return None
    return (home_root(params.root) / "mlruns").as_uri()


def store_lock(uri: str, timeout_s: float = 300.0) -> contextlib.AbstractContextManager[Any]:
    """An inter-process lock for the first use of a SQLite store (a `FileLock` on
    `<db>.lock` beside the database); a no-op for other stores, which handle concurrency
    themselves. Without it, processes opening a fresh mlflow.db at once race in MLflow's schema
    migrations ("duplicate column name", "table ... already exists")."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return contextlib.nullcontext()
    database = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    database.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{database}.lock", timeout=timeout_s)


def setup(params: Params) -> str:
    """Point MLflow at the project's store and make sure the experiment exists; returns its id.

    Safe when several processes do it at once on a fresh store (parallel `dvc exp` or tuning
    workers): creating the schema and the experiment happens under `store_lock`, and an
    experiment created meanwhile by another client (a server store) is looked up again.
    """
    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    name = params.base.experiment
    with store_lock(uri):
        experiment = mlflow.get_experiment_by_name(name)  # first use creates the schema
        if experiment is None:
            try:
                experiment_id = mlflow.create_experiment(
                    name, artifact_location=artifact_location(params, uri),
                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except MlflowException:
                experiment = mlflow.get_experiment_by_name(name)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        else:
            experiment_id = experiment.experiment_id
            if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before this tag existed
                mlflow.MlflowClient().set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG,
                                                         EXPERIMENT_KIND)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def ui_url(params: Params, server: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI address of the project's experiment, on its training runs view."""
    return f"{server.rstrip('/')}/#/experiments/{setup(params)}{UI_TRAINING_VIEW}"


class PortInUseError(RuntimeError):
    """A server was asked to listen on a port something else already holds."""


def require_free_port(host: str, port: int, variable: str) -> None:
    """Raise PortInUseError naming `variable` (the Makefile variable that picks the port) when
    `host:port` cannot be bound: `mlflow ui` beside `make server` on 5000 logged "Address
    already in use" and exited 0."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise PortInUseError(
                f"port {port} on {host} is in use ({exc.strerror}): another server (`make "
                f"server`, an earlier `make ui`) listens there; stop it or pick another port, "
                f"e.g. `make ui {variable}={port + 1}`") from None


def ui(params: Params, host: str, port: int) -> int:
    """`make ui`: the MLflow UI on the project's store (the same URI every stage uses, paths
    with spaces included) after checking the port is free; prints the training-runs address
    first. Returns the UI's exit code."""
    require_free_port(host, port, "UI_PORT")
    print("training runs:", ui_url(params, f"http://{host}:{port}"), flush=True)
    command = ["mlflow", "ui", "--backend-store-uri", tracking_uri(params), "--host", host,
               "--port", str(port)]
    return subprocess.run(command, check=False).returncode


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_md5(root: Path) -> str:
    """The dataset's md5 as recorded in data.dvc (what DVC versions)."""
    file = root / "data.dvc"
    if not file.is_file():
        return "unknown"
    spec = yaml.safe_load(file.read_text()) or {}
    outs = spec.get("outs") or [{}]
    return str(outs[0].get("md5", "unknown"))


#: run tag naming the process that has the run open: "<host>:<pid>:<process start time>"
OWNER_TAG = "wbc.owner"


def machine() -> str:
    """This machine: its host name and, on Linux, its boot id (two containers of one name on
    different machines differ in it; a reboot changes it, and no process survives one)."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    boot_id = boot.read_text().strip()[:8] if boot.is_file() else ""
    return f"{socket.gethostname()}/{boot_id}" if boot_id else socket.gethostname()


def owner() -> str:
    """This process as OWNER_TAG records it (the start time tells a reused pid apart)."""
    me = psutil.Process()
    return f"{machine()}:{me.pid}:{me.create_time():.3f}"


def owner_alive(tag: str | None) -> bool | None:
    """Whether the process an OWNER_TAG names still runs: True or False for a process of this
    machine; None when it is unknown (no tag, another host)."""
    try:
        host, pid, created = (tag or "").rsplit(":", 2)
        if host != machine():
            return None
        return abs(psutil.Process(int(pid)).create_time() - float(created)) < 0.01
    except psutil.NoSuchProcess:
        return False
    except (ValueError, psutil.Error):
        return None


@contextlib.contextmanager
def run(params: Params, run_id: str | None = None, run_name: str | None = None,
        tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume) a run; any exception, Ctrl-C included, ends it as FAILED. The run is
    tagged with its owner process (OWNER_TAG), so that a rerun can tell a run left RUNNING by
    a killed process (SIGKILL, power loss) from one another process still has open."""
    setup(params)
    active = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=tags)
    try:  # the owner tag is a store write: a signal during it must end the run FAILED too
        mlflow.set_tag(OWNER_TAG, owner())
        yield active
    except BaseException:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


def unfinished_run(params: Params, tags: dict[str, str]) -> str | None:
    """The id of the latest run of the project's experiment carrying all `tags` that did not
    finish: FAILED or KILLED (e.g. a stage stopped before its first checkpoint), or RUNNING
    while the process that opened it is gone (killed with SIGKILL: nothing could close it);
    its rerun continues it instead of opening a second run. A RUNNING run whose owner lives, or
    cannot be checked (another host, no owner tag), is left alone: that process may own it."""
    experiment_id = setup(params)
    condition = " AND ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    found = mlflow.search_runs(
        experiment_ids=[experiment_id], output_format="list", max_results=20,
        filter_string=f"{condition} AND attributes.status != 'FINISHED' "
                      f"AND attributes.status != 'SCHEDULED'",
        order_by=["attributes.start_time DESC"])
    for candidate in found:
        if candidate.info.status != "RUNNING":
            return candidate.info.run_id
        holder = candidate.data.tags.get(OWNER_TAG)
        if owner_alive(holder) is False:
            logging.getLogger(__name__).warning(
                "MLflow run %s is RUNNING but its process (%s) is gone (killed): continuing it",
                candidate.info.run_id, holder)
            return candidate.info.run_id
    return None


def log_new_params(values: dict[str, str]) -> None:
    """Log the params the active run does not have yet: a continued run keeps the values of its
    first attempt (MLflow refuses to change a logged param)."""
    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params if run else {}
    mlflow.log_params({k: v for k, v in values.items() if k not in existing})


def log_datasets(manifest: Path, rows: pd.DataFrame, protocol: str) -> list[str]:
    """Log each split of `rows` (columns path, label, split: the images a run used) as an MLflow
    dataset input of the active run: name `<protocol>-<split>`, context training / validation /
    testing, source the manifest file, digest the md5 DVC records for it in dvc.lock (else,
    when the manifest is not there, MLflow's digest of the rows). Returns the names logged."""
    import mlflow.data

    digest = hashlib.md5(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    names = []
    for split, context in DATASET_CONTEXTS.items():
        subset = rows[rows["split"] == split].reset_index(drop=True)
        if subset.empty:
            continue
        name = f"{protocol}-{split}"
        with warnings.catch_warnings():  # MLflow registers two equal local-file sources
            warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways")
            dataset = mlflow.data.from_pandas(subset, source=str(manifest), name=name,
                                              targets="label", digest=digest)
        mlflow.log_input(dataset, context=context)
        names.append(name)
    return names


def flat_params(prefix: str, values: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flat_params(name, value))
        else:
            out[name] = str(value)[:6000]
    return out
