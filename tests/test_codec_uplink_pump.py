"""UplinkPump: one read from Twilio's socket to the agent's socket in one call.

The compiled relay.media._codec.UplinkPump must do what its reference in
relay.media.codec_ref does, read by read, on real sockets: the same result code and
results, the same append messages on the agent's socket (compared unmasked: every frame
has a fresh random key), the same parser and jitter-buffer state. What it sends must be
twilio_uplink's payloads as client_b64_frames builds them (tests/test_codec_twilio_uplink.py
ties twilio_uplink to the call's general path).
"""

from __future__ import annotations

import base64
import errno
import itertools
import socket
import struct
from types import ModuleType
from typing import Any

import pytest
from frame_cases import frame
from hypothesis import given, settings
from hypothesis import strategies as st
from test_codec_twilio_uplink import b64, counters, dtmf, mark, media, pair

from relay.media import _codec, codec_ref
from relay.media.websocket import OP_PING, OP_TEXT, FrameParser, ProtocolViolation

IMPLS = [pytest.param(_codec, id="compiled"), pytest.param(codec_ref, id="ref")]
HEAD = b'{"type":"input_audio_buffer.append","audio":"'
TAIL = b'"}'
SILENCE_FRAME = bytes([0xFF]) * 8  # per ms: μ-law silence


def silence(duration_ms: int) -> str:
    return b64(SILENCE_FRAME * duration_ms)


def append(payload: str) -> str:
    return (HEAD + payload.encode() + TAIL).decode()


def readable_bytes(sock: socket.socket) -> bytes:
    """Everything a non-blocking socket can read now (up to its peer's end)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data


class Rig:
    """A pump between two socket pairs: ``twilio`` (Twilio writes to its peer end) and
    ``agent`` (the agent reads its peer end)."""

    def __init__(
        self,
        impl: ModuleType,
        reorder_ms: int = 0,
        silence_fn: Any = silence,
        pairs: tuple[tuple[socket.socket, socket.socket], ...] | None = None,
        pcm: bool = False,
    ) -> None:
        self.twilio, self.twilio_peer = pairs[0] if pairs else socket.socketpair()
        self.agent, self.agent_peer = pairs[1] if pairs else socket.socketpair()
        for s in (self.twilio, self.agent, self.agent_peer):
            s.setblocking(False)
        self.parser, self.jitter = pair(impl, reorder_ms)
        self.pump = impl.UplinkPump(
            self.parser,
            self.jitter,
            silence_fn,
            self.twilio.fileno(),
            self.agent.fileno(),
            HEAD,
            TAIL,
            to_pcm=impl.UlawToPcm(24000) if pcm else None,
        )
        self._frames = FrameParser(expect_masked=True, max_message=1 << 20)

    def close(self) -> None:
        for s in (self.twilio, self.twilio_peer, self.agent, self.agent_peer):
            s.close()

    def agent_bytes(self) -> bytes:
        """Everything the agent's end can read now."""
        return readable_bytes(self.agent_peer)

    def agent_messages(self) -> list[Any]:
        """The messages the agent received since the last look."""
        return self._frames.feed(self.agent_bytes())

    def result(self, code: int) -> tuple[Any, ...]:
        p = self.pump
        unsent = None if p.unsent is None else len(p.unsent)
        return code, p.media, p.sent, p.payloads, p.marks, p.rest, p.error, unsent


@pytest.fixture(params=IMPLS)
def rig(request: pytest.FixtureRequest) -> Any:
    r = Rig(request.param)
    yield r
    r.close()


def test_a_read_of_media_is_sent_whole(rig: Rig) -> None:
    one, two = b"\x01" * 160, b"\x02" * 160
    rig.twilio_peer.sendall(media(0, one) + media(20, two))
    assert rig.pump.pump() == _codec.PUMP_SENT
    assert (rig.pump.media, rig.pump.sent, rig.pump.unsent) == (2, 2, None)
    assert rig.agent_messages() == [append(b64(one)), append(b64(two))]
    assert rig.jitter.frames_out == 2


