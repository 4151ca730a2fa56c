"""A lean RFC 6455 WebSocket: a sans-IO frame codec plus a thin Trio connection.

Why not trio-websocket or Hypercorn's WebSocket for the media path: measured on this machine
kind (docs in README, "Why a WebSocket of our own"), trio-websocket spends ~65-75 µs CPU per
receive+send pair (a reader task and a memory-channel hop per message) and Hypercorn/Quart
~110-145 µs; a relay moves ~200 WebSocket messages per call-second, so the per-message path,
not the DSP, decides capacity. This module parses frames straight out of ``receive_some``
buffers (many frames per read under load), never hops tasks, and writes several frames with
one ``send_all``. No extensions are negotiated (Twilio and the agent APIs need none), so
RSV bits must be zero (RFC 6455 §5.2).

Peer garbage (bad opcode, unmasked client frame, oversized message, invalid UTF-8) becomes a
close with the RFC's status code and a ``ConnectionClosed`` for the caller, never a crash.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol
from urllib.parse import urlsplit

import trio

from .. import netguard
from ..errors import ConnectionClosed, RemoteProtocolError
from .codec import ServerFrameParser, client_audio_frame, client_b64_frames, ws_mask

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA

# Close codes (RFC 6455 §7.4.1)
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED = 1003
CLOSE_ABNORMAL = 1006  # never sent on the wire
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011

_pack_len16 = struct.Struct("!BBH").pack
_pack_len64 = struct.Struct("!BBQ").pack


def accept_key(key: str | bytes) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2 step 5.4)."""
    if isinstance(key, str):
        key = key.encode("ascii")
    return base64.b64encode(hashlib.sha1(key.strip() + GUID).digest()).decode("ascii")


class ProtocolViolation(RemoteProtocolError):
    """The peer broke RFC 6455; ``code`` is the close code to answer with."""

    def __init__(self, message: str, code: int = CLOSE_PROTOCOL_ERROR) -> None:
        super().__init__(message, kind="ws_protocol" if code != CLOSE_TOO_BIG else "ws_too_big")
        self.code = code


class SendTimedOut(ConnectionClosed):
    """A bounded send did not complete: the peer stopped reading (a half-dead socket).

    A subclass so callers can tell "we gave up on the peer" from "the peer went away";
    code 1006 as for any connection lost without a close handshake."""

    kind = "send_timeout"


@dataclass(frozen=True, slots=True)
class Control:
    """A control frame the connection layer must act on (ping, pong, close)."""

    opcode: int
    payload: bytes


_unmask = ws_mask  # XOR with the 4-byte key: the same operation masks and unmasks

# Masking keys must be unpredictable (RFC 6455 §5.3: "derived from a strong source of
# entropy"); reading them from os.urandom 4 KiB at a time keeps that property without a
# getrandom(2) system call for every frame sent to the agent.
_key_pool = b""
_key_pos = 0


def _mask_key() -> bytes:
    global _key_pool, _key_pos
    if _key_pos >= len(_key_pool):
        _key_pool = os.urandom(4096)
        _key_pos = 0
    key = _key_pool[_key_pos : _key_pos + 4]
    _key_pos += 4
    return key


def build_frame(opcode: int, payload: bytes, mask: bool = False) -> bytes:
    """One FIN frame. Clients must mask (RFC 6455 §5.3); servers must not."""
    n = len(payload)
    b0 = 0x80 | opcode
    mbit = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, mbit | n))
    elif n < 65536:
        head = _pack_len16(b0, mbit | 126, n)
    else:
        head = _pack_len64(b0, mbit | 127, n)
    if not mask:
        return head + payload
    key = _mask_key()
    return head + key + ws_mask(payload, key)


def text_frame(text: str) -> bytes:
    """Unmasked (server) text frame; the hot path builds these."""
    return build_frame(OP_TEXT, text.encode("utf-8"))


def close_payload(code: int, reason: str = "") -> bytes:
    if code in (CLOSE_ABNORMAL, 1005, 1015):
        code = CLOSE_NORMAL  # reserved codes must not go on the wire (§7.4.1)
    return struct.pack("!H", code) + reason.encode("utf-8")[:120]


