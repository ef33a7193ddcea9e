"""Collect evaluation results of every trained model into one long table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from wbc_transfer.config import Params
from wbc_transfer.io import read_json
from wbc_transfer.metrics import SUMMARY_METRICS
from wbc_transfer.stages.train import model_name


def expected_models(params: Params) -> list[tuple[str, str, int]]:
    t = params.train
    return [(a, p, s) for a in t.architectures for p in t.protocols for s in t.seeds]


def eval_folder(params: Params, arch: str, protocol: str, seed: int) -> Path:
    return params.resolve(params.evaluate.out_dir) / model_name(arch, protocol, seed)


def collect(params: Params) -> pd.DataFrame:
    """One row per (model, evaluation set, metric)."""
    rows = []
    for arch, protocol, seed in expected_models(params):
        file = eval_folder(params, arch, protocol, seed) / "metrics.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file} missing: run `dvc repro` (evaluate stages) first")
        summary = read_json(file)
        for eval_set, scores in summary["sets"].items():
            for metric in SUMMARY_METRICS:
                rows.append({
                    "architecture": arch, "protocol": protocol, "seed": seed,
                    "eval_set": eval_set, "metric": metric, "value": scores[metric],
                    "n": scores["n"], "weights_source": summary["weights_source"],
                    "run_id": summary["run_id"],
                })
    return pd.DataFrame(rows)
