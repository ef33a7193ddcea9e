"""One training code for the train stage and the tuner (wbc_transfer.training.trainer): a tuning trial
and a train stage run with the values `--apply` prints build the same model and reach the same
validation scores, epoch by epoch. Real training: EfficientNet-Lite0 from random init on a few
dozen real mirror images, 1 thread (CPU results depend on the thread count)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

import wbc_transfer
from wbc_transfer import tracking
from wbc_transfer.config import Params, load_params, train_params_for
from wbc_transfer.data.sets import ImageSet
from wbc_transfer.stages import train
from wbc_transfer.training import trainer as training
from wbc_transfer.tuning import objective, report
from wbc_transfer.tuning import study as tuning_study

from conftest import prepare_tiny, write_params

ARCH = "efficientnet_lite0"
SEED = 42
# not the defaults: a trial must carry each of them into the model as the train stage does
TRIAL = {"lr": 0.003, "head_lr_factor": 3.0, "weight_decay": 0.01, "augment_strength": 1.5}


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> Path:
    """paper.pt / heldout.pt at 40 px: paper train 8/class, validation 2/class, test 2/class."""
    out = tmp_path_factory.mktemp("prepared")
    prepare_tiny(mirror, out, n_train=8, n_val=2, n_test=2, n_heldout_test=2, size=40)
    return out


def make_params(repo: Path, prepared: Path, **overrides) -> Params:
    settings = {
        "base.tracking_uri": f"sqlite:///{repo / 'mlflow.db'}",
        "prepare.out_dir": str(prepared), "split.out_dir": str(prepared / "splits"),
        "train.weights": "none", "train.num_threads": 1, "train.batch_size": 8,
        # the quick run's modern recipe, LAB input layer and keep-best, at its own input size
        "train.input_size": 32, "train.patience": 1,
        "evaluate.max_per_class": None,
        "tune.protocol": "paper", "tune.trials": 2, "tune.epochs": 3, "tune.seed": SEED,
        "tune.storage": "sqlite:///optuna.db", "tune.pruner.name": "none",
    }
    settings.update(overrides)
    return load_params(write_params(repo, "unused", **settings))


@pytest.mark.slow
def test_a_trial_and_the_train_stage_with_its_values_give_the_same_history(tmp_path, prepared,
                                                                         capsys):
    # the tuner: one trial at TRIAL (the enqueued point; its values as --apply prints them)
    params = make_params(tmp_path / "tune", prepared)
    ctx = objective.load_context(params, ARCH)
    tuning_study.open_study(ctx).study.enqueue_trial(TRIAL)  # after the baseline: 2 trials
    [trial] = [t for t in tuning_study.search(ctx).study.trials if not t.user_attrs.get("baseline")]
    assert trial.state.name == "COMPLETE"
    values = trial.user_attrs["train"]
    assert values == {"lr": 0.003, "head_lr_factor": 3.0, "weight_decay": 0.01,
                      "colour_jitter": 0.15, "hed_jitter": 0.0, "translate_px": 45}
    epochs = report.apply_epochs(ctx.train, trial.user_attrs["best_epoch"])
    assert epochs == 3  # modern recipe: the trial's schedule; keep-best keeps the best epoch
    line = report.apply_command({**values, "epochs": epochs})
    assert line == ("dvc exp run -S train.lr=0.003 -S train.head_lr_factor=3 "
                    "-S train.weight_decay=0.01 -S train.colour_jitter=0.15 "
                    "-S train.hed_jitter=0 -S train.translate_px=45 -S train.epochs=3")

    # the train stage with those -S values
    applied = make_params(tmp_path / "train", prepared,
                          **{f"train.{k}": v for k, v in {**values, "epochs": epochs}.items()})
    capsys.readouterr()
    train.main(applied, ARCH, "paper", SEED)
    shown = capsys.readouterr().err  # the progress bar: it said "epoch 4/3" after the last epoch
    assert f"epoch {epochs}/{epochs}" in shown and f"epoch {epochs + 1}/{epochs}" not in shown
    out = applied.resolve(applied.train.out_dir) / training.model_name(ARCH, "paper", SEED)
    history = pd.read_csv(out / "history.csv")
    trial_f1 = [trial.intermediate_values[e] for e in sorted(trial.intermediate_values)]
    assert history["val_f1_macro"].tolist() == pytest.approx(trial_f1, rel=1e-12)
    client = MlflowClient(tracking.tracking_uri(params))
    trial_loss = [m.value for m in sorted(client.get_metric_history(
        trial.user_attrs["mlflow_run_id"], "val_loss"), key=lambda m: m.step)]
    assert history["val_loss"].tolist() == pytest.approx(trial_loss, rel=1e-6, abs=1e-9)
    assert pd.read_json(out / "metrics.json", typ="series")["selected_epoch"] == \
        trial.user_attrs["best_epoch"]
    assert trial.value == pytest.approx(history["val_f1_macro"][trial.user_attrs["best_epoch"] - 1])
    assert pd.read_json(out / "run.json", typ="series")["image_size"] == 32  # train.input_size

    # and the comparison can fail: the same trial at another input size (what the tuner's own
    # loop used to do: it ignored train.input_size) is another model with other scores
    t = ctx.train.model_copy(update={**values, "input_size": None})
    other = training.train_model(t, ARCH, ctx.fit_set, ctx.val_set, seed=SEED,
                                 eval_batch_size=params.evaluate.batch_size)
    assert other.spec.size == 40
    assert [r["val_loss"] for r in other.history] != pytest.approx(trial_loss, rel=1e-6)


def test_resolve_input_is_the_one_place_for_size_mean_and_std(tmp_path):
    params = load_params(write_params(tmp_path, "unused", **{
        "train.input_size": 48, "train.overrides": {"alexnet": {"input_size": 64}}}))
    lite = training.resolve_input(ARCH, train_params_for(params, ARCH), 32)
    assert (lite.size, lite.mean) == (48, (0.498, 0.498, 0.498))
    alexnet = training.resolve_input("alexnet", train_params_for(params, "alexnet"), 32)
    assert (alexnet.size, alexnet.mean) == (64, (0.485, 0.456, 0.406))
    unset = train_params_for(params, ARCH).model_copy(update={"input_size": None})
    assert training.resolve_input(ARCH, unset, 32).size == 32  # the prepared size
    with pytest.raises(KeyError, match="unknown architecture"):
        training.resolve_input("lenet", unset, 32)


# --- what starts a new study -------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "changes"), [
    ({"train.input_size": 32}, True),
    ({"train.overrides": {ARCH: {"input_size": 32}}}, True),
    ({"train.stain_norm": "none"}, True),
    ({"train.norm_layer": "frozen"}, True),
    ({"train.patience": 1}, True),
    ({"train.keep": "last"}, True),
    ({"train.hed_jitter": 0.05}, True),
    ({"train.weight_decay": 0.01}, True),  # the baseline trial's
    ({"train.num_threads": 2}, True),
    ({"tune.space.augment_strength": [1.0, 2.0]}, True),
    ({"tune.space.weight_decay_high": 0.2}, True),
    ({"evaluate.tta": True}, True),
    # what a trial never reads: the searched values, epochs (tune.epochs), where outputs go
    ({"train.lr": 0.5, "train.head_lr_factor": 7, "train.epochs": 9}, False),
    ({"train.out_dir": "elsewhere", "train.validate_every": 3, "train.seeds": [1, 2]}, False),
    ({"train.overrides": {"alexnet": {"epochs": 4}}}, False),
])
def test_study_name_changes_with_what_changes_a_trial(tmp_path, prepared, overrides, changes):
    base = {"prepare.out_dir": str(prepared), "train.input_size": None}
    data = ImageSet.load(prepared / "paper.pt")
    train_set, val_set = data.subset("train"), data.subset("val")

    def name(repo: str, **extra) -> str:
        params = load_params(write_params(tmp_path / repo, "unused", **{**base, **extra}))
        return objective.study_name(params, ARCH, train_set, val_set)

    assert (name("a") != name("b", **overrides)) is changes


def test_code_digest_covers_every_module_whatever_its_name(tmp_path):
    package = Path(wbc_transfer.__file__).parent  # the whole package, subpackages included
    copy = tmp_path / "pkg"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert objective.training_code_digest(copy) == objective.training_code_digest()
    (copy / "models" / "robustness.py").rename(copy / "renamed.py")  # names and folders do not count
    assert objective.training_code_digest(copy) == objective.training_code_digest()
    with (copy / "renamed.py").open("a") as f:  # every module's content does
        f.write("\n# changed\n")
    assert objective.training_code_digest(copy) != objective.training_code_digest()
