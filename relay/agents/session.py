"""The Trio layer the WebSocket agent adapters share.

Each adapter is a sans-IO protocol core (``*_protocol.py``) plus a thin Trio layer; what
those layers have in common lives here, so an adapter keeps only what its vendor does
differently:

* :func:`opening`: the bounded setup of a session (handshake, configuration, wait for the
  vendor's "ready"), with every failure mapped to an ``AgentError`` of kind
  ``agent_connect``, ``agent_connect_timeout`` (saying which stage it waited for),
  ``agent_session`` or ``agent_protocol``, and the half-open socket closed;
* :class:`SocketAgent`: one vendor session over one ``relay.media.websocket`` connection:
  reading during setup, parsing batches with a budget of malformed messages, the engine's
  ``receive``/reactor interface, the liveness watchdog in :meth:`~SocketAgent.run`
  (:mod:`relay.agents.liveness`), closing that never raises or leaks the socket;
* :class:`SessionSocketAgent`: the same, recovering a lost connection in place when
  ``reconnect`` is on (resume the session where the vendor can, else a new session seeded
  with the conversation so far).
"""

from __future__ import annotations

import abc
import logging
import socket
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import trio

from ..errors import (
    AgentError,
    ConnectionClosed,
    LocalProtocolError,
    RelayError,
    RemoteProtocolError,
)
from ..media import websocket
from .base import Agent, AgentErrorEvent, AgentEvent, CallInfo
from .liveness import (
    DEFAULT_RECONNECT_TIMEOUT_S,
    LivenessOptions,
    is_recoverable,
    reconnect_options,
    run_connection,
)
from .options import option_int

__all__ = [
    "SessionSocketAgent",
    "Setup",
    "SocketAgent",
    "close_quietly",
    "close_socket",
    "first_fatal",
    "opening",
]

log = logging.getLogger("relay.agents.session")


class WireProtocol(Protocol):
    def parse_message(self, message: str | bytes) -> list[AgentEvent]: ...


# --- setting a session up ------------------------------------------------------------------
@dataclass
class Setup:
    """A session setup in progress (see :func:`opening`): the body records the socket once
    it exists and the ``stage`` it waits for, which the timeout message names."""

    timeout_s: float
    stage: str | None = "handshake"
    ws: websocket.WebSocket | None = None
    #: AgentError kind when the socket closes during setup (None: ``agent_connect``).
    closed_kind: str | None = None

    async def handshake(
        self,
        url: str,
        headers: Sequence[tuple[str, str]],
        *,
        send_timeout_s: float,
        then: str | None,
    ) -> websocket.WebSocket:
        """Open the WebSocket (bounded by the setup's timeout); ``then`` is the next stage."""
        self.ws = await websocket.connect(
            url, headers, timeout=self.timeout_s, send_timeout=send_timeout_s
        )
        self.stage = then
        return self.ws


