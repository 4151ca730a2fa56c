"""twilio_uplink: one read from Twilio parsed, ordered and collected in one call.

The compiled relay.media._codec.twilio_uplink must return exactly what its reference in
relay.media.codec_ref returns, read by read, and leave its parser and jitter buffer in the
same state; and the reference must be what Call's general path does with the same read
(parser.feed, then each media message through UplinkJitterBuffer.push as a 20 ms frame).
"""

from __future__ import annotations

import base64
import json
import random
from types import ModuleType
from typing import Any

import pytest
from frame_cases import frame
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.media import _codec, codec, codec_ref
from relay.media.websocket import OP_BINARY, OP_PING, OP_TEXT, Control, ProtocolViolation

IMPLS = [pytest.param(_codec, id="compiled"), pytest.param(codec_ref, id="ref")]
SID = "MZ" + "0123456789abcdef" * 2


def media(ts: int, payload: bytes, sid: str = SID) -> bytes:
    msg = {
        "event": "media",
        "sequenceNumber": "7",
        "media": {
            "track": "inbound",
            "chunk": "3",
            "timestamp": str(ts),
            "payload": base64.b64encode(payload).decode(),
        },
        "streamSid": sid,
    }
    return frame(OP_TEXT, json.dumps(msg).encode())


def mark(name: str) -> bytes:
    msg = {"event": "mark", "sequenceNumber": "8", "streamSid": SID, "mark": {"name": name}}
    return frame(OP_TEXT, json.dumps(msg).encode())


def dtmf(digit: str) -> bytes:
    msg = {"event": "dtmf", "streamSid": SID, "sequenceNumber": "9", "dtmf": {"digit": digit}}
    return frame(OP_TEXT, json.dumps(msg).encode())


def b64(payload: bytes) -> str:
    return base64.b64encode(payload).decode()


def silence(duration_ms: int) -> str:
    return f"<silence {duration_ms} ms>"


def pair(impl: ModuleType, reorder_ms: int = 0) -> tuple[Any, Any]:
    parser = impl.TwilioFrameParser(
        SID, max_message=65536, control=Control, violation=ProtocolViolation
    )
    return parser, impl.UplinkJitterBuffer(frame_ms=20, reorder_ms=reorder_ms)


def counters(jb: Any) -> tuple[int, ...]:
    return (
        jb.gaps_filled,
        jb.silence_ms,
        jb.skipped_ms,
        jb.duplicates,
        jb.late_drops,
        jb.overflow_drops,
        jb.frames_out,
        jb.held,
        jb.held_ms,
    )


def general_path(parser: Any, jitter: Any, data: bytes) -> tuple[Any, ...]:
    """What Call's general path does with one read, for the hot path's leading part."""
    payloads: list[str] = []
    marks: list[str] = []
    media_n = 0
    items = parser.feed(data)
    for i, item in enumerate(items):
        if type(item) is not tuple:
            return payloads, marks or None, media_n, items[i:]
        if len(item) == 2:
            media_n += 1
            for _ts, payload, dur in jitter.push(item[0], item[1], 20):
                payloads.append(payload if payload is not None else silence(dur))
        else:
            marks.append(item[0])
    return payloads, marks or None, media_n, None


# -- behaviour --------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_media_and_marks_in_one_read(impl: ModuleType) -> None:
    parser, jitter = pair(impl)
    data = media(0, b"\x01" * 160) + mark("m1") + media(20, b"\x02" * 160) + mark("m2")
    payloads, marks, n, rest = impl.twilio_uplink(parser, jitter, data, silence)
    assert payloads == [b64(b"\x01" * 160), b64(b"\x02" * 160)]
    assert marks == ["m1", "m2"] and n == 2 and rest is None
    assert jitter.frames_out == 2


@pytest.mark.parametrize("impl", IMPLS)
def test_a_gap_is_filled_by_the_silence_callback(impl: ModuleType) -> None:
    parser, jitter = pair(impl)
    impl.twilio_uplink(parser, jitter, media(1000, b"\x01" * 160), silence)
    payloads, marks, n, rest = impl.twilio_uplink(
        parser, jitter, media(1060, b"\x02" * 160), silence
    )
    assert payloads == [silence(40), b64(b"\x02" * 160)]
    assert (marks, n, rest) == (None, 1, None)
    assert jitter.gaps_filled == 1 and jitter.silence_ms == 40


