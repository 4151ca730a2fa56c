"""Sans-IO Twilio Media Streams parsing and building (no sockets)."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.errors import LocalProtocolError
from relay.protocol.twilio import (
    Connected,
    Dtmf,
    MarkEcho,
    Media,
    Start,
    Stop,
    TwilioProtocolError,
    TwilioStream,
)

SID = "MZ" + "a" * 32
START = {
    "event": "start",
    "sequenceNumber": "1",
    "streamSid": SID,
    "start": {
        "accountSid": "AC" + "b" * 32,
        "streamSid": SID,
        "callSid": "CA" + "c" * 32,
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"token": "t"},
    },
}


def started() -> TwilioStream:
    s = TwilioStream()
    assert isinstance(
        s.parse(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})),
        Connected,
    )
    ev = s.parse(json.dumps(START))
    assert isinstance(ev, Start)
    assert ev.custom_parameters == {"token": "t"}
    return s


def test_full_message_set() -> None:
    s = started()
    media = {
        "event": "media",
        "sequenceNumber": "2",
        "streamSid": SID,
        "media": {"track": "inbound", "chunk": "1", "timestamp": "20", "payload": "//8="},
    }
    assert s.parse(json.dumps(media)) == Media(20, "//8=", 1, "inbound")
    dtmf = {"event": "dtmf", "streamSid": SID, "dtmf": {"track": "inbound_track", "digit": "5"}}
    assert s.parse(json.dumps(dtmf)) == Dtmf("5", "inbound_track")
    mark = {"event": "mark", "streamSid": SID, "mark": {"name": "7"}}
    assert s.parse(json.dumps(mark)) == MarkEcho("7")
    stop = {"event": "stop", "streamSid": SID, "stop": {"accountSid": "AC", "callSid": "CA1"}}
    assert s.parse(json.dumps(stop)) == Stop("CA1")


def test_outbound_messages_are_valid_json_with_stream_sid() -> None:
    s = started()
    media = orjson.loads(s.media_message(b"\xff\x7f"))
    assert media == {"event": "media", "streamSid": SID, "media": {"payload": "/38="}}
    assert orjson.loads(s.mark_message("12")) == {
        "event": "mark",
        "streamSid": SID,
        "mark": {"name": "12"},
    }
    assert orjson.loads(s.clear_message()) == {"event": "clear", "streamSid": SID}


def test_never_sends_before_start() -> None:
    with pytest.raises(LocalProtocolError):
        TwilioStream().media_message(b"\xff")


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("{not json", "twilio_json"),
        ("[1,2]", "twilio_message"),
        ('{"event":"bogus"}', "twilio_event"),
    ],
)
def test_garbage_before_start(text: str, kind: str) -> None:
    with pytest.raises(TwilioProtocolError) as info:
        TwilioStream().parse(text)
    assert info.value.kind == kind


def test_media_before_start_is_an_order_error() -> None:
    with pytest.raises(TwilioProtocolError) as info:
        TwilioStream().parse(json.dumps({"event": "media", "streamSid": SID, "media": {}}))
    assert info.value.kind == "twilio_order"


@pytest.mark.parametrize(
    "media",
    [
        {"timestamp": 20, "payload": "//8="},  # number instead of string
        {"timestamp": "x", "payload": "//8="},
        {"timestamp": "20"},
        "oops",
    ],
)
def test_bad_media_fields(media: object) -> None:
    s = started()
    with pytest.raises(TwilioProtocolError):
        s.parse(json.dumps({"event": "media", "streamSid": SID, "media": media}))


def test_wrong_stream_sid_second_start_and_bad_format() -> None:
    s = started()
    with pytest.raises(TwilioProtocolError) as info:
        s.parse(json.dumps({"event": "mark", "streamSid": "MZother", "mark": {"name": "1"}}))
    assert info.value.kind == "twilio_stream_sid"
    with pytest.raises(TwilioProtocolError):
        s.parse(json.dumps(START))
    bad = json.loads(json.dumps(START))
    bad["start"]["mediaFormat"]["sampleRate"] = 16000
    with pytest.raises(TwilioProtocolError) as info:
        TwilioStream().parse(json.dumps(bad))
    assert info.value.kind == "twilio_format"


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=10), children, max_size=4)
        ),
        max_leaves=12,
    )
)
def test_parse_never_crashes_on_arbitrary_json(value: object) -> None:
    s = started()
    try:
        s.parse(json.dumps(value))
    except TwilioProtocolError:
        pass