class FrameParser:
    """Sans-IO frame reader: ``feed(bytes)`` returns complete messages and control frames.

    Messages are ``str`` (text) or ``bytes`` (binary); control frames are :class:`Control`.
    Raises :class:`ProtocolViolation` on garbage; the connection turns that into a close.
    """

    __slots__ = ("_buf", "_frag", "_frag_len", "_frag_op", "expect_masked", "max_message")

    def __init__(self, *, expect_masked: bool, max_message: int = 65536) -> None:
        self.expect_masked = expect_masked
        self.max_message = max_message
        self._buf = b""
        self._frag: list[bytes] = []
        self._frag_op = 0
        self._frag_len = 0

    def feed(self, data: bytes) -> list[str | bytes | Control]:
        buf = self._buf + data if self._buf else data
        out: list[str | bytes | Control] = []
        pos = 0
        end = len(buf)
        expect_masked = self.expect_masked
        max_message = self.max_message
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            if b0 & 0x70:
                raise ProtocolViolation("RSV bits set without a negotiated extension")
            masked = b1 & 0x80
            if bool(masked) != expect_masked:
                raise ProtocolViolation(
                    "unmasked client frame" if expect_masked else "masked server frame"
                )
            n = b1 & 0x7F
            hdr = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                hdr = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = struct.unpack_from("!Q", buf, pos + 2)[0]
                hdr = 10
            opcode = b0 & 0x0F
            if n > max_message:
                raise ProtocolViolation(f"frame of {n} bytes exceeds {max_message}", CLOSE_TOO_BIG)
            if masked:
                hdr += 4
            if end - pos < hdr + n:
                break
            payload = buf[pos + hdr : pos + hdr + n]
            if masked:
                payload = _unmask(payload, buf[pos + hdr - 4 : pos + hdr])
            pos += hdr + n
            fin = b0 & 0x80
            if opcode >= 0x8:
                if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                    raise ProtocolViolation(f"unknown control opcode {opcode:#x}")
                if not fin or n > 125:
                    raise ProtocolViolation("fragmented or oversized control frame")
                out.append(Control(opcode, payload))
                continue
            if opcode == OP_CONT:
                if not self._frag:
                    raise ProtocolViolation("continuation frame without a message to continue")
                self._frag_len += n
                if self._frag_len > max_message:
                    raise ProtocolViolation("fragmented message too big", CLOSE_TOO_BIG)
                self._frag.append(payload)
                if not fin:
                    continue
                payload = b"".join(self._frag)
                opcode = self._frag_op
                self._frag = []
                self._frag_len = 0
            elif opcode in (OP_TEXT, OP_BINARY):
                if self._frag:
                    raise ProtocolViolation("new data frame inside a fragmented message")
                if not fin:
                    self._frag = [payload]
                    self._frag_op = opcode
                    self._frag_len = n
                    continue
            else:
                raise ProtocolViolation(f"unknown data opcode {opcode:#x}")
            if opcode == OP_TEXT:
                try:
                    out.append(payload.decode("utf-8"))
                except UnicodeDecodeError:
                    raise ProtocolViolation(
                        "text frame is not valid UTF-8", CLOSE_INVALID_DATA
                    ) from None
            else:
                out.append(bytes(payload))
        self._buf = buf[pos:] if pos < end else b""
        if len(self._buf) > max_message + 14:
            raise ProtocolViolation("frame header announces too much data", CLOSE_TOO_BIG)
        return out


class MessageParser(Protocol):
    """What a connection reads frames with: :class:`FrameParser`, or a compiled one with
    the same rules that also recognises a protocol's hot messages
    (``relay.media.codec.TwilioFrameParser``)."""

    def feed(self, data: bytes) -> list[Any]: ...


def parse_close(payload: bytes) -> tuple[int, str]:
    if len(payload) >= 2:
        code = struct.unpack("!H", payload[:2])[0]
        return code, payload[2:].decode("utf-8", "replace")
    return 1005, ""


