"""DVC stage `train@<arch>-<protocol>-<seed>`: fine-tune one architecture, tracked in MLflow."""

from __future__ import annotations

import logging
from dataclasses import asdict

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import infer_signature
from tqdm import tqdm

from wbc_transfer import models, tracking
from wbc_transfer.config import Params
from wbc_transfer.data import MIN_TRAIN_BATCH, ImageSet, TrainAugment, batch_count, last_batch, normalise
from wbc_transfer.engine import (
    Checkpoint,
    amp_dtype,
    configure_torch,
    evaluate,
    make_optimizer,
    pick_device,
    place_model,
    seed_everything,
    train_one_epoch,
)
from wbc_transfer.io import write_csv, write_json, write_torch
from wbc_transfer.plots import training_curves
from wbc_transfer.serving import pip_requirements

log = logging.getLogger(__name__)


def model_name(arch: str, protocol: str, seed: int) -> str:
    return f"{arch}-{protocol}-{seed}"


def main(params: Params, arch: str, protocol: str, seed: int) -> dict[str, object]:
    t = params.train
    name = model_name(arch, protocol, seed)
    out = params.resolve(t.out_dir) / name
    data = ImageSet.load(params.resolve(params.prepare.out_dir) / f"{protocol}.pt")
    train_set = data.subset("train")
    val_set = data.subset("val")
    val_split = "val"
    if len(val_set) == 0:  # the study validated on its test split; say so where it shows
        val_set, val_split = data.subset("test"), "test"
        log.warning("%s: no validation split; validating on the test split", name)

    threads = configure_torch(t.num_threads)
    device = pick_device(t.device)
    amp = amp_dtype(device, t.amp)
    seed_everything(seed)
    built = models.build(arch, len(data.classes), t.weights, data.size)
    model = place_model(built.model, device, t.channels_last)
    optimizer = make_optimizer(model, built.head, t.lr, t.head_lr_factor, t.momentum)
    augment = TrainAugment(t.translate_px, t.reference_size)

    resolved = {**asdict(t), "architecture": arch, "protocol": protocol, "seed": seed,
                "image_size": data.size, "weights_source": built.weights_source}
    for key in ("architectures", "protocols", "seeds", "out_dir", "checkpoint_dir"):
        resolved.pop(key)
    checkpoint = Checkpoint(
        params.resolve(t.checkpoint_dir) / name / "last.pt",
        Checkpoint.fingerprint_of({**resolved, "data": data.paths, "device": device.type}),
    )
    state = checkpoint.load()
    start_epoch, history, run_id = 0, [], None
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history, run_id = state["epoch"], state["history"], state["run_id"]
        log.info("%s: resuming after epoch %d (MLflow run %s)", name, start_epoch, run_id)

    tags = {"architecture": arch, "protocol": protocol, "seed": str(seed),
            "weights_source": built.weights_source,
            "pretrained": str(models.is_pretrained(built.weights_source)).lower(),
            "dvc_stage": f"train@{name}", "config_fingerprint": checkpoint.fingerprint}
    if run_id is None:  # killed before its first checkpoint: continue that run, not a new one
        run_id = tracking.unfinished_run(params, {"dvc_stage": tags["dvc_stage"],
                                                  "config_fingerprint": checkpoint.fingerprint})
    with tracking.run(params, run_id=run_id, run_name=name, tags=tags) as active:
        run_id = active.info.run_id
        if not state:  # a continued run keeps the params of its first attempt
            tracking.log_new_params(tracking.flat_params("", {
                **resolved, "lr_head": t.lr * t.head_lr_factor, "device": device.type,
                "validation_split": val_split, "train_images": len(train_set),
                "validation_images": len(val_set),
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
        iterations_per_epoch = batch_count(len(train_set), t.batch_size, MIN_TRAIN_BATCH)

        def validate_now(iteration: int) -> None:
            r = evaluate(model, val_set, built.mean, built.std, device, params.evaluate.batch_size,
                         amp)
            mlflow.log_metrics({"val_iter_loss": r.loss, "val_iter_accuracy": r.accuracy},
                               step=iteration)

        progress = tqdm(total=t.epochs * iterations_per_epoch,
                        initial=start_epoch * iterations_per_epoch, unit="batch",
                        desc=name, mininterval=1)
        for epoch in range(start_epoch, t.epochs):
            # Reseeding per epoch makes a resumed run draw the same batches and augmentations.
            torch.manual_seed(seed * 1000 + epoch)
            generator = torch.Generator().manual_seed(seed * 1000 + epoch)
            progress.set_description(f"{name} epoch {epoch + 1}/{t.epochs}")
            stats = train_one_epoch(
                model, train_set, optimizer, augment, built.mean, built.std, device,
                t.batch_size, generator, progress, every=t.validate_every,
                on_every=validate_now, start_iteration=epoch * iterations_per_epoch, amp=amp,
            )
            val = evaluate(model, val_set, built.mean, built.std, device, params.evaluate.batch_size,
                         amp)
            row = {"epoch": epoch + 1, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
                   "val_loss": val.loss, "val_accuracy": val.accuracy, "val_f1_macro": val.f1_macro,
                   "train_images_per_s": stats.images / stats.seconds}
            history.append(row)
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            checkpoint.save(model=model.state_dict(), optimizer=optimizer.state_dict(),
                            epoch=epoch + 1, history=history, run_id=run_id)
            progress.write(f"{name} epoch {epoch + 1}: train loss {stats.loss:.3f} "
                           f"acc {stats.accuracy:.3f} | val loss {val.loss:.3f} "
                           f"acc {val.accuracy:.3f} F1 {val.f1_macro:.3f}")
        progress.close()

        # throughput is a timing, different on every run: MLflow only, not in DVC's files
        frame = pd.DataFrame(history).drop(columns=["train_images_per_s"], errors="ignore")
        model_cpu = model.to("cpu", memory_format=torch.contiguous_format).eval()
        write_torch(out / "model.pt", model_cpu.state_dict())
        write_csv(out / "history.csv", frame)
        info = {"run_id": run_id, "architecture": arch, "protocol": protocol, "seed": seed,
                "weights_source": built.weights_source, "image_size": data.size,
                "mean": list(built.mean), "std": list(built.std), "classes": data.classes,
                "validation_split": val_split}
        write_json(out / "run.json", info)
        write_json(out / "metrics.json", {**{k: v for k, v in history[-1].items()
                                             if k in frame.columns},
                                          "weights_source": built.weights_source})
        curves = training_curves(frame, f"{name} ({built.weights_source})", out / "curves.png")
        mlflow.log_artifact(str(curves))
        mlflow.log_artifact(str(out / "history.csv"))
        log_model(model_cpu, data, built.mean, built.std)
    checkpoint.remove()
    return info


def log_model(model: torch.nn.Module, data: ImageSet, mean, std) -> None:
    """Log the fine-tuned network with an input example and signature (normalised float input)."""
    example = normalise(data.images[:2], mean, std).numpy()
    with torch.inference_mode():
        output = model(torch.from_numpy(example)).numpy()
    # explicit requirements: MLflow's inference re-imports the model in a subprocess (~6 s)
    mlflow.pytorch.log_model(model, name="model", input_example=example,
                             signature=infer_signature(example, output.astype(np.float32)),
                             pip_requirements=pip_requirements())
