"""Codec benchmark: ``python -m bench.codec [--quick] [--json PATH]``.

Per 20 ms frame (160 samples at 8 kHz, or 20 ms at the stated rate), nanoseconds per call
of relay.media._codec side by side with what Python relays use instead:

* G.711 μ-law / A-law encode and decode: ours, ``audioop``, a numpy lookup table;
* resampling 8->16, 8->24, 16->8, 24->8 kHz: ours, ``soxr.ResampleStream`` at HQ and at
  its lowest-delay setting QQ, ``audioop.ratecv``;
* the fused Twilio paths: uplink base64 μ-law -> PCM16 at 16/24 kHz in one call, and
  downlink PCM16 16/24 kHz -> μ-law, against the same work done with
  binascii + audioop (+ ratecv or soxr);
* the agent WebSocket's hot messages: caller audio spliced into masked append frames
  (``client_b64_frames``) against building each frame in Python, and an OpenAI audio delta
  from its frame to the AgentAudio event (``ServerFrameParser`` with the delta parsed in
  the reader) against the compiled and the Python frame reader followed by orjson.

Every candidate keeps its streaming state across calls (as in a real call).  Timings are
medians over rounds; in each round every candidate of a task is timed once, in rotating
order, so background noise hits all of them alike.  Ratios are "their time / ours".

Then a quality table per resampling direction: passband ripple 300-3400 Hz, the worst
alias/image component above 4 kHz (per component, re the input tone), and the latency in
20 ms streaming: audio held back (ideal output so far minus output produced) and the
alignment offset of what was produced (cross-correlating a chirp with its exact
resampled form).  Latency = held back + offset.

Results go to a table on stdout and to JSON (default bench/results/codec.json).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import save_json
from relay.media import _codec as ours

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import audioop
    except ImportError:  # Python >= 3.13
        audioop = None  # type: ignore[assignment]
try:
    import soxr
except ImportError:  # pragma: no cover - optional
    soxr = None  # type: ignore[assignment]

DEFAULT_JSON = Path(__file__).parent / "results" / "codec.json"
RESAMPLE_PAIRS = [(8000, 16000), (8000, 24000), (16000, 8000), (24000, 8000)]
ALL_PAIRS = [*RESAMPLE_PAIRS, (16000, 24000), (24000, 16000)]
SOXR_LOW = "QQ"  # soxr's quick (cubic) setting: the only one without block latency

Candidate = Callable[[], object]


def _frame(rate: int, seed: int = 1) -> bytes:
    """20 ms of speech-like PCM16 (band-limited noise, ~-15 dBFS)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(rate // 50) * 5000
    return np.clip(x, -32768, 32767).astype("<i2").tobytes()


# -- candidate factories (each returns a zero-argument callable processing one frame) ------


def _numpy_luts() -> dict[str, np.ndarray]:
    every = np.arange(-32768, 32768, dtype=np.int32).astype("<i2").tobytes()
    return {
        "ulaw_enc": np.frombuffer(ours.ulaw_encode(every), dtype=np.uint8)[::4].copy(),
        "alaw_enc": np.frombuffer(ours.alaw_encode(every), dtype=np.uint8)[::8].copy(),
        "ulaw_dec": np.frombuffer(ours.ulaw_decode(bytes(range(256))), dtype="<i2").copy(),
        "alaw_dec": np.frombuffer(ours.alaw_decode(bytes(range(256))), dtype="<i2").copy(),
    }


def g711_tasks() -> dict[str, dict[str, Candidate]]:
    pcm = _frame(8000)
    ulaw = ours.ulaw_encode(pcm)
    alaw = ours.alaw_encode(pcm)
    lut = _numpy_luts()
    tasks: dict[str, dict[str, Candidate]] = {
        "ulaw encode": {
            "ours": lambda: ours.ulaw_encode(pcm),
            "numpy LUT": lambda: lut["ulaw_enc"][
                (np.frombuffer(pcm, dtype="<i2") >> 2) + 8192
            ].tobytes(),
        },
        "ulaw decode": {
            "ours": lambda: ours.ulaw_decode(ulaw),
            "numpy LUT": lambda: lut["ulaw_dec"][np.frombuffer(ulaw, dtype=np.uint8)].tobytes(),
        },
        "alaw encode": {
            "ours": lambda: ours.alaw_encode(pcm),
            "numpy LUT": lambda: lut["alaw_enc"][
                (np.frombuffer(pcm, dtype="<i2") >> 3) + 4096
            ].tobytes(),
        },
        "alaw decode": {
            "ours": lambda: ours.alaw_decode(alaw),
            "numpy LUT": lambda: lut["alaw_dec"][np.frombuffer(alaw, dtype=np.uint8)].tobytes(),
        },
    }
    if audioop is not None:
        tasks["ulaw encode"]["audioop"] = lambda: audioop.lin2ulaw(pcm, 2)
        tasks["ulaw decode"]["audioop"] = lambda: audioop.ulaw2lin(ulaw, 2)
        tasks["alaw encode"]["audioop"] = lambda: audioop.lin2alaw(pcm, 2)
        tasks["alaw decode"]["audioop"] = lambda: audioop.alaw2lin(alaw, 2)
    return tasks


def _ratecv(fin: int, fout: int) -> Callable[[bytes], bytes]:
    state: list[Any] = [None]

    def run(data: bytes) -> bytes:
        out, state[0] = audioop.ratecv(data, 2, 1, fin, fout, state[0])
        return out

    return run


def _soxr(fin: int, fout: int, quality: str) -> Callable[[bytes], bytes]:
    stream = soxr.ResampleStream(fin, fout, 1, dtype="int16", quality=quality)

    def run(data: bytes) -> bytes:
        return stream.resample_chunk(np.frombuffer(data, dtype=np.int16)).tobytes()

    return run


def resample_tasks() -> dict[str, dict[str, Candidate]]:
    tasks: dict[str, dict[str, Candidate]] = {}
    for fin, fout in RESAMPLE_PAIRS:
        frame = _frame(fin)
        rs = ours.Resampler(fin, fout)
        cands: dict[str, Candidate] = {"ours": lambda rs=rs, f=frame: rs.process(f)}
        if soxr is not None:
            hq = _soxr(fin, fout, "HQ")
            low = _soxr(fin, fout, SOXR_LOW)
            cands["soxr HQ"] = lambda s=hq, f=frame: s(f)
            cands[f"soxr {SOXR_LOW}"] = lambda s=low, f=frame: s(f)
        if audioop is not None:
            cv = _ratecv(fin, fout)
            cands["audioop.ratecv"] = lambda s=cv, f=frame: s(f)
        tasks[f"resample {fin // 1000}k->{fout // 1000}k"] = cands
    return tasks


def fused_tasks() -> dict[str, dict[str, Candidate]]:
    tasks: dict[str, dict[str, Candidate]] = {}
    b64 = base64.b64encode(ours.ulaw_encode(_frame(8000))).decode()  # a Twilio payload
    for rate in (16000, 24000):
        up = ours.UlawToPcm(rate)
        cands: dict[str, Candidate] = {"ours (1 call)": lambda up=up: up.feed_b64(b64)}
        if audioop is not None:
            cv = _ratecv(8000, rate)
            cands["b64+audioop+ratecv"] = lambda cv=cv: cv(
                audioop.ulaw2lin(binascii.a2b_base64(b64), 2)
            )
            if soxr is not None:
                for q in ("HQ", SOXR_LOW):
                    sx = _soxr(8000, rate, q)
                    cands[f"b64+audioop+soxr {q}"] = lambda sx=sx: sx(
                        audioop.ulaw2lin(binascii.a2b_base64(b64), 2)
                    )
        tasks[f"uplink b64 ulaw->pcm {rate // 1000}k"] = cands
    for rate in (16000, 24000):
        pcm = _frame(rate)
        down = ours.PcmToUlaw(rate)
        cands = {"ours (1 call)": lambda down=down, pcm=pcm: down.feed(pcm)}
        if audioop is not None:
            cv = _ratecv(rate, 8000)
            cands["ratecv+audioop"] = lambda cv=cv, pcm=pcm: audioop.lin2ulaw(cv(pcm), 2)
            if soxr is not None:
                for q in ("HQ", SOXR_LOW):
                    sx = _soxr(rate, 8000, q)
                    cands[f"soxr {q}+audioop"] = lambda sx=sx, pcm=pcm: audioop.lin2ulaw(sx(pcm), 2)
        tasks[f"downlink pcm {rate // 1000}k->ulaw"] = cands
    return tasks


def wire_tasks() -> dict[str, dict[str, Candidate]]:
    """The media path's WebSocket frames: caller audio spliced into the agent's append
    message as masked client frames (one read's worth: 1 or 2 messages)."""
    from relay.agents.openai_protocol import _APPEND, OpenAIRealtimeProtocol
    from relay.media.websocket import OP_TEXT, build_frame

    b64 = base64.b64encode(ours.ulaw_encode(_frame(8000))).decode()  # a Twilio payload
    head, tail = OpenAIRealtimeProtocol.append_parts
    tasks: dict[str, dict[str, Candidate]] = {}
    for n in (1, 2):
        payloads = [b64] * n
        tasks[f"agent append frames x{n}"] = {
            "ours (1 call)": lambda p=payloads: ours.client_b64_frames(head, p, tail),
            "python: splice+frame+mask": lambda p=payloads: b"".join(
                [build_frame(OP_TEXT, _APPEND.b64(x).encode("utf-8"), True) for x in p]
            ),
        }
    return tasks


def _reader_candidates(wire: bytes) -> dict[str, Candidate]:
    from relay.agents.openai_protocol import OpenAIOptions, OpenAIRealtimeProtocol
    from relay.media.websocket import Control, FrameParser, ProtocolViolation

    parse = OpenAIRealtimeProtocol(OpenAIOptions()).parse_message
    fast = ours.ServerFrameParser(control=Control, violation=ProtocolViolation)
    fast.openai_audio = True
    compiled = ours.ServerFrameParser(control=Control, violation=ProtocolViolation)
    python = FrameParser(expect_masked=False)
    return {
        "ours (delta parsed in the reader)": lambda: [e for m in fast.feed(wire) for e in parse(m)],
        "compiled frames + orjson": lambda: [e for m in compiled.feed(wire) for e in parse(m)],
        "python frames + orjson": lambda: [e for m in python.feed(wire) for e in parse(m)],
    }


def reader_tasks() -> dict[str, dict[str, Candidate]]:
    """The agent -> relay hot message: one OpenAI Realtime audio delta (20 / 100 ms of
    μ-law) from its WebSocket frame to the protocol core's AgentAudio event."""
    from relay.media.websocket import OP_TEXT
    from relay.media.websocket import build_frame as frame

    tasks: dict[str, dict[str, Candidate]] = {}
    for ms in (20, 100):
        audio = ours.ulaw_encode(_frame(8000) * (ms // 20))
        message = {
            "type": "response.output_audio.delta",
            "event_id": "event_BRF3nWdHnv8SeY0ybFbBD",
            "response_id": "resp_BRF3nlGvMx6gq4xVoQGjp",
            "item_id": "item_BRF3nmnIOHJBMTB6hSvNc",
            "output_index": 0,
            "content_index": 0,
            "delta": base64.b64encode(audio).decode(),
        }
        wire = frame(OP_TEXT, json.dumps(message, separators=(",", ":")).encode())
        tasks[f"agent audio delta {ms} ms -> event"] = _reader_candidates(wire)
    return tasks


# -- timing -------------------------------------------------------------------------------


def _calibrate(fn: Candidate, target_s: float) -> int:
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= target_s / 4 or n >= 1 << 20:
            return max(1, int(n * target_s / max(dt, 1e-9)))
        n *= 4


def time_tasks(
    tasks: dict[str, dict[str, Candidate]], rounds: int, target_s: float
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """(median ns per call, median per-round ratio vs ours) per task and candidate.

    Candidates of a task are interleaved, in rotating order, each timed for ~target_s per
    round; the ratio is taken within each round and then the median over rounds, so load
    from other processes that drifts slower than a round cancels out."""
    times: dict[str, dict[str, float]] = {}
    ratios: dict[str, dict[str, float]] = {}
    for task, cands in tasks.items():
        names = list(cands)
        counts = {name: _calibrate(cands[name], target_s) for name in names}
        samples: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                fn, n = cands[name], counts[name]
                t0 = time.perf_counter_ns()
                for _ in range(n):
                    fn()
                samples[name].append((time.perf_counter_ns() - t0) / n)
        mine = samples[names[0]]  # "ours" is listed first
        times[task] = {name: statistics.median(v) for name, v in samples.items()}
        ratios[task] = {
            name: statistics.median(a / b for a, b in zip(v, mine, strict=True))
            for name, v in samples.items()
        }
    return times, ratios


# -- quality ------------------------------------------------------------------------------


class _Stream:
    """A resampler under test, fed 20 ms frames: ours, soxr (quality), or ratecv."""

    def __init__(self, kind: str, fin: int, fout: int) -> None:
        self.kind = kind
        if kind == "ours":
            rs = ours.Resampler(fin, fout)
            self._feed = rs.process
            self._end: Callable[[], bytes] = rs.flush
        elif kind.startswith("soxr"):
            s = soxr.ResampleStream(fin, fout, 1, dtype="int16", quality=kind.split()[1])
            self._feed = lambda b: s.resample_chunk(np.frombuffer(b, dtype=np.int16)).tobytes()
            self._end = lambda: s.resample_chunk(np.zeros(0, dtype=np.int16), last=True).tobytes()
        else:
            self._feed = _ratecv(fin, fout)
            self._end = lambda: b""

    def run(self, x: np.ndarray, frame: int) -> tuple[np.ndarray, list[int]]:
        """(all output incl. flush, output length after each frame)."""
        data = np.clip(np.round(x), -32768, 32767).astype("<i2").tobytes()
        outs, lengths, total = [], [], 0
        for i in range(0, len(data), 2 * frame):
            out = self._feed(data[i : i + 2 * frame])
            outs.append(out)
            total += len(out) // 2
            lengths.append(total)
        outs.append(self._end())
        return np.frombuffer(b"".join(outs), dtype="<i2").astype(np.float64), lengths


def fit_tone(y: np.ndarray, freq: float, rate: int) -> tuple[float, np.ndarray]:
    t = np.arange(len(y)) / rate
    basis = np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)], axis=1)
    coef, *_ = np.linalg.lstsq(basis, y, rcond=None)
    return float(np.hypot(*coef)), y - basis @ coef


def peak_db(y: np.ndarray, ref_amp: float) -> float:
    """Level of the strongest sinusoidal component of y, in dB re a tone of ref_amp.

    4-term Blackman-Harris window (sidelobes < -92 dB) and 8x zero padding (scalloping
    < 0.05 dB): each alias / image is measured separately, as a filter's stopband
    attenuation is specified per component. The resampler tests assert with it too."""
    n = len(y)
    k = np.arange(n)
    w = (
        0.35875
        - 0.48829 * np.cos(2 * np.pi * k / n)
        + 0.14128 * np.cos(4 * np.pi * k / n)
        - 0.01168 * np.cos(6 * np.pi * k / n)
    )
    spec = np.abs(np.fft.rfft(y * w, 8 * n)) * 2 / w.sum()
    return float(20 * np.log10(spec.max() / ref_amp + 1e-15))


def quality(kind: str, fin: int, fout: int, quick: bool) -> dict[str, float]:
    frame = fin // 50
    amp = 16000.0
    dur = 0.16
    n = int(fin * dur)
    t = np.arange(n) / fin
    step = 200 if quick else 50

    def steady(y: np.ndarray) -> np.ndarray:
        # The ideal length is n*fout/fin; skip 30 ms at both ends (start-up, flush tail).
        y = y[: n * fout // fin]
        edge = 3 * fout // 100
        return y[edge:-edge]

    gains = []
    for f in range(300, 3401, step):
        y, _ = _Stream(kind, fin, fout).run(amp * np.sin(2 * np.pi * f * t + 0.3), frame)
        gains.append(20 * np.log10(fit_tone(steady(y), f, fout)[0] / amp))
    worst = -999.0
    edge = min(fin, fout) // 2  # components beyond the lower Nyquist must go
    if fout < fin:
        freqs = range(edge, fin // 2 + 1, step)
    else:
        freqs = range(100, edge - 99, step)
    for f in freqs:
        y, _ = _Stream(kind, fin, fout).run(amp * np.sin(2 * np.pi * f * t + 0.3), frame)
        y = steady(y)
        if fout > fin:
            y = fit_tone(y, f, fout)[1]  # keep only the images
        worst = max(worst, peak_db(y, amp))

    # latency: 1 s chirp 300 -> 3400 Hz fed in 20 ms frames
    n = fin
    t = np.arange(n) / fin
    f0, f1 = 300.0, 3400.0

    def chirp(tt: np.ndarray) -> np.ndarray:
        return 12000 * np.sin(2 * np.pi * (f0 * tt + (f1 - f0) / 2 * tt**2))

    y, lengths = _Stream(kind, fin, fout).run(chirp(t), frame)
    held = [
        ((k + 1) * frame * fout / fin - produced) / fout * 1000
        for k, produced in enumerate(lengths)
    ]
    held = held[10:]  # steady state (after 200 ms)
    ideal = chirp(np.arange(n * fout // fin) / fout)
    m = min(len(y), len(ideal))
    corr = np.correlate(y[:m], ideal[:m], mode="full")
    lag = int(np.argmax(corr))
    # parabolic interpolation of the peak for sub-sample resolution
    if 0 < lag < len(corr) - 1:
        a, b, c = corr[lag - 1], corr[lag], corr[lag + 1]
        frac = 0.5 * (a - c) / (a - 2 * b + c)
    else:
        frac = 0.0
    offset_ms = (lag - (m - 1) + frac) / fout * 1000
    return {
        "ripple_db": max(gains) - min(gains),
        "stop_db": worst,
        "held_mean_ms": float(np.mean(held)),
        "held_max_ms": float(np.max(held)),
        "offset_ms": float(offset_ms),
        "latency_ms": float(np.mean(held) + offset_ms),
    }


def quality_table(quick: bool) -> dict[str, dict[str, dict[str, float]]]:
    kinds = ["ours"]
    if soxr is not None:
        kinds += ["soxr HQ", f"soxr {SOXR_LOW}"]
    if audioop is not None:
        kinds.append("audioop.ratecv")
    table: dict[str, dict[str, dict[str, float]]] = {}
    pairs = RESAMPLE_PAIRS if quick else ALL_PAIRS
    for fin, fout in pairs:
        row = {}
        for kind in kinds:
            if kind != "ours" and (fin, fout) not in RESAMPLE_PAIRS:
                continue
            row[kind] = quality(kind, fin, fout, quick)
        table[f"{fin // 1000}k->{fout // 1000}k"] = row
    return table


# -- report -------------------------------------------------------------------------------


def _print_timings(
    title: str, timed: tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]
) -> None:
    timings, ratios = timed
    print(f"\n{title}")
    print(f"{'task':<28} {'candidate':<24} {'ns/frame':>10} {'x ours':>8}")
    for task, cands in timings.items():
        label = task
        for name, ns in cands.items():
            ratio = "" if name.startswith("ours") else f"{ratios[task][name]:8.2f}"
            print(f"{label:<28} {name:<24} {ns:10.0f} {ratio:>8}")
            label = ""


def _print_quality(table: dict[str, dict[str, dict[str, float]]]) -> None:
    print("\nresampler quality (20 ms streaming)")
    print(
        f"{'pair':<10} {'resampler':<16} {'ripple dB':>9} {'stop/img dB':>11} "
        f"{'held ms':>8} {'max held':>8} {'offset ms':>9} {'latency ms':>10}"
    )
    for pair, row in table.items():
        for kind, q in row.items():
            print(
                f"{pair:<10} {kind:<16} {q['ripple_db']:9.3f} {q['stop_db']:11.1f} "
                f"{q['held_mean_ms']:8.2f} {q['held_max_ms']:8.2f} {q['offset_ms']:9.3f} "
                f"{q['latency_ms']:10.2f}"
            )
            pair = ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.codec", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and tones (~20 s)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    args = ap.parse_args(argv)
    rounds, target = (9, 0.001) if args.quick else (61, 0.001)
    started = time.time()
    g711 = time_tasks(g711_tasks(), rounds, target)
    resample = time_tasks(resample_tasks(), rounds, target)
    fused = time_tasks(fused_tasks(), rounds, target)
    wire = time_tasks(wire_tasks(), rounds, target)
    reader = time_tasks(reader_tasks(), rounds, target)
    qual = quality_table(args.quick)
    _print_timings("G.711, one 20 ms frame (160 samples)", g711)
    _print_timings("resampling, one 20 ms frame (streaming)", resample)
    _print_timings("fused Twilio paths, one 20 ms frame", fused)
    _print_timings("WebSocket frames to the agent, 20 ms frames", wire)
    _print_timings("WebSocket frames from the agent, one message", reader)
    _print_quality(qual)
    delays = {f"{a // 1000}k->{b // 1000}k": ours.Resampler(a, b).delay_ms for a, b in ALL_PAIRS}
    result = {
        "quick": args.quick,
        "rounds": rounds,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "fir_kernel": ours._get_kernel(),
        "soxr": getattr(soxr, "__version__", None),
        "audioop": audioop is not None,
        "unit": "ns per 20 ms frame, median over rounds; ratio = median per-round their/ours",
        "g711": {"ns": g711[0], "ratio": g711[1]},
        "resample": {"ns": resample[0], "ratio": resample[1]},
        "fused": {"ns": fused[0], "ratio": fused[1]},
        "wire": {"ns": wire[0], "ratio": wire[1]},
        "reader": {"ns": reader[0], "ratio": reader[1]},
        "quality": qual,
        "delay_ms": delays,
        "seconds": round(time.time() - started, 1),
    }
    save_json(args.json, result)
    print(f"\nwrote {args.json} ({result['seconds']} s, FIR kernel {result['fir_kernel']})")
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    raise SystemExit(main())
