"""DVC stage `split`: paper/heldout manifests and the near-duplicate leakage note."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from wbc_transfer.config import Params
from wbc_transfer.io import text_path, write_csv, write_json, write_text
from wbc_transfer.leakage import fingerprints, nearest_similarity
from wbc_transfer.splits import counts, heldout_split, paper_split

log = logging.getLogger(__name__)


def _leaking(manifest: pd.DataFrame, sims: dict[str, float], query: str, reference: str,
             threshold: float) -> dict[str, object]:
    """Count `query` images whose nearest `reference` image is a near-duplicate."""
    q = manifest[manifest["split"] == query]["path"].tolist()
    r = manifest[manifest["split"] == reference]["path"].tolist()
    return _count(q, r, sims, threshold)


def _count(queries: list[str], references: list[str], fps: dict[str, np.ndarray],
           threshold: float) -> dict[str, object]:
    if not queries:
        return {"images": 0, "with_near_duplicate": 0, "fraction": 0.0, "max_similarity": None}
    nearest = nearest_similarity(
        np.stack([fps[p] for p in queries]), np.stack([fps[p] for p in references])
    )
    hits = int((nearest >= threshold).sum())
    return {
        "images": len(queries),
        "with_near_duplicate": hits,
        "fraction": round(hits / len(queries), 4),
        "max_similarity": round(float(nearest.max()), 4),
        "median_similarity": round(float(np.median(nearest)), 4),
    }


def main(params: Params) -> dict[str, object]:
    sp = params.split
    index = pd.read_csv(params.resolve(params.validate.index))
    classes = params.data.classes
    paper = paper_split(index, classes, sp.paper.per_class, sp.paper.test_fraction,
                        sp.paper.val_per_class, sp.seed)
    heldout = heldout_split(index, classes, sp.heldout.train_per_class,
                            sp.heldout.val_per_class, sp.seed)
    out = params.resolve(sp.out_dir)
    write_csv(out / "paper.csv", paper)
    write_csv(out / "heldout.csv", heldout)

    # Fingerprint every image the protocols use, plus all of TRAIN for the TEST->TRAIN check.
    all_train = index[index["folder"] == "TRAIN"]["path"].tolist()
    needed = sorted(set(paper["path"]) | set(heldout["path"]) | set(all_train))
    log.info("fingerprinting %d images for the leakage check", len(needed))
    matrix = fingerprints([params.images_dir / text_path(p) for p in needed])
    fps = dict(zip(needed, matrix, strict=True))
    threshold = sp.leakage.threshold
    test_folder = index[index["folder"] == "TEST"]["path"].tolist()
    report = {
        "threshold": threshold,
        "measure": "cosine of sqrt-normalised 24^3 RGB histograms of the inner crop",
        "paper_test_vs_paper_train": _leaking(paper, fps, "test", "train", threshold),
        "heldout_test_vs_heldout_train": _leaking(heldout, fps, "test", "train", threshold),
        "heldout_val_vs_heldout_train": _leaking(heldout, fps, "val", "train", threshold),
        "TEST_vs_all_TRAIN": _count(test_folder, all_train, fps, threshold),
        "counts": {"paper": counts(paper), "heldout": counts(heldout)},
    }
    report_dir = params.resolve(params.validate.report_dir)
    write_json(report_dir / "leakage.json", report)
    write_text(report_dir / "leakage.md", leakage_note(report))
    log.info("leakage: paper %s, heldout %s", report["paper_test_vs_paper_train"],
             report["heldout_test_vs_heldout_train"])
    return report


def leakage_note(report: dict) -> str:
    def line(name: str, key: str) -> str:
        r = report[key]
        return (f"| {name} | {r['images']} | {r['with_near_duplicate']} | "
                f"{100 * r['fraction']:.1f}% | {r['max_similarity']} |")

    return "\n".join([
        "# Near-duplicate leakage between splits",
        "",
        f"Measure: {report['measure']}; near-duplicate when similarity >= {report['threshold']}.",
        "",
        "| query -> reference | images | with a near-duplicate | share | max similarity |",
        "| --- | --- | --- | --- | --- |",
        line("paper test -> paper train", "paper_test_vs_paper_train"),
        line("heldout test (TEST) -> heldout train", "heldout_test_vs_heldout_train"),
        line("heldout val -> heldout train", "heldout_val_vs_heldout_train"),
        line("TEST -> all of TRAIN", "TEST_vs_all_TRAIN"),
        "",
        "The paper protocol samples train and test from TRAIN, whose images are augmented",
        "siblings of the same smears: its test score is optimistic. TEST is leak-free.",
        "",
    ])
