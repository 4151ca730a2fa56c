"""Histogram: the compiled latency histogram against its reference (relay.media.codec_ref).

The media handlers observe into the compiled one without a Python frame; everything a
scrape or a report reads of it (buckets, count, sum, the recent ring, percentiles,
quantiles, the Prometheus lines) must be what the reference gives for the same samples.
"""

from __future__ import annotations

import math
import time
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.media import _codec, codec_ref
from relay.metrics import LATENCY_BUCKETS
from relay.metrics import Histogram as MetricsHistogram

IMPLS = [pytest.param(_codec, id="compiled"), pytest.param(codec_ref, id="ref")]

samples = st.lists(
    st.one_of(
        st.floats(min_value=-1.0, max_value=1.0),
        st.sampled_from([*LATENCY_BUCKETS, 0.0, math.inf, -math.inf]),
    ),
    max_size=300,
)


@given(
    window=st.integers(min_value=1, max_value=50),
    bounds=st.lists(st.floats(min_value=0.0, max_value=1.0), max_size=12).map(
        lambda b: tuple(sorted(b))
    ),
    values=samples,
    q=st.sampled_from([0.0, 0.5, 0.99, 1.0]),
)
def test_compiled_matches_the_reference(
    window: int, bounds: tuple[float, ...], values: list[float], q: float
) -> None:
    fast, ref = _codec.Histogram(bounds, window), codec_ref.Histogram(bounds, window)
    for v in values:
        fast.observe(v)
        ref.observe(v)
    assert fast.counts == ref.counts
    assert fast.count == ref.count
    assert repr(fast.sum) == repr(ref.sum)  # the same additions in the same order (inf - inf: nan)
    assert list(fast.recent) == list(ref.recent)
    assert fast.percentile(q * 100) == ref.percentile(q * 100)
    assert fast.quantile(q) == ref.quantile(q)
    assert fast.render("x", 'k="v"') == ref.render("x", 'k="v"')
    assert fast.render("x") == ref.render("x")


@pytest.mark.parametrize("impl", IMPLS)
def test_a_nan_lands_in_the_first_bucket(impl: ModuleType) -> None:
    h = impl.Histogram((0.1, 0.2))
    h.observe(math.nan)
    assert h.counts == [1, 0, 0]


@pytest.mark.parametrize("impl", IMPLS)
def test_a_window_below_one_is_refused(impl: ModuleType) -> None:
    with pytest.raises(ValueError, match="window"):
        impl.Histogram((0.1,), 0)


def test_the_metrics_histogram_is_the_compiled_one_with_the_latency_buckets() -> None:
    h = MetricsHistogram()
    assert isinstance(h, _codec.Histogram)
    assert h.bounds == LATENCY_BUCKETS
    assert h.window == 8_192
    assert not hasattr(h, "__dict__")  # no per-instance dict on a per-frame object


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["compiled", "reference"])
def test_a_handler_observes_into_either_kind(impl: ModuleType, kind: str) -> None:
    """The pump's handler calls a compiled histogram directly and anything else through
    its ``observe`` method, with the same result: one sample of the read's time."""
    from test_codec_pump_handler import Handled
    from test_codec_twilio_uplink import media

    hist = (_codec if kind == "compiled" else codec_ref).Histogram(LATENCY_BUCKETS, 16)
    h = Handled(impl, latency=hist)
    try:
        before = time.perf_counter()
        h.rig.twilio_peer.sendall(media(0, b"\x01" * 160))
        h.handler()
        took = time.perf_counter() - before
    finally:
        h.close()
    assert h.calls == []
    assert hist.count == 1
    assert 0.0 <= hist.sum <= took
