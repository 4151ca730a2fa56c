"""AssemblyAI Voice Agent adapter: the thin Trio layer over
:mod:`relay.agents.assemblyai_protocol` (shared plumbing:
:class:`relay.agents.session.SessionSocketAgent`).

Config (``[agents.NAME] type = "assemblyai"``): ``url`` (default
``wss://agents.assemblyai.com/v1/ws``), ``api_key`` (environment fallback
``ASSEMBLYAI_API_KEY``), ``instructions`` (the system prompt), ``greeting``, ``voice``
(lowercase, default ``ivy``), ``tools`` (names, HTTP tool tables, schemas: see
:func:`relay.tools.resolve_tools`), ``turn_detection`` and ``session_extra`` (tables sent
as given), ``connect_timeout_s``, ``send_timeout_s``, ``max_protocol_errors``, liveness
(``ping_interval_s``, ``dead_after_s``) and recovery (``reconnect``, ``reconnect_timeout_s``,
``resume``).

Connect: handshake (``Authorization: Bearer``) -> ``session.update`` (μ-law 8 kHz both ways,
so Twilio's audio passes through untouched) -> wait for ``session.ready`` (no audio before
it; the API refuses it). The greeting is the API's own ``greeting`` field: the agent speaks
first. Bounded by ``connect_timeout_s``; failures are ``AgentError`` (kind
``agent_connect``, ``agent_connect_timeout`` or ``agent_session``).

Recovery (``reconnect = true``): a lost connection (closed abnormally, or found dead by the
liveness watchdog) is resumed with ``session.resume`` within the API's 30 s window
(``resume = false`` skips that); when the resume is refused, a new session is opened with
the conversation so far in its system prompt and no greeting. The engine sees none of it
(events keep flowing; caller audio during the gap is dropped). Without ``reconnect`` the call
ends with end reason "agent disconnected".

DTMF: the API has no way to take it; the engine records it in the call record.
The API key is never logged; ``repr`` shows it masked.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import trio

from ..errors import AgentError
from ..media import websocket
from ..tools import ToolRegistry
from .assemblyai_protocol import DEFAULT_URL, AssemblyAIOptions, AssemblyAIProtocol
from .base import TWILIO_FORMAT, AgentEvent
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
    option_bool,
    option_seconds,
    option_str,
    option_table,
    tool_options,
)
from .session import SessionSocketAgent, opening
from .wire import mask_secret

__all__ = ["RESUME_WINDOW_S", "AssemblyAIAgent", "create"]

log = logging.getLogger("relay.agents.assemblyai")

#: "Sessions are preserved for 30 seconds after every disconnection."
RESUME_WINDOW_S = 30.0

_KNOWN_KEYS = frozenset(
    {
        "url",
        "api_key",
        "instructions",
        "greeting",
        "voice",
        "tools",
        "tool_registry",
        "turn_detection",
        "session_extra",
        "connect_timeout_s",
        "send_timeout_s",
        "max_protocol_errors",
        "resume",
        *LIVENESS_KEYS,
        *RECONNECT_KEYS,
    }
)


class AssemblyAIAgent(SessionSocketAgent):
    name: ClassVar[str] = "assemblyai"
    vendor: ClassVar[str] = "assemblyai"
    label: ClassVar[str] = "AssemblyAI"
    protocol: AssemblyAIProtocol
    input_format = TWILIO_FORMAT
    output_format = TWILIO_FORMAT

    def __init__(
        self,
        options: AssemblyAIOptions,
        *,
        tools: ToolRegistry | None = None,
        liveness: LivenessOptions | None = None,
        reconnect: bool = False,
        reconnect_timeout_s: float = DEFAULT_RECONNECT_TIMEOUT_S,
        resume: bool = True,
        max_protocol_errors: int = 10,
    ) -> None:
        super().__init__(
            liveness=liveness,
            reconnect=reconnect,
            reconnect_timeout_s=reconnect_timeout_s,
            max_protocol_errors=max_protocol_errors,
        )
        self.options = options
        self.protocol = AssemblyAIProtocol(options)
        #: Registry that runs the tools announced to the agent (None: schemas only).
        self.tools = tools
        self.resume = resume

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> AssemblyAIAgent:
        check_option_keys("assemblyai", options, _KNOWN_KEYS)
        schemas, registry = tool_options(options)
        session = cls.session_options(options)
        opts = AssemblyAIOptions(
            url=option_str(options, "url", DEFAULT_URL),
            api_key=api_key(options, "ASSEMBLYAI_API_KEY", "assemblyai"),
            instructions=option_str(options, "instructions"),
            greeting=option_str(options, "greeting"),
            voice=option_str(options, "voice", "ivy"),
            tools=schemas,
            turn_detection=option_table(options, "turn_detection"),
            session_extra=option_table(options, "session_extra"),
            connect_timeout_s=option_seconds(options, "connect_timeout_s", 10.0),
            send_timeout_s=option_seconds(options, "send_timeout_s", 2.0),
        )
        return cls(opts, tools=registry, resume=option_bool(options, "resume", True), **session)

    def __repr__(self) -> str:
        o = self.options
        return (
            f"AssemblyAIAgent(url={o.url!r}, voice={o.voice!r}, reconnect={self.reconnect!r}, "
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
                then="session.ready",
            )
            proto.begin_connection(mode)
            if mode == "resume":
                # closed instead of answering session.resume: resuming is over, try a new
                # session
                setup.closed_kind = "agent_resume_refused"
                await ws.send_text(proto.session_resume())
            else:
                context = conversation_context(proto.history) if mode == "seeded" else ""
                await ws.send_text(proto.session_update(context=context, greeting=mode == "new"))
            await self._read_setup(ws, lambda: proto.ready, lambda _: self._refused(mode))
        log.info(
            "assemblyai session %s %s (call %s)",
            proto.session_id,
            {"new": "ready", "resume": "resumed", "seeded": "re-opened"}[mode],
            self.call.call_sid if self.call else "?",
        )
        return ws

    def _refused(self, mode: str) -> AgentError | None:
        """A ``session.error`` before ``session.ready`` fails the connect (a refused resume
        with kind ``agent_resume_refused``, so a new session can be tried)."""
        error = self.protocol.session_error
        if error is None:
            return None
        if mode == "resume":
            return AgentError(
                f"AssemblyAI session.resume refused: {error.code}: {error.message}",
                kind="agent_resume_refused",
            )
        return AgentError(
            f"AssemblyAI session failed: {error.code}: {error.message}", kind="agent_session"
        )

    def _can_resume(self) -> bool:
        if not self.resume or self.protocol.session_id is None:
            return False
        lost = self._lost_at
        return lost is None or trio.current_time() - lost < RESUME_WINDOW_S

    def _session_lost(self) -> list[AgentEvent]:
        return self.protocol.connection_lost()

    def _goodbye(self) -> list[str]:
        return [self.protocol.session_end()] if self.protocol.ready else []

    # -- sending (non-blocking; see Agent) -------------------------------------------------
    def send_audio_b64(self, payload: str) -> None:
        """Passthrough: Twilio's base64 string goes into ``input.audio`` untouched."""
        self.send_audio_b64_many([payload])

    def audio_splice(self) -> tuple[websocket.WebSocket, bytes, bytes] | None:
        return self._spliced(self.protocol.input_audio_parts)

    def send_audio_b64_many(self, payloads: list[str]) -> None:
        # Frames that arrived in one read leave in one write (one syscall).
        proto = self.protocol
        self._send_audio_spliced(proto.input_audio_parts, payloads, proto.input_audio_b64)

    def send_audio(self, audio: bytes) -> None:
        self._send_audio_encoded(self.protocol.input_audio_parts, audio)

    def send_tool_result(self, call_id: str, output: str) -> None:
        """Sent after the ``reply.done`` of the reply that made the call (documented order);
        held until then."""
        self._send_texts(self.protocol.tool_result(call_id, output))

    # -- receiving -----------------------------------------------------------------------
    def _parse(self, batch: list[str | bytes]) -> list[AgentEvent]:
        proto = self.protocol
        events = super()._parse(batch)
        if proto.outbox:
            self._send_texts(proto.take_outbox())
        if proto.ended:
            self._session_over = True
        return events


def create(options: Mapping[str, Any]) -> AssemblyAIAgent:
    """``AgentFactory`` for the ``assemblyai`` agent type."""
    return AssemblyAIAgent.from_config(options)
