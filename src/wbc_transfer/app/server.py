"""The web page for lab staff: FastAPI routes and the Jinja2 page (`wbc-transfer app`: app/cli.py).

FastAPI (Starlette) + one Jinja2 template + plain JavaScript: FastAPI, Starlette, Jinja2 and
uvicorn are already installed with MLflow (its scoring server and UI use them), so the page adds
one small package (python-multipart, for uploads); the routes are tested in-process with
FastAPI's TestClient and the page in a real headless Chromium. Gradio and Streamlit were not
chosen: each brings tens of packages and its own front-end build, and neither lets a test
drive a plain HTML page.

Routes (JSON unless said): `GET /` the page; `GET /api/models` the model list;
`GET /api/card?uri=` a model's card; `POST /api/batches` (multipart: `model`, `review_below`,
`files` with a parallel `paths`) starts a batch; `GET /api/batches/<id>?since=<n>` its progress
and the rows from n on; `GET .../thumbs/<i>.jpeg`, `GET .../cams/<i>.png`;
`PUT .../rows/<i>/label` a correction; `GET .../predictions.csv?review_below=`,
`GET .../labelled.zip` the exports. Everything the app writes is under one temporary folder
(`batch.Store`), removed when it stops.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from starlette.concurrency import run_in_threadpool

from wbc_transfer.app import registry
from wbc_transfer.app.batch import Store, expand
from wbc_transfer.app.limits import LimitError, Limits
from wbc_transfer.data.images import ImageError
from wbc_transfer.serving.loading import ModelUnavailableError

HERE = Path(__file__).parent


def create_app(model: str, tracking_uri: str | None, limits: Limits | None = None,
               batch_size: int = 32, tta: bool = False,
               registered_name: str | None = None) -> FastAPI:
    """The FastAPI application. `model`: the URI chosen by default; `registered_name`: the
    registered model whose aliases and versions are listed (default: the name in `model`)."""
    limits = limits or Limits()
    parsed = registry.parse_uri(model)
    name = registered_name or (parsed[0] if parsed else None)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    models = registry.ModelCache(tracking_uri)
    store = Store(limits, batch_size, tta)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        store.close()

    app = FastAPI(title="wbc-transfer", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.store = store
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")

    def batch_of(batch_id: str):
        try:
            return store.get(batch_id)
        except KeyError:
            raise HTTPException(404, f"no batch {batch_id}") from None

    def card_of(uri: str) -> registry.Card:
        try:
            return registry.card(client, uri)
        except MlflowException as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise HTTPException(404, f"{uri}: {first}") from None

    @app.exception_handler(LimitError)
    async def too_much(_request: Request, exc: LimitError):
        return JSONResponse({"detail": str(exc)}, status_code=413)

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request):
        return templates.TemplateResponse(request, "index.html", {
            "default_model": model, "max_images": limits.max_images,
            "max_upload_mb": f"{limits.max_upload_bytes / 2**20:g}"})

    @app.get("/api/models")
    def model_list():
        return {"default": model, "registered_name": name,
                "choices": [asdict(c) for c in (registry.choices(client, name, model) if name
                                                else [registry.Choice(model, model, "")])]}

    @app.get("/api/card")
    def model_card(uri: str):
        return card_of(uri).as_dict()

    @app.post("/api/batches", status_code=201)
    async def new_batch(request: Request):
        declared = int(request.headers.get("content-length") or 0)
        limits.check_size(declared)  # before anything is read
        try:
            form = await request.form(max_files=limits.max_images + 1,
                                      max_fields=limits.max_images + 16)
        except HTTPException as exc:  # Starlette's own limits on parts
            raise LimitError(f"{exc.detail} (option --max-images)") from None
        uri = str(form.get("model") or model)
        try:
            review_below = float(form.get("review_below") or 0.0)
        except ValueError:
            raise HTTPException(400, "review_below must be a number between 0 and 1") from None
        if not 0.0 <= review_below <= 1.0:
            raise HTTPException(400, f"review_below must be between 0 and 1, got {review_below}")
        uploads = [f for f in form.getlist("files") if not isinstance(f, str)]
        paths = [str(p) for p in form.getlist("paths")]
        if not uploads:
            raise HTTPException(400, "no files in the upload (field `files`)")
        names = [paths[i] if i < len(paths) and paths[i] else (f.filename or f"file{i}")
                 for i, f in enumerate(uploads)]
        received = [(n, await f.read()) for n, f in zip(names, uploads, strict=True)]
        limits.check_size(sum(len(d) for _, d in received))
        inputs, skipped = expand(received, limits)
        version = card_of(uri).version
        try:
            loaded = await run_in_threadpool(models.get, uri, version)
        except ModelUnavailableError as exc:
            raise HTTPException(400, str(exc)) from None
        batch = store.create(inputs, skipped, loaded, version, review_below)
        return batch.summary()

    @app.get("/api/batches/{batch_id}")
    def batch_state(batch_id: str, since: int = 0):
        batch = batch_of(batch_id)
        rows = batch.rows[max(since, 0):len(batch.rows)]
        return {**batch.summary(), "rows": rows,
                "corrections": {str(k): v for k, v in batch.corrections.items()}}

    @app.get("/api/batches/{batch_id}/thumbs/{index}.jpeg")
    def thumbnail(batch_id: str, index: int):
        batch = batch_of(batch_id)
        try:
            return Response(batch.thumbnail(index), media_type="image/jpeg",
                            headers={"Cache-Control": "private, max-age=3600"})
        except (IndexError, FileNotFoundError, ImageError) as exc:
            raise HTTPException(404, f"row {index}: {exc}") from None

    @app.get("/api/batches/{batch_id}/cams/{index}.png")
    def explanation(batch_id: str, index: int):
        batch = batch_of(batch_id)
        try:
            return Response(batch.explanation(index, tta), media_type="image/png")
        except (IndexError, FileNotFoundError, ValueError) as exc:
            raise HTTPException(404, f"row {index}: {exc}") from None

    @app.put("/api/batches/{batch_id}/rows/{index}/label")
    async def correct(batch_id: str, index: int, request: Request):
        batch = batch_of(batch_id)
        body = await request.json()
        try:
            batch.correct(index, (body or {}).get("label"))
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        return {"index": index, "corrected_label": batch.corrections.get(index, "")}

    @app.get("/api/batches/{batch_id}/predictions.csv")
    def predictions_csv(batch_id: str, review_below: float | None = None):
        batch = batch_of(batch_id)
        return Response(batch.write_csv(review_below), media_type="text/csv",
                        headers={"Content-Disposition":
                                 f'attachment; filename="predictions-{batch_id}.csv"'})

    @app.get("/api/batches/{batch_id}/labelled.zip")
    def labelled_zip(batch_id: str):
        batch = batch_of(batch_id)
        if not batch.corrections:
            raise HTTPException(400, "no confirmed or corrected labels yet: a labelled folder "
                                     "holds only the labels a person gave")
        file, _ = batch.write_labelled_zip()
        return FileResponse(file, media_type="application/zip",
                            filename=f"labelled-{batch_id}.zip")

    return app
