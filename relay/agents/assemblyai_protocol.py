"""Sans-IO core of the AssemblyAI Voice Agent adapter: wire text in, :mod:`relay.agents.base`
events out, and the client messages the adapter sends. No sockets, no Trio, no clocks.

Rules followed (``/work/shared/reference/voice-agent-apis.md``, "AssemblyAI Voice Agent API",
and AssemblyAI's events reference):

* ``session.update`` is the first message and always names ``audio/pcmu`` 8 kHz both ways
  (the API defaults to PCM 24 kHz otherwise, and the output format cannot change after
  ``session.ready``), so Twilio's μ-law passes through untouched: Twilio's base64 payload
  string goes into ``input.audio`` as is (:meth:`AssemblyAIProtocol.input_audio_b64`).
* No audio before ``session.ready`` (the Trio layer's connect waits for it).
* ``reply.audio`` carries only ``data``: its reply is the last ``reply.started``. Reply ids
  are namespaced per session (``"<n>:<reply_id>"``) so a new session's ids never collide
  with ones the engine already dropped.
* Barge-in: ``input.speech.started`` -> :class:`AgentSpeechStarted`. ``reply.done`` with
  status ``interrupted`` drops whatever audio of that reply is still in flight (until the
  next ``reply.started``); when no speech event announced the interruption the protocol
  reports one, so the engine still clears Twilio.
* Tools: ``tool.call`` (``arguments`` object; older docs ``args``) -> :class:`AgentToolCall`.
  The documented order is ``tool.call`` -> ``reply.done`` -> ``tool.result``: a result for a
  call made during a reply is held until that reply's ``reply.done`` and then queued in
  :attr:`AssemblyAIProtocol.outbox`. Results for unknown call ids are never sent (the API
  refuses them).
* ``session.error`` (``code``, ``message``): fatal for auth, billing and session-level codes
  (the engine plays what it holds and hangs up with end reason ``agent error: <code>``),
  a non-fatal :class:`AgentErrorEvent` otherwise. ``session.ended`` -> :class:`AgentHangup`.
* Both sides' final transcripts (``transcript.user``, ``transcript.agent``) are kept in
  :attr:`AssemblyAIProtocol.history`, which seeds a new session after a lost connection.

Malformed input (bad JSON, a binary frame, wrongly typed fields, bad base64) raises
:class:`relay.errors.RemoteProtocolError` with kind ``agent_protocol``.
"""

from __future__ import annotations

import binascii
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
    AgentSpeechStopped,
    AgentToolCall,
    AgentTranscript,
)
from .wire import (
    AudioMessage,
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
    refuse_binary,
    str_field,
    tool_arguments,
)

__all__ = [
    "DEFAULT_URL",
    "FATAL_ERROR_CODES",
    "AssemblyAIOptions",
    "AssemblyAIProtocol",
    "normalize_tool",
]

log = logging.getLogger("relay.agents.assemblyai")

DEFAULT_URL = "wss://agents.assemblyai.com/v1/ws"

#: ``session.error`` codes after which the session cannot go on.
FATAL_ERROR_CODES = frozenset(
    {
        "unauthorized",
        "authentication_failed",
        "invalid_api_key",
        "forbidden",
        "insufficient_funds",
        "payment_required",
        "quota_exceeded",
        "session_expired",
        "session_not_found",
        "session_closed",
        "max_session_duration_exceeded",
        "internal_error",
    }
)

#: Bounded bookkeeping: only recent tool calls can still be answered.
MAX_TRACKED_CALLS = 256
MAX_HISTORY = 200

PCMU_8K = {"encoding": "audio/pcmu", "sample_rate": 8000}

_READY = "ready"  # a tool call whose reply is done: its result may go at once


