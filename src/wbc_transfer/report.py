"""Markdown for people: Table 2 with intervals and the comparison report (ranking, which
differences are significant, the leakage gap). Every sentence is generated from the numbers."""

from __future__ import annotations

import math

import pandas as pd

from wbc_transfer import models, stats
from wbc_transfer.comparison import ranking
from wbc_transfer.config import Params
from wbc_transfer.metrics import SUMMARY_METRICS

LABELS = {"accuracy": "Accuracy", "precision_macro": "Precision (macro)",
          "recall_macro": "Recall (macro)", "f1_macro": "F-measure (macro)"}
PROSE = {"accuracy": "accuracy", "precision_macro": "macro precision",
         "recall_macro": "macro recall", "f1_macro": "macro-F1"}


def weights_label(source: str) -> str:
    return "ImageNet" if models.is_pretrained(source) else f"**{source}**"


def fmt_ci(value: float, low: float, high: float) -> str:
    """0.942 [0.900, 0.975]; the bare value when there is no interval."""
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def fmt_sd(mean: float, sd: float) -> str:
    """0.942 ± 0.012 (mean ± sample sd across seeds)."""
    return f"{mean:.3f}" if math.isnan(sd) else f"{mean:.3f} ± {sd:.3f}"


def fmt_signed(x: float) -> str:
    """+0.012 / -0.012 / +0.000 (never -0.000)."""
    return f"{round(float(x), 3) + 0.0:+.3f}"


def fmt_p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _blocks(long: pd.DataFrame):
    return long.groupby(["protocol", "eval_set"], sort=False)


def _seeds(block: pd.DataFrame) -> list[int]:
    return sorted(set(block["seed"]))


def _cell(block: pd.DataFrame, arch: str, metric: str, seed: int | None = None) -> str:
    rows = block[(block["architecture"] == arch) & (block["metric"] == metric)]
    if seed is None:
        values = rows["value"]
        return fmt_sd(values.mean(), values.std()) if len(values) > 1 else \
            fmt_ci(*rows[["value", "ci_low", "ci_high"]].iloc[0])
    row = rows[rows["seed"] == seed].iloc[0]
    return fmt_ci(row["value"], row["ci_low"], row["ci_high"])


def _n(block: pd.DataFrame) -> str:
    """'n = 2487 images, 71 cells': the sample size and the effective sample size."""
    return f"n = {int(block['n'].iloc[0])} images, {int(block['n_cells'].iloc[0])} cells"


def _cell_accuracy(block: pd.DataFrame, arch: str) -> str:
    values = block[(block["architecture"] == arch) & (block["metric"] == "accuracy")]["cell_accuracy"]
    return f"{values.mean():.3f}" if values.notna().any() else "—"


def intervals_note(params: Params, several_seeds: bool) -> str:
    c = params.compare
    note = (f"Brackets: {c.confidence:.0%} percentile cluster-bootstrap interval: the cells "
            f"(groups of augmented copies) are resampled, not the images ({c.bootstrap} "
            f"resamples, seed {c.seed}). Per-cell accuracy: a cell is right when more than half "
            f"of its images are." if c.bootstrap else "No intervals: `compare.bootstrap` is 0.")
    if several_seeds:
        note += " `mean ± sd`: mean and sample standard deviation (ddof = 1) across seeds."
    return note


def table2_markdown(long: pd.DataFrame, params: Params, heading: str = "#") -> str:
    """Rows: metrics (and, with several seeds, mean ± sd then one row per seed); columns:
    architectures; one block per (protocol, evaluation set)."""
    lines = [f"{heading} Table 2: comparison of the architectures", ""]
    several = False
    for (protocol, eval_set), block in _blocks(long):
        archs = list(dict.fromkeys(block["architecture"]))
        seeds = _seeds(block)
        several |= len(seeds) > 1
        lines += [f"{heading}# Trained on `{protocol}`, evaluated on `{eval_set}` ({_n(block)})", ""]
        if len(seeds) > 1:
            lines.append("| Metric | Seed | " + " | ".join(archs) + " |")
            lines.append("| --- | --- |" + " --- |" * len(archs))
            for metric in SUMMARY_METRICS:
                cells = [_cell(block, a, metric) for a in archs]
                lines.append(f"| {LABELS[metric]} | mean ± sd | " + " | ".join(cells) + " |")
                for seed in seeds:
                    cells = [_cell(block, a, metric, seed) for a in archs]
                    lines.append(f"|  | {seed} | " + " | ".join(cells) + " |")
            prefix = "| Weights |  | "
        else:
            lines.append("| Metric | " + " | ".join(archs) + " |")
            lines.append("| --- |" + " --- |" * len(archs))
            for metric in SUMMARY_METRICS:
                cells = [_cell(block, a, metric) for a in archs]
                lines.append(f"| {LABELS[metric]} | " + " | ".join(cells) + " |")
            lines.append("| Per-cell accuracy | " + " | ".join(_cell_accuracy(block, a) for a in archs)
                         + " |")
            prefix = "| Weights | "
        sources = [weights_label(block[block["architecture"] == a]["weights_source"].iloc[0])
                   for a in archs]
        lines += [prefix + " | ".join(sources) + " |", ""]
    lines += [intervals_note(params, several), ""]
    if not all(models.is_pretrained(s) for s in long["weights_source"]):
        lines += ["Weights: **random-init** columns were NOT ImageNet-pretrained (weights "
                  "unavailable offline, `train.weights=auto`); compare them with care.", ""]
    return "\n".join(lines)


