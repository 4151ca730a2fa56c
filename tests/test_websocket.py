"""relay.media.websocket: sans-IO framing (RFC 6455) and interop with trio-websocket (wsproto)."""

from __future__ import annotations

import os
import struct

import pytest
import trio
import trio_websocket
from hypothesis import given
from hypothesis import strategies as st

from relay.errors import ConnectionClosed
from relay.media.websocket import (
    CLOSE_INVALID_DATA,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    Control,
    FrameParser,
    ProtocolViolation,
    WebSocket,
    accept_key,
    build_frame,
    connect,
    server_handshake_response,
)


def masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    frame = bytearray(build_frame(opcode, payload, mask=True))
    if not fin:
        frame[0] &= 0x7F
    return bytes(frame)


def test_accept_key_rfc_example() -> None:
    # RFC 6455 §1.3 worked example
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_roundtrip_lengths(size: int) -> None:
    payload = os.urandom(size)
    parser = FrameParser(expect_masked=True, max_message=1 << 20)
    assert parser.feed(masked(OP_BINARY, payload)) == [payload]
    client = FrameParser(expect_masked=False, max_message=1 << 20)
    assert client.feed(build_frame(OP_BINARY, payload)) == [payload]


@given(st.lists(st.text(max_size=300), min_size=1, max_size=8), st.integers(1, 50))
def test_split_anywhere(texts: list[str], step: int) -> None:
    """Frames arriving in arbitrary TCP segments parse to the same messages."""
    wire = b"".join(masked(OP_TEXT, t.encode()) for t in texts)
    parser = FrameParser(expect_masked=True)
    out: list[object] = []
    for i in range(0, len(wire), step):
        out += parser.feed(wire[i : i + step])
    assert out == texts


def test_fragmented_message_with_interleaved_ping() -> None:
    parser = FrameParser(expect_masked=True)
    wire = (
        masked(OP_TEXT, b"hel", fin=False)
        + masked(OP_PING, b"p")
        + masked(OP_CONT, b"lo", fin=False)
        + masked(OP_CONT, b"!")
    )
    assert parser.feed(wire) == [Control(OP_PING, b"p"), "hello!"]


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (build_frame(OP_TEXT, b"x"), CLOSE_PROTOCOL_ERROR),  # unmasked client frame
        (bytes([0xC1, 0x80]) + b"\0\0\0\0", CLOSE_PROTOCOL_ERROR),  # RSV1 set
        (masked(0x3, b"x"), CLOSE_PROTOCOL_ERROR),  # reserved opcode
        (masked(OP_CONT, b"x"), CLOSE_PROTOCOL_ERROR),  # nothing to continue
        (masked(OP_PING, b"x" * 126), CLOSE_PROTOCOL_ERROR),  # control too long
        (masked(OP_TEXT, b"\xff\xfe"), CLOSE_INVALID_DATA),  # not UTF-8
        (masked(OP_TEXT, b"x" * 2000), CLOSE_TOO_BIG),
        (bytes([0x81, 0xFF]) + struct.pack("!Q", 1 << 40), CLOSE_TOO_BIG),  # announced only
    ],
    # stable ids: the frames carry random mask keys, and parallel workers must collect
    # the same test names
    ids=[
        "unmasked",
        "rsv1",
        "reserved-opcode",
        "stray-continuation",
        "long-control",
        "bad-utf8",
        "too-big",
        "announced-too-big",
    ],
)
def test_garbage_is_a_violation_with_the_right_code(wire: bytes, code: int) -> None:
    parser = FrameParser(expect_masked=True, max_message=1024)
    with pytest.raises(ProtocolViolation) as info:
        parser.feed(wire)
    assert info.value.code == code


async def _pair() -> tuple[WebSocket, WebSocket]:
    a, b = trio.testing.memory_stream_pair()
    server = WebSocket(a, client_side=False, max_message=1024, send_timeout=1)
    client = WebSocket(b, client_side=True, send_timeout=1)
    return server, client


async def test_send_receive_batch_and_close() -> None:
    server, client = await _pair()
    with trio.fail_after(5):
        await client.send_texts(["a", "b"])
        await client.send_bytes(b"\x01")
        got: list[object] = []
        while len(got) < 3:
            got += await server.receive()
        assert got == ["a", "b", b"\x01"]
        await server.aclose(1000, "bye")
        with pytest.raises(ConnectionClosed) as info:
            await client.receive()
        assert info.value.code == 1000


async def test_oversized_message_closes_with_1009() -> None:
    server, client = await _pair()
    with trio.fail_after(5):
        await client.send_text("x" * 5000)
        with pytest.raises(ConnectionClosed) as info:
            await server.receive()
        assert info.value.code == CLOSE_TOO_BIG


