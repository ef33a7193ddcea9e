"""After the search: best vs baseline retrained as their trials trained and tested once, Optuna's
plots, the trials table, the summary (JSON, Markdown) and the `--apply` command."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import yaml
from mlflow.entities import Metric, RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import FrozenTrial, TrialState

from wbc_transfer.config import TrainParams
from wbc_transfer.data.sets import ImageSet
from wbc_transfer.engine import amp_dtype, evaluate
from wbc_transfer.evaluation.metrics import SUMMARY_METRICS, classification_metrics
from wbc_transfer.io import write_csv, write_json, write_text
from wbc_transfer.tuning.objective import (
    OBJECTIVE,
    Context,
    Session,
    fit,
    fmt,
    run_metrics,
    run_params,
    trial_values,
)
from wbc_transfer.tuning.study import baseline_point, wait_for_workers

log = logging.getLogger(__name__)

# --- after the search -----------------------------------------------------------------------

def baseline_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return next((t for t in complete if t.user_attrs.get("baseline")), None)


def final_run(ctx: Context, session: Session, role: str, values: Mapping[str, float | int],
              test_sets: Mapping[str, ImageSet]) -> tuple[dict[str, dict[str, float]], int]:
    """Retrain with the trial values `values` as a trial trains (keep-best on the validation
    cells), score each test set once; returns the scores and the kept epoch."""
    client = session.client
    run_id = client.create_run(session.experiment_id, run_name=f"final-{role}", tags={
        MLFLOW_PARENT_RUN_ID: session.parent_run_id, "role": f"final-{role}",
        "optuna_study": ctx.study_name, "architecture": ctx.arch,
        "protocol": ctx.params.tune.protocol,
    }).info.run_id
    client.log_batch(run_id, params=run_params({
        **values, "lr_head": values["lr"] * values["head_lr_factor"], "epochs": ctx.train.epochs,
        "train_images": len(ctx.fit_set),
    }))
    try:
        run = fit(ctx, values, on_epoch=lambda row, _: client.log_batch(
            run_id, metrics=run_metrics(row, int(row["epoch"]))))
        client.log_metric(run_id, "best_epoch", run.kept_epoch)
        scores: dict[str, dict[str, float]] = {}
        for name, data in test_sets.items():
            r = evaluate(run.model, data.resized(run.spec.size), run.built.mean, run.built.std,
                         ctx.device, ctx.params.evaluate.batch_size,
                         amp_dtype(ctx.device, ctx.train.amp), tta=ctx.params.evaluate.tta)
            full = classification_metrics(r.labels, r.predictions, data.classes)
            scores[name] = {"n": int(full["n"]), **{m: float(full[m]) for m in SUMMARY_METRICS}}
            client.log_batch(run_id, metrics=[
                Metric(f"{name}_{m}", scores[name][m], int(time.time() * 1000), 0)
                for m in SUMMARY_METRICS])
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id, "FINISHED")
    log.info("%s final %s (%s; kept epoch %d): %s", ctx.study_name, role,
             ", ".join(f"{k} {v:.3g}" for k, v in values.items()), run.kept_epoch,
             ", ".join(f"{n} macro-F1 {s['f1_macro']:.3f}" for n, s in scores.items()))
    return scores, run.kept_epoch


def apply_epochs(t: TrainParams, best_epoch: int) -> int:
    """`train.epochs` that reproduces the kept epoch of a trial of `t.epochs` epochs: the kept
    epoch itself where the learning rate does not depend on the number of epochs (paper
    recipe: constant; the first k epochs of a longer run are the same), else `t.epochs` (modern
    recipe: the cosine decay ends at the last epoch, so a shorter run decays faster and
    differs; keep-best then keeps epoch `best_epoch` of the train stage's run too)."""
    return int(best_epoch) if t.recipe != "modern" else int(t.epochs)


def apply_command(values: Mapping[str, float | int], arch: str | None = None) -> str:
    """`dvc exp run -S train.<key>=<value> ...` for each of `values` (the trial values and
    epochs), restricted to architecture `arch` when given."""
    line = "dvc exp run " + " ".join(f"-S train.{k}={fmt(v)}" for k, v in values.items())
    return line + (f" -S 'train.architectures=[{arch}]'" if arch else "")


def plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optuna's own figures (matplotlib backend); importances need >= 2 complete trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    folder.mkdir(parents=True, exist_ok=True)
    made = []
    figures = {"optimization_history": ov.plot_optimization_history,
               "intermediate_values": ov.plot_intermediate_values,
               "param_importances": ov.plot_param_importances}
    for name, plot in figures.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot(study)
            fig = np.ravel(ax)[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            fig.savefig(folder / f"{name}.png", dpi=110)
            plt.close(fig)
            made.append(folder / f"{name}.png")
        except Exception as exc:  # e.g. too few complete trials for importances
            log.warning("no %s plot: %s: %s", name, type(exc).__name__, exc)
            plt.close("all")
    return made


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: its settings and results (the DVC plot; no timings or run ids, which
    differ on every rerun: see `runs_record`)."""
    rows = [{"number": t.number, "state": t.state.name.lower(),
             **{k: t.params.get(k) for k in ("lr", "head_lr_factor", "weight_decay",
                                              "augment_strength")},
             OBJECTIVE: t.value, "best_epoch": t.user_attrs.get("best_epoch"),
             "epochs_run": len(t.intermediate_values),
             "baseline": bool(t.user_attrs.get("baseline"))}
            for t in study.get_trials(deepcopy=False)]
    return pd.DataFrame(rows)


def runs_record(study: optuna.Study, parent_run_id: str) -> dict[str, Any]:
    """The MLflow parent run and each trial's run id and duration (runs.json, beside the
    metrics rather than in them)."""
    return {"mlflow_parent_run_id": parent_run_id,
            "trials": [{"number": t.number, "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
                        "seconds": t.duration.total_seconds() if t.duration else None}
                       for t in study.get_trials(deepcopy=False)]}


def markdown(summary: Mapping[str, Any]) -> str:
    sets = list(summary["best"]["test"])
    head = ["settings", "trial", "lr", "head lr factor", "weight decay", "augmentation",
            "kept epoch", "val macro-F1"]
    for s in sets:
        head += [f"{s} accuracy", f"{s} macro-F1"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key, label in (("baseline", "untuned (paper)"), ("best", "tuned (best trial)")):
        row = summary[key]
        val = row["val_f1_macro"]
        cells = [label, str(row["trial"]), fmt(row["lr"]), fmt(row["head_lr_factor"]),
                 fmt(row["weight_decay"]) if "weight_decay" in row else "-",
                 f"x{fmt(row['augment_strength'])}", str(row["best_epoch"]),
                 "-" if val is None else f"{val:.3f}"]
        for s in sets:
            cells += [f"{row['test'][s]['accuracy']:.3f}", f"{row['test'][s]['f1_macro']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    n = summary["trials"]
    return (
        f"# Tuning {summary['architecture']} ({summary['protocol']} protocol)\n\n"
        f"Optuna study `{summary['study_name']}`: {n['total']} trials ({n['complete']} complete, "
        f"{n['pruned']} pruned, {n['failed']} failed), up to {summary['epochs']} epochs each. "
        f"Objective: macro-F1 on the {summary['val_images']} images of the leak-free validation "
        f"cells (in no training split) at the epoch keep-best keeps; the test sets were not "
        f"used in the search. Each row was then retrained as its trial was, on the "
        f"{summary['fit_images']} training images"
        + (f" (a proxy: at most {summary['train_per_class']} per class of the "
           f"{summary['train_images']})" if summary["fit_images"] < summary["train_images"] else "")
        + ", and scored once on each test set.\n\n"
        + "\n".join(lines) + "\n\n"
        f"Apply the tuned settings to the training stage:\n\n    {summary['apply']}\n"
    )


def finalise(ctx: Context, session: Session, test_sets: Mapping[str, ImageSet]) -> dict[str, Any]:
    """Best vs baseline: retrain both as their trials trained, test once, write outputs."""
    study, client, params = session.study, session.client, ctx.params
    wait_for_workers(study)
    try:
        best = study.best_trial
    except ValueError as exc:
        raise RuntimeError(f"study {ctx.study_name} has no complete trial to report") from exc
    base = baseline_trial(study)
    base_point = baseline_point(ctx)
    best_values, base_values = trial_values(ctx.train, best.params), trial_values(ctx.train, base_point)
    best_test, best_kept = final_run(ctx, session, "best", best_values, test_sets)
    best_epoch = int(best.user_attrs.get("best_epoch", best_kept))
    if best_values == base_values:
        base_test, base_kept = best_test, best_kept
    else:
        base_test, base_kept = final_run(ctx, session, "baseline", base_values, test_sets)
    base_epoch = int(base.user_attrs.get("best_epoch", base_kept)) if base else base_kept
    train = {**best_values, "epochs": apply_epochs(ctx.train, best_epoch)}

    states = [t.state for t in study.get_trials(deepcopy=False)]
    summary: dict[str, Any] = {
        "architecture": ctx.arch, "protocol": params.tune.protocol,
        "study_name": ctx.study_name, "storage": session.storage, "epochs": params.tune.epochs,
        "objective": f"{OBJECTIVE} (validation macro-F1 of the kept epoch)",
        "train_images": len(ctx.train_set), "fit_images": len(ctx.fit_set),
        "train_per_class": ctx.params.tune.train_per_class,
        "val_images": len(ctx.val_set),
        "trials": {"total": len(states), "complete": states.count(TrialState.COMPLETE),
                   "pruned": states.count(TrialState.PRUNED),
                   "failed": states.count(TrialState.FAIL),
                   "running": states.count(TrialState.RUNNING)},
        "best": {"trial": best.number, **best_values,
                 "augment_strength": float(best.params["augment_strength"]),
                 "best_epoch": best_epoch, "val_f1_macro": best.value, "test": best_test},
        "baseline": {"trial": base.number if base else None, **base_values,
                     "augment_strength": base_point["augment_strength"], "best_epoch": base_epoch,
                     "val_f1_macro": base.value if base else None, "test": base_test},
        "apply": apply_command(train),
    }
    out = params.resolve(params.tune.out_dir) / ctx.arch
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", markdown(summary))
    write_csv(out / "trials.csv", trials_frame(study))
    write_json(out / "runs.json", runs_record(study, session.parent_run_id))
    base_val = "n/a" if base is None else f"{base.value:.3f}"
    write_text(out / "best_params.yaml",
               f"# Best trial {best.number} of Optuna study {ctx.study_name}: validation "
               f"macro-F1 {best.value:.3f} at epoch {best_epoch} of {ctx.train.epochs} "
               f"(untuned baseline {base_val}; augmentation x{fmt(best.params['augment_strength'])})."
               f"\n# Train with it: {summary['apply']}\n"
               + yaml.safe_dump({"train": train}, sort_keys=False))
    figures = plots(study, out / "figures")

    run_id = session.parent_run_id
    client.log_batch(run_id, metrics=[
        Metric(k, float(v), int(time.time() * 1000), len(states)) for k, v in {
            **{f"best_{k}": v for k, v in best.params.items()}, "best_epoch": best_epoch,
            "best_val_f1_macro": best.value, "best_trial": best.number,
            **({"baseline_val_f1_macro": base.value} if base else {}),
            **{f"best_{s}_{m}": best_test[s][m] for s in best_test for m in SUMMARY_METRICS},
            **{f"baseline_{s}_{m}": base_test[s][m] for s in base_test for m in SUMMARY_METRICS},
        }.items()])
    for key, value in {**{f"best.{k}": fmt(v) for k, v in train.items()},
                       "best.trial": str(best.number), "apply": summary["apply"]}.items():
        client.set_tag(run_id, key, value)
    for file in (out / "summary.md", out / "summary.json", out / "best_params.yaml",
                 out / "trials.csv", out / "runs.json", *figures):
        client.log_artifact(run_id, str(file), artifact_path="tune")
    client.set_terminated(run_id, "FINISHED")
    return summary
