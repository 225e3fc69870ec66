"""How the benchmark reports summarize several runs of one figure."""

from __future__ import annotations

import statistics


def median_range(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of ``values``; NaNs when there are none."""
    if not values:
        return (float("nan"),) * 3
    return statistics.median(values), min(values), max(values)