async def test_send_to_a_peer_that_never_reads_times_out() -> None:
    """Half-dead socket: send_all blocks forever; the bound turns it into ConnectionClosed."""
    a, _b = trio.testing.lockstep_stream_pair()
    ws = WebSocket(a, client_side=False, send_timeout=0.05)
    with trio.fail_after(5), pytest.raises(ConnectionClosed) as info:
        await ws.send_text("hello")
    assert "timed out" in info.value.reason


async def test_interop_client_against_trio_websocket_server() -> None:
    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        assert request.headers  # our handshake headers parsed by wsproto
        while True:
            try:
                msg = await ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            await ws.send_message(msg)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None
        )
        port = listeners.port
        with trio.fail_after(5):
            ws = await connect(f"ws://127.0.0.1:{port}/x", [("X-Test", "1")])
            big = "é" * 40000
            await ws.send_text("hi")
            await ws.send_text(big)
            got: list[object] = []
            while len(got) < 2:
                got += await ws.receive()
            assert got == ["hi", big]
            await ws.aclose()
        nursery.cancel_scope.cancel()


async def test_interop_server_against_trio_websocket_client() -> None:
    async def serve(stream: trio.SocketStream) -> None:
        from relay.media.websocket import parse_head, read_http_head

        head, rest = await read_http_head(stream)
        _, headers = parse_head(head)
        await stream.send_all(server_handshake_response(headers["sec-websocket-key"]))
        ws = WebSocket(stream, client_side=False, leftover=rest)
        try:
            while True:
                for msg in await ws.receive():
                    assert isinstance(msg, str)
                    await ws.send_text(msg.upper())
        except ConnectionClosed:
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, serve, 0)
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(5):
            async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
                await ws.send_message("abc")
                assert await ws.get_message() == "ABC"
                await ws.ping(b"x")  # answered by our control-frame handling
        nursery.cancel_scope.cancel()


def test_close_frame_payload_is_valid() -> None:
    parser = FrameParser(expect_masked=False)
    from relay.media.websocket import close_payload

    (item,) = parser.feed(build_frame(OP_CLOSE, close_payload(1006, "x")))
    assert isinstance(item, Control)
    assert struct.unpack("!H", item.payload[:2])[0] == 1000  # 1006 never goes on the wire


async def test_nowait_writes_on_a_non_socket_stream_are_flushed_in_order() -> None:
    """TLS streams (and test streams) have no raw socket: every non-blocking write waits in
    the buffer for run_flusher, the path a wss:// agent connection takes."""
    server, client = await _pair()
    assert server.raw_socket is None
    texts = [f"message {i}" for i in range(50)]
    got: list[object] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.run_flusher)
            for text in texts:
                server.send_text_nowait(text)
                if len(text) % 3 == 0:
                    await trio.sleep(0)
            while len(got) < len(texts):
                got += await client.receive()
            nursery.cancel_scope.cancel()
    assert got == texts


async def test_on_backlog_is_called_once_bytes_wait() -> None:
    server, client = await _pair()
    calls = 0

    def backlog() -> None:
        nonlocal calls
        calls += 1

    server.on_backlog = backlog
    server.send_text_nowait("a")
    assert calls == 1
    with trio.fail_after(5):
        await server.drain()
        assert await client.receive() == ["a"]


async def test_pumpable_only_while_neither_side_holds_bytes() -> None:
    """The uplink pump may read one socket's descriptor and write another's only while
    no bytes wait in either WebSocket: read ahead here, queued to be sent there."""
    a, _ = trio.testing.memory_stream_pair()
    c, _ = trio.testing.memory_stream_pair()
    twilio = WebSocket(a, client_side=False)
    agent = WebSocket(c, client_side=True)
    assert twilio.pumpable(agent)
    assert not agent.pumpable(twilio)  # a client side stamps its reads (liveness)

    twilio._leftover = b"\x81"
    assert not twilio.pumpable(agent)
    twilio._leftover = b""
    agent._out += b"queued"
    assert not twilio.pumpable(agent)
    agent._out.clear()
    agent._draining = True
    assert not twilio.pumpable(agent)
    agent._draining = False
    assert twilio.pumpable(agent)

    agent._close_sent = True  # no data after a close frame (RFC 6455 §5.5.1)
    assert not twilio.pumpable(agent)
    agent._close_sent = False
    agent.closed = ConnectionClosed(1000, "done")
    assert not twilio.pumpable(agent)
    agent.closed = None
    exc = twilio.lost(0)
    assert not twilio.pumpable(agent)
    assert "peer closed TCP" in exc.reason and twilio.closed is not None


def test_lost_names_the_failed_read() -> None:
    a, _ = trio.testing.memory_stream_pair()

    async def main() -> None:
        ws = WebSocket(a, client_side=False)
        exc = ws.lost(104)
        assert exc.code == 1006
        assert exc.reason == "receive failed: ConnectionResetError(104, 'Connection reset by peer')"

    trio.run(main)
