"""The CPU thread policy (src/wbc_transfer/training/threads.py) with real processes and real locks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from wbc_transfer.training import threads

REGISTER = ("from wbc_transfer.training import threads; threads.register(); print('ready', flush=True); "
            "import time; time.sleep(120)")


def test_live_trainers_are_counted_and_a_killed_one_is_forgotten(tmp_path, monkeypatch):
    monkeypatch.setenv(threads.TRAINERS_DIR_ENV, str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", REGISTER], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        assert threads.live_trainers(tmp_path) == 2
        procs[0].kill()  # no clean-up runs: only the lock's release tells
        procs[0].wait()
        assert threads.live_trainers(tmp_path) == 1
        assert len(list(tmp_path.glob("*.lock"))) == 1  # the dead one's file is removed
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_declared_processes_set_the_threads_and_a_bad_value_names_the_variable(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(threads.PROCESSES_ENV, "2")
        policy = threads.policy_for(0)
        assert torch.get_num_threads() == threads.threads_for(2) == max(1, threads.CORES // 2)
        assert policy.describe()["thread_policy"] == "env WBC_PROCESSES"
        assert threads.policy_for(3).rebalance() == 3  # train.num_threads > 0 is fixed
        monkeypatch.setenv(threads.PROCESSES_ENV, "two")
        with pytest.raises(ValueError, match="WBC_PROCESSES must be a whole number >= 1"):
            threads.policy_for(0)
    finally:
        torch.set_num_threads(before)
