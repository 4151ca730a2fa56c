"""ElevenLabs Agents adapter: the thin Trio layer over :mod:`relay.agents.elevenlabs_protocol`.

One WebSocket per call (``relay.media.websocket.connect``). Connect sequence (bounded as a
whole by ``connect_timeout_s``): handshake (``xi-api-key`` when a key is set) ->
``conversation_initiation_client_data`` -> wait for ``conversation_initiation_metadata``,
which says which audio formats the agent uses. Only then are :attr:`input_format` and
:attr:`output_format` known, so the engine reads them after :meth:`connect` returns:
μ-law 8 kHz both ways when the agent is set to ``ulaw_8000`` (Twilio's base64 payload goes
straight into ``user_audio_chunk``, byte for byte), PCM16 at the agent's rate otherwise
(the engine's resampler converts).

Liveness: the server's own ``ping`` events are answered at once, in the same step as the
read that brought them (a pong never waits behind event handling). Independently,
:func:`relay.agents.liveness.watch` sends WebSocket pings and declares the agent dead
when nothing at all arrived for ``dead_after_s`` or our sends stopped draining (a peer
that vanished without FIN/RST, or stopped reading). ElevenLabs has no way to resume a
conversation, so a dead agent ends the call (``agent disconnected``).

The server closing the conversation normally (close code 1000: the agent's end-call tool,
the maximum duration) is an :class:`~relay.agents.base.AgentHangup`: the caller hears the
last words, then the call ends as "agent ended", not as an error.

The API key is never logged; ``repr`` shows it masked.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from ..config import mask
from ..errors import AgentError, ConfigError, ConnectionClosed
from ..media import websocket
from ..tools import ToolRegistry
from .base import Agent, AgentEvent, AgentHangup, CallInfo
from .elevenlabs_protocol import DEFAULT_URL, ElevenLabsOptions, ElevenLabsProtocol
from .liveness import LIVENESS_KEYS, LivenessOptions
from .options import api_key, as_number, as_table, tool_options, warn_unknown_keys
from .session import SocketAgent, first_fatal, opening

__all__ = ["ElevenLabsAgent", "create", "options_from_config"]

log = logging.getLogger("relay.agents.elevenlabs")

_KNOWN_KEYS = frozenset(
    {
        "type",
        "name",
        "url",
        "agent_id",
        "api_key",
        "instructions",
        "greeting",
        "voice",
        "language",
        "dynamic_variables",
        "tools",
        "tool_registry",
        "init_extra",
        "connect_timeout_s",
        "send_timeout_s",
        "max_protocol_errors",
        *LIVENESS_KEYS,
    }
)


def _tool_names(schemas: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(schema.get("name")) for schema in schemas]


def options_from_config(
    options: Mapping[str, Any],
) -> tuple[ElevenLabsOptions, ToolRegistry | None, LivenessOptions, int]:
    """``[agents.<name>]`` keys -> (options, tools, liveness, max protocol errors).

    ``tools`` name the agent's *client tools* (defined in the ElevenLabs dashboard) that the
    relay runs: registered Python tools by name, or HTTP tool tables
    (:func:`relay.tools.resolve_tools`); ElevenLabs takes no tool schemas from the client."""
    warn_unknown_keys("elevenlabs", options, _KNOWN_KEYS, log)
    agent_id = str(options.get("agent_id") or "").strip()
    if not agent_id:
        raise ConfigError("agents.*.agent_id: required for an elevenlabs agent")
    # optional: public agents need no key
    key = api_key(options, "ELEVENLABS_API_KEY", "elevenlabs", required=False)
    schemas, registry = tool_options(options)
    opts = ElevenLabsOptions(
        agent_id=agent_id,
        url=str(options.get("url") or DEFAULT_URL),
        api_key=key,
        instructions=str(options.get("instructions") or ""),
        greeting=str(options.get("greeting") or ""),
        voice=str(options.get("voice") or ""),
        language=str(options.get("language") or ""),
        dynamic_variables=as_table("dynamic_variables", options.get("dynamic_variables")),
        tools=_tool_names(schemas),
        init_extra=as_table("init_extra", options.get("init_extra")),
        connect_timeout_s=as_number("connect_timeout_s", options.get("connect_timeout_s", 10)),
        send_timeout_s=as_number("send_timeout_s", options.get("send_timeout_s", 2)),
    )
    liveness = LivenessOptions.from_config(options)
    max_errors = int(as_number("max_protocol_errors", options.get("max_protocol_errors", 10)))
    return opts, registry, liveness, max_errors


class ElevenLabsAgent(SocketAgent):
    name: ClassVar[str] = "elevenlabs"
    vendor: ClassVar[str] = "elevenlabs"
    label: ClassVar[str] = "ElevenLabs"
    protocol: ElevenLabsProtocol

    def __init__(
        self,
        options: ElevenLabsOptions,
        *,
        tools: ToolRegistry | None = None,
        liveness: LivenessOptions | None = None,
        max_protocol_errors: int = 10,
    ) -> None:
        super().__init__(liveness=liveness, max_protocol_errors=max_protocol_errors)
        self.options = options
        #: Runs the client tools named in ``options.tools`` (None: the engine's registry).
        self.tools = tools
        self.protocol = ElevenLabsProtocol(options)
        self._ended = False  # the peer closed normally and AgentHangup was reported

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> ElevenLabsAgent:
        opts, tools, liveness, max_errors = options_from_config(options)
        return cls(opts, tools=tools, liveness=liveness, max_protocol_errors=max_errors)

    def __repr__(self) -> str:
        o = self.options
        return (
            f"ElevenLabsAgent(url={o.url!r}, agent_id={o.agent_id!r}, "
            f"input={self.input_format}, output={self.output_format}, "
            f"api_key={mask(o.api_key)!r})"
        )

    # -- lifecycle -----------------------------------------------------------------------
    async def connect(self, call: CallInfo) -> None:
        self._start(call)
        o = self.options
        proto = self.protocol
        async with opening(self.label, o.connect_timeout_s) as setup:
            self._ws = ws = await setup.handshake(
                proto.ws_url(),
                proto.handshake_headers(),
                send_timeout_s=o.send_timeout_s,
                then="conversation_initiation_metadata",
            )
            await ws.send_text(proto.initiation_message())
            try:
                # Read until conversation_initiation_metadata (pings answered meanwhile).
                await self._read_setup(ws, lambda: proto.ready, self._refused)
            except ConnectionClosed as exc:
                raise AgentError(
                    f"ElevenLabs closed the conversation during setup: {exc}",
                    kind="agent_session",
                ) from exc
        assert proto.input_format is not None and proto.output_format is not None
        self.input_format = proto.input_format
        self.output_format = proto.output_format
        log.info(
            "elevenlabs conversation %s started (agent=%s input=%s output=%s call=%s)",
            proto.conversation_id,
            o.agent_id,
            proto.input_format_name,
            proto.output_format_name,
            call.call_sid,
        )

    def _refused(self, events: list[AgentEvent]) -> AgentError | None:
        event = first_fatal(events)
        if event is None:
            return None
        return AgentError(
            f"ElevenLabs conversation failed: {event.code}: {event.message}", kind="agent_session"
        )

    async def _after_setup_batch(self, ws: websocket.WebSocket) -> None:
        self._flush_outbox(ws)
        await ws.drain()

    async def run(self) -> None:
        """Drain what the kernel did not take at once (under the send timeout) and watch
        the connection's liveness; raises when either gives up on the peer."""
        try:
            await super().run()
        except ConnectionClosed as exc:
            if exc.code == websocket.CLOSE_NORMAL and not self._closing:
                # ElevenLabs ended the conversation: the reader reports it as AgentHangup
                # (the caller hears the last words); it is not a failure of this task.
                return
            raise

    # -- sending (non-blocking; see Agent) -------------------------------------------------
    def _open_socket(self) -> websocket.WebSocket | None:
        """The socket to send on, or None once ElevenLabs has ended the conversation
        normally: what is still sent then is dropped, not an error (the reader reports the
        end as AgentHangup, possibly a moment later than a send notices the close)."""
        ws = self._socket()
        closed = ws.closed
        if closed is not None and closed.code == websocket.CLOSE_NORMAL and not self._closing:
            return None
        return ws

    def send_audio_b64(self, payload: str) -> None:
        """Passthrough: Twilio's base64 string goes into ``user_audio_chunk`` untouched."""
        self.send_audio_b64_many([payload])

    def audio_splice(self) -> tuple[websocket.WebSocket, bytes, bytes] | None:
        return self._spliced(self.protocol.audio_chunk_parts)

    def send_audio_b64_many(self, payloads: list[str]) -> None:
        # Frames that arrived in one read leave in one write (one syscall), built in one
        # compiled call; a payload that is not plain base64 is serialised properly.
        ws = self._open_socket()
        if ws is not None:
            proto = self.protocol
            head, tail = proto.audio_chunk_parts
            if not ws.send_b64_texts_nowait(head, payloads, tail):
                ws.send_texts_nowait([proto.audio_chunk_b64(p) for p in payloads])

    def send_audio(self, audio: bytes) -> None:
        ws = self._open_socket()
        if ws is not None:
            head, tail = self.protocol.audio_chunk_parts
            ws.send_audio_text_nowait(head, audio, tail)  # one compiled build

    def send_tool_result(self, call_id: str, output: str) -> None:
        message = self.protocol.tool_result(call_id, output)
        if message is None:
            # ElevenLabs refuses a result for an id it did not issue (or already answered).
            log.warning("elevenlabs: dropping result for unknown tool call %r", call_id[:80])
            return
        ws = self._open_socket()
        if ws is not None:
            ws.send_text_nowait(message)

    # -- receiving -----------------------------------------------------------------------
    def _flush_outbox(self, ws: websocket.WebSocket) -> None:
        outbox = self.protocol.outbox
        if outbox:
            texts = outbox[:]
            outbox.clear()
            try:
                ws.send_texts_nowait(texts)
            except ConnectionClosed:
                pass  # the read path reports the socket's end (next read raises it)

    def _parse(self, batch: list[str | bytes]) -> list[AgentEvent]:
        events = super()._parse(batch)
        # pongs leave in the same step as the read that brought the pings
        self._flush_outbox(self._socket())
        return events

    def _hangup_events(self, exc: ConnectionClosed) -> list[AgentEvent] | None:
        """A normal close by ElevenLabs (1000) is the agent hanging up: its events, once;
        None for any other end (or the second time)."""
        if self._ended or self._closing or exc.code != websocket.CLOSE_NORMAL:
            return None
        self._ended = True
        events = self.protocol.close_events()
        if not self.protocol.hangup_sent:
            events.append(AgentHangup("agent ended"))
        return events

    def _closed(self, exc: ConnectionClosed) -> list[AgentEvent]:
        events = self._hangup_events(exc)
        if events is None:
            raise exc.copy()  # not ``exc``: this frame holds it (a cycle, relay/gcpolicy.py)
        return events

    def _parse_batch(self, ws: websocket.WebSocket, batch: list[str | bytes]) -> list[AgentEvent]:
        events = self._parse(batch)
        if ws.closed is not None:
            # The close frame came in this very read: report a hang-up now, in the same
            # step as the last words, so no send in between mistakes it for a failure.
            events += self._hangup_events(ws.closed) or []
        return events

    async def receive(self) -> list[AgentEvent]:
        if self._pending:
            events, self._pending = self._pending, []
            return events
        ws = self._socket()
        while True:
            try:
                batch = await ws.receive()
            except ConnectionClosed as exc:
                return self._closed(exc)
            events = self._parse_batch(ws, batch)
            if events:
                return events

    def read_events_nowait(self) -> list[AgentEvent]:
        events, self._pending = self._pending, []
        ws = self._socket()
        try:
            batch = ws.read_nowait()
        except ConnectionClosed as exc:
            if events:
                return events  # the close is seen again on the next read
            return self._closed(exc)
        return events + self._parse_batch(ws, batch)


def create(options: Mapping[str, Any]) -> Agent:
    """``AgentFactory`` for the ``elevenlabs`` agent type."""
    return ElevenLabsAgent.from_config(options)
