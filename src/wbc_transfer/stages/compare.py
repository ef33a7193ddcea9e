"""DVC stage `compare`: the study's Table 2 (rows: metrics, columns: architectures ranked by
macro-F1, then the chance baselines) with bootstrap intervals (and mean ± sd across seeds), the
chance baselines, pairwise paired-bootstrap tests of macro-F1 among the pretrained models above
chance, the leakage gap, and a Markdown report that states the ranking and which differences
are significant. Models without ImageNet weights are tabled apart, outside ranking and tests.

Outputs (compare.out_dir):
- table2.md, table2.csv, table2_long.csv (one row per model, set and metric, with ci_low/high)
- chance.csv: the chance baselines per set; status.csv: per model and set, above chance or not
PNGs go to compare.figures_dir (cached by DVC; the text outputs stay in git):
- bars_<protocol>_<set>.png: scores with interval (one seed) or sd (several seeds) error bars
- pairwise.csv: every pairwise test (all seeds); pairwise_<protocol>_<set>.csv/.png: the matrix
  of Holm-adjusted p-values for the first seed of train.seeds (sets with two tested models)
- leakage_gap.csv/.png: paper_test vs TEST per model, with the near-duplicate counts
- report.md: the report, linking the PNGs, then calibration/review/per-class sections linking
  each model's reliability diagrams, risk-coverage curves and Grad-CAM galleries; summary.json
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from wbc_transfer.config import Params
from wbc_transfer.evaluation.metrics import SUMMARY_METRICS
from wbc_transfer.io import write_csv, write_json, write_text
from wbc_transfer.plots import grouped_bars, leakage_dumbbell, pvalue_heatmap
from wbc_transfer.reporting.comparison import (
    collect,
    fill_missing_ci,
    leakage_counts,
    leakage_gap,
    pvalue_matrix,
    significance,
)
from wbc_transfer.reporting.report import (
    LABELS,
    ranked_archs,
    report_markdown,
    table2_markdown,
    weights_label,
)
from wbc_transfer.reporting.trust_report import trust_markdown

log = logging.getLogger(__name__)

__all__ = ["LABELS", "main", "weights_label"]


def _bars(long: pd.DataFrame, figures_dir: Path, figures: dict[str, Path]) -> None:
    for (protocol, eval_set), block in long.groupby(["protocol", "eval_set"], sort=False):
        def pivot(column: str, agg: str, frame: pd.DataFrame = block) -> pd.DataFrame:
            return frame.pivot_table(index="architecture", columns="metric", values=column,
                                     aggfunc=agg, sort=False, dropna=False)[list(SUMMARY_METRICS)]

        ranked, others = ranked_archs(block)  # the ranking's order, then the not pretrained
        order = [*ranked, *others]
        bars = pivot("value", "mean").loc[order]
        if block["seed"].nunique() > 1:
            errors = pivot("value", "std").loc[order].rename(columns=LABELS)
        elif block["ci_low"].notna().all():
            low, high = pivot("ci_low", "mean").loc[order], pivot("ci_high", "mean").loc[order]
            errors = np.stack([(bars - low).T.to_numpy(), (high - bars).T.to_numpy()], axis=1)
        else:
            errors = None
        name = f"bars_{protocol}_{eval_set}"
        bars.index = [a if a in ranked else f"{a}\n(not pretrained)" for a in order]
        if isinstance(errors, pd.DataFrame):
            errors.index = bars.index
        grouped_bars(bars.rename(columns=LABELS), f"trained on {protocol}, tested on {eval_set}",
                     figures_dir / f"{name}.png", errors=errors)
        figures[name] = figures_dir / f"{name}.png"


def main(params: Params) -> pd.DataFrame:
    out = params.resolve(params.compare.out_dir)
    figures_dir = params.resolve(params.compare.figures_dir)
    alpha = 1 - params.compare.confidence
    long = fill_missing_ci(params, collect(params))
    write_csv(out / "table2_long.csv", long)
    wide = long.pivot_table(index=["protocol", "eval_set", "metric"], columns="architecture",
                            values="value", aggfunc="mean", sort=False)
    write_csv(out / "table2.csv", wide.reset_index())
    chance, status, pairs = significance(params, long)
    write_csv(out / "chance.csv", chance)
    write_csv(out / "status.csv", status)
    write_text(out / "table2.md", table2_markdown(long, params, chance=chance))
    figures: dict[str, Path] = {}
    _bars(long, figures_dir, figures)

    write_csv(out / "pairwise.csv", pairs)
    first_seed = params.train.seeds[0]
    for (protocol, eval_set), block in pairs.groupby(["protocol", "eval_set"], sort=False):
        block = block[block["seed"] == first_seed]
        if block.empty:
            continue
        archs = list(dict.fromkeys([*block["arch_a"], *block["arch_b"]]))
        p, diff = pvalue_matrix(block, archs)
        name = f"pairwise_{protocol}_{eval_set}"
        write_csv(out / f"{name}.csv", p.rename_axis("architecture").reset_index())
        pvalue_heatmap(p, diff, alpha, f"macro-F1, paired bootstrap, Holm-adjusted p (* < "
                       f"{alpha:.2f})\ntrained on "
                       f"{protocol}, tested on {eval_set}, seed {first_seed}", figures_dir / f"{name}.png")
        figures[name] = figures_dir / f"{name}.png"

    counts = leakage_counts(params)
    gap = leakage_gap(long, counts)
    if not gap.empty:
        write_csv(out / "leakage_gap.csv", gap)
        several = gap["seed"].nunique() > 1
        mean = gap.groupby(["architecture", "metric"], sort=False).mean(numeric_only=True) \
            .reset_index()
        if several:  # intervals belong to one run; averaged ones would mean nothing
            mean = mean.drop(columns=[c for c in mean.columns if "_ci_" in c])
        info = counts.get("paper/paper_test")
        dup = (f"{info['with_sibling']}/{info['images']} paper_test images have their cell in "
               f"training" if info else "")
        leakage_dumbbell(mean, {"accuracy": "accuracy", "f1_macro": "macro-F1"},
                         f"paper_test (leaky) vs TEST (leak-free){' — ' + dup if dup else ''}"
                         f"{' — mean over seeds' if several else ''}", figures_dir / "leakage_gap.png")
        figures["leakage_gap"] = figures_dir / "leakage_gap.png"

    links = {name: Path(os.path.relpath(path, out)).as_posix() for name, path in figures.items()}
    write_text(out / "report.md", report_markdown(params, long, chance, status, pairs, gap, counts,
                                                  links)
               + trust_markdown(params, out))
    summary = {
        f"{protocol}/{eval_set}/{arch}": {m: round(float(v), 4)
                                          for m, v in g.groupby("metric")["value"].mean().items()}
        for (protocol, eval_set, arch), g in long.groupby(["protocol", "eval_set", "architecture"])
    }
    write_json(out / "summary.json", summary)
    log.info("Table 2 written to %s, report to %s", out / "table2.md", out / "report.md")
    return long
