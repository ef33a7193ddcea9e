"""What runs around one training (`wbc_transfer.training.trainer.fit`) in the `train` stage: its
MLflow params, the progress bar and per-epoch logging and checkpoints, temperature scaling and the
output files. Every function takes plain values (no `Params`): the stage reads the settings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import infer_signature
from tqdm import tqdm

from wbc_transfer.config import TrainParams
from wbc_transfer.data.sets import MIN_TRAIN_BATCH, ImageSet, batch_count, last_batch, normalise
from wbc_transfer.engine import evaluate
from wbc_transfer.evaluation import calibration
from wbc_transfer.io import write_csv, write_json, write_torch
from wbc_transfer.models import registry as models
from wbc_transfer.plots import training_curves
from wbc_transfer.serving.pyfunc import pip_requirements
from wbc_transfer.training import trainer as training
from wbc_transfer.training.trainer import Training

log = logging.getLogger(__name__)

TIMINGS = ["train_images_per_s", "torch_threads"]  # differ on every run: MLflow only, not DVC


def run_params(t: TrainParams, device: torch.device, resolved: dict[str, object],
               train_set: ImageSet, val_set: ImageSet) -> dict[str, object]:
    """The MLflow params of a new run from its train settings `t`, resolved settings and data
    (before the repository's git commit, data md5, split seed and thread policy: the stage's)."""
    return {
        **resolved, "lr_head": t.lr * t.head_lr_factor, "device": device.type,
        "validation_split": "val (leak-free validation cells)",
        "train_images": len(train_set), "train_cells": len(set(train_set.groups)),
        "validation_images": len(val_set), "validation_cells": len(set(val_set.groups)),
        "selection": f"{t.keep} epoch by validation macro-F1"
                     + (f", early stopping patience {t.patience}" if t.patience else ""),
        "last_batch": last_batch(len(train_set), t.batch_size),
    }


def manifest(data: ImageSet) -> pd.DataFrame:
    """path, split, label of every image of the prepared set (the MLflow dataset)."""
    return pd.DataFrame({"path": data.paths, "split": data.splits,
                         "label": [data.classes[i] for i in data.labels.tolist()]})


def tracked_fit(run: Training, train_set: ImageSet, val_set: ImageSet, name: str,
                save_checkpoint: Callable[[Training], None], eval_batch_size: int, tta: bool) -> None:
    """`trainer.fit` with a progress bar, the per-epoch and per-iteration metrics logged to the
    active MLflow run and `save_checkpoint(run)` after every epoch."""
    epochs = run.t.epochs
    per_epoch = batch_count(len(train_set), run.t.batch_size, MIN_TRAIN_BATCH)
    progress = tqdm(total=epochs * per_epoch, initial=len(run.history) * per_epoch,
                    unit="batch", desc=f"{name} epoch {len(run.history) + 1}/{epochs}",
                    mininterval=1)

    def on_epoch(row: dict[str, float], run: Training) -> None:
        mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
        save_checkpoint(run)
        progress.write(f"{name} epoch {row['epoch']}: train loss {row['train_loss']:.3f} "
                       f"acc {row['train_accuracy']:.3f} | val loss {row['val_loss']:.3f} "
                       f"acc {row['val_accuracy']:.3f} F1 {row['val_f1_macro']:.3f}")
        progress.set_description(f"{name} epoch {min(row['epoch'] + 1, epochs)}/{epochs}")

    training.fit(run, train_set, val_set, eval_batch_size=eval_batch_size, tta=tta,
                 on_epoch=on_epoch, on_iteration=lambda i, m: mlflow.log_metrics(m, step=i),
                 progress=progress)
    progress.close()
    if run.stopped_early:
        log.info("%s: stopped early after epoch %d: no better validation macro-F1 since "
                 "epoch %d", name, len(run.history), run.best_epoch)


def write_outputs(run: Training, data: ImageSet, val_set: ImageSet, out: Path, protocol: str,
                  run_id: str, eval_batch_size: int, tta: bool) -> dict[str, object]:
    """Temperature-scale the kept model (on `val_set`), then write model.pt, history.csv,
    run.json (returned), metrics.json and the curves under `out` (the model's folder), and log
    them and the model to the active MLflow run. The settings are `run.t`, the ones it trained with."""
    t, built = run.t, run.built
    kept_epoch = run.kept_epoch
    kept = run.history[kept_epoch - 1]
    name = out.name
    calibrated = fit_temperature(run.model, val_set, built, run.device, eval_batch_size, run.amp, tta)
    mlflow.log_metrics({"selected_epoch": kept_epoch, "selected_val_f1_macro": kept["val_f1_macro"],
                        "selected_val_accuracy": kept["val_accuracy"],
                        "epochs_run": len(run.history), **calibrated})
    frame = pd.DataFrame(run.history).drop(columns=TIMINGS, errors="ignore")
    model_cpu = run.model.to("cpu", memory_format=torch.contiguous_format).eval()
    write_torch(out / "model.pt", model_cpu.state_dict())
    write_csv(out / "history.csv", frame)
    info = {"run_id": run_id, "architecture": run.arch, "protocol": protocol, "seed": run.seed,
            "weights_source": built.weights_source, "image_size": data.size,
            "mean": list(built.mean), "std": list(built.std), "classes": data.classes,
            "validation_split": "val", "recipe": t.recipe, "tta": tta,
            "stain_norm": t.stain_norm, "norm_layer": t.norm_layer,
            "view": data.view, "cell_fraction": data.cell_fraction,
            "selected_epoch": kept_epoch, "temperature": calibrated["temperature"],
            "temperature_fitted_on": f"validation cells ({len(val_set)} images, "
                                     f"{len(set(val_set.groups or val_set.paths))} cells)"}
    write_json(out / "run.json", info)
    write_json(out / "metrics.json", {
        **{k: v for k, v in kept.items() if k in frame.columns},
        "selected_epoch": kept_epoch, "epochs_run": len(run.history),
        "selected_by": "validation macro-F1 (leak-free validation cells)" if t.keep == "best"
                       else "last epoch",
        "weights_source": built.weights_source, **calibrated})
    curves = training_curves(frame, f"{name} ({built.weights_source})", out / "curves.png")
    mlflow.log_artifact(str(curves))
    mlflow.log_artifact(str(out / "history.csv"))
    log_model(model_cpu, data, built.mean, built.std)
    return info


def fit_temperature(model: torch.nn.Module, val_set: ImageSet, built: models.Built,
                    device: torch.device, batch_size: int, amp: torch.dtype | None,
                    tta: bool) -> dict[str, float]:
    """Temperature scaling of the kept model, fitted by NLL on the leak-free validation cells
    (`wbc_transfer.evaluation.calibration.fit_temperature`; never a test set), with the validation NLL
    and ECE before and after it (the keys logged to MLflow and written to metrics.json)."""
    r = evaluate(model, val_set, built.mean, built.std, device, batch_size, amp, tta=tta)
    temperature = calibration.fit_temperature(r.logits, r.labels)
    before, after = calibration.softmax(r.logits), calibration.softmax(r.logits, temperature)
    return {"temperature": round(temperature, 6),
            "val_nll_uncalibrated": calibration.nll(r.logits, r.labels),
            "val_nll": calibration.nll(r.logits, r.labels, temperature),
            "val_ece_uncalibrated": calibration.ece(before, r.labels),
            "val_ece": calibration.ece(after, r.labels)}


def log_model(model: torch.nn.Module, data: ImageSet, mean, std) -> None:
    """Log the fine-tuned network with an input example and signature (normalised float input)."""
    example = normalise(data.images[:2], mean, std).numpy()
    with torch.inference_mode():
        output = model(torch.from_numpy(example)).numpy()
    # explicit requirements: MLflow's inference re-imports the model in a subprocess (~6 s)
    mlflow.pytorch.log_model(model, name="model", input_example=example,
                             signature=infer_signature(example, output.astype(np.float32)),
                             pip_requirements=pip_requirements())
