"""`wbc-transfer app` against `wbc-transfer predict` on the same images and model (issue 24).

    python bench/bench_app.py                       # 100 TEST images, 3 repeats, screenshot
    python bench/bench_app.py --images 1000 --repeats 1 --no-screenshot   # the 1,000-image page

1. A model: EfficientNet-Lite0 at 128 px (the quick run's champion architecture and size) from
   its ImageNet weights, fitted for `--epochs` epochs on `--train-per-class` TRAIN images per
   class with the project's `engine.train_one_epoch` (SGD; a bench model, not the champion: no
   validation, no temperature), registered by `pyfunc.register_classifier` as
   `wbc-classifier@champion` in a SQLite store under a temporary folder. Timing does not depend
   on how well it is fitted; the screenshot is nicer when it is.
2. `--images` TEST images spread over the four classes are copied to a temporary folder.
3. `wbc-transfer predict <folder> -o out.csv` runs `--repeats` times (subprocess): wall time
   of the whole command, and its classification time (images / the img/s it prints, i.e.
   after the model is loaded).
4. `wbc-transfer app` runs (subprocess) and headless Chromium (Playwright) opens it. One small
   warm-up batch loads the model; then `--repeats` times: choose the files, click Classify, and
   wait until every row is in the grid and every thumbnail in view has been decoded
   ("classified and shown"). The first real batch after a fresh start (model load included)
   is timed once as "cold".
5. With screenshots: `--shot` images (a few per class) are classified, the review threshold
   set to 0.9 and the first cell corrected to its true class; the page is saved as a palette
   PNG (< 200 KB) to `docs/app.png`, that cell's detail with its Grad-CAM to
   `docs/app-gradcam.png`.

Results: printed as a markdown table and written to bench/out/app.json. Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "data" / "blood-cells" / "dataset2-master" / "dataset2-master" / "images"
CLASSES = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
MAX_SHOT_BYTES = 200_000


def spread(files: list[Path], n: int) -> list[Path]:
    step = len(files) / n
    return [files[int(i * step)] for i in range(n)]


def pick(folder: str, per_class: int) -> list[Path]:
    return [f for c in CLASSES for f in spread(sorted((MIRROR / folder / c).glob("*.jpeg")), per_class)]


def fit_and_register(work: Path, per_class: int, epochs: int, size: int) -> str:
    """Fit the bench model and register it; returns the tracking URI."""
    import mlflow
    import pandas as pd
    import torch
    from mlflow import MlflowClient

    from wbc_transfer import engine
    from wbc_transfer.data.sets import TrainAugment, build_image_set
    from wbc_transfer.models import registry as models
    from wbc_transfer.serving import pyfunc

    torch.manual_seed(0)
    built = models.build("efficientnet_lite0", len(CLASSES), "auto", size)
    files = pick("TRAIN", per_class) if epochs else []
    manifest = pd.DataFrame({"path": [str(f.relative_to(MIRROR)) for f in files],
                             "label": [f.parent.name for f in files], "split": "train"})
    data = build_image_set(manifest, MIRROR, CLASSES, size)
    optimizer = engine.make_optimizer(built.model, built.head, 0.005, 10, 0.9)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        stats = engine.train_one_epoch(built.model, data, optimizer, TrainAugment(30, 224),
                                       built.mean, built.std, torch.device("cpu"), 32, generator)
        print(f"fit epoch {epoch + 1}: loss {stats.loss:.3f}, train accuracy {stats.accuracy:.3f}, "
              f"{stats.seconds:.0f} s", file=sys.stderr)
    weights = work / "model.pt"
    torch.save(built.model.eval().state_dict(), weights)
    config = {"architecture": "efficientnet_lite0", "image_size": size, "mean": list(built.mean),
              "std": list(built.std), "classes": CLASSES}
    uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("bench-app", artifact_location=(work / "mlruns").as_uri())
    with mlflow.start_run(experiment_id=experiment, run_name="bench-app-model") as run:
        mlflow.log_params({"architecture": "efficientnet_lite0", "image_size": size,
                           "weights_source": built.weights_source, "epochs": epochs,
                           "train_images": len(data), "protocol": "bench (TRAIN images only)"})
    client = MlflowClient()
    version = pyfunc.register_classifier(
        client, "wbc-classifier", run.info.run_id, weights, config,
        description=f"bench model for bench/bench_app.py: {len(data)} TRAIN images, {epochs} "
                    "epochs, not evaluated (not the champion of `dvc repro`)")
    client.set_registered_model_alias("wbc-classifier", "champion", version.version)
    return uri


def time_predict(folder: Path, uri: str, out: Path) -> tuple[float, float]:
    """(wall s of the whole command, classification s = n / its printed img/s)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "wbc_transfer.cli", "predict", str(folder), "-o",
                           str(out), "--tracking-uri", uri], capture_output=True, text=True,
                          check=True)
    wall = time.perf_counter() - started
    line = done.stderr.strip().splitlines()[-1]
    n, rate = re.search(r"(\d+) classified", line), re.search(r"([\d.]+) img/s", line)
    return wall, int(n[1]) / float(rate[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(uri: str, max_images: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "wbc_transfer.cli", "app", "--port", str(port),
                             "--tracking-uri", uri,
                             *(["--max-images", str(max_images)] if max_images > 2000 else [])])
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.3)
    proc.terminate()
    raise RuntimeError("the app did not start")


