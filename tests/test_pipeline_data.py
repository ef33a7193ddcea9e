"""`dvc repro split` (validate, groups, split) end to end in a throwaway copy of the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO_ROOT

VENV_BIN = Path(sys.executable).parent
# needed whether or not they are committed yet
EXTRA_FILES = ["dvc.yaml", "params.yaml", "data.dvc", ".dvcignore", ".dvc/config",
               ".dvc/.gitignore"]
# dvc.lock records the real run on the full mirror; the copy starts without one
# the external sets (tecom.dvc, pbc.dvc): their source ../shared/... is not beside the copy
SKIP_FILES = {"dvc.lock", "tecom.dvc", "pbc.dvc"}
OUTPUTS = ["data/index.csv", "results/data/problems.csv", "results/data/report.json",
           "results/data/duplicates.csv",
           "results/data/image_sizes.csv", "data/groups.csv", "results/data/groups.json",
           "results/data/groups.md", "data/splits/paper.csv", "data/splits/paper_grouped.csv",
           "data/splits/heldout.csv", "results/data/leakage.md", "results/data/leakage.json"]
STAGES = ("validate", "groups", "split")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    return env


def _run(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{output}"
    return output


def _repro(repo: Path) -> str:
    return _run([str(VENV_BIN / "dvc"), "repro", "split"], repo)


@pytest.fixture
def repo_copy(tmp_path, mini_dataset) -> Path:
    """The repository's files in a fresh git repo, data.root -> a copy of the mini dataset."""
    repo = tmp_path / "repo"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    for rel in sorted(set(tracked) | set(EXTRA_FILES)):
        source = REPO_ROOT / rel
        if rel in SKIP_FILES or not source.is_file():
            continue
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, repo / rel)
    shutil.copytree(mini_dataset, repo / "data" / "mini-blood-cells")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["root"] = "data/mini-blood-cells"
    params["external"] = {}  # tecom.dvc's source ../shared/... is not beside the copy
    params["adapt"]["labs"] = {}  # nor pbc/tecom for the adapt@<lab> stages
    params["split"]["paper"].update(per_class=20)
    params["split"].update(val_per_class=3)
    params["split"]["heldout"].update(train_per_class=10)
    params["groups"].update(workers=1, sibling_cells=4, siblings_per_cell=3)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["git", "init", "-q"], ["git", "config", "user.name", "wbc tests"],
                 ["git", "config", "user.email", "tests@example.invalid"],
                 ["git", "add", "-A"], ["git", "commit", "-q", "-m", "copy"]):
        _run(args, repo)
    return repo


def _ran(output: str) -> set[str]:
    return {stage for stage in STAGES if f"Running stage '{stage}'" in output}


def _skipped(output: str) -> set[str]:
    return {stage for stage in STAGES if f"Stage '{stage}' didn't change, skipping" in output}


@pytest.mark.slow
def test_dvc_repro_validate_groups_split(repo_copy):
    repo = repo_copy
    first = _repro(repo)
    assert _ran(first) == set(STAGES), first
    for rel in OUTPUTS:
        assert (repo / rel).is_file(), f"{rel} missing after dvc repro:\n{first}"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(STAGES) <= set(lock["stages"])
    index = pd.read_csv(repo / "data/index.csv")
    assert len(index) == 4 * (40 + 12)
    paper = pd.read_csv(repo / "data/splits/paper.csv")
    assert len(paper) == 4 * (20 + 3)

    second = _repro(repo)
    assert _ran(second) == set(), second
    assert _skipped(second) == set(STAGES), second
    assert "up to date" in second.lower(), second

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["split"]["seed"] = params["split"]["seed"] + 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _repro(repo)
    assert _ran(third) == {"split"}, third
    assert _skipped(third) == {"validate", "groups"}, third
    reseeded = pd.read_csv(repo / "data/splits/paper.csv")
    assert len(reseeded) == len(paper)
    assert set(reseeded["path"]) != set(paper["path"])
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    locked = lock["stages"]["split"]["params"]["params.yaml"]
    assert locked["split"]["seed"] == params["split"]["seed"]
