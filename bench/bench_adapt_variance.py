"""Where the distance between adapt's cross-validation estimate and its test score comes from.

For one lab, K and seed (the adapt@<lab> stage's split): the adapted statistics alone (epoch 0)
on the lab's test part; each cross-validation fold model, trained for --epoch epochs, on its
held-out labelled cells and on the test part; and the final model (all K cells) trained with
three seeds, on the test part. Nothing is registered. bench/ADAPT.md has a run.

    python bench/bench_adapt_variance.py --model models:/wbc-classifier/1 --lab pbc --epoch 4
"""

from __future__ import annotations

import argparse
import copy
import sys

import numpy as np
import torch
from bench_adapt import load_base
from sklearn.model_selection import StratifiedGroupKFold

from wbc_transfer.config import load_params
from wbc_transfer.engine import configure_torch, evaluate, pick_device
from wbc_transfer.training import adapt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default=None)
    p.add_argument("--model", default=None, help="base model URI (default: adapt.model)")
    p.add_argument("--lab", default="pbc", help="lab of adapt.labs")
    p.add_argument("--per-class", type=int, default=None, help="K (default: the lab's)")
    p.add_argument("--seed", type=int, default=None, help="split seed (default: adapt.seed)")
    p.add_argument("--epoch", type=int, required=True, help="fine-tuning epochs (the chosen one)")
    args = p.parse_args(argv)
    params = load_params(args.params)
    configure_torch(params.train.num_threads)
    a, entry = params.adapt, params.adapt.labs[args.lab]
    k = args.per_class or entry.per_class
    seed = a.seed if args.seed is None else args.seed
    base = load_base(params, args.model, None)
    root = params.resolve(entry.root)
    index = adapt.index_lab(root, args.lab, base.classes,
                            root / entry.manifest if entry.manifest else None, params.validate.policy)
    data = adapt.split_lab(adapt.read_lab(root, index, base.classes, base.preprocess), k, seed)
    labelled, test = data.subset(adapt.ADAPT), data.subset(adapt.TEST)
    mean, std, arch = base.config["mean"], base.config["std"], base.config["architecture"]
    device, t = pick_device(params.train.device), adapt.recipe_params(params)
    torch.manual_seed(seed)
    start = adapt.adapt_batchnorm(copy.deepcopy(base.model), data.images, mean, std, device,
                                  params.evaluate.batch_size)

    def f1(model: torch.nn.Module, part) -> float:
        return round(evaluate(model, part, mean, std, device, params.evaluate.batch_size).f1_macro, 3)

    def tuned(part, run_seed: int) -> torch.nn.Module:
        return adapt.finetune(start, arch, part, t, a.head_epochs, a.unfreeze_fraction, args.epoch,
                              run_seed, mean, std, device, min_images=a.min_epoch_images)[0]

    print(f"{args.lab} K={k} seed {seed}: epoch 0 (statistics alone): labelled {f1(start, labelled)}"
          f", test {f1(start, test)}")
    labels, groups = labelled.labels.numpy(), np.asarray(labelled.groups, dtype=object)
    folds = StratifiedGroupKFold(n_splits=min(a.folds, k), shuffle=True, random_state=seed)
    for fold, (tr, va) in enumerate(folds.split(np.zeros(len(labels)), labels, groups)):
        model = tuned(labelled.take(tr), seed + fold)
        print(f"fold {fold} model, {args.epoch} epochs: its held-out labelled cells "
              f"{f1(model, labelled.take(va))}, test {f1(model, test)}")
    for run_seed in (seed, seed + 100, seed + 200):
        print(f"final model (all K), {args.epoch} epochs, training seed {run_seed}: "
              f"test {f1(tuned(labelled, run_seed), test)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
