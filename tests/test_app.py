"""`wbc-transfer app`: the page in a real headless Chromium, and its routes in-process.

The model is the tiny registered champion of `champion_helpers` (real MLflow SQLite registry,
real pyfunc); evaluation figures and a review threshold are logged into its run the way the
`evaluate` stage logs them, so the model card has something to read. The browser is Debian's
Chromium (`/usr/bin/chromium`, installed by .ci/run) driven by Playwright.
"""

from __future__ import annotations

import csv
import io
import threading
import time
import zipfile
from pathlib import Path

import pytest
from champion_helpers import CLASSES, MODEL_NAME, MODEL_URI, real_images, register_tiny_champion

from wbc_transfer.app.limits import Limits
from wbc_transfer.cli import main
from wbc_transfer.serving.predict import columns

from conftest import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# (cards are `content-visibility: auto`: their innerText may be empty while off screen, so the
# test reads textContent)
# what `evaluate` logs into a run (`<set>_<metric>`, `<set>_<metric>_ci_low/high`), made up here
RUN_METRICS = {
    "validation_accuracy": 0.81, "validation_accuracy_ci_low": 0.74,
    "validation_accuracy_ci_high": 0.87, "validation_f1_macro": 0.805,
    "validation_f1_macro_ci_low": 0.731, "validation_f1_macro_ci_high": 0.866,
    "validation_n_cells": 59,
    "TEST_accuracy": 0.852, "TEST_accuracy_ci_low": 0.722, "TEST_accuracy_ci_high": 0.946,
    "TEST_f1_macro": 0.8523, "TEST_f1_macro_ci_low": 0.701, "TEST_f1_macro_ci_high": 0.94,
    "TEST_n_cells": 72,
    "tecom_accuracy": 0.35, "tecom_f1_macro": 0.342, "tecom_f1_macro_ci_low": 0.292,
    "tecom_f1_macro_ci_high": 0.391, "tecom_n_cells": 299,
    "val_f1_macro": 0.79,  # a per-epoch training curve, not a set
    "temperature": 1.16,  # train: fitted on the validation cells
    "review_threshold": 0.9,
}


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    from mlflow import MlflowClient

    found = register_tiny_champion(tmp_path_factory.mktemp("champion"))
    client = MlflowClient(tracking_uri=found.tracking_uri, registry_uri=found.tracking_uri)
    for key, value in RUN_METRICS.items():
        client.log_metric(found.run_id, key, value)
    client.set_registered_model_alias(MODEL_NAME, "lab-pbc", found.version)
    yield found
    client.delete_registered_model_alias(MODEL_NAME, "lab-pbc")


@pytest.fixture(scope="module")
def cells(mirror, tmp_path_factory) -> list[Path]:
    """Four real TEST images (one per class) and a truncated JPEG, in that order."""
    folder = tmp_path_factory.mktemp("cells")
    files = real_images(mirror, folder / "cells", per_class=1)
    broken = folder / "broken.jpeg"
    broken.write_bytes(files[0].read_bytes()[:700])
    return [*files, broken]


def client_for(champion, limits: Limits | None = None):
    from fastapi.testclient import TestClient

    from wbc_transfer.app.server import create_app

    return TestClient(create_app(MODEL_URI, champion.tracking_uri, limits))


def upload(client, files: list[tuple[str, bytes]], review_below: float = 0.0):
    return client.post("/api/batches", data={"model": MODEL_URI, "review_below": str(review_below)},
                       files=[("files", (name, data, "application/octet-stream"))
                              for name, data in files])


def finished(client, batch_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = client.get(f"/api/batches/{batch_id}").json()
        if state["state"] in ("done", "failed"):
            return state
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} not finished in {timeout_s} s")


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


# --- the model card and the model list ----------------------------------------------------------


