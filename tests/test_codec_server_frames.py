"""ServerFrameParser: RFC 6455 frames from a server (relay's agent connections) plus the
OpenAI Realtime audio-delta fast path.

Three readers must agree call by call (results, or the same exception at the same call):
the compiled relay.media._codec.ServerFrameParser, its reference in relay.media.codec_ref,
and relay.media.websocket.FrameParser(expect_masked=False) itself with the reference
scanner applied to its str messages.  Every tuple the scanner returns must be exactly what
OpenAIRealtimeProtocol makes of the message (AgentAudio(audio, item_id)); messages outside
the scanner's subset must stay str.
"""

from __future__ import annotations

import base64
import json
import random
from types import ModuleType
from typing import Any

import pytest
from frame_cases import (
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

from relay.agents.base import AgentAudio
from relay.agents.openai_protocol import OpenAIOptions, OpenAIRealtimeProtocol
from relay.errors import RemoteProtocolError
from relay.media import _codec, codec, codec_ref
from relay.media.websocket import (
    CLOSE_INVALID_DATA,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    Control,
    FrameParser,
    ProtocolViolation,
    WebSocket,
)

IMPLS = [pytest.param(_codec, id="compiled"), pytest.param(codec_ref, id="ref")]
AUDIO = bytes(range(160))
DELTA = base64.b64encode(AUDIO).decode()
GA = (
    '{"type":"response.output_audio.delta","event_id":"event_1","response_id":"resp_1",'
    f'"item_id":"item_1","output_index":0,"content_index":0,"delta":"{DELTA}"}}'
)


def make(impl: ModuleType, max_message: int = 65536, openai_audio: bool = True) -> Any:
    return impl.ServerFrameParser(
        max_message=max_message,
        control=Control,
        violation=ProtocolViolation,
        openai_audio=openai_audio,
    )


def sframe(opcode: int, payload: bytes, **kw: Any) -> bytes:
    """A server frame: unmasked unless ``mask=True`` is asked for (a violation here)."""
    kw.setdefault("mask", False)
    return frame(opcode, payload, **kw)


def slow_path(text: str) -> list[Any] | str:
    """What OpenAIRealtimeProtocol makes of the message, or "error"."""
    try:
        return OpenAIRealtimeProtocol(OpenAIOptions()).parse_message(text)
    except RemoteProtocolError:
        return "error"


def check_slow_path(text: str, got: object) -> None:
    """A tuple must be exactly the AgentAudio the slow path makes of the message, and the
    protocol core must turn the tuple into that same event."""
    if isinstance(got, tuple):
        item_id, audio = got
        want = [AgentAudio(audio, item_id)] if audio else []
        assert slow_path(text) == want
        assert OpenAIRealtimeProtocol(OpenAIOptions()).parse_message(got) == want
    else:
        assert got == text


class Oracle:
    """The real FrameParser, its str messages passed through the reference scanner."""

    def __init__(self, max_message: int = 65536, openai_audio: bool = True) -> None:
        self.frames = FrameParser(expect_masked=False, max_message=max_message)
        self.openai_audio = openai_audio

    def feed(self, data: bytes) -> list[object]:
        out: list[object] = []
        for item in self.frames.feed(data):
            if isinstance(item, str) and self.openai_audio:
                scanned = codec_ref.scan_openai_audio(item.encode("utf-8"))
                if scanned is not None:
                    check_slow_path(item, scanned)
                out.append(item if scanned is None else scanned)
            else:
                out.append(item)
        return out


def run_all(chunks: list[bytes], max_message: int = 65536, openai_audio: bool = True) -> list[Any]:
    """Feed the same chunks to all three readers; assert they agree; return the outcomes."""
    readers = [make(_codec, max_message, openai_audio), make(codec_ref, max_message, openai_audio)]
    oracle = Oracle(max_message, openai_audio)
    return side_by_side([r.feed for r in readers], oracle.feed, chunks)


# -- message generator ----------------------------------------------------------------------

B64 = st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode())
BAD_B64 = st.sampled_from(
    ["QQ", "QQ=", "Q===", "QQ==QQ==", "QQ=A", "Q Q=", "QQ\n==", "AAA-", "AA_A", "é", "QUJD\\/"]
)
INTS = st.sampled_from(["0", "1", "-1", "42", "-0", "123456789012345678"])
BAD_NUMBERS = st.sampled_from(["1.0", "1e3", "2E-1", "01", "-", "1234567890123456789", "+1"])


