"""A new lab in a few labels: adapt a registered classifier to another lab's cells.

The recipe (params `adapt.*`), made for a handful of labelled cells per class:

1. **Split** (`split_lab`): per class, a seeded group-aware draw of K cells (sklearn
   `GroupShuffleSplit`, `train_size=K` groups; an image is its own cell unless a manifest gives a
   `group`) to adapt on; every other image of the lab is that lab's test.
2. **Statistics** (`adapt_batchnorm`): the BatchNorm running statistics are re-estimated on all
   of the lab's images, labels unread (AdaBN: Li et al., "Revisiting Batch Normalization for
   Practical Domain Adaptation", ICLR-W 2017; `torch.optim.swa_utils.update_bn` computes them).
   With K = 0 this is the whole adaptation. They then stay fixed (momentum 0) while fine-tuning.
3. **Fine-tuning** (`finetune`): the head alone for `head_epochs`, then the head and the last
   blocks (the trailing parameters that hold `unfreeze_fraction` of the network's weights) for
   `body_epochs`: AdamW, cosine decay, label smoothing, strong augmentation (flips, any rotation,
   shift, zoom, colour and HED stain jitter: `wbc_transfer.training.recipe.ModernAugment`); an epoch
   repeats the few images to at least `min_epoch_images` (each copy augmented anew). The loop
   is `wbc_transfer.engine.fit`, the train stage's.
4. **The epoch** (`choose_epoch`): chosen by `StratifiedGroupKFold` cross-validation inside the K
   labelled cells (mean validation macro-F1 over the folds, ties to the lower loss, then the
   earlier epoch); the lab's test part is never looked at. Epoch 0, the statistics of step 2
   alone, is a candidate: a base model that already suits the lab is kept when its labelled
   cells say fine-tuning does not help. The final model is trained on all K cells for the
   chosen number of epochs of the same schedule.
5. **Calibration**: the temperature and the split-conformal prediction sets
   (`wbc_transfer.evaluation.conformal`) are fitted on the out-of-fold predictions of the cross-validation
   models at the chosen epoch (each labelled cell predicted by a model that did not learn it; a
   cross-conformal calibration of the final model, trained on all of them).

Images are read through the base model's own preprocessing (`serving.Classifier.preprocess`,
the path of `predict` and the served pyfunc), so the adapted model sees what it will serve.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold
from torch import nn

from wbc_transfer.config import Params, TrainParams
from wbc_transfer.data import external
from wbc_transfer.data.images import read_file
from wbc_transfer.data.sets import MIN_TRAIN_BATCH, ImageSet, batch_count, batches, normalise
from wbc_transfer.engine import EpochStats, evaluate, fit
from wbc_transfer.evaluation import calibration, conformal, stats
from wbc_transfer.io import text_path
from wbc_transfer.models import registry as models
from wbc_transfer.training import recipe

log = logging.getLogger(__name__)

ADAPT, TEST = "adapt", "test"  # the two parts of a lab's images


class AdaptInputError(ValueError):
    """The lab's folder or the request cannot be adapted on (raised before any training)."""


# ---------------------------------------------------------------------------------------------
# the lab's images


def index_lab(folder: Path, name: str, classes: Sequence[str], manifest: Path | None = None,
              policy: str = "strict") -> pd.DataFrame:
    """The lab's usable images (columns path, label, group; paths relative to `folder`), checked
    like `validate` (`wbc_transfer.data.external.index_set`: the project's decoder, its problems).

    Raises AdaptInputError naming the folder: missing, problems under `policy` strict (listed,
    with the unknown class folders), no image at all."""
    if not folder.is_dir():
        raise AdaptInputError(f"{folder}: no such folder (expected <CLASS>/ sub-folders of "
                              f"{list(classes)}, or a folder with a manifest)")
    index, problems = external.index_set(name, folder, manifest, classes)
    if len(problems) and policy == "strict":
        listed = "\n  ".join(f"{r.path}: {r.problem}" for r in problems.head(20).itertuples())
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise AdaptInputError(f"{folder}: {len(problems)} problem(s) (validate.policy strict; "
                              f"lenient skips them):\n  {listed}{more}")
    if index.empty:
        raise AdaptInputError(f"{folder}: empty folder: no image under <CLASS>/ sub-folders of "
                              f"{list(classes)}")
    return index[["path", "label", "group"]].reset_index(drop=True)


