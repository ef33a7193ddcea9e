"""Where an Optuna study lives: the storage URL (env, params, or SQLite at the repo root), the
opened storage with heartbeats, and the URL without credentials."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import optuna

from wbc_transfer import tracking
from wbc_transfer.config import Params

HEARTBEAT_S = 30  # default tune.heartbeat_s
MAX_RETRY = 2  # a failed trial (dead worker) is enqueued again at most this often


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