class WebSocket:
    """A WebSocket over a Trio stream: non-blocking writes, batched reads.

    Writes (``send_*``) never block: bytes go to the kernel at once with one ``send(2)``
    when it takes them (the common case), otherwise into a bounded per-socket buffer that
    :meth:`run_flusher` (or the next async write) drains under ``send_timeout``. A peer that
    stops reading (a half-dead socket) therefore turns into :class:`SendTimedOut`, never a
    hung task, and handlers can send from synchronous code (see ``relay/reactor.py``)
    without yielding in the middle of a state change. Order is always kept: nothing
    bypasses bytes already waiting in the buffer.

    Reads: ``receive()`` awaits the next batch of messages (all complete frames from one
    TCP read); ``read_nowait()`` is its synchronous twin for the reactor.

    Liveness: every read stamps :attr:`last_received` (one store per TCP read, not per
    frame), pongs stamp :attr:`last_pong`, :meth:`send_ping_nowait` sends a ping and
    :attr:`send_backlog_since` says how long unsent bytes have waited; the watchdog in
    ``relay.agents.liveness`` decides from these when a peer is dead.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        client_side: bool,
        max_message: int = 65536,
        send_timeout: float = 2.0,
        leftover: bytes = b"",
        max_pending: int = 1 << 20,
    ) -> None:
        self.stream = stream
        self.client_side = client_side
        self.send_timeout = send_timeout
        self.max_pending = max_pending
        # A client (relay's agent connections) reads the server's frames with the compiled
        # reader, ServerFrameParser: FrameParser's rules to the letter (both are checked
        # against each other, tests/test_codec_server_frames.py) at a fraction of the cost
        # per message. The server side starts with FrameParser; a call swaps in the
        # compiled TwilioFrameParser once the stream has started (replace_parser).
        self.parser: MessageParser = (
            ServerFrameParser(max_message=max_message, control=Control, violation=ProtocolViolation)
            if client_side
            else FrameParser(expect_masked=True, max_message=max_message)
        )
        self._leftover = leftover
        self._send_lock = trio.Lock()
        #: drain() holds _send_lock (a flag, not Lock.locked(): write_nowait is per message)
        self._draining = False
        self._out = bytearray()
        self._out_wake: trio.Event | None = None
        #: called (synchronously) when a write leaves bytes waiting and no run_flusher is
        #: parked: the owner starts a task that awaits drain(). Without it, bytes wait for
        #: the next async write or run_flusher.
        self.on_backlog: Callable[[], None] | None = None
        self.closed: ConnectionClosed | None = None
        self._close_sent = False
        self.messages_in = 0
        self.messages_out = 0
        self._raw = _raw_socket(stream)
        # Liveness (relay.agents.liveness): when bytes from the peer were last consumed and
        # when the last pong arrived (trio clock); when unsent bytes started waiting here.
        now = trio.current_time()
        #: trio.current_time() when any bytes from the peer were last consumed. Stamped
        #: on client (agent) connections only: the watchdog watches agents, and Twilio's
        #: side reads hundreds of times a second per process, where the clock read shows
        #: in profiles (~3 % of the relay's CPU at 150 calls).
        self.last_received = now
        self._stamp_rx = client_side
        #: trio.current_time() when the last pong frame arrived (construction time before)
        self.last_pong = now
        self._backlog_since: float | None = None

    @property
    def raw_socket(self) -> socket.socket | None:
        """The plain TCP socket, for readiness multiplexing (None for TLS/test streams)."""
        return self._raw

    # -- sending ---------------------------------------------------------------------
    def _frame(self, opcode: int, payload: bytes) -> bytes:
        return build_frame(opcode, payload, self.client_side)

    def write_nowait(self, data: bytes) -> None:
        """Queue ``data`` (whole frames) for sending without blocking.

        Raises ConnectionClosed if the socket is closed or the buffer limit is exceeded.
        """
        if self.closed is not None:
            raise self.closed.copy()
        out = self._out
        raw = self._raw
        if not out and raw is not None and not self._draining:
            # Fast path: one non-blocking send(2) straight on the socket; Trio's send_all
            # would add scheduler round trips per message, which dominate at ~200
            # messages per call-second.
            try:
                sent = raw.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.closed = ConnectionClosed(CLOSE_ABNORMAL, f"send failed: {exc!r}")
                raise self.closed.copy() from None
            if sent == len(data):
                return
            data = data[sent:]
        if self._backlog_since is None:
            self._backlog_since = trio.current_time()
        out += data
        if len(out) > self.max_pending:
            self.closed = SendTimedOut(
                CLOSE_ABNORMAL, f"peer not reading: {len(out)} bytes waiting to be sent"
            )
            raise self.closed.copy()
        if self._out_wake is not None:
            self._out_wake.set()
        elif self.on_backlog is not None:
            self.on_backlog()

    async def drain(self) -> None:
        """Send everything buffered, bounded by ``send_timeout`` per chunk."""
        if not self._out:
            return
        async with self._send_lock:
            self._draining = True
            try:
                while self._out:
                    chunk = bytes(self._out)
                    self._out.clear()
                    await self._send_bounded(chunk)
                self._backlog_since = None
            finally:
                self._draining = False

    @property
    def send_backlog_since(self) -> float | None:
        """trio.current_time() since when written bytes have been waiting to be sent (the
        kernel did not take them at once), None when nothing waits. Only the slow path
        touches it: a peer that stopped reading keeps it in the past."""
        return self._backlog_since

    def send_ping_nowait(self, payload: bytes = b"") -> None:
        """Queue a ping frame (payload of at most 125 bytes); the pong updates
        :attr:`last_pong` and :attr:`last_received` when it is read."""
        if len(payload) > 125:
            raise ValueError("ping payload must be at most 125 bytes")
        self.write_nowait(self._frame(OP_PING, payload))

    async def run_flusher(self) -> None:
        """Drain the buffer whenever sync writers leave bytes in it; runs until closed.

        One per socket inside the owning call's nursery. Raises ConnectionClosed
        (``SendTimedOut`` for a peer that stopped reading)."""
        while True:
            if self.closed is not None and not self._out:
                raise self.closed.copy()
            if not self._out:
                self._out_wake = trio.Event()
                await self._out_wake.wait()
                self._out_wake = None
            await self.drain()

    def _lost(self, error: ConnectionClosed) -> ConnectionClosed:
        # The first reason a socket ended wins (a peer's close code beats the failed send
        # of our close reply that follows it).
        if self.closed is None:
            self.closed = error
        return error.copy()

    async def _send_bounded(self, data: bytes) -> None:
        if self.closed is not None and not self._close_sent:
            raise self.closed.copy()
        with trio.move_on_after(self.send_timeout) as scope:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise self._lost(
                    ConnectionClosed(CLOSE_ABNORMAL, f"send failed: {exc!r}")
                ) from None
            except BaseException:
                # Cancelled from outside mid-write: part of a frame may be on the wire, so
                # nothing more may follow it on this socket.
                self._lost(ConnectionClosed(CLOSE_ABNORMAL, "send interrupted"))
                raise
        if scope.cancelled_caught:
            raise self._lost(SendTimedOut(CLOSE_ABNORMAL, "send timed out (peer not reading)"))

    async def _write(self, data: bytes) -> None:
        self.write_nowait(data)
        if self._out:
            await self.drain()

    def send_frames_nowait(self, frames: Sequence[bytes]) -> None:
        """Pre-built frames (see :func:`text_frame`) in one write."""
        self.messages_out += len(frames)
        self.write_nowait(b"".join(frames))

    def send_wire_nowait(self, data: bytes, count: int) -> None:
        """``count`` whole frames already in wire form (e.g. codec.twilio_frames)."""
        self.messages_out += count
        self.write_nowait(data)

    def send_b64_texts_nowait(self, head: bytes, payloads: list[str], tail: bytes) -> bool:
        """One text message ``head + payload + tail`` per payload, in one write: a client's
        hot path for caller audio spliced into an agent's JSON message (the frames are built
        and masked in one compiled call, ``codec.client_b64_frames``). Sends nothing and
        returns False when a payload is not plain base64 (the caller serialises it then)."""
        if not self.client_side:
            raise RuntimeError("send_b64_texts_nowait builds masked (client) frames")
        wire = client_b64_frames(head, payloads, tail)
        if wire is None:
            return False
        self.messages_out += len(payloads)
        self.write_nowait(wire)
        return True

    def send_audio_text_nowait(self, head: bytes, audio: bytes, tail: bytes) -> None:
        """One text message ``head + base64(audio) + tail``: a client's hot path for
        transcoded caller audio in an agent's JSON message (encoded, framed and masked in
        one compiled call, ``codec.client_audio_frame``)."""
        if not self.client_side:
            raise RuntimeError("send_audio_text_nowait builds masked (client) frames")
        wire = client_audio_frame(head, audio, tail)
        self.messages_out += 1
        self.write_nowait(wire)

    def send_texts_nowait(self, texts: Sequence[str]) -> None:
        self.messages_out += len(texts)
        frame = self._frame
        self.write_nowait(b"".join([frame(OP_TEXT, t.encode("utf-8")) for t in texts]))

    def send_text_nowait(self, text: str) -> None:
        self.messages_out += 1
        self.write_nowait(self._frame(OP_TEXT, text.encode("utf-8")))

    def send_bytes_nowait(self, data: bytes) -> None:
        self.messages_out += 1
        self.write_nowait(self._frame(OP_BINARY, data))

    async def send_text(self, text: str) -> None:
        self.messages_out += 1
        await self._write(self._frame(OP_TEXT, text.encode("utf-8")))

    async def send_bytes(self, data: bytes) -> None:
        self.messages_out += 1
        await self._write(self._frame(OP_BINARY, data))

    async def send_texts(self, texts: Sequence[str]) -> None:
        """Several text messages in one write (one syscall, one await)."""
        self.messages_out += len(texts)
        frame = self._frame
        await self._write(b"".join([frame(OP_TEXT, t.encode("utf-8")) for t in texts]))

    async def send_frames(self, frames: Iterable[bytes], count: int = 1) -> None:
        """Pre-built frames (see :func:`text_frame`) in one write."""
        self.messages_out += count
        await self._write(b"".join(frames))

    # -- receiving -------------------------------------------------------------------
    def replace_parser(self, parser: MessageParser) -> bool:
        """Read from now on with ``parser`` (same RFC 6455 rules, e.g. one that also turns
        a protocol's hot messages into tuples). Bytes the old parser held back (half a
        frame) are read again first. False, and nothing changes, while a fragmented
        message is half received or the old parser is not a :class:`FrameParser`."""
        old = self.parser
        if type(old) is not FrameParser or old._frag:
            return False
        self._leftover = old._buf + self._leftover
        old._buf = b""
        self.parser = parser
        return True

    def _consume(self, data: bytes) -> list[str | bytes]:
        """Parse ``data``; answer pings and closes; return the data messages.

        After a close frame or a protocol violation ``self.closed`` is set; messages that
        arrived before it are still returned (the caller gets ConnectionClosed next time).
        """
        self._received(data)
        return self.parse(data)

    def parse(self, data: bytes) -> list[str | bytes]:
        """The data messages in ``data`` (bytes already received): fed to :attr:`parser`,
        control frames answered (:meth:`accept`), a protocol violation closing the socket
        (:meth:`violated`)."""
        try:
            items = self.parser.feed(data)
        except ProtocolViolation as exc:
            self.violated(exc)
        return self.accept(items)

    def _received(self, data: bytes) -> None:
        if not data:
            raise self.lost(0)
        if self._stamp_rx:
            self.last_received = trio.current_time()

    def lost(self, err: int) -> ConnectionClosed:
        """Mark the connection closed after a read found the peer gone (``err`` 0: end of
        stream) or failed with errno ``err``; returns the exception to raise."""
        if err:
            # the repr recv_nowait gives the same failure (ConnectionResetError(104, ...))
            exc = OSError(err, os.strerror(err))
            self.closed = ConnectionClosed(CLOSE_ABNORMAL, f"receive failed: {exc!r}")
        else:
            self.closed = ConnectionClosed(CLOSE_ABNORMAL, "peer closed TCP without close frame")
        return self.closed.copy()

    def pumpable(self, to: WebSocket) -> bool:
        """Whether bytes may go straight from this socket's descriptor to ``to``'s (the
        uplink pump, ``codec.UplinkPump``): both open (no close frame sent there), no bytes
        read ahead here and no read to stamp (a server side), none waiting to be sent there
        (a direct write would overtake them)."""
        return not self._stamp_rx and self.relays_directly(to)

    @property
    def stamps_reads(self) -> bool:
        """Each read sets :attr:`last_received` (a client: the liveness watchdog reads it)."""
        return self._stamp_rx

    def relays_directly(self, to: WebSocket) -> bool:
        """Whether a compiled reader may take a read off this socket's descriptor and write
        what it makes of it straight to ``to``'s (``codec.DownlinkHandler``): both open (no
        close frame sent there), no bytes read ahead here, none waiting to be sent there."""
        return (
            self.closed is None
            and not self._leftover
            and to.closed is None
            and not to._close_sent
            and not to._out
            and not to._draining
        )

    def violated(self, exc: ProtocolViolation) -> NoReturn:
        """The peer broke RFC 6455 (``parser.feed`` raised ``exc``): close with its code and
        raise ConnectionClosed."""
        self.close_nowait(exc.code, str(exc))
        self.closed = ConnectionClosed(exc.code, str(exc))
        raise self.closed.copy() from exc

    def accept(self, items: Sequence[object], consumed: int = 0) -> list[str | bytes]:
        """The data messages among ``items`` (what ``parser.feed`` returned), answering the
        control frames in order; ``consumed`` more messages were handled by the caller
        already (counted). Stops after a close frame (``self.closed`` is then set)."""
        messages: list[str | bytes] = []
        for item in items:
            if type(item) is Control:
                self._control(item)
                if self.closed is not None:
                    break
            else:
                messages.append(item)  # type: ignore[arg-type]
        self.messages_in += consumed + len(messages)
        return messages

    def recv_nowait(self) -> bytes | None:
        """The bytes of one non-blocking read (None when nothing is waiting), for
        :meth:`parse`, or for a caller that feeds them to :attr:`parser` itself and passes
        what is left to :meth:`accept` (a violation to :meth:`violated`): the uplink's
        compiled hot path.

        Raises ConnectionClosed when the peer closed."""
        if self.closed is not None:
            raise self.closed.copy()
        if self._leftover:
            data, self._leftover = self._leftover, b""
        else:
            raw = self._raw
            if raw is None:
                raise RuntimeError("recv_nowait needs a plain TCP socket")
            try:
                data = raw.recv(65536)
            except BlockingIOError:
                return None
            except OSError as exc:
                self.closed = ConnectionClosed(CLOSE_ABNORMAL, f"receive failed: {exc!r}")
                raise self.closed.copy() from None
        self._received(data)
        return data

    def read_nowait(self) -> list[str | bytes]:
        """Whatever complete messages one non-blocking read yields ([] if none).

        Raises ConnectionClosed when the peer closed (or broke the protocol)."""
        data = self.recv_nowait()
        return [] if data is None else self.parse(data)

    async def receive(self) -> list[str | bytes]:
        """Next batch of data messages. Raises ConnectionClosed when the socket is done."""
        while True:
            if self.closed is not None:
                raise self.closed.copy()
            if self._leftover:
                data, self._leftover = self._leftover, b""
            else:
                try:
                    data = await self._receive_some()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self.closed = ConnectionClosed(CLOSE_ABNORMAL, f"receive failed: {exc!r}")
                    raise self.closed.copy() from None
            messages = self._consume(data)
            if self._out:
                try:
                    await self.drain()  # a pong or close reply that did not fit at once
                except ConnectionClosed:
                    pass  # self.closed holds the reason; raised on the next call
            if messages:
                return messages

    async def _receive_some(self) -> bytes:
        raw = self._raw
        if raw is None:
            return bytes(await self.stream.receive_some(65536))
        # Fast path: recv(2) first; if nothing is there, park on readability (one
        # scheduler round trip instead of trio's three). When data was already waiting we
        # still yield once, shielded, so a busy connection cannot starve the other calls
        # and a pending cancel cannot lose bytes we already took from the kernel.
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            data = raw.recv(65536)
        except BlockingIOError:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        while True:
            await trio.lowlevel.wait_readable(raw)
            try:
                return raw.recv(65536)
            except BlockingIOError:
                continue

    def _control(self, frame: Control) -> None:
        if frame.opcode == OP_PING:
            try:
                self.write_nowait(self._frame(OP_PONG, frame.payload))
            except ConnectionClosed:
                pass
        elif frame.opcode == OP_PONG:
            self.last_pong = self.last_received
        elif frame.opcode == OP_CLOSE:
            code, reason = parse_close(frame.payload)
            self.close_nowait(code if code != 1005 else CLOSE_NORMAL)
            self.closed = ConnectionClosed(code, reason)

    def close_nowait(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Queue a close frame (once); TCP is closed later by :meth:`aclose`."""
        if self._close_sent or self.closed is not None:
            return
        self._close_sent = True
        try:
            self.write_nowait(self._frame(OP_CLOSE, close_payload(code, reason)))
        except ConnectionClosed:
            pass

    async def aclose(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Send a close frame (bounded) and close TCP. Safe to call more than once.

        We do not wait for the peer's close reply: the relay's job is done and some
        clients stall ~10 s on the closing handshake (a known complaint with Twilio relays).
        """
        try:
            self.close_nowait(code, reason)
            if self._out:
                with trio.move_on_after(min(self.send_timeout, 1.0)):
                    try:
                        await self.drain()
                    except ConnectionClosed:
                        pass
        finally:
            # Runs even when we are cancelled (a call's finally): the socket must not leak.
            if self.closed is None:
                self.closed = ConnectionClosed(code, reason)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)


# --- handshakes -----------------------------------------------------------------------
def server_handshake_response(key: str, extra_headers: Sequence[tuple[str, str]] = ()) -> bytes:
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_key(key)}",
    ]
    lines += [f"{k}: {v}" for k, v in extra_headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def connect(
    url: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    timeout: float = 10.0,
    max_message: int = 16 * 1024 * 1024,
    send_timeout: float = 2.0,
    subprotocols: Sequence[str] = (),
) -> WebSocket:
    """Open a client WebSocket to ``ws://`` or ``wss://`` ``url`` (bounded by ``timeout``).

    Agent APIs send big audio deltas, hence the larger default ``max_message``.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"WebSocket URL must be ws:// or wss://, got {url!r}")
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    with trio.fail_after(timeout):
        # A tenant's agent (relay.netguard guard in force): the host is resolved, checked
        # public, and that very address is connected to (Host and TLS keep the name).
        stream = await netguard.open_stream(
            host, port, tls=parts.scheme == "wss", what=f"WebSocket {parts.scheme}://{host}"
        )
        try:
            _set_nodelay(stream)
            key = base64.b64encode(os.urandom(16)).decode("ascii")
            bracketed = f"[{host}]" if ":" in host else host  # IPv6 literal (RFC 7230 §5.4)
            hostport = bracketed if parts.port is None else f"{bracketed}:{port}"
            lines = [
                f"GET {path} HTTP/1.1",
                f"Host: {hostport}",
                "Upgrade: websocket",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {key}",
                "Sec-WebSocket-Version: 13",
            ]
            if subprotocols:
                lines.append("Sec-WebSocket-Protocol: " + ", ".join(subprotocols))
            for k, v in headers:
                if "\r" in v or "\n" in v or "\r" in k or "\n" in k:
                    raise ValueError(f"header {k!r} contains a line break")
                lines.append(f"{k}: {v}")
            await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            head, rest = await read_http_head(stream, limit=16384)
            status_line, response_headers = parse_head(head)
            parts_status = status_line.split(" ", 2)
            if len(parts_status) < 2 or parts_status[1] != "101":
                raise ConnectionClosed(CLOSE_ABNORMAL, f"handshake refused: {status_line}")
            if response_headers.get("sec-websocket-accept") != accept_key(key):
                raise ConnectionClosed(CLOSE_ABNORMAL, "handshake: bad Sec-WebSocket-Accept")
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    return WebSocket(
        stream,
        client_side=True,
        max_message=max_message,
        send_timeout=send_timeout,
        leftover=rest,
    )