def check_request(index: pd.DataFrame, classes: Sequence[str], per_class: int,
                  folder: Path) -> None:
    """Refuse, before any training, a request that cannot work, naming the cause: K < 0 or 1
    (no cross-validation inside one cell per class), K larger than the folder, one class only,
    a class of the model missing, a class with no more than K cells (K to adapt on and at
    least one for the lab's test). Raises AdaptInputError."""
    if per_class < 0:
        raise AdaptInputError(f"--per-class must be >= 0, got {per_class}")
    if per_class == 1:
        raise AdaptInputError("--per-class 1: the epoch is chosen by cross-validation inside "
                              "the labelled cells, which needs at least 2 per class; use 0 "
                              "(statistics only) or >= 2")
    if per_class > len(index):
        raise AdaptInputError(f"--per-class {per_class} is larger than the folder {folder} "
                              f"({len(index)} images in all)")
    present = sorted(set(index["label"]))
    if len(present) == 1:
        raise AdaptInputError(f"{folder}: one class only ({present[0]}); adapting needs labelled "
                              f"cells of every class of the model: {list(classes)}")
    missing = [c for c in classes if c not in present]
    if missing:
        raise AdaptInputError(f"{folder}: no images of class(es) {missing}; the model's classes "
                              f"are {list(classes)} (one sub-folder each)")
    cells = index.groupby("label")["group"].nunique()
    images = index.groupby("label").size()
    short = [f"{c} has {images[c]} images ({cells[c]} cells)" for c in classes
             if cells[c] <= per_class]
    if short:
        raise AdaptInputError(f"{folder}: --per-class {per_class} needs more than {per_class} "
                              f"cells per class ({per_class} to adapt on, the rest to test): "
                              + "; ".join(short))


def read_lab(folder: Path, index: pd.DataFrame, classes: Sequence[str],
             preprocess: Callable[[bytes], tuple[torch.Tensor, str]]) -> ImageSet:
    """Every indexed image through `preprocess` (the base model's: `Classifier.preprocess`,
    bytes -> uint8 3 x S x S, note) into one ImageSet (split "test" until `split_lab`)."""
    lookup = {c: i for i, c in enumerate(classes)}
    tensors = [preprocess(read_file(folder / text_path(p)))[0] for p in index["path"]]
    return ImageSet(images=torch.stack(tensors),
                    labels=torch.tensor([lookup[c] for c in index["label"]], dtype=torch.int64),
                    paths=index["path"].tolist(), splits=[TEST] * len(index),
                    classes=list(classes), groups=index["group"].astype(str).tolist())


def split_lab(data: ImageSet, per_class: int, seed: int) -> ImageSet:
    """The same images with splits "adapt" (K cells per class, `GroupShuffleSplit` per class
    with train_size=K groups, random_state=seed) and "test" (the rest). K = 0: all test."""
    splits = np.array([TEST] * len(data), dtype=object)
    labels, groups = data.labels.numpy(), np.asarray(data.groups, dtype=object)
    if per_class > 0:
        for k in range(len(data.classes)):
            members = np.flatnonzero(labels == k)
            splitter = GroupShuffleSplit(n_splits=1, train_size=per_class, random_state=seed)
            chosen, _ = next(splitter.split(members, groups=groups[members]))
            splits[members[chosen]] = ADAPT
    return replace(data, splits=splits.tolist())


def lab_md5(folder: Path, index: pd.DataFrame) -> str:
    """md5 over the lab's indexed files (sorted relative path + the md5 of its bytes): the
    version of the data an adapted model learned from."""
    digest = hashlib.md5()
    for rel in sorted(index["path"]):
        digest.update(rel.encode() + b"\0" + hashlib.md5(read_file(folder / text_path(rel))).digest())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# the recipe


def adapt_batchnorm(model: nn.Module, images: torch.Tensor, mean: Sequence[float],
                    std: Sequence[float], device: torch.device, batch_size: int) -> nn.Module:
    """AdaBN: reset every BatchNorm's running statistics and re-estimate them (cumulative
    average, `torch.optim.swa_utils.update_bn`) from uint8 N x 3 x S x S `images`; labels are
    never read. Returns `model` in eval mode; a model without BatchNorm is returned unchanged."""
    loader = [normalise(images[idx], mean, std).to(device)
              for idx in batches(len(images), batch_size, min_last=MIN_TRAIN_BATCH)]
    with torch.no_grad():
        torch.optim.swa_utils.update_bn(loader, model)
    return model.eval()