@dataclass(frozen=True, slots=True)
class AssemblyAIOptions:
    """Everything an AssemblyAI Voice Agent session is configured with. ``turn_detection``
    goes into ``session.input.turn_detection`` as given; ``session_extra`` is deep-merged
    into the ``session`` object (new API fields)."""

    url: str = DEFAULT_URL
    api_key: str = field(default="", repr=False)
    instructions: str = ""
    greeting: str = ""
    voice: str = "ivy"
    tools: Sequence[Mapping[str, Any]] = ()
    turn_detection: Mapping[str, Any] | None = None
    session_extra: Mapping[str, Any] | None = None
    connect_timeout_s: float = 10.0
    send_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        check_ws_url(self.url)
        if not (self.connect_timeout_s > 0):
            raise ConfigError("agents.*.connect_timeout_s: must be > 0")
        if not (self.send_timeout_s > 0):
            raise ConfigError("agents.*.send_timeout_s: must be > 0")
        check_header_secret(self.api_key)
        # "Voice names are lowercase" (the API refuses others).
        object.__setattr__(self, "voice", self.voice.strip().lower())
        object.__setattr__(self, "tools", tuple(normalize_tool(t) for t in self.tools))

    def __repr__(self) -> str:
        return (
            f"AssemblyAIOptions(url={self.url!r}, voice={self.voice!r}, "
            f"tools={len(self.tools)}, api_key={mask_secret(self.api_key)!r})"
        )


_INPUT_AUDIO = AudioMessage(lambda b64: {"type": "input.audio", "audio": b64})


