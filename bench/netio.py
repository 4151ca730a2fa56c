"""Bare non-blocking networking for the load generator and the fake agent.

Why not asyncio or trio: the generator has to drive 600+ simulated calls (~130 WebSocket
messages per call-second across both legs) from one core while staying far from
saturation, so that every microsecond of measured latency belongs to the relay under
test. A level-triggered epoll loop over plain sockets, precomputed message templates and
no per-message task switches costs a few microseconds per message in CPython.

Pieces:
- ``Reactor``: epoll + a timer heap, single-threaded.
- ``Stream``: a non-blocking TCP connection with an output backlog.
- ``FrameReader`` / ``frame``: RFC 6455 framing (server and client sides).
- ``HttpConn``: a tiny HTTP/1.1 server connection that can upgrade to WebSocket; used by
  the fake agent and by the tests' delay relay.

Client frames from this module use an all-zero masking key. RFC 6455 section 5.3 only
requires that a client frame carries a 32-bit key (MASK bit set); a zero key is a legal
key whose XOR is the identity, so the generator pays no masking cost. The relay under test
still runs its normal unmasking code path on every frame.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import heapq
import itertools
import os
import select
import socket
import struct
import time
from collections.abc import Callable

monotonic_ns = time.monotonic_ns

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
_EPOLL_READ = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
ZERO_KEY = b"\x00\x00\x00\x00"
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
RECV_SIZE = 262144
# One receive buffer for the whole process (single-threaded). ``sock.recv(256 KiB)`` would
# allocate a fresh 256 KiB bytes object per call, which glibc serves with mmap, then
# mremap to shrink and munmap to free: measured at ~13% of the generator's CPU.
_RBUF = bytearray(RECV_SIZE)
_RVIEW = memoryview(_RBUF)
# A peer that stops reading: past this backlog we stop buffering and drop the connection
# (counted by the owner through ``on_close``) instead of growing memory without bound.
MAX_BACKLOG = 8 * 1024 * 1024
# Ready fds handled before due timers get another chance (see Reactor.run).
TIMER_CHECK_EVERY = 32
# Kernel receive timestamps (socket(7) SO_TIMESTAMPNS; the control message type is the same
# number). Python's socket module does not export the constant; 35 is its value on Linux.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_ANC_SIZE = socket.CMSG_SPACE(16)  # one struct timespec
_TIMESPEC = struct.Struct("@qq")
_time_ns = time.time_ns


def enable_rx_stamps(sock: socket.socket) -> None:
    """Ask the kernel to stamp every received segment (see ``recv_stamped``)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)


def stamp_to_monotonic(sec: int, nsec: int) -> int:
    """A CLOCK_REALTIME kernel stamp as CLOCK_MONOTONIC nanoseconds.

    Socket stamps come from the real-time clock; the offset between the two clocks is read
    right now, which is exact up to the few microseconds since the segment arrived (NTP
    slews the rate by at most 500 ppm). Never later than now.
    """
    mono = monotonic_ns()
    t = sec * 1_000_000_000 + nsec - (_time_ns() - mono)
    return t if t < mono else mono


def recv_stamped(sock: socket.socket, buf: bytearray) -> tuple[int, int]:
    """``recv_into(buf)`` plus the time the data reached the socket (monotonic ns).

    Why: the generator's own loop may be busy for a while before it reads a socket. The
    kernel's arrival stamp measures when the target delivered the data, so time the
    generator spends on other calls is not charged to the target. For TCP the stamp is the
    newest segment's in this read: if one read drains several segments, the earlier ones
    look later than they were (the error only ever adds latency). Falls back to the read
    time when there is no stamp.
    """
    n, anc, _flags, _addr = sock.recvmsg_into([buf], _ANC_SIZE)
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            return n, stamp_to_monotonic(*_TIMESPEC.unpack_from(data))
    return n, monotonic_ns()


