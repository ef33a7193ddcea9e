"""MLflow logging cost per training epoch: a tracking server over loopback vs local SQLite.

Per epoch the train stage logs one `log_metrics` call of 8 values and one `log_metric`
(`torch_threads`); this times exactly that, `--epochs` times, into a fresh run of each store,
after one warm-up epoch. Give the server's URL (e.g. the one `make server` starts, or a
throwaway `mlflow server --backend-store-uri postgresql://... --serve-artifacts ...`):

    python bench/bench_tracking.py --server http://127.0.0.1:5000 --epochs 50

Compare the milliseconds per epoch with a quick-run epoch (tens of seconds on 2 cores).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import mlflow

ROW = {"train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5,
       "val_f1_macro": 0.5, "lr": 1e-3, "train_images_per_s": 100.0, "val_iter_loss": 1.0}


def per_epoch_ms(uri: str, epochs: int) -> float:
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("bench-tracking")
    with mlflow.start_run():
        mlflow.log_metrics(ROW, step=0)  # warm-up: connection, run lookup
        start = time.perf_counter()
        for epoch in range(1, epochs + 1):
            mlflow.log_metrics(ROW, step=epoch)
            mlflow.log_metric("torch_threads", 1, step=epoch)
        return (time.perf_counter() - start) / epochs * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="http://HOST:PORT of an mlflow server")
    parser.add_argument("--epochs", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = per_epoch_ms(f"sqlite:///{tmp}/mlflow.db", args.epochs)
    server = per_epoch_ms(args.server, args.epochs)
    print(f"per epoch: SQLite {sqlite:.1f} ms, server {server:.1f} ms "
          f"(+{server - sqlite:.1f} ms)")


if __name__ == "__main__":
    main()
