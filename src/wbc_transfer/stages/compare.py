"""DVC stage `compare`: the study's Table 2 (rows: metrics, columns: architectures), per
protocol and evaluation set, as Markdown and CSV, plus a bar chart."""

from __future__ import annotations

import logging

import pandas as pd

from wbc_transfer import models
from wbc_transfer.comparison import collect
from wbc_transfer.config import Params
from wbc_transfer.io import write_csv, write_json, write_text
from wbc_transfer.metrics import SUMMARY_METRICS
from wbc_transfer.plots import grouped_bars

log = logging.getLogger(__name__)

LABELS = {"accuracy": "Accuracy", "precision_macro": "Precision (macro)",
          "recall_macro": "Recall (macro)", "f1_macro": "F-measure (macro)"}


def weights_label(source: str) -> str:
    return "ImageNet" if models.is_pretrained(source) else f"**{source}**"


def table_blocks(long: pd.DataFrame) -> str:
    lines = ["# Table 2: comparison of the architectures", ""]
    for (protocol, eval_set), block in long.groupby(["protocol", "eval_set"], sort=False):
        archs = list(dict.fromkeys(block["architecture"]))
        n = int(block["n"].iloc[0])
        lines += [f"## Trained on `{protocol}`, evaluated on `{eval_set}` (n = {n})", ""]
        lines.append("| Metric | " + " | ".join(archs) + " |")
        lines.append("| --- |" + " --- |" * len(archs))
        for metric in SUMMARY_METRICS:
            cells = []
            for arch in archs:
                values = block[(block["architecture"] == arch) & (block["metric"] == metric)]["value"]
                cells.append(f"{values.mean():.3f}" + (f" ± {values.std():.3f}" if len(values) > 1 else ""))
            lines.append(f"| {LABELS[metric]} | " + " | ".join(cells) + " |")
        sources = [weights_label(block[block["architecture"] == a]["weights_source"].iloc[0])
                   for a in archs]
        lines.append("| Weights | " + " | ".join(sources) + " |")
        lines.append("")
    lines += ["Weights: **random-init** columns were NOT ImageNet-pretrained (weights unavailable "
              "offline, `train.weights=auto`); compare them with care.", ""]
    return "\n".join(lines)


def main(params: Params) -> pd.DataFrame:
    out = params.resolve(params.compare.out_dir)
    long = collect(params)
    write_csv(out / "table2_long.csv", long)
    wide = long.pivot_table(index=["protocol", "eval_set", "metric"], columns="architecture",
                            values="value", aggfunc="mean", sort=False)
    write_csv(out / "table2.csv", wide.reset_index())
    write_text(out / "table2.md", table_blocks(long))
    for (protocol, eval_set), block in long.groupby(["protocol", "eval_set"], sort=False):
        bars = block.pivot_table(index="architecture", columns="metric", values="value",
                                 aggfunc="mean", sort=False)[list(SUMMARY_METRICS)]
        grouped_bars(bars.rename(columns=LABELS), f"trained on {protocol}, tested on {eval_set}",
                     out / f"bars_{protocol}_{eval_set}.png")
    summary = {
        f"{protocol}/{eval_set}/{arch}": {m: round(float(v), 4) for m, v in g.groupby("metric")["value"].mean().items()}
        for (protocol, eval_set, arch), g in long.groupby(["protocol", "eval_set", "architecture"])
    }
    write_json(out / "summary.json", summary)
    log.info("Table 2 written to %s", out / "table2.md")
    return long
