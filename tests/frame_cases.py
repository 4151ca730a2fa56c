"""Shared by the tests of the compiled WebSocket readers (test_codec_twilio_frames.py,
test_codec_server_frames.py): RFC 6455 frames built byte by byte, JSON rendered with
controlled variations, random frame streams around a message generator, and feeding
several readers the same chunks.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from relay.media import codec_ref
from relay.media.websocket import ProtocolViolation


def frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    key: bytes = b"\x37\xfa\x21\x3d",
    length: int | None = None,
    form: int | None = None,
) -> bytes:
    """One frame; ``length`` overrides the announced length, ``form`` forces the length
    encoding (7, 16 or 64 bits; the RFC wants the shortest, FrameParser accepts any)."""
    n = len(payload) if length is None else length
    if form is None:
        form = 7 if n < 126 else 16 if n < 65536 else 64
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mbit = 0x80 if mask else 0
    if form == 7:
        head += bytes([mbit | n])
    elif form == 16:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    return head + key + codec_ref.ws_mask(payload, key)


Feed = Callable[[bytes], list[Any]]


def outcome(feed: Feed, data: bytes) -> tuple[Any, ...]:
    try:
        items = feed(data)
    except ProtocolViolation as exc:
        return ("violation", str(exc), exc.code)
    return ("ok", [(type(x), x) for x in items])


def side_by_side(feeds: list[Feed], oracle: Feed, chunks: list[bytes]) -> list[Any]:
    """Feed the same chunks to every reader and to the oracle; assert they agree chunk by
    chunk (results, or the same violation); return the oracle's outcomes."""
    results = []
    for chunk in chunks:
        want = outcome(oracle, chunk)
        for feed in feeds:
            assert outcome(feed, chunk) == want, chunk
        results.append(want)
    return results


def mutate(
    draw: st.DrawFn, rnd: random.Random, data: bytes, verdict: bool
) -> tuple[bytes, bool | None]:
    """Sometimes break a generated message at the byte level: trailing junk or a cut (then
    no scanner may recognise it), an inserted byte or random bytes (either way: None)."""
    mutation = rnd.randrange(20)
    if mutation == 1:
        return data + draw(st.sampled_from([b"x", b"}", b",", b"{}", b"\x00"])), False
    if mutation == 2:
        data = data.rstrip()  # trailing whitespace is no part of the object
        return data[: draw(st.integers(0, max(0, len(data) - 1)))], False
    if mutation == 3:
        i = draw(st.integers(0, len(data)))
        return data[:i] + bytes([draw(st.integers(0, 255))]) + data[i:], None
    if mutation == 4:
        return draw(st.binary(max_size=40) | st.text(max_size=40).map(str.encode)), None
    return data, verdict


def check_scanned(
    feeds: list[Feed],
    wire: bytes,
    data: bytes,
    verdict: bool | None,
    slow_path: Callable[[str, object], None],
) -> None:
    """One text message ``data`` (framed: ``wire``) through each reader: they agree; the
    result is what ``slow_path`` accepts for the text; a tuple where ``verdict`` is True,
    the str where it is False."""
    got = [outcome(feed, wire) for feed in feeds]
    assert all(g == got[0] for g in got)
    if got[0][0] == "violation":
        assert got[0][1:] == ("text frame is not valid UTF-8", 1007)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return
        raise AssertionError("a violation for valid UTF-8")
    ((_, value),) = got[0][1]
    slow_path(data.decode("utf-8"), value)
    if verdict is True:
        assert isinstance(value, tuple), data
    elif verdict is False:
        assert isinstance(value, str), data


# -- JSON with controlled variations ------------------------------------------------------

SEEDS = st.integers(0, 2**32 - 1)  # shapes are chosen by a seeded random.Random: hypothesis's
# own integers and floats lean to their bounds, which would make the rare cases common
WS = ["", "", "", " ", "\t", "\n", "\r\n", "  "]


class Raw:
    """A JSON value rendered verbatim (numbers, literals, arrays, broken bits)."""

    def __init__(self, text: str) -> None:
        self.text = text


class Obj:
    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        self.pairs = pairs