class AssemblyAIProtocol(EventDispatcher):
    """State of one AssemblyAI Voice Agent session as seen from the relay (sans-IO).

    One protocol object lives as long as the call: a resumed session keeps its state; a new
    session (after a lost connection) starts with :meth:`begin_connection` ("seeded")."""

    def __init__(self, options: AssemblyAIOptions) -> None:
        super().__init__()
        self.options = options
        #: True once ``session.ready`` arrived on the current connection.
        self.ready = False
        self.session_id: str | None = None
        #: The first ``session.error`` before ``session.ready`` (connect fails with it).
        self.session_error: AgentErrorEvent | None = None
        #: The server ended the session (``session.ended`` or a fatal error): no recovery.
        self.ended = False
        self.generation = 1
        self.dropped_audio_chunks = 0
        self.unknown_tool_results = 0
        #: Final transcripts of both sides, (role, text): seeds a new session.
        self.history: deque[tuple[str, str]] = deque(maxlen=MAX_HISTORY)
        #: Messages the adapter must send after parsing (held tool results).
        self.outbox: list[str] = []
        self._reply: str | None = None  # current reply (namespaced id)
        self._reply_open = False
        self._dropping = False  # audio of an interrupted reply still arriving: drop it
        self._speech_in_reply = False
        self._synthetic = 0
        self._calls: dict[str, str] = {}  # call_id -> reply rid it belongs to, or _READY
        self._held: dict[str, str] = {}  # call_id -> output waiting for reply.done
        h = self._handlers
        h["session.ready"] = type(self)._on_ready
        h["session.updated"] = type(self)._on_nothing
        h["session.error"] = type(self)._on_error
        h["session.ended"] = type(self)._on_ended
        h["input.speech.started"] = type(self)._on_speech_started
        h["input.speech.stopped"] = type(self)._on_speech_stopped
        h["transcript.user.delta"] = type(self)._on_user_delta
        h["transcript.user"] = type(self)._on_user
        h["transcript.agent.delta"] = type(self)._on_agent_delta
        h["transcript.agent"] = type(self)._on_agent
        h["reply.started"] = type(self)._on_reply_started
        h["reply.audio"] = type(self)._on_reply_audio
        h["reply.done"] = type(self)._on_reply_done
        h["tool.call"] = type(self)._on_tool_call

    # -- client messages ---------------------------------------------------------------
    def handshake_headers(self) -> list[tuple[str, str]]:
        return [("Authorization", f"Bearer {self.options.api_key}")]

    def session_update(self, *, context: str = "", greeting: bool = True) -> str:
        """The first message of a new session. ``context`` (the conversation so far) is
        appended to the system prompt; ``greeting`` False leaves the greeting out (a
        session that continues a call must not greet again)."""
        o = self.options
        prompt = join_prompt(o.instructions, context)
        audio_in: dict[str, Any] = {"format": dict(PCMU_8K)}
        if o.turn_detection:
            audio_in["turn_detection"] = dict(o.turn_detection)
        session: dict[str, Any] = {
            "input": audio_in,
            "output": {"voice": o.voice, "format": dict(PCMU_8K)},
        }
        if prompt:
            session["system_prompt"] = prompt
        if greeting and o.greeting:
            session["greeting"] = o.greeting
        if o.tools:
            session["tools"] = [dict(t) for t in o.tools]
        if o.session_extra:
            deep_merge(session, o.session_extra)
        return dumps({"type": "session.update", "session": session})

    def session_resume(self) -> str:
        if not self.session_id:
            raise ValueError("no session to resume")
        return dumps({"type": "session.resume", "session_id": self.session_id})

    def session_end(self) -> str:
        return '{"type":"session.end"}'

    #: (head, tail) of ``input.audio`` around the base64 audio (WebSocket.send_b64_texts_nowait)
    input_audio_parts = (_INPUT_AUDIO.head_bytes, _INPUT_AUDIO.tail_bytes)

    def input_audio_b64(self, payload: str) -> str:
        """``input.audio`` for caller audio already in base64 (hot path): concatenation,
        since base64 needs no JSON escaping; anything else is escaped properly."""
        return _INPUT_AUDIO.b64(payload)

    def input_audio(self, audio: bytes) -> str:
        return _INPUT_AUDIO.raw(audio)

    def tool_result(self, call_id: str, output: str) -> list[str]:
        """Messages to send now for a tool's result: the ``tool.result``, or nothing while
        its reply is still going (it is queued in :attr:`outbox` at that ``reply.done``) or
        when the call id is unknown (never announced, already answered, or from a session
        that no longer exists)."""
        state = self._calls.get(call_id)
        if state is None:
            self.unknown_tool_results += 1
            log.warning("assemblyai: dropping a result for unknown tool call %r", call_id[:80])
            return []
        if state != _READY:
            self._held[call_id] = output
            return []
        del self._calls[call_id]
        return [self._tool_result_message(call_id, output)]

    @staticmethod
    def _tool_result_message(call_id: str, output: str) -> str:
        return dumps({"type": "tool.result", "call_id": call_id, "result": output})

    def take_outbox(self) -> list[str]:
        out, self.outbox = self.outbox, []
        return out

    # -- connection lifecycle ------------------------------------------------------------
    def begin_connection(self, mode: str) -> None:
        """A new connection is being opened: "new" (first), "resume" (same session) or
        "seeded" (new session continuing the call: per-session state is reset)."""
        self.ready = False
        self.session_error = None
        if mode != "resume":
            if mode == "seeded":
                self.generation += 1
            self.session_id = None
            self._calls.clear()
            self._held.clear()
            self.outbox.clear()

    def connection_lost(self) -> list[AgentEvent]:
        """The connection died: the reply it was sending is over for the engine."""
        self.ready = False
        events: list[AgentEvent] = []
        if self._reply_open and self._reply is not None:
            events.append(AgentResponseDone(self._reply))
        self._reply_open = False
        self._dropping = True  # a resumed session must not continue the cut-off reply
        return events

    # -- server messages -----------------------------------------------------------------
    def parse_message(self, message: str | bytes) -> list[AgentEvent]:
        """A WebSocket message as received: the Voice Agent API sends only text frames."""
        return self.dispatch(refuse_binary(message, "the AssemblyAI Voice Agent API"))

    def parse(self, text: str | bytes) -> list[AgentEvent]:
        return self.dispatch(text)

    # handlers --------------------------------------------------------------------------
    def _on_nothing(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        return []

    def _on_ready(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        sid = msg.get("session_id")
        if type(sid) is str and sid:
            self.session_id = sid
        self.ready = True
        return []

    def _on_error(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        # Tolerate odd shapes: an error report must never itself become a protocol error.
        err = msg.get("error")
        src = err if type(err) is dict else msg
        code = opt_str(src.get("code")) or "session_error"
        message = opt_str(src.get("message")) or "session error"
        if not self.ready:
            event = AgentErrorEvent(code, message, fatal=True)
            if self.session_error is None:
                self.session_error = event
            return [event]
        if code in FATAL_ERROR_CODES:
            self.ended = True
            return [AgentHangup(f"agent error: {code}"), AgentErrorEvent(code, message, True)]
        return [AgentErrorEvent(code, message, fatal=False)]

    def _on_ended(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        self.ended = True
        events: list[AgentEvent] = []
        if self._reply_open and self._reply is not None:
            events.append(AgentResponseDone(self._reply))
            self._reply_open = False
        events.append(AgentHangup("agent ended"))
        return events

    def _on_speech_started(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        self._speech_in_reply = True
        return [AgentSpeechStarted()]

    def _on_speech_stopped(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        return [AgentSpeechStopped()]

    def _on_user_delta(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        text = str_field(msg, "text", etype)
        return [AgentTranscript("caller", text, final=False)] if text else []

    def _on_user(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        text = str_field(msg, "text", etype)
        if text:
            self.history.append(("caller", text))
        return [AgentTranscript("caller", text)]

    def _on_agent_delta(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        text = str_field(msg, "text", etype)
        return [AgentTranscript("agent", text, final=False)] if text else []

    def _on_agent(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        # "trimmed to what was spoken" when the reply was interrupted
        text = str_field(msg, "text", etype)
        if text:
            self.history.append(("agent", text))
        return [AgentTranscript("agent", text)]

    def _new_reply(self, reply_id: str | None) -> list[AgentEvent]:
        events: list[AgentEvent] = []
        if self._reply_open and self._reply is not None:
            events.append(AgentResponseDone(self._reply))  # a reply.done went missing
        if reply_id is None:
            self._synthetic += 1
            reply_id = f"reply-{self._synthetic}"
        self._reply = f"{self.generation}:{reply_id}"
        self._reply_open = True
        self._dropping = False
        self._speech_in_reply = False
        return events

    def _on_reply_started(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        rid = msg.get("reply_id")
        return self._new_reply(rid if type(rid) is str and rid else None)

    def _on_reply_audio(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        data = msg.get("data")
        if type(data) is not str:
            raise bad_event(etype, "field 'data' must be a string")
        if self._dropping:
            # In flight after the reply was interrupted (or cut off by a lost connection).
            self.dropped_audio_chunks += 1
            return []
        try:
            audio = binascii.a2b_base64(data, strict_mode=True)
        except (binascii.Error, ValueError):
            raise bad_event(etype, "data is not valid base64") from None
        events: list[AgentEvent] = []
        if not self._reply_open:
            events = self._new_reply(None)
        if audio:
            assert self._reply is not None
            events.append(AgentAudio(audio, self._reply))
        return events

    def _on_reply_done(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        rid = self._reply
        events: list[AgentEvent] = []
        if msg.get("status") == "interrupted":
            self._dropping = True
            if not self._speech_in_reply and self._reply_open:
                # Interrupted without a speech event: the engine must still clear Twilio.
                events.append(AgentSpeechStarted())
        if self._reply_open and rid is not None:
            events.append(AgentResponseDone(rid))
        self._reply_open = False
        # Results of the calls made during this reply may go now (documented order).
        for call_id, owner in list(self._calls.items()):
            if owner == rid or (rid is None and owner != _READY):
                self._calls[call_id] = _READY
                output = self._held.pop(call_id, None)
                if output is not None:
                    del self._calls[call_id]
                    self.outbox.append(self._tool_result_message(call_id, output))
        return events

    def _on_tool_call(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        call_id = str_field(msg, "call_id", etype)
        name = str_field(msg, "name", etype)
        arguments = tool_arguments(msg.get("arguments", msg.get("args")), etype)
        if call_id in self._calls:
            return []  # reported once
        if len(self._calls) >= MAX_TRACKED_CALLS:
            oldest = next(iter(self._calls))
            del self._calls[oldest]
            self._held.pop(oldest, None)
        owner = self._reply if self._reply_open and self._reply is not None else _READY
        self._calls[call_id] = owner
        return [AgentToolCall(call_id, name, arguments)]
