"""Server plumbing shared by the fake vendor agents (tests/fake_*.py).

Two kinds of fake on purpose. tests/fake_openai.py, fake_elevenlabs.py and fake_gemini.py
serve with ``trio-websocket``: a WebSocket implementation the relay did not write, so the
relay's client is also checked against someone else's framing, pings and close handshake.
For those: :func:`serve_trio_websocket` (the listener), :func:`request_parts`,
:class:`TrioWsPeer` (one connection's close/abort/stall controls and JSON read loop) and
:class:`Notifier` (wait until a predicate holds). Audio for all of them: :func:`tone`,
:func:`sine`, :func:`ulaw_encode`.

tests/fake_assemblyai.py and fake_deepgram.py need failure modes trio-websocket cannot
produce, so :class:`FakeWsServer` is built on the relay's own sans-IO WebSocket (server
side) over ``trio.serve_tcp``, and a test controls every failure mode a cloud agent has:

* ``stall()``: stop reading (no pongs, TCP backpressure once buffers fill); what is being
  sent keeps going (a peer whose reader is wedged);
* ``vanish()``: stop reading *and* sending, the TCP connection left open with no FIN or RST
  (a peer that is gone: crashed host, dead NAT, cut network path);
* ``abort()``: the TCP connection closes without a close frame;
* ``close(code)``: a proper close frame;
* pings of its own (``ping_interval_s``) and, with ``pong_timeout_s``, a close (1011) when
  the relay stops answering them, as real servers do.

Handshakes are checked by the subclass (``authorize``); refusals are HTTP errors, recorded.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import parse_qsl

import numpy as np
import orjson
import trio
from trio_websocket import ConnectionClosed as WSConnectionClosed
from trio_websocket import WebSocketConnection, WebSocketRequest, serve_websocket

from relay.errors import ConnectionClosed
from relay.media.websocket import (
    WebSocket,
    parse_head,
    read_http_head,
    server_handshake_response,
)

__all__ = [
    "FakeWsOptions",
    "FakeWsServer",
    "Notifier",
    "TrioWsPeer",
    "WSConnectionClosed",
    "WsPeer",
    "request_parts",
    "serve_fake",
    "serve_trio_fake",
    "serve_trio_websocket",
    "sine",
    "split_target",
    "tone",
    "ulaw_encode",
]


# --- audio ---------------------------------------------------------------------------------
def ulaw_encode(pcm: bytes | np.ndarray) -> bytes:
    """G.711 μ-law encoding of PCM16 (bytes or int16 samples; for generated test audio)."""
    x = np.frombuffer(pcm, dtype="<i2") if isinstance(pcm, bytes | bytearray) else pcm
    x = x.astype(np.int32)
    sign = np.where(x < 0, 0x80, 0)
    mag = np.minimum(np.abs(x), 32635) + 0x84
    exp = np.clip(np.floor(np.log2(mag)).astype(np.int32) - 7, 0, 7)
    mant = (mag >> (exp + 3)) & 0x0F
    return (~(sign | (exp << 4) | mant) & 0xFF).astype(np.uint8).tobytes()


def sine(
    ms: float, rate: int, hz: float = 440.0, amplitude: float = 0.3, phase_ms: float = 0.0
) -> np.ndarray:
    """``ms`` of a sine as int16 samples at ``rate``."""
    n = int(rate * ms // 1000)
    t = (np.arange(n) + phase_ms * rate / 1000) / rate
    return (np.sin(2 * math.pi * hz * t) * amplitude * 32767).astype("<i2")


def tone(
    ms: int, fmt: str, hz: float = 440.0, amplitude: float = 0.3, phase_ms: float = 0.0
) -> bytes:
    """``ms`` of a sine tone in ``fmt`` ("pcmu" = μ-law 8 kHz, "pcm24k" = PCM16 24 kHz)."""
    if fmt == "pcmu":
        return ulaw_encode(sine(ms, 8000, hz, amplitude, phase_ms))
    return sine(ms, 24000, hz, amplitude, phase_ms).tobytes()


# --- waiting for state -------------------------------------------------------------------------
class Notifier:
    """State that tests wait on: :meth:`_notify` after every change wakes
    :meth:`_wait_until`. Subclasses (dataclasses) hold ``_changed: trio.Event``."""

    _changed: trio.Event

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_until(self, condition: Callable[[], bool], timeout: float) -> None:
        with trio.fail_after(timeout):
            while not condition():
                await self._changed.wait()


# --- trio-websocket fakes -------------------------------------------------------------------
def split_target(target: str) -> tuple[str, dict[str, str]]:
    """A request target -> (path, query parameters)."""
    path, _, query = target.partition("?")
    return path, dict(parse_qsl(query, keep_blank_values=True))


def request_parts(request: WebSocketRequest) -> tuple[dict[str, str], str, dict[str, str]]:
    """(headers with lowercase names, path, query parameters) of an upgrade request."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
    path, query = split_target(request.path)
    return headers, path, query


