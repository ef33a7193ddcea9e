"""DVC stage `train@<arch>-<protocol>-<seed>`: fine-tune one architecture, tracked in MLflow."""

from __future__ import annotations

import logging

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import infer_signature
from tqdm import tqdm

from wbc_transfer import calibration, models, recipe, robustness, tracking
from wbc_transfer.config import Params, train_params_for
from wbc_transfer.data import MIN_TRAIN_BATCH, ImageSet, batch_count, last_batch, normalise
from wbc_transfer.engine import (
    Checkpoint,
    EpochStats,
    amp_dtype,
    configure_torch,
    evaluate,
    fit,
    pick_device,
    place_model,
    seed_everything,
)
from wbc_transfer.io import write_csv, write_json, write_torch
from wbc_transfer.plots import training_curves
from wbc_transfer.serving import pip_requirements
from wbc_transfer.threads import policy_for as thread_policy

log = logging.getLogger(__name__)


def model_name(arch: str, protocol: str, seed: int) -> str:
    return f"{arch}-{protocol}-{seed}"


def main(params: Params, arch: str, protocol: str, seed: int) -> dict[str, object]:
    t = train_params_for(params, arch)  # with train.overrides[arch]
    name = model_name(arch, protocol, seed)
    out = params.resolve(t.out_dir) / name
    data = ImageSet.load(params.resolve(params.prepare.out_dir) / f"{protocol}.pt")
    data = data.resized(t.input_size or data.size)
    train_set = data.subset("train")
    val_set = data.subset("val")
    if len(val_set) == 0:
        raise ValueError(f"{name}: the {protocol} manifest has no validation cells; "
                         "check split.val_fraction / split.val_per_class")

    threads = configure_torch(t.num_threads)
    policy = thread_policy(t.num_threads)  # shares the cores with other training processes
    threads.update(policy.describe())
    device = pick_device(t.device)
    amp = amp_dtype(device, t.amp)
    seed_everything(seed)
    built = models.build(arch, len(data.classes), t.weights, data.size)
    # frozen BatchNorm / the stain-normalisation input layer (target fitted on training images)
    adapted = robustness.adapt(built.model, built.mean, built.std, t.stain_norm, t.norm_layer,
                               train_set.images)
    model = place_model(adapted, device, t.channels_last)
    iterations_per_epoch = batch_count(len(train_set), t.batch_size, MIN_TRAIN_BATCH)
    optimizer = recipe.make_optimizer(t, model, built.head)
    scheduler = recipe.make_scheduler(t, optimizer, iterations_per_epoch)
    augment = recipe.make_augment(t, data.size)
    loss_fn = recipe.make_loss(t)
    tta = params.evaluate.tta

    resolved = {**t.model_dump(), "architecture": arch, "protocol": protocol, "seed": seed,
                "image_size": data.size, "weights_source": built.weights_source,
                "view": data.view, "cell_fraction": data.cell_fraction}
    for key in ("architectures", "protocols", "seeds", "out_dir", "checkpoint_dir", "weights_report",
                "overrides"):
        resolved.pop(key)
    checkpoint = Checkpoint(
        params.resolve(t.checkpoint_dir) / name / "last.pt",
        Checkpoint.fingerprint_of({**resolved, "data": data.paths, "device": device.type,
                                   "tta": tta}),
    )
    state = checkpoint.load()
    start_epoch, history, run_id = 0, [], None
    best: dict[str, object] = {"epoch": 0, "val_f1_macro": -1.0, "model": None}
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        start_epoch, history, run_id = state["epoch"], state["history"], state["run_id"]
        best = state.get("best", best)
        log.info("%s: resuming after epoch %d (MLflow run %s)", name, start_epoch, run_id)

    tags = {"architecture": arch, "protocol": protocol, "seed": str(seed),
            "weights_source": built.weights_source,
            "pretrained": str(models.is_pretrained(built.weights_source)).lower(),
            "recipe": t.recipe, "dvc_stage": f"train@{name}", "config_fingerprint": checkpoint.fingerprint}
    if run_id is None:  # killed before its first checkpoint: continue that run, not a new one
        run_id = tracking.unfinished_run(params, {"dvc_stage": tags["dvc_stage"],
                                                  "config_fingerprint": checkpoint.fingerprint})
    with tracking.run(params, run_id=run_id, run_name=name, tags=tags) as active:
        run_id = active.info.run_id
        if not state:  # a continued run keeps the params of its first attempt
            tracking.log_new_params(tracking.flat_params("", {
                **resolved, "lr_head": t.lr * t.head_lr_factor, "device": device.type,
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

        def validate_now(iteration: int) -> None:
            r = evaluate(model, val_set, built.mean, built.std, device, params.evaluate.batch_size,
                         amp, tta=tta)
            mlflow.log_metrics({"val_iter_loss": r.loss, "val_iter_accuracy": r.accuracy},
                               step=iteration)

        progress = tqdm(total=t.epochs * iterations_per_epoch,
                        initial=start_epoch * iterations_per_epoch, unit="batch",
                        desc=name, mininterval=1)
        def before_epoch(epoch: int) -> bool:
            if t.patience and epoch - int(best["epoch"]) >= t.patience:
                progress.write(f"{name}: early stop after epoch {epoch}: no better validation "
                               f"macro-F1 since epoch {best['epoch']}")
                return False
            progress.set_description(f"{name} epoch {epoch + 1}/{t.epochs}")
            mlflow.log_metric("torch_threads", policy.rebalance(), step=epoch + 1)
            return True

        def after_epoch(epoch: int, stats: EpochStats) -> None:
            nonlocal best
            val = evaluate(model, val_set, built.mean, built.std, device,
                           params.evaluate.batch_size, amp, tta=tta)
            row = {"epoch": epoch + 1, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
                   "val_loss": val.loss, "val_accuracy": val.accuracy, "val_f1_macro": val.f1_macro,
                   "lr": optimizer.param_groups[0]["lr"],
                   "train_images_per_s": stats.images / stats.seconds}
            history.append(row)
            if val.f1_macro > float(best["val_f1_macro"]):
                best = {"epoch": epoch + 1, "val_f1_macro": val.f1_macro,
                        "model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            checkpoint.save(model=model.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict() if scheduler is not None else None,
                            epoch=epoch + 1, history=history, run_id=run_id, best=best)
            progress.write(f"{name} epoch {epoch + 1}: train loss {stats.loss:.3f} "
                           f"acc {stats.accuracy:.3f} | val loss {val.loss:.3f} "
                           f"acc {val.accuracy:.3f} F1 {val.f1_macro:.3f}")

        # reseeded per epoch (engine.fit): a resumed run draws the same batches and augmentations
        fit(model, train_set, optimizer, augment, built.mean, built.std, device, t.batch_size,
            t.epochs, seed, start_epoch=start_epoch, amp=amp, loss_fn=loss_fn, scheduler=scheduler,
            progress=progress, every=t.validate_every, on_every=validate_now,
            before_epoch=before_epoch, after_epoch=after_epoch)
        progress.close()

        kept_epoch = len(history)
        if t.keep == "best" and best["model"] is not None:
            model.load_state_dict(best["model"])
            kept_epoch = int(best["epoch"])
        kept = history[kept_epoch - 1]
        calibrated = fit_temperature(model, val_set, built, device, params.evaluate.batch_size,
                                     amp, tta)
        mlflow.log_metrics({"selected_epoch": kept_epoch, "selected_val_f1_macro": kept["val_f1_macro"],
                            "selected_val_accuracy": kept["val_accuracy"],
                            "epochs_run": len(history), **calibrated})
        # throughput is a timing, different on every run: MLflow only, not in DVC's files
        frame = pd.DataFrame(history).drop(columns=["train_images_per_s"], errors="ignore")
        model_cpu = model.to("cpu", memory_format=torch.contiguous_format).eval()
        write_torch(out / "model.pt", model_cpu.state_dict())
        write_csv(out / "history.csv", frame)
        info = {"run_id": run_id, "architecture": arch, "protocol": protocol, "seed": seed,
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
            "selected_epoch": kept_epoch, "epochs_run": len(history),
            "selected_by": "validation macro-F1 (leak-free validation cells)" if t.keep == "best"
                           else "last epoch",
            "weights_source": built.weights_source, **calibrated})
        curves = training_curves(frame, f"{name} ({built.weights_source})", out / "curves.png")
        mlflow.log_artifact(str(curves))
        mlflow.log_artifact(str(out / "history.csv"))
        log_model(model_cpu, data, built.mean, built.std)
    checkpoint.remove()
    return info


def fit_temperature(model: torch.nn.Module, val_set: ImageSet, built: models.Built,
                    device: torch.device, batch_size: int, amp: torch.dtype | None,
                    tta: bool) -> dict[str, float]:
    """Temperature scaling of the kept model, fitted by NLL on the leak-free validation cells
    (`wbc_transfer.calibration.fit_temperature`; never a test set), with the validation NLL
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
