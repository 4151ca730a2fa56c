"""Fused Twilio paths: UlawToPcm (base64 μ-law 8 kHz -> PCM16 at 8/16/24 kHz) and
PcmToUlaw (PCM16 at 8/16/24 kHz -> μ-law 8 kHz, odd trailing byte carried).

Each must equal the composition of the separate steps, be chunk-size invariant, and the
compiled version must equal the reference bit for bit.
"""

from __future__ import annotations

import base64
import itertools
from types import ModuleType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.media import _codec, codec_ref

IMPLS = [pytest.param(_codec, id="compiled"), pytest.param(codec_ref, id="ref")]
RATES = (8000, 16000, 24000)


def ulaw_noise(n: int, seed: int) -> bytes:
    return bytes(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8))


def pcm_noise(n: int, seed: int, amp: float = 9000.0) -> bytes:
    x = np.random.default_rng(seed).standard_normal(n) * amp
    return np.clip(np.round(x), -32768, 32767).astype("<i2").tobytes()


# -- UlawToPcm ----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rate", RATES)
def test_uplink_equals_composition(impl: ModuleType, rate: int) -> None:
    frames = [ulaw_noise(160, i) for i in range(6)]
    up = impl.UlawToPcm(rate)
    rs = impl.Resampler(8000, rate)
    got, want = [], []
    for i, f in enumerate(frames):
        b64 = base64.b64encode(f)
        got.append(up.feed_b64(b64.decode() if i % 2 else b64))  # str and bytes payloads
        want.append(rs.process(impl.ulaw_decode(f)))
    got.append(up.flush())
    want.append(rs.flush())
    assert got == want
    assert up.out_rate == rate
    assert up.delay_ms == rs.delay_ms


@pytest.mark.parametrize("impl", IMPLS)
def test_uplink_feed_equals_feed_b64(impl: ModuleType) -> None:
    data = ulaw_noise(800, 5)
    a, b = impl.UlawToPcm(16000), impl.UlawToPcm(16000)
    assert a.feed(data) + a.flush() == b.feed_b64(base64.b64encode(data).decode()) + b.flush()
    assert a.feed(bytearray(data)) == b.feed(memoryview(data))


@pytest.mark.parametrize("impl", IMPLS)
def test_uplink_reset_and_errors(impl: ModuleType) -> None:
    up = impl.UlawToPcm(24000)
    first = up.feed(ulaw_noise(160, 1))
    up.feed(ulaw_noise(333, 2))
    up.reset()
    assert up.feed(ulaw_noise(160, 1)) == first
    with pytest.raises(ValueError):
        up.feed_b64("not base64!")
    with pytest.raises(ValueError):
        impl.UlawToPcm(44100)
    assert impl.UlawToPcm(8000).feed_b64("//8A") == impl.ulaw_decode(b"\xff\xff\x00")


def test_uplink_large_payload_beyond_scratch() -> None:
    """Payloads larger than the compiled module's 16 KiB scratch take the malloc path."""
    data = ulaw_noise(40000, 3)
    b64 = base64.b64encode(data).decode()
    for rate in RATES:
        a, b = _codec.UlawToPcm(rate), codec_ref.UlawToPcm(rate)
        assert a.feed_b64(b64) == b.feed_b64(b64)


@settings(max_examples=25, deadline=None)
@given(
    rate=st.sampled_from(RATES),
    sizes=st.lists(st.integers(0, 400), max_size=8),
    seed=st.integers(0, 2**16),
)
def test_uplink_compiled_equals_reference(rate: int, sizes: list[int], seed: int) -> None:
    a, b = _codec.UlawToPcm(rate), codec_ref.UlawToPcm(rate)
    for i, n in enumerate(sizes):
        payload = base64.b64encode(ulaw_noise(n, seed + i)).decode()
        assert a.feed_b64(payload) == b.feed_b64(payload)
    assert a.flush() == b.flush()


@settings(max_examples=30, deadline=None)
@given(
    rate=st.sampled_from(RATES),
    cuts=st.lists(st.integers(0, 1200), max_size=10),
    seed=st.integers(0, 2**16),
)
def test_uplink_chunking_invariance(rate: int, cuts: list[int], seed: int) -> None:
    data = ulaw_noise(1200, seed)
    whole = _codec.UlawToPcm(rate)
    want = whole.feed(data) + whole.flush()
    up = _codec.UlawToPcm(rate)
    pts = sorted({0, len(data), *cuts})
    got = b"".join(up.feed_b64(base64.b64encode(data[a:b])) for a, b in itertools.pairwise(pts))
    assert got + up.flush() == want


@settings(max_examples=40, deadline=None)
@given(
    rate=st.sampled_from(RATES),
    batches=st.lists(st.lists(st.integers(0, 400), max_size=5), max_size=6),
    seed=st.integers(0, 2**16),
)
def test_uplink_feed_b64_many_equals_one_by_one(
    rate: int, batches: list[list[int]], seed: int
) -> None:
    """One read's payloads in one call: the same PCM as feeding them one at a time, in both
    implementations (str and bytes payloads)."""
    one, many, ref = _codec.UlawToPcm(rate), _codec.UlawToPcm(rate), codec_ref.UlawToPcm(rate)
    for i, sizes in enumerate(batches):
        payloads: list[str | bytes] = [
            base64.b64encode(ulaw_noise(n, seed + 10 * i + j)) for j, n in enumerate(sizes)
        ]
        payloads = [p.decode() if j % 2 else p for j, p in enumerate(payloads)]
        want = b"".join(one.feed_b64(p) for p in payloads)
        assert many.feed_b64_many(payloads) == want
        assert ref.feed_b64_many(payloads) == want
    assert many.flush() == one.flush() == ref.flush()