@asynccontextmanager
async def serve_trio_websocket(
    handler: Callable[[WebSocketRequest], Awaitable[None]],
) -> AsyncIterator[int]:
    """Serve ``handler`` with trio-websocket on 127.0.0.1 (random port, yielded) for the
    ``async with`` body; an error in the body comes out as itself, not an ExceptionGroup."""
    body_error: Exception | None = None
    async with trio.open_nursery() as nursery:
        ws_server = await nursery.start(
            partial(
                serve_websocket,
                handler,
                "127.0.0.1",
                0,
                None,
                max_message_size=16 * 1024 * 1024,
                connect_timeout=5,
                disconnect_timeout=1,
            )
        )
        try:
            yield ws_server.port
        except Exception as exc:  # re-raised outside the nursery: no ExceptionGroup
            body_error = exc
        finally:
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error


class TrioFake(Protocol):
    port: int

    async def handler(self, request: WebSocketRequest) -> None: ...


F = TypeVar("F", bound=TrioFake)


@asynccontextmanager
async def serve_trio_fake(server: F) -> AsyncIterator[F]:
    """Serve a trio-websocket fake (its ``handler``) for the ``async with`` body; its
    ``port`` is set before the body runs."""
    async with serve_trio_websocket(server.handler) as port:
        server.port = port
        yield server


