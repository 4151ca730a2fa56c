"""UplinkJitterBuffer: one test per scenario (both implementations), properties, and a
differential test (compiled == reference for random push sequences)."""

from __future__ import annotations

import itertools
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.media import _codec, codec_ref

IMPLS = [pytest.param(_codec, id="compiled"), pytest.param(codec_ref, id="ref")]
W = 2**32


def counters(jb: object) -> dict[str, int]:
    names = (
        "gaps_filled",
        "silence_ms",
        "skipped_ms",
        "duplicates",
        "late_drops",
        "overflow_drops",
        "frames_out",
        "held",
        "held_ms",
    )
    return {n: getattr(jb, n) for n in names}


@pytest.mark.parametrize("impl", IMPLS)
def test_in_order_frames_are_released_at_once(impl: ModuleType) -> None:
    jb = impl.UplinkJitterBuffer()
    assert jb.push(1000, "a", 20) == [(1000, "a", 20)]  # the first push sets the base
    assert jb.push(1020, "b", 20) == [(1020, "b", 20)]
    assert jb.push(1040, "c") == [(1040, "c", 20)]  # duration defaults to frame_ms
    assert jb.frames_out == 3 and jb.gaps_filled == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_gap_is_filled_with_silence(impl: ModuleType) -> None:
    jb = impl.UplinkJitterBuffer()
    jb.push(0, "a", 20)
    assert jb.push(80, "e", 20) == [(20, None, 60), (80, "e", 20)]
    assert (jb.gaps_filled, jb.silence_ms, jb.skipped_ms) == (1, 60, 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_gap_fill_is_capped_and_the_rest_skipped(impl: ModuleType) -> None:
    jb = impl.UplinkJitterBuffer(max_fill_ms=100)
    jb.push(0, "a", 20)
    assert jb.push(1000, "z", 20) == [(20, None, 100), (1000, "z", 20)]
    assert (jb.silence_ms, jb.skipped_ms) == (100, 880)
    none = impl.UplinkJitterBuffer(max_fill_ms=0)
    none.push(0, "a", 20)
    assert none.push(100, "b", 20) == [(100, "b", 20)]
    assert (none.gaps_filled, none.skipped_ms) == (0, 80)


@pytest.mark.parametrize("impl", IMPLS)
def test_reordered_frames_with_reorder_window(impl: ModuleType) -> None:
    jb = impl.UplinkJitterBuffer(reorder_ms=60)
    jb.push(0, "a", 20)
    assert jb.push(40, "c", 20) == []  # held: 20 is missing
    assert jb.held == 1 and jb.held_ms == 20
    assert jb.push(20, "b", 20) == [(20, "b", 20), (40, "c", 20)]
    assert jb.gaps_filled == 0 and jb.late_drops == 0 and jb.held == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_reordered_frame_is_late_without_window(impl: ModuleType) -> None:
    jb = impl.UplinkJitterBuffer()  # reorder_ms=0: lowest latency, no waiting
    jb.push(0, "a", 20)
    assert jb.push(40, "c", 20) == [(20, None, 20), (40, "c", 20)]
    assert jb.push(20, "b", 20) == []
    assert jb.late_drops == 1 and jb.duplicates == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_reorder_window_expires_into_silence(impl: ModuleType) -> None:
    jb = impl.UplinkJitterBuffer(reorder_ms=40)
    jb.push(0, "a", 20)
    assert jb.push(40, "c", 20) == []
    assert jb.push(60, "d", 20) == []  # 40 ms held: not more than reorder_ms yet
    assert jb.push(80, "e", 20) == [(20, None, 20), (40, "c", 20), (60, "d", 20), (80, "e", 20)]
    assert jb.push(20, "b", 20) == []  # it gave up on 20: now late
    assert (jb.gaps_filled, jb.late_drops) == (1, 1)


@pytest.mark.parametrize("impl", IMPLS)
def test_duplicates(impl: ModuleType) -> None:
    jb = impl.UplinkJitterBuffer(reorder_ms=100)
    jb.push(0, "a", 20)
    jb.push(20, "b", 20)
    assert jb.push(20, "b again", 20) == []  # already released
    assert jb.push(60, "d", 20) == []
    assert jb.push(60, "d again", 20) == []  # already held
    assert jb.duplicates == 2 and jb.late_drops == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_late_frame_behind_release_point(impl: ModuleType) -> None:
    jb = impl.UplinkJitterBuffer()
    jb.push(1000, "a", 20)
    jb.push(1100, "f", 20)  # 1020..1100 released as silence
    assert jb.push(1040, "c", 20) == []
    assert jb.push(500, "old", 20) == []
    assert jb.late_drops == 2 and jb.duplicates == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_overflow_gives_up_the_oldest_gap(impl: ModuleType) -> None:
    jb = impl.UplinkJitterBuffer(reorder_ms=10_000, max_held=3)
    jb.push(0, "a", 20)
    for ts in (40, 60, 80):
        assert jb.push(ts, ts, 20) == []
    assert jb.held == 3
    out = jb.push(100, 100, 20)  # a 4th held frame would exceed max_held
    assert out == [(20, None, 20), (40, 40, 20), (60, 60, 20), (80, 80, 20), (100, 100, 20)]
    assert jb.overflow_drops == 1 and jb.held == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_flush_releases_everything_held(impl: ModuleType) -> None:
    jb = impl.UplinkJitterBuffer(reorder_ms=1000)
    jb.push(0, "a", 20)
    jb.push(40, "c", 20)
    jb.push(100, "f", 20)
    assert jb.flush() == [(20, None, 20), (40, "c", 20), (60, None, 40), (100, "f", 20)]
    assert jb.flush() == []
    assert jb.push(120, "g", 20) == [(120, "g", 20)]


@pytest.mark.parametrize("impl", IMPLS)
def test_timestamp_wraparound(impl: ModuleType) -> None:
    jb = impl.UplinkJitterBuffer()
    assert jb.push(W - 40, "a", 20) == [(W - 40, "a", 20)]
    assert jb.push(W - 20, "b", 20) == [(W - 20, "b", 20)]
    assert jb.push(0, "c", 20) == [(0, "c", 20)]
    assert jb.push(40, "e", 20) == [(20, None, 20), (40, "e", 20)]
    assert jb.push(W - 20, "b", 20) == []  # across the wrap: a duplicate, not "far ahead"
    assert jb.duplicates == 1
    gap = impl.UplinkJitterBuffer()
    gap.push(W - 20, "x", 20)
    assert gap.push(20, "y", 20) == [(0, None, 20), (20, "y", 20)]  # silence starts at 0
    held = impl.UplinkJitterBuffer(reorder_ms=100)
    held.push(W - 20, "x", 20)
    assert held.push(20, "z", 20) == []
    assert held.push(0, "y", 20) == [(0, "y", 20), (20, "z", 20)]


@pytest.mark.parametrize("impl", IMPLS)
def test_reset_sets_a_new_base_and_keeps_counters(impl: ModuleType) -> None:
    jb = impl.UplinkJitterBuffer(reorder_ms=100)
    jb.push(0, "a", 20)
    jb.push(40, "c", 20)
    jb.reset()
    assert jb.held == 0
    assert jb.push(5000, "new", 20) == [(5000, "new", 20)]
    assert jb.frames_out == 2


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arguments(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.UplinkJitterBuffer(frame_ms=0)
    with pytest.raises(ValueError):
        impl.UplinkJitterBuffer(max_held=0)
    with pytest.raises(ValueError):
        impl.UplinkJitterBuffer().push(0, "a", 0)


# -- properties ---------------------------------------------------------------------------

arrivals = st.lists(
    st.tuples(st.integers(0, 60), st.sampled_from(["ok", "ok", "ok", "dup", "drop", "swap"])),
    min_size=1,
    max_size=60,
)


def _scenario(base: int, ops: list[tuple[int, str]]) -> list[int]:
    """Frame indices in arrival order: in order with duplicates, losses and swaps."""
    order: list[int] = []
    for k, (_, op) in enumerate(ops):
        if op == "drop":
            continue
        if op == "swap" and order:
            order.insert(len(order) - 1, k)
        else:
            order.append(k)
        if op == "dup":
            order.append(k)
    return order


@settings(max_examples=80, deadline=None)
@given(
    base=st.integers(0, W - 1),
    ops=arrivals,
    reorder=st.sampled_from([0, 20, 60, 200]),
    max_held=st.integers(1, 8),
)
def test_output_is_ordered_contiguous_and_accounted(
    base: int, ops: list[tuple[int, str]], reorder: int, max_held: int
) -> None:
    order = _scenario(base, ops)
    jbs = [m.UplinkJitterBuffer(reorder_ms=reorder, max_held=max_held) for m in (_codec, codec_ref)]
    outs: list[list] = [[], []]
    for k in order:
        ts = (base + 20 * k) % W
        results = [jb.push(ts, k, 20) for jb in jbs]
        assert results[0] == results[1]  # differential
        for i in (0, 1):
            outs[i].extend(results[i])
    for i, jb in enumerate(jbs):
        outs[i].extend(jb.flush())
    assert outs[0] == outs[1]
    assert counters(jbs[0]) == counters(jbs[1])
    out, jb = outs[0], jbs[0]
    if not order:
        return
    # contiguous, never backwards (serial arithmetic across the wrap), no gap unfilled
    for (t0, _, d0), (t1, _, _) in itertools.pairwise(out):
        assert (t1 - (t0 + d0)) % W == 0
    frames = [p for _, p, _ in out if p is not None]
    assert frames == sorted(frames) and len(set(frames)) == len(frames)
    assert jb.frames_out + jb.duplicates + jb.late_drops == len(order)
    total = sum(d for _, _, d in out)
    assert total == 20 * (max(frames) - order[0] + 1)
    assert jb.silence_ms == sum(d for _, p, d in out if p is None)


@settings(max_examples=40, deadline=None)
@given(
    pushes=st.lists(
        st.tuples(st.integers(-200, 2000), st.integers(1, 60)), min_size=1, max_size=40
    ),
    reorder=st.sampled_from([0, 40, 100]),
    max_fill=st.sampled_from([0, 50, 2000]),
    start=st.sampled_from([0, W - 500, 123456]),
)
def test_random_timestamps_compiled_equals_reference(
    pushes: list[tuple[int, int]], reorder: int, max_fill: int, start: int
) -> None:
    """Arbitrary timestamps and durations (overlaps, odd sizes): same behaviour."""
    a = _codec.UplinkJitterBuffer(reorder_ms=reorder, max_fill_ms=max_fill, max_held=5)
    b = codec_ref.UplinkJitterBuffer(reorder_ms=reorder, max_fill_ms=max_fill, max_held=5)
    for i, (off, dur) in enumerate(pushes):
        ts = start + off
        assert a.push(ts, i, dur) == b.push(ts, i, dur)
    assert a.flush() == b.flush()
    assert counters(a) == counters(b)
