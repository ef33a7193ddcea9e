"""params.yaml loading: numbers in any YAML form, and one-line errors naming the parameter."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvc.utils.hydra import apply_overrides

from wbc_transfer import cli
from wbc_transfer.config import ConfigError, load_params

from conftest import REPO_ROOT, write_params


def test_numbers_written_by_dvc_exp_run_set_param_load_as_numbers(tmp_path: Path):
    """`dvc exp run -S train.lr=0.00002` writes `lr: 2e-05`, which PyYAML reads as text."""
    file = tmp_path / "params.yaml"
    shutil.copyfile(REPO_ROOT / "params.yaml", file)
    # DVC's own code path for `-S` (Hydra overrides applied to params.yaml)
    apply_overrides(file, ["train.lr=0.00002", "tune.space.lr_low=1e-6", "tune.timeout=3e2"])
    assert "lr: 2e-05" in file.read_text()
    params = load_params(file)
    assert params.train.lr == pytest.approx(2e-5) and isinstance(params.train.lr, float)
    assert params.tune.space.lr_low == pytest.approx(1e-6)
    assert params.tune.timeout == pytest.approx(300.0)


@pytest.mark.parametrize(("key", "text", "expected"), [
    ("train.lr", "1e-4", 1e-4),
    ("train.momentum", ".5", 0.5),
    ("train.head_lr_factor", "1E+1", 10.0),
    ("split.paper.test_fraction", "3e-1", 0.3),
    ("train.epochs", "1e1", 10),  # a whole number in e-notation
    ("evaluate.max_per_class", "50", 50),
    ("train.seeds", ["1", 2], (1, 2)),
])
def test_numbers_in_any_form_load_as_numbers(tmp_path: Path, key: str, text, expected):
    params = load_params(write_params(tmp_path, "unused", **{key: text}))
    section, *rest = key.split(".")
    value = getattr(params, section)
    for name in rest:
        value = getattr(value, name)
    assert value == pytest.approx(expected) if not isinstance(expected, tuple) else \
        value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("train.lr", "abc", "train.lr must be a number, got 'abc'"),
    ("train.epochs", 2.5, "train.epochs must be a whole number, got 2.5"),
    ("train.channels_last", "yes", "train.channels_last must be true or false, got 'yes'"),
    ("train.architectures", "alexnet", "train.architectures must be a list, got 'alexnet'"),
    ("train.seeds", [1, "x"], "train.seeds[1] must be a whole number, got 'x'"),
    ("evaluate.max_per_class", "all", "evaluate.max_per_class must be a whole number or null"),
    ("tune.space.lr_high", "abc", "tune.space.lr_high must be a number, got 'abc'"),
    ("base.experiment", 7, "base.experiment must be a string, got 7"),
    ("split.paper", 3, "split.paper must be a mapping of parameters, got 3"),
])
def test_a_wrong_type_is_a_one_line_error_naming_the_parameter(tmp_path: Path, key, value,
                                                                message):
    with pytest.raises(ConfigError) as error:
        load_params(write_params(tmp_path, "unused", **{key: value}))
    text = str(error.value)
    assert message in text and "\n" not in text
    assert text.startswith("params.yaml: ")


def test_the_cli_stops_with_the_one_line_error(tmp_path: Path, capsys):
    file = write_params(tmp_path, "unused", **{"train.lr": "abc"})
    assert cli.main(["--params", str(file), "train", "--arch", "alexnet", "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "wbc-transfer: params.yaml: train.lr must be a number, got 'abc'"


def test_per_architecture_overrides_are_typed_and_checked(tmp_path):
    from wbc_transfer.config import train_params_for

    params = load_params(write_params(tmp_path, "unused", **{
        "train.epochs": 5, "train.overrides": {"vgg16": {"input_size": "32", "epochs": 1.0}}}))
    vgg, other = train_params_for(params, "vgg16"), train_params_for(params, "alexnet")
    assert (vgg.input_size, vgg.epochs) == (32, 1) and isinstance(vgg.epochs, int)
    assert (other.input_size, other.epochs) == (None, 5)
    with pytest.raises(ConfigError, match=r"train\.overrides\.vgg16: unknown or not overridable \['epoch'\]"):
        load_params(write_params(tmp_path, "unused", **{"train.overrides": {"vgg16": {"epoch": 1}}}))
    with pytest.raises(ConfigError, match=r"train\.overrides\.vgg16\.epochs must be a whole number"):
        load_params(write_params(tmp_path, "unused", **{"train.overrides": {"vgg16": {"epochs": "x"}}}))
    with pytest.raises(ConfigError, match=r"train\.overrides\.vgg16\.input_size=16 is too small for vgg16"):
        load_params(write_params(tmp_path, "unused", **{"train.overrides": {"vgg16": {"input_size": 16}}}))


def _make_overrides(target: str) -> list[str]:
    """The `-S` values of `make -n <target>` (paper, best: the tuned settings `make best` reads
    from results/tune/ included), as `dvc exp run` gets them."""
    env = {k: v for k, v in os.environ.items() if k not in {"MAKELEVEL", "MAKEFLAGS", "MFLAGS"}}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    line = subprocess.run(["make", "-n", target], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, check=True).stdout.splitlines()[0]
    return [v.strip("'") for v in re.findall(r"-S ('[^']*'|\S+)", line)]


@pytest.mark.parametrize("target", ["paper", "best"])
def test_makefile_experiments_give_params_every_stage_can_read(tmp_path, target):
    """`make paper` deleted train.overrides, which every train@ stage lists: DVC refused the stage."""
    shutil.copyfile(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    overrides = _make_overrides(target)
    assert overrides, target
    apply_overrides(str(tmp_path / "params.yaml"), overrides)
    params = load_params(tmp_path / "params.yaml")  # the loader accepts the result
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    listed = {p for stage in stages.values() for p in stage.get("do", stage).get("params", [])
              if isinstance(p, str)}
    for dotted in listed:  # DVC needs every listed parameter to exist
        node = raw
        for key in dotted.split("."):
            assert isinstance(node, dict) and key in node, f"{target}: {dotted} missing"
            node = node[key]
    if target == "paper":
        assert params.train.recipe == "paper" and not params.train.overrides
        assert set(params.train.protocols) == {"paper", "paper_grouped"}
    else:  # the committed study's winner with its tuned values, at make best's own epochs
        studies = REPO_ROOT / "results" / "tune"
        scores = {d.name: json.loads((d / "summary.json").read_text())["best"]["val_f1_macro"]
                  for d in studies.iterdir() if (d / "summary.json").is_file()}
        winner = max(scores, key=scores.__getitem__)
        tuned = yaml.safe_load((studies / winner / "best_params.yaml").read_text())["train"]
        assert list(params.train.architectures) == [winner]
        assert {k: getattr(params.train, k) for k in tuned if k != "epochs"} == pytest.approx(
            {k: v for k, v in tuned.items() if k != "epochs"})
        assert sum(o.startswith("train.epochs=") for o in overrides) == 1  # not the proxy's


def test_unknown_architectures_are_refused_before_any_stage(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.architectures: unknown architecture\(s\) \['resnet5'\]"):
        load_params(write_params(tmp_path, "unused", **{"train.architectures": ["resnet5"]}))
    with pytest.raises(ConfigError, match=r"train\.overrides: unknown architecture\(s\) \['vgg17'\]"):
        load_params(write_params(tmp_path, "unused", **{"train.overrides": {"vgg17": {"epochs": 1}}}))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"prepare.image_size": 48, "train.architectures": ["alexnet", "efficientnet_lite0"]},
     r"prepare\.image_size=48 is too small for alexnet: its input "
     r"must be at least 63 px \(allowed: 63 and up"),
    ({"prepare.image_size": 62, "train.architectures": ["vgg16", "alexnet"]},
     r"prepare\.image_size=62 is too small for alexnet"),
    ({"train.input_size": 40, "train.architectures": ["alexnet"]},
     r"train\.input_size=40 is too small for alexnet"),
    ({"train.overrides": {"alexnet": {"input_size": 32}}, "train.architectures": ["alexnet"]},
     r"train\.overrides\.alexnet\.input_size=32 is too small for alexnet"),
    ({"prepare.image_size": 16, "train.architectures": ["efficientnet_lite0"],
      "tune.architectures": ["vgg16"]}, r"prepare\.image_size=16 is too small for vgg16: .* 32 px"),
])
def test_an_input_too_small_for_an_architecture_is_refused_naming_the_parameter(
        tmp_path, overrides, message):
    """AlexNet's last pooling has nothing to pool below 63 px: at 32-62 px the parameter check
    passed and training crashed in the first forward pass."""
    with pytest.raises(ConfigError, match=message):
        load_params(write_params(tmp_path, "unused", **overrides))


def test_every_minimum_in_the_registry_is_the_true_one():
    """A forward pass works at each architecture's `min_input_size` and fails 1 px below."""
    import torch

    from wbc_transfer.models import registry as models

    for name, arch in models.REGISTRY.items():
        built = models.build(name, 4, "none", arch.min_input_size).model.eval()
        with torch.no_grad():
            built(torch.rand(1, 3, arch.min_input_size, arch.min_input_size))
            if arch.min_input_size > 8:
                with pytest.raises(RuntimeError):
                    built(torch.rand(1, 3, arch.min_input_size - 1, arch.min_input_size - 1))