@asynccontextmanager
async def opening(label: str, timeout_s: float) -> AsyncIterator[Setup]:
    """Bound a session setup by ``timeout_s`` and map its failures to ``AgentError``
    (messages start with ``label``, e.g. "OpenAI Realtime"); the socket the body opened is
    closed on any failure, cancellation included."""
    setup = Setup(timeout_s)
    try:
        with trio.fail_after(timeout_s):
            yield setup
    except trio.TooSlowError:
        await close_quietly(setup.ws)
        waiting = f" (waiting for {setup.stage})" if setup.stage else ""
        raise AgentError(
            f"{label} connect timed out after {timeout_s:g} s{waiting}",
            kind="agent_connect_timeout",
        ) from None
    except AgentError:
        await close_quietly(setup.ws)
        raise
    except (OSError, RelayError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        # relay.media.websocket.connect lets trio's BrokenResourceError through (TLS failure,
        # reset during the handshake).
        await close_quietly(setup.ws)
        kind = "agent_connect"
        if isinstance(exc, ConnectionClosed) and setup.closed_kind is not None:
            kind = setup.closed_kind
        raise AgentError(f"{label} connect failed: {exc}", kind=kind) from exc
    except ValueError as exc:  # unencodable header values, a bad URL
        await close_quietly(setup.ws)
        raise AgentError(f"{label} connect failed: {exc}", kind="agent_connect") from None
    except BaseException:
        await close_quietly(setup.ws)
        raise


def first_fatal(events: list[AgentEvent]) -> AgentErrorEvent | None:
    for event in events:
        if isinstance(event, AgentErrorEvent) and event.fatal:
            return event
    return None


# --- closing -------------------------------------------------------------------------------
async def close_quietly(
    ws: websocket.WebSocket | None, code: int = websocket.CLOSE_GOING_AWAY
) -> None:
    """Close a socket after a failed setup without hiding the original error."""
    if ws is None:
        return
    with trio.CancelScope(shield=True):
        try:
            await ws.aclose(code)
        except Exception:
            log.debug("error closing after a failed setup", exc_info=True)
        await trio.aclose_forcefully(ws.stream)


async def close_socket(ws: websocket.WebSocket, vendor: str) -> None:
    """Close ``ws`` properly if possible; never raises, never leaks the TCP socket."""
    try:
        await ws.aclose()
    except Exception:
        log.debug("%s: error while closing", vendor, exc_info=True)
    finally:
        # WebSocket.aclose skips closing TCP when it is itself cancelled (e.g. from the
        # finally of a cancelled call): make sure the socket never leaks.
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(ws.stream)


# --- one session over one socket ------------------------------------------------------------
class SocketAgent(Agent):
    """An agent speaking to its vendor over one WebSocket (``self._ws`` once connected).

    Subclasses set ``vendor`` (logs), ``label`` (error messages) and ``self.protocol`` (a
    sans-IO core with ``parse_message``), implement :meth:`connect` and the ``send_*``
    methods, and may extend :meth:`_parse` (what to do after a batch, e.g. write replies
    the core queued), :meth:`_before_close` and :meth:`_too_many_errors`.

    Malformed input: one bad message loses at most one event, so it is a non-fatal
    ``AgentErrorEvent("agent_protocol", ...)``; more than ``max_protocol_errors`` in one
    session means the peer is broken: the socket is closed (1002) and ``AgentError`` (kind
    ``agent_protocol``) raised.
    """

    vendor: ClassVar[str] = "agent"
    label: ClassVar[str] = "agent"
    protocol: WireProtocol

    def __init__(
        self, *, liveness: LivenessOptions | None = None, max_protocol_errors: int = 10
    ) -> None:
        #: how the connection is watched (relay.agents.liveness)
        self.liveness = liveness if liveness is not None else LivenessOptions()
        self.max_protocol_errors = max_protocol_errors
        self.protocol_errors = 0
        self.call: CallInfo | None = None
        self._ws: websocket.WebSocket | None = None
        self._pending: list[AgentEvent] = []
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._ws is not None and self._ws.closed is None

    def _socket(self) -> websocket.WebSocket:
        ws = self._ws
        if ws is None:
            raise LocalProtocolError(f"{type(self).__name__} used before connect()")
        return ws

    def _start(self, call: CallInfo) -> None:
        if self._ws is not None:
            raise LocalProtocolError(f"{type(self).__name__}.connect called twice")
        self.call = call

    # -- setup ----------------------------------------------------------------------------
    async def _read_setup(
        self,
        ws: websocket.WebSocket,
        ready: Callable[[], bool],
        refused: Callable[[list[AgentEvent]], AgentError | None],
    ) -> None:
        """Read ``ws`` until ``ready()``; events that arrive meanwhile are kept for
        :meth:`receive`. ``refused(events)`` returns the error that fails the setup (the
        vendor refused the session), if any; a malformed message fails it too."""
        while not ready():
            for message in await ws.receive():
                try:
                    events = self.protocol.parse_message(message)
                except RemoteProtocolError as exc:
                    raise AgentError(
                        f"{self.label} protocol error during setup: {exc}", kind="agent_protocol"
                    ) from exc
                error = refused(events)
                if error is not None:
                    try:
                        raise error
                    finally:
                        del error  # else this frame and the exception form a cycle
                self._pending += events
            await self._after_setup_batch(ws)

    async def _after_setup_batch(self, ws: websocket.WebSocket) -> None:
        """Hook: after each batch read during setup (e.g. answer the vendor's pings)."""

    # -- background work -------------------------------------------------------------------
    def _on_idle(self) -> None:
        """Keepalive when nothing was sent for ``liveness.idle_keepalive_s``."""

    def _idle_hook(self) -> Callable[[], None] | None:
        return self._on_idle if self.liveness.idle_keepalive_s is not None else None

    async def run(self) -> None:
        """Drain what the kernel did not take at once (under the send timeout) and watch
        the connection: a peer silent for ``dead_after_s`` raises AgentError
        ``agent_disconnected`` (relay.agents.liveness)."""
        await run_connection(self._socket(), self.liveness, on_idle=self._idle_hook())

    # -- receiving -------------------------------------------------------------------------
    def _parse(self, batch: list[str | bytes]) -> list[AgentEvent]:
        """Events from one batch of messages; a malformed one becomes an error event."""
        parse = self.protocol.parse_message
        events: list[AgentEvent] = []
        for message in batch:
            try:
                events += parse(message)
            except RemoteProtocolError as exc:
                events.append(self._protocol_error(exc))
        return events

    async def receive(self) -> list[AgentEvent]:
        if self._pending:
            events, self._pending = self._pending, []
            return events
        ws = self._socket()
        while True:
            events = self._parse(await ws.receive())  # ConnectionClosed when it ended
            if events:
                return events

    def reactor_socket(self) -> socket.socket | None:
        return self._socket().raw_socket

    def _spliced(
        self, parts: tuple[bytes, bytes]
    ) -> tuple[websocket.WebSocket, bytes, bytes] | None:
        """:meth:`audio_splice` of an adapter that sends caller audio as
        ``send_b64_texts_nowait`` / ``send_audio_text_nowait`` around ``parts`` on
        :meth:`_socket` (none with ``reconnect``)."""
        if self.reactor_socket() is None:
            return None
        return self._socket(), parts[0], parts[1]

    def read_events_nowait(self) -> list[AgentEvent]:
        events, self._pending = self._pending, []
        return events + self._parse(self._socket().read_nowait())

    def events_from(self, messages: list[str | bytes | tuple[str, bytes]]) -> list[AgentEvent]:
        events, self._pending = self._pending, []
        return events + self._parse(messages)  # type: ignore[arg-type]

    @property
    def events_waiting(self) -> bool:
        return bool(self._pending)

    def _protocol_error(self, exc: RemoteProtocolError) -> AgentErrorEvent:
        self.protocol_errors += 1
        logging.getLogger(f"relay.agents.{self.vendor}").warning(
            "%s: protocol error %d: %s", self.vendor, self.protocol_errors, str(exc)[:200]
        )
        if self.protocol_errors > self.max_protocol_errors:
            raise self._too_many_errors(exc) from exc
        return AgentErrorEvent("agent_protocol", str(exc), fatal=False)

    def _too_many_errors(self, exc: RemoteProtocolError) -> Exception:
        """The error that ends the session after too many malformed messages."""
        ws = self._ws
        if ws is not None:
            ws.close_nowait(websocket.CLOSE_PROTOCOL_ERROR, "protocol error")
        return AgentError(
            f"{self.label}: {self.protocol_errors} malformed messages, giving up (last: {exc})",
            kind="agent_protocol",
        )

    # -- closing ---------------------------------------------------------------------------
    def _before_close(self, ws: websocket.WebSocket) -> None:
        """Hook: runs once when :meth:`aclose` starts (e.g. send a goodbye message)."""

    async def aclose(self) -> None:
        ws = self._ws
        if ws is None or self._closing:
            return
        self._closing = True
        try:
            self._before_close(ws)
        except Exception:
            log.debug("%s: error before closing", self.vendor, exc_info=True)
        await close_socket(ws, self.vendor)


# --- one session at a time, recovered when the connection is lost ----------------------------
class SessionSocketAgent(SocketAgent):
    """One vendor session over one WebSocket at a time, watched by
    :func:`relay.agents.liveness.watch`, recovered transparently when ``reconnect`` is on.

    Subclasses implement :meth:`_open_session` (connect + configure + wait until the session
    accepts audio; mode "new", "resume" or "seeded") and may override :meth:`_parse`,
    :meth:`_on_idle`, :meth:`_session_lost`, :meth:`_can_resume` and :meth:`_goodbye`. They
    send through :meth:`_send_text` / :meth:`_send_texts` / :meth:`_send_bytes`, which hand
    a ``ConnectionClosed`` to :meth:`_send_failed`: re-raised (the engine ends the call)
    unless a recovery can take over (then the message is dropped).

    The recovery happens inside the adapter: :meth:`run` reconnects, :meth:`receive` waits
    for the new socket and events keep flowing, so the engine never sees the gap (caller
    audio sent during it is dropped; the caller hears at most a short silence). With
    ``reconnect`` on, :meth:`reactor_socket` is None: the socket changes under the engine,
    so the engine reads through :meth:`receive`, which follows the swap.
    """

    def __init__(
        self,
        *,
        liveness: LivenessOptions | None = None,
        reconnect: bool = False,
        reconnect_timeout_s: float = DEFAULT_RECONNECT_TIMEOUT_S,
        max_protocol_errors: int = 10,
    ) -> None:
        super().__init__(liveness=liveness, max_protocol_errors=max_protocol_errors)
        self.reconnect = reconnect
        self.reconnect_timeout_s = reconnect_timeout_s
        self.reconnects = 0
        self.resumes = 0
        self.dropped_sends = 0
        #: set by subclasses when the vendor ended the session on purpose (no recovery)
        self._session_over = False
        self._conn_scope: trio.CancelScope | None = None
        self._conn_ws: websocket.WebSocket | None = None
        self._lost_reason: BaseException | None = None
        self._swapped = trio.Event()
        self._failed: BaseException | None = None
        self._lost_at: float | None = None

    @staticmethod
    def session_options(options: Mapping[str, Any]) -> dict[str, Any]:
        """The constructor options every such adapter reads from its agent table, validated:
        ``liveness`` (``ping_interval_s``, ``dead_after_s``), ``reconnect``,
        ``reconnect_timeout_s`` and ``max_protocol_errors``."""
        reconnect, reconnect_timeout_s = reconnect_options(options)
        return {
            "liveness": LivenessOptions.from_config(options),
            "reconnect": reconnect,
            "reconnect_timeout_s": reconnect_timeout_s,
            "max_protocol_errors": option_int(options, "max_protocol_errors", 10),
        }

    # -- hooks ------------------------------------------------------------------------------
    @abc.abstractmethod
    async def _open_session(self, mode: str) -> websocket.WebSocket:
        """Open a connection and bring a session up on it; mode "new" (first connect),
        "resume" (continue the lost session) or "seeded" (new session that continues the
        conversation). Raise AgentError (kind ``agent_connect``, ``agent_connect_timeout``,
        ``agent_session``, or ``agent_resume_refused`` when a resume is refused) and close
        the socket on any failure."""

    def _session_lost(self) -> list[AgentEvent]:
        """Events to emit when the connection is lost (e.g. the cut-off reply is done)."""
        return []

    def _can_resume(self) -> bool:
        return False

    def _goodbye(self) -> list[str]:
        """Text messages that end the session cleanly (sent by :meth:`aclose`)."""
        return []

    # -- lifecycle --------------------------------------------------------------------------
    async def connect(self, call: CallInfo) -> None:
        self._start(call)
        self._ws = await self._open_session("new")

    def reactor_socket(self) -> socket.socket | None:
        return None if self.reconnect else self._socket().raw_socket

    async def run(self) -> None:
        """Flush and watch the connection; with ``reconnect``, recover it when it dies."""
        while True:
            ws = self._socket()
            failure: BaseException | None = None
            with trio.CancelScope() as scope:
                self._conn_scope, self._conn_ws = scope, ws
                try:
                    await run_connection(ws, self.liveness, on_idle=self._idle_hook())
                except (ConnectionClosed, AgentError) as exc:
                    failure = exc
            self._conn_scope = self._conn_ws = None
            if failure is None:  # a reader or sender saw the socket die and woke us
                failure = self._lost_reason or ws.closed or ConnectionClosed(1006, "lost")
            if not self._may_recover(failure):
                raise failure
            await self._recover(ws, failure)

    def _may_recover(self, failure: BaseException) -> bool:
        return (
            self.reconnect
            and not self._closing
            and not self._session_over
            and self._failed is None
            and is_recoverable(failure)
        )

    def _wake_runner(self, ws: websocket.WebSocket, reason: BaseException) -> None:
        """A reader or sender found ``ws`` dead: have :meth:`run` recover it now."""
        if self._lost_reason is None:
            self._lost_reason = reason
        if self._conn_ws is ws and self._conn_scope is not None:
            self._conn_scope.cancel()

    async def _recover(self, old: websocket.WebSocket, failure: BaseException) -> None:
        vlog = logging.getLogger(f"relay.agents.{self.vendor}")
        call_sid = self.call.call_sid if self.call else "?"
        vlog.warning(
            "%s: connection lost (%s); reconnecting (call %s)", self.vendor, failure, call_sid
        )
        if old.closed is None:
            old.closed = ConnectionClosed(1006, f"agent connection lost: {failure}")
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(old.stream)
        self._lost_at = trio.current_time()
        self._pending += self._session_lost()
        deadline = self._lost_at + self.reconnect_timeout_s
        mode = "resume" if self._can_resume() else "seeded"
        delay = 0.05
        last: BaseException = failure
        while trio.current_time() < deadline:
            try:
                with trio.fail_at(deadline):
                    new = await self._open_session(mode)
            except trio.TooSlowError:
                break
            except AgentError as exc:
                last = exc
                if exc.kind == "agent_resume_refused":
                    vlog.info("%s: resume refused (%s); opening a new session", self.vendor, exc)
                    mode = "seeded"
                    continue
                if exc.kind == "agent_session":  # the vendor refuses the configuration
                    break
                await trio.sleep(min(delay, max(0.0, deadline - trio.current_time())))
                delay = min(delay * 2, 1.0)
                continue
            self._ws = new
            self._lost_reason = None
            self.reconnects += 1
            if mode == "resume":
                self.resumes += 1
            vlog.info(
                "%s: session %s after %.2f s (call %s)",
                self.vendor,
                "resumed" if mode == "resume" else "re-opened with the conversation so far",
                trio.current_time() - self._lost_at,
                call_sid,
            )
            self._swapped.set()
            self._swapped = trio.Event()
            return
        self._failed = AgentError(
            f"agent connection lost and not recovered within {self.reconnect_timeout_s:g} s: "
            f"{last}",
            kind="agent_disconnected",
        )
        self._swapped.set()
        raise self._failed

    def _before_close(self, ws: websocket.WebSocket) -> None:
        if self._failed is None:
            self._failed = ConnectionClosed(1000, "agent closed")
        self._swapped.set()
        goodbye = self._goodbye() if ws.closed is None else []
        if goodbye:
            try:
                ws.send_texts_nowait(goodbye)
            except ConnectionClosed:
                pass

    # -- sending ----------------------------------------------------------------------------
    def _send_failed(self, exc: ConnectionClosed) -> None:
        """A send on the current socket failed: re-raise (the engine ends the call) unless a
        recovery will take over, in which case the message is dropped."""
        # a copy: raising ``exc`` from this frame, which holds it, would make a reference
        # cycle of the exception, its traceback and the frame (relay/gcpolicy.py)
        if not self.reconnect or self._closing or self._session_over:
            raise exc.copy()
        if self._failed is not None:
            raise self._failed
        if not is_recoverable(exc):
            raise exc.copy()
        self.dropped_sends += 1
        ws = self._ws
        if ws is not None:
            self._wake_runner(ws, exc)

    def _send_text(self, text: str) -> None:
        try:
            self._socket().send_text_nowait(text)
        except ConnectionClosed as exc:
            self._send_failed(exc)

    def _send_texts(self, texts: list[str]) -> None:
        if not texts:
            return
        try:
            self._socket().send_texts_nowait(texts)
        except ConnectionClosed as exc:
            self._send_failed(exc)

    def _send_audio_spliced(
        self, parts: tuple[bytes, bytes], payloads: list[str], message: Callable[[str], str]
    ) -> None:
        """Caller audio (base64) spliced into the agent's JSON message, all of one read in
        one compiled build and one write (``WebSocket.send_b64_texts_nowait``); a payload
        that is not plain base64 is serialised by ``message`` instead."""
        try:
            ws = self._socket()
            if not ws.send_b64_texts_nowait(parts[0], payloads, parts[1]):
                ws.send_texts_nowait([message(p) for p in payloads])
        except ConnectionClosed as exc:
            self._send_failed(exc)

    def _send_audio_encoded(self, parts: tuple[bytes, bytes], audio: bytes) -> None:
        """Raw caller audio (transcoded PCM) base64-encoded into the agent's JSON message,
        built in one compiled call (``WebSocket.send_audio_text_nowait``)."""
        try:
            self._socket().send_audio_text_nowait(parts[0], audio, parts[1])
        except ConnectionClosed as exc:
            self._send_failed(exc)

    def _send_bytes(self, data: bytes) -> None:
        try:
            self._socket().send_bytes_nowait(data)
        except ConnectionClosed as exc:
            self._send_failed(exc)

    # -- receiving --------------------------------------------------------------------------
    async def receive(self) -> list[AgentEvent]:
        while True:
            if self._pending:
                events, self._pending = self._pending, []
                return events
            ws = self._socket()
            try:
                batch = await ws.receive()
            except ConnectionClosed as exc:
                if not await self._follow_recovery(ws, exc):
                    # a bare raise: ``raise exc`` from a frame holding ``exc`` ties the
                    # exception, its traceback and that frame (the session, the call) into
                    # a cycle only the cyclic collector frees (relay/gcpolicy.py)
                    raise
                continue
            events = self._parse(batch)
            if events:
                return events

    async def _follow_recovery(self, ws: websocket.WebSocket, exc: ConnectionClosed) -> bool:
        """The socket a reader was on died: wait for the new one (True: read on), raise the
        recovery's final error, or False: ``exc`` ends the session (the caller re-raises)."""
        if self._ws is not ws:
            return True  # already replaced: read the new one
        if self._failed is not None:
            raise self._failed
        if not self.reconnect or self._closing or self._session_over or not is_recoverable(exc):
            return False
        swapped = self._swapped
        self._wake_runner(ws, exc)
        await swapped.wait()
        if self._failed is not None and self._ws is ws:
            raise self._failed
        return True

    def _too_many_errors(self, exc: RemoteProtocolError) -> Exception:
        self._session_over = True
        return super()._too_many_errors(exc)
