"""Promotion chooses by the leak-free validation cells, never by a test set."""

from __future__ import annotations

import pandas as pd
import pytest

from wbc_transfer.config import ConfigError
from wbc_transfer.stages.promote import rank


def _long(scores: dict[tuple[str, str], dict[str, float]]) -> pd.DataFrame:
    """(architecture, protocol) -> {eval_set: macro-F1} as the comparison's long table."""
    rows = []
    for (arch, protocol), sets in scores.items():
        for eval_set, value in sets.items():
            rows.append({"architecture": arch, "protocol": protocol, "seed": 42,
                         "eval_set": eval_set, "metric": "f1_macro", "value": value,
                         "cell_accuracy": value, "run_id": f"{arch}-{protocol}",
                         "weights_source": "imagenet:x"})
    return pd.DataFrame(rows)


def test_promotion_follows_validation_when_test_disagrees():
    long = _long({
        ("resnet50", "paper"): {"validation": 0.70, "paper_test": 0.99, "TEST": 0.95},
        ("efficientnet_lite0", "heldout"): {"validation": 0.90, "TEST": 0.60},
        ("vgg16", "paper_grouped"): {"validation": 0.80, "paper_test": 0.50, "TEST": 0.97},
    })
    ranked = rank(long, ["paper", "paper_grouped", "heldout"], "validation", "f1_macro")
    assert ranked["architecture"].tolist() == ["efficientnet_lite0", "vgg16", "resnet50"]
    assert ranked["test_value"].tolist() == [0.60, 0.97, 0.95]  # reported, not used
    only_paper = rank(long, ["paper"], "validation", "f1_macro")
    assert only_paper["architecture"].tolist() == ["resnet50"]


def test_a_test_set_cannot_choose_the_champion(make_params, mini_dataset):
    with pytest.raises(ConfigError, match="promote.eval_set must be 'validation'"):
        make_params(mini_dataset, **{"promote.eval_set": "TEST"})
    with pytest.raises(ConfigError, match="promote.eval_set must be 'validation'"):
        make_params(mini_dataset, **{"promote.eval_set": "paper_test"})