# --- the schema (pydantic): params.yaml is the one source of every value --------------------

def test_params_yaml_holds_every_value_and_the_schema_reads_each_as_written():
    """No defaults in the schema: every parameter the code reads is in params.yaml, every key
    of params.yaml is a parameter, and each loaded value equals what the file says."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    loaded = load_params(REPO_ROOT / "params.yaml").model_dump()

    def same(written, value, where):
        if isinstance(written, dict):
            assert set(written) == set(value), where
            for key in written:
                same(written[key], value[key], f"{where}.{key}")
        elif isinstance(written, list):
            assert len(written) == len(value), where
            for i, (w, v) in enumerate(zip(written, value, strict=True)):
                same(w, v, f"{where}[{i}]")
        else:
            assert written == value and (written is None) == (value is None), where

    same(raw, loaded, "params")


def test_a_missing_parameter_is_named(tmp_path):
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    del raw["train"]["lr"], raw["compare"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as error:
        load_params(tmp_path / "params.yaml")
    assert "train.lr is missing" in str(error.value) and "compare is missing" in str(error.value)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"train.lrr": 1}, "train: unknown parameter(s) ['lrr'] (did you mean 'lr'?)"),
    ({"trian": {"lr": 1}}, "unknown section(s) ['trian'] (did you mean 'train'?)"),
    ({"tune.space.zzz": 1},
     "tune.space: unknown parameter(s) ['zzz']; known: ['augment_strength', 'head_lr_factor_high'"),
    ({"external.tecom.manifst": None}, "external.tecom: unknown parameter(s) ['manifst']"),
])
def test_an_unknown_key_is_an_error_naming_it(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as error:
        load_params(write_params(tmp_path, "unused", **{"external": {"tecom": {"root": "x"}}},
                                 **overrides))
    assert message in str(error.value)


def test_an_image_too_small_for_alexnet_is_refused_at_load_naming_the_minimum(tmp_path):
    """AlexNet needs 63 px: prepare.image_size 32-62 used to pass and crash at train time."""
    with pytest.raises(ConfigError) as error:
        load_params(write_params(tmp_path, "unused", **{
            "prepare.image_size": 40, "train.architectures": ["efficientnet_lite0", "alexnet"]}))
    assert str(error.value) == (
        "params.yaml: prepare.image_size=40 is too small for alexnet: its input must be at least "
        "63 px (allowed: 63 and up; a smaller image leaves a pooling layer with nothing to pool)")
    ok = load_params(write_params(tmp_path, "unused", **{
        "prepare.image_size": 40, "train.architectures": ["efficientnet_lite0", "alexnet"],
        "train.overrides": {"alexnet": {"input_size": 64}}}))
    assert ok.prepare.image_size == 40


@pytest.mark.parametrize("text", ["2e-05", "2.0e-5", "2E-5", " 2e-05 ", "0.00002"])
def test_the_float_forms_dvc_and_yaml_write_parse(tmp_path, text):
    """PyYAML (YAML 1.1) reads `2e-05` (what `dvc exp run -S train.lr=0.00002` writes) and
    `1e-5` as strings; every form arrives here as text."""
    file = write_params(tmp_path, "unused", **{"train.lr": text})
    assert isinstance(yaml.safe_load(file.read_text())["train"]["lr"], str)
    lr = load_params(file).train.lr
    assert lr == pytest.approx(2e-5) and type(lr) is float


@pytest.mark.parametrize(("key", "value", "message"), [
    ("train.recipe", "moden", "train.recipe must be one of 'paper' or 'modern', got 'moden'"),
    ("train.protocols", ["heldout", "leaky"],
     "train.protocols[1] must be one of 'paper', 'paper_grouped' or 'heldout', got 'leaky'"),
    ("tune.pruner.name", "hyperband",
     "tune.pruner.name must be one of 'median', 'threshold' or 'none', got 'hyperband'"),
    ("prepare.view", "nucleus", "prepare.view must be one of 'full' or 'cell', got 'nucleus'"),
    ("train.device", "gpu", "train.device must be one of 'auto', 'cpu' or 'cuda', got 'gpu'"),
    ("train.amp", "fp16", "train.amp must be one of 'auto', 'bf16' or 'off', got 'fp16'"),
    ("train.stain_norm", "macenko", "train.stain_norm must be one of 'none' or 'lab'"),
    ("validate.policy", "loose", "validate.policy must be one of 'strict' or 'lenient'"),
    ("train.momentum", 1.5, "train.momentum must be in [0, 1), got 1.5"),
    ("split.val_fraction", 0, "split.val_fraction must be in (0, 0.5], got 0"),
    ("split.val_per_class", 0, "split.val_per_class must be a whole number >= 1 or null, got 0"),
])
def test_a_bad_choice_or_range_names_the_parameter_value_and_what_is_allowed(
        tmp_path, key, value, message):
    with pytest.raises(ConfigError) as error:
        load_params(write_params(tmp_path, "unused", **{key: value}))
    assert str(error.value).startswith(f"params.yaml: {message}")
    assert "\n" not in str(error.value)


def test_every_problem_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_params(write_params(tmp_path, "unused", **{
            "train.lr": "abc", "evaluate.tta": "yes", "tune.space.lr_low": 0.5,
            "tune.space.lr_high": 0.01, "train.recipe": "moden", "compare.botstrap": 5,
            "promote.eval_set": "TEST"}))
    head, *lines = str(error.value).splitlines()
    assert head == "params.yaml: 6 problems:"
    assert sorted(line.strip() for line in lines) == sorted([
        "train.recipe must be one of 'paper' or 'modern', got 'moden'",
        "train.lr must be a number, got 'abc'",
        "evaluate.tta must be true or false, got 'yes'",
        "compare: unknown parameter(s) ['botstrap'] (did you mean 'bootstrap'?)",
        "promote.eval_set must be 'validation' (the leak-free validation cells): a test set "
        "('TEST') may be reported, never used to choose the champion",
        "tune.space.lr_low (0.5) must not exceed tune.space.lr_high (0.01): the range is inverted",
    ])


def test_params_are_frozen_and_copied_with_model_copy():
    from pydantic import ValidationError

    params = load_params(REPO_ROOT / "params.yaml")
    with pytest.raises(ValidationError):
        params.train.lr = 1.0
    faster = params.train.model_copy(update={"lr": 0.5})
    assert (faster.lr, params.train.lr) == (0.5, 0.001)
    assert params.model_copy(update={"train": faster}).root == params.root
