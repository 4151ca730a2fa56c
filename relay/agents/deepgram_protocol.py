"""Sans-IO core of the Deepgram Voice Agent (V1) adapter: wire messages in,
:mod:`relay.agents.base` events out, and the client messages the adapter sends. No sockets,
no Trio, no clocks.

Rules followed (``/work/shared/reference/voice-agent-apis.md``, "Deepgram Voice Agent API
(V1)", and Deepgram's Voice Agent docs):

* ``Settings`` is the first message and names μ-law 8 kHz both ways, output container
  ``none`` (input otherwise defaults to linear16 16 kHz), so Twilio's audio passes through
  untouched. Audio goes both ways as **binary** frames of raw μ-law (the adapter decodes
  Twilio's base64 payload once); control messages are JSON text.
* Agent audio has no reply id: replies are numbered here (``"<session>:<n>"``); a new one
  starts after ``AgentAudioDone`` (the last chunk of a reply was sent), at
  ``AgentStartedSpeaking``, and at ``UserStartedSpeaking`` (barge-in: the engine clears
  Twilio and drops the interrupted reply; Deepgram stops that reply's audio there, so what
  follows belongs to the next one).
* ``ConversationText`` (``role`` user/assistant, ``content``) -> final transcripts, kept in
  :attr:`DeepgramProtocol.history` to seed a new session after a lost connection.
* Tools: ``FunctionCallRequest`` ``functions[]``; only ``client_side`` ones are the relay's
  (-> :class:`AgentToolCall`; the server runs the others). ``FunctionCallCancelled``: the
  call is void, its result is never sent; nor is one for an id never announced.
* ``Error`` is fatal (the engine plays what it holds and hangs up with end reason
  ``agent error: <code>``), ``Warning`` is not.
* ``KeepAlive`` (:meth:`DeepgramProtocol.keepalive`) while no audio flows.

Malformed input (bad JSON, wrongly typed fields) raises :class:`RemoteProtocolError` with
kind ``agent_protocol``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .base import (
    AgentAudio,
    AgentErrorEvent,
    AgentEvent,
    AgentHangup,
    AgentResponseDone,
    AgentSpeechStarted,
    AgentToolCall,
    AgentTranscript,
)
from .wire import (
    EventDispatcher,
    bad_event,
    check_header_secret,
    check_ws_url,
    deep_merge,
    dumps,
    join_prompt,
    mask_secret,
    normalize_tool,
    opt_str,
    tool_arguments,
)

__all__ = ["DEFAULT_URL", "DeepgramOptions", "DeepgramProtocol"]

log = logging.getLogger("relay.agents.deepgram")

DEFAULT_URL = "wss://agent.deepgram.com/v1/agent/converse"

MAX_TRACKED_CALLS = 256
MAX_HISTORY = 200
_ROLES = {"user": "caller", "assistant": "agent", "agent": "agent"}


@dataclass(frozen=True, slots=True)
class DeepgramOptions:
    """Everything a Deepgram Voice Agent session is configured with.

    ``listen``/``think``/``speak``: raw tables for ``agent.listen`` / ``agent.think`` /
    ``agent.speak`` (any provider the API knows); when absent they are built from
    ``listen_model`` (Deepgram STT), ``think_provider`` + ``think_model`` and
    ``speak_model`` (Deepgram TTS). The prompt (``instructions``) and the functions
    (``tools``) always go into ``agent.think``. ``settings_extra`` is deep-merged into the
    ``Settings`` message (``tags``, ``mip_opt_out``, new fields)."""

    url: str = DEFAULT_URL
    api_key: str = field(default="", repr=False)
    instructions: str = ""
    greeting: str = ""
    language: str = "en"
    listen_model: str = "nova-3"
    think_provider: str = "open_ai"
    think_model: str = "gpt-4o-mini"
    speak_model: str = "aura-2-thalia-en"
    listen: Mapping[str, Any] | None = None
    think: Mapping[str, Any] | None = None
    speak: Mapping[str, Any] | None = None
    tools: Sequence[Mapping[str, Any]] = ()
    settings_extra: Mapping[str, Any] | None = None
    connect_timeout_s: float = 10.0
    send_timeout_s: float = 2.0
    #: KeepAlive after this long without sending (Deepgram closes idle sessions at ~10 s).
    keepalive_s: float = 7.0

    def __post_init__(self) -> None:
        check_ws_url(self.url)
        for key in ("connect_timeout_s", "send_timeout_s", "keepalive_s"):
            if not (getattr(self, key) > 0):
                raise ConfigError(f"agents.*.{key}: must be > 0")
        check_header_secret(self.api_key)
        for key in ("listen_model", "think_provider", "think_model", "speak_model"):
            if not getattr(self, key):
                raise ConfigError(f"agents.*.{key}: must not be empty")
        object.__setattr__(self, "tools", tuple(normalize_tool(t) for t in self.tools))

    def __repr__(self) -> str:
        return (
            f"DeepgramOptions(url={self.url!r}, think={self.think_provider}/{self.think_model}, "
            f"speak={self.speak_model!r}, tools={len(self.tools)}, "
            f"api_key={mask_secret(self.api_key)!r})"
        )


class DeepgramProtocol(EventDispatcher):
    """State of one call's Deepgram Voice Agent session(s) as seen from the relay."""

    def __init__(self, options: DeepgramOptions) -> None:
        super().__init__()
        self.options = options
        self.welcomed = False
        #: True once ``SettingsApplied`` arrived on the current connection.
        self.configured = False
        self.request_id: str | None = None
        #: The first ``Error`` before ``SettingsApplied`` (connect fails with it).
        self.session_error: AgentErrorEvent | None = None
        #: The server sent ``Error``: the session is over, no recovery.
        self.ended = False
        self.generation = 1
        self.audio_in_bytes = 0
        self.dropped_results = 0
        self.server_side_calls = 0
        #: Final transcripts of both sides, (role, text): seeds a new session.
        self.history: deque[tuple[str, str]] = deque(maxlen=MAX_HISTORY)
        self._n = 0
        self._rid = f"{self.generation}:{self._n}"
        self._rid_audio = False  # the current reply has produced audio
        self._calls: dict[str, str] = {}  # client-side call id -> function name
        self._cancelled: dict[str, None] = {}
        h = self._handlers
        h["Welcome"] = type(self)._on_welcome
        h["SettingsApplied"] = type(self)._on_settings_applied
        h["UserStartedSpeaking"] = type(self)._on_user_started
        h["AgentStartedSpeaking"] = type(self)._on_agent_started
        h["AgentAudioDone"] = type(self)._on_audio_done
        h["ConversationText"] = type(self)._on_text
        h["FunctionCallRequest"] = type(self)._on_function_request
        h["FunctionCallCancelled"] = type(self)._on_function_cancelled
        h["Error"] = type(self)._on_error
        h["Warning"] = type(self)._on_warning

    # -- client messages ---------------------------------------------------------------
    def handshake_headers(self) -> list[tuple[str, str]]:
        return [("Authorization", f"Token {self.options.api_key}")]

    def settings(self, *, context: str = "", greeting: bool = True) -> str:
        """The ``Settings`` message. ``context`` (the conversation so far) is appended to
        the prompt; ``greeting`` False leaves the greeting out (a continued call)."""
        o = self.options
        prompt = join_prompt(o.instructions, context)
        listen = (
            dict(o.listen)
            if o.listen
            else {"provider": {"type": "deepgram", "model": o.listen_model}}
        )
        think: dict[str, Any] = (
            deep_merge({}, o.think)
            if o.think
            else {"provider": {"type": o.think_provider, "model": o.think_model}}
        )
        if prompt:
            think["prompt"] = prompt
        if o.tools:
            think["functions"] = [
                {"name": t["name"], "description": t["description"], "parameters": t["parameters"]}
                for t in o.tools
            ]
        speak = (
            dict(o.speak) if o.speak else {"provider": {"type": "deepgram", "model": o.speak_model}}
        )
        agent: dict[str, Any] = {
            "language": o.language,
            "listen": listen,
            "think": think,
            "speak": speak,
        }
        if greeting and o.greeting:
            agent["greeting"] = o.greeting
        message: dict[str, Any] = {
            "type": "Settings",
            "audio": {
                "input": {"encoding": "mulaw", "sample_rate": 8000},
                "output": {"encoding": "mulaw", "sample_rate": 8000, "container": "none"},
            },
            "agent": agent,
        }
        if o.settings_extra:
            deep_merge(message, o.settings_extra)
        return dumps(message)

    def keepalive(self) -> str:
        return '{"type":"KeepAlive"}'

    def function_response(self, call_id: str, output: str) -> str | None:
        """The ``FunctionCallResponse`` for a client-side call, or None when it must not be
        sent: the call was cancelled (``FunctionCallCancelled``), never announced, already
        answered, or belongs to a session that no longer exists."""
        name = self._calls.pop(call_id, None)
        if name is None:
            self.dropped_results += 1
            why = "cancelled" if call_id in self._cancelled else "unknown"
            log.info("deepgram: not answering %s function call %r", why, call_id[:80])
            return None
        return dumps(
            {"type": "FunctionCallResponse", "id": call_id, "name": name, "content": output}
        )

    # -- connection lifecycle ------------------------------------------------------------
    def begin_connection(self) -> None:
        """A new connection (and session) is being opened; calls of the old one are void."""
        self.welcomed = False
        self.configured = False
        self.session_error = None
        if self._n or self._rid_audio or self.events_in:
            self.generation += 1
            self._n = 0
            self._rid = f"{self.generation}:{self._n}"
            self._rid_audio = False
        self._calls.clear()

    def connection_lost(self) -> list[AgentEvent]:
        """The connection died: the reply it was sending is over for the engine."""
        self.configured = False
        return self._close_reply()

    def _close_reply(self) -> list[AgentEvent]:
        events: list[AgentEvent] = []
        if self._rid_audio:
            events.append(AgentResponseDone(self._rid))
            self._next_reply()
        return events

    def _next_reply(self) -> None:
        self._n += 1
        self._rid = f"{self.generation}:{self._n}"
        self._rid_audio = False

    # -- server messages -----------------------------------------------------------------
    def parse_message(self, message: str | bytes) -> list[AgentEvent]:
        """A WebSocket message as received: binary = agent audio, text = JSON control."""
        if not isinstance(message, str):
            if not message:
                return []
            self._rid_audio = True
            self.audio_in_bytes += len(message)
            return [AgentAudio(message, self._rid)]
        return self.dispatch(message)

    # handlers --------------------------------------------------------------------------
    def _on_welcome(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        self.welcomed = True
        rid = msg.get("request_id")
        if type(rid) is str:
            self.request_id = rid
        return []

    def _on_settings_applied(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        self.configured = True
        return []

    def _on_user_started(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        # Barge-in: the engine clears Twilio and drops the reply it was playing; audio
        # from now on belongs to the next reply.
        if self._rid_audio:
            self._next_reply()
        return [AgentSpeechStarted()]

    def _on_agent_started(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        return self._close_reply()

    def _on_audio_done(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        return self._close_reply()

    def _on_text(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        role = msg.get("role")
        content = msg.get("content")
        if type(role) is not str or type(content) is not str:
            raise bad_event(etype, "role and content must be strings")
        who = _ROLES.get(role)
        if who is None:
            return []
        if content:
            self.history.append((who, content))
        return [AgentTranscript(who, content)]

    def _on_function_request(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        functions = msg.get("functions")
        if type(functions) is not list:
            raise bad_event(etype, "functions must be a list")
        events: list[AgentEvent] = []
        for fn in functions:
            if type(fn) is not dict:
                raise bad_event(etype, "functions[] must be objects")
            call_id = fn.get("id")
            name = fn.get("name")
            if type(call_id) is not str or type(name) is not str:
                raise bad_event(etype, "functions[].id and .name must be strings")
            if fn.get("client_side") is not True:
                self.server_side_calls += 1  # the server runs it and answers itself
                continue
            if call_id in self._calls or call_id in self._cancelled:
                continue  # reported once
            arguments = tool_arguments(fn.get("arguments"), etype, "functions[].arguments")
            if len(self._calls) >= MAX_TRACKED_CALLS:
                del self._calls[next(iter(self._calls))]
            self._calls[call_id] = name
            events.append(AgentToolCall(call_id, name, arguments))
        return events

    def _on_function_cancelled(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        ids: list[Any] = []
        functions = msg.get("functions")
        if type(functions) is list:
            ids += [f.get("id") if type(f) is dict else f for f in functions]
        for key in ("ids", "function_call_ids"):
            if type(msg.get(key)) is list:
                ids += msg[key]
        if type(msg.get("id")) is str:
            ids.append(msg["id"])
        for call_id in ids:
            if type(call_id) is str:
                self._calls.pop(call_id, None)
                self._cancelled[call_id] = None
                if len(self._cancelled) > MAX_TRACKED_CALLS:
                    del self._cancelled[next(iter(self._cancelled))]
        return []

    def _error_fields(self, msg: dict[str, Any]) -> tuple[str, str]:
        code = opt_str(msg.get("code")) or "unknown"
        description = opt_str(msg.get("description") or msg.get("message"))
        return code, description

    def _on_error(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        code, description = self._error_fields(msg)
        event = AgentErrorEvent(code, description or "agent error", fatal=True)
        if not self.configured:
            if self.session_error is None:
                self.session_error = event
            return [event]
        self.ended = True
        events = self._close_reply()
        return [*events, AgentHangup(f"agent error: {code}"), event]

    def _on_warning(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        code, description = self._error_fields(msg)
        return [AgentErrorEvent(code, description or "agent warning", fatal=False)]
