"""`wbc-transfer predict` and the pyfunc's preprocessing, with a tiny registered champion."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from champion_helpers import (
    CLASSES,
    MODEL_URI,
    bad_and_odd_files,
    encode_png,
    exif_jpeg,
    png16_rgb,
    png_with_size,
    real_images,
    register_tiny_champion,
    sixteen_bit_of,
    stored_pixels,
    tiny_weights,
)
from PIL import Image

from wbc_transfer.cli import main
from wbc_transfer.data import images as decoder
from wbc_transfer.serving import pyfunc

PROB_COLUMNS = [f"p_{c}" for c in CLASSES]


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    return register_tiny_champion(tmp_path_factory.mktemp("champion"))


@pytest.fixture(scope="module")
def images(mirror, tmp_path_factory):
    return real_images(mirror, tmp_path_factory.mktemp("images") / "cells")


def run_cli(args, capsys):
    code = main(["predict", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_rows(text: str, fmt: str) -> list[dict]:
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(text)))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- preprocessing (no model) ----------------------------------------------------------------


def test_decode_converts_safe_modes_and_says_so(images):
    rgb = Image.open(images[0]).convert("RGB")
    tensor, note = decoder.decode(images[0].read_bytes())
    assert tensor.shape == (3, rgb.height, rgb.width) and note == ""
    for mode, expect in (("L", "converted L to RGB"), ("RGBA", "alpha dropped"),
                         ("P", "converted P to RGB"), ("CMYK", "converted CMYK to RGB")):
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        buffer = io.BytesIO()
        rgb.convert(mode).save(buffer, format=fmt)
        tensor, note = decoder.decode(buffer.getvalue())
        assert tensor.shape == (3, rgb.height, rgb.width), mode
        assert expect in note, (mode, note)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"GIF89a but not really", "unreadable|not an image"),
    (b"hello world", "not an image"),
    (png_with_size(20_001, 10), "too large"),
    (png_with_size(10_000, 10_000), "decompression bomb"),
])
def test_decode_refuses_bad_input(data, reason):
    with pytest.raises(decoder.ImageError, match=reason):
        decoder.decode(data)


# --- the command line --------------------------------------------------------------------------


def test_predict_folder_csv(champion, images, capsys):
    folder = images[0].parent.parent
    code, out, err = run_cli([str(folder), "--tracking-uri", champion.tracking_uri,
                              "--batch-size", "3"], capsys)
    assert code == 0, err
    rows = read_rows(out, "csv")
    assert [r["path"] for r in rows] == [str(p) for p in images]  # recursive, sorted
    assert list(rows[0]) == ["path", "predicted", "confidence", *PROB_COLUMNS, "review", "note",
                             "error"]
    for row in rows:
        probs = [float(row[c]) for c in PROB_COLUMNS]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert row["predicted"] in CLASSES and row["error"] == ""
        assert float(row["confidence"]) == pytest.approx(max(probs))
    assert len({r["predicted"] for r in rows} | {r["p_EOSINOPHIL"] for r in rows}) > 2, \
        "the tiny model should not answer every image alike"
    assert "8 classified, 0 failed" in err


def test_bad_inputs_get_error_rows_and_do_not_stop_the_batch(champion, images, tmp_path, capsys):
    bad = bad_and_odd_files(images[0], tmp_path / "odd")
    good = images[:3]
    inputs = [str(good[0]), *[str(f) for f in bad.values()], str(tmp_path / "missing.jpeg"),
              str(tmp_path / "nothing-*.png"), str(good[1]), str(good[2])]
    output = tmp_path / "out.jsonl"
    code, out, err = run_cli([*inputs, "--tracking-uri", champion.tracking_uri,
                              "--output", str(output), "--batch-size", "4"], capsys)
    assert code == 0, err
    assert out == ""
    rows = {r["path"]: r for r in read_rows(output.read_text(), "jsonl")}
    assert list(rows) == inputs  # one row per input, in order
    errors = {name: rows[str(f)]["error"] for name, f in bad.items()}
    assert "empty" in errors["empty"]
    assert "unreadable" in errors["truncated"] and "truncated" in errors["truncated"]
    assert "not an image" in errors["text"]
    assert "too large" in errors["huge_side"]
    assert "decompression bomb" in errors["bomb"]
    assert rows[str(tmp_path / "missing.jpeg")]["error"] == "file not found"
    assert rows[str(tmp_path / "nothing-*.png")]["error"] == "no file matches this pattern"
    for name, note in (("gray", "converted L to RGB"), ("rgba", "alpha dropped"),
                       ("i16", "converted I;16 to RGB (scaled /257")):
        row = rows[str(bad[name])]
        assert row["error"] == "" and note in row["note"], row
        assert sum(row[c] for c in PROB_COLUMNS) == pytest.approx(1.0, abs=1e-5)
    for failed in ("empty", "truncated", "text", "huge_side", "bomb"):
        row = rows[str(bad[failed])]
        assert row["predicted"] is None and all(row[c] is None for c in PROB_COLUMNS)
    for path in good:
        assert rows[str(path)]["error"] == "" and rows[str(path)]["predicted"] in CLASSES
    # the 16-bit and grayscale versions of the same picture get the same answer
    assert rows[str(bad["i16"])]["p_MONOCYTE"] == pytest.approx(
        rows[str(bad["gray"])]["p_MONOCYTE"], abs=1e-6)
    assert "6 classified, 7 failed" in err


def test_glob_and_formats_agree(champion, images, capsys):
    pattern = str(images[0].parent.parent / "**" / "*.jpeg")
    code, out_jsonl, err = run_cli([pattern, "--tracking-uri", champion.tracking_uri,
                                    "--format", "jsonl", "-q"], capsys)
    assert code == 0, err
    assert err == ""  # --quiet
    jsonl = read_rows(out_jsonl, "jsonl")
    _, out_csv, _ = run_cli([str(p) for p in images] + ["--tracking-uri",
                            champion.tracking_uri, "-q"], capsys)
    rows = read_rows(out_csv, "csv")
    assert len(jsonl) == len(rows) == len(images)
    for a, b in zip(sorted(jsonl, key=lambda r: r["path"]), sorted(rows, key=lambda r: r["path"]),
                    strict=True):
        assert a["predicted"] == b["predicted"]
        for c in PROB_COLUMNS:
            assert a[c] == pytest.approx(float(b[c]), abs=1e-9)


def test_tta_is_the_average_with_the_mirrored_image(champion, images, tmp_path, capsys):
    image = Image.open(images[0]).convert("RGB")
    plain, mirrored = tmp_path / "plain.png", tmp_path / "mirrored.png"
    plain.write_bytes(encode_png(image))
    mirrored.write_bytes(encode_png(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    args = ["--tracking-uri", champion.tracking_uri, "--format", "jsonl", "-q"]
    _, out, _ = run_cli([str(plain), str(mirrored), *args], capsys)
    a, b = read_rows(out, "jsonl")
    _, out, _ = run_cli([str(plain), "--tta", *args], capsys)
    (t,) = read_rows(out, "jsonl")
    for c in PROB_COLUMNS:
        assert t[c] == pytest.approx((a[c] + b[c]) / 2, abs=1e-5)


def test_odd_but_valid_files_are_read_as_every_stage_reads_them(champion, images, tmp_path,
                                                                capsys):
    """Issue 12: EXIF orientation applied, 16-bit RGB scaled (both noted), a Latin-1 file name
    written as valid UTF-8, hidden folders skipped: the rows match their plain equivalents."""
    rgb = np.array(Image.open(images[0]).convert("RGB"))
    folder = tmp_path / "odd"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    phone = exif_jpeg(Image.fromarray(rgb), 6)
    files = {
        "plain": folder / "plain.png", "upright": folder / "upright.png",
        "exif6": folder / "exif6.jpeg", "sixteen": folder / "sixteen.png",
        "tiff": folder / "tiff.tif",
    }
    files["plain"].write_bytes(encode_png(Image.fromarray(rgb)))
    files["upright"].write_bytes(encode_png(Image.fromarray(np.rot90(stored_pixels(phone), -1))))
    files["exif6"].write_bytes(phone)
    files["sixteen"].write_bytes(png16_rgb(sixteen_bit_of(rgb)))
    Image.fromarray(rgb).save(files["tiff"], format="TIFF")
    (folder / ".ipynb_checkpoints" / "plain-checkpoint.png").write_bytes(b"not data")
    latin1 = os.fsencode(folder) + b"/caf\xe9.png"
    with open(latin1, "wb") as f:
        f.write(files["plain"].read_bytes())
    output = tmp_path / "out.csv"
    code, _, err = run_cli([str(folder), "--tracking-uri", champion.tracking_uri,
                            "-o", str(output), "-q"], capsys)
    assert code == 0, err
    rows = {r["path"]: r for r in read_rows(output.read_bytes().decode("utf-8"), "csv")}
    latin1_text = str(folder) + "/caf\\xe9.png"  # a backslash, x, e, 9
    assert sorted(rows) == sorted([latin1_text, *map(str, files.values())])  # no checkpoint
    by_name = {name: rows[str(f)] for name, f in files.items()} | {"latin1": rows[latin1_text]}
    assert by_name["exif6"]["note"] == "EXIF orientation 6 applied (turned 90° clockwise)"
    assert by_name["sixteen"]["note"] == ("16-bit RGB reduced to 8 bits per channel "
                                          "(high byte, i.e. value/256)")
    for name, twin in (("exif6", "upright"), ("sixteen", "plain"), ("tiff", "plain"),
                       ("latin1", "plain")):
        assert by_name[name]["error"] == "", name
        for c in PROB_COLUMNS:
            assert float(by_name[name][c]) == pytest.approx(float(by_name[twin][c]), abs=1e-6)
    assert by_name["plain"]["note"] == by_name["tiff"]["note"] == by_name["latin1"]["note"] == ""


def test_missing_alias_or_store_is_one_clear_message(champion, images, tmp_path, capsys):
    code, out, err = run_cli([str(images[0]), "--tracking-uri", champion.tracking_uri,
                              "--model", "models:/wbc-classifier@nope"], capsys)
    assert code == 2 and out == ""
    assert "cannot load models:/wbc-classifier@nope" in err and "make repro" in err
    assert "Traceback" not in err
    missing_db = f"sqlite:///{tmp_path / 'absent.db'}"
    code, _, err = run_cli([str(images[0]), "--tracking-uri", missing_db], capsys)
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "absent.db").exists()


def test_fresh_clone_names_the_command_that_makes_a_champion(images, tmp_path, capsys,
                                                             monkeypatch):
    """A clone before any run: params.yaml, no mlflow.db. The message names `make repro` /
    `dvc repro`, and nothing is created."""
    import shutil

    from conftest import REPO_ROOT

    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copyfile(REPO_ROOT / "params.yaml", clone / "params.yaml")
    monkeypatch.chdir(clone)
    code, out, err = run_cli([str(images[0])], capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    assert "no champion yet" in err and "make repro" in err and "dvc repro" in err, err
    assert sorted(p.name for p in clone.iterdir()) == ["params.yaml"]


def test_a_local_model_folder_needs_no_tracking_store(champion, images, tmp_path, capsys,
                                                     monkeypatch):
    """`--model <folder>` (a downloaded champion) classifies in a clone with no mlflow.db and
    leaves none behind (MLflow would look the folder's logged-model id up in the store)."""
    import shutil

    import mlflow

    from conftest import REPO_ROOT

    mlflow.set_tracking_uri(champion.tracking_uri)
    folder = mlflow.artifacts.download_artifacts(artifact_uri=MODEL_URI,
                                                 dst_path=str(tmp_path / "model"))
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copyfile(REPO_ROOT / "params.yaml", clone / "params.yaml")
    monkeypatch.chdir(clone)
    code, out, err = run_cli([str(images[0]), "--model", folder], capsys)
    assert code == 0, err
    rows = read_rows(out, "csv")
    assert len(rows) == 1 and rows[0]["predicted"] in CLASSES and rows[0]["error"] == ""
    assert sorted(p.name for p in clone.iterdir()) == ["params.yaml"]
    code, _, err = run_cli([str(images[0]), "--model", str(tmp_path)], capsys)
    assert code == 2 and "no MLmodel file" in err


def test_registration_is_idempotent_per_run(champion):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(champion.tracking_uri)
    mlflow.set_registry_uri(champion.tracking_uri)
    first = pyfunc.ensure_classifier(champion.run_id, champion.weights, champion.config)
    again = pyfunc.ensure_classifier(champion.run_id, champion.weights, champion.config)
    assert first == again  # logged once, reused
    version = MlflowClient().get_model_version_by_alias("wbc-classifier", "champion")
    assert pyfunc.is_classifier_version(version) and version.run_id == champion.run_id
    info = mlflow.models.get_model_info(MODEL_URI)
    assert info.metadata[pyfunc.MARKER_KEY] == pyfunc.FORMAT_VERSION
    conf = info.flavors["python_function"]
    assert conf["model_code_path"].endswith("pyfunc_model.py")  # models from code, no pickle
    assert set(conf["artifacts"]) == {"weights", "config"}


def test_the_pyfunc_decodes_base64_row_by_row(champion, images):
    """The real pyfunc (as `mlflow models serve` loads it): a bad base64 row gets its `error`,
    the other rows are classified exactly as from raw bytes."""
    import base64

    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(champion.tracking_uri)
    model = mlflow.pyfunc.load_model(MODEL_URI)
    assert model.metadata.get_input_schema().input_types()[0].name == "string"
    raw = [f.read_bytes() for f in images[:2]]
    text = [base64.b64encode(b).decode("ascii") for b in raw]
    out = model.predict(pd.DataFrame({"image": [text[0], "%%% not base64 %%%", text[1]]}))
    expected = model.predict(pd.DataFrame({"image": raw}))
    assert out["error"].tolist()[0::2] == ["", ""]
    assert "string input is not valid base64" in out["error"][1] and out["predicted"][1] is None
    for c in PROB_COLUMNS:
        assert out[c][0::2].tolist() == pytest.approx(expected[c].tolist(), abs=1e-6)


def test_files_skipped_for_their_suffix_are_counted_and_named(champion, images, tmp_path, capsys):
    """A phone's `.heic` and a `.txt` in a folder: skipped (not an image suffix), and the
    summary says how many and which (it counted only what it classified)."""
    import shutil

    folder = tmp_path / "phone"
    folder.mkdir()
    shutil.copyfile(images[0], folder / images[0].name)
    (folder / "IMG_0001.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (folder / "notes.txt").write_text("cells of Monday\n")
    code, out, err = run_cli([str(folder), "--tracking-uri", champion.tracking_uri], capsys)
    assert code == 0 and len(read_rows(out, "csv")) == 1
    assert (f"1 classified, 0 failed, 2 skipped (not an image file suffix: "
            f"{folder / 'IMG_0001.heic'}, {folder / 'notes.txt'})") in err
    code, _, err = run_cli([str(folder / "notes.txt"), str(tmp_path / "none"), "--tracking-uri",
                            champion.tracking_uri], capsys)
    assert "skipped" not in err  # named files are tried, whatever their suffix


def test_a_whole_smear_field_is_classified_with_a_note(champion, images, tmp_path, capsys):
    """A photo far larger than a cell crop (here 1400 x 1050, a phone's field of view would be
    6000 x 5000) went through predict and HTTP as if it were one cell, with no note."""
    import base64

    import mlflow
    import pandas as pd

    folder = tmp_path / "fields"
    folder.mkdir()
    field = folder / "field.png"
    Image.open(images[0]).convert("RGB").resize((1400, 1050)).save(field)
    code, out, err = run_cli([str(folder), str(images[1]), "--tracking-uri",
                              champion.tracking_uri], capsys)
    assert code == 0, err
    rows = {r["path"]: r for r in read_rows(out, "csv")}
    note = rows[str(field)]["note"]
    assert note.startswith("large image 1400x1050 px") and "smear field" in note
    assert rows[str(field)]["predicted"] in CLASSES and rows[str(images[1])]["note"] == ""
    # the pyfunc `mlflow models serve` runs, fed as over HTTP (base64 strings)
    mlflow.set_tracking_uri(champion.tracking_uri)
    model = mlflow.pyfunc.load_model(MODEL_URI)
    text = [base64.b64encode(f.read_bytes()).decode("ascii") for f in (field, images[1])]
    served = model.predict(pd.DataFrame({"image": text}))
    assert served["note"].tolist() == [note, ""]


PRE_LAYOUT_CODE = Path(__file__).with_name("data") / "pyfunc_model_pre_layout.py"


def test_pyfunc_code_of_earlier_versions_still_loads(tmp_path, monkeypatch):
    """Model versions registered before the package layout carry their own `pyfunc_model.py`,
    which imports `Classifier` and `input_values` from `wbc_transfer.serving`: a model logged
    with that very file loads and predicts with the current package."""
    import ast

    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from wbc_transfer import serving

    imported = {(node.module, alias.name) for node in ast.walk(ast.parse(PRE_LAYOUT_CODE.read_text()))
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("wbc_transfer")
                for alias in node.names}
    assert imported == {("wbc_transfer.serving", "Classifier"), ("wbc_transfer.serving", "input_values")}
    assert all(hasattr(serving, name) for _, name in imported)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("old", artifact_location=(tmp_path / "mlruns").as_uri())
    config = tiny_weights(tmp_path / "model.pt")
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    monkeypatch.setattr(pyfunc, "CODE_FILE", PRE_LAYOUT_CODE)  # logged as before the layout
    version = pyfunc.register_classifier(MlflowClient(), "wbc-classifier", run.info.run_id,
                                         tmp_path / "model.pt", config)
    model = mlflow.pyfunc.load_model(f"models:/wbc-classifier/{version.version}")
    code = Path(model.metadata.flavors["python_function"]["model_code_path"])
    assert "package layout" in code.read_text()  # the logged file is the old one
    out = model.predict(pd.DataFrame({"image": [encode_png(Image.new("RGB", (80, 80), (180, 90, 160)))]}))
    assert out["error"].tolist() == [""] and out["predicted"][0] in CLASSES
    assert sum(out[c][0] for c in PROB_COLUMNS) == pytest.approx(1.0, abs=1e-5)
