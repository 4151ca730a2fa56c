"""Gemini Live adapter: the thin Trio layer over :mod:`relay.agents.gemini_protocol`.

Audio: Gemini hears PCM16 16 kHz and speaks PCM16 24 kHz, so :attr:`input_format` and
:attr:`output_format` say so and the engine's Cython resampler converts both ways.

Connect (bounded by ``connect_timeout_s``): handshake (``?key=``) -> ``setup`` -> wait for
``setupComplete`` (nothing else may be sent before it) -> greeting.

Connections, not sessions, fail. A Live connection lasts about ten minutes and ends after
``goAway``; it can also drop, or stall (the peer stops reading or vanishes without FIN or
RST: :func:`relay.agents.liveness.watch` notices within ``dead_after_s``). Any of these
replaces the connection transparently, in :meth:`run`:

* the latest ``sessionResumptionUpdate`` handle resumes the same session on a new
  connection (after ``goAway`` the old connection is used until the model is idle, or
  until shortly before it is cut, so an answer is not cut in half);
* without a handle yet (the first seconds of a call), ``reconnect`` opens a fresh session
  seeded with the transcript so far;
* caller audio sent while switching is kept (``reconnect_buffer_ms``) and sent to the new
  connection once it is set up; the turn in progress ends; tool calls issued on the old
  connection are not answered on the new one (it never issued them).

:meth:`receive` keeps delivering events across the switch. Only when no new connection can
be set up within ``reconnect_timeout_s``, after ``max_reconnects`` switches, or when the
server refused the session (close 1007 invalid argument, 1008 policy/API key) does the
adapter give up: :meth:`run` and :meth:`receive` raise ``AgentError(kind=
"agent_disconnected")`` and the engine ends the call.

Reading goes through :meth:`receive` (never the reactor): the socket changes on a switch.
The API key travels in the URL: it is never logged (URLs are logged without their query)
and ``repr`` shows it masked.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from collections.abc import Mapping
from typing import Any, ClassVar

import trio

from ..config import mask
from ..errors import (
    AgentError,
    ConfigError,
    ConnectionClosed,
    RelayError,
    RemoteProtocolError,
)
from ..media import websocket
from ..netguard import AddressRefused
from ..tools import ToolRegistry
from .base import Agent, AgentEvent, CallInfo
from .gemini_protocol import (
    DEFAULT_MODEL,
    DEFAULT_URL,
    INPUT_FORMAT,
    OUTPUT_FORMAT,
    GeminiOptions,
    GeminiProtocol,
    is_setup_complete,
)
from .liveness import DEFAULT_RECONNECT_TIMEOUT_S, LIVENESS_KEYS, LivenessOptions, watch
from .options import api_key, as_bool, as_number, as_table, tool_options, warn_unknown_keys
from .session import SocketAgent, opening

__all__ = ["GeminiLiveAgent", "create", "options_from_config"]

log = logging.getLogger("relay.agents.gemini")

#: Close codes after which the server will not take the session back (RFC 6455 §7.4.1):
#: 1003/1007 our messages are wrong (invalid argument), 1008 policy (API key, permission).
FATAL_CLOSE_CODES = frozenset({1003, 1007, 1008})

#: Pauses between attempts to set up a replacement connection (bounded overall by
#: ``reconnect_timeout_s``).
RETRY_BACKOFF_S = (0.0, 0.2, 0.5, 1.0)

#: After goAway, move to the new connection at the latest this long before the old one is
#: cut, even in the middle of an answer.
GO_AWAY_MARGIN_S = 1.0

_BYTES_PER_MS_IN = INPUT_FORMAT.rate * 2 // 1000

_KNOWN_KEYS = frozenset(
    {
        "type",
        "name",
        "url",
        "api_key",
        "model",
        "voice",
        "language",
        "instructions",
        "greeting",
        "greeting_via",
        "tools",
        "tool_registry",
        "transcription",
        "session_resumption",
        "context_compression",
        "reconnect",
        "setup_extra",
        "connect_timeout_s",
        "send_timeout_s",
        "reconnect_timeout_s",
        "max_reconnects",
        "reconnect_buffer_ms",
        "max_protocol_errors",
        *LIVENESS_KEYS,
    }
)


def options_from_config(
    options: Mapping[str, Any],
) -> tuple[GeminiOptions, ToolRegistry | None, LivenessOptions, int]:
    """``[agents.<name>]`` keys -> (options, tools, liveness, max protocol errors).

    ``tools``: registered tool names, HTTP tool tables or schemas
    (:func:`relay.tools.resolve_tools`), announced as ``functionDeclarations``."""
    warn_unknown_keys("gemini", options, _KNOWN_KEYS, log)
    key = api_key(options, "GEMINI_API_KEY", "gemini")

    def integer(key: str, default: int) -> int:
        value = as_number(key, options.get(key, default))
        if value != int(value):
            raise ConfigError(f"agents.*.{key}: expected a whole number, got {value!r}")
        return int(value)

    schemas, registry = tool_options(options)
    opts = GeminiOptions(
        url=str(options.get("url") or DEFAULT_URL),
        api_key=key,
        model=str(options.get("model") or DEFAULT_MODEL),
        voice=str(options.get("voice") or ""),
        language=str(options.get("language") or ""),
        instructions=str(options.get("instructions") or ""),
        greeting=str(options.get("greeting") or ""),
        greeting_via=str(options.get("greeting_via") or "client_content"),
        tools=schemas,
        transcription=as_bool("transcription", options.get("transcription", True)),
        session_resumption=as_bool("session_resumption", options.get("session_resumption", True)),
        context_compression=as_bool(
            "context_compression", options.get("context_compression", True)
        ),
        reconnect=as_bool("reconnect", options.get("reconnect", True)),
        setup_extra=as_table("setup_extra", options.get("setup_extra")),
        connect_timeout_s=as_number("connect_timeout_s", options.get("connect_timeout_s", 10)),
        send_timeout_s=as_number("send_timeout_s", options.get("send_timeout_s", 2)),
        reconnect_timeout_s=as_number(
            "reconnect_timeout_s", options.get("reconnect_timeout_s", DEFAULT_RECONNECT_TIMEOUT_S)
        ),
        max_reconnects=integer("max_reconnects", 10),
        reconnect_buffer_ms=integer("reconnect_buffer_ms", 1000),
    )
    liveness = LivenessOptions.from_config(options)
    return opts, registry, liveness, integer("max_protocol_errors", 10)


def _refused_for_good(exc: BaseException) -> bool:
    """An HTTP 4xx answer to the upgrade (bad key, unknown endpoint), except 408/429."""
    if not isinstance(exc, ConnectionClosed) or "handshake refused" not in exc.reason:
        return False
    parts = exc.reason.split()
    status = next((p for p in parts if p.isdigit() and len(p) == 3), "")
    return status.startswith("4") and status not in ("408", "429")


class _SetupFailed(AgentError):
    """A connection attempt failed; ``retry`` False when the server refused the session
    (``code``: its close code, when it closed the WebSocket)."""

    def __init__(
        self, message: str, *, retry: bool, kind: str = "agent_connect", code: int | None = None
    ) -> None:
        super().__init__(message, kind=kind)
        self.retry = retry
        self.code = code


class GeminiLiveAgent(SocketAgent):
    name: ClassVar[str] = "gemini"
    vendor: ClassVar[str] = "gemini"
    label: ClassVar[str] = "Gemini Live"
    protocol: GeminiProtocol
    input_format = INPUT_FORMAT
    output_format = OUTPUT_FORMAT

    def __init__(
        self,
        options: GeminiOptions,
        *,
        tools: ToolRegistry | None = None,
        liveness: LivenessOptions | None = None,
        max_protocol_errors: int = 10,
    ) -> None:
        super().__init__(liveness=liveness, max_protocol_errors=max_protocol_errors)
        self.options = options
        #: Runs the tools announced to the model (None: the engine's registry).
        self.tools = tools
        self.protocol = GeminiProtocol(options)
        #: connection switches so far (resumed or fresh)
        self.reconnects = 0
        self.resumed = 0
        self._gen = 0  # bumped when _ws is replaced
        self._dead: AgentError | None = None
        # replacing the current connection: why (None: it is fine), and whether it is
        # already unusable (lost) or still readable (goAway)
        self._replace_reason: str | None = None
        self._replace_close: ConnectionClosed | None = None
        self._lost = False
        self._replace_wanted = trio.Event()
        self._switching = False  # a replacement is being set up: buffer what we send
        self._backlog: deque[tuple[str, int]] = deque()  # (message, audio bytes)
        self._backlog_bytes = 0
        self._changed = trio.Event()  # any state change receive() or run() may wait on

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> GeminiLiveAgent:
        opts, tools, liveness, max_errors = options_from_config(options)
        return cls(opts, tools=tools, liveness=liveness, max_protocol_errors=max_errors)

    def __repr__(self) -> str:
        o = self.options
        return (
            f"GeminiLiveAgent(url={self.protocol.safe_url()!r}, model={o.model!r}, "
            f"voice={o.voice!r}, api_key={mask(o.api_key)!r})"
        )

    @property
    def connected(self) -> bool:
        return super().connected and self._dead is None

    def reactor_socket(self) -> socket.socket | None:
        return None  # the socket changes on a switch: the engine reads through receive()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- connections -----------------------------------------------------------------------
    async def _open(self, handle: str | None) -> tuple[websocket.WebSocket, list[str | bytes]]:
        """A new connection, set up: handshake, ``setup`` (resuming ``handle``), wait for
        ``setupComplete``. Returns it with any messages that followed setupComplete in the
        same read (parsed by the caller once the connection is the current one)."""
        o = self.options
        proto = self.protocol
        try:
            ws = await websocket.connect(
                proto.ws_url(), [], timeout=o.connect_timeout_s, send_timeout=o.send_timeout_s
            )
        except trio.TooSlowError:
            raise _SetupFailed("Gemini Live handshake timed out", retry=True) from None
        except (OSError, RelayError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _SetupFailed(
                f"Gemini Live connect failed: {exc}",
                retry=not _refused_for_good(exc) and not isinstance(exc, AddressRefused),
                kind=exc.kind if isinstance(exc, AddressRefused) else "agent_connect",
            ) from exc
        except ValueError as exc:
            raise _SetupFailed(f"Gemini Live connect failed: {exc}", retry=False) from None
        try:
            try:
                await ws.send_text(proto.setup_message(handle))
            except ConnectionClosed as exc:
                raise _SetupFailed(f"Gemini Live setup not sent: {exc}", retry=True) from exc
            while True:
                try:
                    batch = await ws.receive()
                except ConnectionClosed as exc:
                    raise _SetupFailed(
                        f"Gemini Live closed the connection during setup ({exc.code}: "
                        f"{exc.reason[:200]})",
                        retry=exc.code not in FATAL_CLOSE_CODES,
                        kind="agent_session",
                        code=exc.code,
                    ) from exc
                for i, message in enumerate(batch):
                    try:
                        done = is_setup_complete(message)
                    except RemoteProtocolError as exc:
                        raise _SetupFailed(
                            f"Gemini Live protocol error during setup: {exc}",
                            retry=True,
                            kind="agent_protocol",
                        ) from exc
                    if done:
                        return ws, batch[i + 1 :]
                    # The server sends nothing else before setupComplete.
                    raise _SetupFailed(
                        f"Gemini Live sent {str(message)[:120]!r} before setupComplete",
                        retry=True,
                        kind="agent_protocol",
                    )
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(ws.stream)
            raise

    async def connect(self, call: CallInfo) -> None:
        self._start(call)
        o = self.options
        proto = self.protocol
        async with opening(self.label, o.connect_timeout_s) as setup:
            setup.stage = None  # _open names its own stage
            ws, leftover = await self._open(None)
            setup.ws = ws
            self._install(ws, leftover)
            greeting = proto.greeting_messages()
            if greeting:
                await ws.send_texts(greeting)
        log.info(
            "gemini session set up (model=%s url=%s call=%s)",
            o.model_path,
            proto.safe_url(),
            call.call_sid,
        )

    def _install(self, ws: websocket.WebSocket, leftover: list[str | bytes]) -> None:
        """Make ``ws`` the current connection (synchronously: no other task sees a half
        switched state)."""
        self._ws = ws
        self._gen += 1
        self._pending += self.protocol.begin_connection()
        self.protocol.setup_complete = True
        self._replace_reason = None
        self._replace_close = None
        self._lost = False
        self._replace_wanted = trio.Event()
        if leftover:
            self._pending += self._parse(leftover)
        self._notify()

    def _before_close(self, ws: websocket.WebSocket) -> None:
        if self._dead is None:
            self._dead = AgentError("Gemini Live session closed", kind="agent_closed")
        self._replace_wanted.set()
        self._notify()

    def _request_replace(
        self, gen: int, reason: str, *, lost: bool, closed: ConnectionClosed | None = None
    ) -> None:
        """Connection ``gen`` must be replaced (no-op for an old generation)."""
        if gen != self._gen or self._dead is not None:
            return
        if self._replace_reason is None or (lost and not self._lost):
            self._replace_reason = reason
        if closed is not None and self._replace_close is None:
            self._replace_close = closed
        self._lost = self._lost or lost
        self._replace_wanted.set()
        self._notify()

    def _die(self, message: str) -> AgentError:
        if self._dead is None:
            self._dead = AgentError(message, kind="agent_disconnected")
            log.warning("gemini: giving up on the session: %s", message)
            ws = self._ws
            if ws is not None:
                ws.close_nowait(websocket.CLOSE_GOING_AWAY)
            self._switching = False
            self._backlog.clear()
            self._backlog_bytes = 0
            self._replace_wanted.set()  # wakes run(), which closes the socket
            self._notify()
        return self._dead

    async def run(self) -> None:
        """Keep a working connection: flush and watch the current one; replace it when it
        goes away (resume, or fresh session); raise AgentError when that fails."""
        while True:
            if self._dead is not None:
                raise self._dead
            ws, gen = self._socket(), self._gen
            failure: AgentError | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._supervise, ws, gen)
                await self._replace_wanted.wait()
                if not self._lost and self.protocol.go_away_s is not None:
                    if self._can_switch():
                        await self._go_away_grace(gen, self.protocol.go_away_s)
                    else:
                        # Nothing to move to: use this connection until it is cut.
                        while not self._lost and self._dead is None:
                            await self._changed.wait()
                try:
                    await self._switch(gen)
                except AgentError as exc:
                    failure = exc
                nursery.cancel_scope.cancel()
            if failure is not None:
                # A reader may still be parked on the dead socket: closing it wakes it.
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(ws.stream)
                raise failure

    def _can_switch(self) -> bool:
        o = self.options
        has_handle = o.session_resumption and self.protocol.handle is not None
        return (has_handle or o.reconnect) and self.reconnects < o.max_reconnects

    async def _supervise(self, ws: websocket.WebSocket, gen: int) -> None:
        """The connection's flusher and liveness watch; the first to give up marks the
        connection lost."""
        async with trio.open_nursery() as nursery:

            async def flusher() -> None:
                try:
                    await ws.run_flusher()
                except ConnectionClosed as exc:
                    self._request_replace(gen, f"send failed: {exc}", lost=True, closed=exc)
                nursery.cancel_scope.cancel()

            async def liveness() -> None:
                try:
                    await watch(ws, self.liveness)
                except (AgentError, ConnectionClosed) as exc:
                    self._request_replace(gen, f"liveness: {exc}", lost=True)
                nursery.cancel_scope.cancel()

            nursery.start_soon(flusher)
            nursery.start_soon(liveness)

    async def _go_away_grace(self, gen: int, time_left: float) -> None:
        """After goAway: keep using the connection while the model is mid-answer, a tool
        call is outstanding, or the handle for the last turn has not arrived yet (it comes
        just after ``turnComplete``), but move on ``GO_AWAY_MARGIN_S`` before it is cut."""
        deadline = trio.current_time() + max(0.0, time_left - GO_AWAY_MARGIN_S)
        with trio.move_on_at(deadline):
            while not self.protocol.switch_ready and not self._lost and gen == self._gen:
                await self._changed.wait()

    async def _switch(self, gen: int) -> None:
        """Set up a replacement for connection ``gen`` and make it current."""
        if self._dead is not None:
            raise self._dead
        o = self.options
        proto = self.protocol
        reason = self._replace_reason or "replaced"
        closed = self._replace_close
        if closed is not None and closed.code in FATAL_CLOSE_CODES:
            raise self._die(f"Gemini Live closed the session ({closed.code}: {closed.reason})")
        handle = proto.handle if o.session_resumption else None
        if handle is None and not o.reconnect:
            raise self._die(f"connection lost ({reason}) and the session cannot be resumed")
        if self.reconnects >= o.max_reconnects:
            raise self._die(f"connection lost ({reason}) after {self.reconnects} reconnects")
        log.info(
            "gemini: replacing connection (%s) with a %s session",
            reason,
            "resumed" if handle else "fresh",
        )
        self._switching = True
        opened: tuple[websocket.WebSocket, list[str | bytes]] | None = None
        last_error = "timed out"
        with trio.move_on_after(o.reconnect_timeout_s):
            for pause in RETRY_BACKOFF_S:
                await trio.sleep(pause)
                try:
                    opened = await self._open(handle)
                    break
                except _SetupFailed as exc:
                    last_error = str(exc)
                    if exc.retry:
                        continue
                    if handle is not None and exc.code == 1007 and o.reconnect:
                        # The handle itself was refused (expired, unknown): a fresh
                        # session with the conversation so far is the next best thing.
                        log.info("gemini: resumption handle refused; opening a fresh session")
                        handle = None
                        continue
                    break
        if opened is None:
            raise self._die(f"connection lost ({reason}); reconnect failed: {last_error}")
        new_ws, leftover = opened
        old = self._ws
        self.reconnects += 1
        if handle is not None:
            self.resumed += 1
        self._install(new_ws, leftover)
        self._switching = False
        first: list[str] = []
        if handle is None:
            history = proto.history_message()
            if history is not None:
                first.append(history)
        first += [message for message, _ in self._backlog]
        self._backlog.clear()
        self._backlog_bytes = 0
        if first:
            try:
                new_ws.send_texts_nowait(first)
            except ConnectionClosed as exc:  # handled by the next round of run()
                self._request_replace(self._gen, f"send failed: {exc}", lost=True, closed=exc)
        if old is not None:
            old.close_nowait(websocket.CLOSE_GOING_AWAY)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(old.stream)
        log.info("gemini: connection %d in use (%s)", self._gen, "resumed" if handle else "fresh")

    # -- sending (non-blocking; see Agent) -------------------------------------------------
    def _keep(self, message: str, audio_bytes: int) -> None:
        """Hold caller audio while no connection can take it (bounded: oldest dropped)."""
        limit = self.options.reconnect_buffer_ms * _BYTES_PER_MS_IN
        self._backlog.append((message, audio_bytes))
        self._backlog_bytes += audio_bytes
        while self._backlog and self._backlog_bytes > limit:
            _, n = self._backlog.popleft()
            self._backlog_bytes -= n

    def send_audio(self, audio: bytes) -> None:
        """Caller audio, PCM16 16 kHz (the engine resamples Twilio's μ-law)."""
        if self._dead is not None:
            raise self._dead
        if not audio:
            return
        proto = self.protocol
        if self._switching or self._lost:
            self._keep(proto.audio_message(audio), len(audio))
            return
        proto.check_audio(audio)
        head, tail = proto.audio_parts
        try:
            # base64, message, frame and mask in one compiled call
            self._socket().send_audio_text_nowait(head, audio, tail)
        except ConnectionClosed as exc:
            self._request_replace(self._gen, f"send failed: {exc}", lost=True, closed=exc)
            self._keep(proto.audio_message(audio), len(audio))

    def send_tool_result(self, call_id: str, output: str) -> None:
        if self._dead is not None:
            raise self._dead
        message = self.protocol.tool_response(call_id, output)
        if message is None:
            # Withdrawn (toolCallCancellation), already answered, or issued on a connection
            # that has been replaced: the server would refuse it.
            log.info("gemini: not answering tool call %r (cancelled or unknown)", call_id[:80])
            return
        if self._switching or self._lost:
            log.warning("gemini: tool result for %r lost in a reconnect", call_id[:80])
            return
        try:
            self._socket().send_text_nowait(message)
        except ConnectionClosed as exc:
            self._request_replace(self._gen, f"send failed: {exc}", lost=True, closed=exc)

    # -- receiving -----------------------------------------------------------------------
    async def receive(self) -> list[AgentEvent]:
        while True:
            if self._pending:
                events, self._pending = self._pending, []
                return events
            if self._dead is not None:
                raise self._dead
            ws, gen = self._socket(), self._gen
            if self._lost:
                # This connection is gone: wait for its replacement (or the end).
                await self._changed.wait()
                continue
            try:
                batch = await ws.receive()
            except ConnectionClosed as exc:
                self._request_replace(gen, f"closed: {exc}", lost=True, closed=exc)
                continue
            if gen != self._gen:
                continue  # the replaced connection's last words: its turn was closed
            events = self._parse(batch)
            if self.protocol.go_away_s is not None:
                self._request_replace(
                    gen, f"goAway (time left {self.protocol.go_away_s:g} s)", lost=False
                )
            self._notify()  # wake a goAway grace waiting for the model to be idle
            if events:
                return events

    def read_events_nowait(self) -> list[AgentEvent]:  # pragma: no cover - no reactor socket
        raise NotImplementedError

    def _too_many_errors(self, exc: RemoteProtocolError) -> Exception:
        return self._die(f"Gemini Live: {self.protocol_errors} malformed messages (last: {exc})")


def create(options: Mapping[str, Any]) -> Agent:
    """``AgentFactory`` for the ``gemini`` agent type."""
    return GeminiLiveAgent.from_config(options)
