"""codec.twilio_frames: the media + mark frames of one downlink pull in wire form.

The compiled function must equal its reference byte for byte, and the reference must equal
what the per-message path builds (TwilioStream.media_message / mark_message, each in an
unmasked text frame) and what a WebSocket reader parses back.
"""

from __future__ import annotations

import base64
from types import ModuleType

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.media import _codec, codec_ref
from relay.media.websocket import OP_TEXT, FrameParser, build_frame
from relay.protocol.twilio import Start, TwilioStream

IMPLS = [pytest.param(_codec, id="compiled"), pytest.param(codec_ref, id="ref")]
SID = "MZ" + "0123456789abcdef" * 2


def started() -> TwilioStream:
    proto = TwilioStream()
    start = {
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": SID,
        "start": {
            "streamSid": SID,
            "accountSid": "AC" + "1" * 32,
            "callSid": "CA" + "2" * 32,
            "tracks": ["inbound"],
            "customParameters": {},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    }
    assert isinstance(proto.parse(orjson.dumps(start).decode()), Start)
    return proto


frames_st = st.lists(
    st.tuples(
        # 0..200 bytes covers every base64 tail (n % 3) and the 7-bit/16-bit length switch
        st.binary(min_size=0, max_size=200),
        st.integers(min_value=0, max_value=10**12).map(str),
        st.just("rid"),
    ),
    max_size=6,
)


@given(frames=frames_st)
@settings(max_examples=300, deadline=None)
def test_compiled_equals_reference_equals_per_message_path(
    frames: list[tuple[bytes, str, str]],
) -> None:
    proto = started()
    got = _codec.twilio_frames(proto.media_prefix, proto.mark_prefix, frames)
    assert got == codec_ref.twilio_frames(proto.media_prefix, proto.mark_prefix, frames)
    per_message = b"".join(
        build_frame(OP_TEXT, proto.media_message(ulaw))
        + build_frame(OP_TEXT, proto.mark_message(n))
        for ulaw, n, _ in frames
    )
    assert got == per_message


@pytest.mark.parametrize("impl", IMPLS)
def test_a_reader_gets_the_media_and_marks_back(impl: ModuleType) -> None:
    proto = started()
    audio = [bytes(range(160)), b"\xff" * 80, b"\x01"]
    wire = impl.twilio_frames(
        proto.media_prefix, proto.mark_prefix, [(a, str(i), "r") for i, a in enumerate(audio)]
    )
    messages = FrameParser(expect_masked=False).feed(wire)
    assert len(messages) == 2 * len(audio)
    for i, a in enumerate(audio):
        media = orjson.loads(messages[2 * i])
        mark = orjson.loads(messages[2 * i + 1])
        assert media == {
            "event": "media",
            "streamSid": SID,
            "media": {"payload": base64.b64encode(a).decode()},
        }
        assert mark == {"event": "mark", "streamSid": SID, "mark": {"name": str(i)}}


@pytest.mark.parametrize("impl", IMPLS)
def test_large_frames_use_the_64_bit_length(impl: ModuleType) -> None:
    proto = started()
    big = bytes(60_000)  # 80,000 base64 characters: past the 16-bit length
    wire = impl.twilio_frames(proto.media_prefix, proto.mark_prefix, [(big, "7", "r")])
    assert wire[1] == 127
    (media, mark) = FrameParser(expect_masked=False, max_message=1 << 20).feed(wire)
    assert orjson.loads(media)["media"]["payload"] == base64.b64encode(big).decode()
    assert orjson.loads(mark)["mark"]["name"] == "7"


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_pull_is_empty(impl: ModuleType) -> None:
    assert impl.twilio_frames(b"a", b"b", []) == b""


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_items_are_refused(impl: ModuleType) -> None:
    with pytest.raises(ValueError, match="ASCII"):
        impl.twilio_frames(b"a", b"b", [(b"x", "é", "r")])
    with pytest.raises(TypeError):
        impl.twilio_frames(b"a", b"b", [(bytearray(b"x"), "1", "r")])
    with pytest.raises(TypeError):
        impl.twilio_frames(b"a", b"b", [[b"x", "1", "r"]])
