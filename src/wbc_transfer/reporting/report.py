"""Markdown for people: Table 2 with intervals and the comparison report (ranking by macro-F1,
the chance baselines, which differences are significant, the leakage gap). Every sentence is
generated from the numbers. Models that did not start from ImageNet weights are listed in a
table of their own ("not pretrained (weights unavailable)"), outside the ranking and the tests;
a model whose macro-F1 interval reaches the chance level is "not distinguishable from chance"
and takes part in no significance claim."""

from __future__ import annotations

import math

import pandas as pd

from wbc_transfer.config import Params
from wbc_transfer.evaluation.metrics import SUMMARY_METRICS
from wbc_transfer.models import registry as models
from wbc_transfer.reporting.comparison import ranking

LABELS = {"accuracy": "Accuracy", "precision_macro": "Precision (macro)",
          "recall_macro": "Recall (macro)", "f1_macro": "F-measure (macro)"}
PROSE = {"accuracy": "accuracy", "precision_macro": "macro precision",
         "recall_macro": "macro recall", "f1_macro": "macro-F1"}
ORDER = ("f1_macro", *(m for m in SUMMARY_METRICS if m != "f1_macro"))  # rows: ranked metric first
NOT_PRETRAINED = "Not pretrained (weights unavailable)"
NOT_CHANCE = "not distinguishable from chance"

# what the network saw (prepare.view, wbc_transfer.data.cells.model_view)
VIEW_LABELS = {"full": "whole image", "cell": "cell crop (localised)"}


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
            f"resamples, seed {c.seed}). Per-cell accuracy (class-balanced): a cell is right "
            "when more than half of its images are; the share of right cells per class, "
            "averaged over the classes. Chance: scikit-learn `DummyClassifier` on the set's own "
            "labels (majority class; stratified random: labels drawn in the set's class "
            "proportions, a fresh draw per resample, value = mean over the resamples)."
            if c.bootstrap else "No intervals: `compare.bootstrap` is 0.")
    if several_seeds:
        note += " `mean ± sd`: mean and sample standard deviation (ddof = 1) across seeds."
    return note


