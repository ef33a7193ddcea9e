"""DVC stage `tune@<arch>` (tune/dvc.yaml, outside the default `dvc repro`): Optuna search over
train.lr and train.head_lr_factor, then best vs untuned baseline on the test sets.

    wbc-transfer tune --arch efficientnet_lite0            # the stage: search, then report
    wbc-transfer tune --arch efficientnet_lite0 --worker   # extra worker on the same study
    wbc-transfer tune --apply                              # print the `dvc exp run -S ...` line
"""

from __future__ import annotations

import logging

import yaml

from wbc_transfer import tuning
from wbc_transfer.config import ConfigError, Params
from wbc_transfer.engine import configure_torch
from wbc_transfer.stages.evaluate import evaluation_sets
from wbc_transfer.threads import policy_for as thread_policy

log = logging.getLogger(__name__)


def apply(params: Params, arch: str | None = None) -> str:
    """The command lines that train with each tuned architecture's best params."""
    archs = [arch] if arch else list(params.tune.architectures)
    lines = []
    for name in archs:
        file = params.resolve(params.tune.out_dir) / name / "best_params.yaml"
        if not file.is_file():
            lines.append(f"# {name}: no {file} yet: run `dvc repro tune/dvc.yaml` first")
            continue
        best = yaml.safe_load(file.read_text())["train"]
        lines.append(f"# {name}: {file}")
        lines.append(tuning.apply_command(best))
    if len(archs) > 1:
        lines.append("# train.lr / train.head_lr_factor apply to every architecture of the "
                     "train stage; pick one line, or restrict with -S 'train.architectures=[...]'")
    return "\n".join(lines)


def main(params: Params, arch: str | None = None, worker: bool = False,
         apply_only: bool = False) -> dict[str, object] | None:
    if apply_only:
        print(apply(params, arch))
        return None
    if not arch:
        raise ConfigError("tune: --arch is required (one of tune.architectures)")
    configure_torch(params.train.num_threads)
    thread_policy(params.train.num_threads)  # shares the cores with the other workers
    ctx = tuning.load_context(params, arch)
    session = tuning.search(ctx, worker=worker)
    if worker:
        log.info("worker done: study %s has %d trial(s)", ctx.study_name,
                 len(session.study.trials))
        return None
    try:
        tests = {name: data for name, data in evaluation_sets(params, params.tune.protocol).items()
                 if name != "validation"}  # the objective's own cells: not a test set
        summary = tuning.finalise(ctx, session, tests)
    except BaseException:
        session.client.set_terminated(session.parent_run_id, "FAILED")
        raise
    print(tuning.markdown(summary))
    return summary