def test_model_list_and_card_are_read_from_the_registry_and_run(champion):
    with client_for(champion) as client:
        choices = client.get("/api/models").json()["choices"]
        card = client.get("/api/card", params={"uri": MODEL_URI}).json()
        missing = client.get("/api/card", params={"uri": f"models:/{MODEL_NAME}@nobody"})
    # the store is shared with other test modules (tests/champion_helpers.py), which may have
    # registered more versions and aliases: the champion first, aliases before versions
    uris = [c["uri"] for c in choices]
    assert uris[0] == MODEL_URI
    assert {f"models:/{MODEL_NAME}@lab-pbc", f"models:/{MODEL_NAME}/{champion.version}"} <= set(uris)
    kinds = ["@" in u for u in uris]
    assert kinds == sorted(kinds, reverse=True)
    assert card["version"] == champion.version and card["aliases"][:2] == ["champion", "lab-pbc"]
    assert card["trained_on"]["architecture"] == "efficientnet_lite0"
    assert card["trained_on"]["temperature"] == "1.16"
    assert card["review_threshold"] == pytest.approx(0.9)
    figures = {f["set"]: f for f in card["figures"]}
    assert list(figures) == ["validation", "TEST", "tecom"]  # val_f1_macro is no set
    assert [figures[s]["kind"] for s in figures] == ["validation", "test", "external"]
    assert figures["TEST"]["f1_macro"] == pytest.approx(0.8523)
    assert figures["TEST"]["f1_macro_ci"] == pytest.approx([0.701, 0.94])
    assert figures["tecom"]["accuracy_ci"] is None  # not logged: not made up
    assert missing.status_code == 404 and "nobody" in missing.json()["detail"]


# --- rows, limits, zips ----------------------------------------------------------------------


def test_rows_are_those_of_predict_with_corrected_label(champion, cells, tmp_path, capsys):
    with client_for(champion) as client:
        answer = upload(client, [(f.name, f.read_bytes()) for f in cells], review_below=0.6)
        assert answer.status_code == 201, answer.text
        batch = answer.json()["id"]
        state = finished(client, batch)
        assert state["state"] == "done" and state["done"] == len(cells)
        assert client.put(f"/api/batches/{batch}/rows/1/label",
                          json={"label": "MONOCYTE"}).status_code == 200
        bad_label = client.put(f"/api/batches/{batch}/rows/0/label", json={"label": "BASOPHIL"})
        error_row = client.put(f"/api/batches/{batch}/rows/4/label", json={"label": "MONOCYTE"})
        app_rows = read_csv(client.get(f"/api/batches/{batch}/predictions.csv").text)
        reflagged = read_csv(client.get(f"/api/batches/{batch}/predictions.csv",
                                        params={"review_below": 1.0}).text)
    assert bad_label.status_code == 400 and "BASOPHIL" in bad_label.json()["detail"]
    assert error_row.status_code == 400 and "no image" in error_row.json()["detail"]
    out = tmp_path / "predict.csv"
    assert main(["predict", *map(str, cells), "-o", str(out), "--review-below", "0.6",
                 "--tracking-uri", champion.tracking_uri, "-q"]) == 0
    cli_rows = read_csv(out.read_text())
    assert list(app_rows[0]) == [*columns(CLASSES), "corrected_label"]
    assert [r["corrected_label"] for r in app_rows] == ["", "MONOCYTE", "", "", ""]
    assert app_rows[4]["error"].startswith("unreadable image")
    for app_row, cli_row in zip(app_rows, cli_rows, strict=True):
        assert app_row.pop("path") == Path(cli_row.pop("path")).name
        app_row.pop("corrected_label")
        assert app_row == cli_row
    assert {r["review"] for r in reflagged[:4]} == {"True"}  # every confidence is below 1.0


def test_further_columns_of_the_rows_are_kept_in_the_csv(champion, cells):
    """A model whose rows carry more columns (e.g. a prediction `set`) keeps them, after predict's
    columns and before corrected_label; rows without them are not required to have them."""
    with client_for(champion) as client:
        batch_id = upload(client, [(f.name, f.read_bytes()) for f in cells[:2]]).json()["id"]
        finished(client, batch_id)
        for row in client.app.state.store.get(batch_id).rows:  # as such a model would give them
            row["set"] = f"{{{row['predicted']}}}"
        rows = read_csv(client.get(f"/api/batches/{batch_id}/predictions.csv").text)
        outside = client.get(f"/api/batches/{batch_id}/thumbs/-1.jpeg")
    assert list(rows[0]) == [*columns(CLASSES), "set", "corrected_label"]
    assert [r["set"] for r in rows] == [f"{{{r['predicted']}}}" for r in rows]
    assert outside.status_code == 404