@pytest.mark.parametrize("impl", IMPLS)
def test_uplink_feed_b64_many_bad_payload_feeds_nothing(impl: ModuleType) -> None:
    good = base64.b64encode(ulaw_noise(160, 7)).decode()
    a, b = impl.UlawToPcm(24000), impl.UlawToPcm(24000)
    with pytest.raises(ValueError):
        a.feed_b64_many([good, "not base64!"])
    assert a.feed_b64_many([good]) == b.feed_b64(good)  # the bad batch left no trace
    assert a.feed_b64_many([]) == b""


def test_uplink_feed_b64_many_beyond_scratch() -> None:
    """Batches larger than the compiled module's 16 KiB scratch take the malloc path."""
    payloads = [base64.b64encode(ulaw_noise(6000, i)).decode() for i in range(5)]
    for rate in RATES:
        a, b = _codec.UlawToPcm(rate), codec_ref.UlawToPcm(rate)
        assert a.feed_b64_many(payloads) == b.feed_b64_many(payloads)


# -- PcmToUlaw ----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rate", RATES)
def test_downlink_equals_composition(impl: ModuleType, rate: int) -> None:
    pcm = pcm_noise(rate // 10, rate)
    down = impl.PcmToUlaw(rate)
    rs = impl.Resampler(rate, 8000)
    frame = rate // 50 * 2
    got = b"".join(down.feed(pcm[i : i + frame]) for i in range(0, len(pcm), frame))
    want = b"".join(rs.process(pcm[i : i + frame]) for i in range(0, len(pcm), frame))
    assert got + down.flush() == impl.ulaw_encode(want + rs.flush())
    assert down.in_rate == rate


@pytest.mark.parametrize("impl", IMPLS)
def test_downlink_keeps_odd_trailing_byte(impl: ModuleType) -> None:
    pcm = pcm_noise(480, 11)
    whole = impl.PcmToUlaw(24000)
    want = whole.feed(pcm) + whole.flush()
    down = impl.PcmToUlaw(24000)
    parts = [down.feed(pcm[:1]), down.feed(pcm[1:2]), down.feed(pcm[2:301]), down.feed(pcm[301:])]
    assert b"".join(parts) + down.flush() == want
    # 8 kHz: no resampling, still carries the odd byte
    p8 = impl.PcmToUlaw(8000)
    assert p8.feed(pcm[:3]) == impl.ulaw_encode(pcm[:2])
    assert p8.feed(pcm[3:4]) == impl.ulaw_encode(pcm[2:4])
    assert p8.feed(pcm[4:5]) == b""
    assert p8.flush() == b""  # the pending half sample is dropped
    assert p8.feed(pcm[:2]) == impl.ulaw_encode(pcm[:2])


@pytest.mark.parametrize("impl", IMPLS)
def test_downlink_feed_b64_and_reset(impl: ModuleType) -> None:
    pcm = pcm_noise(320, 12)
    a, b = impl.PcmToUlaw(16000), impl.PcmToUlaw(16000)
    want = a.feed(pcm[:101]) + a.feed(pcm[101:])
    got = b.feed_b64(base64.b64encode(pcm[:101]).decode()) + b.feed_b64(base64.b64encode(pcm[101:]))
    assert got == want
    b.feed(pcm[:77])
    b.reset()
    c = impl.PcmToUlaw(16000)
    assert b.feed(pcm) == c.feed(pcm)
    with pytest.raises(ValueError):
        b.feed_b64("ab!c")
    with pytest.raises(ValueError):
        impl.PcmToUlaw(11025)


def test_downlink_large_payloads_with_carry() -> None:
    """Odd byte + payloads beyond the 16 KiB scratch (both feed and feed_b64 paths)."""
    pcm = pcm_noise(30001, 13)
    for rate in RATES:
        a, b = _codec.PcmToUlaw(rate), codec_ref.PcmToUlaw(rate)
        for lo, hi in ((0, 1), (1, 20001), (20001, 20002), (20002, 60002)):
            assert a.feed(pcm[lo:hi]) == b.feed(pcm[lo:hi])
        a.feed(pcm[:3])
        b.feed(pcm[:3])
        big = base64.b64encode(pcm[3:40003])
        assert a.feed_b64(big) == b.feed_b64(big)
        assert a.flush() == b.flush()


@settings(max_examples=30, deadline=None)
@given(
    rate=st.sampled_from(RATES),
    sizes=st.lists(st.integers(0, 700), max_size=8),
    seed=st.integers(0, 2**16),
    use_b64=st.booleans(),
)
def test_downlink_compiled_equals_reference(
    rate: int, sizes: list[int], seed: int, use_b64: bool
) -> None:
    a, b = _codec.PcmToUlaw(rate), codec_ref.PcmToUlaw(rate)
    for i, n in enumerate(sizes):
        data = pcm_noise(n, seed + i)[: n + (i % 2)]  # odd byte counts too
        if use_b64:
            payload = base64.b64encode(data).decode()
            assert a.feed_b64(payload) == b.feed_b64(payload)
        else:
            assert a.feed(data) == b.feed(data)
    assert a.flush() == b.flush()


@settings(max_examples=30, deadline=None)
@given(
    rate=st.sampled_from(RATES),
    cuts=st.lists(st.integers(0, 2000), max_size=10),
    seed=st.integers(0, 2**16),
)
def test_downlink_byte_chunking_invariance(rate: int, cuts: list[int], seed: int) -> None:
    data = pcm_noise(1000, seed)
    whole = _codec.PcmToUlaw(rate)
    want = whole.feed(data) + whole.flush()
    down = _codec.PcmToUlaw(rate)
    pts = sorted({0, len(data), *cuts})
    got = b"".join(down.feed(data[a:b]) for a, b in itertools.pairwise(pts))
    assert got + down.flush() == want