def _unmask_py(data: bytes, key: bytes) -> bytes:
    """XOR ``data`` with the repeating 4-byte ``key`` (pure Python fallback)."""
    if key == ZERO_KEY or not data:
        return data
    n = len(data)
    stream = (key * ((n >> 2) + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


try:  # websockets ships a C XOR (~0.2 µs per 1.3 kB vs ~5 µs for the int trick)
    from websockets.speedups import apply_mask as _apply_mask  # type: ignore

    def unmask(data: bytes, key: bytes) -> bytes:
        if key == ZERO_KEY:
            return data
        return _apply_mask(data, key)

except ImportError:  # pragma: no cover - depends on the optional extra
    unmask = _unmask_py


def ws_accept_key(key: str | bytes) -> str:
    """The Sec-WebSocket-Accept value for a client's Sec-WebSocket-Key."""
    if isinstance(key, str):
        key = key.encode("ascii")
    return base64.b64encode(hashlib.sha1(key.strip() + _WS_GUID).digest()).decode("ascii")


def new_ws_key() -> str:
    return base64.b64encode(os.urandom(16)).decode("ascii")


_H7 = struct.Struct(">BB")
_H16 = struct.Struct(">BBH")
_H16_MASKED = struct.Struct(">BBH4x")  # 4 pad bytes = the zero masking key


def frame_header(n: int, opcode: int = OP_TEXT, masked: bool = False) -> bytes:
    """Header of one final frame of ``n`` payload bytes (with the zero key when masked)."""
    b0 = 0x80 | opcode
    if 126 <= n < 65536:  # the common size of media messages: one struct call
        return _H16_MASKED.pack(b0, 0xFE, n) if masked else _H16.pack(b0, 126, n)
    mbit = 0x80 if masked else 0
    if n < 126:
        head = _H7.pack(b0, mbit | n)
    else:
        head = bytes((b0, mbit | 127)) + n.to_bytes(8, "big")
    return head + ZERO_KEY if masked else head


def frame(payload: bytes, opcode: int = OP_TEXT, masked: bool = False) -> bytes:
    """One final WebSocket frame. ``masked`` frames use the zero key (see module doc)."""
    return frame_header(len(payload), opcode, masked) + payload


def close_payload(code: int = 1000, reason: str = "") -> bytes:
    return code.to_bytes(2, "big") + reason.encode()


_NO_CONTROL: list = []  # shared and never mutated: feed_to's "no control frames" result


class FrameReader:
    """Incremental RFC 6455 parser; returns whole messages ``(opcode, payload)``.

    Handles both masked (client to server) and unmasked frames, fragmented messages and
    interleaved control frames. No UTF-8 validation: the peers are trusted test parties.
    """

    __slots__ = ("_buf", "_frag", "_frag_op")

    def __init__(self) -> None:
        self._buf = b""
        self._frag: list[bytes] = []
        self._frag_op = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        control = self.feed_to(data, lambda op, payload, now: out.append((op, payload)), 0)
        # keep the wire order for callers that want one list (control frames are rare)
        return out + control if control else out

    def feed_to(self, data: bytes, deliver: Callable, now: int) -> list[tuple[int, bytes]]:
        """Parse ``data``: whole data messages go straight to ``deliver(op, payload, now)``
        (no intermediate list on the hot path); control frames are returned."""
        if self._buf:
            data = self._buf + data
        elif (
            len(data) > 8
            and data[1] == 0xFE
            and (data[0] == 0x81 or data[0] == 0x82)
            and (data[2] << 8 | data[3]) + 8 == len(data)
        ):
            # Fast path: exactly one final, masked data frame with a 16-bit length (what
            # a relay sends the agent 50 times a second per call).
            deliver(data[0] & 0x0F, unmask(data[8:], data[4:8]), now)
            return _NO_CONTROL
        control: list[tuple[int, bytes]] = []
        n = len(data)
        pos = 0
        while n - pos >= 2:
            b0 = data[pos]
            b1 = data[pos + 1]
            ln = b1 & 0x7F
            hdr = pos + 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = (data[pos + 2] << 8) | data[pos + 3]
                hdr = pos + 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(data[pos + 2 : pos + 10], "big")
                hdr = pos + 10
            if b1 & 0x80:
                end = hdr + 4 + ln
                if end > n:
                    break
                payload = unmask(data[hdr + 4 : end], data[hdr : hdr + 4])
            else:
                end = hdr + ln
                if end > n:
                    break
                payload = data[hdr:end]
            pos = end
            op = b0 & 0x0F
            if b0 & 0x80:  # FIN
                if op == OP_TEXT or op == OP_BINARY:
                    deliver(op, payload, now)
                elif op == OP_CONT:
                    self._frag.append(payload)
                    deliver(self._frag_op, b"".join(self._frag), now)
                    self._frag = []
                else:
                    control.append((op, payload))
            elif op == OP_CONT:
                self._frag.append(payload)
            else:
                self._frag_op = op
                self._frag = [payload]
        self._buf = data[pos:] if pos < n else b""
        return control


def parse_head(buf: bytes) -> tuple[str, dict[str, str], int] | None:
    """Parse an HTTP head. Returns (first line, lower-cased headers, body offset)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, end + 4


class Reactor:
    """Single-threaded epoll loop with a timer heap.

    Handlers registered for a fd get ``on_event(mask)``. Timers are ``call_at(t_ns, fn,
    *args)``; cancel by ``cancel(handle)``.
    """

    def __init__(
        self, stamp_rx: bool = False, engine: object = None, wait_timers: bool = False
    ) -> None:
        """``stamp_rx``: streams of this reactor read kernel arrival stamps (see
        ``recv_stamped``). ``engine``: a module with ``run_reactor`` (``bench.genfast``'s
        compiled loop) to run the loop instead of the pure-Python ``run`` below.
        ``wait_timers``: between timers, sleep instead of waiting on the sockets, and read
        whatever arrived meanwhile when the next timer is due (``BENCH_GEN_WAIT=timers``).
        Why: on loopback a peer's ``send`` runs the receiver's wake-up in the sender's
        context, so a generator blocked on its sockets bills the target for waking it, a
        cost a relay talking to remote Twilio and agents never pays; with the stamps of
        ``stamp_rx`` the latency measured does not depend on when the generator reads."""
        self.stamp_rx = stamp_rx
        self.engine = engine
        self.wait_timers = wait_timers
        self._ep = select.epoll()
        self._handlers: dict[int, object] = {}
        # fd -> bound ``on_event``: one dict lookup and no attribute lookup per event
        self._callbacks: dict[int, Callable[[int], None]] = {}
        self._timers: list[list] = []
        self._seq = itertools.count()
        self.closed = False

    def register(self, fd: int, handler: object, events: int = EPOLLIN) -> None:
        self._handlers[fd] = handler
        self._callbacks[fd] = handler.on_event  # type: ignore[attr-defined]
        self._ep.register(fd, events)

    def set_callback(self, fd: int, callback: Callable[[int], None]) -> None:
        """Route ``fd``'s events to ``callback`` instead of its handler's ``on_event``."""
        if fd in self._callbacks:
            self._callbacks[fd] = callback

    def modify(self, fd: int, events: int) -> None:
        if fd in self._handlers:
            self._ep.modify(fd, events)

    def unregister(self, fd: int) -> None:
        self._callbacks.pop(fd, None)
        if self._handlers.pop(fd, None) is not None:
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def call_at(self, t_ns: int, fn: Callable, *args: object) -> list:
        entry = [t_ns, next(self._seq), fn, args]
        heapq.heappush(self._timers, entry)
        return entry

    def call_later(self, delay_s: float, fn: Callable, *args: object) -> list:
        return self.call_at(monotonic_ns() + int(delay_s * 1e9), fn, *args)

    @staticmethod
    def cancel(entry: list | None) -> None:
        if entry is not None:
            entry[2] = None

    def run(self, until_ns: int | None = None, stop: Callable[[], bool] | None = None) -> None:
        """Run until ``until_ns`` (monotonic) or until ``stop()`` returns true.

        Due timers also fire in the middle of a large batch of ready fds (every
        ``TIMER_CHECK_EVERY`` events): a burst from the peer then cannot hold the 20 ms
        media timers back by the time it takes to drain the whole batch.
        """
        if self.engine is not None:
            self.engine.run_reactor(self, until_ns, stop)  # type: ignore[attr-defined]
            return
        timers = self._timers
        callbacks = self._callbacks
        poll = self._ep.poll
        pop = heapq.heappop
        get = callbacks.get
        every = TIMER_CHECK_EVERY
        while True:
            now = monotonic_ns()
            while timers and timers[0][0] <= now:
                entry = pop(timers)
                fn = entry[2]
                if fn is not None:
                    fn(*entry[3])
                if timers and timers[0][0] <= now:
                    continue
                now = monotonic_ns()  # timers can take a while: pick up newly due ones
            if (until_ns is not None and now >= until_ns) or (stop is not None and stop()):
                return
            wake = timers[0][0] if timers else now + 50_000_000
            if until_ns is not None and until_ns < wake:
                wake = until_ns
            timeout = (wake - now) / 1e9
            if self.wait_timers and timeout > 0:
                time.sleep(timeout)
                timeout = 0
            events = poll(timeout if timeout > 0 else 0)
            if len(events) <= every:
                for fd, ev in events:
                    cb = get(fd)
                    if cb is not None:
                        cb(ev)
                continue
            for i in range(0, len(events), every):
                for fd, ev in events[i : i + every]:
                    cb = get(fd)
                    if cb is not None:
                        cb(ev)
                now = monotonic_ns()
                while timers and timers[0][0] <= now:
                    entry = pop(timers)
                    fn = entry[2]
                    if fn is not None:
                        fn(*entry[3])

    def close(self) -> None:
        for h in list(self._handlers.values()):
            closer = getattr(h, "close", None)
            if closer is not None:
                closer()
        self._handlers.clear()
        self._ep.close()
        self.closed = True


class Stream:
    """A non-blocking TCP connection registered with a Reactor.

    Subclasses implement ``on_data(data, now_ns)`` and optionally ``on_connected()`` and
    ``on_closed()``. ``send`` writes immediately and buffers only what the kernel refuses.
    """

    def __init__(self, reactor: Reactor, sock: socket.socket | None = None) -> None:
        self.reactor = reactor
        self.sock = sock
        self.fd = -1
        self._out: bytearray | None = None
        self.connecting = False
        self.closed = False
        self.backlog_drops = 0
        self.stamp_rx = getattr(reactor, "stamp_rx", False)
        if sock is not None:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.stamp_rx:
                enable_rx_stamps(sock)
            self.fd = sock.fileno()
            reactor.register(self.fd, self, EPOLLIN)

    def connect(self, host: str, port: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.stamp_rx:
            enable_rx_stamps(sock)
        self.sock = sock
        self.fd = sock.fileno()
        self.connecting = True
        err = sock.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            self.connecting = False
            self.reactor.call_later(0, self._fail_connect, err)
            return
        self.reactor.register(self.fd, self, EPOLLIN | EPOLLOUT)

    def _fail_connect(self, err: int) -> None:
        self.on_connect_failed(OSError(err, os.strerror(err)))
        self.close()

    def on_connected(self) -> None:  # pragma: no cover - overridden
        pass

    def on_connect_failed(self, exc: OSError) -> None:
        pass

    def on_data(self, data: bytes, now: int) -> None:  # pragma: no cover - overridden
        pass

    def on_closed(self) -> None:
        pass

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if self._out is not None or self.connecting:
            if self._out is None:
                self._out = bytearray()
            if len(self._out) > MAX_BACKLOG:
                self.backlog_drops += 1
                self.close()
                return
            self._out += data
            return
        try:
            n = self.sock.send(data)  # type: ignore[union-attr]
        except BlockingIOError:
            n = 0
        except OSError:
            self.close()
            return
        if n < len(data):
            self._out = bytearray(data[n:])
            self.reactor.modify(self.fd, EPOLLIN | EPOLLOUT)

    def _flush(self) -> None:
        out = self._out
        if out is None:
            self.reactor.modify(self.fd, EPOLLIN)
            return
        try:
            n = self.sock.send(out)  # type: ignore[union-attr]
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        del out[:n]
        if not out:
            self._out = None
            self.reactor.modify(self.fd, EPOLLIN)

    def on_event(self, ev: int) -> None:
        if ev == EPOLLIN and not self.connecting:  # the hot case: data to read
            self._read()
            return
        if self.connecting:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # type: ignore
            self.connecting = False
            if err:
                self.on_connect_failed(OSError(err, os.strerror(err)))
                self.close()
                return
            self.on_connected()
            if self.closed:
                return
            if self._out is None:
                self.reactor.modify(self.fd, EPOLLIN)
        if ev & EPOLLOUT:
            self._flush()
            if self.closed:
                return
        if ev & _EPOLL_READ:
            self._read()

    def _recv(self) -> tuple[int, int]:
        """One read into the shared buffer: (bytes, arrival time); (0, _) at EOF or on a
        socket error, (-1, _) when nothing is there."""
        try:
            if self.stamp_rx:
                return recv_stamped(self.sock, _RBUF)  # type: ignore[arg-type]
            n = self.sock.recv_into(_RBUF)  # type: ignore[union-attr]
        except BlockingIOError:
            return -1, 0
        except OSError:
            return 0, 0
        return n, monotonic_ns()

    def _read(self) -> None:
        n, now = self._recv()
        if n > 0:
            self.on_data(_RVIEW[:n].tobytes(), now)
        elif n == 0:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.reactor.unregister(self.fd)
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.on_closed()


class Listener:
    """Accepts connections and hands each socket to ``factory(reactor, sock)``."""

    def __init__(
        self, reactor: Reactor, factory: Callable, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.reactor = reactor
        self.factory = factory
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(4096)
        sock.setblocking(False)
        self.sock = sock
        self.host, self.port = sock.getsockname()[:2]
        self.closed = False
        reactor.register(sock.fileno(), self, EPOLLIN)

    def on_event(self, ev: int) -> None:
        for _ in range(64):
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.factory(self.reactor, conn)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.reactor.unregister(self.sock.fileno())
            self.sock.close()


class HttpConn(Stream):
    """Server side of one HTTP/1.1 connection that may upgrade to WebSocket.

    ``app.on_request(conn, method, path, headers, body)`` answers with
    ``conn.respond(...)`` or ``conn.accept_websocket()``; after an upgrade, whole messages
    go to ``conn.on_ws_message(opcode, payload, now)`` which the app assigns, and close
    frames are answered here.
    """

    def __init__(self, reactor: Reactor, sock: socket.socket, app: object) -> None:
        super().__init__(reactor, sock)
        self.app = app
        self._head = b""
        self.ws: FrameReader | None = None
        self.ws_close_sent = False
        self.on_ws_message: Callable[[int, bytes, int], None] | None = None
        self.on_ws_closed: Callable[[], None] | None = None

    def on_data(self, data: bytes, now: int) -> None:
        if self.ws is not None:
            self._on_ws_data(data, now)
            return
        self._head += data
        parsed = parse_head(self._head)
        if parsed is None:
            return
        first, headers, body_at = parsed
        length = int(headers.get("content-length", "0") or 0)
        if len(self._head) - body_at < length:
            return
        body = self._head[body_at : body_at + length]
        rest = self._head[body_at + length :]
        self._head = b""
        method, _, target = first.partition(" ")
        path = target.split(" ", 1)[0]
        self.app.on_request(self, method, path, headers, body)  # type: ignore[attr-defined]
        if rest and self.ws is not None:
            self._on_ws_data(rest, now)

    def respond(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        reason = {200: "OK", 403: "Forbidden", 404: "Not Found"}.get(status, "Status")
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        self.send(head + body)
        self.close_after_flush()

    def close_after_flush(self) -> None:
        # Responses are tiny; a loopback send of a few hundred bytes completes at once.
        self.close()

    def accept_websocket(self, headers: dict[str, str], first: bytes = b"") -> None:
        accept = ws_accept_key(headers.get("sec-websocket-key", ""))
        self.send(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            ).encode()
            + first
        )
        self.ws = FrameReader()
        # From now on every read is WebSocket data: skip the HTTP dispatch per read.
        self.on_data = self._on_ws_data  # type: ignore[method-assign]
        if not self.closed:
            self.reactor.set_callback(self.fd, self._ws_event)

    def _ws_event(self, ev: int) -> None:
        """``on_event`` after the upgrade. Hot case (50 times a second per call): one
        read holding exactly one masked data frame with a 16-bit length, delivered
        straight from the receive buffer; anything else takes the general path."""
        if ev != EPOLLIN:
            self.on_event(ev)
            return
        n, now = self._recv()
        if n <= 0:
            if n == 0:
                self.close()
            return
        b0 = _RBUF[0]
        if (
            n > 8
            and _RBUF[1] == 0xFE
            and (b0 == 0x81 or b0 == 0x82)
            and (_RBUF[2] << 8 | _RBUF[3]) + 8 == n
            and not self.ws._buf  # type: ignore[union-attr]
            and self.on_ws_message is not None
        ):
            self.on_ws_message(b0 & 0x0F, unmask(_RVIEW[8:n].tobytes(), _RVIEW[4:8].tobytes()), now)
            return
        self._on_ws_data(_RVIEW[:n].tobytes(), now)

    def _on_ws_data(self, data: bytes, now: int) -> None:
        deliver = self.on_ws_message or (lambda op, payload, now: None)
        for op, payload in self.ws.feed_to(data, deliver, now):  # type: ignore[union-attr]
            if op == OP_PING:
                self.send(frame(payload, OP_PONG))
            elif op == OP_CLOSE:
                if not self.ws_close_sent:
                    self.ws_close_sent = True
                    self.send(frame(payload[:2] or close_payload(1000), OP_CLOSE))
                self.close()
                return

    def ws_close(self, code: int = 1000) -> None:
        if not self.ws_close_sent and not self.closed:
            self.ws_close_sent = True
            self.send(frame(close_payload(code), OP_CLOSE))

    def on_closed(self) -> None:
        if self.on_ws_closed is not None:
            self.on_ws_closed()


class WsClient(Stream):
    """Client side of a WebSocket: connect, upgrade, then whole messages to
    ``on_message(opcode, payload, now)``. Frames are sent with the zero mask key."""

    def __init__(
        self, reactor: Reactor, host: str, port: int, path: str, headers: dict[str, str]
    ) -> None:
        super().__init__(reactor)
        self.host = host
        self.port = port
        self.path = path
        self.extra_headers = headers
        self.reader: FrameReader | None = None
        self._resp = b""
        self.close_sent = False
        self.upgraded = False

    def start(self) -> None:
        self.connect(self.host, self.port)

    def on_connected(self) -> None:
        lines = [
            f"GET {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {new_ws_key()}",
            "Sec-WebSocket-Version: 13",
        ]
        lines += [f"{k}: {v}" for k, v in self.extra_headers.items()]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode())

    def on_data(self, data: bytes, now: int) -> None:
        if self.reader is None:
            self._resp += data
            parsed = parse_head(self._resp)
            if parsed is None:
                return
            first, _headers, body_at = parsed
            rest = self._resp[body_at:]
            self._resp = b""
            if " 101 " not in first + " ":
                self.on_upgrade_failed(first)
                self.close()
                return
            self.reader = FrameReader()
            self.upgraded = True
            self.on_upgraded(now)
            if not rest or self.closed:
                return
            data = rest
        for op, payload in self.reader.feed(data):
            if op == OP_TEXT or op == OP_BINARY:
                self.on_message(op, payload, now)
            elif op == OP_PING:
                self.send(frame(payload, OP_PONG, masked=True))
            elif op == OP_CLOSE:
                self.on_remote_close(payload, now)
                if not self.close_sent:
                    self.close_sent = True
                    self.send(frame(payload[:2] or close_payload(1000), OP_CLOSE, masked=True))
                self.close()
                return
            if self.closed:
                return

    def ws_close(self, code: int = 1000) -> None:
        if not self.close_sent and not self.closed:
            self.close_sent = True
            self.send(frame(close_payload(code), OP_CLOSE, masked=True))

    def on_upgraded(self, now: int) -> None:
        pass

    def on_upgrade_failed(self, status_line: str) -> None:
        pass

    def on_message(self, opcode: int, payload: bytes, now: int) -> None:
        pass

    def on_remote_close(self, payload: bytes, now: int) -> None:
        pass


class HttpRequest(Stream):
    """One non-blocking HTTP/1.1 request; ``callback(status, headers, body)`` or
    ``callback(None, {}, error_text)`` on failure."""

    def __init__(
        self,
        reactor: Reactor,
        host: str,
        port: int,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        callback: Callable,
    ) -> None:
        super().__init__(reactor)
        self._req = self._build(host, port, method, path, headers, body)
        self._resp = b""
        self._callback: Callable | None = callback
        self.connect(host, port)

    @staticmethod
    def _build(host, port, method, path, headers, body) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    def on_connected(self) -> None:
        self.send(self._req)

    def on_connect_failed(self, exc: OSError) -> None:
        self._finish(None, {}, str(exc).encode())

    def on_data(self, data: bytes, now: int) -> None:
        self._resp += data
        parsed = parse_head(self._resp)
        if parsed is None:
            return
        _first, headers, body_at = parsed
        length = headers.get("content-length")
        if length is not None and len(self._resp) - body_at >= int(length):
            self._complete()

    def _complete(self) -> None:
        parsed = parse_head(self._resp)
        if parsed is None:
            self._finish(None, {}, b"connection closed before response")
            return
        first, headers, body_at = parsed
        body = self._resp[body_at:]
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = _dechunk(body)
        elif "content-length" in headers:
            body = body[: int(headers["content-length"])]
        try:
            status = int(first.split(" ", 2)[1])
        except (IndexError, ValueError):
            status = None
        self._finish(status, headers, body)

    def _finish(self, status, headers, body) -> None:
        cb, self._callback = self._callback, None
        if cb is not None:
            cb(status, headers, body)
        self.close()

    def on_closed(self) -> None:
        if self._callback is not None:
            self._complete()


def _dechunk(body: bytes) -> bytes:
    out = []
    pos = 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            break
        size = int(body[pos:eol].split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(body[eol + 2 : eol + 2 + size])
        pos = eol + 2 + size + 2
    return b"".join(out)


class Ticker:
    """Drives many periodic members with one timer per phase slot.

    The period is split into ``slots`` phases; each member sits in one slot and gets
    ``tick(now)`` once per period. Spreading members over phases keeps the send load
    smooth (Twilio's calls are not phase-aligned either), and one heap entry per slot
    instead of per member keeps timer cost flat as calls are added. Slots are scheduled
    from their previous due time, not from "now", so a late loop catches up instead of
    drifting; the lateness of every firing is recorded to judge the generator itself.
    """

    def __init__(self, reactor: Reactor, period_ns: int, slots: int) -> None:
        self.reactor = reactor
        self.period = period_ns
        self.nslots = slots
        self.step = period_ns // slots
        self.slots: list[list] = [[] for _ in range(slots)]
        self.lateness: list[int] = []
        self.record = False
        self.base = monotonic_ns()
        self.running = True
        for i in range(slots):
            reactor.call_at(self.base + i * self.step, self._fire, i, self.base + i * self.step)

    def join(self, member: object, first_at: int | None = None) -> None:
        """Add ``member``; its first tick is the slot firing at or after ``first_at``."""
        t = monotonic_ns() if first_at is None else first_at
        idx = -(-(t - self.base) // self.step) % self.nslots
        self.slots[idx].append(member)

    def leave(self, member: object) -> None:
        for slot in self.slots:
            if member in slot:
                slot.remove(member)
                return

    def _fire(self, i: int, due: int) -> None:
        if not self.running:
            return
        now = monotonic_ns()
        if self.record:
            self.lateness.append(now - due)
        members = self.slots[i]
        if members:
            for m in tuple(members):
                m.tick(now)
        self.reactor.call_at(due + self.period, self._fire, i, due + self.period)

    def stop(self) -> None:
        self.running = False