def render(value: object, rnd: random.Random, escape: bool) -> str:
    def ws() -> str:
        return rnd.choice(WS)

    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Obj):
        members = [
            f"{ws()}{render(k, rnd, escape)}{ws()}:{ws()}{render(v, rnd, escape)}{ws()}"
            for k, v in value.pairs
        ]
        return "{" + ",".join(members) + ws() + "}"
    assert isinstance(value, str)
    if escape and value:  # the same string, one character written as \uXXXX
        i = rnd.randrange(len(value))
        return (
            json.dumps(value[:i])[:-1] + f"\\u{ord(value[i]):04x}" + json.dumps(value[i + 1 :])[1:]
        )
    return json.dumps(value, ensure_ascii=rnd.random() < 0.5)


def has_raw(value: object) -> bool:
    """Whether a Raw value (number, literal, array...) is anywhere in ``value``."""
    if isinstance(value, Raw):
        return True
    if isinstance(value, Obj):
        return has_raw(value.pairs)
    if isinstance(value, list | tuple):
        return any(has_raw(v) for v in value)
    return False


# -- frame streams --------------------------------------------------------------------------

KEYS = st.binary(min_size=4, max_size=4)


Message = st.SearchStrategy[tuple[bytes, "bool | None"]]


@st.composite
def frame_spec(draw: st.DrawFn, max_message: int, message: Message, masked: bool) -> bytes:
    """One frame (or a fragmented message) of a stream from a client (``masked``, each
    frame with a random key) or a server: mostly valid, some at the limits, some broken;
    text messages drawn from ``message``."""
    kw: dict[str, Any] = {"key": draw(KEYS)} if masked else {"mask": False}
    rnd = random.Random(draw(SEEDS))
    what = rnd.randrange(100)
    if what < 45:  # a text message, sometimes with a non-minimal length encoding
        data, _ = draw(message)
        form = draw(st.sampled_from([None, None, None, 16, 64]))
        if form == 16 and len(data) >= 65536:
            form = None
        return frame(0x1, data, form=form, **kw)
    if what < 55:
        return frame(0x2, draw(st.binary(max_size=300)), **kw)
    if what < 68:  # ping / pong / close, mostly legal
        op = draw(st.sampled_from([0x8, 0x9, 0xA]))
        size = draw(st.sampled_from([0, 2, 10, 125, 126]))
        return frame(op, draw(st.binary(min_size=size, max_size=size)), **kw)
    if what < 82:  # a fragmented message with control frames in between
        op = draw(st.sampled_from([0x1, 0x2]))
        if op == 0x1:
            data, _ = draw(message)
        else:
            data = draw(st.binary(max_size=300))
        cuts = sorted(draw(st.lists(st.integers(0, len(data)), min_size=1, max_size=4)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        out = b""
        for i, piece in enumerate(pieces):
            out += frame(op if i == 0 else 0x0, piece, fin=i == len(pieces) - 1, **kw)
            if rnd.random() < 0.25:
                out += frame(0x9, b"ping", **kw)
        return out
    if what < 86:  # around the size limit
        n = max(0, max_message + draw(st.integers(-2, 2)))
        return frame(draw(st.sampled_from([0x1, 0x2])), b"a" * n, **kw)
    if what < 88:  # a header announcing a huge frame
        n = draw(st.sampled_from([2**16 + 1, 2**31, 2**63, 2**64 - 1]))
        return frame(0x2, b"", **kw, length=n, form=64)
    bad = rnd.randrange(7)
    if bad == 0:
        return frame(0x1, b"{}", rsv=draw(st.integers(1, 7)), **kw)
    if bad == 1:
        return frame(0x1, b"{}", mask=not masked)  # the wrong masking for this side
    if bad == 2:
        return frame(draw(st.sampled_from([3, 4, 5, 6, 7, 11, 12, 13, 14, 15])), b"x", **kw)
    if bad == 3:
        return frame(0x9, b"x", fin=False, **kw)
    if bad == 4:
        return frame(0x0, b"x", fin=draw(st.booleans()), **kw)
    if bad == 5:
        return frame(0x1, b"\xff\xfe", **kw)
    return frame(0x1, b"part", fin=False, **kw)  # unfinished: the next data frame fails


@st.composite
def chunked_stream(draw: st.DrawFn, message: Message, masked: bool) -> tuple[list[bytes], int]:
    """A stream of frame_spec frames cut into random chunks, and its max_message."""
    max_message = draw(st.sampled_from([65536, 65536, 1000, 300, 0]))
    frames = draw(st.lists(frame_spec(max_message, message, masked), min_size=1, max_size=8))
    data = b"".join(frames)
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=6))))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return chunks, max_message