def _pair_lines(pairs: pd.DataFrame, alpha: float) -> tuple[list[str], set[frozenset[str]]]:
    """Bullet lines for the significant pairs of one (protocol, eval_set), and those pairs."""
    seeds = sorted(set(pairs["seed"]))
    lines, significant = [], set()
    for (a, b), g in pairs.groupby(["arch_a", "arch_b"], sort=False):
        hits = int(g["significant"].sum())
        if not hits:
            continue
        if hits == len(seeds):  # with several seeds, only a difference found in every seed
            significant.add(frozenset((a, b)))
        better, worse = (a, b) if (g["accuracy_a"] - g["accuracy_b"]).mean() >= 0 else (b, a)
        if len(seeds) == 1:
            r = g.iloc[0]
            acc = {r.arch_a: r.accuracy_a, r.arch_b: r.accuracy_b}
            only = {r.arch_a: r.b, r.arch_b: r.c}
            lines.append(
                f"- **{better}** > {worse}: per-cell accuracy {acc[better]:.3f} vs {acc[worse]:.3f}; "
                f"{only[better]} cells only {better} got right, {only[worse]} only {worse} "
                f"({r.method}), p = {fmt_p(r.p_value)}, Holm-adjusted p = {fmt_p(r.p_holm)}")
        else:
            lines.append(f"- **{better}** > {worse}: significant in {hits} of {len(seeds)} seeds "
                         f"(Holm-adjusted p per seed: "
                         + ", ".join(f"{s}: {fmt_p(p)}" for s, p in zip(g["seed"], g["p_holm"],
                                                                       strict=True)) + ")")
    return lines, significant


def _not_separable(best: str, archs: list[str], significant: set[frozenset[str]]) -> list[str]:
    return [a for a in archs if a != best and frozenset((best, a)) not in significant]


