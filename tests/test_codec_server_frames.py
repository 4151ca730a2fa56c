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
from hypothesis import given, settings
from hypothesis import strategies as st
from test_codec_twilio_frames import SEEDS, WS, Obj, Raw, frame, has_raw, outcome, render

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
    results = []
    for chunk in chunks:
        want = outcome(oracle.feed, chunk)
        for r in readers:
            assert outcome(r.feed, chunk) == want, chunk
        results.append(want)
    return results


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
    verdict: bool | None = ok and subset
    mutation = rnd.randrange(20)
    if mutation == 1:
        data += draw(st.sampled_from([b"x", b"}", b",", b"{}", b"\x00"]))
        verdict = False
    elif mutation == 2:
        data = data.rstrip()
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
        verdict = False
    elif mutation == 3:
        i = draw(st.integers(0, len(data)))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i:]
        verdict = None
    elif mutation == 4:
        data = draw(st.binary(max_size=40) | st.text(max_size=40).map(str.encode))
        verdict = None
    return data, verdict


@settings(max_examples=500, deadline=None)
@given(openai_message())
def test_scanner_against_slow_path(msg: tuple[bytes, bool | None]) -> None:
    data, verdict = msg
    got = [outcome(make(impl).feed, sframe(0x1, data)) for impl in (_codec, codec_ref)]
    assert got[0] == got[1]
    if got[0][0] == "violation":
        assert got[0][1:] == ("text frame is not valid UTF-8", CLOSE_INVALID_DATA)
        with pytest.raises(UnicodeDecodeError):
            data.decode("utf-8")
        return
    ((_, value),) = got[0][1]
    check_slow_path(data.decode("utf-8"), value)
    if verdict is True:
        assert isinstance(value, tuple), data
    elif verdict is False:
        assert isinstance(value, str), data


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


@st.composite
def frame_spec(draw: st.DrawFn, max_message: int) -> bytes:
    rnd = random.Random(draw(SEEDS))
    what = rnd.randrange(100)
    if what < 45:
        data, _ = draw(openai_message())
        form = draw(st.sampled_from([None, None, None, 16, 64]))
        if form == 16 and len(data) >= 65536:
            form = None
        return sframe(0x1, data, form=form)
    if what < 55:
        return sframe(0x2, draw(st.binary(max_size=300)))
    if what < 68:
        op = draw(st.sampled_from([0x8, 0x9, 0xA]))
        size = draw(st.sampled_from([0, 2, 10, 125, 126]))
        return sframe(op, draw(st.binary(min_size=size, max_size=size)))
    if what < 82:  # a fragmented message with control frames in between
        op = draw(st.sampled_from([0x1, 0x2]))
        data = draw(openai_message())[0] if op == 0x1 else draw(st.binary(max_size=300))
        cuts = sorted(draw(st.lists(st.integers(0, len(data)), min_size=1, max_size=4)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        out = b""
        for i, piece in enumerate(pieces):
            out += sframe(op if i == 0 else 0x0, piece, fin=i == len(pieces) - 1)
            if rnd.random() < 0.25:
                out += sframe(0x9, b"ping")
        return out
    if what < 86:
        n = max(0, max_message + draw(st.integers(-2, 2)))
        return sframe(draw(st.sampled_from([0x1, 0x2])), b"a" * n)
    if what < 88:
        n = draw(st.sampled_from([2**16 + 1, 2**31, 2**63, 2**64 - 1]))
        return sframe(0x2, b"", length=n, form=64)
    bad = rnd.randrange(7)
    if bad == 0:
        return sframe(0x1, b"{}", rsv=draw(st.integers(1, 7)))
    if bad == 1:
        return sframe(0x1, b"{}", mask=True)  # a server never masks
    if bad == 2:
        return sframe(draw(st.sampled_from([3, 4, 5, 6, 7, 11, 12, 13, 14, 15])), b"x")
    if bad == 3:
        return sframe(0x9, b"x", fin=False)
    if bad == 4:
        return sframe(0x0, b"x", fin=draw(st.booleans()))
    if bad == 5:
        return sframe(0x1, b"\xff\xfe")
    return sframe(0x1, b"part", fin=False)


@st.composite
def chunked_stream(draw: st.DrawFn) -> tuple[list[bytes], int, bool]:
    max_message = draw(st.sampled_from([65536, 65536, 1000, 300, 0]))
    frames = draw(st.lists(frame_spec(max_message), min_size=1, max_size=8))
    data = b"".join(frames)
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=6))))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return chunks, max_message, draw(st.booleans())


@settings(max_examples=250, deadline=None)
@given(chunked_stream())
def test_compiled_ref_and_frameparser_agree(stream: tuple[list[bytes], int, bool]) -> None:
    run_all(*stream)


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