def last_blocks(model: nn.Module, head: nn.Module, fraction: float) -> list[nn.Parameter]:
    """The trailing parameters of `model` (registration order, which is the forward order of
    these networks) that hold `fraction` of the body's weights, the head excluded."""
    head_ids = {id(p) for p in head.parameters()}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    budget, chosen = fraction * sum(p.numel() for p in body), []
    for p in reversed(body):
        if budget <= 0:
            break
        chosen.append(p)
        budget -= p.numel()
    return chosen


def recipe_params(params: Params) -> TrainParams:
    """The `train` parameters of the few-label recipe: the modern recipe (AdamW, cosine decay,
    label smoothing, the modern augmentation) with `adapt.*`'s values."""
    a = params.adapt
    return params.train.model_copy(update=dict(
        recipe="modern", epochs=a.head_epochs + a.body_epochs, lr=a.lr,
        head_lr_factor=a.head_lr_factor, weight_decay=a.weight_decay, warmup_epochs=0,
        label_smoothing=a.label_smoothing, batch_size=a.batch_size, rotation_deg=a.rotation_deg,
        translate_px=a.translate_px, colour_jitter=a.colour_jitter, hed_jitter=a.hed_jitter,
        scale=a.scale, hue_jitter=0.0, grayscale_p=0.0))


@dataclass
class Epoch:
    """A validation score after one fine-tuning epoch (cross-validation)."""

    f1_macro: float
    loss: float
    logits: np.ndarray  # float N x K, the validation images' raw logits


