"""The model `predict` uses: its tracking URI, the registered or local pyfunc (refused unless it
carries the wbc-transfer marker: see `wbc_transfer.serving.predict`), its format and classes."""


from __future__ import annotations

import logging
import os
from pathlib import Path

# (torch, MLflow and wbc_transfer.serving.classifier are imported lazily: `wbc-transfer --help` stays fast)
log = logging.getLogger(__name__)

DEFAULT_MODEL = "models:/wbc-classifier@champion"


class ModelUnavailableError(RuntimeError):
    """The model URI cannot be resolved or is not a wbc-transfer pyfunc."""



def resolve_tracking_uri(explicit: str | None, params_file: str | None) -> str | None:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the project's store (params.yaml)."""
    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    try:
        from wbc_transfer import tracking
        from wbc_transfer.config import load_params

        return tracking.tracking_uri(load_params(params_file))
    except Exception:  # no params.yaml around: MLflow's own default
        return None


MAKE_CHAMPION = ("make one with `make repro` (= `dvc repro`: trains, evaluates and promotes "
                 "the champion; `dvc repro promote` once runs are evaluated)")


def is_local_model(uri: str) -> bool:
    """Whether `uri` names a model folder on disk rather than a `models:/`, `runs:/` or other
    URI (then no tracking store is needed, nor touched)."""
    return "://" not in uri and not uri.startswith(("models:", "runs:"))


def load_model(uri: str, tracking_uri: str | None = None):
    """Load a wbc-transfer pyfunc; ModelUnavailableError (one clear line) if that fails.

    A local folder is read as it is: no tracking store is opened (MLflow would otherwise look
    the folder's logged-model id up in the store, and create an empty SQLite file on the way).
    A `models:/` or `runs:/` URI on a SQLite store that does not exist yet (a fresh clone) is
    refused with the command that makes a champion, without creating that file."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from wbc_transfer.serving.pyfunc import MARKER_KEY

    hint = (f"{MAKE_CHAMPION}, or pass --model with a models:/<name>@<alias>, "
            "models:/<name>/<version> or a local model folder")
    if is_local_model(uri):
        folder = Path(uri).expanduser()
        if not (folder / "MLmodel").is_file():
            raise ModelUnavailableError(
                f"cannot load {uri}: not a model folder (no MLmodel file in it)\n  {hint}")
        store = str(folder)
        try:
            info = mlflow.models.Model.load(folder)
        except (MlflowException, OSError, ValueError) as exc:
            raise ModelUnavailableError(f"cannot load {uri}: {type(exc).__name__}: {exc}") from None
    else:
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
        store = mlflow.get_tracking_uri()
        if uri.startswith(("models:", "runs:")) and store.startswith("sqlite:///"):
            db = Path(store.removeprefix("sqlite:///").split("?", 1)[0])
            if not db.is_file():  # MLflow would silently create an empty store
                raise ModelUnavailableError(
                    f"cannot load {uri}: no champion yet, the tracking store {store} does not "
                    f"exist (a fresh clone before any run); {MAKE_CHAMPION}; or set "
                    "--tracking-uri / MLFLOW_TRACKING_URI to a store that has one, or pass "
                    "--model with a local model folder")
        try:
            info = mlflow.models.get_model_info(uri)
        except (MlflowException, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelUnavailableError(
                f"cannot load {uri} from {store}: {first}\n  {hint}") from None
    if MARKER_KEY not in (info.metadata or {}):
        raise ModelUnavailableError(
            f"{uri} is not a wbc-transfer image classifier (flavors: {sorted(info.flavors)}; "
            f"no '{MARKER_KEY}' metadata); refusing to load it.\n  {hint}")
    try:
        return mlflow.pyfunc.load_model(str(Path(uri).expanduser()) if is_local_model(uri)
                                        else uri)
    except Exception as exc:
        raise ModelUnavailableError(
            f"cannot load {uri}: {type(exc).__name__}: {exc}") from None


REVIEW_FORMAT = 3  # the first pyfunc format (pyfunc.FORMAT_VERSION) with `review` and a temperature


def format_of(model) -> int:
    """The wbc-transfer pyfunc format version a loaded model was logged with (MLmodel metadata)."""
    from wbc_transfer.serving.pyfunc import MARKER_KEY

    return int((model.metadata.metadata or {}).get(MARKER_KEY, 0))


SETS_FORMAT = 4  # the first pyfunc format with the `sets` param (pyfunc.FORMAT_VERSION)


def sets_problem(model, uri: str) -> str:
    """Why `--sets` cannot be answered by `model` ('' when it can): an older format (its own
    logged code would drop the param silently) or no conformal calibration in its config."""
    if (found := format_of(model)) < SETS_FORMAT:
        return (f"{uri} is a format-{found} model, older than prediction sets (format "
                f"{SETS_FORMAT}); re-register it (`dvc repro promote`), or leave out --sets")
    if not (model.metadata.metadata or {}).get("conformal"):
        return (f"{uri} has no conformal calibration for --sets: adapt it to your lab with "
                "labelled cells (`wbc-transfer adapt FOLDER --lab NAME --per-class K`, K >= 2) "
                "and use models:/wbc-classifier@lab-NAME")
    return ""


def classes_of(model) -> list[str]:
    return list(model.metadata.metadata["classes"])
