"""Measurement bookkeeping: per-frame leg accounting, percentiles, run validity.

Clock: every timestamp is ``time.monotonic_ns()`` (CLOCK_MONOTONIC), which is system-wide
on Linux, so times taken in different processes are comparable. In practice the load
generator and the fake agent share one process and one loop anyway.
"""

from __future__ import annotations

import binascii
import bisect
import math
import struct
from collections.abc import Iterable, Sequence

NS_PER_MS = 1_000_000

# Frame marker embedded in μ-law payloads on passthrough legs. The relay forwards μ-law
# bytes untouched, so a 9-byte header at a known spot survives end to end:
#   magic (2) | call id (u16) | frame sequence (u32) | check byte (u8)
# Filler bytes never contain 0xA5, so the magic cannot appear by accident outside a
# header; the check byte rejects the rare false hit inside a header's own fields.
MAGIC = b"\xa5\x5a"
HEADER = struct.Struct(">2sHIB")
HEADER_LEN = HEADER.size  # 9: a multiple of 3, so its base64 concatenates cleanly


def header_check(call: int, seq: int) -> int:
    return (call * 31 + seq * 7 + 0x5A) & 0xFF


def make_header(call: int, seq: int) -> bytes:
    return HEADER.pack(MAGIC, call, seq, header_check(call, seq))


def scan_headers(data: bytes) -> tuple[list[tuple[int, int, int]], bytes]:
    """Find frame headers in ``data``; returns ``[(offset, call, seq)]`` and the bytes to
    carry into the next chunk (a header split across two messages)."""
    out: list[tuple[int, int, int]] = []
    find = data.find
    n = len(data)
    i = find(MAGIC)
    unpack = HEADER.unpack_from
    while i >= 0:
        if i + HEADER_LEN > n:
            return out, data[i:]
        _, call, seq, chk = unpack(data, i)
        if chk == (call * 31 + seq * 7 + 0x5A) & 0xFF:
            out.append((i, call, seq))
            i = find(MAGIC, i + HEADER_LEN)
        else:
            i = find(MAGIC, i + 1)
    return out, (data[-1:] if data[-1:] == MAGIC[:1] else b"")


def b64_decoded_len(b64: str | bytes) -> int:
    """Decoded size of a base64 string without decoding it."""
    n = len(b64)
    if n == 0:
        return 0
    pad = (b64[-1] in ("=", 61)) + (n > 1 and b64[-2] in ("=", 61))
    return n * 3 // 4 - pad


