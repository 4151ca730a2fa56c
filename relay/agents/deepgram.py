"""Deepgram Voice Agent (V1) adapter: the thin Trio layer over
:mod:`relay.agents.deepgram_protocol` (shared plumbing:
:class:`relay.agents.session.SessionSocketAgent`).

Config (``[agents.NAME] type = "deepgram"``): ``url`` (default
``wss://agent.deepgram.com/v1/agent/converse``), ``api_key`` (environment fallback
``DEEPGRAM_API_KEY``), ``instructions`` (the think prompt), ``greeting``, ``voice`` (a
Deepgram TTS model, shorthand for ``speak_model``), ``language``, ``listen_model``,
``think_provider``, ``think_model``, ``speak_model``, or raw ``listen`` / ``think`` /
``speak`` tables, ``tools`` (names, HTTP tool tables, schemas: see
:func:`relay.tools.resolve_tools`), ``settings_extra``, ``keepalive_s`` (default 7),
``connect_timeout_s``, ``send_timeout_s``, ``max_protocol_errors``, liveness
(``ping_interval_s``, ``dead_after_s``) and recovery (``reconnect``, ``reconnect_timeout_s``).

Connect: handshake (``Authorization: Token <key>``) -> ``Settings`` (μ-law 8 kHz both ways,
container none) -> wait for ``SettingsApplied``; bounded by ``connect_timeout_s``. The
greeting is Deepgram's own ``agent.greeting``: the agent speaks first.

Audio: Twilio's base64 payload is decoded once and sent as a binary frame of raw μ-law
(frames that arrived in one read go as one frame); the agent's binary frames are μ-law
too. ``KeepAlive`` goes out when nothing was sent for ``keepalive_s`` (the liveness
watchdog's idle hook), which with Twilio's steady 20 ms media only happens when the uplink
stalls.

Recovery (``reconnect = true``): Deepgram cannot resume a session, so a lost connection is
replaced by a new session whose prompt carries the conversation so far (no greeting); the
engine sees none of it. Without ``reconnect`` the call ends with "agent disconnected".

DTMF: the API cannot take it; the engine records it in the call record.
The API key is never logged; ``repr`` shows it masked.
"""

from __future__ import annotations

import binascii
import logging
from collections.abc import Mapping
from typing import Any, ClassVar

from ..errors import AgentError
from ..media import websocket
from ..tools import ToolRegistry
from .base import TWILIO_FORMAT, AgentEvent
from .deepgram_protocol import DEFAULT_URL, DeepgramOptions, DeepgramProtocol
from .liveness import (
    DEFAULT_RECONNECT_TIMEOUT_S,
    LIVENESS_KEYS,
    RECONNECT_KEYS,
    LivenessOptions,
    conversation_context,
)
from .options import (
    api_key,
    check_option_keys,
    option_seconds,
    option_str,
    option_table,
    tool_options,
)
from .session import SessionSocketAgent, opening
from .wire import mask_secret

__all__ = ["DeepgramAgent", "create"]

log = logging.getLogger("relay.agents.deepgram")

_KNOWN_KEYS = frozenset(
    {
        "url",
        "api_key",
        "instructions",
        "greeting",
        "voice",
        "language",
        "listen_model",
        "think_provider",
        "think_model",
        "speak_model",
        "listen",
        "think",
        "speak",
        "tools",
        "tool_registry",
        "settings_extra",
        "keepalive_s",
        "connect_timeout_s",
        "send_timeout_s",
        "max_protocol_errors",
        *LIVENESS_KEYS,
        *RECONNECT_KEYS,
    }
)

_a2b = binascii.a2b_base64


