"""DVC stage `train@<arch>-<protocol>-<seed>`: fine-tune one architecture, tracked in MLflow.

The model is built and fitted by `wbc_transfer.training.trainer` (as every tuning trial is: the same
model, the same numbers); this stage adds what runs around it: the checkpoint it resumes from,
the MLflow run, the progress bar, temperature scaling and the output files.
"""

from __future__ import annotations

import logging

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import infer_signature
from tqdm import tqdm

from wbc_transfer import tracking
from wbc_transfer.config import Params, train_params_for
from wbc_transfer.data.sets import MIN_TRAIN_BATCH, ImageSet, batch_count, last_batch, normalise
from wbc_transfer.engine import Checkpoint, configure_torch, evaluate, pick_device
from wbc_transfer.evaluation import calibration
from wbc_transfer.io import write_csv, write_json, write_torch
from wbc_transfer.models import registry as models
from wbc_transfer.plots import training_curves
from wbc_transfer.serving.pyfunc import pip_requirements
from wbc_transfer.training import trainer as training
from wbc_transfer.training.threads import policy_for as thread_policy
from wbc_transfer.training.trainer import Training, model_name, resolve_input

log = logging.getLogger(__name__)

# train parameters that name what to train or where outputs go, not how: not run params
NOT_RUN_PARAMS = ("architectures", "protocols", "seeds", "out_dir", "checkpoint_dir",
                  "weights_report", "overrides")
TIMINGS = ["train_images_per_s", "torch_threads"]  # differ on every run: MLflow only, not DVC


def main(params: Params, arch: str, protocol: str, seed: int) -> dict[str, object]:
    t = train_params_for(params, arch)  # with train.overrides[arch]
    name = model_name(arch, protocol, seed)
    data = ImageSet.load(params.resolve(params.prepare.out_dir) / f"{protocol}.pt")
    data = data.resized(resolve_input(arch, t, data.size).size)
    train_set, val_set = data.subset("train"), data.subset("val")
    if len(val_set) == 0:
        raise ValueError(f"{name}: the {protocol} manifest has no validation cells; "
                         "check split.val_fraction / split.val_per_class")
    threads = configure_torch(t.num_threads)
    threads.update(thread_policy(t.num_threads).describe())  # shares the cores with other trainers
    device, tta = pick_device(t.device), params.evaluate.tta
    run = training.build(t, arch, train_set, seed, device)
    resolved = {**{k: v for k, v in t.model_dump().items() if k not in NOT_RUN_PARAMS},
                "architecture": arch, "protocol": protocol, "seed": seed, "image_size": data.size,
                "weights_source": run.built.weights_source, "view": data.view,
                "cell_fraction": data.cell_fraction}
    checkpoint = Checkpoint(
        params.resolve(t.checkpoint_dir) / name / "last.pt",
        Checkpoint.fingerprint_of({**resolved, "data": data.paths, "device": device.type,
                                   "tta": tta}),
    )
    stage = {"dvc_stage": f"train@{name}", "config_fingerprint": checkpoint.fingerprint}
    state = checkpoint.load()
    if state:
        run.load_state_dict(state)
        log.info("%s: resuming after epoch %d (MLflow run %s)", name, state["epoch"], state["run_id"])
    # killed before its first checkpoint: continue that run, not a new one
    run_id = state["run_id"] if state else tracking.unfinished_run(params, stage)
    with tracking.run(params, run_id=run_id, run_name=name, tags={
            **stage, "architecture": arch, "protocol": protocol, "seed": str(seed),
            "weights_source": run.built.weights_source, "recipe": t.recipe,
            "pretrained": str(models.is_pretrained(run.built.weights_source)).lower()}) as active:
        run_id = active.info.run_id
        if not state:  # a continued run keeps the params of its first attempt
            log_run_params(params, run, resolved, threads, data, protocol)
        per_epoch = batch_count(len(train_set), t.batch_size, MIN_TRAIN_BATCH)
        progress = tqdm(total=t.epochs * per_epoch, initial=len(run.history) * per_epoch,
                        unit="batch", desc=f"{name} epoch {len(run.history) + 1}/{t.epochs}",
                        mininterval=1)

        def on_epoch(row: dict[str, float], run: Training) -> None:
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
            checkpoint.save(**run.state_dict(), run_id=run_id)
            progress.write(f"{name} epoch {row['epoch']}: train loss {row['train_loss']:.3f} "
                           f"acc {row['train_accuracy']:.3f} | val loss {row['val_loss']:.3f} "
                           f"acc {row['val_accuracy']:.3f} F1 {row['val_f1_macro']:.3f}")
            progress.set_description(f"{name} epoch {row['epoch'] + 1}/{t.epochs}")

        training.fit(run, train_set, val_set, eval_batch_size=params.evaluate.batch_size, tta=tta,
                     on_epoch=on_epoch, on_iteration=lambda i, m: mlflow.log_metrics(m, step=i),
                     progress=progress)
        progress.close()
        if run.stopped_early:
            log.info("%s: stopped early after epoch %d: no better validation macro-F1 since "
                     "epoch %d", name, len(run.history), run.best_epoch)
        info = write_outputs(params, run, data, name, protocol, run_id)
    checkpoint.remove()
    return info


def log_run_params(params: Params, run: Training, resolved: dict[str, object],
                   threads: dict[str, object], data: ImageSet, protocol: str) -> None:
    """The MLflow params of a new run (the resolved settings, the data, the thread policy) and
    its dataset."""
    t, train_set, val_set = run.t, data.subset("train"), data.subset("val")
    tracking.log_new_params(tracking.flat_params("", {
        **resolved, "lr_head": t.lr * t.head_lr_factor, "device": run.device.type,
        "validation_split": "val (leak-free validation cells)",
        "train_images": len(train_set), "train_cells": len(set(train_set.groups)),
        "validation_images": len(val_set), "validation_cells": len(set(val_set.groups)),
        "selection": f"{t.keep} epoch by validation macro-F1"
                     + (f", early stopping patience {t.patience}" if t.patience else ""),
        "last_batch": last_batch(len(train_set), t.batch_size),
        "git_commit": tracking.git_commit(params.root),
        "data_md5": tracking.data_md5(params.root), "split_seed": params.split.seed,
        **threads,
    }))
    tracking.log_datasets(
        params.resolve(params.split.out_dir) / f"{protocol}.csv",
        pd.DataFrame({"path": data.paths, "split": data.splits,
                      "label": [data.classes[i] for i in data.labels.tolist()]}),
        protocol)


def write_outputs(params: Params, run: Training, data: ImageSet, name: str, protocol: str,
                  run_id: str) -> dict[str, object]:
    """Temperature-scale the kept model, then write model.pt, history.csv, run.json (returned),
    metrics.json and the curves, and log them and the model to the active MLflow run."""
    t, built, val_set = run.t, run.built, data.subset("val")
    out = params.resolve(t.out_dir) / name
    kept_epoch, tta = run.kept_epoch, params.evaluate.tta
    kept = run.history[kept_epoch - 1]
    calibrated = fit_temperature(run.model, val_set, built, run.device,
                                 params.evaluate.batch_size, run.amp, tta)
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
