"""Look at the MLflow UI as a user does: start `mlflow ui` on loopback, open the project's
experiment in headless Chromium with a fresh profile (nothing remembered from earlier visits)
and save a screenshot.

    python scripts/ui_screenshot.py                            # this project's mlflow.db
    python scripts/ui_screenshot.py --tracking-uri sqlite:////tmp/x/mlflow.db --out /tmp/ui.png

Needs Chromium (`apt-get install -y chromium`). Checks what issue 12 item 13 is about: the
experiment should open on its training runs (not the GenAI traces view) with the Dataset
column filled. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow ui exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"no answer from {url} in {timeout_s:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", help="default: the project's store (params.yaml)")
    parser.add_argument("--experiment", help="default: base.experiment of params.yaml")
    parser.add_argument("--out", default="mlflow-ui.png", help="screenshot file (PNG)")
    parser.add_argument("--browser", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--size", default="1600,1000", help="window width,height in px")
    parser.add_argument("--bare", action="store_true",
                        help="open the bare experiment link (what MLflow shows by default) "
                             "instead of the training view `make ui` prints")
    parser.add_argument("--wait-ms", type=int, default=20000,
                        help="virtual time the page gets to load before the screenshot")
    args = parser.parse_args()

    from mlflow import MlflowClient

    from wbc_transfer import tracking
    from wbc_transfer.config import load_params

    params = None if args.tracking_uri and args.experiment else load_params()
    uri = args.tracking_uri or tracking.tracking_uri(params)
    name = args.experiment or params.base.experiment
    experiment = MlflowClient(uri).get_experiment_by_name(name)
    if experiment is None:
        print(f"no experiment {name!r} in {uri}", file=sys.stderr)
        return 2
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow_cli) if mlflow_cli.exists() else "mlflow", "ui", "--backend-store-uri", uri,
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
                                   f"{os.environ.get('PATH', '')}"})
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server)
        url = f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}"
        url += "" if args.bare else tracking.UI_TRAINING_VIEW
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run(
                [args.browser, "--headless", "--no-sandbox", "--disable-gpu",
                 "--hide-scrollbars", f"--user-data-dir={profile}",
                 f"--window-size={args.size}", f"--virtual-time-budget={args.wait_ms}",
                 f"--screenshot={Path(args.out).resolve()}", url],
                check=True, capture_output=True, timeout=180)
        print(f"{url} -> {args.out}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
