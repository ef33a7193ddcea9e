"""Training/inference benchmark: the project's own code path against a bare PyTorch loop.

For each architecture, in one process and interleaved (ABBA order, so load drift from other
processes hits both sides alike), it measures

* training images/s of the project path: real prepared `ImageSet` tensors -> `TrainAugment`
  -> normalise -> model -> loss -> SGD step, via `engine.train_one_epoch` with a tqdm bar and
  the stage's per-epoch MLflow `log_metrics` (into a throw-away SQLite store; its cost is
  charged per real epoch of `ceil(train images / batch)` batches, as in the stage);
* training images/s of a bare loop on pre-made random float tensors, same model, same batch
  size, same image size, plain SGD with the same lr/momentum;
* inference images/s of `engine.evaluate` (batched, inference_mode) on real images against a
  bare `model(x)` loop under `torch.inference_mode()` with the same batch size;
* the cost of the augmentation alone per batch and of one per-epoch checkpoint save.

It also reads per-stage times of a quick run from a `dvc repro` log (`--repro-log`), or runs the
quick run in a temporary copy of the repository (`--run-quick`), and extrapolates the CPU time
of the paper-scale study from the measured images/s.

    python bench/bench_train.py                          # 64 px, all architectures, < 5 min
    python bench/bench_train.py --image-size 224 --repeats 2
    python bench/bench_train.py --archs alexnet googlenet --variants default channels_last
    python bench/bench_train.py --repro-log /tmp/repro1.log

Results: bench/out/bench_<size>px[_<tag>].{md,json}. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from wbc_transfer.config import Params, load_params
from wbc_transfer.data.sets import ImageSet, TrainAugment
from wbc_transfer.engine import (
    Checkpoint,
    configure_torch,
    evaluate,
    logits_of,
    make_optimizer,
    place_model,
    train_one_epoch,
)
from wbc_transfer.models import registry as models

ROOT = Path(__file__).resolve().parent.parent

# The paper-scale study (docs/experiments.md): per architecture.
PAPER = {"train_images": 280, "epochs": 30, "val_images": 100, "eval_images": 120 + 2487,
         "image_size": 224, "batch_size": 10}


# --------------------------------------------------------------------------------------------
# variants: what a `--variants` name changes (model, optimizer, augmentation, eval batch)


class PerImageAugment:
    """The augmentation as it was before issue 7: torchvision v2 transforms image by image.

    Kept here only so that the benchmark can measure the vectorised `TrainAugment` against it.
    """

    def __init__(self, translate_px: int, reference_size: int):
        fraction = translate_px / reference_size
        self.transform = v2.Compose([
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomAffine(degrees=0.0, translate=(fraction, fraction)),
        ])

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in batch])


@dataclass
class Variant:
    name: str
    channels_last: bool | None = None  # None: as params.yaml says (train.channels_last)
    compile: bool = False
    fused_sgd: bool = False
    per_image_augment: bool = False
    eval_batch_size: int | None = None


def parse_variant(name: str) -> Variant:
    v = Variant(name)
    for part in name.split("+"):
        if part == "default":
            continue
        if part == "channels_last":
            v.channels_last = True
        elif part == "contiguous":
            v.channels_last = False
        elif part == "compile":
            v.compile = True
        elif part == "fused_sgd":
            v.fused_sgd = True
        elif part == "per_image_augment":
            v.per_image_augment = True
        elif part.startswith("eval_bs="):
            v.eval_batch_size = int(part.split("=", 1)[1])
        else:
            raise SystemExit(f"unknown variant {part!r}; use default, channels_last, contiguous, "
                             "compile, "
                             "fused_sgd, per_image_augment, eval_bs=N, joined with +")
    return v


# --------------------------------------------------------------------------------------------
# data


def load_images(params: Params, size: int,
                data_file: Path | None) -> tuple[ImageSet, ImageSet, str]:
    """(train split, evaluation images) of the prepared paper protocol, at `size` px."""
    file = data_file or params.resolve(params.prepare.out_dir) / "paper.pt"
    data = ImageSet.load(file)
    note = f"{file.name} ({data.size} px)"
    if data.size != size:  # e.g. a 224 px bench on the 64 px quick-run cache: same cost path
        data.images = TF.resize(data.images, [size, size], antialias=True)
        note += f" resized to {size} px"
    train = data.subset("train")
    held = [data.subset(s) for s in ("val", "test")]
    evaluation = ImageSet(
        images=torch.cat([h.images for h in held]), labels=torch.cat([h.labels for h in held]),
        paths=sum((h.paths for h in held), []), splits=sum((h.splits for h in held), []),
        classes=data.classes,
    )
    return train, evaluation, note


def take(data: ImageSet, n: int) -> ImageSet:
    """The first `n` images (repeated if `data` is smaller)."""
    return take_range(data, 0, n)


def take_range(data: ImageSet, start: int, n: int) -> ImageSet:
    idx = (torch.arange(n) + start) % len(data)
    return ImageSet(data.images[idx], data.labels[idx], [data.paths[i] for i in idx],
                    [data.splits[i] for i in idx], data.classes)


# --------------------------------------------------------------------------------------------
# the measured loops


@dataclass
class ArchSetup:
    variant: Variant
    model: nn.Module
    optimizer: torch.optim.Optimizer
    bare_optimizer: torch.optim.Optimizer
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Callable[[torch.Tensor], torch.Tensor]
    eval_batch_size: int
    compile_s: float = 0.0
    samples: dict[str, list[float]] = field(default_factory=dict)
    eval_chunks: list[ImageSet] = field(default_factory=list)
    bare_eval: list[list[torch.Tensor]] = field(default_factory=list)

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)


def setup_arch(arch: str, variant: Variant, params: Params, size: int, n_classes: int,
               eval_batch_size: int) -> ArchSetup:
    t = params.train
    torch.manual_seed(0)
    built = models.build(arch, n_classes, "none", size)
    channels_last = t.channels_last if variant.channels_last is None else variant.channels_last
    model = place_model(built.model, torch.device("cpu"), channels_last)
    optimizer = make_optimizer(model, built.head, t.lr, t.head_lr_factor, t.momentum,
                               fused=variant.fused_sgd)
    bare_optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                                     **({"fused": True} if variant.fused_sgd else {}))
    if variant.compile:
        model = torch.compile(model)
    aug_cls = PerImageAugment if variant.per_image_augment else TrainAugment
    augment = aug_cls(t.translate_px, t.reference_size)
    return ArchSetup(variant, model, optimizer, bare_optimizer, built.mean, built.std, augment,
                     variant.eval_batch_size or eval_batch_size)


def bare_train(s: ArchSetup, inputs: list[torch.Tensor], labels: list[torch.Tensor]) -> list[float]:
    """Seconds of each step of a bare loop on pre-made tensors."""
    s.model.train()
    times = []
    for x, y in zip(inputs, labels, strict=True):
        started = time.perf_counter()
        loss = F.cross_entropy(logits_of(s.model(x)), y)
        s.bare_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s.bare_optimizer.step()
        times.append(time.perf_counter() - started)
    return times


@torch.inference_mode()
def bare_infer(s: ArchSetup, calls: list[list[torch.Tensor]]) -> list[float]:
    """Seconds of each call of a bare inference loop over pre-made batches."""
    s.model.eval()
    times = []
    for batches in calls:
        started = time.perf_counter()
        for x in batches:
            s.model(x)
        times.append(time.perf_counter() - started)
    return times


def project_train(s: ArchSetup, data: ImageSet, batch_size: int, epoch: int
                  ) -> tuple[list[float], float]:
    """(seconds of each step of engine.train_one_epoch, seconds of the per-epoch MLflow logging).

    Steps are timed by an optimizer step post-hook, so the measured path is exactly the stage's:
    indexing, TrainAugment, normalise, forward, loss, backward, SGD step, accuracy, tqdm (what
    follows one step's optimizer.step is charged to the next step).
    """
    import mlflow

    progress = tqdm(total=math.ceil(len(data) / batch_size), file=io.StringIO(), mininterval=1)
    torch.manual_seed(epoch)
    generator = torch.Generator().manual_seed(epoch)
    stamps = [time.perf_counter()]
    hook = s.optimizer.register_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    try:
        stats = train_one_epoch(s.model, data, s.optimizer, s.augment, s.mean, s.std,
                                torch.device("cpu"), batch_size, generator, progress)
    finally:
        hook.remove()
    progress.close()
    started = time.perf_counter()
    mlflow.log_metrics({"train_loss": stats.loss, "train_accuracy": stats.accuracy,
                        "val_loss": 0.0, "val_accuracy": 0.0, "val_f1_macro": 0.0,
                        "train_images_per_s": stats.images / stats.seconds}, step=epoch)
    log_s = time.perf_counter() - started
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)], log_s


def project_infer(s: ArchSetup, chunks: list[ImageSet]) -> list[float]:
    """Seconds of each engine.evaluate call (as the stages call it: once per image set)."""
    times = []
    for chunk in chunks:
        started = time.perf_counter()
        evaluate(s.model, chunk, s.mean, s.std, torch.device("cpu"), s.eval_batch_size)
        times.append(time.perf_counter() - started)
    return times


def augment_only(s: ArchSetup, data: ImageSet, batch_size: int, n: int) -> float:
    """Median seconds of the augmentation alone on one batch."""
    times = []
    for i in range(n):
        batch = data.images[torch.arange(i * batch_size, (i + 1) * batch_size) % len(data)]
        started = time.perf_counter()
        s.augment(batch)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def checkpoint_save(s: ArchSetup, folder: Path) -> float:
    ckpt = Checkpoint(folder / "last.pt", "bench")
    started = time.perf_counter()
    ckpt.save(model=s.model.state_dict(), optimizer=s.optimizer.state_dict(), epoch=1,
              history=[], run_id="bench")
    seconds = time.perf_counter() - started
    ckpt.remove()
    return seconds


# --------------------------------------------------------------------------------------------
# one architecture


def bench_arch(arch: str, variants: list[Variant], params: Params, args: argparse.Namespace,
               train_set: ImageSet, eval_set: ImageSet, tmp: Path) -> list[dict[str, Any]]:
    """Interleaved repetitions; per repetition the median step time of each side.

    Throughput = images per batch / median step time: robust to the bursts of load that other
    processes put on the two cores (a mean would charge a burst to whichever side it hit).
    The per-epoch MLflow logging is charged per real epoch (ceil(280 / batch) steps).
    """
    size, bs = args.image_size, args.batch_size
    real_steps_per_epoch = math.ceil(PAPER["train_images"] / bs)
    train_data = take(train_set, args.train_batches * bs)
    g = torch.Generator().manual_seed(1)
    bare_x = [torch.randn(bs, 3, size, size, generator=g) for _ in range(args.train_batches)]
    bare_y = [torch.randint(0, len(train_set.classes), (bs,), generator=g)
              for _ in range(args.train_batches)]

    setups = []
    for v in variants:
        s = setup_arch(arch, v, params, size, len(train_set.classes), args.eval_batch_size)
        n, ebs = args.eval_images, s.eval_batch_size
        s.eval_chunks = [take_range(eval_set, i * n, n) for i in range(args.eval_calls)]
        s.bare_eval = [[torch.randn(min(ebs, n - i), 3, size, size, generator=g)
                        for i in range(0, n, ebs)] for _ in range(args.eval_calls)]
        # warm-up (for torch.compile: the compilation, timed minus two steady steps)
        started = time.perf_counter()
        project_train(s, take(train_set, 2 * bs), bs, 0)
        bare_train(s, bare_x[:2], bare_y[:2])
        first = time.perf_counter() - started
        if v.compile:
            steady = sum(bare_train(s, bare_x[:2], bare_y[:2]))
            s.compile_s = max(first - 2 * steady, 0.0)
        setups.append(s)

    def per_image(samples: list[float], images: int) -> float:
        return images / statistics.median(samples)

    # training first, then inference (each phase interleaved), so that the switch from
    # training to inference buffers happens once, in an untimed warm-up, not inside a sample
    for rep in range(args.repeats):
        for s in setups if rep % 2 == 0 else setups[::-1]:
            got: dict[str, float] = {}
            for side in ("project", "bare") if rep % 2 == 0 else ("bare", "project"):
                if side == "project":
                    steps, log_s = project_train(s, train_data, bs, rep + 1)
                    steps = [t + log_s / real_steps_per_epoch for t in steps]
                    s.add("mlflow_log_s", log_s)
                    s.samples.setdefault("train_project_steps", []).extend(steps)
                    got["train_project"] = per_image(steps, bs)
                else:
                    steps = bare_train(s, bare_x, bare_y)
                    s.samples.setdefault("train_bare_steps", []).extend(steps)
                    got["train_bare"] = per_image(steps, bs)
            s.add("train_ratio", got["train_project"] / got["train_bare"])
    for s in setups:  # untimed warm-up: one evaluation batch (for torch.compile: compiles)
        s.add("infer_warmup_s", bare_infer(s, [s.bare_eval[0][:1]])[0])
    for rep in range(args.repeats):
        for s in setups if rep % 2 == 0 else setups[::-1]:
            for side in ("project", "bare") if rep % 2 == 0 else ("bare", "project"):
                if side == "project":
                    times = project_infer(s, s.eval_chunks)
                    s.samples.setdefault("infer_project_calls", []).extend(times)
                    got["infer_project"] = per_image(times, args.eval_images)
                else:
                    times = bare_infer(s, s.bare_eval)
                    s.samples.setdefault("infer_bare_calls", []).extend(times)
                    got["infer_bare"] = per_image(times, args.eval_images)
            s.add("infer_ratio", got["infer_project"] / got["infer_bare"])

    rows = []
    for s in setups:
        aug_s = augment_only(s, train_data, bs, 20)
        med = {k: statistics.median(v) for k, v in s.samples.items()}
        train_project = bs / med["train_project_steps"]
        if s.variant.compile:  # the evaluation graph is compiled in the inference warm-up
            first_batch = len(s.bare_eval[0][0]) / args.eval_images * med["infer_bare_calls"]
            s.compile_s += max(med["infer_warmup_s"] - first_batch, 0.0)
        ckpt_s = checkpoint_save(s, tmp / arch) if args.checkpoint else float("nan")
        rows.append({
            "arch": arch, "variant": s.variant.name, "image_size": size, "batch_size": bs,
            "eval_batch_size": s.eval_batch_size,
            "train_project_img_s": train_project,
            "train_bare_img_s": bs / med["train_bare_steps"],
            "train_ratio": med["train_ratio"],
            "infer_project_img_s": args.eval_images / med["infer_project_calls"],
            "infer_bare_img_s": args.eval_images / med["infer_bare_calls"],
            "infer_ratio": med["infer_ratio"],
            "augment_ms_per_batch": aug_s * 1e3, "augment_share": aug_s * train_project / bs,
            "mlflow_log_s_per_epoch": med["mlflow_log_s"], "checkpoint_s_per_epoch": ckpt_s,
            "compile_s": s.compile_s, "samples": s.samples,
        })
        r = rows[-1]
        print(f"  {arch:<18} {s.variant.name:<22} train {r['train_project_img_s']:7.1f} / "
              f"{r['train_bare_img_s']:7.1f} img/s = {r['train_ratio']:.3f} | infer "
              f"{r['infer_project_img_s']:7.1f} / {r['infer_bare_img_s']:7.1f} img/s = "
              f"{r['infer_ratio']:.3f} | aug {aug_s * 1e3:.2f} ms/batch "
              f"({r['augment_share']:.1%}) | ckpt {ckpt_s:.2f} s", flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# quick-run stage times


TIME = re.compile(r"(?:^|[\r\n])(\d\d):(\d\d):(\d\d)[ ,]")
STAGE = re.compile(r"Running stage '([^']+)'")
ELAPSED = re.compile(r"\| *(\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<")


def _seconds(h: str, m: str, s: str) -> int:
    return int(h) * 3600 + int(m) * 60 + int(s)


def parse_repro_log(text: str) -> dict[str, Any]:
    """Per-stage times from a `dvc repro` log whose own log lines carry HH:MM:SS stamps.

    A stage's time is taken from its first time stamp to the next stage's first time stamp
    (both sit at about the same point after start-up, so the offset cancels). Stages without a
    stamp of their own are merged with the stage before them (reported as `a + b`). Training
    stages also report the loop time printed by their progress bar (last tqdm elapsed).
    """
    parts = STAGE.split(text)
    stages: list[dict[str, Any]] = []
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        stamps = [_seconds(*m.groups()) for m in TIME.finditer(body)]
        loop = None
        for m in ELAPSED.finditer(body):
            loop = _seconds(m.group(3) or "0", m.group(4), m.group(5))
        stages.append({"stage": name, "first": stamps[0] if stamps else None,
                       "last": stamps[-1] if stamps else None,
                       "loop_s": loop if name.startswith("train@") else None})
    # days do not wrap in a quick run; if they did, add 24 h
    for i in range(1, len(stages)):
        for key in ("first", "last"):
            if stages[i][key] is not None and stages[i - 1]["last"] is not None \
                    and stages[i][key] < stages[i - 1]["last"] - 3600:
                stages[i][key] += 86400
    merged: list[dict[str, Any]] = []
    for st in stages:
        if st["first"] is None and merged:
            merged[-1]["stage"] += " + " + st["stage"]
            merged[-1]["loop_s"] = (merged[-1]["loop_s"] or 0) + (st["loop_s"] or 0) or None
        else:
            merged.append(dict(st))
    for a, b in zip(merged, merged[1:], strict=False):
        a["seconds"] = b["first"] - a["first"] if a["first"] is not None else None
    if merged:
        last = merged[-1]
        last["seconds"] = (last["last"] - last["first"]) if last["first"] is not None else None
    known = [s["first"] for s in merged if s["first"] is not None]
    lasts = [s["last"] for s in merged if s["last"] is not None]
    total = (max(lasts) - min(known)) if known and lasts else None
    return {"stages": [{k: s[k] for k in ("stage", "seconds", "loop_s")} for s in merged],
            "total_s": total,
            "note": "from log time stamps: first stamped line to last stamped line; excludes "
                    "the start-up before the first and the tail after the last stamp"}


def run_quick(dvc_args: list[str]) -> tuple[dict[str, Any], str]:
    """Copy the working tree (with data/) to a temp dir, run `dvc repro` there, time stages."""
    tmp = Path(tempfile.mkdtemp(prefix="wbc-quick-"))
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    # without tune/: `--downstream prepare` would also run the optional tuning pipeline
    for rel in (f for f in files if f and not f.startswith("tune/")):
        src = ROOT / rel
        if src.is_file():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tmp / rel)
    for rel in ("data", "dvc.lock", ".dvc/config", "results"):
        src = ROOT / rel
        if src.is_dir():
            shutil.copytree(src, tmp / rel, dirs_exist_ok=True, symlinks=True)
        elif src.is_file():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tmp / rel)
    subprocess.run(["git", "init", "-q"], cwd=tmp, check=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
           "PYTHONPATH": f"{tmp / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = ["dvc", "repro", *dvc_args]
    print(f"quick run in {tmp}: {' '.join(cmd)}", flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    log = io.StringIO()
    stages: list[dict[str, Any]] = []
    buffer = ""
    for chunk in iter(lambda: proc.stdout.read1(4096), b""):  # type: ignore[union-attr]
        now = time.perf_counter() - started
        text = chunk.decode(errors="replace")
        log.write(text)
        buffer += text
        for m in STAGE.finditer(buffer):
            if stages:
                stages[-1]["seconds"] = now - stages[-1]["start"]
            stages.append({"stage": m.group(1), "start": now})
            print(f"  [{now:7.1f} s] {m.group(1)}", flush=True)
        buffer = buffer[-200:] if not STAGE.search(buffer[-200:]) else ""
    rc = proc.wait()
    total = time.perf_counter() - started
    if stages:
        stages[-1]["seconds"] = total - stages[-1]["start"]
    (tmp / "repro.log").write_text(log.getvalue())
    loops = {s["stage"]: s["loop_s"] for s in parse_repro_log(log.getvalue())["stages"]}
    result = {"stages": [{"stage": s["stage"], "seconds": s["seconds"],
                          "loop_s": loops.get(s["stage"])} for s in stages],
              "total_s": total, "returncode": rc,
              "note": f"measured: `dvc repro {' '.join(dvc_args)}` in a copy ({tmp})"}
    if rc != 0:
        print(log.getvalue()[-3000:], file=sys.stderr)
    return result, str(tmp)


# --------------------------------------------------------------------------------------------
# reporting


def extrapolate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """CPU hours of the paper-scale study from measured images/s (same image size only), per
    variant, so a before/after run also extrapolates both sides."""
    variants: dict[str, dict[str, Any]] = {}
    for r in rows:
        train_s = PAPER["train_images"] * PAPER["epochs"] / r["train_project_img_s"]
        val_s = PAPER["val_images"] * PAPER["epochs"] / r["infer_project_img_s"]
        eval_s = PAPER["eval_images"] / r["infer_project_img_s"]
        ckpt = r["checkpoint_s_per_epoch"]
        ckpt_s = PAPER["epochs"] * ckpt if ckpt == ckpt else 0.0
        v = variants.setdefault(r["variant"], {"per_arch": {}, "total_s": 0.0})
        v["per_arch"][r["arch"]] = {"train_s": train_s, "validation_s": val_s,
                                    "evaluation_s": eval_s, "checkpoint_s": ckpt_s,
                                    "total_s": train_s + val_s + eval_s + ckpt_s}
        v["total_s"] += train_s + val_s + eval_s + ckpt_s
    return {"per_variant": variants, "assumes": PAPER}


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"# Benchmark {result['image_size']} px ({result['created']})", "",
        f"torch {env['torch']}, {env['threads']} threads, flush_denormal "
        f"{env['flush_denormal']}, load avg before/after {env['load_before']} / "
        f"{env['load_after']}; data: {result['data']}; {result['repeats']} repeats, "
        f"{result['train_batches']} training batches of {result['batch_size']}, "
        f"{result['eval_calls']} evaluate calls of {result['eval_images']} images per repeat; "
        "img/s from the median step (or call) time; ratio = median over repeats of project / "
        "bare, paired.",
        "",
        "| arch | variant | train project img/s | train bare img/s | ratio | "
        "infer project img/s | infer bare img/s | ratio | eval batch | augment ms/batch "
        "(share of step) | checkpoint s/epoch | compile s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['arch']} | {r['variant']} | {r['train_project_img_s']:.1f} | "
            f"{r['train_bare_img_s']:.1f} | {r['train_ratio']:.3f} | "
            f"{r['infer_project_img_s']:.1f} | {r['infer_bare_img_s']:.1f} | "
            f"{r['infer_ratio']:.3f} | {r['eval_batch_size']} | "
            f"{r['augment_ms_per_batch']:.2f} ({r['augment_share']:.1%}) | "
            f"{r['checkpoint_s_per_epoch']:.2f} | {r['compile_s']:.0f} |")
    quick = result.get("quick_run")
    if quick:
        lines += ["", f"## Quick run: {quick['total_s']:.0f} s end to end", "",
                  quick["note"], "", "| stage | seconds | training loop s (tqdm) |",
                  "| --- | ---: | ---: |"]
        for s in quick["stages"]:
            sec = "?" if s["seconds"] is None else f"{s['seconds']:.0f}"
            loop = "" if s.get("loop_s") is None else str(s["loop_s"])
            lines.append(f"| {s['stage']} | {sec} | {loop} |")
    ex = result.get("extrapolation")
    for variant, v in (ex or {}).get("per_variant", {}).items():
        lines += ["", f"## Extrapolated study at {result['image_size']} px, {variant} "
                  f"({PAPER['train_images']} train x {PAPER['epochs']} epochs, validation "
                  f"{PAPER['val_images']}/epoch, evaluation {PAPER['eval_images']} images)", "",
                  "| arch | train h | validation h | evaluation h | checkpoints h | total h |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for arch, a in v["per_arch"].items():
            lines.append(f"| {arch} | {a['train_s'] / 3600:.2f} | {a['validation_s'] / 3600:.2f} "
                         f"| {a['evaluation_s'] / 3600:.2f} | {a['checkpoint_s'] / 3600:.2f} | "
                         f"{a['total_s'] / 3600:.2f} |")
        lines.append(f"| all | | | | | {v['total_s'] / 3600:.2f} |")
    return "\n".join(lines) + "\n"


def write_result(out: Path, stem: str, result: dict[str, Any], text: str) -> None:
    """<out>/<stem>.json (the raw `result`) and <stem>.md (`text`, printed too)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"{stem}.md").write_text(text)
    print("\n" + text)


def loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    return "?"


@contextlib.contextmanager
def scratch_mlflow() -> Iterator[Path]:
    """A throw-away MLflow SQLite store and run, so the project's mlflow.db stays untouched."""
    import logging

    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="wbc-bench-"))
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'bench.db'}")
    mlflow.set_experiment("bench")
    try:
        with mlflow.start_run():
            yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    params = load_params(ROOT)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=64, choices=(64, 224))
    p.add_argument("--archs", nargs="+", default=list(params.train.architectures))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved repetitions (default 5 at 64 px, 3 at 224)")
    p.add_argument("--train-batches", type=int, default=None,
                   help="timed training batches per repetition (default 8 at 64 px, 3 at 224)")
    p.add_argument("--eval-images", type=int, default=None,
                   help="images per timed engine.evaluate call, in batches of --eval-batch-size "
                        "(default 128 at 64 px, 64 at 224)")
    p.add_argument("--eval-calls", type=int, default=None,
                   help="timed evaluate calls per repetition and side (default 3 at 64 px, 1 at 224)")
    p.add_argument("--batch-size", type=int, default=params.train.batch_size)
    p.add_argument("--eval-batch-size", type=int, default=params.evaluate.batch_size)
    p.add_argument("--variants", nargs="+", default=["default"],
                   help="default (as params.yaml), channels_last, contiguous, compile, fused_sgd, "
                        "per_image_augment, "
                        "eval_bs=N, or combinations joined with +; measured interleaved")
    p.add_argument("--no-checkpoint", dest="checkpoint", action="store_false",
                   help="skip timing one per-epoch checkpoint save")
    p.add_argument("--data", type=Path, default=None, help="a prepared ImageSet (.pt)")
    p.add_argument("--repro-log", type=Path, default=None,
                   help="a `dvc repro` log with HH:MM:SS stamps: per-stage quick-run times")
    p.add_argument("--run-quick", action="store_true",
                   help="run `dvc repro` in a temporary copy of the repo and time each stage")
    p.add_argument("--quick-args", default="--force --downstream prepare",
                   help="arguments of that `dvc repro` (default: %(default)s)")
    p.add_argument("--skip-models", action="store_true", help="only the quick-run times")
    args = p.parse_args(argv)
    size = args.image_size
    args.repeats = args.repeats or (5 if size == 64 else 3)
    args.train_batches = args.train_batches or (8 if size == 64 else 3)
    args.eval_images = args.eval_images or (128 if size == 64 else 64)
    args.eval_calls = args.eval_calls or (3 if size == 64 else 1)

    torch_settings = configure_torch(params.train.num_threads)
    created = time.strftime("%Y-%m-%d %H:%M:%S")
    load_before = loadavg()
    result: dict[str, Any] = {
        "created": created, "image_size": size, "batch_size": args.batch_size,
        "repeats": args.repeats, "train_batches": args.train_batches,
        "eval_images": args.eval_images, "eval_calls": args.eval_calls, "variants": args.variants, "rows": [],
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
    }
    variants = [parse_variant(v) for v in args.variants]
    started = time.perf_counter()
    if not args.skip_models:
        train_set, eval_set, note = load_images(params, size, args.data)
        result["data"] = note
        print(f"bench {size} px, {torch_settings}, load {load_before}", flush=True)
        with scratch_mlflow() as tmp:
            for arch in args.archs:
                result["rows"] += bench_arch(arch, variants, params, args, train_set, eval_set,
                                             tmp)
        result["extrapolation"] = extrapolate(result["rows"])
    else:
        result["data"] = "-"
    result["bench_s"] = time.perf_counter() - started
    if args.run_quick:
        result["quick_run"], _ = run_quick(args.quick_args.split())
    elif args.repro_log:
        result["quick_run"] = parse_repro_log(args.repro_log.read_text(errors="replace"))
        result["quick_run"]["note"] += f" ({args.repro_log})"
    result["environment"] = {
        "torch": torch.__version__, "threads": torch_settings["torch_threads"],
        "flush_denormal": torch_settings["flush_denormal"], "python": platform.python_version(),
        "machine": platform.machine(), "cpus": os.cpu_count(),
        "cuda": torch.cuda.is_available(), "load_before": load_before, "load_after": loadavg(),
    }
    stem = f"bench_{size}px" + (f"_{args.tag}" if args.tag else "")
    write_result(args.out, stem, result, markdown(result))
    print(f"wrote {args.out / stem}.md and .json ({result['bench_s']:.0f} s of model benchmark)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
