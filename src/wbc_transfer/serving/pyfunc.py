"""The classifier packaged as an MLflow models-from-code pyfunc (`pyfunc_model.py` + weights +
config), logged once per run and weights file, and registered as a `wbc-classifier` version.
What the pyfunc does on load and predict: `wbc_transfer.serving.classifier`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from wbc_transfer.io import file_sha256
from wbc_transfer.serving.classifier import CONFIG_KEYS, INPUT_COLUMN, OPTIONAL_CONFIG, VIEW_CONFIG_KEYS

log = logging.getLogger(__name__)

ARTIFACT_NAME = "classifier"  # the logged model's name in the winning run
MARKER_KEY = "wbc_transfer_pyfunc"  # MLmodel metadata key that identifies this format
FORMAT_VERSION = 4  # 4: param `sets` + `set` column; 3: temperature + `review`; 2: input `string`
CODE_FILE = Path(__file__).with_name("pyfunc_model.py")


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        # string, not binary: the scoring server would decode a binary column's base64 for the
        # whole batch and fail all of it on one bad row; `as_bytes` decodes row by row
        inputs=Schema([ColSpec(DataType.string, INPUT_COLUMN)]),
        params=ParamSchema([ParamSpec("tta", DataType.boolean, False),
                            ParamSpec("batch_size", DataType.long, 32),
                            ParamSpec("review_below", DataType.double, 0.0),
                            ParamSpec("sets", DataType.double, 0.0)]),
    )


def pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package in ("mlflow", "torch", "torchvision", "pillow", "numpy", "pandas", "kornia", "crepes",
                    "scikit-image",
                    "efficientnet-lite-pytorch", "wbc-transfer"):
        try:
            out.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            out.append(package)
    return out


def config_from_run_json(info: dict[str, Any]) -> dict[str, Any]:
    """The pyfunc config from a training `run.json` (results/train/<name>/run.json), with its
    robustness options (stain_norm, norm_layer) so the served network gets the same layers."""
    from wbc_transfer.models import robustness

    return {"architecture": info["architecture"], "image_size": int(info["image_size"]),
            "mean": [float(v) for v in info["mean"]], "std": [float(v) for v in info["std"]],
            "classes": list(info["classes"]),
            "temperature": float(info.get("temperature", 1.0)), **robustness.options_of(info),
            **{k: info[k] for k in VIEW_CONFIG_KEYS if k in info}}


def log_classifier(weights: str | Path, config: dict[str, Any], name: str = ARTIFACT_NAME,
                   step: int = 0):
    """Log the pyfunc into the active run; returns MLflow's ModelInfo."""
    import mlflow

    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"classifier config lacks {missing}")
    # the whole config travels (preprocessing keys included), the required keys first
    config = {**{k: config[k] for k in CONFIG_KEYS}, **OPTIONAL_CONFIG, **config}
    digest = file_sha256(weights)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # quiet stage logs
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # MLflow nags about type hints and input examples; the signature is explicit
        warnings.filterwarnings("ignore", message=".*(type hint|input example).*")
        config_file, weights_file = Path(tmp) / "config.json", Path(tmp) / "weights.pt"
        config_file.write_text(json.dumps(config, indent=2))
        shutil.copyfile(weights, weights_file)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(CODE_FILE),
            artifacts={"weights": str(weights_file), "config": str(config_file)},
            signature=signature(),
            pip_requirements=pip_requirements(),
            metadata={MARKER_KEY: FORMAT_VERSION, "weights_sha256": digest, **config},
            tags={"weights_sha256": digest, "format_version": str(FORMAT_VERSION)},
            step=step,
        )


def logged_models(run_id: str, name: str = ARTIFACT_NAME) -> list[Any]:
    """The logged models called `name` whose source run is `run_id`, oldest first."""
    import mlflow

    run = mlflow.get_run(run_id)
    found = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{name}'",
        output_format="list",
    )
    return sorted(found, key=lambda m: m.creation_timestamp)


def find_logged(run_id: str, name: str = ARTIFACT_NAME, weights_sha256: str | None = None):
    """The latest ready logged model `name` of run `run_id` (with those weights), or None."""
    found = [m for m in logged_models(run_id, name) if str(m.status).endswith("READY")
             and m.tags.get("format_version") == str(FORMAT_VERSION)
             and (weights_sha256 is None or m.tags.get("weights_sha256") == weights_sha256)]
    return found[-1] if found else None


def ensure_classifier(run_id: str, weights: str | Path, config: dict[str, Any],
                      name: str = ARTIFACT_NAME) -> str:
    """Log the pyfunc into run `run_id` unless it already holds one with these weights;
    returns the logged model's `models:/<model_id>` URI."""
    import mlflow

    existing = find_logged(run_id, name, file_sha256(weights))
    if existing is not None:
        log.info("run %s already has the pyfunc %r (%s)", run_id, name, existing.model_id)
        return f"models:/{existing.model_id}"
    # a later model of the same name gets a higher step: `runs:/<run>/<name>` resolves to it
    step = len(logged_models(run_id, name))
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        info = log_classifier(weights, config, name, step)
    else:
        with mlflow.start_run(run_id=run_id):
            info = log_classifier(weights, config, name, step)
    log.info("logged the pyfunc %r into run %s (%s)", name, run_id, info.model_id)
    return f"models:/{info.model_id}"


def load_trained_folder(folder: Path, run_id: str) -> tuple[Path, dict[str, Any]]:
    """(weights file, config) from results/train/<name>, checked against `run_id`."""
    from wbc_transfer.io import read_json

    weights, run_json = folder / "model.pt", folder / "run.json"
    if not weights.is_file() or not run_json.is_file():
        raise FileNotFoundError(f"{folder}: model.pt/run.json missing; run the train stage")
    info = read_json(run_json)
    if info.get("run_id") != run_id:
        raise ValueError(f"{run_json} belongs to MLflow run {info.get('run_id')}, not to the "
                         f"winning run {run_id}; rerun the train stage")
    return weights, config_from_run_json(info)


def is_classifier_version(version: Any) -> bool:
    """Whether a registered model version is this module's pyfunc in its current format
    (tagged at registration); an older format gets re-registered by `promote`."""
    tags = getattr(version, "tags", None) or {}
    return (tags.get("artifact") == ARTIFACT_NAME
            and tags.get("format_version") == str(FORMAT_VERSION))


def register_classifier(client: Any, model_name: str, run_id: str, weights: str | Path,
                        config: dict[str, Any], description: str = ""):
    """Log the pyfunc into the run if needed and register `runs:/<run_id>/classifier` as a
    new version of `model_name` (tagged artifact=classifier); returns the ModelVersion."""
    import mlflow

    ensure_classifier(run_id, weights, config)
    version = mlflow.register_model(f"runs:/{run_id}/{ARTIFACT_NAME}", model_name,
                                    tags={"artifact": ARTIFACT_NAME, "format": "pyfunc-from-code",
                                          "format_version": str(FORMAT_VERSION),
                                          "weights_sha256": file_sha256(weights)})
    if description:
        client.update_model_version(model_name, version.version, description=description)
    return client.get_model_version(model_name, version.version)
