"""Synthetic speech, chimes, μ-law tables and the offline speech detector."""

from __future__ import annotations

import itertools
import time
import warnings

import numpy as np
import pytest

from relay.sim import speech


def test_mulaw_tables_match_g711() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")  # removed in Python 3.13
    pcm = np.arange(-32768, 32768, dtype=np.int16)
    assert speech.mulaw_encode(pcm) == audioop.lin2ulaw(pcm.tobytes(), 2)
    every = bytes(range(256))
    assert speech.mulaw_decode(every).tobytes() == audioop.ulaw2lin(every, 2)


def test_mulaw_known_values() -> None:
    assert speech.mulaw_encode(np.array([0, 32767, -32768], dtype=np.int16)) == b"\xff\x80\x00"
    assert speech.mulaw_decode(b"\xff\x7f").tolist() == [0, 0]
    assert speech.mulaw_encode(np.zeros(4, dtype=np.int16).tobytes()) == b"\xff" * 4  # bytes in
    # round trip error stays within the μ-law step size
    x = np.linspace(-30000, 30000, 1001).astype(np.int16)
    y = speech.mulaw_decode(speech.mulaw_encode(x)).astype(int)
    assert np.all(np.abs(y - x) <= np.abs(x) / 16 + 8)


def test_speech_is_deterministic_and_speech_like() -> None:
    a = speech.speech(3.0, seed=7)
    assert a.dtype == np.int16 and len(a) == 24000
    assert np.array_equal(a, speech.speech(3.0, seed=7))
    assert not np.array_equal(a, speech.speech(3.0, seed=8))
    levels = speech.frame_dbfs(a)
    loud = levels[levels > -40]
    assert -24 < np.median(loud) < -16  # around the -20 dBFS target
    assert np.mean(levels > -40) > 0.6  # mostly voiced...
    assert np.min(levels) < -30  # ...with syllable and word gaps
    # pitch in the voice range: strongest autocorrelation lag of a voiced chunk
    chunk = a[4000:4800].astype(float)
    ac = np.correlate(chunk, chunk, "full")[len(chunk) - 1 :]
    lag = np.argmax(ac[8000 // 260 : 8000 // 90]) + 8000 // 260
    assert 90 <= 8000 / lag <= 260


def test_make_script_layout_and_detection() -> None:
    audio = speech.make_script(
        [("silence", 0.5), ("speech", 1.5), ("silence", 1.0), ("speech", 0.7)], seed=1
    )
    assert len(audio) == int(3.7 * 8000)
    segments = speech.detect_speech(audio)
    assert len(segments) == 2
    (s1, e1), (s2, e2) = segments
    assert s1 == pytest.approx(0.5, abs=0.06) and e1 == pytest.approx(2.0, abs=0.06)
    assert s2 == pytest.approx(3.0, abs=0.06) and e2 == pytest.approx(3.7, abs=0.06)
    assert np.abs(audio[:3000]).max() < 100  # faint line noise, not digital silence
    silent = speech.make_script([("silence", 0.1)], noise_dbfs=None)
    assert not silent.any()
    with pytest.raises(ValueError):
        speech.make_script([("shouting", 1.0)])


def test_default_script_and_speed() -> None:
    t = time.perf_counter()
    audio = speech.default_caller_script(30.0, seed=3)
    assert time.perf_counter() - t < 1.0
    assert len(audio) == 30 * 8000
    segments = speech.detect_speech(audio)
    assert len(segments) >= 5
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(segments)]
    assert min(gaps) > 3.0  # room for a reply between utterances


def test_chimes() -> None:
    hello, bye = speech.greeting_chime(), speech.goodbye_chime()
    assert 0.6 <= len(hello) / 8000 <= 1.0 and len(bye) == len(hello)
    peak_dbfs = 20 * np.log10(np.abs(hello).max() / 32768)
    assert peak_dbfs == pytest.approx(-14, abs=0.5)
    assert abs(int(hello[0])) < 200 and abs(int(hello[-1])) < 200  # no clicks
    assert not np.array_equal(hello, bye)
    assert len(speech.chime([])) == 0
