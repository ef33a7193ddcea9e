"""The robustness ablation of bench/ROBUSTNESS.md: EfficientNet-Lite0, heldout protocol, one row
per view (prepare.view: full | cell) and robustness option (params `train.*`,
wbc_transfer.models.robustness), same seed, same images, same budget. Row names: <view>-<option>
(e.g. cell-hed); a bare option name means the full view (the rows of the first ablation).

Each row calls the pipeline's own stage functions (train, evaluate) with overridden Params into
its own folder under --out and the MLflow experiment `wbc-robustness-ablation`; nothing in the
workspace's results/ or data/prepared/ is touched. Data: the workspace's heldout manifest
(data/splits/heldout.csv, `dvc repro split`) decoded in each view at --size, --per-class training
images per class (a seeded sample of the heldout training images, which are already spread
over the training cells); validation cells and TEST as in the pipeline; the external sets of
params.yaml `external` prepared in each view like the `external@` stage does. Nothing chooses
by a test set here: the kept epoch is chosen by validation, and this script only reports.

  python bench/bench_robustness.py train [--rows baseline,colour,...]   # one after another
  python bench/bench_robustness.py evaluate                             # scores + table
  python bench/bench_robustness.py speed                                # predict images/s
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from wbc_transfer.config import Params, load_params
from wbc_transfer.data.sets import ImageSet

ARCH, PROTOCOL, SEED = "efficientnet_lite0", "heldout", 42
ROWS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "colour": {"hue_jitter": 0.1, "grayscale_p": 0.2},
    "hed": {"hed_jitter": 0.1},
    "scale": {"scale": (1.0, 2.0)},
    "lab": {"stain_norm": "lab"},
    "frozen_bn": {"norm_layer": "frozen"},
}
# the combination recommended in bench/ROBUSTNESS.md (set after the single-option rows)
ROWS["combined"] = {**ROWS["colour"], **ROWS["scale"], **ROWS["lab"]}
# issue 22, fixed before any external score was seen: what differs between labs around the
# normalised scale: stain (HED), a small magnification jitter, any rotation
ROWS["labshift"] = {"hed_jitter": 0.05, "scale": (0.9, 1.1), "rotation_deg": 180.0}
VIEW_ROWS = [f"{view}-{option}" for view in ("full", "cell")
             for option in ("baseline", "hed", "lab", "frozen_bn", "labshift")]


def split_row(row: str) -> tuple[str, str]:
    """'cell-hed' -> ('cell', 'hed'); 'hed' -> ('full', 'hed')."""
    view, _, option = row.rpartition("-")
    return (view or "full"), option


def replace(section: Any, **changes: Any) -> Any:
    """A copy of a frozen params section with `changes` (pydantic's model_copy)."""
    return section.model_copy(update=changes)


def row_params(base: Params, out: Path, row: str, size: int, epochs: int, threads: int = 2) -> Params:
    """`base` with the row's view and train options and every output under out/<row>."""
    view, option = split_row(row)
    train = replace(base.train, architectures=(ARCH,), protocols=(PROTOCOL,), seeds=(SEED,),
                    epochs=epochs, input_size=None, overrides={}, num_threads=threads,
                    out_dir=str(out / row / "train"), checkpoint_dir=str(out / row / "ckpt"),
                    **ROWS[option])
    return replace(base, train=train,
                   base=replace(base.base, experiment="wbc-robustness-ablation"),
                   prepare=replace(base.prepare, image_size=size, view=view,
                                   out_dir=str(out / f"prepared-{view}"),
                                   external_dir=str(out / f"prepared_external-{view}")),
                   evaluate=replace(base.evaluate, out_dir=str(out / row / "eval")))


def prepare_data(base: Params, out: Path, size: int, per_class: int, external: bool,
                 views: set[str]) -> None:
    """out/prepared-<view>/heldout.pt (the heldout manifest in that view at `size`, training
    images capped per class by the same seeded sample in every view) and the external sets,
    once per view."""
    from wbc_transfer.data.sets import build_image_set
    from wbc_transfer.stages import external as external_stage

    manifest = pd.read_csv(base.resolve(base.split.out_dir) / "heldout.csv")
    train = manifest[manifest["split"] == "train"]
    capped = pd.concat([g.sample(min(per_class, len(g)), random_state=base.split.seed)
                        for _, g in train.groupby("label", sort=True)])
    rows = pd.concat([capped, manifest[manifest["split"] != "train"]], ignore_index=True)
    for view in sorted(views):
        target = out / f"prepared-{view}" / "heldout.pt"
        if not target.is_file():
            build_image_set(rows, base.images_dir, base.data.classes, size, view,
                            base.prepare.cell_fraction).save(target)
        if external:
            params = replace(base, prepare=replace(base.prepare, image_size=size, view=view,
                                                   external_dir=str(out / f"prepared_external-{view}")),
                             validate=replace(base.validate, report_dir=str(out / f"data-{view}")))
            for name in base.external:
                if not (out / f"prepared_external-{view}" / f"{name}.pt").is_file():
                    external_stage.main(params, name)


def train(base: Params, out: Path, rows: list[str], size: int, epochs: int, threads: int = 2) -> None:
    from wbc_transfer.stages import train as train_stage

    timings = out / "timings.json"
    done = json.loads(timings.read_text()) if timings.is_file() else {}
    for row in rows:
        params = row_params(base, out, row, size, epochs, threads)
        if (params.resolve(params.train.out_dir) / f"{ARCH}-{PROTOCOL}-{SEED}" / "model.pt").is_file():
            print(f"{row}: trained already")
            continue
        started = time.perf_counter()
        train_stage.main(params, ARCH, PROTOCOL, SEED)
        done[row] = round(time.perf_counter() - started, 1)
        timings.write_text(json.dumps(done, indent=1))
        print(f"{row}: trained in {done[row]:.0f} s", flush=True)


def evaluate(base: Params, out: Path, rows: list[str], size: int, epochs: int,
             threads: int = 2) -> pd.DataFrame:
    from wbc_transfer.stages import evaluate as evaluate_stage

    records = []
    for row in rows:
        params = row_params(base, out, row, size, epochs, threads)
        if not (params.resolve(params.train.out_dir) / f"{ARCH}-{PROTOCOL}-{SEED}").is_dir():
            continue
        done = params.resolve(params.evaluate.out_dir) / f"{ARCH}-{PROTOCOL}-{SEED}" / "metrics.json"
        summary = json.loads(done.read_text()) if done.is_file() else \
            evaluate_stage.main(params, ARCH, PROTOCOL, SEED)
        record: dict[str, Any] = {"row": row, "options": json.dumps(ROWS[split_row(row)[1]])}
        for set_name, scores in summary["sets"].items():
            low, high = scores["ci"]["f1_macro"]
            record[set_name] = f"{scores['f1_macro']:.3f} [{low:.3f}, {high:.3f}]"
            record[f"{set_name}_f1"] = scores["f1_macro"]
            record[f"{set_name}_cells"] = scores["n_cells"]
        records.append(record)
    table = pd.DataFrame(records)
    table.to_csv(out / "ablation.csv", index=False)
    print(table.to_markdown(index=False))
    return table


def speed(base: Params, out: Path, rows: list[str], size: int, epochs: int,
          repeats: int = 3) -> dict[str, float]:
    """images/s of the predict/serving path (decode + resize + network, batch 32) on the
    external set's files, per row, alternating rows `repeats` times within this one run."""
    from wbc_transfer.serving.classifier import Classifier, config_from_run_json

    files = sorted(p for p in Path(base.resolve(base.external["tecom"].root)).rglob("*.png"))
    blobs = [f.read_bytes() for f in files]
    loaded = {}
    for row in rows:
        folder = row_params(base, out, row, size, epochs).resolve(
            out / row / "train" / f"{ARCH}-{PROTOCOL}-{SEED}")
        if (folder / "model.pt").is_file():
            config = out / row / "config.json"
            info = json.loads((folder / "run.json").read_text())
            config.write_text(json.dumps(config_from_run_json(info)))
            loaded[row] = Classifier.from_files(folder / "model.pt", config, "cpu")
    if "baseline" in loaded:  # the input layers' own cost, on the baseline's weights
        import copy

        from wbc_transfer.models import robustness

        base_clf = loaded["baseline"]
        cfg = base_clf.config
        train_images = ImageSet.load(out / "prepared-full" / "heldout.pt").subset("train").images
        layer = robustness.LabStandardise(cfg["mean"], cfg["std"],
                                          *robustness.fit_lab_target(train_images))
        loaded["baseline + lab layer"] = Classifier(
            robustness.StainNormalised(layer, base_clf.model).eval(), cfg, base_clf.device)
        frozen = copy.deepcopy(base_clf.model)
        robustness.freeze_batchnorm(frozen)
        loaded["baseline + frozen BN"] = Classifier(frozen.eval(), cfg, base_clf.device)
    torch.set_num_threads(2)
    seconds: dict[str, list[float]] = {row: [] for row in loaded}
    for _ in range(repeats):
        for row, classifier in loaded.items():
            started = time.perf_counter()
            classifier.predict_bytes(blobs, batch_size=32)
            seconds[row].append(time.perf_counter() - started)
    rates = {row: round(len(blobs) / min(s), 1) for row, s in seconds.items()}
    (out / "predict_speed.json").write_text(json.dumps(rates, indent=1))
    print(json.dumps(rates, indent=1))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["train", "evaluate", "speed"])
    parser.add_argument("--rows", default=",".join(VIEW_ROWS))
    parser.add_argument("--out", default="bench/out/robustness")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2,
                        help="train.num_threads of train and evaluate (1 when another process shares "
                        "the 2 cores)")
    args = parser.parse_args()
    base = load_params()
    out = base.resolve(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in args.rows.split(",") if r]
    prepare_data(base, out, args.size, args.per_class, external=args.step != "train",
                 views={split_row(r)[0] for r in rows})
    if args.step == "speed":
        speed(base, out, rows, args.size, args.epochs)
    else:
        {"train": train, "evaluate": evaluate}[args.step](base, out, rows, args.size, args.epochs,
                                                          args.threads)


if __name__ == "__main__":
    main()