def report_markdown(params: Params, long: pd.DataFrame, pairs: pd.DataFrame,
                    gap: pd.DataFrame, counts: dict[str, dict[str, object]],
                    figures: dict[str, str]) -> str:
    """The comparison report; figures: name -> PNG path relative to the report."""
    alpha = 1 - params.compare.confidence
    ranks = ranking(long)
    seeds = sorted(set(long["seed"]))
    several = len(seeds) > 1
    unpretrained = sorted({a for a, s in zip(long["architecture"], long["weights_source"],
                                              strict=True) if not models.is_pretrained(s)})
    lines = [
        "# Comparison report", "",
        "Generated by `wbc-transfer compare` (DVC stage `compare`) from the evaluate stages' "
        "metrics and per-image predictions; every number and claim below is computed from them.",
        "",
        f"- Models: {long['architecture'].nunique()} architectures "
        f"({', '.join(dict.fromkeys(long['architecture']))}), "
        f"protocol(s) {', '.join(f'`{p}`' for p in dict.fromkeys(long['protocol']))}, "
        f"seed(s) {', '.join(map(str, seeds))}.",
        f"- Ranking: by accuracy{' (mean over seeds)' if several else ''}, the quantity the "
        "McNemar test compares; ties broken by macro-F1.",
        "- Which set chose what: per-epoch validation, checkpoint choice, early stopping, the "
        "Optuna objective and the champion (`promote`) use only the `validation` cells (TRAIN "
        "cells in no training split). `paper_test`, `TEST` and `TEST_SIMPLE` are test sets: "
        "reported, never used to choose." + (
            f" The external sets ({', '.join(f'`{n}`' for n in params.external)}, other labs) are "
            "test sets too: scored for every model, they chose nothing (no epoch, "
            "hyper-parameter, option, threshold or champion)." if params.external else ""),
        f"- Significance: pairwise McNemar tests on the same cells (per-cell outcomes), "
        f"Holm-corrected over the "
        f"pairs of each evaluation set{' and seed' if several else ''}, at "
        f"α = 1 − compare.confidence = {alpha:.2f}.",
    ]
    if unpretrained:
        lines.append(f"- **Caution**, not ImageNet-pretrained (weights unavailable, trained from "
                     f"random initialisation): {', '.join(unpretrained)}. Their scores do not "
                     "measure transfer learning.")
    lines += ["", "## Summary", ""]
    sections: list[str] = []
    for (protocol, eval_set), block in _blocks(long):
        r = ranks[(ranks["protocol"] == protocol) & (ranks["eval_set"] == eval_set)]
        block_pairs = pairs[(pairs["protocol"] == protocol) & (pairs["eval_set"] == eval_set)]
        sig_lines, significant = _pair_lines(block_pairs, alpha)
        archs = list(r["architecture"])
        best = archs[0]
        title = f"Trained on `{protocol}`, evaluated on `{eval_set}` ({_n(block)})"
        best_cell = _cell(block, best, "accuracy")
        tied = _not_separable(best, archs, significant)
        n_pairs = block_pairs.groupby(["arch_a", "arch_b"]).ngroups
        if len(archs) == 1:
            claim = "only one architecture."
        elif not tied:
            claim = (f"**{best}** is significantly more accurate than every other architecture "
                     f"({len(significant)} of {n_pairs} pairwise differences significant).")
        else:
            claim = (f"best **{best}** (accuracy {best_cell}), but it is not significantly "
                     f"more accurate than {', '.join(tied)}; {len(significant)} of {n_pairs} "
                     "pairwise differences are significant.")
        lines.append(f"- {title}: {claim}")
        sections += [f"### {title}", "",
                     "| Rank | Architecture | Accuracy | F-measure (macro) | "
                     "Not significantly different from the best | Weights |",
                     "| --- | --- | --- | --- | --- | --- |"]
        for row in r.itertuples(index=False):
            a = row.architecture
            same = "—" if a == best else ("yes" if a in tied else "no (worse)")
            source = block[block["architecture"] == a]["weights_source"].iloc[0]
            sections.append(f"| {row.rank} | {a} | {_cell(block, a, 'accuracy')} | "
                            f"{_cell(block, a, 'f1_macro')} | {same} | {weights_label(source)} |")
        sections.append("")
        if sig_lines:
            sections += [f"Significant differences (Holm-adjusted p < {alpha:.2f}):", "",
                         *sig_lines, ""]
        else:
            sections += [f"No pairwise difference is significant (Holm-adjusted p < {alpha:.2f})"
                         f"{' in any seed' if several else ''}: this ranking is not supported by "
                         "the data.", ""]
        key = f"mcnemar_{protocol}_{eval_set}"
        if key in figures:
            sections += [f"![McNemar tests, {protocol} on {eval_set}]({figures[key]})", ""]
        key = f"bars_{protocol}_{eval_set}"
        if key in figures:
            sections += [f"![Scores, {protocol} on {eval_set}]({figures[key]})", ""]

    lines += _leakage_summary(gap, counts)
    lines += external_section(long, list(params.external), params.compare.confidence)
    lines += ["", "## Ranking and significance per evaluation set", "", *sections]
    lines += _leakage_section(gap, counts, figures)
    lines += ["", table2_markdown(long, params, heading="##"), ""]
    lines += _method(params, several)
    return "\n".join(lines).rstrip() + "\n"


