"""DVC stage `evaluate@<arch>-<protocol>-<seed>`: score one trained model on every evaluation set.

Sets: `validation` (the leak-free validation cells every protocol shares: what promotion
chooses by), the protocol's own test split (`paper_test` for the paper protocols), the
leak-free TEST folder, TEST_SIMPLE when the dataset has it, and every external set of params
`external` (other labs; test sets: reported, never chosen by). Each set is scored per image
and per cell (a cell is right when more than half of its images are; the per-cell accuracy is
class-balanced: the mean over classes of each class's share of right cells), with cluster-bootstrap
intervals over cells and the effective n (cells) beside n (images).

Trust (issue 14), per set: probabilities are temperature-scaled with the temperature fitted on
the validation cells at training time (run.json); ECE (equal-width bins) and Brier score
before/after, a reliability diagram, the risk-coverage curve, per-class precision/recall/F1
with cluster-bootstrap intervals and the row-normalised confusion matrix. The review threshold
is the lowest confidence whose kept validation images reach `evaluate.review_accuracy`; its
coverage is reported on every set. Sets in `evaluate.gallery_sets` get Grad-CAM galleries.
The per-set work is `wbc_transfer.evaluation.scoring`.
"""

from __future__ import annotations

import pandas as pd

from wbc_transfer import tracking
from wbc_transfer.config import Params
from wbc_transfer.data.sets import evaluation_sets
from wbc_transfer.engine import amp_dtype, configure_torch, pick_device, place_model
from wbc_transfer.evaluation.scoring import check_views, load_trained, log_review, review_summary, score_set
from wbc_transfer.evaluation.stats import bootstrap_settings
from wbc_transfer.io import write_json
from wbc_transfer.training.threads import policy_for as thread_policy
from wbc_transfer.training.trainer import model_name


def main(params: Params, arch: str, protocol: str, seed: int) -> dict[str, object]:
    name = model_name(arch, protocol, seed)
    out = params.resolve(params.evaluate.out_dir) / name
    configure_torch(params.train.num_threads)
    thread_policy(params.train.num_threads)  # shares the cores with other training processes
    device = pick_device(params.train.device)
    model, info = load_trained(params, name)
    model = place_model(model, device, params.evaluate.channels_last)
    amp = amp_dtype(device, params.train.amp)
    sets = evaluation_sets(params, protocol)
    check_views(name, info.get("view", "full"), {s: d.view for s, d in sets.items()})
    results: dict[str, object] = {}
    curves: dict[str, pd.DataFrame] = {}
    confidences: dict[str, tuple] = {}
    with tracking.run(params, run_id=info["run_id"]):
        for set_name, data in sets.items():
            scored = score_set(params, model, info, name, set_name, data, device, amp, out)
            results[set_name], curves[set_name], confidences[set_name] = scored
        review = review_summary(params, curves, confidences)
        log_review(params, name, curves, review, out)
    # the run id changes with every training run: beside the metrics, not in them (DVC compares
    # metrics.json across runs and experiments)
    write_json(out / "run.json", {"model": name, "run_id": info["run_id"]})
    summary = {"model": name, "architecture": arch,
               "protocol": protocol, "seed": seed, "weights_source": info["weights_source"],
               "recipe": info.get("recipe", "paper"), "tta": bool(params.evaluate.tta),
               "view": info.get("view", "full"), "bootstrap": bootstrap_settings(params),
               "temperature": float(info.get("temperature", 1.0)),  # fitted at training time
               "review": review, "sets": results}
    write_json(out / "metrics.json", summary)
    return summary
