"""Tuning (the tune stage): Optuna search over the learning rate, the new head's learning-rate
factor, the weight decay and the augmentation strength; the epoch to keep comes from keep-best.

The paper fixed lr 1e-4 and head factor 10 and named tuning them as future work. Here:

- **One training code**: a trial trains with `training.train_model`, the train stage's own
  build and loop (input size and `train.overrides` of the architecture, robustness options,
  recipe, early stopping `train.patience`, keep-best), with the trial's values put into the
  resolved train parameters. A train stage run with the values `--apply` prints (and
  `train.epochs` = `tune.epochs`) builds the same model and reaches the same validation scores
  (tests/test_training.py).
- **Search space** (`tune.space`): lr and head factor (log-uniform), weight decay (log-uniform;
  modern recipe only: the paper recipe's SGD has none), and `augment_strength`, a categorical
  multiplier of `train.colour_jitter`, `hed_jitter` and `translate_px` (rotation and flips as
  they are). Sampled values are rounded to 4 significant digits before training, so that what
  `--apply` prints is what was measured.
- **Objective**: macro-F1 on the protocol's validation cells (the leak-free validation groups
  every protocol shares; no cell of them is in any training split) of the epoch keep-best
  keeps (`train.keep: best`: the best epoch; recorded as the trial's user attr `best_epoch`).
  The test splits are never seen during the search. Every trial trains with the same seed, so
  trials differ only by their hyperparameters.
- **Baseline**: the untuned settings (`tune.baseline` lr and head factor, the paper's; the train
  section's weight decay; augmentation x1) are enqueued as trial 0 and never pruned, so the
  best trial is compared with them under the same procedure.
- **Pruning**: `trial.report(val_f1, epoch)` + `trial.should_prune()` after every epoch.
- **Storage**: persistent (SQLite at the repo root by default, any RDB URL, or a journal file),
  so an interrupted study resumes where it stopped and several worker processes can share one
  study. `tune.trials` caps the total over all workers: trials that are complete, pruned,
  running or waiting count; failed ones (e.g. Ctrl-C) are redone. The study name carries a
  fingerprint of everything that changes what a trial measures (search space, epochs, seeds,
  every train parameter a trial reads, the input, the images, the package's code), so a
  changed configuration starts a new study instead of mixing results.
- **MLflow**: one parent run per study; one nested run per trial with its params, per-epoch
  validation metrics (step = epoch) and tag `trial_state` = complete / pruned / failed; the
  two final retrains (best and baseline settings, trained as a trial is, scored once on the
  test sets) are nested runs too; the parent holds the best params, the table and Optuna's
  plots.

Modules: `storage` (where a study lives: URL, opening, the URL without credentials),
`objective` (what a trial is: context, study name, search space, trial values, fit, the objective),
`study` (create/join/resume, the search, other workers, orphaned trials), `report` (the final
retrains, Optuna's plots, the trials table, the summary and the `--apply` command).
"""