def finetune(base: nn.Module, architecture: str, train_set: ImageSet, t: TrainParams,
             head_epochs: int, unfreeze_fraction: float, epochs: int, seed: int,
             mean: Sequence[float], std: Sequence[float], device: torch.device,
             val_set: ImageSet | None = None, eval_batch: int = 64,
             min_images: int = 0) -> tuple[nn.Module, list[Epoch]]:
    """A copy of `base` (BatchNorm statistics already adapted, then kept fixed) fine-tuned on
    `train_set` for `epochs` epochs of a `t.epochs`-epoch schedule: the head alone for
    `head_epochs`, then also the last blocks. An epoch repeats the images (each copy augmented
    anew) to at least `min_images`, so that a few labels still make several optimiser steps.
    Returns (model in eval mode, one Epoch per epoch scored on `val_set`; empty without it)."""
    if 0 < len(train_set) < min_images:  # few labels: each epoch sees every image several times
        train_set = train_set.take(np.tile(np.arange(len(train_set)), -(-min_images // len(train_set))))
    model = copy.deepcopy(base).to(device)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.0  # batch statistics in training, the adapted ones kept
    head = models.head_of(architecture, model)
    for p in model.parameters():
        p.requires_grad_(False)
    head.requires_grad_(True)
    blocks = last_blocks(model, head, unfreeze_fraction)
    optimizer = recipe.make_optimizer(t, model, head)  # frozen parameters get no gradient: skipped
    scheduler = recipe.make_scheduler(t, optimizer, batch_count(len(train_set), t.batch_size,
                                                                 MIN_TRAIN_BATCH))
    augment, loss_fn = recipe.make_augment(t, train_set.size), recipe.make_loss(t)
    history: list[Epoch] = []

    def before_epoch(epoch: int) -> bool:
        if epoch == head_epochs:
            for p in blocks:
                p.requires_grad_(True)
        return True

    def after_epoch(epoch: int, _: EpochStats) -> None:
        if val_set is not None:
            r = evaluate(model, val_set, mean, std, device, eval_batch)
            history.append(Epoch(r.f1_macro, r.loss, r.logits))

    fit(model, train_set, optimizer, augment, mean, std, device, t.batch_size, epochs, seed,
        loss_fn=loss_fn, scheduler=scheduler, before_epoch=before_epoch, after_epoch=after_epoch)
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval(), history


def choose_epoch(base: nn.Module, architecture: str, labelled: ImageSet, t: TrainParams,
                 params: Params, seed: int, mean: Sequence[float], std: Sequence[float],
                 device: torch.device) -> tuple[int, pd.DataFrame, np.ndarray]:
    """Cross-validation inside the labelled cells (`StratifiedGroupKFold`, min(adapt.folds, K)
    folds, shuffled by `seed`): (chosen epoch, 0 = `base` as it is, else the number of
    fine-tuning epochs; table fold x epoch of validation macro-F1 and loss; out-of-fold logits
    float N x K of every labelled image at that epoch)."""
    a = params.adapt
    labels, groups = labelled.labels.numpy(), np.asarray(labelled.groups, dtype=object)
    per_class = int(min(pd.Series(groups).groupby(labels).nunique()))
    folds = StratifiedGroupKFold(n_splits=min(a.folds, per_class), shuffle=True, random_state=seed)
    rows, oof = [], {}
    for fold, (train_idx, val_idx) in enumerate(folds.split(np.zeros(len(labels)), labels, groups)):
        val_set = labelled.take(val_idx)
        unchanged = evaluate(base, val_set, mean, std, device, params.evaluate.batch_size)
        _, history = finetune(base, architecture, labelled.take(train_idx), t, a.head_epochs,
                              a.unfreeze_fraction, t.epochs, seed + fold, mean, std, device,
                              val_set=val_set, eval_batch=params.evaluate.batch_size,
                              min_images=a.min_epoch_images)
        start = Epoch(unchanged.f1_macro, unchanged.loss, unchanged.logits)
        log.info("cross-validation fold %d: validation macro-F1 by epoch (0: no fine-tuning) %s",
                 fold, [round(e.f1_macro, 3) for e in [start, *history]])
        for epoch, e in enumerate([start, *history]):
            rows.append({"fold": fold, "epoch": epoch, "val_f1_macro": e.f1_macro,
                         "val_loss": e.loss, "val_images": len(val_idx)})
            oof[(fold, epoch)] = (val_idx, e.logits)
    table = pd.DataFrame(rows)
    mean_scores = table.groupby("epoch")[["val_f1_macro", "val_loss"]].mean().reset_index()
    best = mean_scores.sort_values(["val_f1_macro", "val_loss", "epoch"],
                                   ascending=[False, True, True]).iloc[0]
    chosen = int(best["epoch"])
    log.info("epoch %d chosen (mean validation macro-F1 %.3f over %d folds)", chosen,
             best["val_f1_macro"], table["fold"].nunique())
    logits = np.zeros((len(labels), len(labelled.classes)), dtype=np.float32)
    for (_, epoch), (idx, fold_logits) in oof.items():
        if epoch == chosen:
            logits[idx] = fold_logits
    return chosen, table, logits


# ---------------------------------------------------------------------------------------------
# one adaptation, scored on the lab's test part


@dataclass
class Adapted:
    """The outcome of `adapt`: the network, its pyfunc config and the measurements."""

    model: nn.Module
    config: dict[str, Any]  # the base model's whole config, temperature and conformal updated
    data: ImageSet  # the lab's images, splits "adapt" / "test"
    metrics: dict[str, Any]
    cv: pd.DataFrame  # fold x epoch validation scores (empty for K = 0)
    predictions: pd.DataFrame  # the lab's test images: path, label, group, predicted, set, p_*


def adapt(base_model: nn.Module, base_config: dict[str, Any], data: ImageSet, per_class: int,
          seed: int, params: Params, device: torch.device) -> Adapted:
    """Adapt `base_model` (with its pyfunc config) to the lab's images `data` (`read_lab`):
    split, AdaBN, fine-tuning with the epoch chosen by cross-validation inside the K cells,
    temperature and conformal calibration out of fold; then score it and the unchanged base
    model (zero-shot) on the lab's test part. The base model is not modified."""
    started = time.perf_counter()
    mean, std, arch = base_config["mean"], base_config["std"], base_config["architecture"]
    data = split_lab(data, per_class, seed)
    labelled, test = data.subset(ADAPT), data.subset(TEST)
    torch.manual_seed(seed)
    adapted = adapt_batchnorm(copy.deepcopy(base_model).to(device), data.images, mean, std,
                              device, params.evaluate.batch_size)
    config = copy.deepcopy(base_config)
    cv, epoch = pd.DataFrame(), 0
    if per_class > 0:
        t = recipe_params(params)
        epoch, cv, oof_logits = choose_epoch(adapted, arch, labelled, t, params, seed, mean, std,
                                             device)
        if epoch > 0:  # 0: the labelled cells preferred the statistics alone
            adapted, _ = finetune(adapted, arch, labelled, t, params.adapt.head_epochs,
                                  params.adapt.unfreeze_fraction, epoch, seed, mean, std, device,
                                  min_images=params.adapt.min_epoch_images)
        y = labelled.labels.numpy()
        config["temperature"] = round(calibration.fit_temperature(oof_logits, y), 6)
        config["conformal"] = conformal.calibrate(
            calibration.softmax(oof_logits, config["temperature"]), y,
            f"out-of-fold predictions of the {cv['fold'].nunique()} cross-validation models at "
            f"epoch {epoch} on the {len(y)} labelled images of the lab", levels=(params.adapt.sets,))
    seconds = time.perf_counter() - started
    mine = score(adapted, test, config, params)
    zero_shot = score(base_model.to(device), test, base_config, params)
    metrics = {
        "per_class": per_class, "seed": seed, "selected_epoch": epoch,
        "epochs_max": params.adapt.head_epochs + params.adapt.body_epochs if per_class else 0,
        "adapt_images": len(labelled), "adapt_cells": len(set(labelled.groups)),
        "test_images": len(test), "test_cells": len(set(test.groups)),
        "cv_f1_macro": float(cv[cv["epoch"] == epoch]["val_f1_macro"].mean()) if per_class
        else None,
        "temperature": config.get("temperature", 1.0), "seconds": round(seconds, 1),
        **{k: v for k, v in mine.items() if k != "probabilities"},
        "zero_shot": {k: v for k, v in zero_shot.items() if k not in ("probabilities", "sets")},
    }
    predictions = prediction_table(test, mine["probabilities"], config, params.adapt.sets)
    return Adapted(adapted.cpu().eval(), config, data, metrics, cv, predictions)


def score(model: nn.Module, test: ImageSet, config: dict[str, Any],
          params: Params) -> dict[str, Any]:
    """macro-F1 and accuracy of `model` (with its config's temperature) on `test`, 95 % cluster-
    bootstrap intervals (`wbc_transfer.evaluation.stats`, params `compare.*`: cells resampled within
    their class), and the prediction sets' coverage at `adapt.sets` when the config has them."""
    device = next(model.parameters()).device
    r = evaluate(model, test, config["mean"], config["std"], device, params.evaluate.batch_size,
                 temperature=float(config.get("temperature", 1.0)))
    c = params.compare
    ci = stats.bootstrap_ci(r.labels, r.predictions, len(test.classes), c.bootstrap,
                            c.confidence, c.seed, test.groups)
    out: dict[str, Any] = {"f1_macro": r.f1_macro, "accuracy": r.accuracy,
                           "f1_macro_ci": list(ci.get("f1_macro", (float("nan"),) * 2)),
                           "accuracy_ci": list(ci.get("accuracy", (float("nan"),) * 2)),
                           "probabilities": r.probabilities}
    if config.get("conformal"):
        sets = conformal.prediction_sets(r.probabilities, config["conformal"], params.adapt.sets)
        out["sets"] = {"confidence": params.adapt.sets,
                       **conformal.coverage(sets, r.labels, test.classes)}
    return out


def prediction_table(test: ImageSet, probabilities: np.ndarray, config: dict[str, Any],
                     level: float) -> pd.DataFrame:
    """One row per test image: path, label, group, predicted, confidence, set ("|"-joined
    classes at `level`; empty without a calibration), p_<class>."""
    classes = test.classes
    frame = pd.DataFrame({"path": test.paths, "label": [classes[i] for i in test.labels.tolist()],
                          "group": test.groups,
                          "predicted": [classes[i] for i in probabilities.argmax(1)],
                          "confidence": probabilities.max(1)})
    if config.get("conformal"):
        sets = conformal.prediction_sets(probabilities, config["conformal"], level)
        frame["set"] = ["|".join(c for c, inside in zip(classes, row, strict=True) if inside)
                        for row in sets]
    else:
        frame["set"] = ""
    for k, cls in enumerate(classes):
        frame[f"p_{cls}"] = probabilities[:, k]
    return frame


def images_table(data: ImageSet) -> pd.DataFrame:
    """The lab's images and their part: path, label, group, split (adapt: learned from)."""
    return pd.DataFrame({"path": data.paths, "label": [data.classes[i] for i in data.labels.tolist()],
                         "group": data.groups, "split": data.splits})