@st.composite
def openai_message(draw: st.DrawFn) -> tuple[bytes, bool | None]:
    """A text message and whether the scanner must recognise it (True), must not (False),
    or may do either (None: byte-level mutations)."""
    rnd = random.Random(draw(SEEDS))
    kind = draw(
        st.sampled_from(
            [
                "response.output_audio.delta",
                "response.output_audio.delta",
                "response.audio.delta",
                "response.output_audio.done",
                "response.output_audio_transcript.delta",
                "input_audio_buffer.speech_started",
            ]
        )
    )
    ok = kind in ("response.output_audio.delta", "response.audio.delta")
    subset = True
    pairs: list[tuple[str, object]] = [("type", kind)]
    if rnd.random() < 0.05:
        pairs = [("type", draw(st.sampled_from([Raw("1"), Raw("null")])))]
        ok = False
    if draw(st.booleans()):
        pairs.append(("event_id", "event_" + str(rnd.randrange(10**6))))
    if draw(st.booleans()):
        pairs.append(("response_id", "resp_" + str(rnd.randrange(10**6))))
    if rnd.random() < 0.9:
        printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
        item: object = draw(st.text(printable, max_size=24))
        if rnd.random() < 0.05:
            item = draw(st.sampled_from([Raw("7"), Raw("null"), "é"]))
            ok = False
        pairs.append(("item_id", item))
    else:
        ok = False
    for key in ("output_index", "content_index"):
        if draw(st.booleans()):
            if rnd.random() < 0.1:
                pairs.append((key, Raw(draw(BAD_NUMBERS))))
                subset = False
            else:
                pairs.append((key, Raw(draw(INTS))))
    if rnd.random() < 0.92:
        delta: object = draw(B64)
        if rnd.random() < 0.1:
            delta = draw(BAD_B64)
            ok = False
        elif rnd.random() < 0.03:
            delta = Raw(draw(st.sampled_from(["null", "5", '["QQ=="]'])))
            ok = False
        pairs.append(("delta", delta))
    else:
        ok = False
    if rnd.random() < 0.12:
        pairs.append(("extra", draw(st.sampled_from([Raw("true"), Raw("[]"), Obj([("k", "v")])]))))
        subset = False
    if rnd.random() < 0.06:
        pairs.append((rnd.choice(pairs)[0], "dup"))  # a repeated key
        subset = False
    rnd.shuffle(pairs)
    text = rnd.choice(WS) + render(Obj(pairs), rnd, rnd.random() < 0.06) + rnd.choice(WS)
    data = text.encode("utf-8")
    raw_ok = all(
        not isinstance(v, Raw) or v.text.lstrip("-").isdigit() for _, v in pairs
    ) and not has_raw([v for _, v in pairs if isinstance(v, Obj)])
    subset = subset and raw_ok and "\\" not in text and data.isascii()
    return mutate(draw, rnd, data, ok and subset)


@settings(max_examples=500, deadline=None)
@given(openai_message())
def test_scanner_against_slow_path(msg: tuple[bytes, bool | None]) -> None:
    data, verdict = msg
    feeds = [make(impl).feed for impl in (_codec, codec_ref)]
    check_scanned(feeds, sframe(0x1, data), data, verdict, check_slow_path)