@pytest.mark.parametrize("impl", IMPLS)
def test_stops_at_the_first_other_message(impl: ModuleType) -> None:
    """Everything from the first message that is not this stream's media or mark is left
    for the general path, in order, media after it included."""
    parser, jitter = pair(impl)
    ping = frame(OP_PING, b"hi")
    data = (
        media(0, b"\x01" * 160)
        + mark("a")
        + dtmf("5")
        + media(20, b"\x02" * 160)
        + ping
        + frame(OP_BINARY, b"\x00")
    )
    payloads, marks, n, rest = impl.twilio_uplink(parser, jitter, data, silence)
    assert payloads == [b64(b"\x01" * 160)] and marks == ["a"] and n == 1
    assert rest is not None and len(rest) == 4
    assert isinstance(rest[0], str) and json.loads(rest[0])["event"] == "dtmf"
    assert rest[1] == (20, b64(b"\x02" * 160))  # still a parsed tuple, not pushed
    assert rest[2] == Control(OP_PING, b"hi") and rest[3] == b"\x00"
    assert jitter.frames_out == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_another_streams_media_is_left_as_text(impl: ModuleType) -> None:
    parser, jitter = pair(impl)
    other = "MZ" + "f" * 32
    payloads, marks, n, rest = impl.twilio_uplink(parser, jitter, media(0, b"\x01", other), silence)
    assert (payloads, marks, n) == ([], None, 0)
    assert rest is not None and isinstance(rest[0], str)


@pytest.mark.parametrize("impl", IMPLS)
def test_half_a_frame_waits_for_the_next_read(impl: ModuleType) -> None:
    parser, jitter = pair(impl)
    data = media(0, b"\x01" * 160)
    assert impl.twilio_uplink(parser, jitter, data[:50], silence) == ([], None, 0, None)
    payloads, _, n, _ = impl.twilio_uplink(parser, jitter, data[50:], silence)
    assert payloads == [b64(b"\x01" * 160)] and n == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_a_violation_is_raised_and_nothing_is_pushed(impl: ModuleType) -> None:
    parser, jitter = pair(impl)
    unmasked = frame(OP_TEXT, b"{}", mask=False)
    with pytest.raises(ProtocolViolation):
        impl.twilio_uplink(parser, jitter, media(0, b"\x01") + unmasked, silence)
    assert jitter.frames_out == 0


def test_exported_from_codec() -> None:
    assert codec.twilio_uplink is _codec.twilio_uplink


# -- differential -------------------------------------------------------------------------


@st.composite
def reads(draw: st.DrawFn) -> tuple[list[bytes], int]:
    """A Twilio stream (media with gaps, repeats and reordering; marks; DTMF; pings;
    another stream's media) cut into random reads, and the jitter buffer's reorder window."""
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    frames: list[bytes] = []
    ts = rnd.choice([0, 2**32 - 60, 123_456])
    for _ in range(rnd.randint(1, 40)):
        kind = rnd.random()
        if kind < 0.7:
            step = rnd.choice([20, 20, 20, 20, 40, 0, -20, 100, 60])
            ts = (ts + step) % 2**32
            frames.append(media(ts, bytes([rnd.randrange(256)]) * rnd.choice([160, 80, 1])))
        elif kind < 0.8:
            frames.append(mark(f"m{rnd.randrange(100)}"))
        elif kind < 0.87:
            frames.append(dtmf(rnd.choice("0123456789*#")))
        elif kind < 0.94:
            frames.append(frame(OP_PING, b"p"))
        else:
            frames.append(media(ts, b"\x05", "MZ" + "e" * 32))
    data = b"".join(frames)
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=12))))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return chunks, draw(st.sampled_from([0, 0, 40, 100]))


@settings(max_examples=300, deadline=None)
@given(reads())
def test_compiled_reference_and_general_path_agree(case: tuple[list[bytes], int]) -> None:
    """Read by read: the same results and the same jitter state from the compiled call,
    its reference and the general path (each on its own parser and jitter buffer)."""
    chunks, reorder_ms = case
    compiled, ref, general = (
        pair(_codec, reorder_ms),
        pair(codec_ref, reorder_ms),
        pair(codec_ref, reorder_ms),
    )
    for data in chunks:
        got = _codec.twilio_uplink(*compiled, data, silence)
        want = codec_ref.twilio_uplink(*ref, data, silence)
        assert got == want
        assert general_path(*general, data) == want
        assert counters(compiled[1]) == counters(ref[1]) == counters(general[1])
        rest = want[3] or []
        for jitter in (compiled[1], ref[1], general[1]):  # the general path's share
            for item in rest:
                if type(item) is tuple and len(item) == 2:
                    jitter.push(item[0], item[1], 20)
