"""CPU thread policy: processes that share a machine share its cores instead of each taking all.

PyTorch gives every process as many intra-op threads as the machine has cores. Two trainings
at once then run 2x the threads on the same cores and lose time to oversubscription (measured
on 2 cores: two concurrent quick trainings took 1.23x the time of running them one after the
other with default threads, 0.60x with one thread each; bench/bench_concurrency.py).

Policy, used by every process that trains or evaluates (train, evaluate, tune and its workers)
when `train.num_threads` is 0 (the default):

1. `WBC_PROCESSES=N` in the environment (set it for `dvc queue start -j N`, a scheduler, or
   tuning workers started by hand): threads = max(1, cores // N).
2. Otherwise each such process registers itself in a machine-wide folder
   (`$WBC_TRAINERS_DIR`, default `<tmp>/wbc-transfer-trainers`) with a file it holds an
   exclusive `flock` on; the live processes are the files whose lock is held (a killed
   process's lock vanishes with it, so a crash never leaves a phantom). threads =
   max(1, cores // live). The count is taken again at every epoch (`rebalance`), so a process
   that started alone gives cores back when a second one starts, and takes them again when it
   ends.

`train.num_threads` > 0 fixes the count (bit-for-bit reproducibility on the CPU needs the same
thread count: oneDNN splits reductions by thread). `cores` is PyTorch's own default (physical
cores available to the process), read at import before anything changes it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

PROCESSES_ENV = "WBC_PROCESSES"
TRAINERS_DIR_ENV = "WBC_TRAINERS_DIR"
CORES = torch.get_num_threads()  # PyTorch's default before any set_num_threads


def trainers_dir() -> Path:
    """The machine-wide registry folder of live training processes."""
    return Path(os.environ.get(TRAINERS_DIR_ENV) or Path(tempfile.gettempdir()) / "wbc-transfer-trainers")


def declared_processes() -> int | None:
    """`WBC_PROCESSES` as a whole number >= 1, None when unset; ValueError naming it if bad."""
    raw = os.environ.get(PROCESSES_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{PROCESSES_ENV} must be a whole number >= 1 (processes sharing this "
                         f"machine), got {raw!r}")
    return int(raw)


def live_trainers(folder: Path | None = None) -> int:
    """How many registered processes are alive: files in `folder` whose flock is held. Stale
    files (their process died) are removed on the way."""
    folder = folder or trainers_dir()
    live = 0
    for file in folder.glob("*.lock") if folder.is_dir() else ():
        try:
            with open(file, "a") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    live += 1  # held by a live process (ours included: flock is per open file)
                    continue
                file.unlink(missing_ok=True)
                fcntl.flock(handle, fcntl.LOCK_UN)
        except FileNotFoundError:
            continue
    return live


def threads_for(processes: int, cores: int = CORES) -> int:
    """Threads per process when `processes` share `cores`: max(1, cores // processes)."""
    return max(1, cores // max(1, processes))


@dataclass
class ThreadPolicy:
    """The thread count of one process and how it was chosen (for MLflow)."""

    fixed: int  # train.num_threads (> 0: fixed; 0: shared by the policy above)

    @property
    def mode(self) -> str:
        if self.fixed > 0:
            return "fixed (train.num_threads)"
        return f"env {PROCESSES_ENV}" if declared_processes() else "live trainers"

    def processes(self) -> int:
        if self.fixed > 0:
            return 1
        return declared_processes() or max(1, live_trainers())

    def rebalance(self) -> int:
        """Set torch's intra-op threads from the current sharing; returns the count."""
        threads = self.fixed if self.fixed > 0 else threads_for(self.processes())
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads

    def describe(self) -> dict[str, object]:
        """MLflow params: how many threads, why, and the processes counted."""
        return {"torch_threads": torch.get_num_threads(), "thread_policy": self.mode,
                "sharing_processes": self.processes(), "cpu_cores": CORES}


_REGISTRATION: dict[int, IO[str]] = {}  # pid -> our held lock file (one per process)


def register() -> None:
    """Enter this process in the registry of live trainers, once per process (the lock goes
    with the process; the file is removed at exit, or by the next count after a crash). The
    file is locked under a temporary name and then renamed, so a count never sees it unlocked."""
    if os.getpid() in _REGISTRATION:
        return
    folder = trainers_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(PermissionError):
        folder.chmod(0o1777)  # one folder for every user of the machine
    temporary = folder / f"{os.getpid()}.tmp"
    handle = open(temporary, "w")  # noqa: SIM115 - held until the process ends
    fcntl.flock(handle, fcntl.LOCK_EX)
    final = temporary.with_suffix(".lock")
    os.replace(temporary, final)
    _REGISTRATION[os.getpid()] = handle
    atexit.register(final.unlink, missing_ok=True)


def policy_for(num_threads: int = 0) -> ThreadPolicy:
    """The process's thread policy (registered as a trainer unless `num_threads` > 0 or
    `WBC_PROCESSES` is set), with torch's threads already set by it."""
    policy = ThreadPolicy(num_threads)
    if num_threads <= 0 and declared_processes() is None:
        register()
    policy.rebalance()
    return policy
