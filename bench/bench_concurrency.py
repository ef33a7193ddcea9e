"""Two training processes at once vs the same two one after the other, in one run.

Each process is a real `wbc-transfer train` stage (EfficientNet-Lite0, heldout protocol) on
prepared tensors, in a scratch repo (params.yaml copied from this repo with outputs, checkpoints
and a SQLite MLflow store moved under --work). Two seeds, so the two trainings are different
jobs of the same size. Policies compared:

- `shared`: the project's thread policy (src/wbc_transfer/training/threads.py): each process counts the
  live training processes and takes cores // count threads (train.num_threads: 0);
- `default`: every process takes all cores (train.num_threads = PyTorch's default), what the
  project did before.

    python bench/bench_concurrency.py                       # data/prepared of `dvc repro`
    python bench/bench_concurrency.py --tiny --epochs 1     # smoke test on a few mirror images

Target (issue 15): concurrent / sequential <= 0.70 with `shared` on the 2-core machine. Timings
mean something only on a quiet machine. Writes bench/out/concurrency[_tag].{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from wbc_transfer.training.threads import CORES

REPO = Path(__file__).resolve().parent.parent
CLASSES = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]


def tiny_prepared(out: Path, mirror: Path, per_class: int = 12, size: int = 64) -> None:
    """heldout.pt from a few real mirror images (train / val / test), for a smoke run."""
    from wbc_transfer.data.sets import build_image_set

    rows = []
    for cls in CLASSES:
        files = sorted((mirror / "TRAIN" / cls).glob("*.jpeg"))[: per_class + 4]
        rows += [(f"TRAIN/{cls}/{f.name}", cls, "train" if i < per_class else "val")
                 for i, f in enumerate(files)]
        rows += [(f"TEST/{cls}/{f.name}", cls, "test")
                 for f in sorted((mirror / "TEST" / cls).glob("*.jpeg"))[:2]]
    frame = pd.DataFrame(rows, columns=["path", "label", "split"])
    out.mkdir(parents=True, exist_ok=True)
    build_image_set(frame, mirror, CLASSES, size).save(out / "heldout.pt")


def scratch_params(work: Path, prepared: Path, epochs: int, size: int | None, threads: int) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["prepare"]["out_dir"] = str(prepared)
    raw["train"].update(epochs=epochs, num_threads=threads, out_dir=str(work / "train"),
                        checkpoint_dir=str(work / "checkpoints"), input_size=size)
    raw["base"]["tracking_uri"] = f"sqlite:///{work / 'mlflow.db'}"
    raw["split"]["out_dir"] = str(work / "splits")  # no manifests: datasets logged by digest
    file = work / "params.yaml"
    file.write_text(yaml.safe_dump(raw, sort_keys=False))
    return file


def train(params: Path, seed: int, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "wbc_transfer.cli", "--params", str(params),
                             "train", "--arch", "efficientnet_lite0", "--protocol", "heldout",
                             "--seed", str(seed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"training failed ({p.returncode}):\n{err[-3000:]}")


def measure(params: Path, env: dict[str, str], seeds: tuple[int, int]) -> dict[str, float]:
    start = time.perf_counter()
    for seed in seeds:
        wait([train(params, seed, env)])
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    wait([train(params, seed + 100, env) for seed in seeds])  # new seeds: no resume
    concurrent = time.perf_counter() - start
    return {"sequential_s": sequential, "concurrent_s": concurrent,
            "ratio": concurrent / sequential}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, default=REPO / "data/prepared")
    parser.add_argument("--tiny", action="store_true", help="a few mirror images (smoke test)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--policies", nargs="+", default=["shared", "default"],
                        choices=["shared", "default"])
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepared = args.prepared
        if args.tiny:
            prepared = work / "prepared"
            tiny_prepared(prepared, REPO.parent / "shared/data/blood-cells/"
                          "dataset2-master/dataset2-master/images")
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI",
                                                              "WBC_PROCESSES")}
        env["WBC_TRAINERS_DIR"] = str(work / "trainers")
        for policy in args.policies:
            run_dir = work / policy
            run_dir.mkdir()
            params = scratch_params(run_dir, prepared, args.epochs, args.image_size,
                                    0 if policy == "shared" else CORES)
            results[policy] = measure(params, env, (1, 2))
            print(policy, {k: round(v, 2) for k, v in results[policy].items()}, flush=True)
    report = {"cores": CORES, "epochs": args.epochs, "image_size": args.image_size,
              "tiny": args.tiny, "results": results}
    out = REPO / "bench/out" / f"concurrency{'_' + args.tag if args.tag else ''}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = ["| threads policy | two sequential (s) | two concurrent (s) | concurrent / sequential |",
             "| --- | ---: | ---: | ---: |"]
    lines += [f"| {p} | {r['sequential_s']:.1f} | {r['concurrent_s']:.1f} | {r['ratio']:.2f} |"
              for p, r in results.items()]
    out.with_suffix(".md").write_text(
        f"# Two training processes: concurrent vs sequential ({CORES} cores, {args.epochs} "
        f"epochs, {args.image_size} px{', tiny data' if args.tiny else ''})\n\n"
        + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
