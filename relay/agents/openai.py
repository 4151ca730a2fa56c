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

Liveness: :meth:`run` pings the socket and raises AgentError ``agent_disconnected`` when the
peer goes silent (``ping_interval_s``, ``dead_after_s``; relay.agents.liveness). A Realtime
session cannot be resumed: a dead connection ends the call. What every WebSocket adapter
shares (setup errors, parsing, receiving, closing) is :class:`relay.agents.session.SocketAgent`.

The API key is never logged; ``repr`` shows it masked (``sk-…abcd``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

from ..errors import AgentError
from ..tools import ToolRegistry
from .base import Agent, AgentEvent, AudioFormat, CallInfo
from .liveness import LIVENESS_KEYS, LivenessOptions
from .openai_protocol import DEFAULT_URL, OpenAIOptions, OpenAIRealtimeProtocol
from .options import (
    api_key,
    as_bool,
    as_number,
    as_table,
    tool_options,
    warn_unknown_keys,
)
from .session import SocketAgent, first_fatal, opening
from .wire import mask_secret

__all__ = ["OpenAIRealtimeAgent", "create", "options_from_config"]

log = logging.getLogger("relay.agents.openai")

_FORMATS = {"pcmu": AudioFormat("mulaw", 8000), "pcm24k": AudioFormat("pcm16", 24000)}
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


class OpenAIRealtimeAgent(SocketAgent):
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
    ) -> None:
        super().__init__(liveness=liveness, max_protocol_errors=max_protocol_errors)
        self.options = options
        self.protocol = OpenAIRealtimeProtocol(options)
        self.input_format = self.output_format = _FORMATS[options.audio]
        #: Registry that can execute the tools announced to the model (None: schemas only).
        self.tools = tools

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> OpenAIRealtimeAgent:
        opts, tools, max_errors = options_from_config(options)
        liveness = LivenessOptions.from_config(options)
        return cls(opts, tools=tools, max_protocol_errors=max_errors, liveness=liveness)

    def __repr__(self) -> str:
        o = self.options
        return (
            f"OpenAIRealtimeAgent(url={o.url!r}, model={o.model!r}, api={o.api!r}, "
            f"audio={o.audio!r}, voice={o.voice!r}, api_key={mask_secret(o.api_key)!r})"
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
                then="session.updated",
            )
            await ws.send_text(proto.session_update())
            if o.wait_for_session:
                await self._read_setup(ws, lambda: proto.configured, self._refused)
            greeting = proto.greeting_messages()
            if greeting:
                await ws.send_texts(greeting)
        log.info(
            "openai session %s configured (model=%s api=%s audio=%s call=%s)",
            proto.session_id,
            o.model,
            o.api,
            o.audio,
            call.call_sid,
        )

    def _refused(self, events: list[AgentEvent]) -> AgentError | None:
        """A rejected session.update or a fatal error fails the connect."""
        event = first_fatal(events)
        if event is None:
            return None
        return AgentError(
            f"OpenAI Realtime session failed: {event.code}: {event.message}", kind="agent_session"
        )

    # -- sending (non-blocking; see Agent) -------------------------------------------------
    def send_audio_b64(self, payload: str) -> None:
        """Passthrough: Twilio's base64 string goes into the append message untouched."""
        self._socket().send_text_nowait(self.protocol.append_audio_b64(payload))

    def send_audio_b64_many(self, payloads: list[str]) -> None:
        # Frames that arrived in one read leave in one write (one syscall).
        append = self.protocol.append_audio_b64
        self._socket().send_texts_nowait([append(p) for p in payloads])

    def send_audio(self, audio: bytes) -> None:
        self._socket().send_text_nowait(self.protocol.append_audio(audio))

    def truncate(self, response_id: str, audio_end_ms: int) -> None:
        """``conversation.item.truncate`` for the assistant item; ``audio_end_ms`` is clamped
        to the audio generated so far. Items this session never produced audio for are
        skipped (the server would answer with an error)."""
        if not self.protocol.knows_item(response_id):
            return
        self._socket().send_text_nowait(self.protocol.truncate(response_id, audio_end_ms))

    def send_tool_result(self, call_id: str, output: str) -> None:
        self._socket().send_texts_nowait(self.protocol.tool_result(call_id, output))

    def cancel_response(self) -> None:
        self._socket().send_text_nowait(self.protocol.cancel_response())


def create(options: Mapping[str, Any]) -> Agent:
    """``AgentFactory`` for the ``openai`` agent type."""
    return OpenAIRealtimeAgent.from_config(options)
