"""Deterministic synthetic audio for tests, the simulator and the parrot agent.

Nothing here tries to be intelligible. The caller "speech" only has to look like speech to
an energy detector and sound like a voice to a person checking a WAV: voiced syllables
(a glottal pulse train shaped by vowel formants, about four per second) grouped into words,
words into utterances. Everything is seeded, so a test gets the same samples every run, and
vectorised with numpy so a minute of audio takes a fraction of a second.

Also here: numpy-friendly μ-law helpers over ``relay.media.codec``, frame energy in dBFS and an
offline speech-segment detector.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from ..media import codec

RATE = 8000  # Twilio media is always 8 kHz mono μ-law (Media Streams docs)
FRAME = 160  # 20 ms at 8 kHz: the frame size Twilio is observed to use

Int16Array = npt.NDArray[np.int16]

# --- G.711 μ-law (numpy views over the relay's own codec) ---------------------------------
ULAW_SILENCE = 0xFF  # encodes PCM 0


def mulaw_encode(pcm: npt.ArrayLike) -> bytes:
    """int16 samples (array or PCM16 LE bytes) -> μ-law bytes."""
    if isinstance(pcm, bytes | bytearray | memoryview):
        return codec.ulaw_encode(pcm)
    return codec.ulaw_encode(np.ascontiguousarray(pcm, dtype="<i2").tobytes())


def mulaw_decode(ulaw: bytes | bytearray | memoryview) -> Int16Array:
    """μ-law bytes -> int16 samples."""
    return np.frombuffer(codec.ulaw_decode(ulaw), dtype="<i2").astype(np.int16)


# --- levels and detection ----------------------------------------------------------------
def frame_dbfs(pcm: npt.ArrayLike, frame: int = FRAME) -> npt.NDArray[np.float64]:
    """Energy of each whole ``frame``-sample frame in dBFS (full-scale sine = -3 dBFS)."""
    x = np.asarray(pcm, dtype=np.float64)
    n = len(x) // frame
    if n == 0:
        return np.zeros(0)
    power = np.mean(np.square(x[: n * frame].reshape(n, frame)), axis=1)
    return 10.0 * np.log10(power / (32768.0**2) + 1e-12)


def detect_speech(
    pcm: npt.ArrayLike,
    *,
    threshold_dbfs: float = -40.0,
    min_speech_ms: int = 60,
    hangover_ms: int = 300,
    frame: int = FRAME,
    rate: int = RATE,
) -> list[tuple[float, float]]:
    """Speech segments ``(start_s, end_s)`` found by a plain energy gate.

    Speech starts once ``min_speech_ms`` of consecutive frames are above the threshold (the
    start is back-dated to the first of them) and ends after ``hangover_ms`` below it (the
    end is the last loud frame's end), so syllable gaps do not split an utterance.
    """
    loud = frame_dbfs(pcm, frame) > threshold_dbfs
    frame_s = frame / rate
    need = max(1, round(min_speech_ms / 1000 / frame_s))
    hang = max(1, round(hangover_ms / 1000 / frame_s))
    segments: list[tuple[float, float]] = []
    run = quiet = 0
    start = last_loud = -1
    for i, is_loud in enumerate(loud):
        if is_loud:
            run += 1
            quiet = 0
            last_loud = i
            if start < 0 and run >= need:
                start = i - need + 1
        else:
            run = 0
            if start >= 0:
                quiet += 1
                if quiet >= hang:
                    segments.append((start * frame_s, (last_loud + 1) * frame_s))
                    start = -1
    if start >= 0:
        segments.append((start * frame_s, (last_loud + 1) * frame_s))
    return segments


# --- voice synthesis ----------------------------------------------------------------------
# (F1, F2, F3) in Hz for a few vowels (Peterson & Barney averages, male voices).
_VOWELS = np.array(
    [
        (730, 1090, 2440),  # a
        (270, 2290, 3010),  # i
        (300, 870, 2240),  # u
        (530, 1840, 2480),  # e
        (570, 840, 2410),  # o
    ],
    dtype=np.float64,
)
_BANDWIDTHS = np.array([90.0, 120.0, 180.0])
_FORMANT_GAINS = np.array([1.0, 0.6, 0.3])


def _formant_gain(
    freqs: npt.NDArray[np.float64], formants: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Spectral envelope at ``freqs``: resonance peaks over a -6 dB/octave source tilt."""
    gain = np.zeros_like(freqs)
    for f, bw, g in zip(formants, _BANDWIDTHS, _FORMANT_GAINS, strict=True):
        gain += g / (1.0 + ((freqs - f) / (bw / 2.0)) ** 2)
    return (gain + 0.02) * (100.0 / np.maximum(freqs, 100.0))


def _envelope(n: int, attack: int, release: int) -> npt.NDArray[np.float64]:
    """Syllable amplitude: raised-cosine attack and release around a gentle hump."""
    env = 0.7 + 0.3 * np.sin(np.linspace(0.0, np.pi, n))
    a = min(attack, n // 2)
    r = min(release, n - a)
    if a:
        env[:a] *= np.sin(np.linspace(0.0, np.pi / 2, a)) ** 2
    if r:
        env[n - r :] *= np.cos(np.linspace(0.0, np.pi / 2, r)) ** 2
    return env


class _Voice:
    """One synthetic speaker; keeps its random state so consecutive segments continue."""

    def __init__(self, seed: int, f0: float | None, level_dbfs: float) -> None:
        self.rng = np.random.default_rng(seed)
        self.f0 = float(f0) if f0 is not None else float(self.rng.uniform(110.0, 220.0))
        self.rms = 32768.0 * 10.0 ** (level_dbfs / 20.0)

    def syllable(self, n: int, f0: float) -> npt.NDArray[np.float64]:
        rng = self.rng
        formants = _VOWELS[rng.integers(len(_VOWELS))] * rng.uniform(0.92, 1.08)
        # pitch glides a little inside the syllable, like intonation does
        contour = f0 * (1.0 + rng.uniform(-0.06, 0.06) * np.linspace(-1.0, 1.0, n))
        phase = 2.0 * np.pi * np.cumsum(contour) / RATE + rng.uniform(0, 2 * np.pi)
        harmonics = np.arange(1, int(3800.0 / (f0 * 1.1)) + 1, dtype=np.float64)
        amps = _formant_gain(harmonics * f0, formants)
        voiced = np.sin(np.outer(phase, harmonics)) @ amps
        voiced *= _envelope(n, attack=int(0.025 * RATE), release=int(0.04 * RATE))
        voiced /= np.sqrt(np.mean(voiced**2)) + 1e-9
        if rng.random() < 0.6:  # a consonant: a short high-passed noise burst at the onset
            m = min(n, int(rng.uniform(0.025, 0.06) * RATE))
            burst = np.diff(rng.standard_normal(m + 1)) * 0.35
            voiced[:m] += burst * _envelope(m, attack=m // 4, release=m // 2)
        return voiced * self.rms * rng.uniform(0.7, 1.0)  # stress varies syllable to syllable

    def speech(self, seconds: float) -> npt.NDArray[np.float64]:
        """``seconds`` of continuous talking: words of 1-3 syllables, short gaps between."""
        total = round(seconds * RATE)
        out = np.zeros(total)
        pos = 0
        rng = self.rng
        while pos < total:
            f_word = self.f0 * (1.0 - 0.12 * pos / max(total, 1))  # declination
            for _ in range(int(rng.integers(1, 4))):
                n = int(rng.uniform(0.18, 0.30) * RATE)
                syl = self.syllable(n, f_word * rng.uniform(0.94, 1.06))
                take = min(n, total - pos)
                out[pos : pos + take] = syl[:take]
                pos += take
                if pos >= total:
                    break
            pos += int(rng.uniform(0.03, 0.12) * RATE)  # word gap: far below any VAD hangover
        fade = min(total, int(0.02 * RATE))
        if fade:
            out[total - fade :] *= np.linspace(1.0, 0.0, fade)  # never end on a click
        return out


def _to_int16(x: npt.NDArray[np.float64]) -> Int16Array:
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)


def speech(
    seconds: float, *, seed: int = 0, f0: float | None = None, level_dbfs: float = -20.0
) -> Int16Array:
    """``seconds`` of speech-like int16 audio at 8 kHz (RMS of voiced parts ~ ``level_dbfs``)."""
    return _to_int16(_Voice(seed, f0, level_dbfs).speech(seconds))


def make_script(
    segments: Iterable[tuple[str, float]],
    *,
    seed: int = 0,
    f0: float | None = None,
    level_dbfs: float = -20.0,
    noise_dbfs: float | None = -66.0,
) -> Int16Array:
    """A caller's side of a call: ``[("speech", 1.5), ("silence", 2.0), ...]`` -> int16 8 kHz.

    One speaker throughout. ``noise_dbfs`` adds a faint line-noise floor (phone lines are
    never digitally silent); ``None`` keeps silences exactly zero.
    """
    voice = _Voice(seed, f0, level_dbfs)
    parts: list[npt.NDArray[np.float64]] = []
    for kind, seconds in segments:
        if seconds < 0:
            raise ValueError(f"segment length must be >= 0, got {seconds}")
        if kind == "speech":
            parts.append(voice.speech(seconds))
        elif kind == "silence":
            parts.append(np.zeros(round(seconds * RATE)))
        else:
            raise ValueError(f"unknown segment kind {kind!r} (use 'speech' or 'silence')")
    out = np.concatenate(parts) if parts else np.zeros(0)
    if noise_dbfs is not None and len(out):
        noise_rms = 32768.0 * 10.0 ** (noise_dbfs / 20.0)
        out = out + np.random.default_rng(seed + 1).standard_normal(len(out)) * noise_rms
    return _to_int16(out)


def default_caller_script(duration_s: float, *, seed: int = 0) -> Int16Array:
    """Turn-taking caller audio filling ``duration_s``: speak, then leave room for a reply.

    The pauses (3.5 s) exceed a typical end-of-turn silence (~0.6 s) plus the reply, so an
    echoing agent answers each utterance before the caller speaks again.
    """
    segments: list[tuple[str, float]] = [("silence", 1.5)]  # let a greeting play first
    total = 1.5
    rng = np.random.default_rng(seed)
    while total < duration_s:
        talk = float(rng.uniform(1.0, 2.2))
        segments += [("speech", talk), ("silence", 3.5)]
        total += talk + 3.5
    audio = make_script(segments, seed=seed)
    return audio[: round(duration_s * RATE)]


# --- chimes --------------------------------------------------------------------------------
def chime(
    notes_hz: Sequence[float],
    *,
    step_s: float = 0.14,
    ring_s: float = 0.5,
    level_dbfs: float = -14.0,
) -> Int16Array:
    """Bell-like arpeggio: each note starts ``step_s`` after the previous and rings out."""
    if not notes_hz:
        return np.zeros(0, dtype=np.int16)
    total = round((step_s * (len(notes_hz) - 1) + ring_s) * RATE)
    out = np.zeros(total)
    n = round(ring_s * RATE)
    t = np.arange(n) / RATE
    ring = np.exp(-t * 6.0) * np.minimum(1.0, t / 0.004)  # 4 ms attack: no click
    for i, f in enumerate(notes_hz):
        tone = np.sin(2 * np.pi * f * t) + 0.25 * np.sin(2 * np.pi * 2.0 * f * t) * np.exp(-t * 6)
        start = round(i * step_s * RATE)
        out[start : start + n] += tone * ring
    peak = np.max(np.abs(out)) or 1.0
    return _to_int16(out / peak * 32767.0 * 10.0 ** (level_dbfs / 20.0))


def greeting_chime() -> Int16Array:
    """Rising major arpeggio (E5 G5 C6), ~0.8 s: the parrot's "hello"."""
    return chime([659.25, 783.99, 1046.50])


def goodbye_chime() -> Int16Array:
    """Falling arpeggio (C6 G5 C5), ~0.8 s: the parrot's "goodbye"."""
    return chime([1046.50, 783.99, 523.25])
