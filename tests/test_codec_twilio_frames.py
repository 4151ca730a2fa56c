"""TwilioFrameParser: RFC 6455 frames from Twilio plus the media/mark fast path.

Three parsers must agree call by call (results, or the same exception at the same call):
the compiled relay.media._codec.TwilioFrameParser, its reference in relay.media.codec_ref,
and relay.media.websocket.FrameParser itself with the reference scanner applied to its str
messages (that one checks the frame layer of both against the real thing).  Every tuple
the scanner returns must be what relay.protocol.twilio.TwilioStream.parse makes of the
message; messages outside the scanner's subset must stay str.
"""

from __future__ import annotations

import base64
import json
import random
from types import ModuleType
from typing import Any

import pytest
from frame_cases import (
    KEYS,
    SEEDS,
    WS,
    Obj,
    Raw,
    check_scanned,
    chunked_stream,
    frame,
    has_raw,
    mutate,
    render,
    side_by_side,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.media import _codec, codec, codec_ref
from relay.media.websocket import (
    CLOSE_INVALID_DATA,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    Control,
    FrameParser,
    ProtocolViolation,
)
from relay.protocol.twilio import MarkEcho, Media, Start, TwilioStream

IMPLS = [pytest.param(_codec, id="compiled"), pytest.param(codec_ref, id="ref")]
SID = "MZ" + "0123456789abcdef" * 2
OTHER_SID = "MZ" + "fedcba9876543210" * 2

# -- helpers ------------------------------------------------------------------------------


def make(impl: ModuleType, max_message: int = 65536, sid: str = SID) -> Any:
    return impl.TwilioFrameParser(
        sid, max_message=max_message, control=Control, violation=ProtocolViolation
    )


class Oracle:
    """The real FrameParser, its str messages passed through the reference scanner."""

    def __init__(self, max_message: int = 65536, sid: str = SID) -> None:
        self.frames = FrameParser(expect_masked=True, max_message=max_message)
        self.sid = sid.encode("utf-8", "surrogatepass")

    def feed(self, data: bytes) -> list[object]:
        out: list[object] = []
        for item in self.frames.feed(data):
            if isinstance(item, str):
                scanned = codec_ref.scan_twilio(item.encode("utf-8"), self.sid)
                if scanned is not None and self.sid == SID.encode():
                    check_slow_path(item, scanned)  # what TwilioStream makes of the text
                out.append(item if scanned is None else scanned)
            else:
                out.append(item)
        return out


def run_all(chunks: list[bytes], max_message: int = 65536, sid: str = SID) -> list[Any]:
    """Feed the same chunks to all three parsers; assert they agree; return the outcomes."""
    parsers = [make(_codec, max_message, sid), make(codec_ref, max_message, sid)]
    return side_by_side([p.feed for p in parsers], Oracle(max_message, sid).feed, chunks)


def started_stream(sid: str = SID) -> TwilioStream:
    s = TwilioStream()
    start = {
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": sid,
        "start": {
            "accountSid": "AC" + "b" * 32,
            "streamSid": sid,
            "callSid": "CA" + "c" * 32,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    }
    assert isinstance(s.parse(json.dumps(start)), Start)
    return s


STREAM = started_stream()  # media/mark parsing does not change its state


def check_slow_path(text: str, got: object) -> None:
    """A tuple must be exactly what the slow path makes of the message."""
    if isinstance(got, tuple):
        event = STREAM.parse(text)
        if len(got) == 2:
            assert isinstance(event, Media)
            assert (event.timestamp_ms, event.payload) == got
        else:
            assert event == MarkEcho(got[0])
    else:
        assert got == text


def one_text(impl: ModuleType, msg: bytes | str, sid: str = SID) -> object:
    data = msg.encode("utf-8") if isinstance(msg, str) else msg
    (got,) = make(impl, sid=sid).feed(frame(0x1, data))
    return got


# -- message generator ----------------------------------------------------------------------

B64 = st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode())
DIGITS = st.integers(0, 10**15 - 1).map(str)
BAD_NUMBERS = st.sampled_from(
    ["", "+5", "-5", " 5", "5 ", "1_0", "0x10", "1e3", "5.0", "٣", "1" * 16, "abc"]
)


EXTRA_VALUES = st.sampled_from(
    [Raw("1"), Raw("-2.5e3"), Raw("null"), Raw("true"), Raw("false"), Raw("[]"), Raw('["a"]')]
) | st.builds(lambda s: Obj([("k", s)]), st.text(max_size=5))


@st.composite
def twilio_message(draw: st.DrawFn) -> tuple[bytes, bool | None]:
    """A text message and whether the scanner must recognise it (True), must not (False),
    or may do either (None: byte-level mutations)."""
    rnd = random.Random(draw(SEEDS))
    kind = draw(st.sampled_from(["media", "mark", "media", "mark", "dtmf", "stop", "start"]))
    ok = kind in ("media", "mark")  # the slow path gives Media / MarkEcho
    subset = True  # no number, literal, array, stray object or repeated key
    sid: object = SID
    if rnd.random() < 0.10:
        sid = draw(st.sampled_from([OTHER_SID, "", SID + " ", SID[:-1], Raw("null"), Raw("5")]))
        ok = False
    pairs: list[tuple[str, object]] = [("event", kind), ("streamSid", sid)]
    if draw(st.booleans()):
        pairs.append(("sequenceNumber", draw(DIGITS)))
    if kind == "media" or rnd.random() < 0.20:
        inner: list[tuple[str, object]] = []
        if rnd.random() < 0.10:
            inner.append(("timestamp", draw(BAD_NUMBERS | st.just(Raw("5")))))
            ok = ok and kind != "media"
        else:
            inner.append(("timestamp", draw(DIGITS)))
        if rnd.random() < 0.10:
            bad = st.sampled_from([Raw("null"), Raw("7"), "é/", "a\\b", 'q"'])
            inner.append(("payload", draw(bad)))
            ok = ok and kind != "media"
        elif rnd.random() > 0.06:
            inner.append(("payload", draw(B64)))
        else:
            ok = ok and kind != "media"  # no payload
        chunk = rnd.randrange(6)
        if chunk == 1:
            inner.append(("chunk", draw(DIGITS)))
        elif chunk == 2:
            inner.append(("chunk", draw(BAD_NUMBERS)))
            ok = ok and kind != "media"
        if draw(st.booleans()):
            inner.append(("track", draw(st.sampled_from(["inbound", "outbound", "x"]))))
        rnd.shuffle(inner)
        pairs.append(("media", Obj(inner)))
    if kind == "mark" or rnd.random() < 0.20:
        name: object
        if rnd.random() > 0.06:
            name = draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20))
        else:
            name = draw(st.sampled_from([Raw("1"), Raw("null"), "é"]))
            ok = ok and kind != "mark"
        inner_mark: list[tuple[str, object]] = [("name", name)]
        if draw(st.booleans()):
            inner_mark.append(("other", "x"))
        pairs.append(("mark", Obj(inner_mark)))
    if rnd.random() < 0.17:
        pairs.append((draw(st.sampled_from(["extra", "media2", "start"])), draw(EXTRA_VALUES)))
        subset = False
    if rnd.random() < 0.08:
        pairs.append((rnd.choice(pairs)[0], "dup"))  # a repeated key
        subset = False
    rnd.shuffle(pairs)
    text = rnd.choice(WS) + render(Obj(pairs), rnd, rnd.random() < 0.08)
    text += rnd.choice(WS)
    data = text.encode("utf-8")
    # escapes (\uXXXX, \", \\) and non-ASCII are outside the subset wherever they appear
    subset = subset and not has_raw(pairs) and "\\" not in text and data.isascii()
    return mutate(draw, rnd, data, ok and subset)


