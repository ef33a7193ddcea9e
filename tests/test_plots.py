"""Figures that must not fail on small studies."""

from __future__ import annotations

import numpy as np
import pandas as pd

from wbc_transfer.plots import grouped_bars


def test_bars_with_a_point_outside_its_bootstrap_interval_are_drawn(tmp_path):
    # a few cells and resamples: the percentile interval [0.55, 0.7] misses the estimate 0.5,
    # so "estimate - low" is negative (matplotlib: "'yerr' must not contain negative values")
    table = pd.DataFrame({"macro-F1": [0.5, 0.6]}, index=["efficientnet_lite0", "alexnet"])
    errors = np.array([[[0.5 - 0.55, 0.1], [0.2, 0.1]]])
    out = grouped_bars(table, "TEST", tmp_path / "bars.png", errors=errors)
    assert out.stat().st_size > 0
