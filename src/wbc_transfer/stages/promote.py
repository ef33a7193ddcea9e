"""DVC stage `promote`: register the best run as `wbc-classifier` with the alias `champion`.

The registered version is the run's `classifier` pyfunc (wbc_transfer.serving: models from
code, state_dict weights + JSON config, preprocessing included), served as is by
`mlflow models serve` and used by `wbc-transfer predict`.
"""

from __future__ import annotations

import contextlib
import logging

import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from wbc_transfer import serving, tracking
from wbc_transfer.comparison import collect
from wbc_transfer.config import Params
from wbc_transfer.io import write_json
from wbc_transfer.stages.train import model_name

log = logging.getLogger(__name__)


def rank(long: pd.DataFrame, protocol: str, eval_set: str, metric: str) -> pd.DataFrame:
    """Candidate runs, best first (ties broken by TEST score, then name, for determinism)."""
    scores = long[(long["protocol"] == protocol) & (long["metric"] == metric)]
    primary = scores[scores["eval_set"] == eval_set]
    if primary.empty:
        raise ValueError(
            f"no results for promote.protocol={protocol!r}, promote.eval_set={eval_set!r}; "
            f"available: {sorted(set(zip(long['protocol'], long['eval_set'], strict=True)))}"
        )
    tiebreak = scores[scores["eval_set"] == "TEST"].set_index("run_id")["value"]
    ranked = primary.assign(tiebreak=primary["run_id"].map(tiebreak).fillna(0.0))
    return ranked.sort_values(["value", "tiebreak", "architecture", "seed"],
                              ascending=[False, False, True, True]).reset_index(drop=True)


def current_champion(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def main(params: Params) -> dict[str, object]:
    p = params.promote
    ranked = rank(collect(params), p.protocol, p.eval_set, p.metric)
    best = ranked.iloc[0]
    runner = ranked.iloc[1] if len(ranked) > 1 else None
    tracking.setup(params)
    client = MlflowClient()
    champion = current_champion(client, p.model_name, p.alias)
    reason = {
        "metric": p.metric, "eval_set": p.eval_set, "protocol": p.protocol,
        "value": f"{best['value']:.4f}", "architecture": best["architecture"],
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
              "ranking": ranked[["architecture", "protocol", "seed", "value", "weights_source"]]
              .to_dict(orient="records")}
    write_json(params.resolve(p.out), result)
    return result
