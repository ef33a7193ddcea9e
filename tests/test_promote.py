"""Promotion chooses by the leak-free validation cells, never by a test set."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from wbc_transfer.config import ConfigError
from wbc_transfer.stages.promote import rank


def _long(scores: dict[tuple[str, str], dict[str, float]]) -> pd.DataFrame:
    """(architecture, protocol) -> {eval_set: macro-F1} as the comparison's long table."""
    rows = []
    for (arch, protocol), sets in scores.items():
        for eval_set, value in sets.items():
            rows.append({"architecture": arch, "protocol": protocol, "seed": 42,
                         "eval_set": eval_set, "metric": "f1_macro", "value": value,
                         "cell_accuracy": value, "run_id": f"{arch}-{protocol}",
                         "weights_source": "imagenet:x"})
    return pd.DataFrame(rows)


def test_promotion_follows_validation_when_test_disagrees():
    long = _long({
        ("resnet50", "paper"): {"validation": 0.70, "paper_test": 0.99, "TEST": 0.95},
        ("efficientnet_lite0", "heldout"): {"validation": 0.90, "TEST": 0.60},
        ("vgg16", "paper_grouped"): {"validation": 0.80, "paper_test": 0.50, "TEST": 0.97},
    })
    ranked = rank(long, ["paper", "paper_grouped", "heldout"], "validation", "f1_macro")
    assert ranked["architecture"].tolist() == ["efficientnet_lite0", "vgg16", "resnet50"]
    assert ranked["test_value"].tolist() == [0.60, 0.97, 0.95]  # reported, not used
    only_paper = rank(long, ["paper"], "validation", "f1_macro")
    assert only_paper["architecture"].tolist() == ["resnet50"]


def test_a_test_set_cannot_choose_the_champion(make_params, mini_dataset):
    with pytest.raises(ConfigError, match="promote.eval_set must be 'validation'"):
        make_params(mini_dataset, **{"promote.eval_set": "TEST"})
    with pytest.raises(ConfigError, match="promote.eval_set must be 'validation'"):
        make_params(mini_dataset, **{"promote.eval_set": "paper_test"})


# --- the champion is only replaced by a better run, on the same validation cells ---------------
# A real SQLite registry, the real promote stage, real (tiny, random) EfficientNet-Lite0 weights
# and real mirror images; each "experiment" is a repo folder whose evaluate outputs say how well
# its run scored on validation (no training: the stage reads those files).

ARCH, PROTOCOL, SEED = "efficientnet_lite0", "paper", 42


@pytest.fixture(scope="module")
def prepared_sets(tmp_path_factory, mirror):
    """Two prepared versions of the data: `a` (2 validation images per class) and `b` (3: the
    validation cells changed)."""
    from conftest import prepare_tiny

    out = {}
    for name, n_val in (("a", 2), ("b", 3)):
        folder = tmp_path_factory.mktemp(f"prepared-{name}")
        prepare_tiny(mirror, folder, n_train=2, n_val=n_val, n_test=1, n_heldout_test=1)
        out[name] = folder
    return out


def experiment(repo, db, prepared, value: float, head_seed: int = 0):
    """A repo folder as `dvc exp run` leaves it before `promote`: one MLflow run, its trained
    weights (results/train) and its evaluate outputs with validation macro-F1 `value`, scored on
    the validation images of `prepared`. Returns its Params."""
    import mlflow
    import torch
    from champion_helpers import tiny_weights
    from mlflow import MlflowClient

    from wbc_transfer import tracking
    from wbc_transfer.config import load_params
    from wbc_transfer.data.sets import ImageSet
    from wbc_transfer.io import write_json

    from conftest import write_params

    params = load_params(write_params(repo, "unused", **{
        "base.tracking_uri": f"sqlite:///{db}", "prepare.out_dir": str(prepared),
        "train.architectures": [ARCH], "train.protocols": [PROTOCOL], "train.seeds": [SEED],
        "promote.protocols": [PROTOCOL]}))
    experiment_id = tracking.setup(params)
    run_id = MlflowClient().create_run(experiment_id, run_name=f"{ARCH}-{PROTOCOL}-{SEED}").info.run_id
    mlflow.set_tracking_uri(None)
    name = f"{ARCH}-{PROTOCOL}-{SEED}"
    train_dir = params.resolve(params.train.out_dir) / name
    train_dir.mkdir(parents=True)
    torch.manual_seed(head_seed)
    config = tiny_weights(train_dir / "model.pt", head_std=0.05 + head_seed / 100)
    write_json(train_dir / "run.json", {"run_id": run_id, **config, "temperature": 1.0})
    eval_dir = params.resolve(params.evaluate.out_dir) / name
    val = ImageSet.load(prepared / f"{PROTOCOL}.pt").subset("val")
    scores = {"n": len(val), "n_cells": len(val), "cell_accuracy": value, "accuracy": value,
              "precision_macro": value, "recall_macro": value, "f1_macro": value}
    write_json(eval_dir / "metrics.json", {"weights_source": "none", "sets": {"validation": scores}})
    write_json(eval_dir / "run.json", {"run_id": run_id})
    (eval_dir / "predictions").mkdir()
    actual = [val.classes[i] for i in val.labels]
    # compare reads the per-cell outcomes from predictions (the ranking itself is by f1_macro)
    pd.DataFrame({"path": val.paths, "actual": actual, "predicted": actual}).to_csv(
        eval_dir / "predictions" / "validation.csv", index=False)
    return params


