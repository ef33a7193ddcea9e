"""`wbc-transfer adapt FOLDER --lab NAME --per-class K` and DVC stage `adapt@<lab>`: adapt the
champion (or `--model`) to a new lab's labelled cells and register it as
`wbc-classifier@lab-<name>` (recipe: `wbc_transfer.training.adapt`; docs/adapt.md).

Every check of the input runs before any training; the registry is written only at the very
end, after the MLflow run has its artifacts, so an interrupted adapt leaves the registry, the
champion and any earlier `lab-<name>` version untouched (its MLflow run ends FAILED).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from wbc_transfer import tracking
from wbc_transfer.config import ConfigError, Params
from wbc_transfer.engine import configure_torch, pick_device
from wbc_transfer.io import write_csv, write_json, write_torch
from wbc_transfer.serving import pyfunc
from wbc_transfer.training import adapt

log = logging.getLogger(__name__)
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def base_version(client: MlflowClient, uri: str) -> tuple[str, str]:
    """(registered model name, version) of a models:/<name>@<alias> or models:/<name>/<version>
    URI; (the project's model name, "") for any other URI (a run or a local folder)."""
    m = MODEL_URI.match(uri)
    if not m:
        return "", ""
    if m["version"]:
        return m["name"], m["version"]
    try:
        return m["name"], str(client.get_model_version_by_alias(m["name"], m["alias"]).version)
    except MlflowException as exc:
        from wbc_transfer.serving.loading import MAKE_CHAMPION

        raise adapt.AdaptInputError(f"base model {uri}: {str(exc).splitlines()[0]}; "
                                    f"{MAKE_CHAMPION}, or pass --model") from None


def check_alias(client: MlflowClient, model_name: str, alias: str, lab: str, replace: bool) -> None:
    """Refuse a lab whose alias is taken: by a version that is not this lab's adaptation (always),
    or by this lab's earlier adaptation unless `replace` (what the DVC stage passes)."""
    try:
        taken = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return
    owner = (taken.tags or {}).get("adapt.lab")
    if owner != lab:
        raise adapt.AdaptInputError(
            f"--lab {lab}: the alias {model_name}@{alias} already names version {taken.version}, "
            f"which is not an adaptation to lab {lab!r}; choose another lab name")
    if not replace:
        raise adapt.AdaptInputError(
            f"--lab {lab}: {model_name}@{alias} already names version {taken.version} (an earlier "
            "adaptation to this lab); pass --replace to move the alias to the new version")


def main(params: Params, folder: str | Path, lab: str, per_class: int, model_uri: str | None = None,
         manifest: str | None = None, seed: int | None = None, replace: bool = False) -> dict:
    """Adapt, track, register; returns the metrics written to <adapt.out_dir>/<lab>/metrics.json."""
    from wbc_transfer.serving.loading import ModelUnavailableError, load_model

    a = params.adapt
    if not re.fullmatch(r"[A-Za-z0-9_-]+", lab):
        raise adapt.AdaptInputError(f"--lab {lab!r}: a lab name must be letters, digits, _ or -")
    uri, seed = model_uri or a.model, a.seed if seed is None else seed
    root = params.resolve(folder)
    if not root.is_dir() or not any(f.is_file() for f in root.rglob("*")):
        # before the model: a wrong folder is named even where there is no champion yet
        raise adapt.AdaptInputError(f"{root}: {'empty' if root.is_dir() else 'no such'} folder "
                                    "(expected <CLASS>/ sub-folders, or a folder with a manifest)")
    tracking.setup(params)
    client = MlflowClient()
    model_name, version = base_version(client, uri)
    model_name = model_name or params.promote.model_name
    alias = f"{a.alias_prefix}{lab}"
    check_alias(client, model_name, alias, lab, replace)
    try:
        classifier_of = load_model(uri).unwrap_python_model().classifier
    except ModelUnavailableError as exc:
        raise adapt.AdaptInputError(f"--model: {exc}") from None
    classes = classifier_of.classes
    index = adapt.index_lab(root, lab, classes, root / manifest if manifest else None,
                            params.validate.policy)
    adapt.check_request(index, classes, per_class, root)

    threads = configure_torch(params.train.num_threads)
    device = pick_device(params.train.device)
    data = adapt.read_lab(root, index, classes, classifier_of.preprocess)
    md5 = adapt.lab_md5(root, index)
    tags = {"adapt.lab": lab, "adapt.per_class": str(per_class), "adapt.seed": str(seed),
            "adapt.base_model": uri, "adapt.base_version": version, "adapt.data_md5": md5,
            "dvc_stage": f"adapt@{lab}"}
    out = params.resolve(a.out_dir) / lab
    with tracking.run(params, run_name=f"adapt-{lab}-k{per_class}-s{seed}", tags=tags) as run:
        mlflow.log_params(tracking.flat_params("", {"folder": str(root), "per_class": per_class,
                                                    "seed": seed, "base_model": uri,
                                                    "adapt": a.model_dump(exclude={"labs", "curve"}),
                                                    **threads}))
        result = adapt.adapt(classifier_of.model, classifier_of.config, data, per_class, seed,
                             params, device)
        metrics = {"lab": lab, "base_model": uri, "base_version": version, "data_md5": md5,
                   **result.metrics}
        write_csv(out / "images.csv", adapt.images_table(result.data))
        write_csv(out / "predictions.csv", result.predictions)
        write_csv(out / "cv.csv", result.cv)
        write_json(out / "metrics.json", metrics)
        weights = write_torch(out / "model.pt", result.model.state_dict())
        for name in ("images.csv", "predictions.csv", "cv.csv", "metrics.json"):
            mlflow.log_artifact(str(out / name))  # images.csv: which images it learned from
        mlflow.log_metrics(tracking_metrics(metrics))
        # the very end: the registry changes only once everything above has worked
        registered = pyfunc.register_classifier(
            client, model_name, run.info.run_id, weights, result.config,
            description=f"{uri} adapted to lab {lab}: K={per_class} labelled cells per class, "
                        f"seed {seed}; macro-F1 {metrics['f1_macro']:.3f} on the lab's "
                        f"{metrics['test_images']} other images")
        for key, value in tags.items():
            if key != "dvc_stage":
                client.set_model_version_tag(model_name, registered.version, key, value)
        client.set_registered_model_alias(model_name, alias, registered.version)
    metrics.update(registered_version=str(registered.version), alias=alias,
                   model_uri=f"models:/{model_name}@{alias}")
    write_json(out / "metrics.json", metrics)
    log.info("registered %s version %s as @%s: macro-F1 %.3f %s on %d test images (zero-shot "
             "%.3f)", model_name, registered.version, alias, metrics["f1_macro"],
             metrics["f1_macro_ci"], metrics["test_images"], metrics["zero_shot"]["f1_macro"])
    return metrics


def from_cli(params: Params, folder: str | None, lab: str, per_class: int | None,
             model_uri: str | None, manifest: str | None, seed: int | None, replace: bool) -> dict:
    """`wbc-transfer adapt`: FOLDER / --per-class / --manifest default to adapt.labs.<lab> (the
    stage adapt@<lab> passes only --lab); raises ConfigError when neither gives them."""
    entry = params.adapt.labs.get(lab)
    if folder is None or per_class is None:
        if entry is None:
            raise ConfigError(f"wbc-transfer adapt --lab {lab}: give FOLDER and --per-class K, or "
                              f"list the lab under adapt.labs in params.yaml (known: "
                              f"{sorted(params.adapt.labs)})")
        folder = entry.root if folder is None else folder
        per_class = entry.per_class if per_class is None else per_class
        manifest = entry.manifest if manifest is None else manifest
    return main(params, folder, lab, per_class, model_uri, manifest, seed, replace)


def tracking_metrics(metrics: dict) -> dict[str, float]:
    """The numbers of an adapt metrics.json as flat MLflow metrics (lab test, zero-shot, sets)."""
    flat = {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}
    flat.update({f"zero_shot_{k}": float(v) for k, v in metrics["zero_shot"].items()
                 if isinstance(v, float)})
    sets = metrics.get("sets") or {}
    flat.update({f"sets_{k}": float(v) for k, v in sets.items() if isinstance(v, int | float)})
    return flat