def classify_in_page(page, files: list[Path]) -> float:
    """Seconds from choosing the files to every row in the grid and the visible thumbnails
    decoded."""
    started = time.perf_counter()
    page.set_input_files("#files", [str(f) for f in files])
    page.click("#classify")
    page.wait_for_function(f"document.querySelectorAll('.card').length === {len(files)} && "
                           "document.body.dataset.batchState === 'done'", timeout=600_000,
                           polling=50)
    page.wait_for_function(  # thumbnails in (or near) the viewport: lazy ones further down wait
        "[...document.querySelectorAll('.card img.thumb')].filter(i => i.getBoundingClientRect()"
        ".top < innerHeight).every(i => i.complete && i.naturalWidth > 0)", timeout=600_000,
        polling=50)
    return time.perf_counter() - started


INTERACT_JS = """async () => {  // sort by confidence and filter "needs review", until painted
  const started = performance.now();
  for (const [id, change] of [["sort", s => { s.value = "confidence-asc"; }],
                              ["filter-review", c => { c.checked = true; }]]) {
    const control = document.getElementById(id);
    change(control);
    control.dispatchEvent(new Event("change"));
  }
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const ms = performance.now() - started;
  document.getElementById("sort").value = "index";
  document.getElementById("filter-review").checked = false;
  document.getElementById("sort").dispatchEvent(new Event("change"));
  const thumbs = [...document.querySelectorAll(".card img.thumb")];
  return {ms, thumbs: thumbs.length, loaded: thumbs.filter(i => i.complete && i.naturalWidth > 0).length};
}"""


def reset(page) -> None:
    page.evaluate("document.body.dataset.batchState = ''")


def screenshots(page, files: list[Path], grid: Path, detail: Path) -> list[int]:
    """The page with `files` classified, the review threshold at 0.9 and the first cell
    corrected to its true class (the TEST folder it came from), full page; then that cell's
    detail with its Grad-CAM. Each shrunk to a palette PNG."""
    reset(page)
    classify_in_page(page, files)
    page.fill("#threshold", "0.9")
    page.dispatch_event("#threshold", "input")
    page.locator(".card:not(.error)").first.click()
    page.wait_for_function("document.getElementById('cam').complete && "
                           "document.getElementById('cam').naturalWidth > 0")
    with page.expect_response(lambda r: "/label" in r.url):
        page.select_option("#correct", files[0].name.split("-")[0])
    page.locator("#detail").screenshot(path=str(detail.with_suffix(".raw.png")))
    page.click("#detail .close")
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(grid.with_suffix(".raw.png")), full_page=True)
    return [shrink(grid.with_suffix(".raw.png"), grid), shrink(detail.with_suffix(".raw.png"), detail)]


def shrink(raw: Path, target: Path) -> int:
    """A palette PNG of `raw` under MAX_SHOT_BYTES (fewer colours until it fits); its size."""
    from PIL import Image

    image = Image.open(raw).convert("RGB")
    for colours in (256, 128, 64):
        image.quantize(colours, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
        if target.stat().st_size < MAX_SHOT_BYTES:
            break
    raw.unlink()
    return target.stat().st_size


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-per-class", type=int, default=150)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--shot", type=int, default=24, help="TEST images in the screenshot")
    p.add_argument("--no-screenshot", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "app.json")
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    work = Path(tempfile.mkdtemp(prefix="bench-app-"))
    try:
        uri = fit_and_register(work, args.train_per_class, args.epochs, args.size)
        folder = work / "cells"
        folder.mkdir()
        images = [Path(shutil.copyfile(f, folder / f"{f.parent.name}-{f.name}"))
                  for f in pick("TEST", args.images // len(CLASSES))]
        predict = [time_predict(folder, uri, work / "predictions.csv") for _ in range(args.repeats)]
        proc, url = start_app(uri, max(len(images), args.shot))
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(url)
                page.wait_for_selector("#model option", state="attached")
                cold = classify_in_page(page, images)  # loads the model
                warm = []
                for _ in range(args.repeats):
                    reset(page)
                    warm.append(classify_in_page(page, images))
                interaction = page.evaluate(INTERACT_JS)
                shot = None
                if not args.no_screenshot:
                    files = [f for c in CLASSES for f in sorted(folder.glob(f"{c}-*"))[:args.shot // 4]]
                    shot = screenshots(page, files, REPO / "docs" / "app.png",
                                       REPO / "docs" / "app-gradcam.png")
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best_wall = min(w for w, _ in predict)
    best_classify = min(c for _, c in predict)
    result = {"images": len(images), "size": args.size, "repeats": args.repeats,
              "threads": os.environ.get("OMP_NUM_THREADS", "default"),
              "predict_wall_s": [round(w, 2) for w, _ in predict],
              "predict_classify_s": [round(c, 2) for _, c in predict],
              "app_warm_s": [round(w, 2) for w in warm], "app_cold_s": round(cold, 2),
              "ratio_warm_vs_predict_classify": round(min(warm) / best_classify, 2),
              "ratio_cold_vs_predict_wall": round(cold / best_wall, 2),
              "sort_and_filter_ms": round(interaction["ms"], 1),
              "thumbnails_loaded": f"{interaction['loaded']} of {interaction['thumbs']}",
              "screenshot_bytes": shot}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
