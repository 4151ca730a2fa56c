"""relay/metrics.py: the histogram's recent-sample ring against a deque reference."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.metrics import LATENCY_BUCKETS, Histogram, Metrics


@given(
    window=st.integers(min_value=1, max_value=40),
    values=st.lists(st.floats(min_value=0.0, max_value=1.0), max_size=200),
    q=st.sampled_from([0.0, 50.0, 99.0, 100.0]),
)
def test_ring_keeps_exactly_the_last_window_samples(
    window: int, values: list[float], q: float
) -> None:
    h = Histogram(window=window)
    ref: deque[float] = deque(maxlen=window)
    for v in values:
        h.observe(v)
        ref.append(v)
    assert sorted(h.recent) == sorted(ref)
    assert h.count == len(values)
    assert h.sum == pytest.approx(sum(values))
    assert sum(h.counts) == len(values)
    if ref:
        ordered = sorted(ref)
        idx = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
        assert h.percentile(q) == ordered[idx]
    else:
        assert h.percentile(q) == 0.0


def test_buckets_count_each_observation_once() -> None:
    h = Histogram(window=3)
    for v in (0.0, LATENCY_BUCKETS[0], LATENCY_BUCKETS[-1] * 2):
        h.observe(v)
    assert h.counts[0] == 2  # le is inclusive: a sample equal to a bound is in its bucket
    assert h.counts[-1] == 1  # above the last bound: +Inf only
    assert h.quantile(1.0) == float("inf")


def test_a_window_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        Histogram(window=0)


def test_rendered_histogram_is_cumulative() -> None:
    m = Metrics()
    for v in (0.0001, 0.002, 0.03):
        m.latency_up.observe(v)
    text = m.render()
    lines = [ln for ln in text.splitlines() if ln.startswith("relay_frame_latency_seconds_bucket")]
    up = [ln for ln in lines if "twilio_to_agent" in ln]
    counts = [float(ln.rsplit(" ", 1)[1]) for ln in up]
    assert counts == sorted(counts) and counts[-1] == 3