def external_section(long: pd.DataFrame, external: list[str], confidence: float,
                     metric: str = "f1_macro") -> list[str]:
    """Markdown lines: per model, `metric` on TEST and on each external set (one column each,
    cluster-bootstrap intervals) and the drop TEST -> external set; [] without external sets."""
    present = [n for n in external if n in set(long["eval_set"])]
    if not present or "TEST" not in set(long["eval_set"]):
        return []
    rows = long[long["metric"] == metric]
    header = ["Protocol", "Architecture", "Seed", "`TEST`",
              *(c for n in present for c in (f"`{n}`", f"Drop `TEST` → `{n}`"))]
    lines = ["", "## Another lab's cells: external test sets", "",
             f"{PROSE[metric].capitalize()} with {confidence:.0%} cluster-bootstrap intervals "
             "(external sets: each image its own cell unless a manifest gave groups). The "
             "external sets are test sets: no stage chose anything by them.", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for (protocol, arch, seed), block in rows.groupby(["protocol", "architecture", "seed"],
                                                      sort=False):
        by_set = block.set_index("eval_set")
        if "TEST" not in by_set.index:
            continue
        test = by_set.loc["TEST"]
        cells = [protocol, arch, str(seed), fmt_ci(test["value"], test["ci_low"], test["ci_high"])]
        for name in present:
            if name not in by_set.index:
                cells += ["—", "—"]
                continue
            ext = by_set.loc[name]
            cells += [fmt_ci(ext["value"], ext["ci_low"], ext["ci_high"]),
                      fmt_signed(ext["value"] - test["value"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


REFERENCE_SETS = {"paper_train": "the paper training split",
                  "all_TRAIN": "the whole Kaggle TRAIN folder"}


def _count_sentence(key: str, info: dict[str, object]) -> str:
    where = REFERENCE_SETS.get(str(info["compared_with"]), f"`{info['compared_with']}`")
    share = int(info["with_sibling"]) / max(int(info["images"]), 1)
    return (f"{info['with_sibling']} of {info['images']} `{key}` images ({share:.1%}; "
            f"{info.get('cells_shared', '?')} of {info.get('cells', '?')} cells) have their cell in "
            f"{where}")


def _mean_gap(gap: pd.DataFrame) -> pd.DataFrame:
    return gap.groupby(["architecture", "metric"], sort=False)[["paper_test", "TEST", "gap"]] \
        .mean().reset_index()


def _leakage_summary(gap: pd.DataFrame, counts: dict[str, dict[str, object]]) -> list[str]:
    if gap.empty:
        return ["- Leakage gap: not available (needs the `paper` protocol evaluated on "
                "`paper_test` and `TEST`)."]
    mean = _mean_gap(gap)
    out = []
    for metric in ("accuracy", "f1_macro"):
        g = mean[mean["metric"] == metric]["gap"]
        out.append(f"{PROSE[metric]} {fmt_signed(g.mean())} on average "
                   f"(higher on `paper_test` for {int((g > 0).sum())} of {len(g)} models)")
    text = "- Leakage gap (`paper_test` − `TEST`): " + "; ".join(out) + "."
    if counts:
        text += " " + "; ".join(_count_sentence(s, i) for s, i in counts.items()) + "."
    return [text]


def _leakage_section(gap: pd.DataFrame, counts: dict[str, dict[str, object]],
                     figures: dict[str, str]) -> list[str]:
    if gap.empty:
        return []
    mean = _mean_gap(gap).pivot_table(index="architecture", columns="metric",
                                      values=["paper_test", "TEST", "gap"], sort=False)
    lines = ["## The leakage gap", "",
             "The same models on two test sets: `paper_test`, drawn from the Kaggle TRAIN "
             "folder like the paper protocol's training images, and the separate `TEST` folder. "
             "Gap = `paper_test` − `TEST` (mean over seeds).", "",
             "| Architecture | Accuracy `paper_test` | Accuracy `TEST` | Gap | "
             "F-measure `paper_test` | F-measure `TEST` | Gap |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for arch in mean.index:
        cells = []
        for metric in ("accuracy", "f1_macro"):
            cells += [f"{mean.loc[arch, ('paper_test', metric)]:.3f}",
                      f"{mean.loc[arch, ('TEST', metric)]:.3f}",
                      fmt_signed(mean.loc[arch, ("gap", metric)])]
        lines.append(f"| {arch} | " + " | ".join(cells) + " |")
    lines.append("")
    if counts:
        lines += ["Leakage by cells (split stage, `leakage.json`): "
                  + "; ".join(_count_sentence(s, i) for s, i in counts.items()) + ".", ""]
    if "leakage_gap" in figures:
        lines += [f"![Leakage gap]({figures['leakage_gap']})", ""]
    return lines


def _method(params: Params, several: bool) -> list[str]:
    c = params.compare
    return [
        "## Method", "",
        f"- Intervals: percentile cluster bootstrap, {c.bootstrap} resamples of the cells "
        f"(groups from the `groups` stage; each drawn cell brings all its images; seed {c.seed}), "
        f"{c.confidence:.0%} level; accuracy and macro precision/recall/F1 recomputed with "
        "scikit-learn (sample weights = draw counts) on every resample "
        "(`wbc_transfer.stats.bootstrap_ci`). They reflect the finite number of cells, not "
        "training variability. The effective n is the number of cells.",
        f"- McNemar: on the cells both models classified (a cell is right when more than half of "
        f"its images are), b = only the first right, c = only the second right; statsmodels' "
        f"exact binomial test when b + c < {stats.EXACT_BELOW}, else chi-square with continuity "
        "correction; p = 1 when b + c = 0 (`wbc_transfer.stats.mcnemar`).",
        "- Holm correction over the pairs of architectures within one (protocol, evaluation "
        "set, seed) (`wbc_transfer.stats.holm`).",
        ("- Seeds: every seed is a separate training run; tables give mean ± sample sd across "
         "seeds beside each seed's value. McNemar tests run per seed (all in `mcnemar.csv`); "
         f"the heatmaps show seed {params.train.seeds[0]}. The summary and the \"not "
         "significantly different\" column count a difference as significant only when it "
         "is significant in every seed." if several else
         "- Seeds: one training seed (`train.seeds`); with several, tables add mean ± sd across "
         "seeds and the tests run per seed."),
        "- Files: `table2.md`/`table2_long.csv` (scores and intervals), `mcnemar.csv` (every "
        "test), `mcnemar_<protocol>_<set>.csv` (Holm-adjusted p matrix), `leakage_gap.csv`.",
    ]