@settings(max_examples=400, deadline=None)
@given(twilio_message())
def test_scanner_against_slow_path(msg: tuple[bytes, bool | None]) -> None:
    data, verdict = msg
    feeds = [make(impl).feed for impl in (_codec, codec_ref)]
    check_scanned(feeds, frame(0x1, data), data, verdict, check_slow_path)


@settings(max_examples=250, deadline=None)
@given(chunked_stream(twilio_message(), masked=True))
def test_compiled_ref_and_frameparser_agree(stream: tuple[list[bytes], int]) -> None:
    chunks, max_message = stream
    run_all(chunks, max_message)  # (the oracle checks each tuple against TwilioStream)


@settings(max_examples=60, deadline=None)
@given(st.lists(twilio_message(), min_size=1, max_size=4), KEYS)
def test_byte_by_byte(msgs: list[tuple[bytes, bool | None]], key: bytes) -> None:
    data = b"".join(frame(0x1, m, key=key) + frame(0xA, b"", key=key) for m, _ in msgs)
    whole = run_all([data])
    single = run_all([data[i : i + 1] for i in range(len(data))])
    if whole[0][0] == "ok":
        assert [item for r in single for item in r[1]] == whole[0][1]


# -- canonical shapes and fallbacks ---------------------------------------------------------