def _raw_socket(stream: object) -> socket.socket | None:
    """The stdlib socket under a plain ``trio.SocketStream`` (None for TLS or test streams).

    ``trio.socket.SocketType`` keeps it as ``_sock``; if a future trio renames it we simply
    lose the fast path, not correctness.
    """
    if type(stream) is not trio.SocketStream:
        return None
    raw = getattr(stream.socket, "_sock", None)
    return raw if isinstance(raw, socket.socket) else None


def _set_nodelay(stream: trio.abc.Stream) -> None:
    sock_stream = getattr(stream, "transport_stream", stream)
    if isinstance(sock_stream, trio.SocketStream):
        sock_stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)


async def read_http_head(stream: trio.abc.ReceiveStream, limit: int = 16384) -> tuple[bytes, bytes]:
    """Read up to the blank line ending an HTTP head; returns (head, bytes after it)."""
    buf = b""
    while True:
        idx = buf.find(b"\r\n\r\n")
        if idx >= 0:
            return buf[:idx], buf[idx + 4 :]
        if len(buf) > limit:
            raise RemoteProtocolError("HTTP head too large", kind="http_head_too_large")
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise RemoteProtocolError("connection closed inside HTTP head", kind="http_eof")
        buf += chunk


def parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """First line and lower-cased headers (first value wins for repeats... joined by ',')."""
    text = head.decode("latin-1")
    first, _, rest = text.partition("\r\n")
    headers: dict[str, str] = {}
    for line in rest.split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep:
            continue
        name = name.strip().lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return first, headers
