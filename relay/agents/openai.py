"""OpenAI Realtime adapter: the thin Trio layer over :mod:`relay.agents.openai_protocol`.

One WebSocket per call (``relay.media.websocket.connect``); every send is bounded by the
socket's ``send_timeout`` and serialised by its writer lock, so the engine may call
``send_*`` from the Twilio reader task while another task runs :meth:`receive`.

Connect sequence: handshake (``Authorization: Bearer``, beta adds ``OpenAI-Beta``) ->
``session.update`` -> wait for ``session.updated`` (optional, bounded) -> greeting. The
whole sequence is bounded by ``connect_timeout_s``; any failure is an ``AgentError``
(kind ``agent_connect`` / ``agent_connect_timeout`` / ``agent_session``).

Malformed input from OpenAI (bad JSON, a binary frame, wrongly typed fields): one bad
message loses at most one audio chunk, so it becomes a non-fatal
``AgentErrorEvent("agent_protocol", ...)`` and the call goes on; after
``max_protocol_errors`` of them in one session the peer is clearly broken, the socket is
closed (1002) and :meth:`receive` raises ``AgentError`` (kind ``agent_protocol``).

Liveness: :meth:`run` pings the socket and finds a dead peer (``ping_interval_s``,
``dead_after_s``; relay.agents.liveness); a reader or a send finds a dropped one.

Recovery (``reconnect = true``, ``reconnect_timeout_s``): a Realtime session cannot be
resumed, so a lost connection is replaced by a new session with the same
``session.update`` (instructions, plus a note that the call continues, voice, tools,
audio formats) seeded with the conversation so far: one ``conversation.item.create`` per
caller/agent text turn of the transcripts (an interrupted agent turn cut to what the
caller heard; caller turns need ``transcription_model``). No greeting and no
``response.create``: the model waits for the caller. Caller audio sent while the new
session is set up is kept (at most :data:`RECONNECT_BUFFER_MS`) and sent once it is
seeded; the reply that was playing ends; results of tool calls the old session issued
are dropped (the new one never made them). The engine sees none of it (it reads through
:meth:`receive`). Without ``reconnect``, or when no session comes back within
``reconnect_timeout_s``, :meth:`run` raises AgentError ``agent_disconnected`` and the
call ends with "agent disconnected". What the WebSocket adapters share (setup errors,
parsing, receiving, closing, recovery) is :class:`relay.agents.session.SessionSocketAgent`;
with ``reconnect`` off the engine's reactor reads the socket directly, as before.

The API key is never logged; ``repr`` shows it masked (``sk-…abcd``).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from typing import Any, ClassVar

from ..errors import AgentError, ConnectionClosed
from ..media import codec, websocket
from ..tools import ToolRegistry
from .base import Agent, AgentEvent, AudioBooks, AudioFormat
from .liveness import (
    DEFAULT_RECONNECT_TIMEOUT_S,
    LIVENESS_KEYS,
    RECONNECT_KEYS,
    LivenessOptions,
    reconnect_options,
)
from .openai_protocol import DEFAULT_URL, OpenAIOptions, OpenAIRealtimeProtocol
from .options import (
    api_key,
    as_bool,
    as_number,
    as_table,
    tool_options,
    warn_unknown_keys,
)
from .session import SessionSocketAgent, first_fatal, opening
from .wire import mask_secret

__all__ = ["OpenAIRealtimeAgent", "create", "options_from_config"]

log = logging.getLogger("relay.agents.openai")

_FORMATS = {"pcmu": AudioFormat("mulaw", 8000), "pcm24k": AudioFormat("pcm16", 24000)}

#: Caller audio kept while a lost connection is replaced (the newest is kept).
RECONNECT_BUFFER_MS = 2000
_KNOWN_KEYS = frozenset(
    {
        "type",
        "name",
        "url",
        "api_key",
        "model",
        "voice",
        "audio",
        "api",
        "instructions",
        "greeting",
        "connect_timeout_s",
        "send_timeout_s",
        "tools",
        "tool_registry",
        "transcription_model",
        "turn_detection",
        "tool_choice",
        "session_extra",
        "wait_for_session",
        "max_protocol_errors",
        *LIVENESS_KEYS,
        *RECONNECT_KEYS,
    }
)


def options_from_config(
    options: Mapping[str, Any],
) -> tuple[OpenAIOptions, ToolRegistry | None, int]:
    """Config keys of ``[agents.<name>]`` (ARCHITECTURE.md) -> (options, tools, max errors)."""
    warn_unknown_keys("openai", options, _KNOWN_KEYS, log)
    key = api_key(options, "OPENAI_API_KEY", "openai")
    tools, registry = tool_options(options)
    transcription = options.get("transcription_model") or None
    opts = OpenAIOptions(
        url=str(options.get("url") or DEFAULT_URL),
        api_key=key,
        model=str(options.get("model") or "gpt-realtime"),
        voice=str(options.get("voice") or "marin"),
        audio=str(options.get("audio") or "pcmu"),
        api=str(options.get("api") or "ga"),
        instructions=str(options.get("instructions") or ""),
        greeting=str(options.get("greeting") or ""),
        tools=tools,
        transcription_model=str(transcription) if transcription else None,
        turn_detection=as_table("turn_detection", options.get("turn_detection")),
        tool_choice=str(options.get("tool_choice") or "auto"),
        session_extra=as_table("session_extra", options.get("session_extra")),
        connect_timeout_s=as_number("connect_timeout_s", options.get("connect_timeout_s", 10)),
        send_timeout_s=as_number("send_timeout_s", options.get("send_timeout_s", 2)),
        wait_for_session=as_bool("wait_for_session", options.get("wait_for_session", True)),
    )
    max_errors = int(as_number("max_protocol_errors", options.get("max_protocol_errors", 10)))
    return opts, registry, max_errors


class OpenAIRealtimeAgent(SessionSocketAgent):
    name: ClassVar[str] = "openai"
    vendor: ClassVar[str] = "openai"
    label: ClassVar[str] = "OpenAI Realtime"
    supports_truncate: ClassVar[bool] = True
    protocol: OpenAIRealtimeProtocol

    def __init__(
        self,
        options: OpenAIOptions,
        *,
        tools: ToolRegistry | None = None,
        max_protocol_errors: int = 10,
        liveness: LivenessOptions | None = None,
        reconnect: bool = False,
        reconnect_timeout_s: float = DEFAULT_RECONNECT_TIMEOUT_S,
    ) -> None:
        super().__init__(
            liveness=liveness,
            reconnect=reconnect,
            reconnect_timeout_s=reconnect_timeout_s,
            max_protocol_errors=max_protocol_errors,
        )
        self.options = options
        self.protocol = OpenAIRealtimeProtocol(options)
        self.input_format = self.output_format = _FORMATS[options.audio]
        #: Registry that can execute the tools announced to the model (None: schemas only).
        self.tools = tools
        # caller audio (append messages, audio bytes) held while a new session is set up
        self._backlog: deque[tuple[str, int]] = deque()
        self._backlog_bytes = 0
        self._backlog_limit = RECONNECT_BUFFER_MS * self.protocol.bytes_per_ms
        #: caller audio messages kept during recoveries / dropped from a full backlog
        self.kept_audio = 0
        self.dropped_audio = 0

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> OpenAIRealtimeAgent:
        opts, tools, max_errors = options_from_config(options)
        liveness = LivenessOptions.from_config(options)
        reconnect, reconnect_timeout_s = reconnect_options(options)
        return cls(
            opts,
            tools=tools,
            max_protocol_errors=max_errors,
            liveness=liveness,
            reconnect=reconnect,
            reconnect_timeout_s=reconnect_timeout_s,
        )

    def __repr__(self) -> str:
        o = self.options
        return (
            f"OpenAIRealtimeAgent(url={o.url!r}, model={o.model!r}, api={o.api!r}, "
            f"audio={o.audio!r}, voice={o.voice!r}, reconnect={self.reconnect!r}, "
            f"api_key={mask_secret(o.api_key)!r})"
        )

    # -- sessions --------------------------------------------------------------------------
    async def _open_session(self, mode: str) -> websocket.WebSocket:
        """mode "new": configure, then the greeting; "seeded" (after a lost connection):
        the same configuration, then the conversation so far as items and the caller audio
        kept meanwhile; no greeting."""
        o = self.options
        proto = self.protocol
        seeded = mode != "new"
        async with opening(self.label, o.connect_timeout_s) as setup:
            ws = await setup.handshake(
                proto.ws_url(),
                proto.handshake_headers(),
                send_timeout_s=o.send_timeout_s,
                then="session.updated",
            )
            if isinstance(ws.parser, codec.ServerFrameParser):
                # audio deltas come out of the compiled frame reader already parsed
                # (OpenAIRealtimeProtocol.parse_message takes both forms)
                ws.parser.openai_audio = True
            if seeded:
                proto.begin_connection()
            await ws.send_text(proto.session_update(seeded=seeded))
            if o.wait_for_session:
                await self._read_setup(ws, lambda: proto.configured, self._refused)
            first = proto.seed_messages() if seeded else proto.greeting_messages()
            if first:
                await ws.send_texts(first)
        # No checkpoint from here until the caller swaps the socket in: audio that arrives
        # meanwhile cannot slip in between the backlog and what follows it.
        if self._backlog:
            ws.send_texts_nowait([message for message, _ in self._backlog])
            self._backlog.clear()
            self._backlog_bytes = 0
        log.info(
            "openai session %s %s (model=%s api=%s audio=%s call=%s)",
            proto.session_id,
            "re-opened with the conversation so far" if seeded else "configured",
            o.model,
            o.api,
            o.audio,
            self.call.call_sid if self.call else "?",
        )
        return ws

    def _refused(self, events: list[AgentEvent]) -> AgentError | None:
        """A rejected session.update or a fatal error fails the connect."""
        event = first_fatal(events)
        if event is None:
            return None
        return AgentError(
            f"OpenAI Realtime session failed: {event.code}: {event.message}", kind="agent_session"
        )

    def _session_lost(self) -> list[AgentEvent]:
        return self.protocol.connection_lost()

    # -- sending (non-blocking; see Agent) -------------------------------------------------
    def _keep(self, messages: list[str], audio_bytes: int) -> None:
        """Hold caller audio while a new session is set up (bounded: the oldest goes)."""
        per_message = audio_bytes // max(1, len(messages))
        for message in messages:
            self._backlog.append((message, per_message))
            self._backlog_bytes += per_message
            self.kept_audio += 1
        while self._backlog and self._backlog_bytes > self._backlog_limit:
            _, n = self._backlog.popleft()
            self._backlog_bytes -= n
            self.dropped_audio += 1

    def send_audio_b64(self, payload: str) -> None:
        """Passthrough: Twilio's base64 string goes into the append message untouched.
        While the connection is being replaced (``reconnect``), the audio is kept for the
        new session instead (hot path: the ``try`` costs nothing until a send fails)."""
        self.send_audio_b64_many([payload])

    def audio_splice(self) -> tuple[websocket.WebSocket, bytes, bytes] | None:
        return self._spliced(self.protocol.append_parts)

    def audio_books(self) -> AudioBooks | None:
        if self.reactor_socket() is None:  # reconnect: the socket may change
            return None
        ws = self._socket()
        parser = ws.parser
        if not isinstance(parser, codec.ServerFrameParser) or not parser.openai_audio:
            return None
        items, truncated = self.protocol.audio_books()
        return AudioBooks(ws, items, truncated, self.protocol)

    def send_audio_b64_many(self, payloads: list[str]) -> None:
        # Frames that arrived in one read leave in one write (one syscall), built and
        # masked in one compiled call; a payload that is not plain base64 is serialised.
        head, tail = self.protocol.append_parts
        try:
            ws = self._socket()
            if not ws.send_b64_texts_nowait(head, payloads, tail):
                append = self.protocol.append_audio_b64
                ws.send_texts_nowait([append(p) for p in payloads])
        except ConnectionClosed as exc:
            self._send_failed(exc)  # re-raised unless a recovery takes over
            append = self.protocol.append_audio_b64
            self._keep([append(p) for p in payloads], sum(len(p) for p in payloads) * 3 // 4)

    def send_audio(self, audio: bytes) -> None:
        # Transcoded (PCM) caller audio: base64, message, frame and mask in one compiled
        # call; the message itself is only made when it has to wait for a new connection.
        head, tail = self.protocol.append_parts
        try:
            self._socket().send_audio_text_nowait(head, audio, tail)
        except ConnectionClosed as exc:
            self._send_failed(exc)
            self._keep([self.protocol.append_audio(audio)], len(audio))

    def truncate(self, response_id: str, audio_end_ms: int) -> None:
        """``conversation.item.truncate`` for the assistant item; ``audio_end_ms`` is clamped
        to the audio generated so far. Items this session never produced audio for are
        skipped (the server would answer with an error); what the caller heard still cuts
        the turn in the history that seeds a new session."""
        proto = self.protocol
        if not proto.knows_item(response_id):
            proto.note_heard(response_id, audio_end_ms)
            return
        self._send_text(proto.truncate(response_id, audio_end_ms))

    def send_tool_result(self, call_id: str, output: str) -> None:
        messages = self.protocol.tool_result(call_id, output)
        if not messages:
            log.warning("openai: result of tool call %r dropped (lost session)", call_id[:80])
        self._send_texts(messages)

    def cancel_response(self) -> None:
        self._send_text(self.protocol.cancel_response())


def create(options: Mapping[str, Any]) -> Agent:
    """``AgentFactory`` for the ``openai`` agent type."""
    return OpenAIRealtimeAgent.from_config(options)
