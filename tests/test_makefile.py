"""The Makefile as a user runs it: a clone in a folder whose name has a space, `make ui` beside
another server on its port. Real make, real `mlflow ui`, real sockets."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, free_port, http_status

PATH_VARIABLES = ("CURDIR", "VENV", "PYTHON", "MLFLOW_BACKEND", "MLFLOW_ARTIFACTS", "MLFLOW_HOST",
                  "MLFLOW_PORT", "UI_HOST", "UI_PORT")


def clone_with_a_space(tmp_path: Path) -> Path:
    """The files `make ui` needs, in `<tmp>/my project`."""
    repo = tmp_path / "my project"
    repo.mkdir()
    for name in ("Makefile", "params.yaml"):
        shutil.copyfile(REPO_ROOT / name, repo / name)
    return repo


def make_env() -> dict[str, str]:
    """The test's Python first on PATH (the clone has no .venv), no tracking URI of the shell."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "src"),
                                                      env.get("PYTHONPATH")]))
    return env



def test_every_path_or_port_in_a_recipe_is_quoted():
    """`$(CURDIR)` etc. unquoted in a recipe split a path with a space into two arguments
    (`make ui` in "my project": "Got unexpected extra argument")."""
    unquoted = []
    text = (REPO_ROOT / "Makefile").read_text().replace("\\\n", " ")  # continuation lines
    for number, line in enumerate(text.splitlines(), 1):
        if not line.startswith("\t"):
            continue
        outside = re.sub(r'"[^"]*"', '""', line)  # drop double-quoted parts
        for name in PATH_VARIABLES:
            if f"$({name})" in outside:
                unquoted.append(f"{number}: $({name}) in {line.strip()}")
    assert not unquoted, unquoted


def test_make_ui_fails_loudly_when_its_port_is_taken(tmp_path):
    """`make ui` beside `make server` (both on 5000): exit status 0 and a log line before."""
    repo = clone_with_a_space(tmp_path)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        done = subprocess.run(["make", "ui", f"UI_PORT={port}"], cwd=repo, env=make_env(),
                              capture_output=True, text=True, timeout=300)
    assert done.returncode != 0, done.stdout + done.stderr
    assert f"port {port} on 127.0.0.1 is in use" in done.stderr
    assert f"make ui UI_PORT={port + 1}" in done.stderr


@pytest.mark.slow
def test_make_ui_serves_a_clone_in_a_folder_with_a_space(tmp_path):
    repo = clone_with_a_space(tmp_path)
    port = free_port()
    proc = subprocess.Popen(["make", "ui", f"UI_PORT={port}"], cwd=repo, env=make_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        status = http_status(f"http://127.0.0.1:{port}/health", 240, proc, pause=1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    assert status == 200, output
    assert (repo / "mlflow.db").is_file()  # the project's store, in the folder with the space
    assert f"training runs: http://127.0.0.1:{port}/#/experiments/" in output


def test_make_gpu_is_make_paper_and_make_best_with_the_gpu_settings():
    """`make gpu` runs the paper-scale study and the best model as two DVC experiments, each
    with bf16 autocast and channels_last on GPU_DEVICE (cuda unless told)."""
    env = {k: v for k, v in make_env().items() if k not in {"MAKELEVEL", "MAKEFLAGS", "MFLAGS"}}
    def expand(*args: str) -> list[str]:
        return subprocess.run(["make", "-n", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, check=True).stdout.strip().splitlines()
    paper, best = expand("paper")[0], expand("best")[0]
    for device in ("cuda", "cpu"):
        lines = expand("gpu", *([f"GPU_DEVICE={device}"] if device == "cpu" else []))
        gpu = (f" -S train.device={device} -S train.amp=bf16 -S train.channels_last=true"
               " -S evaluate.channels_last=true")
        assert lines == [paper.replace("-n paper-scale ", "-n paper-scale-gpu ") + gpu,
                         best.replace("-n best-leak-free ", "-n best-gpu ") + gpu]


def test_make_best_trains_with_what_the_tuning_study_chose(tmp_path):
    """TUNED is read from results/tune/ (`tune --apply --settings`): a new study changes
    `make best`; without one, make stops naming `make tune` instead of training untuned."""
    repo = clone_with_a_space(tmp_path)
    env = {k: v for k, v in make_env().items() if k not in {"MAKELEVEL", "MAKEFLAGS", "MFLAGS"}}
    def make_best() -> subprocess.CompletedProcess:
        return subprocess.run(["make", "-n", "best"], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=120)
    done = make_best()
    assert done.returncode != 0 and done.stdout == ""
    assert "no tuned settings in results/tune/: run `make tune` first" in done.stderr
    folder = repo / "results" / "tune" / "efficientnet_lite1"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text('{"best": {"val_f1_macro": 0.9}}')
    (folder / "best_params.yaml").write_text(
        "train: {lr: 0.00042, head_lr_factor: 7, weight_decay: 0.02, colour_jitter: 0.3, "
        "hed_jitter: 0.05, translate_px: 12, epochs: 2}\n")
    done = make_best()
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(
        "dvc exp run -n best-leak-free -S train.lr=0.00042 -S train.head_lr_factor=7 "
        "-S train.weight_decay=0.02 -S train.colour_jitter=0.3 -S train.hed_jitter=0.05 "
        "-S train.translate_px=12 -S 'train.architectures=[efficientnet_lite1]' "), done.stdout
    assert "train.epochs=2" not in done.stdout and "-S train.epochs=6" in done.stdout


def test_make_test_fast_leaves_out_the_slow_tests_and_make_test_runs_all():
    """`make test-fast` is `make test` with `-m "not slow"`; the marker is declared."""
    env = {k: v for k, v in make_env().items() if k not in {"MAKELEVEL", "MAKEFLAGS", "MFLAGS"}}
    def expand(target: str) -> str:
        return subprocess.run(["make", "-n", target], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, check=True).stdout.strip()
    full, fast = expand("test"), expand("test-fast")
    assert full.startswith("pytest ") and "-m" not in full.split()
    assert fast == f'{full} -m "not slow"'
    assert "slow:" in (REPO_ROOT / "pyproject.toml").read_text()
