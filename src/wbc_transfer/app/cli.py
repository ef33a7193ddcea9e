"""`wbc-transfer app`: its options and the server loop (uvicorn), kept light for `--help`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from wbc_transfer.app.limits import Limits

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `wbc-transfer app`."""
    from wbc_transfer.serving.loading import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model chosen when the page opens (default: {DEFAULT_MODEL}); the "
                        "page lists every alias and version of the same registered model")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default: {DEFAULT_HOST}, this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default: {DEFAULT_PORT}")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI, else the "
                        "project's mlflow.db)")
    p.add_argument("--max-upload-mb", type=float,
                   default=Limits.max_upload_bytes / 2**20,
                   help="largest upload, and image bytes after unzipping, in MiB "
                        "(default: %(default).0f)")
    p.add_argument("--max-images", type=int, default=Limits.max_images,
                   help="most images in one upload (default: %(default)d)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average with the horizontally flipped image")


def main(args: argparse.Namespace) -> int:
    """Run the page until Ctrl-C; returns the exit code (2: bad option or no model store)."""
    import uvicorn

    from wbc_transfer.app.server import create_app
    from wbc_transfer.serving.loading import resolve_tracking_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.max_images < 1 or args.max_upload_mb <= 0 or args.batch_size < 1:
        print("wbc-transfer app: --max-images, --max-upload-mb and --batch-size must be > 0",
              file=sys.stderr)
        return 2
    tracking_uri = resolve_tracking_uri(args.tracking_uri, args.params)
    if tracking_uri and tracking_uri.startswith("sqlite:///") and \
            not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        print(f"wbc-transfer app: the tracking store {tracking_uri} does not exist; run from the "
              "project folder, or set --tracking-uri / MLFLOW_TRACKING_URI", file=sys.stderr)
        return 2
    limits = Limits(int(args.max_upload_mb * 2**20), args.max_images)
    app = create_app(args.model, tracking_uri, limits, args.batch_size, args.tta)
    print(f"wbc-transfer app: http://{args.host}:{args.port}/ (model {args.model}; Ctrl-C stops)",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