def champion_run(db) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    return client.get_model_version_by_alias("wbc-classifier", "champion").run_id


def promote_in(params) -> dict:
    import mlflow

    from wbc_transfer.stages import promote

    try:
        return promote.main(params)
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_a_worse_or_equal_run_never_takes_the_alias(tmp_path, prepared_sets):
    db = tmp_path / "mlflow.db"
    first = promote_in(experiment(tmp_path / "e1", db, prepared_sets["a"], 0.50))
    assert first["promoted"] and first["version"] == "1"
    champion = champion_run(db)

    worse = promote_in(experiment(tmp_path / "e2", db, prepared_sets["a"], 0.31))
    assert not worse["promoted"] and worse["version"] == "1" and champion_run(db) == champion
    assert "0.3100) is not better than champion version 1 (0.5000, stored" in worse["decision"]
    equal = promote_in(experiment(tmp_path / "e3", db, prepared_sets["a"], 0.50))
    assert not equal["promoted"] and champion_run(db) == champion

    better = promote_in(experiment(tmp_path / "e4", db, prepared_sets["a"], 0.60))
    assert better["promoted"] and better["version"] == "2"
    assert champion_run(db) == better["candidate_run_id"] != champion
    assert better["champion_before"]["value"] == 0.5

    # the validation cells changed (3 per class now): the stored 0.60 is not comparable; the
    # champion is re-scored on the new cells, exactly as the evaluate stage scores a run
    champion = champion_run(db)
    changed = promote_in(experiment(tmp_path / "e5", db, prepared_sets["b"], 0.0))
    assert not changed["promoted"] and champion_run(db) == champion
    before = changed["champion_before"]
    assert before["how"].startswith("re-scored on the current validation cells")
    assert before["value"] != 0.6 and 0.0 <= before["value"] < 1.0
    again = promote_in(experiment(tmp_path / "e6", db, prepared_sets["b"], before["value"]))
    assert not again["promoted"]  # equal to the re-scored value, now stored with the new digest
    assert again["champion_before"]["how"] == "stored, same validation cells"
    perfect = promote_in(experiment(tmp_path / "e7", db, prepared_sets["b"], 1.0))
    assert perfect["promoted"] and champion_run(db) == perfect["candidate_run_id"]


@pytest.mark.slow
def test_two_promotions_at_once_leave_the_better_run(tmp_path, prepared_sets):
    """Two experiments finish together, both better than the champion: whatever the order, the
    alias ends on the better one (each compares with the champion the other left)."""
    import subprocess
    import sys
    import time

    db = tmp_path / "mlflow.db"
    promote_in(experiment(tmp_path / "base", db, prepared_sets["a"], 0.50))
    good = experiment(tmp_path / "good", db, prepared_sets["a"], 0.60, head_seed=1)
    best = experiment(tmp_path / "best", db, prepared_sets["a"], 0.80, head_seed=2)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs = []
    for p in (best, good):  # the worse one starts a little later, so it would finish last
        procs.append(subprocess.Popen([sys.executable, "-m", "wbc_transfer.cli", "--params",
                                       str(p.root / "params.yaml"), "promote"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        time.sleep(2)
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    from wbc_transfer.io import read_json

    best_run = read_json(best.resolve(best.evaluate.out_dir) / f"{ARCH}-{PROTOCOL}-{SEED}"
                         / "run.json")["run_id"]
    assert champion_run(db) == best_run, outputs
