"""DVC stage `promote`: register the best run as `wbc-classifier` with the alias `champion`.

The registered version is the run's `classifier` pyfunc (wbc_transfer.serving: models from
code, state_dict weights + JSON config, preprocessing included), served as is by
`mlflow models serve` and used by `wbc-transfer predict`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from wbc_transfer import serving, tracking
from wbc_transfer.comparison import collect
from wbc_transfer.config import Params
from wbc_transfer.io import write_json
from wbc_transfer.stages.train import model_name

log = logging.getLogger(__name__)


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


def main(params: Params) -> dict[str, object]:
    p = params.promote
    ranked = rank(collect(params), [x for x in p.protocols if x in params.train.protocols],
                  p.eval_set, p.metric)
    best = ranked.iloc[0]
    runner = ranked.iloc[1] if len(ranked) > 1 else None
    tracking.setup(params)
    client = MlflowClient()
    champion = current_champion(client, p.model_name, p.alias)
    reason = {
        "metric": p.metric, "eval_set": p.eval_set, "protocol": best["protocol"],
        "chosen_by": f"{p.metric} on the leak-free validation cells (no test set looked at)",
        "value": f"{best['value']:.4f}", "architecture": best["architecture"],
        "TEST_value": f"{best['test_value']:.4f}" if pd.notna(best["test_value"]) else "",
        "weights_source": best["weights_source"],
        "runner_up": (f"{runner['architecture']}-{runner['protocol']}-{runner['seed']}"
                      if runner is not None else "none"),
        "runner_up_value": f"{runner['value']:.4f}" if runner is not None else "",
    }
    # unchanged = same winning run, already registered as the serving pyfunc (`classifier`)
    if (champion is not None and champion.run_id == best["run_id"]
            and serving.is_classifier_version(champion)):
        version = champion
        log.info("champion unchanged: %s version %s (run %s)", p.model_name, version.version,
                 best["run_id"])
    else:
        with contextlib.suppress(MlflowException):  # already registered
            client.create_registered_model(p.model_name, description=(
                "White-blood-cell classifier (eosinophil, lymphocyte, monocyte, neutrophil); "
                "the champion is promoted by the `promote` DVC stage."))
        # the champion is the pyfunc with its own preprocessing (wbc_transfer.serving), logged
        # into the winning run as `classifier` from the trained weights if not already there
        folder = params.resolve(params.train.out_dir) / model_name(
            best["architecture"], best["protocol"], int(best["seed"]))
        weights, config = serving.load_trained_folder(folder, best["run_id"])
        version = serving.register_classifier(
            client, p.model_name, best["run_id"], weights, config,
            description=f"best {p.metric} on {p.eval_set}: {best['value']:.4f}",
        )
        client.set_registered_model_alias(p.model_name, p.alias, version.version)
        for key, value in reason.items():
            client.set_model_version_tag(p.model_name, version.version, f"promotion.{key}",
                                         str(value))
        log.info("registered %s version %s for run %s (%s %s = %.4f)", p.model_name,
                 version.version, best["run_id"], p.eval_set, p.metric, best["value"])
    result = {"model_name": p.model_name, "alias": p.alias, "version": str(version.version),
              "run_id": best["run_id"], **reason,
              "ranking": ranked[["architecture", "protocol", "seed", "value", "test_value",
                                 "weights_source"]].to_dict(orient="records")}
    write_json(params.resolve(p.out), result)
    return result
