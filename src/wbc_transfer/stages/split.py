"""DVC stage `split`: group-aware manifests for every protocol, and the leakage they carry.

Leakage is counted exactly, by groups (cells, from the `groups` stage): a test or validation
image leaks when its cell is also in the training split.
"""

from __future__ import annotations

import logging

import pandas as pd

from wbc_transfer.config import PROTOCOLS, Params
from wbc_transfer.data.splits import (
    SplitError,
    counts,
    group_counts,
    heldout_split,
    paper_split,
    shared_groups,
)
from wbc_transfer.io import write_csv, write_json, write_text

log = logging.getLogger(__name__)


def indexed_with_groups(params: Params) -> pd.DataFrame:
    """data/index.csv joined with the groups manifest (one group per indexed image)."""
    index = pd.read_csv(params.resolve(params.validate.index))
    groups = pd.read_csv(params.resolve(params.groups.manifest))[["path", "group"]]
    merged = index.merge(groups, on="path", how="left")
    missing = merged[merged["group"].isna() & merged["label"].isin(params.data.classes)]
    if not missing.empty:
        raise SplitError(f"{len(missing)} indexed images have no group (e.g. "
                         f"{missing['path'].iloc[0]}): rerun the `groups` stage")
    return merged


def manifests(params: Params, index: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """protocol -> manifest (path, label, group, split)."""
    sp, classes = params.split, params.data.classes
    paper = {"per_class": sp.paper.per_class, "test_fraction": sp.paper.test_fraction,
             "val_fraction": sp.val_fraction, "val_per_class": sp.val_per_class, "seed": sp.seed}
    return {
        "paper": paper_split(index, classes, **paper, grouped=False),
        "paper_grouped": paper_split(index, classes, **paper, grouped=True),
        "heldout": heldout_split(index, classes, sp.heldout.train_per_class, sp.val_fraction,
                                 sp.val_per_class, sp.seed),
    }


def main(params: Params) -> dict[str, object]:
    index = indexed_with_groups(params)
    made = manifests(params, index)
    out = params.resolve(params.split.out_dir)
    for protocol in PROTOCOLS:
        write_csv(out / f"{protocol}.csv", made[protocol])
    train_groups = set(index.loc[index["folder"] == "TRAIN", "group"])
    test = index[index["folder"] == "TEST"]
    report: dict[str, object] = {
        "measure": "images whose cell (group, from the groups stage) is also in the training split",
        "paper_test_vs_paper_train": shared_groups(made["paper"], "test", "train"),
        "paper_grouped_test_vs_paper_grouped_train": shared_groups(made["paper_grouped"], "test",
                                                                   "train"),
        "heldout_test_vs_heldout_train": shared_groups(made["heldout"], "test", "train"),
        "heldout_val_vs_heldout_train": shared_groups(made["heldout"], "val", "train"),
        "paper_val_vs_paper_train": shared_groups(made["paper"], "val", "train"),
        "TEST_vs_all_TRAIN": {"images": int(len(test)), "cells": int(test["group"].nunique()),
                              "with_sibling": int(test["group"].isin(train_groups).sum()),
                              "cells_shared": int(test.loc[test["group"].isin(train_groups),
                                                           "group"].nunique())},
        "TRAIN_images_left_out_as_TEST_cells": int(
            ((index["folder"] == "TRAIN") & index["group"].isin(set(test["group"]))).sum()),
        "counts": {p: counts(m) for p, m in made.items()},
        "cells": {p: group_counts(m) for p, m in made.items()},
    }
    report_dir = params.resolve(params.validate.report_dir)
    write_json(report_dir / "leakage.json", report)
    write_text(report_dir / "leakage.md", leakage_note(report))
    log.info("leakage by cells: paper %s, paper_grouped %s",
             report["paper_test_vs_paper_train"], report["paper_grouped_test_vs_paper_grouped_train"])
    return report


def leakage_note(report: dict) -> str:
    """The leakage report in Markdown."""
    def line(name: str, key: str) -> str:
        r = report[key]
        return (f"| {name} | {r['images']} | {r['cells']} | {r['with_sibling']} | "
                f"{100 * r['with_sibling'] / max(r['images'], 1):.1f}% |")

    cells = report["cells"]
    lines = [
        "# Leakage between splits, counted by cells", "",
        f"Measure: {report['measure']}.", "",
        "| query -> training split | images | cells | images with their cell in training | share |",
        "| --- | ---: | ---: | ---: | ---: |",
        line("paper test -> paper train (the study's random split)", "paper_test_vs_paper_train"),
        line("paper_grouped test -> paper_grouped train", "paper_grouped_test_vs_paper_grouped_train"),
        line("validation -> paper train", "paper_val_vs_paper_train"),
        line("validation -> heldout train", "heldout_val_vs_heldout_train"),
        line("heldout test (TEST) -> heldout train", "heldout_test_vs_heldout_train"),
        line("TEST -> all of TRAIN", "TEST_vs_all_TRAIN"),
        "", "Cells per split and class:", "",
        "| protocol | split | " + " | ".join(sorted(next(iter(cells["heldout"].values())))) + " |",
        "| --- | --- |" + " ---: |" * len(next(iter(cells["heldout"].values()))),
    ]
    for protocol, table in cells.items():
        for split, per_class in table.items():
            lines.append(f"| {protocol} | {split} | "
                         + " | ".join(str(per_class.get(c, 0)) for c in sorted(per_class)) + " |")
    lines += ["", f"TEST -> all of TRAIN counts the cells the `groups` stage found in both folders; "
              f"their {report['TRAIN_images_left_out_as_TEST_cells']} TRAIN images are left out of "
              f"every TRAIN-side split, so no protocol trains or validates on a TEST cell.",
              "", "The `paper` protocol reproduces the study's random split of images: copies of "
              "one cell land in train and test, so its test score is optimistic. `paper_grouped` "
              "and `heldout` keep every cell on one side; the validation cells are shared by all "
              "protocols and are in no training split.", ""]
    return "\n".join(lines)
