"""Streaming resampler: bit-exact compiled vs reference, chunk-size invariance, exact
lengths, delay, and the frequency-domain requirements (deterministic sine sweeps):

* passband 300-3400 Hz ripple <= 0.1 dB (every pair);
* down to 8 kHz: every component above 4 kHz attenuated >= 70 dB;
* up from 8 kHz: images above 4 kHz >= 70 dB below the tone;
* 16<->24 kHz: the same 70 dB from 8 kHz (the 16 kHz Nyquist).
"""

from __future__ import annotations

import itertools
from fractions import Fraction
from types import ModuleType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.codec import fit_tone, peak_db
from relay.media import _codec, codec_ref

PAIRS = [
    (8000, 16000),
    (16000, 8000),
    (8000, 24000),
    (24000, 8000),
    (16000, 24000),
    (24000, 16000),
]
IMPLS = [pytest.param(_codec, id="compiled"), pytest.param(codec_ref, id="ref")]


def pcm(x: np.ndarray) -> bytes:
    return np.clip(np.round(x), -32768, 32767).astype("<i2").tobytes()


def samples(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype="<i2").astype(np.float64)


def stream(rs: object, data: bytes, chunk_bytes: int) -> bytes:
    out = [rs.process(data[i : i + chunk_bytes]) for i in range(0, len(data), chunk_bytes)]  # type: ignore[attr-defined]
    return b"".join(out) + rs.flush()  # type: ignore[attr-defined]


def noise(n: int, seed: int, amp: float = 8000.0) -> bytes:
    return pcm(np.random.default_rng(seed).standard_normal(n) * amp)


def expected_len(n: int, fin: int, fout: int) -> int:
    return int(Fraction(n * fout, fin) + Fraction(1, 2))  # round half up


# -- API, lengths, exactness --------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_delay_ms_is_exact_and_within_budget(impl: ModuleType) -> None:
    want = {16000: 44 / 16, 24000: 65 / 24, 48000: 78 / 48}  # (taps-1)/2 at the filter rate
    for fin, fout in PAIRS:
        rs = impl.Resampler(fin, fout)
        high = {frozenset((8000, 16000)): 16000, frozenset((8000, 24000)): 24000}.get(
            frozenset((fin, fout)), 48000
        )
        assert rs.delay_ms == pytest.approx(want[high], abs=1e-12)
        assert rs.delay_ms <= 3.0
        assert (rs.in_rate, rs.out_rate) == (fin, fout)
    assert impl.Resampler(16000, 16000).delay_ms == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_unsupported_rates_and_odd_bytes(impl: ModuleType) -> None:
    for fin, fout in ((8000, 44100), (48000, 8000), (0, 0), (16000, 12000)):
        with pytest.raises(ValueError):
            impl.Resampler(fin, fout)
    with pytest.raises(ValueError):
        impl.Resampler(8000, 16000).process(b"\x00\x00\x01")


@pytest.mark.parametrize("impl", IMPLS)
def test_equal_rates_pass_through(impl: ModuleType) -> None:
    rs = impl.Resampler(24000, 24000)
    data = noise(333, 1)
    assert rs.process(data) == data
    assert rs.process(memoryview(data)[:10]) == data[:10]
    assert rs.flush() == b""