@pytest.mark.parametrize("impl", IMPLS)
def test_off_by_default(impl: ModuleType) -> None:
    (got,) = make(impl, openai_audio=False).feed(sframe(0x1, GA.encode()))
    assert got == GA
    reader = make(impl, openai_audio=False)
    reader.openai_audio = True  # switched on for an open connection (after the handshake)
    assert reader.feed(sframe(0x1, GA.encode())) == [("item_1", AUDIO)]


# -- canonical shapes and fallbacks ---------------------------------------------------------

BETA = GA.replace("response.output_audio.delta", "response.audio.delta")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("text", "want"),
    [
        (GA, ("item_1", AUDIO)),
        (BETA, ("item_1", AUDIO)),
        (' {\n"delta" : "QQ==" ,\t"item_id":"i","type":"response.audio.delta"}\r\n', ("i", b"A")),
        ('{"type":"response.audio.delta","item_id":"","delta":""}', ("", b"")),
        ('{"type":"response.audio.delta","item_id":"x","delta":"QUI=","n":-0}', ("x", b"AB")),
    ],
)
def test_recognised_shapes(impl: ModuleType, text: str, want: tuple[str, bytes]) -> None:
    (got,) = make(impl).feed(sframe(0x1, text.encode()))
    assert got == want
    check_slow_path(text, got)


