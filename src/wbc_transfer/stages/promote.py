"""DVC stage `promote`: register the best run as `wbc-classifier` with the alias `champion`,
only when it beats the current champion on the same validation cells.

The registered version is the run's `classifier` pyfunc (wbc_transfer.serving.classifier: models from
code, state_dict weights + JSON config, preprocessing included), served as is by
`mlflow models serve` and used by `wbc-transfer predict`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import mlflow
import pandas as pd
import torch
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from wbc_transfer import tracking
from wbc_transfer.config import Params
from wbc_transfer.data.sets import ImageSet
from wbc_transfer.engine import evaluate
from wbc_transfer.evaluation.metrics import classification_metrics
from wbc_transfer.io import write_json
from wbc_transfer.models import registry as models
from wbc_transfer.reporting.comparison import collect, load_predictions
from wbc_transfer.serving import classifier, pyfunc
from wbc_transfer.training.trainer import model_name

log = logging.getLogger(__name__)

DIGEST_TAG = "promotion.validation_digest"  # version tag: what its promotion value was measured on
LOCK_TIMEOUT_S = 1800  # a promotion waits this long for another one to finish


def rank(long: pd.DataFrame, protocols: Sequence[str], eval_set: str, metric: str) -> pd.DataFrame:
    """Candidate runs of `protocols`, best first by `metric` on `eval_set` (the leak-free
    validation cells every protocol shares); ties broken by per-cell validation accuracy, then
    name and seed. No test set is looked at. Each row also carries the run's TEST score
    (`test_value`), for the report only."""
    scores = long[long["protocol"].isin(protocols) & (long["metric"] == metric)]
    primary = scores[scores["eval_set"] == eval_set]
    if primary.empty:
        raise ValueError(
            f"no results for promote.protocols={list(protocols)}, promote.eval_set={eval_set!r}; "
            f"available: {sorted(set(zip(long['protocol'], long['eval_set'], strict=True)))}"
        )
    test = scores[scores["eval_set"] == "TEST"].set_index("run_id")["value"]
    ranked = primary.assign(test_value=primary["run_id"].map(test))
    return ranked.sort_values(["value", "cell_accuracy", "architecture", "protocol", "seed"],
                              ascending=[False, False, True, True, True]).reset_index(drop=True)


def current_champion(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


class PromotionRefused(RuntimeError):
    """The candidate cannot be compared with the current champion; the alias stays."""


def validation_digest(paths: Sequence[str], labels: Sequence[str], params: Params) -> str:
    """What a stored validation score was measured on: md5 of the sorted (path, label) pairs of
    the validation cells, the prepared image size and the evaluation's TTA. Two scores with the
    same digest are comparable; otherwise the champion is re-scored (`rescore`)."""
    lines = sorted(f"{p}\t{label}" for p, label in zip(paths, labels, strict=True))
    settings = f"image_size={params.prepare.image_size}\ttta={params.evaluate.tta}"
    return hashlib.md5("\n".join([settings, *lines]).encode()).hexdigest()


def candidate_digest(params: Params, best: pd.Series) -> str | None:
    """The digest of the validation cells the winner was scored on (its evaluate stage's
    predictions/validation.csv), None when that file is missing (older outputs)."""
    try:
        frame = load_predictions(params, best["architecture"], best["protocol"],
                                 int(best["seed"]), "validation")
    except FileNotFoundError:
        return None
    return validation_digest(frame["path"].astype(str), frame["actual"].astype(str), params)


def validation_cells(params: Params, protocol: str) -> ImageSet:
    """The validation cells as the evaluate stage scores them (prepared images, split `val`)."""
    return ImageSet.load(params.resolve(params.prepare.out_dir) / f"{protocol}.pt").subset("val")


def rescore(params: Params, version, protocol: str) -> tuple[float, str]:
    """Score a registered version on the current validation cells exactly as the evaluate stage
    scores a run (prepared images resized to the model's size, `evaluate.tta`, `promote.metric`):
    returns (value, digest). Raises on any failure (artifacts gone, other classes)."""
    data = validation_cells(params, protocol)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{version.name}/{version.version}", dst_path=tmp))
        config = classifier.read_config(folder / "artifacts" / "config.json")
        state = torch.load(folder / "artifacts" / "weights.pt", map_location="cpu",
                           weights_only=True)
    if list(config["classes"]) != list(data.classes):
        raise ValueError(f"its classes {config['classes']} are not the data's {data.classes}")
    model = models.rebuild(config, state).eval()
    data = data.resized(int(config["image_size"]))
    r = evaluate(model, data, config["mean"], config["std"], torch.device("cpu"),
                 params.evaluate.batch_size, tta=params.evaluate.tta)
    value = float(classification_metrics(r.labels, r.predictions, data.classes)[params.promote.metric])
    return value, validation_digest(data.paths, [data.classes[i] for i in r.labels], params)


def champion_score(params: Params, champion, digest: str | None,
                   protocol: str) -> tuple[float, str, str]:
    """(value, digest, how) of the current champion on the winner's validation cells: its
    stored promotion score when that was measured on the same cells (same digest, same metric),
    else re-scored now. PromotionRefused when it can be neither."""
    tags = champion.tags or {}
    if (digest is not None and tags.get(DIGEST_TAG) == digest
            and tags.get("promotion.metric") == params.promote.metric
            and tags.get("promotion.value")):
        return float(tags["promotion.value"]), digest, "stored, same validation cells"
    why = ("it was promoted before validation digests were recorded" if DIGEST_TAG not in tags
           else "the validation cells or their scoring changed since it was promoted "
                f"(digest {tags[DIGEST_TAG]} then, {digest} now)")
    try:
        value, now = rescore(params, champion, protocol)
    except Exception as exc:
        raise PromotionRefused(
            f"cannot compare with the current champion {champion.name} version "
            f"{champion.version} (run {champion.run_id}): {why}, and re-scoring it on the "
            f"current validation cells failed ({type(exc).__name__}: {exc}). The alias stays. "
            f"To replace it anyway, remove the alias (MlflowClient().delete_registered_model_"
            f"alias('{champion.name}', '{params.promote.alias}')) and rerun promote.") from exc
    return value, now, f"re-scored on the current validation cells ({why})"


def promotion_lock(params: Params) -> FileLock:
    """One promotion at a time per registry: a lock beside a SQLite store (`<db>.promote.lock`),
    else one per tracking server URI in the machine's temp folder (queued experiments of this
    machine share it). Promotions from other machines against one server are not serialised
    by it."""
    uri = tracking.tracking_uri(params)
    if uri.startswith("sqlite:///") and ":memory:" not in uri:
        file = Path(f"{uri.removeprefix('sqlite:///').split('?', 1)[0]}.promote.lock")
    else:
        key = hashlib.md5(uri.encode()).hexdigest()[:12]
        file = Path(tempfile.gettempdir()) / f"wbc-transfer-promote-{key}.lock"
    file.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(file), timeout=LOCK_TIMEOUT_S)


def register(params: Params, client: MlflowClient, best: pd.Series, reason: dict[str, str]):
    """Register the winner's `classifier` pyfunc as a new version, move the alias to it and tag
    it with the reason; returns the ModelVersion."""
    p = params.promote
    with contextlib.suppress(MlflowException):  # already registered
        client.create_registered_model(p.model_name, description=(
            "White-blood-cell classifier (eosinophil, lymphocyte, monocyte, neutrophil); "
            "the champion is promoted by the `promote` DVC stage."))
    # the champion is the pyfunc with its own preprocessing (wbc_transfer.serving.classifier), logged into
    # the winning run as `classifier` from the trained weights if not already there
    folder = params.resolve(params.train.out_dir) / model_name(
        best["architecture"], best["protocol"], int(best["seed"]))
    weights, config = pyfunc.load_trained_folder(folder, best["run_id"])
    version = pyfunc.register_classifier(
        client, p.model_name, best["run_id"], weights, config,
        description=f"best {p.metric} on {p.eval_set}: {best['value']:.4f}")
    client.set_registered_model_alias(p.model_name, p.alias, version.version)
    for key, value in reason.items():
        client.set_model_version_tag(p.model_name, version.version, f"promotion.{key}", str(value))
    log.info("registered %s version %s for run %s (%s %s = %.4f)", p.model_name,
             version.version, best["run_id"], p.eval_set, p.metric, best["value"])
    return version


def main(params: Params) -> dict[str, object]:
    """Rank the runs by validation, compare the best with the current champion on the same
    validation cells, and move the alias only when the best is strictly better (an equal or
    worse run leaves it where it is, and says so). Concurrent promotions queue on
    `promotion_lock`, each comparing with the champion the previous one left."""
    p = params.promote
    ranked = rank(collect(params), [x for x in p.protocols if x in params.train.protocols],
                  p.eval_set, p.metric)
    best = ranked.iloc[0]
    runner = ranked.iloc[1] if len(ranked) > 1 else None
    digest = candidate_digest(params, best)
    tracking.setup(params)
    client = MlflowClient()
    reason = {
        "metric": p.metric, "eval_set": p.eval_set, "protocol": best["protocol"],
        "chosen_by": f"{p.metric} on the leak-free validation cells (no test set looked at)",
        "value": f"{best['value']:.4f}", "architecture": best["architecture"],
        "TEST_value": f"{best['test_value']:.4f}" if pd.notna(best["test_value"]) else "",
        "weights_source": best["weights_source"],
        "runner_up": (f"{runner['architecture']}-{runner['protocol']}-{runner['seed']}"
                      if runner is not None else "none"),
        "runner_up_value": f"{runner['value']:.4f}" if runner is not None else "",
        "validation_digest": digest or "",
    }
    before: dict[str, object] = {}
    with promotion_lock(params):  # read the champion, decide and move the alias as one step
        champion = current_champion(client, p.model_name, p.alias)
        if champion is None:
            decision, promoted = "no champion yet: promoted", True
        elif champion.run_id == best["run_id"]:
            decision, promoted = "same run as the champion", False
            if not pyfunc.is_classifier_version(champion):
                decision, promoted = "same run, re-registered in the current pyfunc format", True
        else:
            value, now, how = champion_score(params, champion, digest, best["protocol"])
            before = {"version": str(champion.version), "run_id": champion.run_id,
                      "value": round(value, 4), "how": how}
            promoted = float(best["value"]) > value
            verb = "better than" if promoted else "not better than"
            decision = (f"candidate {best['architecture']}-{best['protocol']}-{best['seed']} "
                        f"({p.metric} {best['value']:.4f}) is {verb} champion version "
                        f"{champion.version} ({value:.4f}, {how})")
            if not promoted and now != champion.tags.get(DIGEST_TAG):
                for key, text in ((DIGEST_TAG, now), ("promotion.value", f"{value:.4f}"),
                                  ("promotion.metric", p.metric)):
                    client.set_model_version_tag(p.model_name, champion.version, key, text)
        if promoted:
            version = register(params, client, best, reason)
        else:
            version = champion
            if champion.run_id != best["run_id"]:
                log.warning("%s: the alias %s stays on version %s", decision, p.alias,
                            champion.version)
            else:
                log.info("champion unchanged: %s version %s (run %s)", p.model_name,
                         champion.version, champion.run_id)
    result = {"model_name": p.model_name, "alias": p.alias, "version": str(version.version),
              "run_id": version.run_id, "promoted": promoted, "decision": decision,
              "candidate_run_id": best["run_id"], "champion_before": before, **reason,
              "ranking": ranked[["architecture", "protocol", "seed", "value", "test_value",
                                 "weights_source"]].to_dict(orient="records")}
    write_json(params.resolve(p.out), result)
    print(f"wbc-transfer promote: {decision}; {p.model_name}@{p.alias} = version "
          f"{version.version}")
    return result