@pytest.mark.parametrize("fin,fout", PAIRS)
def test_compiled_equals_reference(fin: int, fout: int) -> None:
    data = noise(fin // 50 * 3 + 7, fin + fout, amp=12000)
    a, b = _codec.Resampler(fin, fout), codec_ref.Resampler(fin, fout)
    assert stream(a, data, fin // 50 * 2) == stream(b, data, 4096 * 2)


def test_all_kernels_are_bit_identical() -> None:
    original = _codec._get_kernel()
    kernels = ["scalar", "sse", "avx2"]
    data = noise(4000, 7, amp=15000)
    outs = {}
    try:
        for name in kernels:
            try:
                _codec._set_kernel(name)
            except ValueError:  # no AVX2 on this CPU
                continue
            outs[name] = [stream(_codec.Resampler(*p), data, 320) for p in PAIRS]
    finally:
        _codec._set_kernel(original)
    assert len(outs) >= 2
    first = next(iter(outs.values()))
    for name, out in outs.items():
        assert out == first, name


@pytest.mark.parametrize("fin,fout", PAIRS)
def test_total_length_after_flush(fin: int, fout: int) -> None:
    for n in (0, 1, 2, 3, 5, 44, 159, 160, 161, 479, 480, 1001):
        rs = _codec.Resampler(fin, fout)
        out = rs.process(noise(n, n)) + rs.flush()
        assert len(out) // 2 == expected_len(n, fin, fout), n


@pytest.mark.parametrize("impl", IMPLS)
def test_flush_resets_and_reset_forgets(impl: ModuleType) -> None:
    data = noise(500, 3)
    fresh = impl.Resampler(8000, 24000)
    want = fresh.process(data) + fresh.flush()
    rs = impl.Resampler(8000, 24000)
    rs.process(noise(77, 4))
    rs.reset()
    assert rs.process(data) + rs.flush() == want
    assert rs.process(data) + rs.flush() == want  # flush() left it reset
    assert rs.flush() == b""


def test_saturates_instead_of_wrapping() -> None:
    square = np.tile(np.r_[np.full(20, 32766.0), np.full(20, -32766.0)], 40)
    for fin, fout in PAIRS:
        a = stream(_codec.Resampler(fin, fout), pcm(square), 640)
        assert a == stream(codec_ref.Resampler(fin, fout), pcm(square), 6400)
        y = samples(a)
        assert y.max() == 32767 and y.min() == -32768  # Gibbs overshoot clipped
        # the same square at half scale does not clip: full scale must be its clipped
        # double (a wrap-around would flip signs instead)
        half = samples(stream(_codec.Resampler(fin, fout), pcm(square / 2), 640))
        assert np.max(np.abs(y - np.clip(2 * half, -32768, 32767))) <= 2


# -- chunk-size invariance (property) ---------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    pair=st.sampled_from(PAIRS),
    n=st.integers(0, 2500),
    seed=st.integers(0, 2**16),
    cuts=st.lists(st.integers(0, 2500), max_size=12),
)
def test_chunking_never_changes_the_output(
    pair: tuple[int, int], n: int, seed: int, cuts: list[int]
) -> None:
    data = noise(n, seed, amp=14000)
    one = _codec.Resampler(*pair)
    whole = one.process(data) + one.flush()
    frames = stream(_codec.Resampler(*pair), data, pair[0] // 50 * 2)  # 20 ms frames
    rs = _codec.Resampler(*pair)
    points = sorted({0, n, *(c for c in cuts if c <= n)})
    pieces = [rs.process(data[2 * a : 2 * b]) for a, b in itertools.pairwise(points)]
    pieces.append(rs.process(b""))  # zero-length chunks are fine
    chunked = b"".join(pieces) + rs.flush()
    assert whole == frames == chunked
    assert len(whole) // 2 == expected_len(n, *pair)


@settings(max_examples=15, deadline=None)
@given(
    pair=st.sampled_from(PAIRS),
    n=st.integers(0, 900),
    seed=st.integers(0, 2**16),
    chunk=st.integers(1, 400),
)
def test_reference_matches_compiled_with_random_chunks(
    pair: tuple[int, int], n: int, seed: int, chunk: int
) -> None:
    data = noise(n, seed, amp=20000)
    assert stream(_codec.Resampler(*pair), data, 2 * chunk) == stream(
        codec_ref.Resampler(*pair), data, 2 * (chunk * 7 % 401 + 1)
    )


# -- delay ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fin,fout", PAIRS)
def test_output_is_time_aligned(fin: int, fout: int) -> None:
    """Linear phase + delay compensation: an impulse at input time t peaks at output
    time t exactly (the group delay is held back, not added to the stream)."""
    n_in = fin // 10
    at = fin // 50 * 3  # 60 ms: an instant on both sample grids
    x = np.zeros(n_in)
    x[at] = 20000
    y = samples(stream(_codec.Resampler(fin, fout), pcm(x), fin // 50 * 2))
    assert int(np.argmax(y)) == at * fout // fin


@pytest.mark.parametrize("fin,fout", PAIRS)
def test_held_back_audio_equals_delay_ms(fin: int, fout: int) -> None:
    """In 20 ms streaming the output lags the input by delay_ms (to one output sample)."""
    rs = _codec.Resampler(fin, fout)
    frame = noise(fin // 50, 9)
    produced = 0
    for k in range(1, 6):
        produced += len(rs.process(frame)) // 2
        ideal = k * fout // 50
        held_ms = (ideal - produced) * 1000 / fout
        assert rs.delay_ms - 1000 / fout < held_ms <= rs.delay_ms + 1e-9


# -- frequency response (sine sweeps) -------------------------------------------------------


def _tone(freq: float, rate: int, n: int, amp: float = 16000.0) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * np.arange(n) / rate + 0.3)


def _steady(y: np.ndarray, rate: int) -> np.ndarray:
    edge = rate // 100  # drop 10 ms at both ends (start-up and flush transients)
    return y[edge:-edge]


def _run_tone(fin: int, fout: int, freq: float, dur_s: float = 0.12) -> np.ndarray:
    x = _tone(freq, fin, int(fin * dur_s))
    return _steady(samples(stream(_codec.Resampler(fin, fout), pcm(x), fin // 50 * 2)), fout)


@pytest.mark.parametrize("fin,fout", PAIRS)
def test_passband_ripple_300_3400(fin: int, fout: int) -> None:
    gains = []
    for freq in range(300, 3401, 50):
        amp, _ = fit_tone(_run_tone(fin, fout, freq), freq, fout)
        gains.append(20 * np.log10(amp / 16000.0))
    assert max(gains) - min(gains) <= 0.1
    assert max(abs(g) for g in gains) <= 0.1  # and unity gain


@pytest.mark.parametrize("fin,fout", [(16000, 24000), (24000, 16000)])
def test_wideband_passband_to_7khz(fin: int, fout: int) -> None:
    gains = []
    for freq in range(100, 7001, 150):
        amp, _ = fit_tone(_run_tone(fin, fout, freq), freq, fout)
        gains.append(20 * np.log10(amp / 16000.0))
    assert max(gains) - min(gains) <= 0.1


@pytest.mark.parametrize(
    "fin,fout,edge", [(16000, 8000, 4000), (24000, 8000, 4000), (24000, 16000, 8000)]
)
def test_components_above_output_nyquist_are_70db_down(fin: int, fout: int, edge: int) -> None:
    """Every alias of an input tone at or above the output Nyquist is >= 70 dB down."""
    worst = -999.0
    for freq in range(edge, fin // 2 + 1, 50):
        worst = max(worst, peak_db(_run_tone(fin, fout, freq), 16000.0))
    assert worst <= -70.0, worst


@pytest.mark.parametrize(
    "fin,fout,edge", [(8000, 16000, 4000), (8000, 24000, 4000), (16000, 24000, 8000)]
)
def test_images_are_70db_down(fin: int, fout: int, edge: int) -> None:
    """Upsampling a tone f < edge creates images at k*fin +- f, all above edge: after
    removing the tone itself, every remaining component must be 70 dB below the input
    tone (in the 3.4-4 kHz transition band the tone itself is attenuated too, so the
    reference is the signal level the images came from)."""
    worst = -999.0
    for freq in range(100, edge - 99, 50):
        _, resid = fit_tone(_run_tone(fin, fout, freq), freq, fout)
        worst = max(worst, peak_db(resid, 16000.0))
    assert worst <= -70.0, worst


def test_filters_are_shared_and_meet_the_design() -> None:
    """One coefficient text in both modules; the taps are symmetric (linear phase) with
    unity DC gain, and odd length (integer group delay)."""
    assert _codec._FILTER_HEX == codec_ref._FILTER_HEX
    for rate, n in ((16000, 89), (24000, 131), (48000, 157)):
        taps = _codec._filter_taps(rate)
        assert taps == codec_ref._filter_taps(rate)
        assert len(taps) == n
        assert taps == taps[::-1]
        assert abs(sum(taps) - 1.0) < 1e-6
