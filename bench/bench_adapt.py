"""The learning curve of `wbc-transfer adapt`: macro-F1 on a lab's remaining images vs K.

For each lab of `adapt.labs` (or --lab), each K of `adapt.curve.per_class` that the lab's
smallest class allows (K < its cells), and each seed of `adapt.curve.seeds`: the recipe of
`wbc_transfer.training.adapt` (split, AdaBN, fine-tuning with the epoch chosen by cross-validation inside
the K cells, out-of-fold calibration), scored on the lab's other images with 95 % cluster-
bootstrap intervals, beside the unchanged base model (zero-shot) on the same images, and the
split-conformal sets' coverage and mean size at `adapt.sets`. Nothing is registered.

Writes <out>/curve.csv (one row per lab x K x seed), curve.png and curve.md (mean over seeds),
and logs them to an MLflow run `adapt-curve` (DVC: `dvc plots show` reads curve.csv).

    python bench/bench_adapt.py                       # base: adapt.model (the champion)
    python bench/bench_adapt.py --model models:/wbc-classifier/3 --lab pbc --per-class 0 5
    python bench/bench_adapt.py --model-dir DIR --no-mlflow  # DIR: weights.pt + config.json
    python bench/bench_adapt.py --log-only            # log an existing <out> to MLflow
    python bench/bench_adapt.py --augment kornia      # the kornia augmentation on the CPU too
                                                      # (FastAugment vs kornia: bench/ADAPT.md)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from wbc_transfer.config import load_params
from wbc_transfer.engine import configure_torch, pick_device
from wbc_transfer.training import adapt

log = logging.getLogger("bench_adapt")


def load_base(params, uri: str | None, folder: str | None):
    """The base `serving.Classifier`: from a weights.pt + config.json folder, else a model URI."""
    from wbc_transfer.serving.classifier import Classifier

    if folder:
        return Classifier.from_files(Path(folder) / "weights.pt", Path(folder) / "config.json")
    from wbc_transfer import tracking
    from wbc_transfer.serving.loading import load_model

    tracking.setup(params)
    return load_model(uri or params.adapt.model).unwrap_python_model().classifier


def curve_rows(params, base, labs: list[str], ks: list[int], seeds: list[int],
               out: Path | None = None) -> pd.DataFrame:
    """One row per lab x K x seed: the adapted model's and the zero-shot base's scores. Seeds
    are the outer loop (a cut run still has whole curves); with `out`, curve.csv is rewritten
    after every run."""
    device = pick_device(params.train.device)
    labs_data = {}
    for lab in labs:
        entry = params.adapt.labs[lab]
        root = params.resolve(entry.root)
        index = adapt.index_lab(root, lab, base.classes,
                                root / entry.manifest if entry.manifest else None,
                                params.validate.policy)
        smallest = int(index.groupby("label")["group"].nunique().min())
        for k in [k for k in ks if k >= smallest]:
            log.info("%s: K=%d skipped (smallest class has %d cells)", lab, k, smallest)
        labs_data[lab] = (adapt.read_lab(root, index, base.classes, base.preprocess),
                          [k for k in ks if k < smallest])
        for k in labs_data[lab][1]:
            adapt.check_request(index, base.classes, k, root)
    rows = []
    for seed in seeds:
        for lab, (data, lab_ks) in labs_data.items():
            for k in lab_ks:
                r = adapt.adapt(base.model, base.config, data, k, seed, params, device).metrics
                sets = r.get("sets") or {}
                rows.append({
                    "lab": lab, "per_class": k, "seed": seed, "f1_macro": r["f1_macro"],
                    "f1_low": r["f1_macro_ci"][0], "f1_high": r["f1_macro_ci"][1],
                    "accuracy": r["accuracy"],
                    "zero_shot_f1_macro": r["zero_shot"]["f1_macro"],
                    "zero_shot_low": r["zero_shot"]["f1_macro_ci"][0],
                    "zero_shot_high": r["zero_shot"]["f1_macro_ci"][1],
                    "sets_confidence": sets.get("confidence", np.nan),
                    "sets_coverage": sets.get("coverage", np.nan),
                    "sets_mean_size": sets.get("mean_set_size", np.nan),
                    "sets_per_class": json.dumps(sets.get("per_class", {})),
                    "selected_epoch": r["selected_epoch"], "cv_f1_macro": r["cv_f1_macro"],
                    "temperature": r["temperature"],
                    "adapt_images": r["adapt_images"], "test_images": r["test_images"],
                    "seconds": r["seconds"], "device": device.type,
                })
                log.info("%s K=%d seed %d: macro-F1 %.3f [%.3f, %.3f] (zero-shot %.3f), sets "
                         "coverage %s size %s, %.0f s", lab, k, seed, r["f1_macro"],
                         *r["f1_macro_ci"], r["zero_shot"]["f1_macro"],
                         sets.get("coverage"), sets.get("mean_set_size"), r["seconds"])
                if out is not None:
                    out.mkdir(parents=True, exist_ok=True)
                    pd.DataFrame(rows).to_csv(out / "curve.csv", index=False)
    return pd.DataFrame(rows)


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds per lab and K (the per-seed intervals' mean bounds beside it)."""
    return rows.groupby(["lab", "per_class"]).agg(
        seeds=("seed", "nunique"), f1_macro=("f1_macro", "mean"), f1_sd=("f1_macro", "std"),
        f1_low=("f1_low", "mean"), f1_high=("f1_high", "mean"),
        zero_shot_f1_macro=("zero_shot_f1_macro", "mean"), sets_coverage=("sets_coverage", "mean"),
        sets_mean_size=("sets_mean_size", "mean"), test_images=("test_images", "mean"),
        seconds=("seconds", "mean")).reset_index()


