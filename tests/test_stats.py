"""shmkey.tools.stats.percentile: nearest rank, known answers and properties."""
from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shmkey.tools.stats import percentile


def test_known_answers() -> None:
    values = [15, 20, 35, 40, 50]       # the textbook nearest-rank example
    assert [percentile(values, p) for p in (5, 30, 40, 50, 100)] == [15, 20, 20, 35, 50]
    hundred = list(range(100, 0, -1))   # order does not matter
    assert percentile(hundred, 50) == 50 and percentile(hundred, 99) == 99
    assert percentile(hundred, 7) == 7  # 7 * 100 / 100, not 0.07 * 100 rounded up
    assert percentile(hundred, 0) == 1
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1),
       st.integers(0, 100))
def test_a_measured_value_with_p_percent_at_or_below(values: list[float], p: int) -> None:
    v = percentile(values, p)
    assert v in values
    at_or_below = sum(x <= v for x in values)
    assert at_or_below * 100 >= p * len(values)
    assert sum(x < v for x in values) * 100 < max(p, 1) * len(values)
