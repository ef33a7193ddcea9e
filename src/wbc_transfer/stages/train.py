"""DVC stage `train@<arch>-<protocol>-<seed>`: fine-tune one architecture, tracked in MLflow.

The model is built and fitted by `wbc_transfer.training.trainer` (as every tuning trial is: the same
model, the same numbers); this stage adds what runs around it: the checkpoint it resumes from,
the MLflow run, the progress bar, temperature scaling and the output files.
"""

from __future__ import annotations

import logging

from wbc_transfer import tracking
from wbc_transfer.config import Params, train_params_for
from wbc_transfer.data.sets import ImageSet
from wbc_transfer.engine import Checkpoint, configure_torch, pick_device
from wbc_transfer.models import registry as models
from wbc_transfer.training import trainer as training
from wbc_transfer.training.outputs import manifest, run_params, tracked_fit, write_outputs
from wbc_transfer.training.threads import policy_for as thread_policy
from wbc_transfer.training.trainer import model_name, resolve_input

log = logging.getLogger(__name__)

# train parameters that name what to train or where outputs go, not how: not run params
NOT_RUN_PARAMS = ("architectures", "protocols", "seeds", "out_dir", "checkpoint_dir",
                  "weights_report", "overrides")


def main(params: Params, arch: str, protocol: str, seed: int) -> dict[str, object]:
    t = train_params_for(params, arch)  # with train.overrides[arch]; params.train is not read below
    name = model_name(arch, protocol, seed)
    tta, eval_batch_size = params.evaluate.tta, params.evaluate.batch_size
    data = ImageSet.load(params.resolve(params.prepare.out_dir) / f"{protocol}.pt")
    data = data.resized(resolve_input(arch, t, data.size).size)
    train_set, val_set = data.subset("train"), data.subset("val")
    if len(val_set) == 0:
        raise ValueError(f"{name}: the {protocol} manifest has no validation cells; "
                         "check split.val_fraction / split.val_per_class")
    threads = configure_torch(t.num_threads)
    threads.update(thread_policy(t.num_threads).describe())  # shares the cores with other trainers
    device = pick_device(t.device)
    run = training.build(t, arch, train_set, seed, device)
    resolved = {**{k: v for k, v in t.model_dump().items() if k not in NOT_RUN_PARAMS},
                "architecture": arch, "protocol": protocol, "seed": seed, "image_size": data.size,
                "weights_source": run.built.weights_source, "view": data.view,
                "cell_fraction": data.cell_fraction}
    checkpoint = Checkpoint(
        params.resolve(t.checkpoint_dir) / name / "last.pt",
        Checkpoint.fingerprint_of({**resolved, "data": data.paths, "device": device.type,
                                   "tta": tta}),
    )
    stage = {"dvc_stage": f"train@{name}", "config_fingerprint": checkpoint.fingerprint}
    state = checkpoint.load()
    if state:
        run.load_state_dict(state)
        log.info("%s: resuming after epoch %d (MLflow run %s)", name, state["epoch"], state["run_id"])
    # killed before its first checkpoint: continue that run, not a new one
    run_id = state["run_id"] if state else tracking.unfinished_run(params, stage)
    with tracking.run(params, run_id=run_id, run_name=name, tags={
            **stage, "architecture": arch, "protocol": protocol, "seed": str(seed),
            "weights_source": run.built.weights_source, "recipe": t.recipe,
            "pretrained": str(models.is_pretrained(run.built.weights_source)).lower()}) as active:
        run_id = active.info.run_id
        if not state:  # a continued run keeps the params of its first attempt
            tracking.log_new_params(tracking.flat_params("", {
                **run_params(t, device, resolved, train_set, val_set),
                "git_commit": tracking.git_commit(params.root),
                "data_md5": tracking.data_md5(params.root), "split_seed": params.split.seed,
                **threads}))
            tracking.log_datasets(params.resolve(params.split.out_dir) / f"{protocol}.csv",
                                  manifest(data), protocol)
        tracked_fit(run, train_set, val_set, name, lambda r: checkpoint.save(**r.state_dict(),
                    run_id=run_id), eval_batch_size, tta)
        info = write_outputs(run, data, val_set, params.resolve(t.out_dir) / name, protocol, run_id,
                             eval_batch_size, tta)
    checkpoint.remove()
    return info