PAYLOAD = base64.b64encode(bytes(range(160))).decode()
MEDIA = (
    '{"event":"media","sequenceNumber":"3","media":{"track":"inbound","chunk":"1",'
    f'"timestamp":"5","payload":"{PAYLOAD}"}},"streamSid":"{SID}"}}'
)
MARK = f'{{"event":"mark","sequenceNumber":"4","streamSid":"{SID}","mark":{{"name":"my label"}}}}'


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("text", "want"),
    [
        (MEDIA, (5, PAYLOAD)),
        (MARK, ("my label",)),
        # key order, whitespace, optional members, leading zeros, 15 digits
        (
            f' \r\n{{ "streamSid" :\t"{SID}" , "media" : {{ "payload" : "", "timestamp" :'
            ' "000123456789012345" } , "event":"media" }\n',
            None,  # 18 digits: falls back (checked below)
        ),
        (
            f'{{"media":{{"timestamp":"999999999999999","payload":"AA=="}},'
            f'"streamSid":"{SID}","event":"media"}}',
            (999999999999999, "AA=="),
        ),
        (f'{{"mark":{{"name":""}},"event":"mark","streamSid":"{SID}"}}', ("",)),
        (
            f'{{"event":"mark","streamSid":"{SID}","mark":{{"name":"a b/c~"}},'
            '"media":{"payload":"x"}}',
            ("a b/c~",),
        ),
    ],
)
def test_recognised_shapes(impl: ModuleType, text: str, want: object) -> None:
    got = one_text(impl, text)
    check_slow_path(text, got)
    assert got == (want if want is not None else text)


