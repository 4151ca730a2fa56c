"""Sans-IO core of the ElevenLabs Agents adapter: wire text in, :mod:`relay.agents.base`
events out, and the client messages the adapter sends. No sockets, no Trio, no clocks.

The protocol (``/work/shared/reference/voice-agent-apis.md``, "ElevenLabs Agents"; the
Agents Platform WebSocket API reference on elevenlabs.io/docs; its AsyncAPI contract
``packages/types/schemas/agent.asyncapi.yaml`` and the JS client in
github.com/elevenlabs/packages; the Python SDK's ``conversational_ai/conversation.py``):

* ``wss://api.elevenlabs.io/v1/convai/conversation?agent_id=…``; private agents are
  opened from a backend with an ``xi-api-key`` upgrade header.
* The client speaks first: ``conversation_initiation_client_data`` (overrides of the
  prompt, first message, TTS voice and language, dynamic variables); the server answers
  ``conversation_initiation_metadata`` naming ``user_input_audio_format`` and
  ``agent_output_audio_format``. Those are configured on the agent, not by the client, so
  they are known only now: ``ulaw_8000`` both ways means Twilio's μ-law passes through
  untouched, otherwise the engine transcodes to PCM16 at the stated rate. A missing input
  format is taken as ``pcm_16000``, as the official SDKs do.
* Caller audio is ``{"user_audio_chunk": "<b64>"}`` (no ``type``, by design: it is the
  hot path). Agent audio is ``audio`` with ``audio_event.{audio_base_64, event_id}``; all
  chunks of one agent reply share its ``event_id``.
* ``ping`` (``ping_event.event_id``) must be answered with ``{"type":"pong","event_id":N}``
  or the server ends the session; answers go into :attr:`ElevenLabsProtocol.outbox`, which
  the Trio layer writes in the same step as the parse (never behind event handling).
* Barge-in is ``interruption`` with ``interruption_event.event_id`` N. The two official
  SDKs disagree at equality: the JS client plays audio with ``event_id >= N``
  (``lastInterruptTimestamp <= event_id`` in ``VoiceConversation.handleAudio``), the Python
  client drops ``event_id <= N``. Which one is right depends on whether N names the reply
  being interrupted or the turn that follows, which the docs do not say. This core drops
  every later audio event with ``event_id < N`` (both SDKs agree on those) and drops
  ``event_id == N`` only when audio with that id had already arrived before the
  interruption, i.e. when N is the reply that was interrupted; a reply first heard with
  id N after the interruption is new and plays. That is right under both readings, where
  either fixed comparison loses audio under one of them (a whole answer for ``<=``).
* Tools are *client tools* defined on the agent in the ElevenLabs dashboard:
  ``client_tool_call`` (``tool_name``, ``tool_call_id``, ``parameters``) is answered with
  ``client_tool_result`` (``tool_call_id``, ``result`` string, ``is_error``). A result for
  an id the server never issued is refused by it, so :meth:`ElevenLabsProtocol.tool_result`
  answers each issued id once and nothing else.
* ``error`` (``error_event.{code, message, error_type, reason}``) is "sent when the
  connection is closing due to an error"; close code 1000 there means a normal end (the
  agent ended the conversation, the maximum duration was reached).
* DTMF: the API has no message for keypad digits; the engine records them.

Malformed agent input (bad JSON, wrongly typed fields, undecodable base64) raises
:class:`relay.errors.RemoteProtocolError` with kind ``agent_protocol``.
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..config import mask
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
    AudioFormat,
)
from .wire import (
    AudioMessage,
    EventDispatcher,
    bad_event,
    check_header_secret,
    check_ws_url,
    deep_merge,
    dumps,
    opt_str,
    str_field,
    with_query,
)

__all__ = [
    "DEFAULT_URL",
    "SUPPORTED_PCM_RATES",
    "ElevenLabsOptions",
    "ElevenLabsProtocol",
    "parse_audio_format",
]

DEFAULT_URL = "wss://api.elevenlabs.io/v1/convai/conversation"

#: PCM rates the engine's resampler converts to and from μ-law 8 kHz (relay.media.codec).
#: ElevenLabs also offers pcm_22050/44100/48000: an agent set to those cannot be bridged
#: and fails at connect with a message saying what to change.
SUPPORTED_PCM_RATES = (8000, 16000, 24000)

#: What the official SDKs assume when the metadata names no input format.
DEFAULT_INPUT_FORMAT = "pcm_16000"

#: Pending tool calls and other per-id bookkeeping are bounded.
MAX_TRACKED = 256


def parse_audio_format(name: str) -> AudioFormat | None:
    """``ulaw_8000`` -> μ-law 8 kHz, ``pcm_16000`` -> PCM16 16 kHz; None if not a format
    ElevenLabs documents (``pcm_<rate>`` or ``ulaw_8000``)."""
    kind, _, rate_s = name.partition("_")
    if not rate_s.isdigit():
        return None
    rate = int(rate_s)
    if kind == "ulaw" and rate == 8000:
        return AudioFormat("mulaw", 8000)
    if kind == "pcm" and rate > 0:
        return AudioFormat("pcm16", rate)
    return None


@dataclass(frozen=True, slots=True)
class ElevenLabsOptions:
    """Everything an ElevenLabs Agents conversation is opened with.

    ``instructions``, ``greeting``, ``voice`` and ``language`` are *overrides* of what the
    agent has in the dashboard; ElevenLabs refuses an override the agent's security
    settings do not allow (error ``override_error``), so only the ones set here are sent.
    ``tools``: names of the dashboard client tools the relay executes (empty: every client
    tool call is passed to the relay's tool registry). ``init_extra`` is deep-merged into
    ``conversation_initiation_client_data`` (new API fields, ``custom_llm_extra_body``).
    """

    agent_id: str
    url: str = DEFAULT_URL
    api_key: str = field(default="", repr=False)
    instructions: str = ""
    greeting: str = ""
    voice: str = ""
    language: str = ""
    dynamic_variables: Mapping[str, Any] | None = None
    tools: Sequence[str] = ()
    init_extra: Mapping[str, Any] | None = None
    connect_timeout_s: float = 10.0
    send_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.agent_id or not isinstance(self.agent_id, str):
            raise ConfigError("elevenlabs agent: agent_id is required (agents.<name>.agent_id)")
        if any(c.isspace() or c in "&#?/" for c in self.agent_id):
            raise ConfigError(f"elevenlabs agent: agent_id {self.agent_id!r} is not an agent id")
        check_ws_url(self.url)
        if not (self.connect_timeout_s > 0 and self.send_timeout_s > 0):
            raise ConfigError("elevenlabs agent: connect_timeout_s and send_timeout_s must be > 0")
        check_header_secret(self.api_key)
        if isinstance(self.tools, str) or not all(isinstance(t, str) and t for t in self.tools):
            raise ConfigError("elevenlabs agent: tools must be a list of client tool names")
        object.__setattr__(self, "tools", tuple(self.tools))

    def __repr__(self) -> str:
        return (
            f"ElevenLabsOptions(url={self.url!r}, agent_id={self.agent_id!r}, "
            f"voice={self.voice!r}, tools={list(self.tools)!r}, api_key={mask(self.api_key)!r})"
        )


def _obj(msg: Mapping[str, Any], key: str, etype: str) -> dict[str, Any]:
    value = msg.get(key)
    if type(value) is not dict:
        raise bad_event(etype, f"field {key!r} must be an object")
    return value


def _int(obj: Mapping[str, Any], key: str, etype: str) -> int:
    value = obj.get(key)
    if type(value) is int:
        return value
    if type(value) is str and value.isdigit():  # tolerate a stringly typed id
        return int(value)
    raise bad_event(etype, f"field {key!r} must be an integer")


def _is_error_output(output: str) -> bool:
    """True for the ``{"error": "..."}`` texts relay.tools returns when a tool failed."""
    if not output.startswith('{"error"'):
        return False
    try:
        value = orjson.loads(output)
    except orjson.JSONDecodeError:
        return False
    return type(value) is dict and set(value) == {"error"}


_CHUNK = AudioMessage(lambda b64: {"user_audio_chunk": b64})


class ElevenLabsProtocol(EventDispatcher):
    """State of one ElevenLabs conversation as seen from the relay (sans-IO)."""

    def __init__(self, options: ElevenLabsOptions) -> None:
        super().__init__()
        self.options = options
        #: Replies the server requires (``pong``, refusals of unknown client tools) that the
        #: I/O layer must write right after the parse that produced them.
        self.outbox: list[str] = []
        self.conversation_id: str | None = None
        #: Formats from conversation_initiation_metadata (None until it arrived).
        self.input_format: AudioFormat | None = None
        self.output_format: AudioFormat | None = None
        self.input_format_name: str | None = None
        self.output_format_name: str | None = None
        #: The metadata named a format the relay cannot bridge (a fatal setup error).
        self.format_error: str | None = None
        self.pings = 0
        self.stale_audio_dropped = 0
        self.hangup_sent = False
        # barge-in: audio with event_id < floor is stale, and == floor too when stale_equal
        self._floor = 0
        self._stale_equal = False
        self._max_audio_id = 0
        self._current_id: int | None = None  # the reply whose audio is arriving
        self._tool_calls: dict[str, str] = {}  # issued, unanswered: tool_call_id -> name
        h = self._handlers
        h["conversation_initiation_metadata"] = type(self)._on_metadata
        h["audio"] = type(self)._on_audio
        h["interruption"] = type(self)._on_interruption
        h["ping"] = type(self)._on_ping
        h["agent_response"] = type(self)._on_agent_response
        h["user_transcript"] = type(self)._on_user_transcript
        h["tentative_user_transcript"] = type(self)._on_tentative_transcript
        h["client_tool_call"] = type(self)._on_client_tool_call
        h["error"] = type(self)._on_error

    @property
    def ready(self) -> bool:
        """conversation_initiation_metadata arrived: audio may flow."""
        return self.input_format is not None

    # -- client messages ---------------------------------------------------------------
    def ws_url(self) -> str:
        """The endpoint with ``?agent_id=`` appended (an existing ``agent_id`` is kept)."""
        return with_query(self.options.url, "agent_id", self.options.agent_id)

    def handshake_headers(self) -> list[tuple[str, str]]:
        """``xi-api-key`` when a key is configured (public agents need none)."""
        key = self.options.api_key
        return [("xi-api-key", key)] if key else []

    def initiation_message(self) -> str:
        """``conversation_initiation_client_data`` with only the overrides that are set."""
        o = self.options
        agent: dict[str, Any] = {}
        if o.instructions:
            agent["prompt"] = {"prompt": o.instructions}
        if o.greeting:
            agent["first_message"] = o.greeting
        if o.language:
            agent["language"] = o.language
        override: dict[str, Any] = {}
        if agent:
            override["agent"] = agent
        if o.voice:
            override["tts"] = {"voice_id": o.voice}
        msg: dict[str, Any] = {"type": "conversation_initiation_client_data"}
        if override:
            msg["conversation_config_override"] = override
        if o.dynamic_variables:
            msg["dynamic_variables"] = dict(o.dynamic_variables)
        if o.init_extra:
            deep_merge(msg, o.init_extra)
        return dumps(msg)

    #: (head, tail) of ``user_audio_chunk`` around the base64 audio
    #: (WebSocket.send_b64_texts_nowait)
    audio_chunk_parts = (_CHUNK.head_bytes, _CHUNK.tail_bytes)

    def audio_chunk_b64(self, payload: str) -> str:
        """``user_audio_chunk`` for audio already in base64 (the passthrough hot path).
        Base64 never needs JSON escaping; anything else is escaped properly."""
        return _CHUNK.b64(payload)

    def audio_chunk(self, audio: bytes) -> str:
        return _CHUNK.raw(audio)

    def tool_result(self, call_id: str, output: str) -> str | None:
        """``client_tool_result`` for an issued, unanswered call; None otherwise (the server
        refuses results for ids it never issued, and a second answer to the same call).
        ``is_error`` is set for relay.tools' ``{"error": ...}`` outputs."""
        if self._tool_calls.pop(call_id, None) is None:
            return None
        return dumps(
            {
                "type": "client_tool_result",
                "tool_call_id": call_id,
                "result": output,
                "is_error": _is_error_output(output),
            }
        )

    def pending_tool_calls(self) -> list[str]:
        return list(self._tool_calls)

    # -- server messages -----------------------------------------------------------------
    def parse_message(self, message: str | bytes) -> list[AgentEvent]:
        """One WebSocket message. ElevenLabs sends JSON text; JSON in a binary frame is
        accepted too (some proxies re-frame text as binary). Types without a handler
        (agent_response_correction, vad_score, agent_tool_response, internal_* ...) are
        counted and ignored: nothing the call needs (the record keeps what the agent said)."""
        return self.dispatch(message)

    def _rid(self, event_id: int) -> str:
        return f"ev{event_id}"

    def _end_reply(self) -> list[AgentEvent]:
        """The reply whose audio was arriving is complete (ElevenLabs has no explicit
        end-of-audio event: a new reply id, a caller turn or the end of the session ends
        it); the engine then flushes the resampler tail and the last partial frame."""
        current, self._current_id = self._current_id, None
        return [AgentResponseDone(self._rid(current))] if current is not None else []

    def close_events(self) -> list[AgentEvent]:
        """Events owed when the session ends (the reply in progress is done)."""
        return self._end_reply()

    # handlers --------------------------------------------------------------------------
    def _on_metadata(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        event = _obj(msg, "conversation_initiation_metadata_event", etype)
        conv = event.get("conversation_id")
        if type(conv) is str:
            self.conversation_id = conv
        names = []
        for key, default in (
            ("user_input_audio_format", DEFAULT_INPUT_FORMAT),
            ("agent_output_audio_format", None),
        ):
            value = event.get(key) or default
            if type(value) is not str:
                raise bad_event(etype, f"field {key!r} must be a string")
            names.append(value)
        in_name, out_name = names
        in_fmt, out_fmt = parse_audio_format(in_name), parse_audio_format(out_name)
        self.input_format_name, self.output_format_name = in_name, out_name
        problems = [
            f"{what} {name!r}"
            for what, name, fmt in (("input", in_name, in_fmt), ("output", out_name, out_fmt))
            if fmt is None or (not fmt.is_twilio_native and fmt.rate not in SUPPORTED_PCM_RATES)
        ]
        if problems:
            self.format_error = (
                "the agent's audio formats cannot be bridged to a phone call ("
                + ", ".join(problems)
                + "); set them to ulaw_8000 (no transcoding) or pcm_8000/16000/24000 in the "
                "agent's voice and advanced settings"
            )
            return [AgentErrorEvent("unsupported_audio_format", self.format_error, fatal=True)]
        self.input_format, self.output_format = in_fmt, out_fmt
        return []

    def _on_audio(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        event = _obj(msg, "audio_event", etype)
        event_id = _int(event, "event_id", etype)
        data = str_field(event, "audio_base_64", etype)
        if event_id < self._floor or (event_id == self._floor and self._stale_equal):
            # Audio of a reply the caller interrupted, still in flight: never play it.
            self.stale_audio_dropped += 1
            return []
        try:
            audio = binascii.a2b_base64(data, strict_mode=True)
        except (binascii.Error, ValueError):
            raise bad_event(etype, "audio_base_64 is not valid base64") from None
        events: list[AgentEvent] = []
        if self._current_id != event_id:
            events += self._end_reply()
            self._current_id = event_id
        if event_id > self._max_audio_id:
            self._max_audio_id = event_id
        if audio:
            events.append(AgentAudio(audio, self._rid(event_id)))
        return events

    def _on_interruption(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        event_id = _int(_obj(msg, "interruption_event", etype), "event_id", etype)
        if event_id >= self._floor:
            self._floor = event_id
            # N names the interrupted reply iff its audio already arrived (module docstring)
            self._stale_equal = event_id <= self._max_audio_id
        # The interrupted reply ends here; the engine drops what is left of it by id.
        self._current_id = None
        return [AgentSpeechStarted()]

    def _on_ping(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        event_id = _int(_obj(msg, "ping_event", etype), "event_id", etype)
        self.pings += 1
        self.outbox.append(f'{{"type":"pong","event_id":{event_id}}}')
        return []

    def _on_agent_response(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        text = str_field(_obj(msg, "agent_response_event", etype), "agent_response", etype).strip()
        return [AgentTranscript("agent", text)] if text else []

    def _on_user_transcript(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        event = _obj(msg, "user_transcription_event", etype)
        text = str_field(event, "user_transcript", etype).strip()
        # The caller finished a turn: whatever the agent said before is complete.
        events = self._end_reply()
        if text:
            events.append(AgentTranscript("caller", text))
        return events

    def _on_tentative_transcript(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        event = _obj(msg, "tentative_user_transcription_event", etype)
        text = str_field(event, "user_transcript", etype).strip()
        return [AgentTranscript("caller", text, final=False)] if text else []

    def _on_client_tool_call(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        call = _obj(msg, "client_tool_call", etype)
        name = str_field(call, "tool_name", etype)
        call_id = str_field(call, "tool_call_id", etype)
        params = call.get("parameters")
        if params is None:
            params = {}
        if type(params) is not dict:
            raise bad_event(etype, "field 'parameters' must be an object")
        if self.options.tools and name not in self.options.tools:
            # What the official SDKs answer for a client tool they do not define.
            self.outbox.append(
                dumps(
                    {
                        "type": "client_tool_result",
                        "tool_call_id": call_id,
                        "result": f"Client tool with name {name} is not defined on client",
                        "is_error": True,
                    }
                )
            )
            return [AgentErrorEvent("unknown_tool", f"agent called undefined client tool {name!r}")]
        if call_id in self._tool_calls:
            return []  # a repeated call is reported once
        if len(self._tool_calls) >= MAX_TRACKED:
            del self._tool_calls[next(iter(self._tool_calls))]
        self._tool_calls[call_id] = name
        return [AgentToolCall(call_id, name, dumps(params))]

    def _on_error(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        # An error report must never itself become a protocol error: tolerate odd shapes.
        event = msg.get("error_event")
        if type(event) is not dict:
            event = {"message": opt_str(event)}
        code = event.get("code")
        error_type = opt_str(event.get("error_type"))
        message = opt_str(event.get("message")) or opt_str(event.get("reason"))
        if code == 1000:
            # Normal closure (agent ended the conversation, max duration exceeded).
            self.hangup_sent = True
            reason = (
                "agent max duration" if error_type == "max_duration_exceeded" else "agent ended"
            )
            return [*self._end_reply(), AgentHangup(reason)]
        label = error_type or (f"close_{code}" if type(code) is int else "agent_error")
        return [AgentErrorEvent(label, message or "ElevenLabs reported an error", fatal=True)]
