"""The top-level README: short, its links resolve, and every command in it is run by a test or by
CI (`.ci/run`). A command added to the README without a place that runs it fails here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PROGRAMS = ("make", "dvc", "wbc-transfer", "pytest", "python", "mlflow", "curl", "pip", "source")

# README command -> (file that runs it, text in that file that shows it does)
EXERCISED = {
    "make setup": (".ci/run", "\nmake setup\n"),
    "make test": (".ci/run", "\nmake test\n"),
    "pytest": ("Makefile", "\tpytest -q -n $(TEST_WORKERS) --dist loadfile\n"),  # what `make test` runs
    "make repro": ("tests/test_readme.py", "test_make_repro_is_dvc_repro"),
    "dvc repro": ("tests/test_team.py", 'sh(["dvc", "repro"], repo, env'),  # a real repo, end to end
    "make test-fast": ("tests/test_makefile.py", "test_make_test_fast_leaves_out_the_slow_tests"),
    "make ui": ("tests/test_makefile.py", "test_make_ui_serves_a_clone_in_a_folder_with_a_space"),
    # what it runs (`make -n best`, from the study) and that every stage reads its parameters
    # (test_config); the 28-minute run itself is measured in bench/BEST.md, not in the suite
    "make best": ("tests/test_makefile.py", "test_make_best_trains_with_what_the_tuning_study_chose"),
    "wbc-transfer predict path/to/cells/ -o predictions.csv":
        ("tests/test_predict.py", '"-o", str(output)'),  # a folder, CSV to a file
    "wbc-transfer fetch-weights": ("tests/test_weights.py", '"fetch-weights"'),
    "wbc-transfer app": ("tests/test_app.py", 'main(["app"'),
    "wbc-transfer adapt path/to/lab --lab mylab --per-class 25":
        ("tests/test_adapt.py", '"adapt", str(folder), "--lab", "stopped", "--per-class"'),
}


def readme_commands(text: str) -> list[str]:
    """Every command of the README: each line of a ```bash block (comments dropped) and each
    inline code span that starts with a program name (spans with `...` are placeholders)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        commands += [line.split(" #")[0].strip() for line in block.splitlines()
                     if line.strip() and not line.strip().startswith("#")]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`\n]+)`", prose):
        if span.split(" ")[0] in PROGRAMS and "..." not in span:
            commands.append(span.strip())
    return list(dict.fromkeys(commands))


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not link.startswith("http"):
            assert (REPO / link).is_file(), link
    for page in (REPO / "docs").glob("*.md"):
        for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if not link.startswith("http"):
                assert (page.parent / link).exists(), f"{page.name}: {link}"


def test_every_readme_command_is_run_by_a_test_or_ci():
    commands = readme_commands(README.read_text())
    assert {"make setup", "make repro", "make test", "make ui"} <= set(commands)
    missing = [c for c in commands if c not in EXERCISED]
    assert not missing, f"README commands no test or CI runs (add one, then list it here): {missing}"
    for command, (file, evidence) in EXERCISED.items():
        assert evidence in (REPO / file).read_text(), f"{command}: {file} no longer runs it"


def make_executable() -> str:
    found = shutil.which("make")
    if found is None:
        pytest.skip("make not installed")
    return found


def test_make_repro_is_dvc_repro():
    """`make repro` runs exactly `dvc repro` (which tests/test_team.py runs end to end)."""
    # CI runs the suite from `make test`: the outer make's MAKELEVEL/MAKEFLAGS would make this
    # one print "Entering directory" lines around the command
    env = {k: v for k, v in os.environ.items() if k not in {"MAKELEVEL", "MAKEFLAGS", "MFLAGS"}}
    out = subprocess.run([make_executable(), "-n", "repro"], cwd=REPO, capture_output=True,
                         text=True, check=True, env=env).stdout
    assert out.strip().splitlines() == ["dvc repro"]


