"""The registered champion behind a real `mlflow models serve` answers like the command line."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from champion_helpers import (
    CLASSES,
    MODEL_URI,
    encode_png,
    exif_jpeg,
    png16_rgb,
    real_images,
    register_tiny_champion,
    sixteen_bit_of,
    stored_pixels,
)
from PIL import Image

from wbc_transfer.cli import main

from conftest import free_port

PROB_COLUMNS = [f"p_{c}" for c in CLASSES]
STARTUP_TIMEOUT_S = 150



def mlflow_executable() -> str:
    local = Path(sys.executable).with_name("mlflow")
    found = str(local) if local.exists() else shutil.which("mlflow")
    if not found:
        pytest.skip("the `mlflow` command is not installed next to this Python")
    return found


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    return register_tiny_champion(tmp_path_factory.mktemp("champion"))


@pytest.fixture(scope="module")
def server(champion, tmp_path_factory):
    """`mlflow models serve -m models:/wbc-classifier@champion --env-manager local` on a free
    loopback port; yields its base URL; the process group is stopped afterwards."""
    port = free_port()
    log_file = tmp_path_factory.mktemp("serve") / "serve.log"
    # mlflow starts `uvicorn` through bash: it must be on PATH even when the venv is not active
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion.tracking_uri,
           "MLFLOW_REGISTRY_URI": champion.tracking_uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(
            [mlflow_executable(), "models", "serve", "-m", MODEL_URI, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited ({proc.returncode}):\n"
                            + log_file.read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /ping answer in {STARTUP_TIMEOUT_S}s:\n"
                            + log_file.read_text()[-3000:])
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)


def invoke(url: str, images: list[bytes], params: dict | None = None) -> list[dict]:
    return invoke_text(url, [base64.b64encode(b).decode("ascii") for b in images], params)


def invoke_text(url: str, cells: list, params: dict | None = None) -> list[dict]:
    """POST one `dataframe_split` batch whose image cells are sent as given (base64 text)."""
    payload = {"dataframe_split": {"columns": ["image"], "data": [[c] for c in cells]}}
    if params:
        payload["params"] = params
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())["predictions"]


def cli_rows(files: list[Path], tracking_uri: str, capsys, *extra: str) -> list[dict]:
    code = main(["predict", *map(str, files), "--tracking-uri", tracking_uri, "-q", *extra])
    out = capsys.readouterr().out
    assert code == 0
    return list(csv.DictReader(io.StringIO(out)))


@pytest.mark.slow
def test_served_champion_matches_the_cli(mirror, champion, server, tmp_path, capsys):
    files = real_images(mirror, tmp_path / "cells")
    served = invoke(server, [f.read_bytes() for f in files] + [b"definitely not an image"])
    assert len(served) == len(files) + 1
    cli = cli_rows(files, champion.tracking_uri, capsys)
    for http, row in zip(served, cli, strict=False):
        assert http["error"] == "" and http["predicted"] == row["predicted"] in CLASSES
        assert sum(http[c] for c in PROB_COLUMNS) == pytest.approx(1.0, abs=1e-5)
        for c in PROB_COLUMNS:  # 1e-4: the LAB input layer's float32 sums differ by batch (1.2e-5 seen)
            assert http[c] == pytest.approx(float(row[c]), abs=1e-4)
    bad = served[-1]
    assert "not an image" in bad["error"] and bad["predicted"] is None
    assert all(bad[c] is None for c in PROB_COLUMNS)

    # test-time augmentation as a request parameter, same numbers as `--tta`
    served_tta = invoke(server, [f.read_bytes() for f in files[:2]], {"tta": True})
    cli_tta = cli_rows(files[:2], champion.tracking_uri, capsys, "--tta")
    for http, row in zip(served_tta, cli_tta, strict=True):
        for c in PROB_COLUMNS:
            assert http[c] == pytest.approx(float(row[c]), abs=1e-4)


@pytest.mark.slow
def test_served_champion_applies_exif_orientation_and_scales_16_bit(mirror, server, tmp_path):
    """Issue 12: over HTTP too, an EXIF-rotated JPEG is read upright and a 16-bit RGB PNG is
    scaled to 8 bits, each with its note: the answers equal those of the plain images."""
    rgb = np.array(Image.open(real_images(mirror, tmp_path / "cells", per_class=1)[0]))
    phone = exif_jpeg(Image.fromarray(rgb), 6)
    upright = encode_png(Image.fromarray(np.rot90(stored_pixels(phone), -1)))
    exif6, straight, sixteen, plain = invoke(server, [
        phone, upright, png16_rgb(sixteen_bit_of(rgb)), encode_png(Image.fromarray(rgb))])
    assert exif6["note"] == "EXIF orientation 6 applied (turned 90° clockwise)"
    assert sixteen["note"] == "16-bit RGB reduced to 8 bits per channel (high byte, i.e. value/256)"
    assert straight["note"] == plain["note"] == ""
    for odd, twin in ((exif6, straight), (sixteen, plain)):
        assert odd["error"] == "" and odd["predicted"] == twin["predicted"]
        for c in PROB_COLUMNS:
            assert odd[c] == pytest.approx(twin[c], abs=1e-6)


@pytest.mark.slow
def test_a_bad_base64_row_gets_its_error_and_the_others_are_classified(mirror, champion, server,
                                                                       tmp_path, capsys):
    """One invalid row used to answer 400 for the whole batch, naming no row."""
    files = real_images(mirror, tmp_path / "cells", per_class=1)[:3]
    good = [base64.b64encode(f.read_bytes()).decode("ascii") for f in files]
    cells = [good[0], "this is not base64!", good[1], good[2][:-3], None,
             base64.encodebytes(files[2].read_bytes()).decode("ascii")]  # MIME line breaks: fine
    served = invoke_text(server, cells)
    assert len(served) == len(cells)
    cli = cli_rows([files[0], files[1], files[2]], champion.tracking_uri, capsys)
    for http, row in zip([served[0], served[2], served[5]], cli, strict=True):
        assert http["error"] == "" and http["predicted"] == row["predicted"] in CLASSES
        for c in PROB_COLUMNS:
            assert http[c] == pytest.approx(float(row[c]), abs=1e-5)
    for bad, reason in ((served[1], "not valid base64"), (served[3], "not valid base64"),
                        (served[4], "no image data")):
        assert reason in bad["error"] and bad["predicted"] is None
        assert all(bad[c] is None for c in PROB_COLUMNS)


@pytest.mark.slow
def test_the_http_answer_carries_the_review_flag(mirror, champion, server, tmp_path, capsys):
    """Issue 14: `review_below` as a request parameter flags exactly the rows whose calibrated
    confidence is below it, as `--review-below` does on the command line."""
    files = real_images(mirror, tmp_path / "cells")
    plain = invoke(server, [f.read_bytes() for f in files])
    assert all(row["review"] is False for row in plain)  # nothing flagged by default
    threshold = float(np.median([row["confidence"] for row in plain]))
    served = invoke(server, [f.read_bytes() for f in files] + [b"not an image"],
                    {"review_below": threshold})
    cli = cli_rows(files, champion.tracking_uri, capsys, "--review-below", str(threshold))
    for http, row in zip(served, cli, strict=False):
        assert http["review"] is (http["confidence"] < threshold)
        assert str(http["review"]) == row["review"]
    assert 0 < sum(row["review"] for row in served[:-1]) < len(files)
    assert served[-1]["error"] and served[-1]["review"] is None
