"""Which models the page offers, and what each one is: read from the MLflow registry and run.

A *choice* is a model URI the page can load: every alias of the registered model
(`models:/wbc-classifier@champion`, `@lab-pbc`, ...) and every version (`models:/wbc-classifier/3`).
A *card* is what the page shows about the chosen model: the registered version, its aliases
and description, what it was trained on (the training run's params and dataset inputs), the
temperature, the review threshold, and the evaluation figures the `evaluate` stage logged into
the same run (`<set>_<metric>` with `<set>_<metric>_ci_low/high`: cluster-bootstrap intervals).
Nothing here is recomputed: a run without evaluation metrics shows none.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

# evaluate's own set names (kind "validation" / "test"); any other set is an external lab's
SET_KINDS = {"validation": "validation", "TEST": "test", "TEST_SIMPLE": "test",
             "paper_test": "test"}  # also the order of the card's table; external sets follow
FIGURES = ("accuracy", "f1_macro")  # shown with their intervals
INTERVAL_SUFFIX = "_f1_macro_ci_low"  # a set is listed when evaluate logged this metric
# training run params that say what the model learnt from (tracking.flat_params of train)
TRAINED_ON = ("architecture", "protocol", "seed", "image_size", "weights_source", "recipe",
              "epochs", "train_images", "train_cells", "validation_images", "validation_cells",
              "selection", "data_md5", "stain_norm", "git_commit")
# training run metrics shown with them: the kept epoch and the temperature fitted on validation
TRAINED_ON_METRICS = ("selected_epoch", "epochs_run", "temperature")
REVIEW_METRIC = "review_threshold"  # evaluate: the confidence that keeps validation accuracy high

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class Choice:
    """One entry of the page's model list."""

    uri: str
    label: str
    version: str


@dataclass
class Card:
    """What the page shows about one model (all values as read; None/empty when absent)."""

    uri: str
    name: str | None = None
    version: str | None = None
    aliases: list[str] = field(default_factory=list)
    description: str = ""
    run_id: str | None = None
    run_name: str | None = None
    trained_on: dict[str, str] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    figures: list[dict[str, Any]] = field(default_factory=list)
    review_threshold: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_uri(uri: str) -> tuple[str, str | None, str | None] | None:
    """`models:/<name>@<alias>` or `models:/<name>/<version>` -> (name, alias, version);
    None for any other URI (a local folder, `runs:/...`, `models:/<model id>`)."""
    match = _MODELS_URI.match(uri)
    if not match:
        return None
    return match["name"], match["alias"], match["version"]


def choices(client: MlflowClient, name: str, default: str | None = None) -> list[Choice]:
    """The aliases of registered model `name` (champion first, then by name), then its
    versions, newest first; `default` first when it is not among them (e.g. a local folder).
    An unknown name gives only `default` (or nothing)."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException:  # no such registered model (yet)
        versions, aliases = [], {}
    versions = sorted(versions, key=lambda v: int(v.version), reverse=True)
    aliased = sorted(((alias, str(v)) for alias, v in aliases.items()),
                     key=lambda a: (a[0] != "champion", a[0]))
    out = [Choice(f"models:/{name}@{alias}", f"{alias} (version {version})", version)
           for alias, version in aliased]
    out += [Choice(f"models:/{name}/{v.version}", f"version {v.version}", str(v.version))
            for v in versions]
    if default and default not in {c.uri for c in out}:
        out.insert(0, Choice(default, default, ""))
    return out


def evaluation_figures(metrics: dict[str, float]) -> list[dict[str, Any]]:
    """Rows {set, kind, n_cells, cell_accuracy, accuracy, accuracy_ci, f1_macro, f1_macro_ci}
    from a run's metrics as `evaluate` logs them; validation first, then test sets, then
    external sets (by name). Missing values are None."""
    sets = [key.removesuffix(INTERVAL_SUFFIX) for key in metrics if key.endswith(INTERVAL_SUFFIX)]
    rows = []
    for name in sets:
        row: dict[str, Any] = {"set": name, "kind": SET_KINDS.get(name, "external"),
                               "n_cells": metrics.get(f"{name}_n_cells"),
                               "cell_accuracy": metrics.get(f"{name}_cell_accuracy")}
        for m in FIGURES:
            low, high = metrics.get(f"{name}_{m}_ci_low"), metrics.get(f"{name}_{m}_ci_high")
            row[m] = metrics.get(f"{name}_{m}")
            row[f"{m}_ci"] = [low, high] if low is not None and high is not None else None
        rows.append(row)
    return sorted(rows, key=lambda r: (list(SET_KINDS).index(r["set"]) if r["set"] in SET_KINDS
                                       else len(SET_KINDS), r["set"]))


def card(client: MlflowClient, uri: str) -> Card:
    """The card of `uri`. A registered alias or version gets its registry entry and run; other
    URIs (local folder, models:/<id>) get only their URI. Raises MlflowException when the
    alias or version does not exist."""
    parsed = parse_uri(uri)
    if parsed is None:
        return Card(uri=uri)
    name, alias, number = parsed
    version = (client.get_model_version_by_alias(name, alias) if alias
               else client.get_model_version(name, number))
    out = Card(uri=uri, name=name, version=str(version.version),
               aliases=sorted(version.aliases or []), description=version.description or "",
               run_id=version.run_id)
    if not version.run_id:
        return out
    try:
        run = client.get_run(version.run_id)
    except MlflowException:  # the run was deleted: the registry entry is all there is
        return out
    params, metrics = run.data.params, run.data.metrics
    out.run_name = run.info.run_name
    out.trained_on = {**{k: params[k] for k in TRAINED_ON if k in params},
                      **{k: f"{metrics[k]:g}" for k in TRAINED_ON_METRICS if k in metrics}}
    inputs = getattr(run, "inputs", None)
    out.datasets = sorted({d.dataset.name for d in (getattr(inputs, "dataset_inputs", None) or [])})
    out.figures = evaluation_figures(metrics)
    out.review_threshold = metrics.get(REVIEW_METRIC)
    return out


@dataclass
class Loaded:
    """A loaded pyfunc and its `wbc_transfer.serving.classifier.Classifier` (the same network object).

    `lock` serialises work on the network: Grad-CAM hooks its layer, so a Grad-CAM and a
    batch must not run through it at the same time."""

    uri: str
    pyfunc: Any
    classifier: Any
    lock: Any

    @property
    def classes(self) -> list[str]:
        return list(self.classifier.classes)


class ModelCache:
    """Models loaded by `wbc_transfer.serving.loading.load_model` (the CLI's checks: marker, store),
    kept by URI and registered version (an alias moved to another version loads that one);
    the least recently used is dropped beyond `size`."""

    def __init__(self, tracking_uri: str | None, size: int = 2):
        import threading

        self.tracking_uri, self.size = tracking_uri, size
        self._models: dict[tuple[str, str], Loaded] = {}
        self._lock = threading.Lock()

    def get(self, uri: str, version: str | None = None) -> Loaded:
        """The loaded model; raises wbc_transfer.serving.loading.ModelUnavailableError (one line)."""
        import threading

        from wbc_transfer.serving.loading import load_model

        with self._lock:
            key = (uri, version or "")
            if key in self._models:
                self._models[key] = self._models.pop(key)  # most recent last
                return self._models[key]
            pyfunc = load_model(uri, self.tracking_uri)
            loaded = Loaded(uri, pyfunc, pyfunc.unwrap_python_model().classifier, threading.Lock())
            self._models[key] = loaded
            while len(self._models) > self.size:
                self._models.pop(next(iter(self._models)))
            return loaded