class DeepgramAgent(SessionSocketAgent):
    name: ClassVar[str] = "deepgram"
    vendor: ClassVar[str] = "deepgram"
    label: ClassVar[str] = "Deepgram"
    protocol: DeepgramProtocol
    input_format = TWILIO_FORMAT
    output_format = TWILIO_FORMAT

    def __init__(
        self,
        options: DeepgramOptions,
        *,
        tools: ToolRegistry | None = None,
        liveness: LivenessOptions | None = None,
        reconnect: bool = False,
        reconnect_timeout_s: float = DEFAULT_RECONNECT_TIMEOUT_S,
        max_protocol_errors: int = 10,
    ) -> None:
        super().__init__(
            liveness=(liveness or LivenessOptions()).with_keepalive(options.keepalive_s),
            reconnect=reconnect,
            reconnect_timeout_s=reconnect_timeout_s,
            max_protocol_errors=max_protocol_errors,
        )
        self.options = options
        self.protocol = DeepgramProtocol(options)
        #: Registry that runs the tools announced to the agent (None: schemas only).
        self.tools = tools
        self.keepalives_sent = 0
        self.bad_payloads = 0

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> DeepgramAgent:
        check_option_keys("deepgram", options, _KNOWN_KEYS)
        schemas, registry = tool_options(options)
        session = cls.session_options(options)
        speak_model = option_str(options, "speak_model") or option_str(
            options, "voice", "aura-2-thalia-en"
        )
        opts = DeepgramOptions(
            url=option_str(options, "url", DEFAULT_URL),
            api_key=api_key(options, "DEEPGRAM_API_KEY", "deepgram"),
            instructions=option_str(options, "instructions"),
            greeting=option_str(options, "greeting"),
            language=option_str(options, "language", "en"),
            listen_model=option_str(options, "listen_model", "nova-3"),
            think_provider=option_str(options, "think_provider", "open_ai"),
            think_model=option_str(options, "think_model", "gpt-4o-mini"),
            speak_model=speak_model,
            listen=option_table(options, "listen"),
            think=option_table(options, "think"),
            speak=option_table(options, "speak"),
            tools=schemas,
            settings_extra=option_table(options, "settings_extra"),
            connect_timeout_s=option_seconds(options, "connect_timeout_s", 10.0),
            send_timeout_s=option_seconds(options, "send_timeout_s", 2.0),
            keepalive_s=option_seconds(options, "keepalive_s", 7.0),
        )
        return cls(opts, tools=registry, **session)

    def __repr__(self) -> str:
        o = self.options
        return (
            f"DeepgramAgent(url={o.url!r}, think={o.think_provider}/{o.think_model}, "
            f"speak={o.speak_model!r}, reconnect={self.reconnect!r}, "
            f"api_key={mask_secret(o.api_key)!r})"
        )

    # -- sessions ---------------------------------------------------------------------------
    async def _open_session(self, mode: str) -> websocket.WebSocket:
        o = self.options
        proto = self.protocol
        async with opening(self.label, o.connect_timeout_s) as setup:
            ws = await setup.handshake(
                o.url,
                proto.handshake_headers(),
                send_timeout_s=o.send_timeout_s,
                then="SettingsApplied",
            )
            proto.begin_connection()
            context = conversation_context(proto.history) if mode != "new" else ""
            # Settings right away, before any audio (Welcome may come before or after).
            await ws.send_text(proto.settings(context=context, greeting=mode == "new"))
            await self._read_setup(ws, lambda: proto.configured, self._refused)
        log.info(
            "deepgram session %s %s (call %s)",
            proto.request_id,
            "configured" if mode == "new" else "re-opened with the conversation so far",
            self.call.call_sid if self.call else "?",
        )
        return ws

    def _refused(self, events: list[AgentEvent]) -> AgentError | None:
        """An ``Error`` before ``SettingsApplied`` fails the connect."""
        error = self.protocol.session_error
        if error is None:
            return None
        return AgentError(
            f"Deepgram refused the settings: {error.code}: {error.message}", kind="agent_session"
        )

    def _session_lost(self) -> list[AgentEvent]:
        return self.protocol.connection_lost()

    def _on_idle(self) -> None:
        """``KeepAlive`` while no audio flows (Deepgram closes a silent session)."""
        self.keepalives_sent += 1
        self._send_text(self.protocol.keepalive())

    # -- sending (non-blocking; see Agent) -------------------------------------------------
    def send_audio_b64(self, payload: str) -> None:
        """Twilio's base64 payload decoded once, sent as one binary frame of raw μ-law."""
        try:
            audio = _a2b(payload)
        except binascii.Error:
            self.bad_payloads += 1  # not base64 (a broken or hostile peer): drop the frame
            return
        self._send_bytes(audio)

    def send_audio_b64_many(self, payloads: list[str]) -> None:
        # Frames that arrived in one read leave as one binary frame (one syscall).
        try:
            audio = b"".join([_a2b(p) for p in payloads])
        except binascii.Error:
            for payload in payloads:
                self.send_audio_b64(payload)
            return
        self._send_bytes(audio)

    def send_audio(self, audio: bytes) -> None:
        self._send_bytes(audio)

    def send_tool_result(self, call_id: str, output: str) -> None:
        """``FunctionCallResponse`` (never for a cancelled or unknown call)."""
        message = self.protocol.function_response(call_id, output)
        if message is not None:
            self._send_text(message)

    # -- receiving -----------------------------------------------------------------------
    def _parse(self, batch: list[str | bytes]) -> list[AgentEvent]:
        events = super()._parse(batch)
        if self.protocol.ended:
            self._session_over = True
        return events


def create(options: Mapping[str, Any]) -> DeepgramAgent:
    """``AgentFactory`` for the ``deepgram`` agent type."""
    return DeepgramAgent.from_config(options)
