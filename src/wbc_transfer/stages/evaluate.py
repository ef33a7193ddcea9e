"""DVC stage `evaluate@<arch>-<protocol>-<seed>`: score one trained model on every evaluation set.

Sets: `validation` (the leak-free validation cells every protocol shares: what promotion
chooses by), the protocol's own test split (`paper_test` for the paper protocols), the
leak-free TEST folder, TEST_SIMPLE when the dataset has it, and every external set of params
`external` (other labs; test sets: reported, never chosen by). Each set is scored per image
and per cell (a cell is right when more than half of its images are), with cluster-bootstrap
intervals over cells and the effective n (cells) beside n (images).
"""

from __future__ import annotations

import logging

import mlflow
import numpy as np
import pandas as pd
import torch

from wbc_transfer import models, tracking
from wbc_transfer.config import Params
from wbc_transfer.data import ImageSet
from wbc_transfer.engine import amp_dtype, configure_torch, evaluate, pick_device, place_model
from wbc_transfer.io import read_json, write_csv, write_json
from wbc_transfer.metrics import SUMMARY_METRICS, classification_metrics
from wbc_transfer.plots import confusion_matrix
from wbc_transfer.stages.train import model_name
from wbc_transfer.stats import bootstrap_settings, cell_outcomes, intervals

log = logging.getLogger(__name__)


def evaluation_sets(params: Params, protocol: str) -> dict[str, ImageSet]:
    """name -> images; capped per class by evaluate.max_per_class (deterministic)."""
    prepared = params.resolve(params.prepare.out_dir)
    cap, seed = params.evaluate.max_per_class, params.split.seed
    heldout = ImageSet.load(prepared / "heldout.pt")
    own = heldout if protocol == "heldout" else ImageSet.load(prepared / f"{protocol}.pt")
    sets: dict[str, ImageSet] = {"validation": own.subset("val")}
    if protocol != "heldout":
        sets["paper_test"] = own.subset("test", cap, seed)
    sets["TEST"] = heldout.subset("test", cap, seed)
    simple = heldout.subset("test_simple", cap, seed)
    if len(simple):
        sets["TEST_SIMPLE"] = simple
    # other labs' sets (stage external@<name>): scored whole, each image its own cell unless a
    # manifest gave groups; reported only, never chosen by
    external = params.resolve(params.prepare.external_dir)
    for name in params.external:
        if not (external / f"{name}.pt").is_file():
            raise FileNotFoundError(f"{external / name}.pt not found: run `dvc repro "
                                    f"external@{name}` (params `external.{name}`)")
        sets[name] = ImageSet.load(external / f"{name}.pt")
    return sets


def load_trained(params: Params, name: str) -> tuple[torch.nn.Module, dict]:
    folder = params.resolve(params.train.out_dir) / name
    info = read_json(folder / "run.json")
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    return models.rebuild(info, state), info


def main(params: Params, arch: str, protocol: str, seed: int) -> dict[str, object]:
    name = model_name(arch, protocol, seed)
    out = params.resolve(params.evaluate.out_dir) / name
    configure_torch(params.train.num_threads)
    device = pick_device(params.train.device)
    model, info = load_trained(params, name)
    model = place_model(model, device, params.evaluate.channels_last)
    classes = info["classes"]
    results: dict[str, object] = {}
    amp = amp_dtype(device, params.train.amp)
    with tracking.run(params, run_id=info["run_id"]):
        for set_name, data in evaluation_sets(params, protocol).items():
            data = data.resized(int(info["image_size"]))
            r = evaluate(model, data, info["mean"], info["std"], device, params.evaluate.batch_size,
                         amp, tta=params.evaluate.tta)
            groups = data.groups or data.paths
            scores = classification_metrics(r.labels, r.predictions, classes)
            scores["n_cells"] = int(len(set(groups)))
            scores["cell_accuracy"] = float(cell_outcomes(r.labels == r.predictions, groups).mean())
            scores["ci"] = intervals(params, r.labels, r.predictions, len(classes), groups)
            results[set_name] = scores
            frame = pd.DataFrame({
                "path": data.paths,
                "group": groups,
                "actual": [classes[i] for i in r.labels],
                "predicted": [classes[i] for i in r.predictions],
                **{f"p_{c}": np.round(r.probabilities[:, i], 6) for i, c in enumerate(classes)},
            })
            write_csv(out / "predictions" / f"{set_name}.csv", frame)
            matrix = np.array(scores["confusion_matrix"])
            write_csv(out / "figures" / f"confusion_{set_name}.csv",
                      pd.DataFrame(matrix, index=classes, columns=classes).rename_axis("actual")
                      .reset_index())
            title = (f"{name} on {set_name} (n={scores['n']} images, {scores['n_cells']} cells, "
                     f"acc {scores['accuracy']:.3f})")
            png = confusion_matrix(matrix, classes, title, out / "figures" / f"confusion_{set_name}.png")
            per_class = pd.DataFrame(scores["per_class"]).T.rename_axis("class").reset_index()
            write_csv(out / "figures" / f"per_class_{set_name}.csv", per_class)
            mlflow.log_metrics({f"{set_name}_{m}": float(scores[m])
                                for m in (*SUMMARY_METRICS, "cell_accuracy", "n_cells")})
            mlflow.log_metrics({f"{set_name}_{m}_ci_{end}": float(v)
                                for m, ci in scores["ci"].items()
                                for end, v in zip(("low", "high"), ci, strict=True)})
            for artifact in (png, out / "figures" / f"confusion_{set_name}.csv",
                             out / "figures" / f"per_class_{set_name}.csv"):
                mlflow.log_artifact(str(artifact), artifact_path="evaluation")
            log.info("%s on %s: accuracy %.3f, macro-F1 %.3f, per-cell accuracy %.3f "
                     "(n=%d images, %d cells)", name, set_name, scores["accuracy"],
                     scores["f1_macro"], scores["cell_accuracy"], scores["n"], scores["n_cells"])
    # the run id changes with every training run: beside the metrics, not in them (DVC compares
    # metrics.json across runs and experiments)
    write_json(out / "run.json", {"model": name, "run_id": info["run_id"]})
    summary = {"model": name, "architecture": arch,
               "protocol": protocol, "seed": seed, "weights_source": info["weights_source"],
               "recipe": info.get("recipe", "paper"), "tta": bool(params.evaluate.tta),
               "bootstrap": bootstrap_settings(params), "sets": results}
    write_json(out / "metrics.json", summary)
    return summary
