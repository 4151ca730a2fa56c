"""Pure-Python reference of relay.media._codec: same names, same behaviour, bit-identical output.

This module is the executable specification of the Cython hot path.  It is slow on purpose
(clarity first, stdlib only) and is used by the differential tests: every function and
class here must produce exactly what relay.media._codec produces for the same calls.

Contents
--------
* G.711 μ-law / A-law (ITU-T G.711), bit-exact with CPython's ``audioop`` for all 65,536
  PCM inputs and all 256 codes.  μ-law note: for *negative* 16-bit inputs ITU-T G.191's
  reference code reads the magnitude as one's complement (``~x >> 2``) while ``audioop``
  (Sun's g711.c) uses two's complement (``-(x >> 2)``); the two differ by one code step for
  some negative inputs.  We follow ``audioop`` (what Python relays have always produced);
  A-law is identical under both readings.  Decoding is identical under both.
* ``Resampler``: stateful polyphase FIR, delay-compensated, chunk-size invariant.
* ``UlawToPcm`` / ``PcmToUlaw``: fused Twilio paths (base64 -> μ-law -> PCM16 -> resample).
* ``UplinkJitterBuffer`` / ``DownlinkBuffer``: Twilio-side reordering and pacing logic.
* ``ws_mask`` and ``TwilioFrameParser``: the Twilio -> relay WebSocket fast path (RFC 6455
  frames plus a strict scanner for the ``media`` and ``mark`` messages).
* ``UplinkPump`` / ``PumpHandler`` / ``DownlinkHandler``: the reactor's handlers that take
  a read from ``recv`` to ``send``; ``Histogram``: the latency histogram they observe into.
* ``ReactorCore`` and ``timer_expirations``: the media reactor's pass and its clock's read.

Resampler arithmetic (the part the C code must match bit for bit)
-----------------------------------------------------------------
All filtering is IEEE float32 with round-to-nearest after every multiply and every add, in
a fixed order (tap 0 first, accumulator starting at 0.0).  Python floats are doubles, but a
float32 product or sum computed in double and then rounded to float32 is correctly rounded
(double has more than 2*24+2 bits), so ``array('f', ...)`` rounding reproduces C float32
arithmetic exactly.  The C side is compiled with ``-ffp-contract=off`` so no fused
multiply-add changes the rounding.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import math
import os
import select
import socket
import sys
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable
from operator import add
from typing import Any, Generic, TypeVar, cast

from ._filters import FILTER_HEX, filter_taps

__all__ = [
    "PUMP_CLOSED",
    "PUMP_IDLE",
    "PUMP_PARSED",
    "PUMP_SENT",
    "PUMP_UNSENT",
    "DownlinkBuffer",
    "DownlinkHandler",
    "Histogram",
    "PcmToUlaw",
    "PumpHandler",
    "ReactorCore",
    "Resampler",
    "ServerFrameParser",
    "TwilioFrameParser",
    "UlawToPcm",
    "UplinkJitterBuffer",
    "UplinkPump",
    "alaw_decode",
    "alaw_encode",
    "b64decode",
    "client_audio_frame",
    "client_b64_frames",
    "timer_expirations",
    "twilio_frames",
    "twilio_uplink",
    "ulaw_decode",
    "ulaw_encode",
    "ws_mask",
]

_BIG_ENDIAN = sys.byteorder == "big"

# --------------------------------------------------------------------------------------
# G.711
# --------------------------------------------------------------------------------------

# Segment end points of the μ-law (14-bit) and A-law (13-bit) compressors, ITU-T G.711
# tables 1a/2a expressed on the biased magnitude (as in Sun's g711.c / audioop).
_SEG_UEND = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)
_SEG_AEND = (0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)
_ULAW_CLIP = 8159  # largest μ-law magnitude on the 14-bit scale (G.711 table 2a)
_ULAW_BIAS = 0x84 >> 2  # 33: the μ-law bias on the 14-bit scale


def _segment(value: int, ends: tuple[int, ...]) -> int:
    for seg, end in enumerate(ends):
        if value <= end:
            return seg
    return len(ends)


def ulaw_encode_sample(sample: int) -> int:
    """G.711 μ-law code of one int16 sample (audioop's lin2ulaw convention)."""
    v = sample >> 2  # 16-bit -> 14-bit two's complement (arithmetic shift floors)
    if v < 0:
        v = -v
        mask = 0x7F  # sign bit 0 for negative, then all bits inverted (G.711 §2)
    else:
        mask = 0xFF
    if v > _ULAW_CLIP:
        v = _ULAW_CLIP
    v += _ULAW_BIAS
    seg = _segment(v, _SEG_UEND)
    if seg >= 8:  # only v == 8192 (the clipped maximum): the largest code
        return 0x7F ^ mask
    return ((seg << 4) | ((v >> (seg + 1)) & 0xF)) ^ mask


def ulaw_decode_sample(code: int) -> int:
    """int16 value of a G.711 μ-law code (the standard expansion table)."""
    u = ~code & 0xFF
    t = ((u & 0x0F) << 3) + 0x84
    t <<= (u & 0x70) >> 4
    return 0x84 - t if u & 0x80 else t - 0x84


def alaw_encode_sample(sample: int) -> int:
    """G.711 A-law code of one int16 sample (audioop's lin2alaw == ITU-T G.191)."""
    v = sample >> 3  # 16-bit -> 13-bit
    if v >= 0:
        mask = 0xD5  # sign bit 1, even bits inverted (G.711 §3: "even bit inversion")
    else:
        mask = 0x55
        v = -v - 1  # one's complement magnitude, as G.191
    seg = _segment(v, _SEG_AEND)
    if seg >= 8:
        return 0x7F ^ mask
    aval = seg << 4
    aval |= (v >> 1) & 0xF if seg < 2 else (v >> seg) & 0xF
    return aval ^ mask


def alaw_decode_sample(code: int) -> int:
    """int16 value of a G.711 A-law code."""
    a = code ^ 0x55
    t = (a & 0xF) << 4
    seg = (a & 0x70) >> 4
    if seg == 0:
        t += 8
    elif seg == 1:
        t += 0x108
    else:
        t = (t + 0x108) << (seg - 1)
    return t if a & 0x80 else -t


# The compiled module uses the same tables: 16,384 entries for μ-law (index x >> 2) and
# 8,192 for A-law (index x >> 3) cover all 65,536 inputs.
_ULAW_ENC = bytes(ulaw_encode_sample(v << 2) for v in range(-8192, 8192))
_ALAW_ENC = bytes(alaw_encode_sample(v << 3) for v in range(-4096, 4096))
_ULAW_DEC = tuple(ulaw_decode_sample(c) for c in range(256))
_ALAW_DEC = tuple(alaw_decode_sample(c) for c in range(256))


def _samples(pcm: Any) -> array:
    """int16 LE bytes-like -> array('h') in native order (an odd trailing byte is an error)."""
    data = bytes(memoryview(pcm).cast("B"))
    if len(data) % 2:
        raise ValueError("PCM16 data must have an even number of bytes")
    a = array("h", data)
    if _BIG_ENDIAN:
        a.byteswap()
    return a


def _pcm_bytes(values: list[int] | array) -> bytes:
    a = array("h", values)
    if _BIG_ENDIAN:
        a.byteswap()
    return a.tobytes()


def ulaw_encode(pcm: Any) -> bytes:
    """PCM16 LE -> G.711 μ-law, one byte per sample."""
    return bytes(_ULAW_ENC[(s >> 2) + 8192] for s in _samples(pcm))


def ulaw_decode(ulaw: Any) -> bytes:
    """G.711 μ-law -> PCM16 LE."""
    return _pcm_bytes([_ULAW_DEC[c] for c in bytes(memoryview(ulaw).cast("B"))])


def alaw_encode(pcm: Any) -> bytes:
    """PCM16 LE -> G.711 A-law, one byte per sample."""
    return bytes(_ALAW_ENC[(s >> 3) + 4096] for s in _samples(pcm))


def alaw_decode(alaw: Any) -> bytes:
    """G.711 A-law -> PCM16 LE."""
    return _pcm_bytes([_ALAW_DEC[c] for c in bytes(memoryview(alaw).cast("B"))])


# --------------------------------------------------------------------------------------
# base64 (RFC 4648 §4, standard alphabet)
# --------------------------------------------------------------------------------------

_B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def b64decode(data: str | bytes | bytearray | memoryview) -> bytes:
    """Strict RFC 4648 base64 decode, as the fused paths do it.

    Standard alphabet only, no whitespace.  Padding is optional, but if present it must
    complete the last 4-character group (at most two '=').  A final group of a single
    character is invalid.  Non-zero pad bits are ignored (RFC 4648 §3.5 allows either).
    Errors raise ValueError.
    """
    if isinstance(data, str):
        if not data.isascii():
            raise ValueError("base64 payload must be ASCII")
        raw = data.encode("ascii")
    else:
        raw = bytes(memoryview(data).cast("B"))
    n = len(raw)
    pad = 0
    while n and pad < 2 and raw[n - 1] == 0x3D:  # '='
        n -= 1
        pad += 1
    if pad and (n + pad) % 4:
        raise ValueError("invalid base64 padding")
    if n % 4 == 1:
        raise ValueError("invalid base64 length")
    body = raw[:n]
    if not _B64_ALPHABET.issuperset(body):
        raise ValueError("invalid base64 character")
    return base64.b64decode(body + b"=" * (-n % 4), validate=True)


# --------------------------------------------------------------------------------------
# Resampler
# --------------------------------------------------------------------------------------

# The resampler's filters live in relay/_filters.py (one copy for both implementations).
_filter_taps = filter_taps
_FILTER_HEX = FILTER_HEX


# (in_rate, out_rate) -> (L up, M down, rate the filter runs at)
_PAIRS = {
    (8000, 16000): (2, 1, 16000),
    (16000, 8000): (1, 2, 16000),
    (8000, 24000): (3, 1, 24000),
    (24000, 8000): (1, 3, 24000),
    (16000, 24000): (3, 2, 48000),
    (24000, 16000): (2, 3, 48000),
}
_RATES = (8000, 16000, 24000)


def _f32(values: Any) -> array:
    """Round every value to IEEE float32 (nearest-even), as a C float store does."""
    return array("f", values)


def _check_pair(in_rate: int, out_rate: int) -> None:
    if in_rate == out_rate and in_rate > 0:
        return
    if (in_rate, out_rate) not in _PAIRS:
        raise ValueError(
            f"unsupported resampling {in_rate} -> {out_rate} Hz; supported: 8000<->16000, "
            "8000<->24000, 16000<->24000, or equal rates"
        )


class Resampler:
    """Streaming polyphase FIR resampler (see the module docstring for the arithmetic).

    Output sample k sits at time k / out_rate.  It is the filter output at position
    ``n_k = k*M + D`` of the zero-stuffed (by L) input stream, where D = (taps - 1) / 2 is
    the filter's group delay: i.e. the delay is compensated and the output is time-aligned
    with the input.  The price is that output k can only be produced once the input up to
    n_k // L has arrived: that hold-back is ``delay_ms``.  ``process`` emits every output
    whose inputs are complete, so the result depends only on the total input so far, never
    on how it was chunked.  ``flush`` treats the future input as silence and emits the rest
    so that the total output is round_half_up(n_in * out_rate / in_rate); it then resets.
    """

    def __init__(self, in_rate: int, out_rate: int) -> None:
        _check_pair(in_rate, out_rate)
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._pass = in_rate == out_rate
        if self._pass:
            self._up, self._down, self._k, self._d, self._high = 1, 1, 1, 0, in_rate
            self._phases: list[array] = []
        else:
            up, down, high = _PAIRS[(in_rate, out_rate)]
            taps = _filter_taps(high)
            n = len(taps)
            self._up, self._down, self._high = up, down, high
            self._d = (n - 1) // 2  # linear phase: group delay in samples at `high`
            self._k = -(-n // up)  # taps per polyphase branch
            # branch p holds taps p, p+L, p+2L, ... scaled by L (interpolation gain),
            # rounded to float32 and zero-padded to K taps
            self._phases = [
                _f32(taps[p + m * up] * up if p + m * up < n else 0.0 for m in range(self._k))
                for p in range(up)
            ]
        self.reset()

    @property
    def delay_ms(self) -> float:
        """Algorithmic delay: the filter's constant group delay, (taps-1)/2 samples at the
        filter rate; the stream is delay-compensated, so this is exactly the audio the
        resampler holds back (emitted by flush())."""
        return self._d * 1000.0 / self._high

    def reset(self) -> None:
        """Forget all history (barge-in / new stream)."""
        self._hist = [0.0] * (self._k - 1)  # the last K-1 inputs (zeros before the start)
        self._n_in = 0
        self._n_out = 0

    def process(self, pcm: Any) -> bytes:
        """Feed PCM16 LE at in_rate; return all PCM16 LE output that is now complete."""
        x = _samples(pcm)
        if self._pass:
            return _pcm_bytes(x)
        return _pcm_bytes(self._run([float(v) for v in x], final=False))

    def flush(self) -> bytes:
        """Emit what the filter still holds (future input = silence), then reset."""
        if self._pass:
            return b""
        out = _pcm_bytes(self._run([], final=True))
        self.reset()
        return out

    # -- the algorithm ----------------------------------------------------------------
    def _available(self, n_in: int) -> int:
        """Outputs k whose last input n_k // L is < n_in: k*M + D < L*n_in."""
        num = self._up * n_in - self._d
        return -(-num // self._down) if num > 0 else 0

    def _final_count(self, n_in: int) -> int:
        """round_half_up(n_in * L / M)."""
        return (2 * n_in * self._up + self._down) // (2 * self._down)

    def _run(self, new: list[float], final: bool) -> list[int]:
        up, down, k_taps, d = self._up, self._down, self._k, self._d
        n_old = self._n_in
        n_in = n_old + len(new)
        buf = self._hist + new  # buf[0] is input sample number n_old - (K-1)
        base = n_old - (k_taps - 1)
        k0 = self._n_out
        if final:
            k1 = self._final_count(n_in)
            if k1 > k0:  # pad with the silence the last outputs reach into
                last = ((k1 - 1) * down + d) // up
                buf += [0.0] * max(0, last - base + 1 - len(buf))
        else:
            k1 = self._available(n_in)
        y = [0.0] * max(0, k1 - k0)
        # Outputs k, k+L, k+2L... share a branch and step M inputs apart: compute them as
        # a group, tap by tap (the C code's SIMD lanes run across this group).
        for j in range(min(up, k1 - k0)):
            kj = k0 + j
            nq = -(-(k1 - kj) // up)
            nj = kj * down + d
            branch = self._phases[nj % up]
            e0 = nj // up - base  # buffer index of the newest input of output kj
            acc = _f32([0.0] * nq)
            for m in range(k_taps):
                g = branch[m]
                e = e0 - m
                prods = _f32([g * buf[i] for i in range(e, e + down * nq, down)])
                acc = _f32(map(add, acc, prods))
            y[j::up] = acc
        self._n_in = n_in
        self._n_out = k1
        self._hist = buf[len(buf) - (k_taps - 1) :] if k_taps > 1 else []
        # round half to even (C lrintf) after saturating to int16
        return [round(min(max(v, -32768.0), 32767.0)) for v in y]


# --------------------------------------------------------------------------------------
# Fused Twilio paths
# --------------------------------------------------------------------------------------


def _check_rate(rate: int) -> None:
    if rate not in _RATES:
        raise ValueError(f"unsupported rate {rate} Hz; supported: 8000, 16000, 24000")


class UlawToPcm:
    """Twilio uplink: base64 μ-law 8 kHz -> PCM16 LE at out_rate, with its own Resampler."""

    def __init__(self, out_rate: int) -> None:
        _check_rate(out_rate)
        self.out_rate = out_rate
        self._rs = Resampler(8000, out_rate)

    @property
    def delay_ms(self) -> float:
        return self._rs.delay_ms

    def feed(self, ulaw: Any) -> bytes:
        return self._rs.process(ulaw_decode(ulaw))

    def feed_b64(self, payload: str | bytes) -> bytes:
        return self.feed(b64decode(payload))

    def feed_b64_many(self, payloads: list[str | bytes]) -> bytes:
        """``b"".join(feed_b64(p) for p in payloads)``, except that every payload is decoded
        before any is fed: one that is not valid base64 raises ValueError, nothing fed."""
        ulaw = b"".join([b64decode(p) for p in payloads])
        return self.feed(ulaw)

    def flush(self) -> bytes:
        return self._rs.flush()

    def reset(self) -> None:
        self._rs.reset()


class PcmToUlaw:
    """Twilio downlink: PCM16 LE at in_rate -> μ-law 8 kHz.

    PCM may arrive split at any byte: an odd trailing byte is kept for the next call.
    ``flush`` drops a still-pending odd byte (half a sample cannot be played)."""

    def __init__(self, in_rate: int) -> None:
        _check_rate(in_rate)
        self.in_rate = in_rate
        self._rs = Resampler(in_rate, 8000)
        self._carry = b""

    @property
    def delay_ms(self) -> float:
        return self._rs.delay_ms

    def feed(self, pcm: Any) -> bytes:
        data = self._carry + bytes(memoryview(pcm).cast("B"))
        cut = len(data) & ~1
        self._carry = data[cut:]
        return ulaw_encode(self._rs.process(data[:cut]))

    def feed_b64(self, b64: str | bytes) -> bytes:
        return self.feed(b64decode(b64))

    def flush(self) -> bytes:
        self._carry = b""
        return ulaw_encode(self._rs.flush())

    def reset(self) -> None:
        self._carry = b""
        self._rs.reset()


# --------------------------------------------------------------------------------------
# Uplink jitter buffer (Twilio -> agent)
# --------------------------------------------------------------------------------------

_MOD32 = 1 << 32
_HALF32 = 1 << 31
_RECENT = 64  # released frames remembered to tell duplicates from late frames


class UplinkJitterBuffer:
    """Orders Twilio media frames by timestamp and fills gaps with silence.

    ``push(timestamp_ms, payload, duration_ms)`` returns the items now ready to forward,
    in order, as ``(timestamp_ms, payload, duration_ms)``; ``payload is None`` means
    "forward ``duration_ms`` of silence" (one item per gap).  Payloads are opaque.

    Timestamps are 32-bit serial numbers (RFC 1982 arithmetic, as RTP timestamps in
    RFC 3550): a frame is "ahead" of the release point if it is less than 2**31 ms ahead
    modulo 2**32, so the stream survives wraparound.  The first push sets the base.

    * reorder_ms == 0 (default, lowest latency): an in-order frame is released at once; a
      frame ahead of the release point releases the gap as silence, then itself.
    * reorder_ms > 0: frames ahead of a gap are held until the missing frame arrives or
      the held audio (sum of held durations) exceeds reorder_ms; then the gap is filled.
    * A frame behind the release point is a late drop, unless its timestamp equals one of
      the last 64 released frames' (or a held frame's): then it is a duplicate.
    * Silence per gap is capped at max_fill_ms: the rest of a longer gap is skipped (the
      output timestamps jump) and counted in ``skipped_ms``.
    * Memory is bounded by max_held: when more frames would be held, the oldest gap is
      given up early (filled with silence, counted in ``overflow_drops``) instead of
      waiting; received audio is never discarded for overflow.
    """

    def __init__(
        self, frame_ms: int = 20, reorder_ms: int = 0, max_fill_ms: int = 2000, max_held: int = 50
    ) -> None:
        if frame_ms <= 0 or reorder_ms < 0 or max_fill_ms < 0 or max_held < 1:
            raise ValueError("frame_ms > 0, reorder_ms >= 0, max_fill_ms >= 0, max_held >= 1")
        self.frame_ms = frame_ms
        self.reorder_ms = reorder_ms
        self.max_fill_ms = max_fill_ms
        self.max_held = max_held
        self.gaps_filled = 0
        self.silence_ms = 0
        self.skipped_ms = 0
        self.duplicates = 0
        self.late_drops = 0
        self.overflow_drops = 0
        self.frames_out = 0
        self.reset()

    def reset(self) -> None:
        """Forget the stream (the next push sets a new base); counters are kept."""
        self._started = False
        self._next = 0  # unwrapped timestamp of the release point
        self._held: dict[int, tuple[int, object, int]] = {}  # unwrapped ts -> item
        self._order: list[int] = []  # sorted keys of _held
        self._held_ms = 0
        self._recent: deque[int] = deque(maxlen=_RECENT)

    @property
    def held(self) -> int:
        return len(self._order)

    @property
    def held_ms(self) -> int:
        return self._held_ms

    def push(
        self, timestamp_ms: int, payload: object, duration_ms: int | None = None
    ) -> list[tuple[int, object, int]]:
        ts = int(timestamp_ms) % _MOD32
        dur = self.frame_ms if duration_ms is None else int(duration_ms)
        if dur <= 0:
            raise ValueError("duration_ms must be > 0")
        out: list[tuple[int, object, int]] = []
        if not self._started:
            self._started = True
            self._next = ts
        # RFC 1982 serial distance to the release point, in [-2**31, 2**31)
        ext = self._next + ((ts - self._next + _HALF32) % _MOD32) - _HALF32
        if ext < self._next:
            if ext in self._recent:
                self.duplicates += 1
            else:
                self.late_drops += 1
            return out
        if ext in self._held:
            self.duplicates += 1
            return out
        if ext == self._next:
            self._release(out, ext, ts, payload, dur)
            self._drain(out)
            return out
        if self.reorder_ms == 0:
            self._fill(out, ext)
            self._release(out, ext, ts, payload, dur)
            return out
        self._held[ext] = (ts, payload, dur)
        self._insort(ext)
        self._held_ms += dur
        while self._order and (self._held_ms > self.reorder_ms or len(self._order) > self.max_held):
            if self._held_ms <= self.reorder_ms:
                self.overflow_drops += 1
            self._fill(out, self._order[0])
            self._drain(out)
        return out

    def flush(self) -> list[tuple[int, object, int]]:
        """Release everything held, filling the gaps between held frames."""
        out: list[tuple[int, object, int]] = []
        while self._order:
            self._fill(out, self._order[0])
            self._drain(out)
        return out

    # -- internals ----------------------------------------------------------------------
    def _insort(self, ext: int) -> None:
        order = self._order
        i = len(order)
        while i and order[i - 1] > ext:
            i -= 1
        order.insert(i, ext)

    def _release(self, out: list, ext: int, ts: int, payload: object, dur: int) -> None:
        out.append((ts, payload, dur))
        self.frames_out += 1
        self._recent.append(ext)
        self._next = ext + dur

    def _fill(self, out: list, ext: int) -> None:
        gap = ext - self._next
        if gap <= 0:
            return
        fill = min(gap, self.max_fill_ms)
        if fill:
            out.append((self._next % _MOD32, None, fill))
            self.gaps_filled += 1
            self.silence_ms += fill
        self.skipped_ms += gap - fill
        self._next = ext

    def _drain(self, out: list) -> None:
        """Release held frames that are now in order; ones overlapped from behind are late."""
        while self._order and self._order[0] <= self._next:
            ext = self._order.pop(0)
            ts, payload, dur = self._held.pop(ext)
            self._held_ms -= dur
            if ext == self._next:
                self._release(out, ext, ts, payload, dur)
            else:
                self.late_drops += 1


# --------------------------------------------------------------------------------------
# Downlink buffer (agent -> Twilio)
# --------------------------------------------------------------------------------------

_BYTES_PER_MS = 8  # μ-law 8 kHz: one byte per sample
_MAX_RESPONSES = 256  # per-response bookkeeping kept (oldest evicted first)


class _Resp:
    __slots__ = ("heard_base", "offset")

    def __init__(self) -> None:
        self.offset = 0  # bytes of this response pushed so far (frames cut + discarded)
        self.heard_base = 0.0  # ms known heard: end of the last echoed mark / at clear()


#: A partial downlink frame is sent once Twilio has less than this much audio left.
UNDERRUN_MARGIN_MS = 20.0
#: ... and at the latest once it has waited this long for the rest of its frame.
PARTIAL_HOLD_MS = 10.0


class DownlinkBuffer:
    """Paces agent μ-law audio to Twilio and tracks what the caller actually heard.

    * ``push`` re-chunks bursts of any size into frames of frame_ms; a different
      response_id first closes the previous response's partial frame; ``end_response``
      closes the final partial frame.  A partial frame within ``slack_ms`` of frame_ms is
      closed by the push that made it: a resampler holds the last ~3 ms of each chunk back
      (its filter's look-ahead), so an agent's 100 ms chunk comes out a few samples short
      of a frame and the shortfall carries over to the end of the answer. Holding such a
      frame for PARTIAL_HOLD_MS would merge nothing (the next chunk makes its own whole
      frame) and only delay it.
    * ``pull(now_ms)`` sends queued frames while the audio already scheduled ahead of now
      is at most max_lead_ms: ``play_end - now_ms <= max_lead_ms`` with, per frame of d ms,
      ``play_end = max(play_end, now_ms) + d``.  When no full frame is queued, the partial
      frame goes too once it has waited PARTIAL_HOLD_MS (from the first pull that saw it)
      or Twilio has less than UNDERRUN_MARGIN_MS left: frame_ms is the largest frame, not
      a reason to hold audio back.  So a response's first frames go out at once
      and at most max_lead_ms + one frame is ever outstanding at Twilio.  ``next_due(now)``
      returns exactly the instant that condition becomes true (so a pull at that instant
      sends), or None when nothing is queued.
    * Every frame carries a mark (name: a decimal counter).  ``on_mark`` -> (response_id,
      heard_ms); Twilio plays in order, so an echo also confirms earlier pending marks.
      Echoes of unknown or cleared marks return None (Twilio echoes pending marks after a
      clear: that audio was discarded, not played) and are counted in ``ignored_marks``.
    * ``heard_ms(rid, now)``: end of the last echoed frame of rid, plus the time elapsed
      since the frame now playing (the oldest pending mark, if it is rid's) started, but
      never beyond that frame's end: accurate to one frame.  The frame now playing started
      at max(its send time, the previous echo).
    * ``clear(now)`` drops the local queue and all pending marks, resets play_end, freezes
      the heard position of the response being played and returns (response_id or None,
      heard_ms, dropped_ms) where dropped_ms = local audio + sent-but-unplayed audio.
    * ``drop_response(rid)``: later pushes of rid are ignored, and its queued audio is
      discarded (its already-sent frames stay: use clear() for those).
    * max_buffer_ms bounds local audio: a push that does not fit is truncated (the excess
      is refused and counted in ``overflow_ms``); what was queued earlier is kept.
    All times are caller-supplied ms (clock-free); offsets count bytes of each response.
    """

    def __init__(
        self,
        frame_ms: int = 100,
        max_lead_ms: int = 200,
        max_buffer_ms: int = 600_000,
        slack_ms: int = 0,
    ) -> None:
        if frame_ms <= 0 or max_lead_ms < 0 or max_buffer_ms <= 0:
            raise ValueError("frame_ms > 0, max_lead_ms >= 0, max_buffer_ms > 0")
        if not 0 <= slack_ms < frame_ms:
            raise ValueError("0 <= slack_ms < frame_ms")
        self.frame_ms = frame_ms
        self.slack_ms = slack_ms
        self.max_lead_ms = max_lead_ms
        self.max_buffer_ms = max_buffer_ms
        self._frame_bytes = frame_ms * _BYTES_PER_MS
        self._max_bytes = max_buffer_ms * _BYTES_PER_MS
        self._queue: deque[tuple[bytes, str, int]] = deque()  # (frame, rid, end offset)
        self._queued = 0  # bytes in _queue
        self._partial = bytearray()
        self._partial_rid: str | None = None
        self._partial_since: float | None = None  # first pull that saw the partial
        self._resp: dict[str, _Resp] = {}
        self._dropped: dict[str, None] = {}  # ordered set
        # pending marks in send order: name -> (rid, start offset, end offset, sent at)
        self._marks: dict[str, tuple[str, int, int, float]] = {}
        self._play_end = -math.inf
        self._last_echo = -math.inf
        self._counter = 0
        self.frames_out = 0
        self.overflow_bytes = 0
        self.ignored_marks = 0

    # -- properties ---------------------------------------------------------------------
    @property
    def pending_marks(self) -> int:
        return len(self._marks)

    @property
    def buffered_ms(self) -> int:
        return (self._queued + len(self._partial)) // _BYTES_PER_MS

    @property
    def idle(self) -> bool:
        return not self._queue and not self._partial and not self._marks

    @property
    def overflow_ms(self) -> int:
        return self.overflow_bytes // _BYTES_PER_MS

    # -- input --------------------------------------------------------------------------
    def _state(self, rid: str) -> _Resp:
        r = self._resp.get(rid)
        if r is None:
            r = self._resp[rid] = _Resp()
            if len(self._resp) > _MAX_RESPONSES:
                del self._resp[next(iter(self._resp))]
        return r

    def push(self, ulaw: Any, response_id: str) -> None:
        if response_id in self._dropped:
            return
        data = bytes(memoryview(ulaw).cast("B"))
        if not data:
            return
        if self._partial and self._partial_rid != response_id:
            self._close_partial()
        r = self._state(response_id)
        room = self._max_bytes - self._queued - len(self._partial)
        take = min(len(data), max(room, 0))
        self.overflow_bytes += len(data) - take
        if not take:
            return
        self._partial_rid = response_id
        self._partial += data[:take]
        fb = self._frame_bytes
        while len(self._partial) >= fb:
            frame = bytes(self._partial[:fb])
            del self._partial[:fb]
            r.offset += fb
            self._queue.append((frame, response_id, r.offset))
            self._queued += fb
        if self._partial and len(self._partial) >= fb - self.slack_ms * _BYTES_PER_MS:
            self._close_partial()
        if not self._partial:
            self._partial_rid = None
            self._partial_since = None

    def _close_partial(self) -> None:
        if self._partial and self._partial_rid is not None:
            r = self._state(self._partial_rid)
            r.offset += len(self._partial)
            self._queue.append((bytes(self._partial), self._partial_rid, r.offset))
            self._queued += len(self._partial)
        self._partial = bytearray()
        self._partial_rid = None
        self._partial_since = None

    def end_response(self, response_id: str) -> None:
        if self._partial_rid == response_id:
            self._close_partial()

    def drop_response(self, response_id: str) -> None:
        self._dropped[response_id] = None
        if len(self._dropped) > _MAX_RESPONSES:
            del self._dropped[next(iter(self._dropped))]
        if self._partial_rid == response_id:
            self._state(response_id).offset += len(self._partial)
            self._partial = bytearray()
            self._partial_rid = None
            self._partial_since = None
        if any(item[1] == response_id for item in self._queue):
            keep = [item for item in self._queue if item[1] != response_id]
            self._queue = deque(keep)
            self._queued = sum(len(item[0]) for item in keep)

    # -- output -------------------------------------------------------------------------
    def pull(self, now_ms: float) -> list[tuple[bytes, str, str]]:
        out: list[tuple[bytes, str, str]] = []
        if not self._queue and self._partial:
            # frame_ms is the largest frame, not a wait: a partial frame goes once it has
            # waited PARTIAL_HOLD_MS for more audio, or at once if Twilio is about to run
            # dry (a resampler holding back a few ms of each chunk, an agent streaming
            # small deltas in real time, the first audio of an answer).
            if self._partial_since is None:
                self._partial_since = now_ms
            if (
                self._play_end - now_ms <= UNDERRUN_MARGIN_MS
                or now_ms - self._partial_since >= PARTIAL_HOLD_MS
            ):
                self._close_partial()
        while self._queue and self._play_end - now_ms <= self.max_lead_ms:
            frame, rid, end = self._queue.popleft()
            n = len(frame)
            self._queued -= n
            start = self._play_end if self._play_end > now_ms else now_ms
            self._play_end = start + n / _BYTES_PER_MS
            self._counter += 1
            name = str(self._counter)
            self._marks[name] = (rid, end - n, end, now_ms)
            self.frames_out += 1
            out.append((frame, name, rid))
        if not self._queue and self._partial and self._partial_since is None:
            self._partial_since = now_ms  # the hold starts when the partial is all that is left
        return out

    def next_due(self, now_ms: float) -> float | None:
        if not self._queue:
            if not self._partial:
                return None
            due = self._play_end - UNDERRUN_MARGIN_MS
            since = now_ms if self._partial_since is None else self._partial_since
            if since + PARTIAL_HOLD_MS < due:
                due = since + PARTIAL_HOLD_MS
            return due if due > now_ms else now_ms
        due = self._play_end - self.max_lead_ms
        return due if due > now_ms else now_ms

    # -- marks and heard position -------------------------------------------------------
    def _head_heard(self, now_ms: float) -> tuple[str, float] | None:
        """(rid, interpolated heard ms) for the frame now playing (oldest pending mark)."""
        if not self._marks:
            return None
        rid, start, end, sent = next(iter(self._marks.values()))
        anchor = sent if sent > self._last_echo else self._last_echo
        elapsed = now_ms - anchor
        if elapsed < 0:
            elapsed = 0.0
        pos = start / _BYTES_PER_MS + elapsed
        end_ms = end / _BYTES_PER_MS
        return rid, pos if pos < end_ms else end_ms

    def _heard(self, response_id: str, now_ms: float) -> float:
        r = self._resp.get(response_id)
        heard = r.heard_base if r is not None else 0.0
        head = self._head_heard(now_ms)
        if head is not None and head[0] == response_id and head[1] > heard:
            heard = head[1]
        return heard

    def heard_ms(self, response_id: str, now_ms: float) -> int:
        return int(self._heard(response_id, now_ms))

    def on_mark(self, name: str, now_ms: float) -> tuple[str, int] | None:
        if name not in self._marks:
            self.ignored_marks += 1
            return None
        # Twilio plays (and echoes) in order: earlier pending marks were played too.
        while True:
            key = next(iter(self._marks))
            rid, _start, end, _sent = self._marks.pop(key)
            r = self._state(rid)
            if end / _BYTES_PER_MS > r.heard_base:
                r.heard_base = end / _BYTES_PER_MS
            if key == name:
                break
        self._last_echo = now_ms
        return rid, int(self._heard(rid, now_ms))

    def echoes(self, names: Iterable[str], now_ms: float) -> None:
        """:meth:`on_mark` for each name in order, at the same time, without its results
        (the caller's echoes of one read: what was heard is read again at a barge-in)."""
        for name in names:
            self.on_mark(name, now_ms)

    def clear(self, now_ms: float) -> tuple[str | None, int, int]:
        rid: str | None = None
        if self._marks:
            rid = next(iter(self._marks.values()))[0]
        elif self._queue:
            rid = self._queue[0][1]
        elif self._partial_rid is not None:
            rid = self._partial_rid
        heard = self._heard(rid, now_ms) if rid is not None else 0.0
        dropped = (self._queued + len(self._partial)) / _BYTES_PER_MS
        if self._marks:
            for _rid, start, end, _sent in self._marks.values():
                dropped += (end - start) / _BYTES_PER_MS
            head = self._head_heard(now_ms)
            if head is not None:
                dropped -= head[1] - next(iter(self._marks.values()))[1] / _BYTES_PER_MS
        if rid is not None:
            self._state(rid).heard_base = heard
        if self._partial_rid is not None:
            self._state(self._partial_rid).offset += len(self._partial)
        self._queue.clear()
        self._queued = 0
        self._partial = bytearray()
        self._partial_rid = None
        self._partial_since = None
        self._marks.clear()
        self._play_end = -math.inf
        return rid, int(heard), int(dropped)


# --- WebSocket masking (RFC 6455 §5.3) ---------------------------------------------------
def ws_mask(data: bytes | bytearray | memoryview, key: bytes | bytearray | memoryview) -> bytes:
    """XOR ``data`` with the 4-byte masking ``key`` repeated (masking and unmasking alike)."""
    key = bytes(key)
    if len(key) != 4:
        raise ValueError("WebSocket masking key must be 4 bytes")
    data = bytes(data)
    n = len(data)
    if n == 0:
        return b""
    stream = (key * ((n >> 2) + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


# --------------------------------------------------------------------------------------
# Twilio -> relay WebSocket: RFC 6455 frames + the media/mark fast path
# --------------------------------------------------------------------------------------
# The frame half is relay.media.websocket.FrameParser(expect_masked=True) line for line (a
# copy, not an import: websocket imports relay.media.codec, and this module stays stdlib
# only); the tests check both against each other.  The other half is a scanner over the
# unmasked bytes of each text message: it reads a strict subset of JSON in which a message
# is certainly what TwilioStream.parse (on a started stream with this streamSid) turns into
# Media(timestamp, payload, ...) or MarkEcho(name), and returns those values as a tuple.
# Everything else (any doubt) stays the decoded str, for the slow path to decide.
#
# The subset, over bytes:
# * JSON whitespace is space, tab, LF and CR, allowed around every token;
# * the message is one object; its member values are strings, except that the members
#   "media" and "mark" may be objects; those nested objects have string values only;
# * strings (keys and values) hold printable ASCII (0x20..0x7E) other than '"' and '\':
#   no escape sequence, no control character, no non-ASCII byte;
# * no object repeats a key (orjson keeps the last one) or has more than 16 members;
# * numbers, true/false/null, arrays, deeper objects, trailing bytes: outside the subset.
# Within it, a message is
# * media: "event" is "media", "streamSid" is the stream's sid, "media" is an object with
#   a "payload" string and a "timestamp" of 1..15 ASCII digits (int() accepts more: signs,
#   spaces, underscores, non-ASCII digits; those stay on the slow path), and a "chunk", if
#   present, of 1..15 ASCII digits too; other members are ignored, as the slow path does;
# * mark: "event" is "mark", "streamSid" is the stream's sid, "mark" is an object with a
#   "name" string.
# An empty stream_sid (no stream started) disables the scanner.

_C = TypeVar("_C")

_MAX_MEMBERS = 16
_MAX_DIGITS = 15
_JSON_WS = b" \t\n\r"
_PUNCT = b"{}:,"


class _Outside(Exception):
    """The message is outside the scanner's subset: fall back to the str."""


def _tokens(data: bytes) -> list[str | bytes]:
    """Punctuation as 1-char str ('{', '}', ':', ','), strings as their raw bytes."""
    tokens: list[str | bytes] = []
    i, n = 0, len(data)
    while i < n:
        c = data[i]
        if c in _JSON_WS:
            i += 1
        elif c in _PUNCT:
            tokens.append(chr(c))
            i += 1
        elif c == 0x22:  # '"'
            j = i + 1
            while j < n and data[j] != 0x22:
                if not 0x20 <= data[j] <= 0x7E or data[j] == 0x5C:  # 0x5C: backslash
                    raise _Outside
                j += 1
            if j >= n:
                raise _Outside  # unterminated string
            tokens.append(data[i + 1 : j])
            i = j + 1
        else:
            raise _Outside  # number, literal, array, non-ASCII...
    return tokens


_Obj = dict[bytes, "bytes | _Obj"]


def _parse_object(tokens: list[str | bytes], pos: int, top: bool) -> tuple[_Obj, int]:
    """The object whose '{' is tokens[pos]; returns it and the index after its '}'."""
    if pos >= len(tokens) or tokens[pos] != "{":
        raise _Outside
    pos += 1
    obj: _Obj = {}
    if pos < len(tokens) and tokens[pos] == "}":
        return obj, pos + 1
    while True:
        if pos + 2 >= len(tokens):
            raise _Outside
        key, colon, value = tokens[pos], tokens[pos + 1], tokens[pos + 2]
        if not isinstance(key, bytes) or colon != ":" or key in obj:
            raise _Outside
        if len(obj) == _MAX_MEMBERS:
            raise _Outside
        if isinstance(value, bytes):
            obj[key] = value
            pos += 3
        elif value == "{" and top and key in (b"media", b"mark"):
            obj[key], pos = _parse_object(tokens, pos + 2, top=False)
        else:
            raise _Outside
        if pos >= len(tokens):
            raise _Outside
        if tokens[pos] == "}":
            return obj, pos + 1
        if tokens[pos] != ",":
            raise _Outside
        pos += 1


def _digits(value: bytes | _Obj | None) -> int | None:
    if not isinstance(value, bytes) or not 1 <= len(value) <= _MAX_DIGITS:
        return None
    if not all(0x30 <= c <= 0x39 for c in value):
        return None
    return int(value)


def scan_twilio(data: bytes, sid: bytes) -> tuple[int, str] | tuple[str] | None:
    """(timestamp, payload) for a media message of stream ``sid``, (name,) for a mark
    message, None for anything else (see the subset above)."""
    if not sid:
        return None
    try:
        tokens = _tokens(data)
        msg, end = _parse_object(tokens, 0, top=True)
    except _Outside:
        return None
    if end != len(tokens) or msg.get(b"streamSid") != sid:
        return None
    event = msg.get(b"event")
    if event == b"media":
        media = msg.get(b"media")
        if not isinstance(media, dict):
            return None
        payload = media.get(b"payload")
        timestamp = _digits(media.get(b"timestamp"))
        if not isinstance(payload, bytes) or timestamp is None:
            return None
        if b"chunk" in media and _digits(media[b"chunk"]) is None:
            return None
        return timestamp, payload.decode("ascii")
    if event == b"mark":
        mark = msg.get(b"mark")
        name = mark.get(b"name") if isinstance(mark, dict) else None
        if not isinstance(name, bytes):
            return None
        return (name.decode("ascii"),)
    return None


class _FrameReader(Generic[_C]):
    """RFC 6455 frames -> messages: ``feed(data)`` returns what
    ``relay.media.websocket.FrameParser(expect_masked=masked, max_message=max_message)
    .feed(data)`` returns, except that where it raises ``ProtocolViolation(message, code)``
    this raises ``violation(message, code)`` (same messages, same codes, same moment) and a
    control frame is ``control(opcode, payload)`` instead of ``Control(...)``.  Subclasses
    turn hot text messages into tuples (``_text``).  Binary messages are bytes; other text
    messages are str (invalid UTF-8 is a violation, code 1007).  State after a violation is
    FrameParser's too (the unparsed buffer stays as it was before the failing call), though
    callers close the connection at the first one."""

    __slots__ = (
        "_buf",
        "_control",
        "_frag",
        "_frag_len",
        "_frag_op",
        "_masked",
        "_violation",
        "max_message",
    )

    def __init__(
        self,
        *,
        masked: bool,
        max_message: int,
        control: Callable[[int, bytes], _C],
        violation: Callable[[str, int], Exception],
    ) -> None:
        self._masked = masked
        self.max_message = max_message
        self._control = control
        self._violation = violation
        self._buf = b""
        self._frag: list[bytes] = []
        self._frag_op = 0
        self._frag_len = 0

    def _text(self, payload: bytes) -> Any:
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError:
            raise self._violation("text frame is not valid UTF-8", 1007) from None

    def feed(self, data: bytes) -> list[Any]:
        violation = self._violation
        masked = self._masked
        buf = self._buf + data if self._buf else bytes(data)
        out: list[Any] = []
        pos = 0
        end = len(buf)
        max_message = self.max_message
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            if b0 & 0x70:
                raise violation("RSV bits set without a negotiated extension", 1002)
            if masked and not b1 & 0x80:
                raise violation("unmasked client frame", 1002)
            if not masked and b1 & 0x80:
                raise violation("masked server frame", 1002)
            n = b1 & 0x7F
            hdr = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                hdr = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hdr = 10
            opcode = b0 & 0x0F
            if n > max_message:
                raise violation(f"frame of {n} bytes exceeds {max_message}", 1009)
            if masked:
                hdr += 4  # the masking key
            if end - pos < hdr + n:
                break
            payload = buf[pos + hdr : pos + hdr + n]
            if masked:
                payload = ws_mask(payload, buf[pos + hdr - 4 : pos + hdr])
            pos += hdr + n
            fin = b0 & 0x80
            if opcode >= 0x8:
                if opcode not in (0x8, 0x9, 0xA):  # close, ping, pong
                    raise violation(f"unknown control opcode {opcode:#x}", 1002)
                if not fin or n > 125:
                    raise violation("fragmented or oversized control frame", 1002)
                out.append(self._control(opcode, payload))
                continue
            if opcode == 0x0:  # continuation
                if not self._frag:
                    raise violation("continuation frame without a message to continue", 1002)
                self._frag_len += n
                if self._frag_len > max_message:
                    raise violation("fragmented message too big", 1009)
                self._frag.append(payload)
                if not fin:
                    continue
                payload = b"".join(self._frag)
                opcode = self._frag_op
                self._frag = []
                self._frag_len = 0
            elif opcode in (0x1, 0x2):  # text, binary
                if self._frag:
                    raise violation("new data frame inside a fragmented message", 1002)
                if not fin:
                    self._frag = [payload]
                    self._frag_op = opcode
                    self._frag_len = n
                    continue
            else:
                raise violation(f"unknown data opcode {opcode:#x}", 1002)
            out.append(self._text(payload) if opcode == 0x1 else payload)
        self._buf = buf[pos:] if pos < end else b""
        if len(self._buf) > max_message + 14:
            raise violation("frame header announces too much data", 1009)
        return out


class TwilioFrameParser(_FrameReader[_C]):
    """Frames from Twilio (masked, RFC 6455) -> messages, media/mark already parsed.

    ``feed(data)`` returns what ``_FrameReader`` (``FrameParser(expect_masked=True)``)
    returns, except that a text message in the scanner's subset (above) is a tuple instead
    of its str: ``(timestamp, payload)`` for media, ``(name,)`` for mark.
    """

    __slots__ = ("_sid", "stream_sid")

    def __init__(
        self,
        stream_sid: str,
        *,
        max_message: int = 65536,
        control: Callable[[int, bytes], _C],
        violation: Callable[[str, int], Exception],
    ) -> None:
        if not isinstance(stream_sid, str):
            raise TypeError("stream_sid must be a str")
        super().__init__(masked=True, max_message=max_message, control=control, violation=violation)
        self.stream_sid = stream_sid
        self._sid = stream_sid.encode("utf-8", "surrogatepass")

    def _text(self, payload: bytes) -> str | tuple[int, str] | tuple[str]:
        msg = scan_twilio(payload, self._sid)
        if msg is not None:
            return msg
        return cast(str, super()._text(payload))


def twilio_uplink(
    parser: TwilioFrameParser[Any],
    jitter: UplinkJitterBuffer,
    data: bytes,
    silence: Callable[[int], str],
) -> tuple[list[str], list[str] | None, int, list[Any] | None]:
    """One read from Twilio: ``parser.feed(data)``; each leading media message goes
    through ``jitter`` as a 20 ms frame and each leading mark echo's name is collected, up
    to the first message of any other kind (a str, bytes, a control frame).

    Returns ``(payloads, marks, media, rest)``: the base64 payloads ``jitter`` released, in
    order, with ``silence(duration_ms)`` for a gap; the mark names (None when there were
    none); how many media messages were taken; the messages from the first other one on,
    for the caller's general path (None when there are none).
    """
    items = parser.feed(data)
    payloads: list[str] = []
    marks: list[str] | None = None
    media = 0
    for i, item in enumerate(items):
        if type(item) is not tuple:
            return payloads, marks, media, items[i:]
        if len(item) == 2:
            media += 1
            for _ts, payload, dur in jitter.push(item[0], item[1], 20):
                payloads.append(cast(str, payload) if payload is not None else silence(dur))
        else:
            if marks is None:
                marks = []
            marks.append(item[0])
    return payloads, marks, media, None


# --------------------------------------------------------------------------------------
# agent -> relay WebSocket: RFC 6455 server frames + OpenAI Realtime audio deltas
# --------------------------------------------------------------------------------------
# The subset scan_openai_audio recognises, over the bytes of a text message: one JSON
# object (whitespace as above) whose member values are strings (printable ASCII other than
# '"' and '\', as above) or integers -?(0|[1-9][0-9]*) of at most 18 digits; no repeated
# key, at most 16 members, nothing after it; "type" is "response.output_audio.delta" (GA)
# or "response.audio.delta" (beta), and "item_id" and "delta" are strings; the delta is
# strict base64: a multiple of 4 characters of A-Z a-z 0-9 + /, with '=' only as its last
# one or two.  Within it OpenAIRealtimeProtocol's slow path (orjson, binascii.a2b_base64)
# yields exactly AgentAudio(base64-decoded delta, item_id); anything else stays a str.

_OPENAI_AUDIO_TYPES = (b"response.output_audio.delta", b"response.audio.delta")
_B64_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def _json_int_end(data: bytes, i: int) -> int:
    """Index after the integer at data[i] (-?(0|[1-9][0-9]*), <= 18 digits), else -1."""
    n = len(data)
    if i < n and data[i] == 0x2D:
        i += 1
    start = i
    if i >= n or not 0x30 <= data[i] <= 0x39:
        return -1
    if data[i] == 0x30:
        i += 1
    else:
        while i < n and 0x30 <= data[i] <= 0x39:
            i += 1
    if i - start > 18:
        return -1
    if i < n and (data[i] in b".eE" or 0x30 <= data[i] <= 0x39):
        return -1
    return i


def _flat_object(data: bytes) -> dict[bytes, bytes | None] | None:
    """The members of a flat JSON object in the subset (string values as raw bytes,
    integers as None), or None outside it."""
    n = len(data)

    def ws(i: int) -> int:
        while i < n and data[i] in _JSON_WS:
            i += 1
        return i

    def string_end(i: int) -> int:  # i after the opening quote
        while i < n and data[i] != 0x22:
            if not 0x20 <= data[i] <= 0x7E or data[i] == 0x5C:
                return -1
            i += 1
        return i if i < n else -1

    obj: dict[bytes, bytes | None] = {}
    i = ws(0)
    if i >= n or data[i] != 0x7B:
        return None
    i = ws(i + 1)
    while True:
        if i >= n or data[i] != 0x22:
            return None
        j = string_end(i + 1)
        if j < 0:
            return None
        key = data[i + 1 : j]
        if key in obj or len(obj) == _MAX_MEMBERS:
            return None
        i = ws(j + 1)
        if i >= n or data[i] != 0x3A:
            return None
        i = ws(i + 1)
        if i >= n:
            return None
        if data[i] == 0x22:
            j = string_end(i + 1)
            if j < 0:
                return None
            obj[key] = data[i + 1 : j]
            i = j + 1
        else:
            i = _json_int_end(data, i)
            if i < 0:
                return None
            obj[key] = None
        i = ws(i)
        if i >= n:
            return None
        if data[i] == 0x2C:
            i = ws(i + 1)
        elif data[i] == 0x7D:
            return obj if ws(i + 1) == n else None
        else:
            return None


def scan_openai_audio(data: bytes) -> tuple[str, bytes] | None:
    """(item_id, audio) for an OpenAI Realtime audio delta in the subset above, else None."""
    obj = _flat_object(data)
    if obj is None or obj.get(b"type") not in _OPENAI_AUDIO_TYPES:
        return None
    item_id, delta = obj.get(b"item_id"), obj.get(b"delta")
    if item_id is None or delta is None or len(delta) % 4:
        return None
    body = delta[:-2] if delta.endswith(b"==") else delta[:-1] if delta.endswith(b"=") else delta
    if not _B64_CHARS.issuperset(body):
        return None
    return item_id.decode("ascii"), base64.b64decode(delta, validate=True)


class ServerFrameParser(_FrameReader[_C]):
    """Frames from a server (unmasked, RFC 6455) -> messages: relay's agent connections.

    ``feed(data)`` returns what ``_FrameReader`` (``FrameParser(expect_masked=False)``)
    returns; with ``openai_audio`` set, a text message in scan_openai_audio's subset is
    ``(item_id, audio)`` instead of its str.
    """

    __slots__ = ("openai_audio",)

    def __init__(
        self,
        *,
        max_message: int = 65536,
        control: Callable[[int, bytes], _C],
        violation: Callable[[str, int], Exception],
        openai_audio: bool = False,
    ) -> None:
        super().__init__(
            masked=False, max_message=max_message, control=control, violation=violation
        )
        self.openai_audio = openai_audio

    def _text(self, payload: bytes) -> str | tuple[str, bytes]:
        if self.openai_audio:
            msg = scan_openai_audio(payload)
            if msg is not None:
                return msg
        return cast(str, super()._text(payload))


def _server_text_frame(payload: bytes) -> bytes:
    # RFC 6455 §5.2: FIN + text opcode, unmasked, 7/16/64-bit length
    n = len(payload)
    if n < 126:
        head = bytes((0x81, n))
    elif n < 65536:
        head = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return head + payload


def twilio_frames(media_prefix: bytes, mark_prefix: bytes, frames: list[Any]) -> bytes:
    """Wire bytes of the frames relay sends Twilio for one downlink pull
    (``DownlinkBuffer.pull``): per ``(ulaw, mark_name, response_id)`` the media message
    ``media_prefix + base64(ulaw) + '"}}'`` and then the mark message ``mark_prefix +
    mark_name + '"}}'``, each in an unmasked text frame. The prefixes are the start of
    Twilio's ``media`` / ``mark`` JSON up to the opening quote of the payload / name
    (relay.protocol.twilio.TwilioStream); base64 and the buffer's mark names (digits) need
    no JSON escaping. ``ulaw`` must be bytes and names ASCII str (else TypeError /
    ValueError)."""
    out = []
    for item in frames:
        if type(item) is not tuple:
            raise TypeError("frames must be tuples (ulaw, mark_name, response_id)")
        ulaw, name = item[0], item[1]
        if type(ulaw) is not bytes:
            raise TypeError("ulaw must be bytes")
        if not isinstance(name, str) or not name.isascii():
            raise ValueError("mark names must be ASCII strings")
        out.append(_server_text_frame(media_prefix + base64.b64encode(ulaw) + b'"}}'))
        out.append(_server_text_frame(mark_prefix + name.encode("ascii") + b'"}}'))
    return b"".join(out)


_PLAIN_B64 = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


def client_audio_frame(head: bytes, audio: Any, tail: bytes) -> bytes:
    """Wire bytes of one masked client text frame holding ``head + base64(audio) + tail``
    (audio bytes-like, RFC 4648 base64 with padding): a transcoded agent's caller audio in
    its JSON message. A fresh masking key from ``os.urandom`` (RFC 6455 §5.3)."""
    body = head + binascii.b2a_base64(bytes(memoryview(audio).cast("B")), newline=False) + tail
    return _masked_text(body)


def _masked_text(body: bytes) -> bytes:
    # one masked text frame: 7/16/64-bit length as RFC 6455 §5.2
    n = len(body)
    if n < 126:
        hdr = bytes((0x81, 0x80 | n))
    elif n < 65536:
        hdr = bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        hdr = bytes((0x81, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    return hdr + key + ws_mask(body, key)


def client_b64_frames(head: bytes, payloads: list[str], tail: bytes) -> bytes | None:
    """Wire bytes of one masked client text frame per payload, each holding ``head +
    payload + tail`` (caller audio spliced into an agent's JSON message), or ``None`` when
    a payload is not plain base64 (A-Z a-z 0-9 + / =, which JSON never escapes): the
    caller then serialises that message properly. Each frame has its own masking key from
    ``os.urandom`` (RFC 6455 §5.3); a 7/16/64-bit length as RFC 6455 §5.2."""
    for p in payloads:
        if type(p) is not str or not p.isascii() or not _PLAIN_B64.issuperset(p.encode()):
            return None
    return b"".join([_masked_text(head + p.encode("ascii") + tail) for p in payloads])


# --------------------------------------------------------------------------------------
# the uplink pump: one Twilio read to the agent (relay/media/call.py, the uplink hot path)
# --------------------------------------------------------------------------------------
PUMP_IDLE = 0  # nothing to read
PUMP_SENT = 1  # every append message written (``marks``: the echoes to handle)
PUMP_UNSENT = 2  # built, but the kernel took only part: ``unsent`` must be queued
PUMP_PARSED = 3  # parsed only (another kind of message, nothing to send...)
PUMP_CLOSED = 4  # the peer closed (``error`` 0) or the read failed (``error`` = errno)

_PUMP_READ = 65536  # what one WebSocket.recv_nowait reads


def _on_fd(fd: int) -> socket.socket:
    """A socket object over ``fd`` that does not own it (``detach`` it after use)."""
    return socket.socket(fileno=fd)


class UplinkPump:
    """One Twilio read to the agent: ``recv(2)`` on ``twilio_fd``; :func:`twilio_uplink`
    with ``parser``, ``jitter`` and ``silence``; when the read held media messages and
    mark echoes only, the released payloads as masked append messages
    (:func:`client_b64_frames` with ``head`` and ``tail``) in one ``send(2)`` on
    ``agent_fd``; with ``to_pcm`` (a :class:`UlawToPcm`), their audio resampled into one
    message (:func:`client_audio_frame`).

    :meth:`pump` returns a ``PUMP_*`` code; what it took is in :attr:`media`,
    :attr:`sent`, :attr:`marks` (the mark echoes' names, None when there were none: the
    caller handles them after any code), :attr:`payloads` / :attr:`rest`
    (``PUMP_PARSED``: with :attr:`marks`, twilio_uplink's results for the caller to carry
    on with), :attr:`unsent` and :attr:`error`. Both descriptors stay the caller's (never
    closed here)."""

    def __init__(
        self,
        parser: TwilioFrameParser[Any],
        jitter: UplinkJitterBuffer,
        silence: Callable[[int], str],
        twilio_fd: int,
        agent_fd: int,
        head: bytes,
        tail: bytes,
        to_pcm: UlawToPcm | None = None,
    ) -> None:
        if twilio_fd < 0 or agent_fd < 0:
            raise ValueError("descriptors must be open (>= 0)")
        self.parser = parser
        self._jitter = jitter
        self._silence = silence
        self.twilio_fd = twilio_fd
        self.agent_fd = agent_fd
        self._head = head
        self._tail = tail
        self._to_pcm = to_pcm
        self._clear()

    def _clear(self) -> None:
        self.media = 0
        self.sent = 0
        self.payloads: list[str] | None = None
        self.marks: list[str] | None = None
        self.rest: list[Any] | None = None
        self.unsent: bytes | None = None
        self.error = 0

    def pump(self) -> int:
        """One read, forwarded when it held media and mark echoes only. A protocol
        violation in the read raises the parser's ``ProtocolViolation``, as
        :func:`twilio_uplink` does."""
        self._clear()
        sock = _on_fd(self.twilio_fd)
        try:
            data = sock.recv(_PUMP_READ, socket.MSG_DONTWAIT)  # EINTR: retried (PEP 475)
        except BlockingIOError:
            return PUMP_IDLE
        except OSError as exc:
            self.error = exc.errno or 0
            return PUMP_CLOSED
        finally:
            sock.detach()
        if not data:
            return PUMP_CLOSED
        payloads, marks, media, rest = twilio_uplink(self.parser, self._jitter, data, self._silence)
        self.media = media
        self.marks = marks
        if rest is not None or not payloads:
            self.payloads, self.rest = payloads, rest
            return PUMP_PARSED
        if self._to_pcm is not None:  # one message of the read's audio, resampled
            audio = self._to_pcm.feed_b64_many(list[str | bytes](payloads))
            wire = client_audio_frame(self._head, audio, self._tail)
            self.sent = 1
        else:
            b64_wire = client_b64_frames(self._head, payloads, self._tail)
            if b64_wire is None:  # a payload that is not plain base64: the adapter serialises
                self.payloads = payloads
                return PUMP_PARSED
            wire = b64_wire
            self.sent = len(payloads)
        sock = _on_fd(self.agent_fd)
        try:
            written = sock.send(wire, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except OSError:  # EAGAIN or an error: WebSocket.write_nowait retries and decides
            written = 0
        finally:
            sock.detach()
        if written == len(wire):
            return PUMP_SENT
        self.unsent = wire[written:]
        return PUMP_UNSENT


class PumpHandler:
    """The reactor's handler for Twilio's socket while an :class:`UplinkPump` serves it:
    the usual outcome of a read (every append written) is counted in the handler, the
    rest goes to the call's hooks.

    Calling it serves one readable event:

    * not :attr:`armed`, or ``source.pumpable(dest)`` false: ``fallback()`` (the layered
      path decides);
    * otherwise :meth:`UplinkPump.pump`; ``PUMP_IDLE``: nothing;
    * ``PUMP_SENT`` / ``PUMP_UNSENT``: ``source.messages_in`` += media and mark echoes,
      ``metrics.frames_in`` += media, ``metrics.uplink_pumped`` += 1, ``dest.messages_out``
      += appends built, then ``on_marks(marks)`` when the read held echoes; ``PUMP_SENT``
      ends with ``latency.observe`` of the read's time (``time.perf_counter``),
      ``PUMP_UNSENT`` goes on with ``on_result(code, t0)`` (the rest must be queued);
    * ``PUMP_PARSED`` / ``PUMP_CLOSED``: ``on_result(code, t0)``;
    * any exception (the parser's ``ProtocolViolation``, a failing hook): ``on_error(exc)``.
    """

    def __init__(
        self,
        pump: UplinkPump,
        source: Any,
        dest: Any,
        metrics: Any,
        latency: Any,
        fallback: Callable[[], object],
        on_marks: Callable[[list[str]], object],
        on_result: Callable[[int, float], object],
        on_error: Callable[[Exception], object],
    ) -> None:
        if pump is None:
            raise TypeError("pump must be an UplinkPump")
        self.pump = pump
        self.armed = True
        self.source = source
        self.dest = dest
        self._metrics = metrics
        self._latency = latency
        self._fallback = fallback
        self._on_marks = on_marks
        self._on_result = on_result
        self._on_error = on_error

    def __call__(self) -> None:
        pump = self.pump
        if not self.armed or not self.source.pumpable(self.dest):
            self._fallback()
            return
        t0 = time.perf_counter()
        try:
            code = pump.pump()
            if code == PUMP_IDLE:
                return
            if code == PUMP_SENT or code == PUMP_UNSENT:
                media = pump.media
                marks = pump.marks
                self.source.messages_in += media if marks is None else media + len(marks)
                self._metrics.frames_in += media
                self._metrics.uplink_pumped += 1
                self.dest.messages_out += pump.sent
                if marks is not None:
                    self._on_marks(marks)
                if code == PUMP_SENT:
                    self._latency.observe(time.perf_counter() - t0)
                    return
            self._on_result(code, t0)
        except Exception as exc:
            self._on_error(exc)


class DownlinkHandler:
    """The reactor's handler for an OpenAI Realtime agent's socket: a read that holds
    nothing but audio deltas of items the session already knows goes from ``recv`` to
    ``send`` here; everything else reaches the call's hooks, parsed, in order.

    Calling it serves one readable event:

    * not :attr:`armed`, or ``ready()`` false: ``fallback()`` (the layered path reads);
    * ``recv(2)`` on ``agent_fd``: nothing waiting: return; end of stream or an error:
      ``on_closed(errno)`` (0: end of stream);
    * ``source.last_received = clock()`` when ``stamp``; the bytes to ``parser.feed``
      (a ``ServerFrameParser`` with ``openai_audio``: deltas come out as ``(item_id,
      audio)``);
    * each leading ``(item_id, audio)`` (audio: bytes) whose item is in ``item_bytes`` and not in
      ``truncated``: ``item_bytes[item_id] += len(audio)``, ``protocol.events_in`` and
      ``source.messages_in`` += 1, the audio (through ``to_ulaw.feed`` when given) pushed
      to ``downlink`` under ``item_id``, and ``call._current_rid = item_id``;
    * at the first other item (any other message, a control frame, a new or truncated
      item): ``on_rest(items, k, t_event, pushed)``, which carries on from ``items[k]``
      (and sends what was pushed: a barge-in later in the read must still drop it);
    * otherwise ``metrics.agent_direct`` += 1 and, when audio was pushed:
      ``downlink.pull(now_ms)``; the frames as
      :func:`twilio_frames` with ``media_prefix`` / ``mark_prefix`` in one ``send(2)`` on
      ``twilio_fd``, ``dest.messages_out`` += 2 per frame; written whole, or
      ``on_unsent(rest)`` returned True (it queued the rest): ``metrics.frames_out`` +=
      frames and ``latency.observe`` of the time since the read; then ``wake()`` when
      ``downlink.next_due(now_ms)`` is earlier than ``call._playout_due``;
    * any exception (the parser's ``ProtocolViolation``, a failing hook): ``on_error(exc)``.

    ``now_ms`` is ``clock() * 1000`` taken once per read."""

    def __init__(
        self,
        agent_fd: int,
        twilio_fd: int,
        source: Any,
        dest: Any,
        parser: ServerFrameParser[Any],
        downlink: DownlinkBuffer,
        item_bytes: dict[str, int],
        truncated: set[str],
        protocol: Any,
        to_ulaw: Any,
        media_prefix: bytes,
        mark_prefix: bytes,
        call: Any,
        metrics: Any,
        latency: Any,
        clock: Callable[[], float],
        stamp: bool,
        ready: Callable[[], bool],
        fallback: Callable[[], object],
        on_closed: Callable[[int], object],
        on_rest: Callable[[list[Any], int, float, bool], object],
        on_unsent: Callable[[bytes], bool],
        wake: Callable[[], object],
        on_error: Callable[[Exception], object],
    ) -> None:
        if agent_fd < 0 or twilio_fd < 0:
            raise ValueError("descriptors must be open (>= 0)")
        if parser is None or downlink is None or item_bytes is None:
            raise TypeError("parser, downlink and item_bytes are required")
        if not parser.openai_audio:
            raise ValueError("the parser must turn audio deltas into tuples (openai_audio)")
        self.armed = True
        self.agent_fd = agent_fd
        self.twilio_fd = twilio_fd
        self.source = source
        self.dest = dest
        self._parser = parser
        self._downlink = downlink
        self._items = item_bytes
        self._truncated = truncated
        self._protocol = protocol
        self._to_ulaw = to_ulaw
        self._media_prefix = media_prefix
        self._mark_prefix = mark_prefix
        self._call = call
        self._metrics = metrics
        self._latency = latency
        self._clock = clock
        self._stamp = stamp
        self._ready = ready
        self._fallback = fallback
        self._on_closed = on_closed
        self._on_rest = on_rest
        self._on_unsent = on_unsent
        self._wake = wake
        self._on_error = on_error

    def __call__(self) -> None:
        if not self.armed or not self._ready():
            self._fallback()
            return
        t_event = time.perf_counter()
        try:
            sock = _on_fd(self.agent_fd)
            try:
                data = sock.recv(_PUMP_READ, socket.MSG_DONTWAIT)  # EINTR: retried (PEP 475)
            except BlockingIOError:
                return
            except OSError as exc:
                self._on_closed(exc.errno or 0)
                return
            finally:
                sock.detach()
            if not data:
                self._on_closed(0)
                return
            now_s = self._clock()
            now_ms = now_s * 1000.0
            if self._stamp:
                self.source.last_received = now_s
            items = self._parser.feed(data)
            pushed = False
            k = 0
            for item in items:
                if type(item) is not tuple or len(item) != 2:
                    break
                item_id, audio = item
                if type(audio) is not bytes:
                    break
                known = self._items.get(item_id)
                if known is None or item_id in self._truncated:
                    break
                self._protocol.events_in += 1
                if audio:
                    self._items[item_id] = known + len(audio)
                    if self._to_ulaw is not None:
                        audio = self._to_ulaw.feed(audio)
                    self._downlink.push(audio, item_id)
                    self._call._current_rid = item_id
                    pushed = True
                k += 1
            self.source.messages_in += k
            if k < len(items):
                self._on_rest(items, k, t_event, pushed)
                return
            self._metrics.agent_direct += 1
            if not pushed:
                return
            frames = self._downlink.pull(now_ms)
            if frames:
                wire = twilio_frames(self._media_prefix, self._mark_prefix, frames)
                self.dest.messages_out += 2 * len(frames)
                sock = _on_fd(self.twilio_fd)
                try:
                    written = sock.send(wire, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                except OSError:  # EAGAIN or an error: on_unsent queues and decides
                    written = 0
                finally:
                    sock.detach()
                if written == len(wire) or self._on_unsent(wire[written:]):
                    self._metrics.frames_out += len(frames)
                    self._latency.observe(time.perf_counter() - t_event)
            due = self._downlink.next_due(now_ms)
            if due is not None and due < self._call._playout_due:
                self._wake()
        except Exception as exc:
            self._on_error(exc)


class Histogram:
    """Prometheus histogram plus a bounded window of recent raw samples.

    ``observe(value)``: the bucket is the first bound ``>= value`` (``bisect_left``; one
    more bucket above every bound), ``count`` += 1, ``sum`` += value, and the value is kept
    in a ring of the last ``window`` samples (:attr:`recent`, in ring order once full).
    """

    __slots__ = ("_counts", "_recent", "bounds", "count", "sum", "window")

    def __init__(self, bounds: tuple[float, ...] | list[float], window: int = 8_192) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum = 0.0
        self.window = window
        self._recent = array("d")

    def observe(self, value: float) -> None:
        value = float(value)
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        n = self.count
        self.count = n + 1
        self.sum += value
        if n < self.window:
            self._recent.append(value)
        else:
            self._recent[n % self.window] = value

    @property
    def counts(self) -> list[int]:
        return list(self._counts)

    @property
    def recent(self) -> array[float]:
        return array("d", self._recent)

    def percentile(self, q: float) -> float:
        """Exact ``q`` (0..100) percentile of the recent window, 0.0 when empty."""
        if not self._recent:
            return 0.0
        ordered = sorted(self._recent)
        idx = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
        return ordered[idx]

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile ``q`` (coarse, for summaries)."""
        if not self.count:
            return 0.0
        target = q * self.count
        seen = 0
        for i, n in enumerate(self._counts):
            seen += n
            if seen >= target:
                return self.bounds[i] if i < len(self.bounds) else float("inf")
        return float("inf")

    def render(self, name: str, labels: str = "") -> list[str]:
        lines = []
        cumulative = 0
        sep = "," if labels else ""
        for bound, n in zip(self.bounds, self._counts, strict=False):
            cumulative += n
            lines.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {cumulative}')
        lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        lab = f"{{{labels}}}" if labels else ""
        lines.append(f"{name}_sum{lab} {self.sum:.9f}")
        lines.append(f"{name}_count{lab} {self.count}")
        return lines


def timer_expirations(fd: int) -> int:
    """Expirations of a non-blocking ``timerfd`` since its last read (0: none yet): one
    8-byte ``read(2)``, the count in host byte order (timerfd_create(2))."""
    try:
        data = os.read(fd, 8)
    except BlockingIOError:
        return 0
    if len(data) != 8:
        raise OSError("short read from a timerfd")
    return int.from_bytes(data, sys.byteorder)


class ReactorCore:
    """The media reactor's handler table and one pass (relay/media/reactor.py).

    * :meth:`set_handler` / :meth:`drop` / :meth:`handler`: one handler per descriptor;
      ``len()`` counts them.
    * :meth:`poll`: the descriptors ``epoll`` reports ready now (never waits), all of
      them; returns how many.
    * :meth:`serve` (``coalesce_s``): ``wakeups`` += 1; each polled descriptor's handler,
      in the order polled, looked up at its turn (one a handler dropped is skipped),
      ``dispatched`` += 1 each; a handler that raises: ``handler_errors`` += 1, its
      descriptor dropped, then ``on_error(fd)`` inside the ``except`` (the exception is
      current there). Then ``now = clock()`` (or ``offset + time.perf_counter()`` after
      :meth:`use_clock_offset`; :meth:`now` reads the same); ``run_due(now)`` when
      ``heap[0][0] <= now``; ``rate`` += 0.2 * (polled / max(now - last, 1e-4) - rate),
      ``last = now``; returns ``coalesce_s > 0 and rate * coalesce_s >= 2``.
    """

    def __init__(
        self,
        epoll: select.epoll,
        clock: Callable[[], float],
        on_error: Callable[[int], object],
        heap: list[Any],
        run_due: Callable[[float], object],
    ) -> None:
        if heap is None:
            raise TypeError("heap must be a list")
        self._epoll = epoll
        self._table: dict[int, Callable[[], object]] = {}
        self._ready: list[tuple[int, int]] = []
        self._clock = clock
        self._offset: float | None = None
        self._on_error = on_error
        self._heap = heap
        self._run_due = run_due
        self.rate = 0.0
        self.last = 0.0
        self.wakeups = 0
        self.dispatched = 0
        self.handler_errors = 0

    def use_clock_offset(self, offset: float) -> None:
        self._offset = offset

    def _now(self) -> float:
        if self._offset is not None:
            return self._offset + time.perf_counter()
        return self._clock()

    def now(self) -> float:
        return self._now()

    def __len__(self) -> int:
        return len(self._table)

    def handler(self, fd: int) -> Callable[[], object] | None:
        return self._table.get(fd)

    def set_handler(self, fd: int, handler: Callable[[], object]) -> None:
        if handler is None:
            raise TypeError("handler must not be None")
        if fd < 0:
            raise ValueError("descriptor must be open (>= 0)")
        self._table[fd] = handler

    def drop(self, fd: int) -> None:
        self._table.pop(fd, None)

    def poll(self) -> int:
        self._ready = self._epoll.poll(0, max(len(self._table), 64))
        return len(self._ready)

    def serve(self, coalesce_s: float) -> bool:
        ready, self._ready = self._ready, []
        self.wakeups += 1
        table = self._table
        for fd, _events in ready:
            handler = table.get(fd)
            if handler is None:
                continue
            self.dispatched += 1
            try:
                handler()
            except Exception:
                self.handler_errors += 1
                if table.get(fd) is handler:
                    del table[fd]
                self._on_error(fd)
        now = self._now()
        heap = self._heap
        if heap and heap[0][0] <= now:
            self._run_due(now)
        elapsed = max(now - self.last, 1e-4)
        self.last = now
        self.rate += 0.2 * (len(ready) / elapsed - self.rate)
        return coalesce_s > 0 and self.rate * coalesce_s >= 2.0