class MarkerTracker:
    """Finds the markers of one passthrough leg in a stream of base64 μ-law payloads.

    A frame of ``frame_bytes`` counts as delivered once all but its last ``allowance``
    bytes have arrived, whatever way the target re-chunks the stream. Fast path: the
    payload is one frame with its marker first (what a passthrough relay forwards), so
    only the first 12 base64 characters are decoded. ``resolve(call)`` gives the Leg a
    marker belongs to (None: not ours); markers of another call count as misrouted.
    """

    __slots__ = (
        "allowance",
        "carry",
        "expected",
        "frame_bytes",
        "misrouted",
        "pending",
        "pos",
        "resolve",
        "unknown",
    )

    def __init__(self, frame_bytes: int, allowance: int, resolve, expected: int = -1) -> None:
        self.frame_bytes = frame_bytes
        self.allowance = allowance
        self.resolve = resolve
        self.expected = expected
        self.pos = 0
        self.carry = b""
        self.pending: list[tuple[int, Leg, int]] = []
        self.misrouted = 0
        self.unknown = 0

    def feed(self, b64: str | bytes, now: int) -> int:
        """Account one payload; returns its decoded size in bytes."""
        n = b64_decoded_len(b64)
        start = self.pos
        end = self.pos = start + n
        if not self.carry and n <= self.frame_bytes:
            head = binascii.a2b_base64(b64[:12])
            if head[:2] == MAGIC:
                _, call, seq, chk = HEADER.unpack(head)
                if chk == (call * 31 + seq * 7 + 0x5A) & 0xFF:
                    if (
                        not self.pending
                        and n >= self.frame_bytes - self.allowance
                        and (call == self.expected or self.expected < 0)
                    ):
                        # the common case, a whole frame: deliver without bookkeeping
                        leg = self.resolve(call)
                        if leg is not None:
                            leg.received(seq, now)
                            return n
                    self._found(call, seq, start)
                    self._deliver(end, now)
                    return n
        data = binascii.a2b_base64(b64)
        if self.carry:
            data = self.carry + data
        base = end - len(data)
        found, self.carry = scan_headers(data)
        for off, call, seq in found:
            self._found(call, seq, base + off)
        self._deliver(end, now)
        return n

    def _found(self, call: int, seq: int, pos: int) -> None:
        if call != self.expected and self.expected >= 0:
            self.misrouted += 1
            return
        leg = self.resolve(call)
        if leg is None:
            self.unknown += 1
            return
        self.pending.append((pos + self.frame_bytes - self.allowance, leg, seq))

    def _deliver(self, end: int, now: int) -> None:
        pending = self.pending
        while pending and pending[0][0] <= end:
            _, leg, seq = pending.pop(0)
            leg.received(seq, now)


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence (None when empty).

    Nearest rank (no interpolation) always returns an observed value, which is what a
    latency tail should report: p99.9 of 1,000 samples is the largest-but-0 sample.
    """
    n = len(sorted_values)
    if n == 0:
        return None
    if p <= 0:
        return sorted_values[0]
    # round() first: 99.9 / 100 * 1000 is 999.0000000000001 in floating point
    rank = math.ceil(round(p * n / 100.0, 9))
    return sorted_values[min(max(rank, 1), n) - 1]


def summarize_ns(values: Iterable[int]) -> dict:
    """p50/p99/p99.9/max/mean in milliseconds of nanosecond samples."""
    vals = sorted(values)
    out: dict = {"count": len(vals)}
    for key, p in (("p50_ms", 50), ("p99_ms", 99), ("p999_ms", 99.9)):
        v = percentile(vals, p)
        out[key] = None if v is None else round(v / NS_PER_MS, 3)
    out["max_ms"] = round(vals[-1] / NS_PER_MS, 3) if vals else None
    out["mean_ms"] = round(sum(vals) / len(vals) / NS_PER_MS, 3) if vals else None
    return out


def cdf_points(values: Sequence[int], points: int = 100) -> list[list[float]]:
    """A compact CDF as ``[ms, fraction]`` pairs for plots and the JSON file.

    Evenly spaced quantiles up to 0.99, then log-spaced ones into the tail (0.999,
    0.9999, ...) and the maximum, so p99.9 is visible on a tail plot.
    """
    vals = sorted(values)
    n = len(vals)
    if n == 0:
        return []
    qs = [i / points * 0.99 for i in range(points + 1)]
    qs += [1 - 10 ** -(2 + k / 8) for k in range(1, 17)]
    out = []
    for q in qs:
        idx = min(n - 1, int(q * n))
        out.append([round(vals[idx] / NS_PER_MS, 4), round(q, 6)])
    out.append([round(vals[-1] / NS_PER_MS, 4), 1.0])
    return out


class Window:
    """The steady-state measurement window ``[start, end)`` in monotonic ns.

    Shared by reference between all legs so the harness can open and close it once.
    """

    __slots__ = ("end", "start")

    def __init__(self) -> None:
        self.start = math.inf
        self.end = math.inf

    def contains(self, t: int) -> bool:
        return self.start <= t < self.end


class Leg:
    """One direction of one call: frames numbered 0, 1, ... in send order.

    ``sent(t)`` records a frame's send time; ``received(seq, t)`` its arrival (from a
    marker, or from a level code on transcoded legs). Latency samples are kept only for
    frames sent inside the window, into a list shared by all calls of that leg.
    """

    __slots__ = (
        "bogus",
        "dups",
        "max_seq",
        "reorders",
        "seen",
        "send_times",
        "sink",
        "window",
    )

    def __init__(self, window: Window, sink: list[int]) -> None:
        self.window = window
        self.sink = sink
        self.send_times: list[int] = []
        self.seen = bytearray()
        self.max_seq = -1
        self.dups = 0
        self.reorders = 0
        self.bogus = 0

    def sent(self, t: int) -> None:
        self.send_times.append(t)
        self.seen.append(0)

    def received(self, seq: int, t: int) -> None:
        send_times = self.send_times
        if seq < 0 or seq >= len(send_times):
            self.bogus += 1
            return
        seen = self.seen
        if seen[seq]:
            self.dups += 1
            return
        seen[seq] = 1
        if seq < self.max_seq:
            self.reorders += 1
        else:
            self.max_seq = seq
        ts = send_times[seq]
        w = self.window
        if w.start <= ts < w.end:
            self.sink.append(t - ts)

    def lost(self, lo: float, hi: float) -> int:
        """Frames sent in ``[lo, hi)`` that never arrived."""
        seen = self.seen
        return sum(1 for i, ts in enumerate(self.send_times) if lo <= ts < hi and not seen[i])

    def sent_in(self, lo: float, hi: float) -> int:
        return sum(1 for ts in self.send_times if lo <= ts < hi)


def leg_totals(legs: Iterable[Leg], lo: float, hi: float) -> dict:
    """Loss/duplication/reordering summed over calls, for frames sent in ``[lo, hi)``."""
    sent = lost = dups = reorders = bogus = 0
    for leg in legs:
        sent += leg.sent_in(lo, hi)
        lost += leg.lost(lo, hi)
        dups += leg.dups
        reorders += leg.reorders
        bogus += leg.bogus
    return {
        "frames_checked": sent,
        "lost": lost,
        "duplicated": dups,
        "reordered": reorders,
        "unknown": bogus,
    }


# A load generator that is itself busy cannot tell its own delays from the relay's.
MAX_LOADGEN_CPU_PCT = 85.0
MAX_LOADGEN_LATE_P99_MS = 5.0


def loadgen_validity(
    cpu_pct: float | None,
    late_p99_ms: float | None,
    max_cpu_pct: float = MAX_LOADGEN_CPU_PCT,
    max_late_p99_ms: float = MAX_LOADGEN_LATE_P99_MS,
) -> tuple[bool, list[str]]:
    """Is the run trustworthy? INVALID when the generator process used more than
    ``max_cpu_pct`` of its core or its timers ran late (p99) by more than
    ``max_late_p99_ms``: then measured latency would include the generator's own queueing.
    """
    reasons = []
    if cpu_pct is not None and cpu_pct > max_cpu_pct:
        reasons.append(f"load generator CPU {cpu_pct:.0f}% > {max_cpu_pct:.0f}% of its core")
    if late_p99_ms is not None and late_p99_ms > max_late_p99_ms:
        reasons.append(
            f"load generator behind schedule: timer lateness p99 {late_p99_ms:.1f} ms"
            f" > {max_late_p99_ms:.0f} ms"
        )
    return (not reasons), reasons


# -- transcoded legs: frames identified by a DC level code --------------------------------
#
# When the relay resamples (μ-law 8 kHz <-> PCM16 24 kHz) no byte survives, so a
# transcoded leg carries frame identity in the *signal*: every uplink frame (20 ms) and
# every downlink delta (100 ms) is a constant level, level = LEVELS[frame % LEVEL_COUNT].
# A resampler has unity gain at DC, so the middle of each frame comes out as a flat
# plateau at that level whatever the filter (the transitions between frames are smeared,
# the middles are not). The reader checks the level at each frame's middle: a match
# confirms the frame, a different level re-anchors (frames skipped = lost; an earlier
# frame = duplicate or reordered), and no level (a transition, inserted silence) triggers
# a search for the next level boundary. So loss, duplication and reordering stay
# detectable on transcoded legs, and audio a target drops before its agent session is up
# does not shift every later frame (which plain sample counting would do).
# The levels are G.711 μ-law reconstruction values, so a standard μ-law encoder maps each
# one back to the same code byte exactly.

LEVEL_COUNT = 64


def ulaw_to_linear(code: int) -> int:
    """Standard G.711 μ-law decoding of one code byte."""
    u = ~code & 0xFF
    mag = (((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 7)
    mag -= 0x84
    return -mag if u & 0x80 else mag


ULAW_LINEAR = [ulaw_to_linear(c) for c in range(256)]


def linear_to_ulaw(v: int) -> int:
    """Standard G.711 μ-law encoding of one PCM16 sample."""
    sign = 0x80 if v < 0 else 0
    mag = min(-v if sign else v, 32635) + 0x84
    x = mag >> 7
    exponent = x.bit_length() - 1 if x else 0
    mantissa = (mag >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def _level_codes() -> list[int]:
    # Exponent segments 3..6 (|x| ~ 400..8000: clear of silence and of clipping), every
    # other mantissa step (>= 6% apart), both signs: 64 codes.
    codes = []
    for seg in (3, 4, 5, 6):
        for step in range(0, 16, 2):
            for sign in (0x80, 0x00):
                codes.append(~(sign | (seg << 4) | step) & 0xFF)
    return codes


LEVEL_CODES = _level_codes()
LEVEL_VALUES = [ULAW_LINEAR[c] for c in LEVEL_CODES]
_CODE_INDEX = {c: i for i, c in enumerate(LEVEL_CODES)}
_VALUE_INDEX = {v: i for i, v in enumerate(LEVEL_VALUES)}
_SORTED = sorted((v, i) for i, v in enumerate(LEVEL_VALUES))
_SORTED_VALUES = [v for v, _ in _SORTED]


def level_of_value(v: int) -> int | None:
    """Level index of a PCM sample value (nearest level within 2%), or None."""
    i = _VALUE_INDEX.get(v)
    if i is not None:
        return i
    j = bisect.bisect_left(_SORTED_VALUES, v)
    best = None
    for cand in (j - 1, j):
        if 0 <= cand < len(_SORTED):
            lv, idx = _SORTED[cand]
            if abs(lv - v) <= max(8, abs(lv) // 50):
                best = idx
    return best


def level_of_ulaw(code: int) -> int | None:
    """Level index of a μ-law byte (exact code, else via its linear value)."""
    i = _CODE_INDEX.get(code)
    return i if i is not None else level_of_value(ULAW_LINEAR[code])


class LevelTracker:
    """Identifies frames of one transcoded leg in the received sample stream.

    ``frame_len`` samples per frame at the received rate; a frame counts as delivered
    when all but its last ``allowance`` samples have arrived (the allowance absorbs a
    resampler's algorithmic hold-back). ``feed(samples, ulaw, now)`` takes a sequence of
    ints (PCM16 samples, or μ-law code bytes when ``ulaw``).

    Anchoring needs a frame boundary: the start of a plateau (at least ``PLATEAU``
    consecutive stride-8 samples at one level) that follows another plateau or quiet
    samples. Values crossed while the signal moves between two levels never hold still
    that long, so they are not mistaken for frames.
    """

    PLATEAU = 3
    STRIDE = 8
    QUIET = 200

    __slots__ = (
        "allowance",
        "anchor_k",
        "anchor_pos",
        "anchored",
        "frame_len",
        "leg",
        "pending",
        "pos",
        "prev",
        "resyncs",
        "run",
    )

    def __init__(self, leg: Leg, frame_len: int, allowance: int) -> None:
        self.leg = leg
        self.frame_len = frame_len
        self.allowance = allowance
        self.pos = 0  # stream samples seen so far
        self.anchor_pos: int | None = None  # stream position where frame anchor_k starts
        self.anchor_k = 0
        self.pending: list[tuple[int, int]] = []  # (deliver at stream pos, frame)
        self.resyncs = 0
        self.anchored = False  # the stream has been anchored once (see _sync)
        self._reset_sync()

    def _reset_sync(self) -> None:
        # run: [level or "quiet" or None, first pos, stride count, last pos]
        self.run: list = [None, 0, 0, 0]
        # prev: the last completed plateau or quiet run: (kind, last pos)
        self.prev: tuple | None = None

    def feed(self, samples, ulaw: bool, now: int) -> None:
        start = self.pos
        end = start + len(samples)
        self.pos = end
        L = self.frame_len
        if self.anchor_pos is None:
            self._sync(samples, start, ulaw)
        if self.anchor_pos is not None:
            half = L // 2
            j = max(0, -(-(start - self.anchor_pos - half) // L))
            while True:
                mid = self.anchor_pos + j * L + half
                if mid >= end:
                    break
                if mid >= start:
                    v = samples[mid - start]
                    level = level_of_ulaw(v) if ulaw else level_of_value(v)
                    if level is None:
                        self.anchor_pos = None  # lost track: find the next boundary
                        self.resyncs += 1
                        self._reset_sync()
                        self._sync(samples[mid - start :], mid, ulaw)
                        if self.anchor_pos is None:
                            break
                        j = max(0, -(-(mid - self.anchor_pos - half) // L))
                        continue
                    k = self.anchor_k + j
                    if level != k % LEVEL_COUNT:
                        k = self._nearest(k, level)
                        self.anchor_pos, self.anchor_k, j = mid - half, k, 0
                    self.pending.append((mid - half + L - self.allowance, k))
                j += 1
        pending = self.pending
        while pending and pending[0][0] <= end:
            self.leg.received(pending.pop(0)[1], now)

    def _nearest(self, k: int, level: int) -> int:
        """The frame number with residue ``level`` nearest to ``k``, never one not yet sent."""
        base = k - ((k - level) % LEVEL_COUNT)
        sent = len(self.leg.send_times)
        cands = [c for c in (base, base + LEVEL_COUNT) if 0 <= c < sent]
        if not cands:
            return max(0, min(base, sent - 1))
        return min(cands, key=lambda c: abs(c - k))

    def _sync(self, samples, start: int, ulaw: bool) -> None:
        """Scan (stride 8) for a frame boundary and anchor the frame that starts there."""
        run = self.run
        quiet = self.QUIET
        for i in range(0, len(samples), self.STRIDE):
            v = samples[i]
            if ulaw:
                level = level_of_ulaw(v)
                v = ULAW_LINEAR[v]
            else:
                level = level_of_value(v)
            kind = level if level is not None else ("quiet" if -quiet < v < quiet else None)
            p = start + i
            if kind is not None and kind == run[0]:
                run[2] += 1
                run[3] = p
            else:
                if run[0] is not None and run[2] >= self.PLATEAU:
                    self.prev = (run[0], run[3])
                elif run[0] is None or run[2] < self.PLATEAU:
                    pass  # a transition sample: keep the last real run in prev
                run[:] = [kind, p, 1, p]
            if run[2] == self.PLATEAU and isinstance(run[0], int):
                prev = self.prev
                if prev is not None and prev[0] != run[0]:
                    boundary = (prev[1] + run[1] + 1) // 2 if prev[0] != "quiet" else run[1] - 4
                    sent = len(self.leg.send_times)
                    # the newest sent frame with this residue: latency < 64 frames
                    k = sent - 1 - ((sent - 1 - run[0]) % LEVEL_COUNT) if sent else 0
                    if not self.anchored:
                        # The stream's first anchor: every frame before it in the stream
                        # was forwarded ahead of it, so it is at least frame boundary // L
                        # (-1: a resampler transient in front). Take the oldest candidate
                        # from there: a target that held the call's first audio for more
                        # than 64 frames (agent connect under load) and then forwarded it
                        # would otherwise be anchored 64 frames ahead for the whole call.
                        # (Still ambiguous: a target that *dropped* >= 64 frames first.)
                        low = max(0, boundary // self.frame_len - 1)
                        oldest = low + ((run[0] - low) % LEVEL_COUNT)
                        k = min(k, oldest) if sent else k
                        self.anchored = True
                    self.anchor_pos, self.anchor_k = boundary, max(0, k)
                    self._reset_sync()
                    return