def test_upload_limits_refuse_with_the_option_named(champion, cells):
    data = [(f.name, f.read_bytes()) for f in cells[:3]]
    with client_for(champion, Limits(max_upload_bytes=10**6, max_images=2)) as client:
        too_many = upload(client, data)
    with client_for(champion, Limits(max_upload_bytes=5000, max_images=10)) as client:
        too_large = upload(client, data)
        nothing = client.post("/api/batches", data={"model": MODEL_URI})
        no_model = client.post("/api/batches", data={"model": f"models:/{MODEL_NAME}@nobody"},
                               files=[("files", ("a.jpeg", b"x", "image/jpeg"))])
    assert too_many.status_code == 413 and "too many images: 3" in too_many.json()["detail"]
    assert "--max-images" in too_many.json()["detail"]
    assert too_large.status_code == 413 and "--max-upload-mb" in too_large.json()["detail"]
    assert nothing.status_code == 400 and "no files" in nothing.json()["detail"]
    assert no_model.status_code == 404 and "nobody" in no_model.json()["detail"]


def test_zip_and_folder_rules_and_nothing_written_outside_the_temp_folder(champion, cells, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("lab/a/one.jpeg", cells[0].read_bytes())
        archive.writestr("../../escape.jpeg", cells[1].read_bytes())  # zip-slip names: ".." is
        archive.writestr(f"{tmp_path}/escape.jpeg", cells[1].read_bytes())  # hidden; absolute
        archive.writestr("lab/.hidden/two.jpeg", cells[2].read_bytes())
        archive.writestr("lab/readme.txt", "not an image")
        archive.writestr("lab/broken.png", b"\x89PNG broken")
    files = [("cells.zip", buffer.getvalue()), ("folder/notes.txt", b"skipped by the folder rule"),
             ("odd-name.bin", cells[3].read_bytes())]  # chosen by name: tried whatever the suffix
    with client_for(champion) as client:
        store = client.app.state.store
        answer = upload(client, files)
        assert answer.status_code == 201, answer.text
        state = finished(client, answer.json()["id"])
        written = [p for p in store.root.rglob("*") if p.is_file()]
    paths = [r["path"] for r in state["rows"]]
    assert paths == ["cells.zip/lab/a/one.jpeg", f"cells.zip/{tmp_path}/escape.jpeg",
                     "cells.zip/lab/broken.png", "odd-name.bin"]
    assert state["skipped"] == 4  # ../../escape.jpeg, .hidden/two.jpeg, readme.txt, notes.txt
    assert [bool(r["error"]) for r in state["rows"]] == [False, False, True, False]
    assert written and all(p.name[:5].isdigit() for p in written)  # stored by index only
    assert not (tmp_path / "escape.jpeg").exists() and not (tmp_path.parent / "escape.jpeg").exists()
    assert not store.root.exists()  # removed when the app stopped


def test_labelled_zip_is_a_folder_external_accepts(champion, cells, tmp_path):
    from wbc_transfer.data.external import scan_folder

    with client_for(champion) as client:
        batch = upload(client, [(f.name, f.read_bytes()) for f in cells]).json()["id"]
        rows = finished(client, batch)["rows"]
        empty = client.get(f"/api/batches/{batch}/labelled.zip")
        client.put(f"/api/batches/{batch}/rows/0/label", json={"label": rows[0]["predicted"]})
        client.put(f"/api/batches/{batch}/rows/2/label", json={"label": "LYMPHOCYTE"})
        client.put(f"/api/batches/{batch}/rows/3/label", json={"label": "LYMPHOCYTE"})
        client.put(f"/api/batches/{batch}/rows/3/label", json={"label": None})  # taken back
        archive = client.get(f"/api/batches/{batch}/labelled.zip")
    assert empty.status_code == 400 and "person" in empty.json()["detail"]
    folder = tmp_path / "mylab"
    zipfile.ZipFile(io.BytesIO(archive.content)).extractall(folder)
    records, problems = scan_folder(folder, CLASSES)
    assert problems == []
    assert sorted((r.path, r.label, r.ok) for r in records) == sorted([
        (f"{rows[0]['predicted']}/{cells[0].name}", rows[0]["predicted"], True),
        (f"LYMPHOCYTE/{cells[2].name}", "LYMPHOCYTE", True)])


def test_cli_refuses_a_missing_store(tmp_path, capsys):
    code = main(["app", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert main(["app", "--max-images", "0"]) == 2


# --- the page in a real browser ----------------------------------------------------------------



@pytest.fixture
def served(champion):
    """The app on a free loopback port (uvicorn in a thread of this process)."""
    import uvicorn

    from wbc_transfer.app.server import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(MODEL_URI, champion.tracking_uri),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: apt-get install chromium (.ci/run does)")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.mark.slow
def test_page_in_a_browser_classify_explain_correct_download(served, browser, cells, tmp_path):
    good, broken = [cells[0], cells[1]], cells[4]
    page = browser.new_page(accept_downloads=True)
    page.goto(served)
    page.wait_for_selector("#model option", state="attached")
    assert page.locator("#model option").first.inner_text() == "champion (version 1)"
    page.wait_for_selector("table.figures")
    assert "0.852 [0.701, 0.940]" in page.inner_text("table.figures")  # TEST macro-F1 of the run
    assert page.inner_text("#threshold-value") == "0.90"  # the run's review threshold

    page.set_input_files("#files", [str(f) for f in [*good, broken]])
    page.click("#classify")
    page.wait_for_selector("body[data-batch-state=done]", timeout=60_000)
    assert page.locator(".card:not(.error)").count() == 2
    assert page.locator(".card.error").count() == 1
    assert "unreadable image" in page.text_content(".card.error")
    assert page.inner_text("#progress-text").startswith("3 / 3 classified")
    # every thumbnail arrived and decoded
    page.wait_for_function("[...document.querySelectorAll('.card img.thumb')]"
                           ".every(i => i.complete && i.naturalWidth === 64)")

    # review: flags follow the threshold slider; the filter shows only those
    confidences = [float(t) for t in page.locator(".card:not(.error) .conf").all_text_contents()]
    page.fill("#threshold", "1")
    page.dispatch_event("#threshold", "input")
    assert page.locator(".card.needs-review").count() == 2
    page.check("#filter-review")
    assert page.locator(".card:not([hidden])").count() == 2
    page.uncheck("#filter-review")
    page.select_option("#filter-class", "error")
    assert page.locator(".card:not([hidden])").count() == 1
    page.select_option("#filter-class", "")

    # Grad-CAM of the first cell, then a correction
    first = page.locator(".card:not(.error)").first
    predicted = first.locator(".cls").text_content()
    first.click()
    page.wait_for_function("document.getElementById('cam').complete && "
                           "document.getElementById('cam').naturalWidth === 64")
    assert page.inner_text("#cam-caption") == f"Grad-CAM of {predicted}"
    corrected = next(c for c in CLASSES if c != predicted)
    with page.expect_response(lambda r: "/label" in r.url and r.ok):
        page.select_option("#correct", corrected)
    page.click("#detail .close")
    assert first.locator(".badge.corrected").text_content() == f"→ {corrected}"

    with page.expect_download() as download:
        page.click("#download-csv")
    rows = read_csv(Path(download.value.path()).read_text())
    assert [r["path"] for r in rows] == [f.name for f in [*good, broken]]
    assert [r["corrected_label"] for r in rows] == [corrected, "", ""]
    assert [r["predicted"] for r in rows[:2]][0] == predicted and rows[2]["predicted"] == ""
    assert rows[2]["error"].startswith("unreadable image")
    assert [r["review"] for r in rows] == ["True", "True", ""]  # at the page's threshold 1.0
    assert [round(float(r["confidence"]), 2) for r in rows[:2]] == confidences
    page.close()
