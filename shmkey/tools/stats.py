"""Summary statistics of timings for the tools and benchmarks: one percentile
definition, so that a p99 in ``shmkey bench``, ``shmkey demo`` and the
benchmark suite means the same thing.
"""
from __future__ import annotations

import math
from typing import Iterable


def percentile(values: Iterable[float], p: float) -> float:
    """The nearest-rank percentile: the smallest value that at least ``p``
    percent of the values are at or below (no interpolation, so it is always
    one of the measured values).

    Args:
        values: the measurements, in any order.
        p: the percentile, 0 to 100 (50: the median's lower value, 99: p99).

    Returns:
        That value; NaN when there are no values.

    Raises:
        ValueError: ``p`` is outside 0 to 100.
    """
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p!r} is not between 0 and 100")
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(p * len(ordered) / 100))   # p * n first: exact for whole p
    return ordered[rank - 1]
