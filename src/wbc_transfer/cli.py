"""`wbc-transfer` command line: one sub-command per DVC stage, plus data download, predict and
the web page (`app`)."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from wbc_transfer.config import PROTOCOLS, ConfigError, load_params

STAGES = ("validate", "groups", "split", "prepare", "external", "weights", "train", "evaluate",
          "compare", "promote", "tune", "adapt")
COMMAND_MODULES = {"check-weights": "weights"}  # sub-command -> stages/<module>.py when they differ


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGINT as an exception: every `except BaseException`/`finally` on the way
    out runs, so a stage's MLflow run (train, evaluate) or Optuna trial and parent run (tune)
    ends FAILED instead of RUNNING forever. A KeyboardInterrupt, so Optuna treats it like Ctrl-C.
    """

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def signals_as_exceptions() -> Callable[[], None]:
    """From now on SIGTERM (what DVC, schedulers and `kill` send) and SIGINT raise `Terminated`
    once; a repeated signal while that unwinds is logged and ignored, so the clean-up finishes.
    A signal the process inherited as ignored stays ignored. Main thread only (elsewhere a
    no-op). Returns the function that puts the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if received:
            logging.getLogger(__name__).warning(
                "%s again: still closing the run, please wait", signal.Signals(signum).name)
            return
        received.append(signum)
        raise Terminated(signum)

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s, old in previous.items():
        if old is not signal.SIG_IGN:
            signal.signal(s, handler)

    def restore() -> None:
        for s, old in previous.items():
            signal.signal(s, old)

    return restore


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wbc-transfer", description=__doc__)
    parser.add_argument("--params", default=None,
                        help="params.yaml to use (default: found from cwd)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in ("validate", "groups", "split", "prepare", "compare", "promote"):
        sub.add_parser(stage, help=f"run the DVC stage `{stage}`")
    external = sub.add_parser("external", help="run the DVC stage `external@<name>`: validate "
                              "and prepare one external test set (params `external`)")
    external.add_argument("--name", default=None, help="the set's name in params.yaml `external` "
                          "(without it: the stage `external-sets`, which lists the sets)")
    for stage in ("train", "evaluate"):
        p = sub.add_parser(stage, help=f"run the DVC stage `{stage}` for one model")
        p.add_argument("--arch", required=True)
        p.add_argument("--protocol", default="paper", choices=PROTOCOLS)
        p.add_argument("--seed", type=int, required=True)
    tune = sub.add_parser(
        "tune", help="Optuna search over lr, head factor, weight decay and augmentation strength "
        "(the stage tune@<arch> of tune/dvc.yaml)",
        description="With --arch and no --apply: run the study of one architecture (the stage "
        "tune@<arch>: tune.trials trainings, minutes to hours; `make tune` runs every one). "
        "With --apply: print the `dvc exp run -S ...` line of the tuned settings, read from "
        "results/tune/ (the architecture that won on validation, or --arch's).")
    tune.add_argument("--arch", help="architecture (one of tune.architectures): the study to "
                      "run, or with --apply the one whose settings to print")
    tune.add_argument("--worker", action="store_true",
                      help="only run trials of the shared study (start beside the stage)")
    tune.add_argument("--apply", action="store_true",
                      help="print the `dvc exp run -S ...` line that trains with the best params")
    tune.add_argument("--settings", action="store_true",
                      help="with --apply: only the -S options of the architecture that won on "
                      "validation, on one line, without the study's train.epochs (what `make "
                      "best` trains with)")
    sub.add_parser("check-weights", help="run the DVC stage `weights`: which weights every "
                   "architecture gets; with train.weights=imagenet, fail listing every missing file")
    fetch = sub.add_parser("fetch-weights", help="download the ImageNet weight files the "
                           "architectures need into $TORCH_HOME/hub/checkpoints; print file, size "
                           "and SHA-256")
    fetch.add_argument("--check", action="store_true",
                       help="only verify the cached files against torchvision's published hash "
                       "prefixes (offline)")
    fetch.add_argument("--arch", action="append", metavar="NAME",
                       help="architecture (repeatable; default: train.architectures of params.yaml "
                       "and the paper's four networks)")
    ui = sub.add_parser("ui", help="the MLflow UI on the project's store (`make ui`); fails if "
                        "the port is taken")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    adapt = sub.add_parser("adapt", help="adapt the champion (or --model) to a new lab's labelled "
                           "cells and register it as wbc-classifier@lab-<NAME> (stage adapt@<lab>)")
    adapt.add_argument("folder", metavar="FOLDER", nargs="?", default=None,
                       help="the lab's images: <CLASS>/ sub-folders, or the folder of --manifest's "
                       "files (default: adapt.labs.<NAME>.root, as the stage adapt@<NAME> runs)")
    adapt.add_argument("--lab", required=True, help="the lab's name (alias lab-<NAME>)")
    adapt.add_argument("--per-class", type=int, default=None, metavar="K",
                       help="labelled cells per class to adapt on (0: BatchNorm statistics only); "
                       "the rest of the folder is the lab's test (default: adapt.labs.<NAME>)")
    adapt.add_argument("--model", default=None, help="base model URI (default: adapt.model, the "
                       "champion)")
    adapt.add_argument("--manifest", default=None, help="CSV in FOLDER: path,label[,group]")
    adapt.add_argument("--seed", type=int, default=None, help="split and training seed (default: "
                       "adapt.seed)")
    adapt.add_argument("--replace", action="store_true", help="move an existing lab-<NAME> alias "
                       "of an earlier adaptation to this lab to the new version")
    dl = sub.add_parser("download-data", help="download the Kaggle dataset with kagglehub")
    dl.add_argument("--dataset", default="paultimothymooney/blood-cells")
    from wbc_transfer.serving.predict import add_arguments as predict_arguments

    predict_arguments(sub.add_parser(
        "predict", help="classify image files/folders/globs with the registered champion"))
    from wbc_transfer.app.cli import add_arguments as app_arguments

    app_arguments(sub.add_parser(
        "app", help="a local web page: upload cells, see class, confidence, review flag and "
                    "Grad-CAM, correct and download (docs/app.md)"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("alembic", "mlflow.store", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    restore_signals = signals_as_exceptions()
    try:
        if args.command == "download-data":
            from wbc_transfer.models.download import download

            print(download(args.dataset))
            return 0
        if args.command == "predict":
            from wbc_transfer.serving.predict import main as predict

            return predict(args)
        if args.command == "app":
            from wbc_transfer.app.cli import main as app

            return app(args)
        if args.command == "fetch-weights":
            from wbc_transfer.models import weights_cache
            from wbc_transfer.models.registry import PAPER_NETWORKS

            archs = args.arch or [*load_params(args.params).train.architectures, *PAPER_NETWORKS]
            return weights_cache.main(archs, check_only=args.check)
        params = load_params(args.params)
        if args.command == "ui":
            from wbc_transfer import tracking

            return tracking.ui(params, args.host, args.port)
        stage = COMMAND_MODULES.get(args.command, args.command)
        module = importlib.import_module(f"wbc_transfer.stages.{stage}")
        if args.command in {"train", "evaluate"}:
            module.main(params, arch=args.arch, protocol=args.protocol, seed=args.seed)
        elif args.command == "external":
            if args.name is None:
                module.list_sets(params)
            else:
                module.main(params, name=args.name)
        elif args.command == "adapt":
            module.from_cli(params, args.folder, args.lab, args.per_class, args.model,
                            args.manifest, args.seed, args.replace)
        elif args.command == "tune":
            module.main(params, arch=args.arch, worker=args.worker, apply_only=args.apply,
                        settings_only=args.settings)
        else:
            module.main(params)
    except ConfigError as exc:
        print(f"wbc-transfer: {exc}", file=sys.stderr)
        return 2
    except Terminated as exc:
        print(f"wbc-transfer {args.command}: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("wbc-transfer: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line for the user, traceback with -v
        if args.verbose:
            raise
        print(f"wbc-transfer {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        restore_signals()
    return 0


if __name__ == "__main__":
    sys.exit(main())