@pytest.mark.parametrize("impl", IMPLS)
def test_transcoded_a_read_is_one_message_of_resampled_audio(impl: ModuleType) -> None:
    rig = Rig(impl, pcm=True)
    want = impl.UlawToPcm(24000)
    try:
        for k in range(3):
            frames = [bytes([16 * k + j]) * 160 for j in range(k + 1)]
            ts = 20 * (k * (k + 1) // 2)
            rig.twilio_peer.sendall(b"".join(media(ts + 20 * j, f) for j, f in enumerate(frames)))
            assert rig.pump.pump() == _codec.PUMP_SENT
            assert (rig.pump.media, rig.pump.sent) == (k + 1, 1)
            audio = want.feed_b64_many([b64(f) for f in frames])
            assert rig.agent_messages() == [append(base64.b64encode(audio).decode())]
    finally:
        rig.close()


def test_nothing_to_read_is_idle_and_clears_the_last_results(rig: Rig) -> None:
    rig.twilio_peer.sendall(media(0, b"\x01" * 160))
    assert rig.pump.pump() == _codec.PUMP_SENT
    assert rig.pump.pump() == _codec.PUMP_IDLE
    assert rig.result(_codec.PUMP_IDLE) == (0, 0, 0, None, None, None, 0, None)


def test_mark_echoes_go_back_to_the_caller_with_the_media_sent(rig: Rig) -> None:
    one, two = b"\x06" * 160, b"\x07" * 160
    rig.twilio_peer.sendall(media(0, one) + mark("m1") + media(20, two) + mark("m2"))
    assert rig.pump.pump() == _codec.PUMP_SENT
    assert (rig.pump.media, rig.pump.sent, rig.pump.marks) == (2, 2, ["m1", "m2"])
    assert rig.agent_messages() == [append(b64(one)), append(b64(two))]
    rig.twilio_peer.sendall(mark("m3"))  # marks alone: nothing to send
    assert rig.pump.pump() == _codec.PUMP_PARSED
    assert (rig.pump.marks, rig.pump.payloads, rig.pump.rest) == (["m3"], [], None)


def test_marks_and_other_messages_are_left_to_the_caller(rig: Rig) -> None:
    audio = b"\x03" * 160
    rig.twilio_peer.sendall(media(0, audio) + mark("m1") + dtmf("5") + media(20, audio))
    assert rig.pump.pump() == _codec.PUMP_PARSED
    p = rig.pump
    assert (p.payloads, p.marks, p.media, p.sent) == ([b64(audio)], ["m1"], 1, 0)
    assert p.rest is not None and len(p.rest) == 2 and '"dtmf"' in p.rest[0]
    assert rig.agent_messages() == []  # the caller forwards, in order with the DTMF


def test_a_gap_goes_out_as_silence(rig: Rig) -> None:
    audio = b"\x04" * 160
    rig.twilio_peer.sendall(media(1000, audio))
    assert rig.pump.pump() == _codec.PUMP_SENT
    rig.twilio_peer.sendall(media(1060, audio))
    assert rig.pump.pump() == _codec.PUMP_SENT
    assert rig.pump.sent == 2 and rig.pump.media == 1
    assert rig.agent_messages() == [append(b64(audio)), append(silence(40)), append(b64(audio))]


def test_a_part_of_a_frame_sends_nothing_yet(rig: Rig) -> None:
    data = media(0, b"\x05" * 160)
    rig.twilio_peer.sendall(data[:50])
    assert rig.pump.pump() == _codec.PUMP_PARSED
    assert (rig.pump.payloads, rig.pump.media) == ([], 0)
    rig.twilio_peer.sendall(data[50:])
    assert rig.pump.pump() == _codec.PUMP_SENT
    assert rig.agent_messages() == [append(b64(b"\x05" * 160))]


@pytest.mark.parametrize("impl", IMPLS)
def test_a_payload_that_is_not_plain_base64_is_left_to_the_adapter(impl: ModuleType) -> None:
    rig = Rig(impl, silence_fn=lambda ms: f"<silence {ms} ms>")
    try:
        rig.twilio_peer.sendall(media(0, b"\x01" * 160))
        assert rig.pump.pump() == _codec.PUMP_SENT
        rig.twilio_peer.sendall(media(40, b"\x01" * 160))
        assert rig.pump.pump() == _codec.PUMP_PARSED
        assert rig.pump.payloads == ["<silence 20 ms>", b64(b"\x01" * 160)]
        assert rig.agent_messages() == [append(b64(b"\x01" * 160))]
    finally:
        rig.close()


def test_the_peer_closing_is_reported(rig: Rig) -> None:
    rig.twilio_peer.shutdown(socket.SHUT_WR)
    assert rig.pump.pump() == _codec.PUMP_CLOSED
    assert rig.pump.error == 0


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    return accepted, client


@pytest.mark.parametrize("impl", IMPLS)
def test_a_failed_read_reports_its_errno(impl: ModuleType) -> None:
    rig = Rig(impl, pairs=(tcp_pair(), socket.socketpair()))
    try:
        # SO_LINGER 0: close sends RST, and the next read fails with ECONNRESET
        rig.twilio_peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        rig.twilio_peer.close()
        for _ in range(100):
            code = rig.pump.pump()
            if code != _codec.PUMP_IDLE:
                break
            socket.socketpair()[0].close()  # let the RST land
        assert code == _codec.PUMP_CLOSED
        assert rig.pump.error == errno.ECONNRESET
    finally:
        rig.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_what_the_kernel_does_not_take_is_returned_unsent(impl: ModuleType) -> None:
    rig = Rig(impl)
    try:
        rig.agent.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        filled = 0
        while True:  # fill the agent's socket (nothing reads its peer end yet)
            try:
                filled += rig.agent.send(b"\0" * 1024)
            except BlockingIOError:
                break
        payloads = [bytes([k]) * 160 for k in range(40)]
        rig.twilio_peer.sendall(b"".join(media(20 * k, p) for k, p in enumerate(payloads)))
        assert rig.pump.pump() == _codec.PUMP_UNSENT
        assert rig.pump.sent == 40 and rig.pump.unsent
        # the agent reads the filler, what the kernel took of the pump's write and then
        # the rest (what WebSocket.write_nowait queues): exactly the 40 messages, in order
        taken = rig.agent_bytes()
        assert taken[:filled] == b"\0" * filled
        assert FrameParser(expect_masked=True).feed(taken[filled:] + rig.pump.unsent) == [
            append(b64(p)) for p in payloads
        ]
    finally:
        rig.close()


def test_a_protocol_violation_raises(rig: Rig) -> None:
    rig.twilio_peer.sendall(frame(OP_TEXT, b"{}", mask=False))  # a client must mask
    with pytest.raises(ProtocolViolation):
        rig.pump.pump()


@pytest.mark.parametrize("impl", IMPLS)
def test_descriptors_must_be_open(impl: ModuleType) -> None:
    parser, jitter = pair(impl)
    with pytest.raises(ValueError):
        impl.UplinkPump(parser, jitter, silence, -1, 5, HEAD, TAIL)


# -- compiled against reference ------------------------------------------------------------
def traffic() -> st.SearchStrategy[list[bytes]]:
    """Twilio's messages in one stream: media (in order, late, repeated, after a gap), mark
    echoes, DTMF, pings and another stream's media."""
    ts = st.integers(0, 400).map(lambda k: 20 * k)
    payload = st.binary(min_size=1, max_size=200)
    message = st.one_of(
        st.tuples(ts, payload).map(lambda t: media(*t)),
        st.text("abc", min_size=1, max_size=5).map(mark),
        st.sampled_from("0123456789*#").map(dtmf),
        st.binary(max_size=10).map(lambda b: frame(OP_PING, b)),
        st.tuples(ts, payload).map(lambda t: media(*t, sid="MZother")),
    )
    return st.lists(message, min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(
    messages=traffic(),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
    reorder_ms=st.sampled_from([0, 40]),
    pcm=st.booleans(),
)
def test_compiled_and_reference_pump_the_same(
    messages: list[bytes], cuts: list[int], reorder_ms: int, pcm: bool
) -> None:
    data = b"".join(messages)
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    rigs = [Rig(_codec, reorder_ms, pcm=pcm), Rig(codec_ref, reorder_ms, pcm=pcm)]
    try:
        for start, end in itertools.pairwise(bounds):
            results = []
            for r in rigs:
                r.twilio_peer.sendall(data[start:end])
                try:
                    code = r.pump.pump()
                except ProtocolViolation as exc:
                    results.append(("violation", exc.code))
                    continue
                results.append((r.result(code), r.agent_messages(), counters(r.jitter)))
            assert results[0] == results[1]
            if results[0][0] == "violation":
                break
        for r in rigs:  # nothing left unread, no state left behind in either
            assert r.pump.pump() == _codec.PUMP_IDLE
    finally:
        for r in rigs:
            r.close()


def test_reads_through_the_pump_match_twilio_uplink() -> None:
    """What the pump sends is what twilio_uplink releases, framed by client_b64_frames."""
    rig = Rig(_codec)
    parser, jitter = pair(_codec)
    try:
        reads = [
            media(0, b"\x01" * 160),
            media(20, b"\x02" * 160) + media(40, b"\x03" * 160),
            media(100, b"\x04" * 160),
            media(80, b"\x05" * 160),  # late: dropped
        ]
        for data in reads:
            rig.twilio_peer.sendall(data)
            code = rig.pump.pump()
            payloads, marks, n, rest = _codec.twilio_uplink(parser, jitter, data, silence)
            sent = rig.agent_messages()
            assert sent == [append(p) for p in payloads]
            assert code == (_codec.PUMP_SENT if payloads else _codec.PUMP_PARSED)
            assert rig.pump.media == n and marks is None and rest is None
        assert counters(rig.jitter) == counters(jitter)
        assert base64.b64decode(silence(1)) == SILENCE_FRAME
    finally:
        rig.close()
