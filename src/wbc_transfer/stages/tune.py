"""DVC stage `tune@<arch>` (tune/dvc.yaml, outside the default `dvc repro`): Optuna search over
train.lr, head_lr_factor, weight_decay and the augmentation strength (epochs by keep-best), then
best vs untuned baseline on the test sets.

    wbc-transfer tune --arch efficientnet_lite0            # the stage: search, then report
    wbc-transfer tune --arch efficientnet_lite0 --worker   # extra worker on the same study
    wbc-transfer tune --apply                              # print the `dvc exp run -S ...` line
    wbc-transfer tune --apply --settings                   # only the winner's -S options (make best)
"""

from __future__ import annotations

import json
import logging

import yaml

from wbc_transfer.config import ConfigError, Params
from wbc_transfer.data.sets import evaluation_sets
from wbc_transfer.engine import configure_torch
from wbc_transfer.training.threads import policy_for as thread_policy
from wbc_transfer.tuning.objective import load_context
from wbc_transfer.tuning.report import apply_command, finalise, markdown
from wbc_transfer.tuning.study import search

log = logging.getLogger(__name__)


def tuned(params: Params, arch: str | None = None) -> tuple[list[str], dict[str, tuple]]:
    """The tuned studies of `arch` (default: every one of tune.architectures): comment lines
    (one per architecture: its best validation macro-F1, or why it has none) and
    {architecture: (validation macro-F1, the train values of its best_params.yaml)}.

    Raises ConfigError for an `arch` outside tune.architectures, or when none has a study."""
    if arch and arch not in params.tune.architectures:
        raise ConfigError(f"tune --arch {arch}: not one of tune.architectures "
                          f"{list(params.tune.architectures)}")
    archs = [arch] if arch else list(params.tune.architectures)
    lines, found = [], {}
    for name in archs:
        folder = params.resolve(params.tune.out_dir) / name
        file = folder / "best_params.yaml"
        if not file.is_file():
            lines.append(f"# {name}: no {file} yet: run `dvc repro tune/dvc.yaml` first")
            continue
        summary = folder / "summary.json"
        value = json.loads(summary.read_text())["best"]["val_f1_macro"] if summary.is_file() \
            else float("nan")
        found[name] = (value, yaml.safe_load(file.read_text())["train"])
        lines.append(f"# {name}: validation macro-F1 {value:.3f} ({file})")
    if not found:
        raise ConfigError("tune --apply: no tuned study in "
                          f"{params.resolve(params.tune.out_dir)}:\n" + "\n".join(lines))
    return lines, found


def apply(params: Params, arch: str | None = None) -> str:
    """The command line that trains with the tuned settings; with several tuned architectures,
    those of the one whose best trial has the best validation objective, restricted to it."""
    lines, found = tuned(params, arch)
    if len(lines) == 1:  # one architecture asked for: its study's settings, restricted to it
        name, (_, values) = next(iter(found.items()))
        lines.append(apply_command(values, arch=name))
    else:
        winner = max(found, key=lambda name: found[name][0])
        lines.append(f"# best of the {len(found)} tuned architectures on validation: {winner}")
        lines.append(apply_command(found[winner][1], arch=winner))
    return "\n".join(lines)


def settings(params: Params) -> str:
    """The `-S` options of the tuned settings of the architecture that won on validation, one
    line, without `train.epochs` (the proxy's epochs: `make best` sets its own scale); what
    the Makefile's TUNED reads, so that a new `make tune` changes `make best`.

    Raises ConfigError when no architecture of tune.architectures has a tuned study."""
    _, found = tuned(params)
    winner = max(found, key=lambda name: found[name][0])
    values = {k: v for k, v in found[winner][1].items() if k != "epochs"}
    return apply_command(values, arch=winner).removeprefix("dvc exp run ")


def main(params: Params, arch: str | None = None, worker: bool = False,
         apply_only: bool = False, settings_only: bool = False) -> dict[str, object] | None:
    if settings_only:
        if not apply_only or arch:
            raise ConfigError("tune: --settings goes with --apply and without --arch (it picks "
                              "the architecture that won on validation)")
        print(settings(params))
        return None
    if apply_only:
        print(apply(params, arch))
        return None
    if not arch:
        raise ConfigError("tune: --arch is required (one of tune.architectures)")
    configure_torch(params.train.num_threads)
    thread_policy(params.train.num_threads)  # shares the cores with the other workers
    ctx = load_context(params, arch)
    session = search(ctx, worker=worker)
    if worker:
        log.info("worker done: study %s has %d trial(s)", ctx.study_name,
                 len(session.study.trials))
        return None
    try:
        tests = {name: data for name, data in evaluation_sets(params, params.tune.protocol).items()
                 if name != "validation"}  # the objective's own cells: not a test set
        summary = finalise(ctx, session, tests)
    except BaseException:
        session.client.set_terminated(session.parent_run_id, "FAILED")
        raise
    print(markdown(summary))
    return summary