FALLBACKS = [
    GA.replace('"output_index":0', '"output_index":0.0'),
    GA.replace('"output_index":0', '"output_index":1e2'),
    GA.replace('"output_index":0', '"output_index":00'),
    GA.replace('"output_index":0', '"output_index":null'),
    GA.replace('"event_id":"event_1"', '"event_id":"ev\\u0041"'),
    GA.replace('"item_id":"item_1"', '"item_id":"item_1","item_id":"item_2"'),
    GA.replace(DELTA, DELTA[:-1]),
    GA.replace(DELTA, DELTA[:8] + "=" + DELTA[9:]),
    GA.replace(DELTA, DELTA[:8] + "\\n" + DELTA[8:]),
    GA.replace("response.output_audio.delta", "response.output_audio.done"),
    GA.replace('"content_index":0', '"content_index":{"a":1}'),
    GA.replace('"content_index":0', '"content_index":[0]'),
    GA + " x",
    '{"type":"response.audio.delta","delta":"QQ=="}',
    '{"type":"response.audio.delta","item_id":"x"}',
    '{"type":"response.audio.delta","item_id":5,"delta":"QQ=="}',
    '{"type":"response.audio.delta","item_id":"x","delta":"QQ==","é":"1"}',
    "[]",
    "",
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("text", FALLBACKS)
def test_fallbacks_stay_str(impl: ModuleType, text: str) -> None:
    (got,) = make(impl).feed(sframe(0x1, text.encode()))
    assert got == text


def test_seventeen_members_fall_back() -> None:
    extra = ",".join(f'"k{i}":{i}' for i in range(14))
    text = f'{{"type":"response.audio.delta","item_id":"x","delta":"QQ==",{extra}}}'
    assert len(json.loads(text)) == 17
    for impl in (_codec, codec_ref):
        assert make(impl).feed(sframe(0x1, text.encode())) == [text]
    fits = text.replace(',"k13":13', "")
    for impl in (_codec, codec_ref):
        assert make(impl).feed(sframe(0x1, fits.encode())) == [("x", b"A")]


# -- frame streams --------------------------------------------------------------------------


@settings(max_examples=250, deadline=None)
@given(chunked_stream(openai_message(), masked=False), st.booleans())
def test_compiled_ref_and_frameparser_agree(
    stream: tuple[list[bytes], int], openai_audio: bool
) -> None:
    chunks, max_message = stream
    run_all(chunks, max_message, openai_audio)


@settings(max_examples=60, deadline=None)
@given(st.lists(openai_message(), min_size=1, max_size=4))
def test_byte_by_byte(msgs: list[tuple[bytes, bool | None]]) -> None:
    data = b"".join(sframe(0x1, m) + sframe(0xA, b"") for m, _ in msgs)
    whole = run_all([data])
    single = run_all([data[i : i + 1] for i in range(len(data))])
    if whole[0][0] == "ok":
        assert [item for r in single for item in r[1]] == whole[0][1]


# fmt: off
ERRORS: list[tuple[str, list[bytes], int, str, int]] = [
    ("rsv", [sframe(0x1, b"{}", rsv=4)], 65536,
     "RSV bits set without a negotiated extension", CLOSE_PROTOCOL_ERROR),
    ("masked", [sframe(0x2, b"ab", mask=True)], 65536, "masked server frame",
     CLOSE_PROTOCOL_ERROR),
    ("too big 7", [sframe(0x2, b"x" * 101)], 100, "frame of 101 bytes exceeds 100",
     CLOSE_TOO_BIG),
    ("too big 64", [sframe(0x2, b"", length=2**64 - 1)[:10]], 65536,
     f"frame of {2**64 - 1} bytes exceeds 65536", CLOSE_TOO_BIG),
    ("control opcode", [sframe(0xB, b"x")], 65536, "unknown control opcode 0xb",
     CLOSE_PROTOCOL_ERROR),
    ("oversized pong", [sframe(0xA, b"x" * 126)], 65536,
     "fragmented or oversized control frame", CLOSE_PROTOCOL_ERROR),
    ("lone continuation", [sframe(0x0, b"x")], 65536,
     "continuation frame without a message to continue", CLOSE_PROTOCOL_ERROR),
    ("fragments too big", [sframe(0x1, b"a" * 60, fin=False) + sframe(0x0, b"b" * 60)], 100,
     "fragmented message too big", CLOSE_TOO_BIG),
    ("data inside fragments", [sframe(0x2, b"a", fin=False) + sframe(0x1, b"b")], 65536,
     "new data frame inside a fragmented message", CLOSE_PROTOCOL_ERROR),
    ("utf-8 fragmented", [sframe(0x1, b"\xe2\x82", fin=False), sframe(0x0, b"\xac\xff")],
     65536, "text frame is not valid UTF-8", CLOSE_INVALID_DATA),
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
    data = b"".join(chunks)
    single = run_all([data[i : i + 1] for i in range(len(data))], max_message)
    assert ("violation", message, code) in single


@pytest.mark.parametrize("impl", IMPLS)
def test_control_frames_and_binary(impl: ModuleType) -> None:
    seen: list[tuple[int, bytes]] = []

    def control(op: int, payload: bytes) -> tuple[str, int, bytes]:
        seen.append((op, payload))
        return ("ctl", op, payload)

    reader = impl.ServerFrameParser(control=control, violation=ProtocolViolation)
    data = sframe(0x9, b"hi") + sframe(0x2, b"\x00\x01") + sframe(0x8, b"\x03\xe8")
    assert reader.feed(data) == [("ctl", 0x9, b"hi"), b"\x00\x01", ("ctl", 0x8, b"\x03\xe8")]
    assert seen == [(0x9, b"hi"), (0x8, b"\x03\xe8")]


def test_exported_and_used_by_client_websockets() -> None:
    assert codec.ServerFrameParser is _codec.ServerFrameParser
    assert "ServerFrameParser" in codec.__all__ and "ServerFrameParser" in codec_ref.__all__
    assert _codec.ServerFrameParser[Control] is not None  # generic in the stub

    class _Stream:  # a WebSocket only needs a stream object to be built
        pass

    def build(client_side: bool) -> WebSocket:
        return WebSocket(_Stream(), client_side=client_side)  # type: ignore[arg-type]

    import trio

    async def main() -> tuple[object, object]:
        return build(True).parser, build(False).parser

    client, server = trio.run(main)
    assert isinstance(client, _codec.ServerFrameParser) and not client.openai_audio
    assert type(server) is FrameParser