def plot(rows: pd.DataFrame, file: Path) -> Path:
    """macro-F1 vs K per lab: each seed with its 95 % interval, the seeds' mean, and the
    zero-shot base model (K = 0 split: every image of the lab) as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labs = sorted(rows["lab"].unique())
    fig, axes = plt.subplots(1, len(labs), figsize=(5 * len(labs), 4), squeeze=False)
    for ax, lab in zip(axes[0], labs, strict=True):
        part = rows[rows["lab"] == lab]
        ks = sorted(part["per_class"].unique())
        for i, seed in enumerate(sorted(part["seed"].unique())):
            s = part[part["seed"] == seed].sort_values("per_class")
            x = s["per_class"] + (i - 1) * 0.4
            ax.errorbar(x, s["f1_macro"], yerr=[s["f1_macro"] - s["f1_low"],
                                                s["f1_high"] - s["f1_macro"]],
                        fmt="o", ms=3, alpha=0.6, label=f"seed {seed}")
        mean = part.groupby("per_class")["f1_macro"].mean()
        ax.plot(mean.index, mean.values, "k-", label="mean over seeds")
        zero = part.groupby("per_class")[["zero_shot_f1_macro", "zero_shot_low",
                                          "zero_shot_high"]].mean()
        ax.fill_between(zero.index, zero["zero_shot_low"], zero["zero_shot_high"], color="grey",
                        alpha=0.2)
        ax.plot(zero.index, zero["zero_shot_f1_macro"], "--", color="grey",
                label="zero-shot base (same test images)")
        ax.set(title=f"{lab}", xlabel="K labelled cells per class", ylabel="macro-F1 (lab's rest)",
               ylim=(0, 1), xticks=ks)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file, dpi=120)
    plt.close(fig)
    return file


def markdown(table: pd.DataFrame) -> str:
    lines = ["| lab | K | seeds | macro-F1 (mean) | sd | mean 95 % CI | zero-shot | sets coverage | "
             "mean set size | test images | s / run |", "|" + " --- |" * 11]
    for r in table.itertuples():
        lines.append(f"| {r.lab} | {r.per_class} | {r.seeds} | {r.f1_macro:.3f} | {r.f1_sd:.3f} | "
                     f"[{r.f1_low:.3f}, {r.f1_high:.3f}] | {r.zero_shot_f1_macro:.3f} | "
                     f"{r.sets_coverage:.3f} | {r.sets_mean_size:.2f} | {r.test_images:.0f} | "
                     f"{r.seconds:.0f} |")
    return "\n".join(lines) + "\n"


def write(rows: pd.DataFrame, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out / "curve.csv", index=False)
    table = summary(rows)
    (out / "curve.md").write_text(markdown(table))
    return [out / "curve.csv", plot(rows, out / "curve.png"), out / "curve.md"]


def log_to_mlflow(params, files: list[Path], rows: pd.DataFrame, base: str) -> str:
    import mlflow

    from wbc_transfer import tracking

    with tracking.run(params, run_name="adapt-curve", tags={"kind": "adapt-curve",
                                                            "adapt.base_model": base}) as run:
        for r in summary(rows).itertuples():
            mlflow.log_metric(f"{r.lab}_f1_macro", r.f1_macro, step=int(r.per_class))
            mlflow.log_metric(f"{r.lab}_zero_shot_f1_macro", r.zero_shot_f1_macro,
                              step=int(r.per_class))
            if not np.isnan(r.sets_coverage):
                mlflow.log_metric(f"{r.lab}_sets_coverage", r.sets_coverage, step=int(r.per_class))
        for f in files:
            mlflow.log_artifact(str(f))
        return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default=None)
    p.add_argument("--model", default=None, help="base model URI (default: adapt.model)")
    p.add_argument("--model-dir", default=None, help="base model as weights.pt + config.json")
    p.add_argument("--lab", action="append", help="lab of adapt.labs (repeatable; default: all)")
    p.add_argument("--per-class", type=int, nargs="+", help="K values (default: adapt.curve)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: adapt.curve.seeds)")
    p.add_argument("--out", default=None, help="output folder (default: adapt.curve.out_dir)")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--log-only", action="store_true", help="log an existing <out> to MLflow")
    p.add_argument("--augment", choices=("auto", "kornia"), default="auto",
                   help="auto: the product's (FastAugment on the CPU, kornia on a GPU); kornia: "
                   "recipe.KorniaAugment on every device, to compare the two on adaptation")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    params = load_params(args.params)
    out = Path(args.out) if args.out else params.resolve(params.adapt.curve.out_dir)
    base = args.model_dir or args.model or params.adapt.model
    if args.log_only:
        rows = pd.read_csv(out / "curve.csv")
        files = write(rows, out)
    else:
        configure_torch(params.train.num_threads)
        if args.augment == "kornia":
            from wbc_transfer.training import recipe

            recipe.ModernAugment.__call__ = lambda self, batch: self.kornia(batch)
        classifier = load_base(params, args.model, args.model_dir)
        rows = curve_rows(params, classifier, args.lab or sorted(params.adapt.labs),
                          args.per_class or list(params.adapt.curve.per_class),
                          args.seeds or list(params.adapt.curve.seeds), out)
        files = write(rows, out)
    print((out / "curve.md").read_text())
    if not args.no_mlflow:
        print("MLflow run:", log_to_mlflow(params, files, rows, base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
