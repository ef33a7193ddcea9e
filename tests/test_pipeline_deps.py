"""dvc.yaml and tune/dvc.yaml list each stage's code by package: every module a stage's command
imports (transitively, imports inside functions included) lies under one of its deps, and every
code dep holds something the stage imports. A file list had drifted (tune listed 6 of the 22
modules it imported); this test is what keeps the package deps honest."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT

SRC = REPO_ROOT / "src"
PACKAGE = "wbc_transfer"
PIPELINES = {"dvc.yaml": REPO_ROOT, "tune/dvc.yaml": REPO_ROOT}  # tune runs at the root (wdir: ..)


def module_file(name: str) -> Path | None:
    path = SRC.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def imported(name: str) -> set[str]:
    """The package's modules `name` imports, with every parent package (its __init__ runs)."""
    file = module_file(name)
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    modules = set()
    for dotted in found:
        parts = dotted.split(".")
        if parts[0] == PACKAGE:
            modules |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)
                        if module_file(".".join(parts[:i]))}
    return modules


def closure(name: str) -> set[Path]:
    seen: set[str] = set()
    todo = [name]
    while todo:
        module = todo.pop()
        if module not in seen and module_file(module):
            seen.add(module)
            todo += imported(module)
    return {module_file(m).relative_to(REPO_ROOT) for m in seen if not docstring_only(m)}


def docstring_only(name: str) -> bool:
    """A package __init__ that holds nothing but its docstring changes no stage's result."""
    body = ast.parse(module_file(name).read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def stages() -> list[tuple[str, str, list[str]]]:
    """(pipeline, stage, deps) of every stage whose command is `wbc-transfer <stage>`."""
    rows = []
    for pipeline in PIPELINES:
        for name, stage in yaml.safe_load((REPO_ROOT / pipeline).read_text())["stages"].items():
            body = stage.get("do", stage)
            command = re.match(r"wbc-transfer ([a-z-]+)", body["cmd"])
            rows.append((pipeline, name, command.group(1), [str(d) for d in body.get("deps", [])]))
    return rows


COMMAND_MODULE = {"check-weights": "weights"}  # cli command -> stages module


@pytest.mark.parametrize(("pipeline", "stage", "command", "deps"), stages(),
                         ids=[f"{p}:{s}" for p, s, _, _ in stages()])
def test_each_stage_lists_every_package_it_imports_and_no_other(pipeline, stage, command, deps):
    code = closure(f"{PACKAGE}.stages.{COMMAND_MODULE.get(command, command)}")
    code_deps = [Path(d) for d in deps if d.startswith("src/")]
    assert Path("src", PACKAGE) not in code_deps, "list the stage's packages, not the whole one"
    missing = sorted(str(f) for f in code if not any(f == d or d in f.parents for d in code_deps))
    assert not missing, f"{pipeline} stage {stage}: add deps covering {missing}"
    unused = [str(d) for d in code_deps if not any(f == d or d in f.parents for f in code)]
    assert not unused, f"{pipeline} stage {stage}: deps it does not import: {unused}"