def ranked_archs(block: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(pretrained architectures of one (protocol, set) block in the order of `ranking`, the
    others in configuration order)."""
    ranked = list(ranking(block)["architecture"])
    others = [a for a in dict.fromkeys(block["architecture"]) if a not in ranked]
    return ranked, others


def _chance_cell(chance: pd.DataFrame, baseline: str, metric: str) -> str:
    rows = chance[(chance["baseline"] == baseline) & (chance["metric"] == metric)]
    if rows.empty:
        return "—"
    row = rows.iloc[0]  # the same cells in every seed: the first seed's draw
    return fmt_ci(row["value"], row["ci_low"], row["ci_high"])


def _metric_rows(block: pd.DataFrame, archs: list[str], chance: pd.DataFrame) -> list[str]:
    """Markdown rows: metrics x (archs, then the chance baselines), with seeds when several."""
    seeds = _seeds(block)
    baselines = list(dict.fromkeys(chance["baseline"])) if not chance.empty else []
    header = [*archs, *(f"chance: {b}" for b in baselines)]
    several = len(seeds) > 1
    lines = ["| Metric | " + ("Seed | " if several else "") + " | ".join(header) + " |",
             "| --- |" + (" --- |" if several else "") + " --- |" * len(header)]
    for metric in ORDER:
        chance_cells = [_chance_cell(chance, b, metric) for b in baselines]
        lines.append(f"| {LABELS[metric]} | " + ("mean ± sd | " if several else "")
                     + " | ".join([*(_cell(block, a, metric) for a in archs), *chance_cells]) + " |")
        for seed in seeds if several else []:
            lines.append(f"|  | {seed} | " + " | ".join(
                [*(_cell(block, a, metric, seed) for a in archs), *chance_cells]) + " |")
    lines.append("| Per-cell accuracy (class-balanced) | " + ("mean | " if several else "")
                 + " | ".join([*(_cell_accuracy(block, a) for a in archs),
                               *("—" for _ in baselines)]) + " |")
    sources = [weights_label(block[block["architecture"] == a]["weights_source"].iloc[0])
               for a in archs]
    lines.append("| Weights | " + ("| " if several else "") + " | ".join(
        [*sources, *("—" for _ in baselines)]) + " |")
    views = [VIEW_LABELS.get(v, v) for v in
             (block[block["architecture"] == a]["view"].iloc[0] if "view" in block else "full"
              for a in archs)]
    lines.append("| View (prepare.view) | " + ("| " if several else "") + " | ".join(
        [*views, *("—" for _ in baselines)]) + " |")
    return lines


def _chance_of(chance: pd.DataFrame, protocol: str, eval_set: str) -> pd.DataFrame:
    if chance.empty:
        return chance
    return chance[(chance["protocol"] == protocol) & (chance["eval_set"] == eval_set)]


def table2_markdown(long: pd.DataFrame, params: Params, heading: str = "#",
                    chance: pd.DataFrame | None = None) -> str:
    """Rows: metrics (macro-F1 first; with several seeds, mean ± sd then one row per seed);
    columns: the pretrained architectures in ranking order (macro-F1), then the chance
    baselines; one block per (protocol, evaluation set). Models without ImageNet weights get a
    table of their own below it ("not pretrained (weights unavailable)")."""
    chance = pd.DataFrame() if chance is None else chance
    lines = [f"{heading} Table 2: comparison of the architectures", ""]
    several = False
    for (protocol, eval_set), block in _blocks(long):
        several |= len(_seeds(block)) > 1
        ranked, others = ranked_archs(block)
        lines += [f"{heading}# Trained on `{protocol}`, evaluated on `{eval_set}` ({_n(block)})", ""]
        lines += _metric_rows(block, ranked, _chance_of(chance, protocol, eval_set)) + [""]
        if others:
            lines += [f"{NOT_PRETRAINED}: trained from random initialisation, outside the ranking "
                      "and the tests; their scores do not measure transfer learning.", "",
                      *_metric_rows(block, others, pd.DataFrame()), ""]
    lines += [intervals_note(params, several), ""]
    return "\n".join(lines)


def _pair_lines(pairs: pd.DataFrame, alpha: float) -> tuple[list[str], set[frozenset[str]]]:
    """Bullet lines for the significant pairs of one (protocol, eval_set), and those pairs
    (with several seeds: significant in every seed)."""
    seeds = sorted(set(pairs["seed"]))
    lines, significant = [], set()
    for (a, b), g in pairs.groupby(["arch_a", "arch_b"], sort=False):
        hits = int(g["significant"].sum())
        if not hits:
            continue
        if hits == len(seeds):
            significant.add(frozenset((a, b)))
        better, worse = (a, b) if g["difference"].mean() >= 0 else (b, a)
        if len(seeds) == 1:
            r = g.iloc[0]
            f1 = {r.arch_a: r.f1_a, r.arch_b: r.f1_b}
            sign = 1 if better == r.arch_a else -1
            low, high = sorted((sign * r.diff_ci_low, sign * r.diff_ci_high))
            lines.append(
                f"- **{better}** > {worse}: macro-F1 {f1[better]:.3f} vs {f1[worse]:.3f}, "
                f"difference {fmt_signed(sign * r.difference)} [{low:.3f}, {high:.3f}] (paired "
                f"cluster bootstrap, {r.resamples} resamples of {r.n_cells} cells), "
                f"p = {fmt_p(r.p_value)}, Holm-adjusted p = {fmt_p(r.p_holm)}")
        else:
            lines.append(f"- **{better}** > {worse}: significant in {hits} of {len(seeds)} seeds "
                         f"(Holm-adjusted p per seed: "
                         + ", ".join(f"{s}: {fmt_p(p)}" for s, p in zip(g["seed"], g["p_holm"],
                                                                       strict=True)) + ")")
    return lines, significant


def _not_separable(best: str, archs: list[str], significant: set[frozenset[str]]) -> list[str]:
    return [a for a in archs if a != best and frozenset((best, a)) not in significant]


def _block_claim(best: str | None, above: list[str], ranked: list[str], others: list[str],
                 significant: set[frozenset[str]], n_pairs: int, block: pd.DataFrame) -> str:
    """The summary sentence of one (protocol, set) block."""
    parts = []
    at_chance = [a for a in ranked if a not in above]
    if not above:
        parts.append(f"no pretrained model is distinguishable from chance ({', '.join(ranked)})"
                     if ranked else "no pretrained model")
    elif len(above) == 1:
        parts.append(f"**{best}** (macro-F1 {_cell(block, best, 'f1_macro')}) is above chance; "
                     "no other model to compare it with")
    else:
        tied = _not_separable(best, above, significant)
        if not tied:
            parts.append(f"**{best}** (macro-F1 {_cell(block, best, 'f1_macro')}) has a "
                         f"significantly higher macro-F1 than every other model above chance "
                         f"({len(significant)} of {n_pairs} pairwise differences significant)")
        else:
            parts.append(f"best **{best}** (macro-F1 {_cell(block, best, 'f1_macro')}), but its "
                         f"macro-F1 is not significantly higher than {', '.join(tied)}'s; "
                         f"{len(significant)} of {n_pairs} pairwise differences are significant")
    if at_chance and above:
        parts.append(f"{NOT_CHANCE}: {', '.join(at_chance)}")
    if others:
        parts.append(f"not pretrained, not ranked: {', '.join(others)}")
    return "; ".join(parts) + "."


def report_markdown(params: Params, long: pd.DataFrame, chance: pd.DataFrame,
                    status: pd.DataFrame, pairs: pd.DataFrame, gap: pd.DataFrame,
                    counts: dict[str, dict[str, object]], figures: dict[str, str]) -> str:
    """The comparison report; chance, status, pairs: `comparison.significance`; figures:
    name -> PNG path relative to the report."""
    alpha = 1 - params.compare.confidence
    seeds = sorted(set(long["seed"]))
    several = len(seeds) > 1
    unpretrained = sorted(set(long.loc[~long["pretrained"], "architecture"]))
    lines = [
        "# Comparison report", "",
        "Generated by `wbc-transfer compare` (DVC stage `compare`) from the evaluate stages' "
        "metrics and per-image predictions; every number and claim below is computed from them.",
        "",
        f"- Models: {long['architecture'].nunique()} architectures "
        f"({', '.join(dict.fromkeys(long['architecture']))}), "
        f"protocol(s) {', '.join(f'`{p}`' for p in dict.fromkeys(long['protocol']))}, "
        f"seed(s) {', '.join(map(str, seeds))}.",
        f"- Ranking: by macro-F1{' (mean over seeds)' if several else ''} (the paper's "
        "F-measure; every class counts equally, so a model that calls every cell a neutrophil "
        "cannot win on a neutrophil-heavy set); ties broken by accuracy. Only ImageNet-"
        "pretrained models are ranked.",
        "- Chance: on every evaluation set, two predictors that never look at the image "
        "(majority class; stratified random), scored on the same cells with the same "
        f"intervals. A model whose macro-F1 interval reaches the higher chance interval is "
        f"**{NOT_CHANCE}** and takes part in no significance claim.",
        "- Which set chose what: per-epoch validation, checkpoint choice, early stopping, the "
        "Optuna objective and the champion (`promote`) use only the `validation` cells (TRAIN "
        "cells in no training split). `paper_test`, `TEST` and `TEST_SIMPLE` are test sets: "
        "reported, never used to choose." + (
            f" The external sets ({', '.join(f'`{n}`' for n in params.external)}, other labs) are "
            "test sets too: scored for every model, they chose nothing (no epoch, "
            "hyper-parameter, option, threshold or champion)." if params.external else ""),
        f"- Significance: among the pretrained models above chance only, a paired cluster "
        f"bootstrap of the macro-F1 difference on the same cells, Holm-corrected over the "
        f"pairs of each evaluation set{' and seed' if several else ''}, at "
        f"α = 1 − compare.confidence = {alpha:.2f}.",
    ]
    if unpretrained:
        lines.append(f"- **{NOT_PRETRAINED}**: {', '.join(unpretrained)} trained from random "
                     "initialisation. Their scores do not measure transfer learning: they are "
                     "listed in tables of their own, outside the ranking and the tests "
                     "(`wbc-transfer fetch-weights` gets the ImageNet files; see "
                     "docs/weights.md).")
    lines += ["", "## Summary", ""]
    sections: list[str] = []
    for (protocol, eval_set), block in _blocks(long):
        ranked, others = ranked_archs(block)
        where = ((status["protocol"] == protocol) & (status["eval_set"] == eval_set)) \
            if not status.empty else pd.Series(dtype=bool)
        st = status[where] if not status.empty else status
        above = [a for a in ranked
                 if not st.empty and st[st["architecture"] == a]["above_chance"].all()]
        block_pairs = pairs[(pairs["protocol"] == protocol) & (pairs["eval_set"] == eval_set)]
        sig_lines, significant = _pair_lines(block_pairs, alpha)
        best = above[0] if above else None
        tied = _not_separable(best, above, significant) if best else []
        n_pairs = block_pairs.groupby(["arch_a", "arch_b"]).ngroups
        title = f"Trained on `{protocol}`, evaluated on `{eval_set}` ({_n(block)})"
        lines.append(f"- {title}: "
                     + _block_claim(best, above, ranked, others, significant, n_pairs, block))
        block_chance = _chance_of(chance, protocol, eval_set)
        sections += [f"### {title}", "",
                     "| Rank | Model | F-measure (macro) | Per-cell accuracy (class-balanced) | "
                     "Accuracy | Above chance | Not significantly different from the best |",
                     "| --- | --- | --- | --- | --- | --- | --- |"]
        for rank, a in enumerate(ranked, 1):
            if a not in above:
                same = "not tested"
            else:
                same = "—" if a == best else ("yes" if a in tied else "no (worse)")
            sections.append(f"| {rank} | {a} | {_cell(block, a, 'f1_macro')} | "
                            f"{_cell_accuracy(block, a)} | {_cell(block, a, 'accuracy')} | "
                            f"{'yes' if a in above else f'no: {NOT_CHANCE}'} | {same} |")
        for baseline in dict.fromkeys(block_chance["baseline"]) if not block_chance.empty else []:
            sections.append(f"| — | chance: {baseline} | "
                            f"{_chance_cell(block_chance, baseline, 'f1_macro')} | — | "
                            f"{_chance_cell(block_chance, baseline, 'accuracy')} | — | — |")
        sections.append("")
        if others:
            sections += [f"{NOT_PRETRAINED} (random initialisation; not ranked, not tested):", "",
                         "| Model | F-measure (macro) | Per-cell accuracy (class-balanced) | "
                         "Accuracy | Weights |", "| --- | --- | --- | --- | --- |"]
            for a in others:
                source = block[block["architecture"] == a]["weights_source"].iloc[0]
                sections.append(f"| {a} | {_cell(block, a, 'f1_macro')} | "
                                f"{_cell_accuracy(block, a)} | {_cell(block, a, 'accuracy')} | "
                                f"{weights_label(source)} |")
            sections.append("")
        if sig_lines:
            sections += [f"Significant differences (Holm-adjusted p < {alpha:.2f}):", "",
                         *sig_lines, ""]
        elif len(above) > 1:
            sections += [f"No pairwise difference is significant (Holm-adjusted p < {alpha:.2f})"
                         f"{' in any seed' if several else ''}: the order among the models "
                         "above chance is not supported by the data.", ""]
        else:
            sections += ["No significance test: fewer than two pretrained models are above "
                         "chance on this set.", ""]
        key = f"pairwise_{protocol}_{eval_set}"
        if key in figures:
            sections += [f"![Pairwise tests, {protocol} on {eval_set}]({figures[key]})", ""]
        key = f"bars_{protocol}_{eval_set}"
        if key in figures:
            sections += [f"![Scores, {protocol} on {eval_set}]({figures[key]})", ""]

    lines += _leakage_summary(gap, counts)
    lines += external_section(long, list(params.external), params.compare.confidence)
    lines += ["", "## Ranking and significance per evaluation set", "", *sections]
    lines += _leakage_section(gap, counts, figures)
    lines += ["", table2_markdown(long, params, heading="##", chance=chance), ""]
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
             "(external sets: each image its own cell unless a manifest gave groups), rows in "
             f"the order of the `{present[0]}` ranking (models without ImageNet weights last). "
             "The external sets are test sets: no stage chose anything by them.", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    # the order of the ranking on the (first) external set: pretrained by its macro-F1, then
    # the models without ImageNet weights, marked
    key = rows[rows["eval_set"] == present[0]].set_index(["protocol", "architecture", "seed"])
    groups = sorted(rows.groupby(["protocol", "architecture", "seed"], sort=False),
                    key=lambda item: (not key.loc[item[0], "pretrained"] if item[0] in key.index
                                      else True, -key["value"].get(item[0], -1.0)))
    for (protocol, arch, seed), block in groups:
        by_set = block.set_index("eval_set")
        if "TEST" not in by_set.index:
            continue
        test = by_set.loc["TEST"]
        name = arch if bool(test["pretrained"]) else f"{arch} (not pretrained)"
        cells = [protocol, name, str(seed), fmt_ci(test["value"], test["ci_low"], test["ci_high"])]
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
        f"(groups from the `groups` stage; each drawn cell brings all its images; cells drawn "
        f"within their class; seed {c.seed}), {c.confidence:.0%} level; accuracy and macro "
        "precision/recall/F1 recomputed with scikit-learn (sample weights = draw counts) on "
        "every resample (`wbc_transfer.evaluation.stats.bootstrap_ci`). They reflect the finite number of "
        "cells, not training variability. The effective n is the number of cells.",
        "- Chance baselines: scikit-learn `DummyClassifier` fitted on the set's own labels "
        "(`most_frequent`; `stratified`, a fresh seeded draw per resample), scored on the same "
        "resamples (`wbc_transfer.evaluation.stats.chance_distribution`). Chance level = the higher upper "
        "interval end of the two baselines' macro-F1; a model is above chance when the lower "
        "end of its macro-F1 interval is above it (in every seed).",
        "- Pairwise tests: only pretrained models above chance. Paired cluster bootstrap of the "
        "macro-F1 difference: both models are scored on the same resamples of the same cells, "
        "so the per-resample difference is paired; two-sided p = 2 (k + 1) / (B + 1) with k "
        "the resamples on the far side of zero (`wbc_transfer.evaluation.stats.paired_difference`). Chosen "
        "over McNemar's test on per-cell correctness because it tests the ranked quantity "
        "(macro-F1), is class-balanced by construction, and needs no class weights that would "
        "break McNemar's binomial null.",
        "- Holm correction (statsmodels) over the tested pairs within one (protocol, evaluation "
        "set, seed) (`wbc_transfer.evaluation.stats.holm`).",
        ("- Seeds: every seed is a separate training run; tables give mean ± sample sd across "
         "seeds beside each seed's value. Tests run per seed (all in `pairwise.csv`); "
         f"the heatmaps show seed {params.train.seeds[0]}. The summary and the \"not "
         "significantly different\" column count a difference as significant only when it "
         "is significant in every seed." if several else
         "- Seeds: one training seed (`train.seeds`); with several, tables add mean ± sd across "
         "seeds and the tests run per seed."),
        "- Files: `table2.md`/`table2_long.csv` (scores and intervals), `chance.csv` (the "
        "baselines), `status.csv` (above chance, tested), `pairwise.csv` (every test), "
        "`pairwise_<protocol>_<set>.csv` (Holm-adjusted p matrix), `leakage_gap.csv`.",
    ]
