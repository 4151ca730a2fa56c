"""The relay's one listener: webhooks and the media WebSocket on one port.

Twilio needs one public port (one tunnel, one TLS terminator), so both kinds of traffic share
it. Each accepted connection's request head is read here: ``GET /twilio/stream`` with a
WebSocket upgrade goes to the lean media path (``relay.media.websocket`` +
``relay.media.call``); every other request is handed, with the bytes already read, to
Hypercorn's Trio ``TCPServer``
running the Quart-Trio app. The media path thus skips ASGI entirely (measured ~2-3x cheaper
per message, see README), while webhooks get a full HTTP server.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from ..config import Config
from ..control import background
from ..control.cluster import parse_tag
from ..control.directory import Account
from ..errors import RemoteProtocolError
from ..media.call import Call
from ..media.reactor import Reactor
from ..media.websocket import WebSocket, parse_head, read_http_head, server_handshake_response
from ..protocol.signature import validate_signature
from ..state import RelayState
from .app import create_app
from .handoff import Handoff
from .workers import open_listeners

log = logging.getLogger("relay.http.server")

HEAD_TIMEOUT_S = 10.0


class _PrefixedStream(trio.abc.HalfCloseableStream):
    """A SocketStream whose first ``receive_some`` returns bytes we already consumed."""

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix
        self.socket = stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            await trio.lowlevel.checkpoint()
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


def _plain_response(status: str, text: str) -> bytes:
    body = text.encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


class RelayServer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.state = RelayState(cfg)
        self.app = create_app(self.state)
        self._hconfig = HypercornConfig()
        self._hconfig.accesslog = None
        self._hconfig.errorlog = logging.getLogger("relay.hypercorn")
        self._app_wrapper = wrap_app(self.app, self._hconfig.wsgi_max_body_size, None)
        self._context = WorkerContext(None)
        self._lifespan_state: dict[str, Any] = {}
        self.ports: list[int] = []
        #: relay serve --workers N: connections of calls another worker answered
        self.handoff: Handoff | None = None

    async def serve(
        self, *, task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        lifespan = Lifespan(self._app_wrapper, self._hconfig, self._lifespan_state)
        try:
            await self._serve(lifespan, task_status)
        finally:
            # Only once every task (the store's worker threads included: a thread hop is
            # waited for, not abandoned) has ended: disposing the engine under a running
            # query crashes the driver.
            self.state.control.close()

    async def _serve(self, lifespan: Lifespan, task_status: trio.TaskStatus[list[int]]) -> None:
        async with trio.open_nursery() as lifespan_nursery:
            if self.cfg.media.reactor and Reactor.available():
                reactor = self.state.reactor = Reactor(idle_clock=self.cfg.media.reactor_idle_clock)
                self.state.metrics.reactor_stats = lambda: (
                    reactor.wakeups,
                    reactor.dispatched,
                    reactor.sweep.served,
                )
                await lifespan_nursery.start(
                    self.state.reactor.run, self.cfg.media.reactor_coalesce_ms / 1000.0
                )
            await lifespan_nursery.start(self.state.headroom.run)
            await lifespan_nursery.start(self.state.gc.run)
            history = self.state.control.history
            if history is not None:
                await lifespan_nursery.start(history.run)
            # warm agent sessions, recordings, post-call webhooks (relay/control/background.py)
            await lifespan_nursery.start(background.run, self.state)
            await lifespan_nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            worker = self.state.worker
            if worker.clustered:
                self.handoff = Handoff(worker.run_dir, worker.index, self.state.metrics.handoffs)
                await lifespan_nursery.start(self.handoff.run, self._serve_handed)
            listeners = await open_listeners(
                self.cfg.server.host, self.cfg.server.port, reuse_port=worker.clustered
            )
            self.ports = [ln.socket.getsockname()[1] for ln in listeners]
            if not self.cfg.server.public_url:
                # port 0 (tests, demo): the public URL is what we actually bound
                self.cfg.server.public_url = f"http://{self.cfg.server.host}:{self.ports[0]}"
            log.info(
                "relay listening on %s:%s (public URL %s)",
                self.cfg.server.host,
                self.ports[0],
                self.cfg.public_url,
            )
            self.state.gc.freeze_startup()
            task_status.started(self.ports)
            try:
                await trio.serve_listeners(self._handle, listeners)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await lifespan.wait_for_shutdown()
                    except (trio.ClosedResourceError, trio.BrokenResourceError):
                        pass  # the lifespan task was already cancelled with us
                    # recordings of the calls that just ended (their records follow)
                    if not await self.state.recordings.flush(1.0):
                        log.error("recordings: writes still queued at shutdown were lost")
                    if history is not None and not await history.flush(5.0):
                        log.error("call history: writes still queued at shutdown were lost")
                lifespan_nursery.cancel_scope.cancel()
                if self.handoff is not None:
                    self.handoff.close()
                    log.info("connections handed between workers: %s", dict(self.handoff.counts))

    async def _handle(self, stream: trio.SocketStream) -> None:
        # trio.serve_listeners lets a handler's exception end the whole server. Peer input
        # never raises out of here by design; this is the net for our own bugs, so one
        # broken connection stays one broken connection (logged, counted, closed).
        try:
            await self._serve_connection(stream)
        except Exception:
            self.state.metrics.error("internal")
            log.exception("internal error on a connection; it was closed, others continue")
            await trio.aclose_forcefully(stream)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            with trio.fail_after(HEAD_TIMEOUT_S):
                head, rest = await read_http_head(stream)
        except (trio.TooSlowError, RemoteProtocolError, trio.BrokenResourceError, OSError):
            await trio.aclose_forcefully(stream)
            return
        await self._dispatch(stream, head, rest, handed=False)

    async def _serve_handed(self, stream: trio.SocketStream, prefix: bytes) -> None:
        """A connection another worker accepted for a call this one answered."""
        head, sep, rest = prefix.partition(b"\r\n\r\n")
        if not sep:
            await trio.aclose_forcefully(stream)
            return
        try:
            await self._dispatch(stream, head, rest, handed=True)
        except Exception:
            self.state.metrics.error("internal")
            log.exception("internal error on a handed-over connection; it was closed")
            await trio.aclose_forcefully(stream)

    async def _dispatch(
        self, stream: trio.SocketStream, head: bytes, rest: bytes, *, handed: bool
    ) -> None:
        first, headers = parse_head(head)
        parts = first.split(" ")
        target = parts[1] if len(parts) == 3 else ""
        path = target.split("?", 1)[0]
        if self.handoff is not None and not handed and path.startswith("/twilio/"):
            # /…/w3: a request of a call worker 3 answered (relay/http/handoff.py)
            owner = parse_tag(path.rsplit("/", 1)[-1], self.state.worker.count)
            if owner is not None and owner != self.state.worker.index:
                if await self.handoff.send(owner, stream, head + b"\r\n\r\n" + rest):
                    return
        if path == "/twilio/stream" or path.startswith("/twilio/stream/"):
            await self._media(stream, parts[0], path, headers, rest)
            return
        if path.startswith("/twilio/conversation/"):  # ConversationRelay: lean path too
            await self._conversation_relay(stream, parts[0], path, headers, rest)
            return
        server = TCPServer(
            self._app_wrapper,
            self._hconfig,
            self._context,
            ConnectionState(self._lifespan_state.copy()),
            _PrefixedStream(stream, head + b"\r\n\r\n" + rest),  # type: ignore[arg-type]
        )
        try:
            await server.run()
        finally:
            # Hypercorn's TCPServer and its protocol hold each other (the protocol's send
            # is the server's bound method): a cycle per webhook connection that would
            # otherwise wait for the cyclic collector (relay/gcpolicy.py).
            server.__dict__.pop("protocol", None)

    async def _refuse(
        self, stream: trio.SocketStream, status: str, kind: str, message: str
    ) -> None:
        self.state.metrics.error(kind)
        log.warning("media stream upgrade refused (%s): %s", status, message)
        with trio.move_on_after(1):
            try:
                await stream.send_all(_plain_response(status, message + "\n"))
            except (trio.BrokenResourceError, OSError):
                pass
        await trio.aclose_forcefully(stream)

    async def _is_upgrade(
        self, stream: trio.SocketStream, method: str, headers: dict[str, str]
    ) -> bool:
        """A well-formed RFC 6455 upgrade request; otherwise refused with 400."""
        if (
            method == "GET"
            and headers.get("upgrade", "").lower() == "websocket"
            and "upgrade" in headers.get("connection", "").lower()
            and headers.get("sec-websocket-version") == "13"
            and headers.get("sec-websocket-key")
        ):
            return True
        await self._refuse(stream, "400 Bad Request", "ws_bad_upgrade", "not a WebSocket upgrade")
        return False

    async def _accept_signed(
        self,
        stream: trio.SocketStream,
        account: Account | None,
        url: str,
        signature: str | None,
        headers: dict[str, str],
        rest: bytes,
    ) -> WebSocket | None:
        """Check Twilio's signature of ``url`` with ``account``'s token and the process's
        call capacity, then complete the handshake; None when refused (already answered)."""
        cfg = self.cfg
        if account is None or not validate_signature(account.auth_token, url, None, signature):
            await self._refuse(
                stream,
                "403 Forbidden",
                "bad_signature",
                f"{'missing' if not signature else 'invalid'} x-twilio-signature",
            )
            return None
        if self.state.metrics.active_calls >= cfg.server.max_calls:
            self.state.metrics.calls_rejected["concurrent_limit"] += 1
            await self._refuse(stream, "503 Service Unavailable", "capacity", "too many calls")
            return None
        try:
            with trio.move_on_after(cfg.media.send_timeout_s):
                await stream.send_all(server_handshake_response(headers["sec-websocket-key"]))
        except (trio.BrokenResourceError, OSError):
            await trio.aclose_forcefully(stream)
            return None
        return WebSocket(
            stream,
            client_side=False,
            max_message=cfg.media.max_message_bytes,
            send_timeout=cfg.media.send_timeout_s,
            leftover=rest,
        )

    async def _media(
        self,
        stream: trio.SocketStream,
        method: str,
        path: str,
        headers: dict[str, str],
        rest: bytes,
    ) -> None:
        cfg = self.cfg
        if not await self._is_upgrade(stream, method, headers):
            return
        # Twilio signs the wss:// URL with no query string; an unsigned stream endpoint
        # would let anyone run agent sessions on the deployer's API keys (toll fraud).
        # /twilio/stream/{AccountSid}: the account whose token signed it (the upgrade has
        # no form fields to name it); plain /twilio/stream: the relay.toml account.
        # /…/w3 (relay serve --workers N): the answering worker's tag, signed with the rest
        tail = path[len("/twilio/stream/") :] if path != "/twilio/stream" else ""
        hint, _, last = tail.rpartition("/") if "/" in tail else ("", "", tail)
        if parse_tag(last, self.state.worker.count) is None:
            hint = tail
        signature = headers.get("x-twilio-signature")
        account = (
            await self.state.control.directory.stream_account(hint)
            if len(hint) <= 64 and "/" not in hint
            else None
        )
        url = cfg.stream_url + (f"/{tail}" if tail else "")
        ws = await self._accept_signed(stream, account, url, signature, headers, rest)
        if ws is None or account is None:
            return
        call = Call(ws, self.state, account.tenant_id)
        self.state.calls.add(call)
        try:
            await call.run()
        finally:
            self.state.calls.discard(call)

    async def _conversation_relay(
        self,
        stream: trio.SocketStream,
        method: str,
        path: str,
        headers: dict[str, str],
        rest: bytes,
    ) -> None:
        """``/twilio/conversation/{AccountSid}``: ConversationRelay's text WebSocket, checked
        like the media stream (Twilio signs the wss:// URL with that account's token)."""
        from ..agents.twilio_speech import conversation_relay

        cfg = self.cfg
        if not await self._is_upgrade(stream, method, headers):
            return
        hint = path[len("/twilio/conversation/") :]
        signature = headers.get("x-twilio-signature")
        account = (
            await self.state.control.directory.account(hint)
            if 0 < len(hint) <= 64 and "/" not in hint
            else None
        )
        url = cfg.stream_url.removesuffix("/twilio/stream") + path
        ws = await self._accept_signed(stream, account, url, signature, headers, rest)
        if ws is None or account is None:
            return
        await conversation_relay.serve(ws, self.state, account)


async def run_server(
    cfg: Config, *, task_status: trio.TaskStatus[RelayServer] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a relay until cancelled; ``task_status.started`` receives the RelayServer."""
    server = RelayServer(cfg)

    async def _serve(task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED) -> None:
        await server.serve(task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(_serve)
        task_status.started(server)


__all__ = ["RelayServer", "run_server"]