@dataclass(kw_only=True)
class TrioWsPeer(Notifier):
    """The fake vendor's end of one trio-websocket connection, as a base of dataclasses
    that hold the connection as ``ws``. Subclasses implement :meth:`_on_message` (one JSON
    object from the relay) and :meth:`refuse` (what the vendor does with a violation, which
    records it in ``refused``), and may override :meth:`_stop_output` (cancel what is being
    sent when the peer stalls)."""

    #: what the relay sent (JSON objects) and what the fake sent it
    received: list[dict[str, Any]] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    #: contract violations the fake refused (the reason of each)
    refused: list[str] = field(default_factory=list)
    closed: bool = False
    close_code: int | None = None
    close_reason: str = ""
    _changed: trio.Event = field(default_factory=trio.Event)
    _stalled: trio.Event | None = None
    _nursery: trio.Nursery | None = None
    if TYPE_CHECKING:  # a field of the subclass (positional there), not of this base
        ws: WebSocketConnection

    async def _on_message(self, msg: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    async def refuse(self, reason: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _stop_output(self) -> None:
        """Hook: a stall stops what is being sent (a reply in progress)."""

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send_message(data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self._mark_closed(code, reason)  # first: the read loop sees the close too
        with trio.move_on_after(2):
            await self.ws.aclose(code, reason)

    async def abort(self) -> None:
        """The TCP connection dies without a close frame."""
        await trio.aclose_forcefully(self.ws._stream)
        self._mark_closed(1006, "aborted by test")

    def stall(self) -> None:
        """Stop reading and stop sending: a peer that vanished without FIN or RST."""
        if self._stalled is None:
            self._stalled = trio.Event()
        self._stop_output()

    def resume(self) -> None:
        if self._stalled is not None:
            self._stalled.set()
            self._stalled = None

    def _mark_closed(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_code = code
            self.close_reason = reason
        self._notify()

    async def _safely(self, fn: Callable[[], Awaitable[Any]]) -> None:
        """Run a scripted send in the background; the connection closing ends it."""
        try:
            await fn()
        except WSConnectionClosed:
            pass

    def _start(self, fn: Callable[[], Awaitable[Any]]) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._safely, fn)

    async def _read_loop(self) -> None:
        """Read JSON objects from the relay (honouring a stall); anything else is refused."""
        while True:
            if self._stalled is not None:
                await self._stalled.wait()
            message = await self.ws.get_message()
            try:
                msg = orjson.loads(message)
            except orjson.JSONDecodeError:
                await self.refuse("invalid JSON")
                return
            if not isinstance(msg, dict):
                await self.refuse("message must be a JSON object")
                return
            self.received.append(msg)
            await self._on_message(msg)
            self._notify()

    async def _serve(self, *background: Callable[[], Awaitable[Any]]) -> None:
        """Read until the connection ends (``background`` tasks run meanwhile); the close
        code and reason are recorded."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for task in background:
                # a pinger can race the peer's close; the read loop records the close code
                nursery.start_soon(self._safely, task)
            try:
                await self._read_loop()
            except WSConnectionClosed as exc:
                code = exc.reason.code if exc.reason is not None else 1006
                why = exc.reason.reason if exc.reason is not None else None
                self._mark_closed(code, why or "")
            nursery.cancel_scope.cancel()


# --- relay-websocket fakes ------------------------------------------------------------------


@dataclass
class FakeWsOptions:
    api_key: str = "test-key-0123456789abcdef"
    #: Refuse every handshake with this HTTP status.
    reject_status: int | None = None
    #: Accept TCP, never answer the handshake.
    hang_handshake: bool = False
    #: Server-side pings; with pong_timeout_s, close 1011 when pongs stop coming.
    ping_interval_s: float | None = None
    pong_timeout_s: float | None = None


class WsPeer:
    """One accepted WebSocket connection with failure controls."""

    def __init__(
        self,
        server: FakeWsServer,
        ws: WebSocket,
        headers: dict[str, str],
        path: str,
        query: dict[str, str],
    ) -> None:
        self.server = server
        self.ws = ws
        self.headers = headers
        self.path = path
        self.query = query
        self.nursery: trio.Nursery | None = None
        self.closed = False
        self.close_code: int | None = None
        self.stalled = False
        self.vanished = False
        self.pings_sent = 0
        self.ping_timeouts = 0
        self._resume: trio.Event | None = None
        self._read_scope: trio.CancelScope | None = None
        self._done = trio.Event()

    # -- failure controls -------------------------------------------------------------------
    def stall(self) -> None:
        """Stop reading (after the message in hand); sends in progress go on."""
        self.stalled = True
        if self._resume is None:
            self._resume = trio.Event()
        if self._read_scope is not None:
            self._read_scope.cancel()

    def resume_reading(self) -> None:
        self.stalled = False
        if self._resume is not None:
            self._resume.set()
            self._resume = None

    def vanish(self) -> None:
        """Stop reading and sending; the TCP connection stays open (no FIN, no RST)."""
        self.vanished = True
        self.stall()

    async def abort(self) -> None:
        """The TCP connection dies without a close frame."""
        self.ws.closed = ConnectionClosed(1006, "aborted by test")
        await trio.aclose_forcefully(self.ws.stream)
        self._finish(1006)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.close_code is None:
            self.close_code = code  # whatever the reader sees while it closes
        with trio.move_on_after(2):
            await self.ws.aclose(code, reason)
        self._finish(code)

    def _finish(self, code: int | None) -> None:
        if not self.closed:
            self.closed = True
            if self.close_code is None:
                self.close_code = code
        self._done.set()
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()
        self.server.notify()

    # -- sending ------------------------------------------------------------------------------
    async def send_json(self, obj: dict[str, Any]) -> None:
        await self.send_text(orjson.dumps(obj).decode())

    async def send_text(self, text: str) -> None:
        if self.vanished or self.closed:
            return
        try:
            await self.ws.send_text(text)
        except ConnectionClosed:
            self._finish(self.ws.closed.code if self.ws.closed else 1006)

    async def send_bytes(self, data: bytes) -> None:
        if self.vanished or self.closed:
            return
        try:
            await self.ws.send_bytes(data)
        except ConnectionClosed:
            self._finish(self.ws.closed.code if self.ws.closed else 1006)

    # -- reading ------------------------------------------------------------------------------
    async def messages(self) -> AsyncIterator[str | bytes]:
        """Messages from the relay until the connection ends (honours stall/vanish: a
        receive in progress is cancelled, or it would go on answering pings)."""
        while not self.closed:
            if self._resume is not None:
                await self._resume.wait()
                continue
            batch: list[str | bytes] = []
            with trio.CancelScope() as scope:
                self._read_scope = scope
                try:
                    batch = await self.ws.receive()
                except ConnectionClosed as exc:
                    self._finish(exc.code)
                    return
            self._read_scope = None
            for message in batch:
                yield message

    async def _pinger(self) -> None:
        interval = self.server.options.ping_interval_s
        timeout = self.server.options.pong_timeout_s
        if interval is None:
            return
        while not self.closed:
            await trio.sleep(interval)
            if self.vanished or self.stalled:
                continue
            now = trio.current_time()
            if timeout is not None and self.pings_sent and now - self.ws.last_pong > timeout:
                self.ping_timeouts += 1
                await self.close(1011, "keepalive ping timeout")
                return
            try:
                self.ws.send_ping_nowait(b"fake")
                await self.ws.drain()
            except ConnectionClosed:
                return
            self.pings_sent += 1


class FakeWsServer(Notifier):
    """Accept loop, handshake and bookkeeping; subclasses implement ``authorize`` and
    ``serve_peer``."""

    path = "/"

    def __init__(self, options: FakeWsOptions) -> None:
        self.options = options
        self.port = 0
        self.peers: list[WsPeer] = []
        self.rejected: list[dict[str, Any]] = []
        self._changed = trio.Event()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{self.path}"

    @property
    def api_key(self) -> str:
        return self.options.api_key

    def notify(self) -> None:
        self._notify()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        await self._wait_until(predicate, timeout)

    def authorize(self, headers: dict[str, str], query: dict[str, str]) -> tuple[int, str] | None:
        """(status, reason) to refuse the handshake, None to accept."""
        return None

    async def serve_peer(self, peer: WsPeer) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            if self.options.hang_handshake:
                await trio.sleep_forever()
            head, rest = await read_http_head(stream)
            request_line, headers = parse_head(head)
            target = request_line.split(" ")[1] if " " in request_line else "/"
            path, query = split_target(target)
            refusal = (
                (self.options.reject_status, "rejected by test")
                if self.options.reject_status is not None
                else self.authorize(headers, query)
            )
            if refusal is None and path != self.path:
                refusal = (404, f"no such endpoint {path}")
            if refusal is not None:
                status, reason = refusal
                self.rejected.append({"status": status, "reason": reason, "headers": headers})
                self.notify()
                body = orjson.dumps({"error": reason})
                await stream.send_all(
                    f"HTTP/1.1 {status} Refused\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
                return
            await stream.send_all(server_handshake_response(headers["sec-websocket-key"]))
            ws = WebSocket(
                stream,
                client_side=False,
                max_message=16 * 1024 * 1024,
                send_timeout=5.0,
                leftover=rest,
            )
            peer = WsPeer(self, ws, headers, path, query)
            self.peers.append(peer)
            self.notify()
            try:
                async with trio.open_nursery() as nursery:
                    peer.nursery = nursery
                    nursery.start_soon(peer._pinger)
                    await self.serve_peer(peer)
                    # the handler returned: keep the connection until it ends (or vanishes)
                    await peer._done.wait()
                    nursery.cancel_scope.cancel()
            finally:
                peer._finish(peer.close_code or 1006)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed):
            pass
        finally:
            await trio.aclose_forcefully(stream)


@asynccontextmanager
async def serve_fake(server: FakeWsServer) -> AsyncIterator[Any]:
    """Run ``server`` on 127.0.0.1 (random port) for the ``async with`` body."""
    body_error: Exception | None = None
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, server._handle, 0, host="127.0.0.1")
        )
        server.port = listeners[0].socket.getsockname()[1]
        try:
            yield server
        except Exception as exc:  # re-raised outside the nursery: no ExceptionGroup
            body_error = exc
        finally:
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error
