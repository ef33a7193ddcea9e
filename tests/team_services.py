"""A real PostgreSQL server and a real MLflow tracking server for the team-setup tests.

PostgreSQL: the server binaries of the Debian `postgresql` package (`pg_config --bindir`;
`.ci/run` installs the package when they are missing). `initdb` refuses to run as root, so as
root the cluster is created and started as the `postgres` system user (`runuser`), in a temp
folder, on a free loopback port, with its unix socket in that folder. No fallback and no skip:
if it cannot start, the test fails and says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import free_port


def pg_bindir() -> Path:
    """Where initdb/pg_ctl live; fails the test naming what to install when they do not."""
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        folder = Path(out.stdout.strip())
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    except (OSError, subprocess.CalledProcessError):
        pass
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent
    pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found: install the Debian package "
                "`postgresql` (`.ci/run` does: apt-get install -y postgresql)")


@dataclass
class Postgres:
    root: Path
    port: int
    bindir: Path
    as_user: list[str]

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        subprocess.run([str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                        "-U", "postgres", name], check=True, capture_output=True, text=True)
        return self.url(name)

    def stop(self) -> None:
        subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"),
                        "-m", "immediate", "stop"], capture_output=True, text=True)
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> Postgres:
    """initdb + pg_ctl start in a fresh temp folder (trust auth, loopback, fsync off)."""
    bindir = pg_bindir()
    root = Path(tempfile.mkdtemp(prefix="wbc-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb: "cannot be run as root"
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    steps = [
        [*as_user, str(bindir / "initdb"), "-D", str(root / "data"), "-A", "trust", "-U", "postgres",
         "-E", "UTF8", "--no-sync"],
        [*as_user, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "server.log"),
         "-w", "-t", "60", "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off",
         "start"],
    ]
    for command in steps:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            log = (root / "server.log").read_text() if (root / "server.log").is_file() else ""
            pytest.fail(f"PostgreSQL did not start: {' '.join(command)} exited "
                        f"{done.returncode}:\n{done.stdout}{done.stderr}{log}")
    return Postgres(root, port, bindir, as_user)


def start_mlflow_server(backend_uri: str, artifacts: Path, log_file: Path,
                        timeout_s: float = 180) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on loopback with proxied artifacts; returns (process, http URL) once
    /health answers; fails the test with the server's log if it does not."""
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow), "server", "--backend-store-uri", backend_uri, "--serve-artifacts",
               "--artifacts-destination", str(artifacts), "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    handle = open(log_file, "w")  # noqa: SIM115 - the server writes it for its whole life
    proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail(f"mlflow server did not answer on {url}: {' '.join(command)}\n"
                f"{log_file.read_text()[-3000:]}")
