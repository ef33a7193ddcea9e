"""Augmentation off the critical path (issue 26): training images/s of the modern recipe with
the old augmentation (kornia on float batches, `recipe.KorniaAugment`) and the new one
(`recipe.make_augment` -> `augment.FastAugment` on the CPU), against a bare PyTorch loop.

In one process, interleaved (the order of the arms rotates every round, so that load from
other processes hits each arm alike), on real images decoded from the Kaggle mirror at
`--image-size` with params.yaml's view:

* bare: the training step alone on pre-made normalised float tensors of the same images
  (forward, the recipe's loss, backward, optimiser step);
* old / new: `engine.train_one_epoch` (indexing, augmentation, normalisation, step,
  bookkeeping) with the old / new augmentation; steps timed by an optimiser step post-hook,
  so what follows a step's `optimizer.step` is charged to the next step;

all three on one model built as the train stage builds it (params.yaml: EfficientNet-Lite0,
weights, stain_norm, norm_layer, channels_last; the recipe's AdamW and loss; batch
train.batch_size). Throughput = batch / median step time (robust to bursts of load); the
ratio is the median over rounds of (arm's images/s / bare images/s in the same round). The
augmentation's own time inside the loop is recorded too (a timing wrapper around it). It
also times each augmentation alone (old / new, interleaved) for the train stage's settings,
adapt's (`adapt.recipe_params`: any rotation, HED jitter, zoom) and every option at once.

    OMP_NUM_THREADS=2 python bench/bench_augment.py                  # 224 px, 2 threads, ~3 min
    OMP_NUM_THREADS=1 python bench/bench_augment.py --threads 1 --tag 1thread
    OMP_NUM_THREADS=2 python bench/bench_augment.py --image-size 128  # the quick run's size

Other processes' CPU use is measured per round (/proc/stat minus this process); rounds where
they used under `--quiet` cores are also summarised on their own.

Results: bench/out/augment_<size>px[_<tag>].{md,json}; notes in bench/AUGMENT.md. Not part of
the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import kornia
import pandas as pd
import torch
from bench_train import loadavg, write_result
from torch import nn
from tqdm import tqdm

from wbc_transfer.config import Params, TrainParams, load_params
from wbc_transfer.data.sets import ImageSet, build_image_set, normalise
from wbc_transfer.engine import configure_torch, logits_of, place_model, train_one_epoch
from wbc_transfer.models import registry as models
from wbc_transfer.models import robustness
from wbc_transfer.training import recipe
from wbc_transfer.training.adapt import recipe_params

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("bare", "old", "new")


def images_folder(params: Params, root: Path | None) -> Path:
    """The Kaggle layout's images folder: `root` (a blood-cells folder), else data.root when
    imported, else the shared mirror ../shared/data/blood-cells."""
    candidates = [root] if root else [params.resolve(params.data.root),
                                      ROOT.parent / "shared" / "data" / "blood-cells"]
    for folder in candidates:
        if (folder / params.data.images_subdir / "TRAIN").is_dir():
            return folder / params.data.images_subdir
    raise SystemExit(f"no images under {candidates}: pass --data-root")


def decode_images(params: Params, images: Path, size: int, n: int) -> ImageSet:
    """n TRAIN images (evenly spread over each class's files, classes in turn), in
    params.yaml's view (prepare.view, prepare.cell_fraction) at `size` px."""
    classes = list(params.data.classes)
    rows = []
    for c in classes:
        files = sorted(p for p in (images / "TRAIN" / c).iterdir() if p.suffix.lower() == ".jpeg")
        step = len(files) / math.ceil(n / len(classes))
        rows += [(f"TRAIN/{c}/{files[int(i * step)].name}", c, "train")
                 for i in range(math.ceil(n / len(classes)))]
    frame = pd.DataFrame(rows, columns=["path", "label", "split"])
    data = build_image_set(frame, images, classes, size, params.prepare.view,
                           params.prepare.cell_fraction)
    return data.take(torch.arange(n))


def build_model(t: TrainParams, data: ImageSet) -> tuple[nn.Module, Any]:
    built = models.build("efficientnet_lite0", len(data.classes), t.weights, data.size)
    adapted = robustness.adapt(built.model, built.mean, built.std, t.stain_norm, t.norm_layer,
                               data.images)
    return place_model(adapted, torch.device("cpu"), t.channels_last), built


def bare_steps(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable,
               inputs: list[torch.Tensor], labels: list[torch.Tensor]) -> list[float]:
    """Seconds of each step of the bare loop on pre-made tensors."""
    model.train()
    times = []
    for x, y in zip(inputs, labels, strict=True):
        started = time.perf_counter()
        loss = loss_fn(logits_of(model(x)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return times


class Timed:
    """An augmentation that records the seconds of each call (inside the training loop)."""

    def __init__(self, augment: Callable[[torch.Tensor], torch.Tensor]):
        self.augment, self.seconds = augment, []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        out = self.augment(batch)
        self.seconds.append(time.perf_counter() - started)
        return out


def engine_steps(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                 augment: Callable, data: ImageSet, mean: Any, std: Any, batch_size: int,
                 seed: int) -> list[float]:
    """Seconds of each step of one `engine.train_one_epoch` over `data` (optimiser post-hook)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    progress = tqdm(total=math.ceil(len(data) / batch_size), file=io.StringIO(), mininterval=1)
    stamps = [time.perf_counter()]
    hook = optimizer.register_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    try:
        train_one_epoch(model, data, optimizer, augment, mean, std, torch.device("cpu"),
                        batch_size, generator, progress, loss_fn=loss_fn)
    finally:
        hook.remove()
        progress.close()
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def augment_alone(settings: dict[str, TrainParams], images: torch.Tensor, size: int,
                  rounds: int) -> dict[str, dict[str, float]]:
    """Median ms per batch of each augmentation alone, old and new interleaved."""
    out = {}
    for name, t in settings.items():
        old, new = recipe.KorniaAugment(t, size), recipe.make_augment(t, size)
        old(images), new(images)  # warm-up
        times: dict[str, list[float]] = {"old": [], "new": []}
        for r in range(rounds):
            for arm, fn in (("old", old), ("new", new)) if r % 2 == 0 else (("new", new), ("old", old)):
                started = time.perf_counter()
                fn(images)
                times[arm].append(time.perf_counter() - started)
        out[name] = {f"{arm}_ms": 1e3 * statistics.median(v) for arm, v in times.items()}
        out[name]["speed_up"] = out[name]["old_ms"] / out[name]["new_ms"]
    return out


def cpu_snapshot() -> tuple[float, float, float]:
    """(seconds of busy CPU on the machine, of this process's CPU, wall clock): for the CPU
    that other processes used meanwhile (`others_cores`)."""
    busy = float("nan")
    with contextlib.suppress(OSError, ValueError):
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        ticks = [int(f) for f in fields]
        busy = (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # not idle/iowait
    own = os.times()
    return busy, own.user + own.system, time.perf_counter()


def others_cores(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Cores' worth of CPU that other processes (and the hypervisor's steal) used between two
    `cpu_snapshot`s: (machine busy - this process) / wall."""
    return ((after[0] - before[0]) - (after[1] - before[1])) / (after[2] - before[2])


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [f"# Augmentation bench, {result['image_size']} px ({result['created']})", "",
             f"`{result['command']}`", "",
             f"EfficientNet-Lite0, batch {result['batch_size']}, {env['threads']} torch thread(s), "
             f"{result['rounds']} rounds x {result['steps']} steps per arm, {result['data']}; "
             f"load average before {env['load_before']}, after {env['load_after']}.", "",
             f"Other processes used, per round (cores of {env['cpus']}): "
             + ", ".join(f"{o:.2f}" for o in result["others_cores"])
             + f"; quiet rounds (< {result['quiet_below']}): "
             + (", ".join(map(str, result["quiet_rounds"])) or "none") + ".", "",
             "| arm | images/s, all rounds (median step) | ratio to bare, all rounds (median) "
             "| images/s, quiet rounds | ratio, quiet rounds | ratio per round "
             "| augmentation in the loop, ms per batch (median) |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: |"]

    def num(x: float | None, digits: int) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    for arm in ARMS:
        a = result["arms"][arm]
        rounds = ", ".join(f"{r:.3f}" for r in a.get("round_ratios", []))
        ratio, quiet = (num(a["ratio"], 3), num(a["quiet_ratio"], 3)) if "ratio" in a else ("1", "1")
        in_loop = num(a.get("augment_in_loop_ms"), 0)
        lines.append(f"| {arm} | {a['img_s']:.1f} | {ratio} | {num(a['quiet_img_s'], 1)} | {quiet} "
                     f"| {rounds} | {in_loop} |")
    lines += ["", f"Augmentation alone, ms per batch of {result['batch_size']} (median of "
              f"{result['alone_rounds']} calls each, measured first; other processes used "
              f"{result['augment_alone_others_cores']:.2f} cores meanwhile):", "",
              "| settings | old (kornia) | new (FastAugment) | speed-up |",
              "| --- | ---: | ---: | ---: |"]
    for name, a in result["augment_alone"].items():
        lines.append(f"| {name} | {a['old_ms']:.1f} | {a['new_ms']:.1f} | {a['speed_up']:.1f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    params = load_params(ROOT)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--batch-size", type=int, default=params.train.batch_size)
    p.add_argument("--steps", type=int, default=3, help="timed steps per arm and round")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--quiet", type=float, default=0.2,
                   help="a round is quiet when other processes used fewer cores than this")
    p.add_argument("--alone-rounds", type=int, default=10,
                   help="rounds of the augmentation-alone timing")
    p.add_argument("--data-root", type=Path, default=None,
                   help="a blood-cells folder (default: data.root, else ../shared/data/blood-cells)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    args = p.parse_args(argv)
    size, bs = args.image_size, args.batch_size

    torch_settings = configure_torch(args.threads)
    load_before = loadavg()
    started = time.perf_counter()
    t = params.train.model_copy(update={"recipe": "modern"})
    data = decode_images(params, images_folder(params, args.data_root), size, bs * args.steps)
    model, built = build_model(t, data)
    optimizer, loss_fn = recipe.make_optimizer(t, model, built.head), recipe.make_loss(t)
    augments = {"old": Timed(recipe.KorniaAugment(t, size)), "new": Timed(recipe.make_augment(t, size))}
    batches = [torch.arange(i * bs, (i + 1) * bs) for i in range(args.steps)]
    bare_x = [normalise(data.images[i], built.mean, built.std) for i in batches]
    bare_y = [data.labels[i] for i in batches]
    print(f"bench {size} px, batch {bs}, {torch_settings}, load {load_before}", flush=True)

    def run(arm: str, seed: int) -> list[float]:
        if arm == "bare":
            return bare_steps(model, optimizer, loss_fn, bare_x, bare_y)
        return engine_steps(model, optimizer, loss_fn, augments[arm], data, built.mean,
                            built.std, bs, seed)

    settings = {"train (params.yaml)": t, "adapt (adapt.recipe_params)": recipe_params(params),
                "every option": t.model_copy(update=dict(
                    hue_jitter=0.1, grayscale_p=0.5, hed_jitter=0.1, scale=(0.8, 1.2),
                    colour_jitter=0.2, rotation_deg=180))}
    before = cpu_snapshot()
    alone = augment_alone(settings, data.images[batches[0]], size, args.alone_rounds)
    alone_others = others_cores(before, cpu_snapshot())
    print(f"  augmentation alone: {alone} | other processes {alone_others:.2f} cores", flush=True)

    for arm in ARMS:  # warm-up: oneDNN primitives, kornia's first call, allocator
        run(arm, 0)
    for augment in augments.values():
        augment.seconds.clear()
    samples: dict[str, list[float]] = {arm: [] for arm in ARMS}
    round_ratios: dict[str, list[float]] = {"old": [], "new": []}
    others: list[float] = []
    for r in range(args.rounds):
        order = ARMS[r % 3:] + ARMS[:r % 3]
        median = {}
        before = cpu_snapshot()
        for arm in order if r % 2 == 0 else order[::-1]:
            steps = run(arm, r + 1)
            samples[arm] += steps
            median[arm] = statistics.median(steps)
        others.append(others_cores(before, cpu_snapshot()))
        for arm in ("old", "new"):
            round_ratios[arm].append(median["bare"] / median[arm])
        print(f"  round {r + 1}: " + ", ".join(f"{a} {bs / median[a]:.1f} img/s" for a in ARMS)
              + f" | other processes {others[-1]:.2f} cores, load {loadavg()}", flush=True)
    quiet = [i for i, o in enumerate(others) if o < args.quiet]

    arms: dict[str, dict[str, Any]] = {}
    steps_per_round = {arm: len(samples[arm]) // args.rounds for arm in ARMS}
    for arm in ARMS:
        k = steps_per_round[arm]
        quiet_steps = [x for i in quiet for x in samples[arm][i * k:(i + 1) * k]]
        arms[arm] = {"img_s": bs / statistics.median(samples[arm]), "steps_s": samples[arm],
                     "quiet_img_s": bs / statistics.median(quiet_steps) if quiet else None}
        if arm != "bare":
            arms[arm].update(ratio=statistics.median(round_ratios[arm]),
                             quiet_ratio=statistics.median([round_ratios[arm][i] for i in quiet])
                             if quiet else None,
                             round_ratios=round_ratios[arm],
                             augment_in_loop_ms=1e3 * statistics.median(augments[arm].seconds),
                             augment_in_loop_s=augments[arm].seconds)
    result: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}",
                             Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
        "image_size": size, "batch_size": bs, "rounds": args.rounds, "steps": args.steps,
        "alone_rounds": args.alone_rounds,
        "data": f"{len(data)} mirror TRAIN images, {data.view} view",
        "train_settings": {k: getattr(t, k) for k in (
            "rotation_deg", "translate_px", "colour_jitter", "hue_jitter", "grayscale_p",
            "hed_jitter", "scale", "stain_norm", "norm_layer", "channels_last", "weights")},
        "arms": arms, "augment_alone": alone, "augment_alone_others_cores": alone_others,
        "others_cores": others, "quiet_below": args.quiet,
        "quiet_rounds": [i + 1 for i in quiet], "bench_s": time.perf_counter() - started,
        "environment": {
            "torch": torch.__version__, "kornia": kornia.__version__, "opencv": cv2.__version__,
            "threads": torch_settings["torch_threads"], "cv2_threads": cv2.getNumThreads(),
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "load_before": load_before, "load_after": loadavg(),
        },
    }
    stem = f"augment_{size}px" + (f"_{args.tag}" if args.tag else "")
    write_result(args.out, stem, result, markdown(result))
    print(f"wrote {args.out / stem}.md and .json ({result['bench_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
