"""codec.client_b64_frames: caller audio spliced into an agent's JSON message, as masked
client text frames built in one buffer.

Masking keys are random, so the compiled function and its reference are compared through
what a server-side WebSocket reader (which unmasks, RFC 6455 §5.3) parses back; both must
refuse the same payloads (anything but plain base64), and every frame gets its own key.
"""

from __future__ import annotations

import base64
from types import ModuleType

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.agents.openai_protocol import OpenAIOptions, OpenAIRealtimeProtocol
from relay.media import _codec, codec_ref
from relay.media.websocket import FrameParser

PLAIN = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
IMPLS = [pytest.param(_codec, id="compiled"), pytest.param(codec_ref, id="ref")]
HEAD = b'{"type":"input_audio_buffer.append","audio":"'
TAIL = b'"}'


def parsed(wire: bytes) -> list[str | bytes]:
    parser = FrameParser(expect_masked=True, max_message=1 << 20)
    out = parser.feed(wire)
    assert all(isinstance(m, str) for m in out)
    return out  # type: ignore[return-value]


b64_st = st.binary(min_size=0, max_size=300).map(lambda b: base64.b64encode(b).decode())


@given(payloads=st.lists(b64_st, max_size=6))
@settings(max_examples=300, deadline=None)
def test_compiled_and_reference_build_the_same_messages(payloads: list[str]) -> None:
    want = [(HEAD + p.encode() + TAIL).decode() for p in payloads]
    for impl in (_codec, codec_ref):
        wire = impl.client_b64_frames(HEAD, payloads, TAIL)
        assert wire is not None
        assert parsed(wire) == want


@given(
    good=st.lists(b64_st, max_size=3),
    bad=st.text(min_size=1, max_size=40).filter(lambda t: not set(t) <= PLAIN),
)
@settings(max_examples=200, deadline=None)
def test_anything_but_plain_base64_is_refused_by_both(good: list[str], bad: str) -> None:
    payloads = [*good, bad]
    assert _codec.client_b64_frames(HEAD, payloads, TAIL) is None
    assert codec_ref.client_b64_frames(HEAD, payloads, TAIL) is None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_every_length_encoding(impl: ModuleType, n: int) -> None:
    """7-, 16- and 64-bit lengths (RFC 6455 §5.2) around each switch, with the mask bit."""
    payload = "A" * max(0, n - len(HEAD) - len(TAIL))
    wire = impl.client_b64_frames(HEAD, [payload], TAIL)
    assert wire is not None
    assert wire[0] == 0x81 and wire[1] & 0x80  # FIN + text, masked
    assert parsed(wire) == [(HEAD + payload.encode() + TAIL).decode()]


@pytest.mark.parametrize("impl", IMPLS)
def test_each_frame_has_its_own_masking_key(impl: ModuleType) -> None:
    payloads = ["AAAA"] * 200
    wire = impl.client_b64_frames(HEAD, payloads, TAIL)
    assert wire is not None
    size = 2 + 4 + len(HEAD) + 4 + len(TAIL)
    keys = {wire[i * size + 2 : i * size + 6] for i in range(len(payloads))}
    assert len(keys) > 190  # 32-bit random keys: collisions among 200 are rare


@pytest.mark.parametrize("impl", IMPLS)
def test_non_str_payloads_are_refused(impl: ModuleType) -> None:
    assert impl.client_b64_frames(HEAD, [b"AAAA"], TAIL) is None  # type: ignore[list-item]
    assert impl.client_b64_frames(HEAD, [], TAIL) == b""


def test_the_openai_append_parts_splice_to_the_serialised_message() -> None:
    """The hot path's (head, tail) around a payload equal the properly serialised append."""
    head, tail = OpenAIRealtimeProtocol.append_parts
    payload = base64.b64encode(bytes(range(160))).decode()
    (text,) = parsed(_codec.client_b64_frames(head, [payload], tail) or b"")
    assert isinstance(text, str)
    assert orjson.loads(text) == {"type": "input_audio_buffer.append", "audio": payload}


# -- client_audio_frame: transcoded (PCM) caller audio, base64-encoded into the message ----


@given(audio=st.binary(max_size=3000))
@settings(max_examples=300, deadline=None)
def test_audio_frame_compiled_and_reference_build_the_same_message(audio: bytes) -> None:
    want = [(HEAD + base64.b64encode(audio) + TAIL).decode()]
    for impl in (_codec, codec_ref):
        assert parsed(impl.client_audio_frame(HEAD, audio, TAIL)) == want
        assert parsed(impl.client_audio_frame(HEAD, bytearray(audio), TAIL)) == want
        assert parsed(impl.client_audio_frame(HEAD, memoryview(audio), TAIL)) == want


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [0, 1, 2, 3, 58, 59, 60, 61, 49_100, 49_101, 49_200])
def test_audio_frame_length_encodings_and_padding(impl: ModuleType, n: int) -> None:
    """Lengths around the 7/16/64-bit switches (RFC 6455 §5.2) and every base64 padding."""
    audio = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
    wire = impl.client_audio_frame(HEAD, audio, TAIL)
    assert wire[0] == 0x81 and wire[1] & 0x80  # FIN + text, masked
    (message,) = parsed(wire)
    assert base64.b64decode(orjson.loads(message)["audio"], validate=True) == audio


@pytest.mark.parametrize("impl", IMPLS)
def test_audio_frames_get_fresh_masking_keys(impl: ModuleType) -> None:
    keys = {impl.client_audio_frame(HEAD, b"\x01\x02", TAIL)[2:6] for _ in range(200)}
    assert len(keys) > 190


def test_audio_frame_is_the_protocols_own_message() -> None:
    """What the OpenAI adapter sends for PCM audio is what its protocol would serialise."""
    proto = OpenAIRealtimeProtocol(OpenAIOptions(audio="pcm24k"))
    head, tail = proto.append_parts
    audio = bytes(range(256)) * 4
    (message,) = parsed(_codec.client_audio_frame(head, audio, tail))
    assert message == proto.append_audio(audio)