FALLBACKS = [
    MEDIA.replace('"media"', '"\\u006dedia"', 1),  # escape in a key
    MEDIA.replace(PAYLOAD, PAYLOAD[:10] + "\\/" + PAYLOAD[10:]),  # escape in a value
    MEDIA.replace(SID, OTHER_SID),  # another stream
    MEDIA.replace(f',"streamSid":"{SID}"', ""),  # no streamSid
    MEDIA.replace('"timestamp":"5"', '"timestamp":5'),  # a number
    MEDIA.replace('"timestamp":"5"', '"timestamp":"+5"'),  # int() says 5, we do not
    MEDIA.replace('"timestamp":"5"', '"timestamp":" 5"'),
    MEDIA.replace('"timestamp":"5"', '"timestamp":"1_000"'),
    MEDIA.replace('"timestamp":"5"', '"timestamp":"1234567890123456"'),  # 16 digits
    MEDIA.replace('"timestamp":"5"', '"timestamp":""'),  # slow path: error
    MEDIA.replace('"chunk":"1"', '"chunk":""'),  # slow path: chunk 0, still a fallback
    MEDIA.replace('"chunk":"1"', '"chunk":1'),
    MEDIA.replace('"chunk":"1"', '"chunk":null'),
    MEDIA.replace('"track":"inbound"', '"track":{"a":"b"}'),  # deeper nesting
    MEDIA.replace('"sequenceNumber":"3"', '"sequenceNumber":["3"]'),  # an array
    MEDIA.replace('"sequenceNumber":"3"', '"sequenceNumber":true'),
    MEDIA.replace('"track":"inbound"', '"track":"inbound é"'),  # non-ASCII
    MEDIA.replace('"track":"inbound"', '"track":"tab\there"'),  # control character
    MEDIA.replace('"sequenceNumber":"3"', '"sequenceNumber":"3","sequenceNumber":"4"'),
    MEDIA.replace('"payload"', '"payload":"x","payload"'),  # duplicate: orjson keeps last
    MEDIA + " x",  # trailing garbage
    MEDIA + "{}",
    MEDIA[:-1],  # truncated
    MEDIA.replace(",", ",,", 1),
    MEDIA.replace('=="}', '==",}', 1),  # trailing comma
    MEDIA.replace('"media":{', '"media":"{', 1),
    "{"
    + ",".join(f'"k{i}":"v"' for i in range(16))
    + f',"event":"mark","streamSid":"{SID}"'
    + ',"mark":{"name":"n"}}',  # more than 16 members
    MARK.replace('"name"', '"Name"'),
    MARK.replace('{"name":"my label"}', '"my label"'),
    MARK.replace('"mark":{', '"event":"mark","mark":{'),  # duplicate event
    MARK.replace('"event":"mark"', '"event":"Mark"'),
    f'{{"event":"dtmf","streamSid":"{SID}","dtmf":{{"digit":"5"}}}}',
    f'{{"event":"stop","streamSid":"{SID}","stop":{{"callSid":"CA1"}}}}',
    "[]",
    '"media"',
    "",
    " ",
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("text", FALLBACKS)
def test_fallbacks_stay_str(impl: ModuleType, text: str) -> None:
    assert text not in (MEDIA, MARK)  # each case changes the canonical message
    assert one_text(impl, text) == text


@pytest.mark.parametrize("impl", IMPLS)
def test_stream_sid_edge_cases(impl: ModuleType) -> None:
    empty = MEDIA.replace(SID, "")
    assert one_text(impl, empty, sid="") == empty  # no stream: no fast path
    sid = "MZé"
    text = MEDIA.replace(SID, sid)
    assert one_text(impl, text, sid=sid) == text  # non-ASCII never matches: slow path
    assert one_text(impl, MARK, sid=SID[:-1]) == MARK
    p = make(impl)
    assert (p.stream_sid, p.max_message) == (SID, 65536)
    with pytest.raises(TypeError):
        impl.TwilioFrameParser(None, control=Control, violation=ProtocolViolation)


@pytest.mark.parametrize("impl", IMPLS)
def test_callbacks_and_input_types(impl: ModuleType) -> None:
    seen: list[tuple[int, bytes]] = []

    def control(op: int, payload: bytes) -> str:
        seen.append((op, payload))
        return "control"

    p = impl.TwilioFrameParser(SID, control=control, violation=lambda m, c: ValueError(m, c))
    data = frame(0x9, b"hi") + frame(0x1, MARK.encode()) + frame(0x2, b"\x00\xff")
    assert p.feed(bytearray(data[:5])) == []
    assert p.feed(memoryview(data[5:])) == ["control", ("my label",), b"\x00\xff"]
    assert seen == [(0x9, b"hi")]
    with pytest.raises(ValueError) as info:
        p.feed(frame(0x1, b"x", mask=False))
    assert info.value.args == ("unmasked client frame", CLOSE_PROTOCOL_ERROR)


def test_exported_from_codec() -> None:
    assert codec.TwilioFrameParser is _codec.TwilioFrameParser
    assert "TwilioFrameParser" in codec.__all__ and "TwilioFrameParser" in codec_ref.__all__
    assert _codec.TwilioFrameParser[Control] is not None  # generic in the stub


# -- every error path of FrameParser --------------------------------------------------------

# fmt: off
ERRORS: list[tuple[str, list[bytes], int, str, int]] = [
    ("rsv", [frame(0x1, b"{}", rsv=4)], 65536,
     "RSV bits set without a negotiated extension", CLOSE_PROTOCOL_ERROR),
    ("unmasked", [frame(0x2, b"ab", mask=False)], 65536,
     "unmasked client frame", CLOSE_PROTOCOL_ERROR),
    ("too big 7", [frame(0x2, b"x" * 101)], 100, "frame of 101 bytes exceeds 100", CLOSE_TOO_BIG),
    ("too big 16", [frame(0x1, b"", length=5000)[:4]], 1000,
     "frame of 5000 bytes exceeds 1000", CLOSE_TOO_BIG),
    ("too big 64", [frame(0x2, b"", length=2**64 - 1)[:10]], 65536,
     f"frame of {2**64 - 1} bytes exceeds 65536", CLOSE_TOO_BIG),
    ("negative limit", [frame(0x2, b"")], -1, "frame of 0 bytes exceeds -1", CLOSE_TOO_BIG),
    ("control opcode", [frame(0xB, b"x")], 65536, "unknown control opcode 0xb",
     CLOSE_PROTOCOL_ERROR),
    ("fragmented ping", [frame(0x9, b"x", fin=False)], 65536,
     "fragmented or oversized control frame", CLOSE_PROTOCOL_ERROR),
    ("oversized pong", [frame(0xA, b"x" * 126)], 65536,
     "fragmented or oversized control frame", CLOSE_PROTOCOL_ERROR),
    ("lone continuation", [frame(0x0, b"x")], 65536,
     "continuation frame without a message to continue", CLOSE_PROTOCOL_ERROR),
    ("fragments too big", [frame(0x1, b"a" * 60, fin=False) + frame(0x0, b"b" * 60)], 100,
     "fragmented message too big", CLOSE_TOO_BIG),
    ("data inside fragments", [frame(0x2, b"a", fin=False) + frame(0x1, b"b")], 65536,
     "new data frame inside a fragmented message", CLOSE_PROTOCOL_ERROR),
    ("data opcode", [frame(0x3, b"x")], 65536, "unknown data opcode 0x3", CLOSE_PROTOCOL_ERROR),
    ("utf-8", [frame(0x1, b"ok \xc3")], 65536, "text frame is not valid UTF-8",
     CLOSE_INVALID_DATA),
    ("utf-8 fragmented", [frame(0x1, b"\xe2\x82", fin=False), frame(0x0, b"\xac\xff")], 65536,
     "text frame is not valid UTF-8", CLOSE_INVALID_DATA),
    ("surrogate", [frame(0x1, '"\ud800"'.encode("utf-8", "surrogatepass"))], 65536,
     "text frame is not valid UTF-8", CLOSE_INVALID_DATA),
    ("leftover", [b"\x81"], -14, "frame header announces too much data", CLOSE_TOO_BIG),
]
# fmt: on


@pytest.mark.parametrize(
    ("chunks", "max_message", "message", "code"),
    [pytest.param(*case[1:], id=case[0]) for case in ERRORS],
)
def test_error_paths(chunks: list[bytes], max_message: int, message: str, code: int) -> None:
    results = run_all(chunks, max_message)
    assert results[-1] == ("violation", message, code)
    # the same, split byte by byte: the error comes with the byte that completes its cause
    data = b"".join(chunks)
    single = run_all([data[i : i + 1] for i in range(len(data))], max_message)
    assert ("violation", message, code) in single


def test_state_after_a_violation_matches_frameparser() -> None:
    """Callers close at the first violation, but the state left behind is FrameParser's
    too: the bytes of the failing call are dropped, fragments already taken stay."""
    chunks = [
        frame(0x1, b"ab", fin=False),
        frame(0x0, b"cd", fin=False) + frame(0x3, b""),
        frame(0x0, MARK.encode()[4:], fin=True),
        frame(0x1, b"{}", fin=False)[:3],
        b"\x00" * 8,
        frame(0x9, b"") + frame(0x1, MARK.encode()),
    ]
    run_all(chunks)
