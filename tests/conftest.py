"""Shared fixtures: the read-only Kaggle mirror, small real copies of its layout, tmp params.

The mirror (../shared/data/blood-cells, or the folder named by env WBC_SHARED_DATA) is never
written to: every test works on copies of a few of its images under pytest's tmp folders.

Reusable pieces for any test module:

- ``mirror``: Path of the mirror's images folder (``.../dataset2-master/dataset2-master/images``).
- ``kaggle_copy(dest, train_per_class=40, test_per_class=10, ...)``: build a small copy of the
  Kaggle layout under ``dest`` from real mirror images; returns ``dest`` (the data.root).
- ``mini_dataset``: one session-wide copy (40 TRAIN + 12 TEST images per class). Treat it as
  read-only; build your own with ``kaggle_copy`` if a test needs to change files.
- ``make_params(data_root, repo=None, **overrides)``: write a params.yaml (the repo's own, with
  data.root set and the split sizes shrunk) into a fresh tmp repo folder and return
  ``load_params()`` of it. Overrides use ``section__key=value`` (``split__paper__per_class=5``)
  or dotted keys via ``**{"split.seed": 7}``.

Test files stay flat in tests/ (they import these helpers as ``from conftest import ...``). A
unit-test file is named after the module it tests, without its package: ``test_<module>.py``
(``test_cells.py`` tests ``data/cells.py``); a file named after a package or a stage tests that
package or stage with its library module; the rest are end to end. Which file tests what:

- data/: test_images, test_cells, test_sets (augmentation, normalisation), test_validation,
  test_groups (grouping + the groups stage), test_splits (+ split), test_external, test_symlinks
- models/: test_weights (weights cache + weights stage), test_robustness
- training/: test_training (trainer, outputs, train stage), test_threads, test_adapt (+ adapt)
- evaluation/: test_stats; test_trust (calibration, scoring, explain; evaluate stage)
- reporting/: test_compare (comparison + compare stage); serving/: test_predict, test_serve,
  test_promote (promote stage); app/: test_app; tuning/: test_tune (+ tune stage)
- top level: test_config, test_engine, test_plots
- end to end and repository files: test_runs, test_study, test_team, test_pipeline_data (DVC),
  test_makefile, test_readme
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from wbc_transfer.config import Params, load_params

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGES_SUBDIR = "dataset2-master/dataset2-master/images"
CLASSES = ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")

# params used by the tests on a mini copy: small enough for 40 TRAIN images per class
MINI_SPLIT = {
    "paper": {"per_class": 20},
    "heldout": {"train_per_class": 10},
}
MINI_GROUPS = {"workers": 1, "sibling_cells": 4, "siblings_per_cell": 3}


def mirror_root() -> Path:
    """The blood-cells folder of the mirror (may not exist)."""
    env = os.environ.get("WBC_SHARED_DATA")
    if env:
        return Path(env).expanduser().resolve()
    return (REPO_ROOT / ".." / "shared" / "data" / "blood-cells").resolve()


@pytest.fixture(scope="session")
def mirror() -> Path:
    images = mirror_root() / IMAGES_SUBDIR
    if not (images / "TRAIN").is_dir() or not (images / "TEST").is_dir():
        pytest.skip(
            "../shared/data/blood-cells not found: the tests need the Kaggle mirror; "
            f"set WBC_SHARED_DATA (looked for {images})"
        )
    return images


def spread(files: list[Path], n: int, offset: int = 0) -> list[Path]:
    """n files evenly spaced over the sorted list (deterministic, spans many source smears)."""
    files = sorted(files)
    if n > len(files):
        raise ValueError(f"asked for {n} files, only {len(files)} available")
    step = len(files) / n
    return [files[(int(i * step) + offset) % len(files)] for i in range(n)]


def class_files(images: Path, folder: str, cls: str) -> list[Path]:
    return sorted(p for p in (images / folder / cls).iterdir() if p.suffix.lower() == ".jpeg")


def copy_layout(
    mirror_images: Path,
    dest: Path,
    train_per_class: int = 40,
    test_per_class: int = 10,
    test_simple_per_class: int = 0,
    classes: Iterable[str] = CLASSES,
) -> Path:
    """A small copy of the Kaggle layout under dest (returned: use it as data.root).

    TEST_SIMPLE, which the mirror lacks, is filled with TEST images other than the ones copied
    to TEST when test_simple_per_class > 0."""
    images = dest / IMAGES_SUBDIR
    for cls in classes:
        plan = [("TRAIN", "TRAIN", train_per_class, 0), ("TEST", "TEST", test_per_class, 0)]
        if test_simple_per_class:
            plan.append(("TEST", "TEST_SIMPLE", test_simple_per_class, 1))
        for source, target, n, offset in plan:
            out = images / target / cls
            out.mkdir(parents=True, exist_ok=True)
            for file in spread(class_files(mirror_images, source, cls), n, offset):
                shutil.copyfile(file, out / file.name)
    return dest


@pytest.fixture(scope="session")
def kaggle_copy(mirror: Path) -> Callable[..., Path]:
    """Factory: kaggle_copy(dest, train_per_class=40, test_per_class=10, ...) -> data root."""

    def make(dest: Path, **kwargs: Any) -> Path:
        return copy_layout(mirror, Path(dest), **kwargs)

    return make


@pytest.fixture(scope="session")
def mini_dataset(tmp_path_factory: pytest.TempPathFactory, kaggle_copy) -> Path:
    """Session-wide small real copy: 40 TRAIN and 12 TEST images per class. Read-only."""
    return kaggle_copy(tmp_path_factory.mktemp("mini") / "blood-cells",
                       train_per_class=40, test_per_class=12)


@pytest.fixture(autouse=True)
def isolated_mlflow_stores():
    """Each test starts and ends with no tracking or registry URI set in this process (a
    variable the developer exported is not for the tests either).

    MLflow 3's set_tracking_uri/set_registry_uri also export MLFLOW_TRACKING_URI /
    MLFLOW_REGISTRY_URI into os.environ, and the project lets MLFLOW_TRACKING_URI win over
    params.yaml (tracking.tracking_uri): without this, the store one test set would receive the
    runs of every later test in the same pytest process."""
    import mlflow

    def clear() -> None:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)

    clear()
    yield
    clear()


def terminate_when(proc: subprocess.Popen, found: Callable[[], Any], what: str,
                   signum: int = signal.SIGTERM, timeout_s: float = 240) -> tuple[Any, str]:
    """Poll `found()` every 0.5 s while `proc` runs; once it returns something truthy, send
    `signum` to `proc` and wait for it. Returns (what found() returned, proc's output). Fails
    the test, with the output, if `proc` ends first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while not (result := found()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what} never seen; output:\n{proc.communicate()[0][-3000:]}")
        # not faster: each poll reads the SQLite store, and on a loaded machine back-to-back reads
        # kept the training process's writes waiting past SQLite's 5 s ("database is locked")
        time.sleep(0.5)
    proc.send_signal(signum)
    return result, proc.communicate(timeout=120)[0]


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def write_params(repo: Path, data_root: Path | str, **overrides: Any) -> Path:
    """Write repo/params.yaml: the project's params.yaml, data.root -> data_root, mini split
    sizes, then the overrides (section__key=value or "section.key"=value)."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["data"]["root"] = str(data_root)
    for section, values in MINI_SPLIT.items():
        raw["split"][section].update(values)
    raw["split"]["val_per_class"] = 3
    raw["groups"].update(MINI_GROUPS)
    raw["train"]["overrides"] = {}  # the quick run's per-architecture settings: not for tests
    raw["external"] = {}  # other labs' sets (tecom.dvc): only where a test asks for one
    raw["adapt"]["labs"] = {}  # and the labs of the adapt@<lab> stages
    for key, value in overrides.items():
        _set(raw, key.replace("__", "."), value)
    repo.mkdir(parents=True, exist_ok=True)
    file = repo / "params.yaml"
    file.write_text(yaml.safe_dump(raw, sort_keys=False))
    return file


@pytest.fixture
def make_params(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Params]:
    """Factory: make_params(data_root, repo=None, **overrides) -> Params of a tmp repo folder."""

    def make(data_root: Path | str, repo: Path | None = None, **overrides: Any) -> Params:
        repo = Path(repo) if repo is not None else tmp_path_factory.mktemp("repo")
        return load_params(write_params(repo, data_root, **overrides))

    return make


def prepare_tiny(mirror_images: Path, out: Path, n_train: int, n_val: int, n_test: int,
                 n_heldout_test: int, size: int = 32) -> None:
    """paper.pt / heldout.pt (and their manifests under out/splits) from real mirror images:
    per class n_train + n_val + n_test TRAIN images for the paper splits, n_heldout_test TEST
    images for heldout's test split; `size` px."""
    import pandas as pd

    from wbc_transfer.data.sets import build_image_set

    paper, heldout = [], []
    for cls in CLASSES:
        files = spread(class_files(mirror_images, "TRAIN", cls), n_train + n_val + n_test)
        paper += [(f"TRAIN/{cls}/{f.name}", cls,
                   "train" if i < n_train else "val" if i < n_train + n_val else "test")
                  for i, f in enumerate(files)]
        heldout += [(f"TEST/{cls}/{f.name}", cls, "test")
                    for f in spread(class_files(mirror_images, "TEST", cls), n_heldout_test)]
    (out / "splits").mkdir(parents=True, exist_ok=True)
    for name, rows in (("paper", paper), ("heldout", heldout)):
        frame = pd.DataFrame(rows, columns=["path", "label", "split"])
        build_image_set(frame, mirror_images, CLASSES, size).save(out / f"{name}.pt")
        frame.to_csv(out / "splits" / f"{name}.csv", index=False)  # the split stage's manifests


def http_status(url: str, seconds: float, proc: subprocess.Popen | None = None,
                pause: float = 0.5) -> int | None:
    """Poll `url` until it answers (its HTTP status) or `seconds` pass or `proc` exits (None)."""
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return int(answer.status)
        except OSError:
            time.sleep(pause)
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

