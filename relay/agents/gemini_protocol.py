"""Sans-IO core of the Gemini Live adapter: wire messages in, :mod:`relay.agents.base` events
out, and the client messages the adapter sends. No sockets, no Trio, no clocks.

The protocol (``/work/shared/reference/voice-agent-apis.md``, "Gemini Live"; the Live API
reference https://ai.google.dev/api/live and guides https://ai.google.dev/gemini-api/docs/
live-guide and .../live-session):

* ``BidiGenerateContent`` over a WebSocket, ``?key=<api key>``. The first client message is
  ``setup`` (model, ``generationConfig.responseModalities = ["AUDIO"]``, ``speechConfig``
  voice, ``systemInstruction``, ``tools[].functionDeclarations``,
  ``input/outputAudioTranscription``, ``sessionResumption``, ``contextWindowCompression``);
  the server answers ``setupComplete``, and nothing else may be sent before it.
* Audio in: ``realtimeInput.audio`` ``{data: <b64 PCM16LE>, mimeType:
  "audio/pcm;rate=16000"}``. Audio out: ``serverContent.modelTurn.parts[].inlineData``,
  PCM16 24 kHz. Messages may come as JSON in binary frames (the SDKs parse both).
* ``serverContent.interrupted`` is barge-in; the docs: "when the model is interrupted
  while generating there will be no generation_complete message in the interrupted turn,
  it will go through interrupted > turn_complete", so everything between ``interrupted``
  and ``turnComplete`` belongs to the interrupted turn and is dropped here.
  ``turnComplete`` ends a turn (it can come in the same message as the last content).
* Transcriptions (``inputTranscription`` / ``outputTranscription``, enabled in ``setup``)
  arrive as text fragments "independent to the model turn": fragments are reported as
  partial transcripts, and joined into one final line per caller utterance (when the
  model's answer starts or a turn ends) and per agent turn (at ``turnComplete`` or the
  interruption).
* Tools: ``toolCall.functionCalls[]`` (``id``, ``name``, ``args``) are answered with
  ``toolResponse.functionResponses[]`` (``id``, ``name``, ``response`` object);
  ``toolCallCancellation.ids`` withdraws calls, which must then not be answered. A
  response for an id the server did not issue (or withdrew) is never produced.
* Sessions: a connection lasts ~10 minutes and ends after ``goAway`` (``timeLeft``);
  ``sessionResumptionUpdate`` carries ``newHandle`` (only when ``resumable``) with which a
  new connection resumes the same session (``setup.sessionResumption.handle``); handles
  stay valid for 2 hours. Audio-only sessions are capped at 15 minutes unless
  ``contextWindowCompression`` (a sliding window) is on, so it is on by default.

Malformed input (bad JSON, wrongly typed fields, undecodable base64) raises
:class:`relay.errors.RemoteProtocolError` with kind ``agent_protocol``.
"""

from __future__ import annotations

import binascii
import re
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

from ..config import mask
from ..errors import ConfigError, LocalProtocolError, RemoteProtocolError
from .base import (
    AgentAudio,
    AgentErrorEvent,
    AgentEvent,
    AgentResponseDone,
    AgentSpeechStarted,
    AgentToolCall,
    AgentTranscript,
    AudioFormat,
)
from .wire import (
    AudioMessage,
    check_header_secret,
    check_ws_url,
    deep_merge,
    dumps,
    load_object,
    normalize_tool,
    with_query,
)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_URL",
    "INPUT_FORMAT",
    "INPUT_MIME",
    "OUTPUT_FORMAT",
    "GeminiOptions",
    "GeminiProtocol",
    "is_setup_complete",
    "parse_duration",
]

DEFAULT_URL = (
    "wss://generativelanguage.googleapis.com/ws/"
    "google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
)
#: The native-audio Live model on ai.google.dev/gemini-api/docs/models (configurable).
DEFAULT_MODEL = "models/gemini-2.5-flash-native-audio-preview-12-2025"

#: Gemini Live hears PCM16 16 kHz and speaks PCM16 24 kHz; nothing else is accepted.
INPUT_FORMAT = AudioFormat("pcm16", 16000)
OUTPUT_FORMAT = AudioFormat("pcm16", 24000)
INPUT_MIME = "audio/pcm;rate=16000"

#: Per-id bookkeeping and the transcript kept for re-seeding a fresh session are bounded.
MAX_TRACKED = 256
MAX_HISTORY = 64

_GREETING_VIA = ("client_content", "realtime_text")
_RATE_RE = re.compile(r"rate=(\d+)")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)s\s*$")


def parse_duration(value: Any) -> float | None:
    """A protobuf Duration in JSON (``"10s"``, ``"1.5s"``) or as ``{seconds, nanos}``."""
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        return float(m.group(1)) if m else None
    if isinstance(value, dict):
        try:
            return float(value.get("seconds", 0)) + float(value.get("nanos", 0)) / 1e9
        except (TypeError, ValueError):
            return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _function_declaration(tool: Any) -> dict[str, Any]:
    """A Gemini ``FunctionDeclaration`` ``{name, description, parameters}`` from that shape
    or from the OpenAI ones relay.tools produces (flat, or nested under ``function``)."""
    flat = normalize_tool(tool)
    out: dict[str, Any] = {"name": flat["name"], "description": flat["description"]}
    if flat["parameters"].get("properties"):
        out["parameters"] = flat["parameters"]
    # a function without arguments has no parameters: Gemini refuses an empty OBJECT schema
    return out


@dataclass(frozen=True, slots=True)
class GeminiOptions:
    """Everything a Gemini Live session is configured with.

    ``greeting_via``: how the greeting prompt is sent, ``"client_content"`` (a user turn
    with ``turnComplete``: the documented way to make 2.5 models speak first) or
    ``"realtime_text"`` (``realtimeInput.text``, for models that accept client content
    only as initial history). ``setup_extra`` is deep-merged into ``setup`` (new fields,
    ``realtimeInputConfig``, thinking settings). Reconnection: resume with the latest
    handle when ``session_resumption``; without a handle, ``reconnect`` opens a fresh
    session seeded with the conversation so far. ``reconnect_buffer_ms`` of caller audio is
    kept while switching and sent to the new connection.
    """

    url: str = DEFAULT_URL
    api_key: str = field(default="", repr=False)
    model: str = DEFAULT_MODEL
    voice: str = ""
    language: str = ""
    instructions: str = ""
    greeting: str = ""
    greeting_via: str = "client_content"
    tools: Sequence[Mapping[str, Any]] = ()
    transcription: bool = True
    session_resumption: bool = True
    context_compression: bool = True
    reconnect: bool = True
    setup_extra: Mapping[str, Any] | None = None
    connect_timeout_s: float = 10.0
    send_timeout_s: float = 2.0
    #: = relay.agents.liveness.DEFAULT_RECONNECT_TIMEOUT_S (dead after 3 s + 2 s: 5 s)
    reconnect_timeout_s: float = 2.0
    max_reconnects: int = 10
    reconnect_buffer_ms: int = 1000

    def __post_init__(self) -> None:
        check_ws_url(self.url)
        if not self.model or any(c.isspace() for c in self.model):
            raise ConfigError(f"agents.*.model: not a model name: {self.model!r}")
        if self.greeting_via not in _GREETING_VIA:
            raise ConfigError(
                f"agents.*.greeting_via: must be one of {_GREETING_VIA}, got {self.greeting_via!r}"
            )
        for key in ("connect_timeout_s", "send_timeout_s", "reconnect_timeout_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"agents.*.{key}: must be > 0")
        if self.max_reconnects < 0 or self.reconnect_buffer_ms < 0:
            raise ConfigError("agents.*.max_reconnects and reconnect_buffer_ms must be >= 0")
        check_header_secret(self.api_key)  # it goes into the URL
        object.__setattr__(self, "tools", tuple(_function_declaration(t) for t in self.tools))

    @property
    def model_path(self) -> str:
        """``models/<name>`` as ``setup.model`` wants it (full resource names kept)."""
        return self.model if "/" in self.model else f"models/{self.model}"

    def __repr__(self) -> str:
        return (
            f"GeminiOptions(url={self.url!r}, model={self.model!r}, voice={self.voice!r}, "
            f"tools={len(self.tools)}, api_key={mask(self.api_key)!r})"
        )


def _bad(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"Gemini Live message: {what}", kind="agent_protocol")


def _loads(message: str | bytes) -> dict[str, Any]:
    return load_object(message, "agent message")


def _camel_to_snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


_SNAKE: dict[str, str] = {}


def _get(obj: Mapping[str, Any], name: str) -> Any:
    """Field ``name`` (lowerCamelCase, the proto JSON mapping) or its snake_case spelling,
    which proto parsers also accept and some proxies emit."""
    value = obj.get(name)
    if value is None:
        snake = _SNAKE.get(name)
        if snake is None:
            snake = _SNAKE[name] = _camel_to_snake(name)
        value = obj.get(snake)
    return value


def is_setup_complete(message: str | bytes) -> bool:
    """True for the ``setupComplete`` reply (used while a new connection is set up, before
    its messages may touch the session state)."""
    return _get(_loads(message), "setupComplete") is not None


def _text(obj: Any) -> str:
    if type(obj) is not dict:
        return ""
    text = obj.get("text")
    return text if type(text) is str else ""


_AUDIO = AudioMessage(
    lambda b64: {"realtimeInput": {"audio": {"mimeType": INPUT_MIME, "data": b64}}}
)


class GeminiProtocol:
    """State of one Gemini Live session (across its connections) as seen from the relay."""

    def __init__(self, options: GeminiOptions) -> None:
        self.options = options
        #: the latest handle the session can be resumed with (None: not resumable yet)
        self.handle: str | None = None
        self.resumable = False
        #: per connection: setupComplete seen, goAway's timeLeft (s) once announced
        self.setup_complete = False
        self.go_away_s: float | None = None
        self.events_in = 0
        self.ignored = 0
        self.ignored_types: Counter[str] = Counter()
        self.audio_dropped = 0
        self.bad_rate_chunks = 0
        #: final transcript lines, for seeding a fresh session after a lost connection
        self.history: deque[tuple[str, str]] = deque(maxlen=MAX_HISTORY)
        self._turn = 0
        #: the model said or did something the latest handle does not include yet
        self._handle_stale = False
        self._in_turn = False  # a model turn is producing audio/transcript
        self._dropping = False  # between interrupted and turnComplete
        self._caller: list[str] = []
        self._agent: list[str] = []
        self._tool_calls: dict[str, str] = {}  # issued, unanswered: id -> name
        self._cancelled: dict[str, None] = {}

    # -- state ---------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        """No model turn in progress and no tool call outstanding: a good moment to move
        to a new connection (a handle taken now loses nothing)."""
        return not self._in_turn and not self._dropping and not self._tool_calls

    @property
    def switch_ready(self) -> bool:
        """:attr:`idle`, and the latest handle already includes the last turn (the server
        sends a fresh one just after ``turnComplete``): resuming with it loses nothing."""
        return self.idle and not (self._handle_stale and self.handle is not None)

    @property
    def response_id(self) -> str:
        return f"turn{self._turn}"

    def begin_connection(self) -> list[AgentEvent]:
        """A new connection replaces the current one: per-connection state starts over and
        the turn in progress on the old one is closed (its audio stops here). Tool calls
        issued on the old connection can no longer be answered."""
        events: list[AgentEvent] = []
        if self._in_turn and not self._dropping:
            events.append(AgentResponseDone(self.response_id))
        events += self._flush_caller()
        events += self._flush_agent()
        self._in_turn = False
        self._dropping = False
        self._tool_calls.clear()
        self.setup_complete = False
        self.go_away_s = None
        return events

    # -- client messages -------------------------------------------------------------------
    def ws_url(self) -> str:
        """The endpoint with ``?key=`` (kept when the URL has one). Contains the secret:
        never log it (see :meth:`safe_url`)."""
        key = self.options.api_key
        return with_query(self.options.url, "key", key) if key else self.options.url

    def safe_url(self) -> str:
        parts = urlsplit(self.options.url)
        return f"{parts.scheme}://{parts.netloc}{parts.path}"

    def setup_message(self, handle: str | None = None) -> str:
        """``setup`` (resuming ``handle`` when given)."""
        o = self.options
        generation: dict[str, Any] = {"responseModalities": ["AUDIO"]}
        speech: dict[str, Any] = {}
        if o.voice:
            speech["voiceConfig"] = {"prebuiltVoiceConfig": {"voiceName": o.voice}}
        if o.language:
            speech["languageCode"] = o.language
        if speech:
            generation["speechConfig"] = speech
        setup: dict[str, Any] = {"model": o.model_path, "generationConfig": generation}
        if o.instructions:
            setup["systemInstruction"] = {"parts": [{"text": o.instructions}]}
        if o.tools:
            setup["tools"] = [{"functionDeclarations": [dict(t) for t in o.tools]}]
        if o.transcription:
            setup["inputAudioTranscription"] = {}
            setup["outputAudioTranscription"] = {}
        if o.session_resumption:
            setup["sessionResumption"] = {"handle": handle} if handle else {}
        if o.context_compression:
            setup["contextWindowCompression"] = {"slidingWindow": {}}
        if o.setup_extra:
            deep_merge(setup, o.setup_extra)
        return dumps({"setup": setup})

    def greeting_messages(self) -> list[str]:
        """Speak first: ask the model to greet with the configured words."""
        greeting = self.options.greeting
        if not greeting:
            return []
        prompt = f'Greet the caller by saying exactly: "{greeting}"'
        if self.options.greeting_via == "realtime_text":
            return [dumps({"realtimeInput": {"text": prompt}})]
        turn = {"role": "user", "parts": [{"text": prompt}]}
        return [dumps({"clientContent": {"turns": [turn], "turnComplete": True}})]

    def history_message(self) -> str | None:
        """The conversation so far as ``clientContent`` history (no new turn), for a fresh
        session that replaces one that could not be resumed."""
        if not self.history:
            return None
        turns = [
            {"role": "user" if role == "caller" else "model", "parts": [{"text": text}]}
            for role, text in self.history
        ]
        return dumps({"clientContent": {"turns": turns, "turnComplete": False}})

    #: (head, tail) of ``realtimeInput.audio`` around the base64 audio, for the compiled
    #: build of the whole frame (WebSocket.send_audio_text_nowait)
    audio_parts = (_AUDIO.head_bytes, _AUDIO.tail_bytes)

    def check_audio(self, pcm: bytes) -> None:
        """PCM16 goes in whole samples: LocalProtocolError otherwise."""
        if len(pcm) & 1:
            raise LocalProtocolError(f"PCM16 audio must be whole samples, got {len(pcm)} bytes")

    def audio_message(self, pcm: bytes) -> str:
        """``realtimeInput.audio`` for PCM16 16 kHz (whole samples only)."""
        self.check_audio(pcm)
        return _AUDIO.raw(pcm)

    def tool_response(self, call_id: str, output: str) -> str | None:
        """``toolResponse`` for an issued, not cancelled, unanswered call; None otherwise.
        ``response`` must be an object: a JSON object output is sent as is, anything else
        as ``{"output": ...}`` (the key the API documents for function output)."""
        name = self._tool_calls.pop(call_id, None)
        if name is None:
            return None
        try:
            value: Any = orjson.loads(output)
        except orjson.JSONDecodeError:
            value = output
        response = value if type(value) is dict else {"output": value}
        call = {"id": call_id, "name": name, "response": response}
        return dumps({"toolResponse": {"functionResponses": [call]}})

    def pending_tool_calls(self) -> list[str]:
        return list(self._tool_calls)

    # -- server messages -----------------------------------------------------------------
    def parse_message(self, message: str | bytes) -> list[AgentEvent]:
        """One WebSocket message, text or binary (both carry JSON)."""
        msg = _loads(message)
        self.events_in += 1
        events: list[AgentEvent] = []
        known = False
        if _get(msg, "setupComplete") is not None:
            known = True
            self.setup_complete = True
        content = _get(msg, "serverContent")
        if content is not None:
            known = True
            if type(content) is not dict:
                raise _bad("serverContent must be an object")
            events += self._on_server_content(content)
        call = _get(msg, "toolCall")
        if call is not None:
            known = True
            events += self._on_tool_call(call)
        cancel = _get(msg, "toolCallCancellation")
        if cancel is not None:
            known = True
            self._on_tool_cancellation(cancel)
        go_away = _get(msg, "goAway")
        if go_away is not None:
            known = True
            left = parse_duration(_get(go_away, "timeLeft")) if type(go_away) is dict else None
            self.go_away_s = left if left is not None else 0.0
        update = _get(msg, "sessionResumptionUpdate")
        if update is not None:
            known = True
            self._on_resumption_update(update)
        error = msg.get("error")
        if error is not None:
            known = True
            events.append(self._on_error(error))
        if not known and _get(msg, "usageMetadata") is None:
            self._ignore(next(iter(msg), "<empty>"))
        return events

    def _ignore(self, key: str) -> None:
        self.ignored += 1
        if key in self.ignored_types or len(self.ignored_types) < 64:
            self.ignored_types[key[:80]] += 1

    def _flush_caller(self) -> list[AgentEvent]:
        if not self._caller:
            return []
        text = "".join(self._caller).strip()
        self._caller.clear()
        if not text:
            return []
        self.history.append(("caller", text))
        return [AgentTranscript("caller", text)]

    def _flush_agent(self) -> list[AgentEvent]:
        if not self._agent:
            return []
        text = "".join(self._agent).strip()
        self._agent.clear()
        if not text:
            return []
        self.history.append(("agent", text))
        return [AgentTranscript("agent", text)]

    def _start_turn(self) -> list[AgentEvent]:
        if self._in_turn:
            return []
        self._in_turn = True
        self._handle_stale = True
        self._turn += 1
        # The caller's utterance that this turn answers is complete.
        return self._flush_caller()

    def _on_server_content(self, content: dict[str, Any]) -> list[AgentEvent]:
        events: list[AgentEvent] = []
        if _get(content, "interrupted") is True:
            # Barge-in. The engine clears Twilio and drops this turn's queued audio; what
            # the server still sends of it (up to turnComplete) is dropped here.
            events.append(AgentSpeechStarted())
            self._handle_stale = True
            events += self._flush_agent()
            self._in_turn = False
            self._dropping = True
        turn = _get(content, "modelTurn")
        if turn is not None:
            events += self._on_model_turn(turn)
        heard = _text(_get(content, "inputTranscription"))
        if heard:
            self._caller.append(heard)
            events.append(AgentTranscript("caller", heard, final=False))
        said = _text(_get(content, "outputTranscription"))
        if said and not self._dropping:
            events += self._start_turn()
            self._agent.append(said)
            events.append(AgentTranscript("agent", said, final=False))
        if _get(content, "turnComplete") is True:
            if self._in_turn:
                events.append(AgentResponseDone(self.response_id))
            events += self._flush_caller()
            events += self._flush_agent()
            self._in_turn = False
            self._dropping = False
        return events

    def _on_model_turn(self, turn: Any) -> list[AgentEvent]:
        if type(turn) is not dict:
            raise _bad("modelTurn must be an object")
        parts = _get(turn, "parts") or []
        if type(parts) is not list:
            raise _bad("modelTurn.parts must be a list")
        events: list[AgentEvent] = []
        for part in parts:
            if type(part) is not dict:
                continue
            inline = _get(part, "inlineData")
            if type(inline) is not dict:
                continue  # text (thought summaries), executable code, ...: not spoken
            mime = _get(inline, "mimeType")
            data = inline.get("data")
            if type(mime) is not str or not mime.startswith("audio/pcm"):
                continue
            if type(data) is not str:
                raise _bad("inlineData.data must be a string")
            m = _RATE_RE.search(mime)
            if m is not None and int(m.group(1)) != OUTPUT_FORMAT.rate:
                # The engine's resampler is set up for 24 kHz: other audio would play at
                # the wrong speed, so it is refused (counted, reported, not played).
                self.bad_rate_chunks += 1
                events.append(
                    AgentErrorEvent("agent_audio_format", f"unexpected audio format {mime!r}")
                )
                continue
            if self._dropping:
                self.audio_dropped += 1
                continue
            try:
                audio = binascii.a2b_base64(data, strict_mode=True)
            except (binascii.Error, ValueError):
                raise _bad("inlineData.data is not valid base64") from None
            if len(audio) & 1:
                raise _bad(f"PCM16 audio of odd length ({len(audio)} bytes)")
            if audio:
                events += self._start_turn()
                events.append(AgentAudio(audio, self.response_id))
        return events

    def _on_tool_call(self, call: Any) -> list[AgentEvent]:
        if type(call) is not dict:
            raise _bad("toolCall must be an object")
        calls = _get(call, "functionCalls") or []
        if type(calls) is not list:
            raise _bad("toolCall.functionCalls must be a list")
        events: list[AgentEvent] = []
        for fc in calls:
            if type(fc) is not dict:
                raise _bad("functionCalls[] must be objects")
            call_id, name = fc.get("id"), fc.get("name")
            if type(call_id) is not str or not call_id or type(name) is not str:
                raise _bad("functionCalls[] needs string id and name")
            args = fc.get("args")
            if args is None:
                args = {}
            if type(args) is not dict:
                raise _bad("functionCalls[].args must be an object")
            if call_id in self._tool_calls or call_id in self._cancelled:
                continue
            if len(self._tool_calls) >= MAX_TRACKED:
                del self._tool_calls[next(iter(self._tool_calls))]
            self._tool_calls[call_id] = name
            self._handle_stale = True
            events.append(AgentToolCall(call_id, name, dumps(args)))
        return events

    def _on_tool_cancellation(self, cancel: Any) -> None:
        ids = _get(cancel, "ids") if type(cancel) is dict else None
        if type(ids) is not list:
            raise _bad("toolCallCancellation.ids must be a list")
        for call_id in ids:
            if type(call_id) is str:
                self._tool_calls.pop(call_id, None)
                self._cancelled[call_id] = None
                if len(self._cancelled) > MAX_TRACKED:
                    del self._cancelled[next(iter(self._cancelled))]

    def _on_resumption_update(self, update: Any) -> None:
        if type(update) is not dict:
            raise _bad("sessionResumptionUpdate must be an object")
        resumable = _get(update, "resumable") is True
        handle = _get(update, "newHandle")
        self.resumable = resumable
        # "Empty if resumable=false": keep the previous handle, it still resumes the
        # session as of its last resumable point.
        if resumable and type(handle) is str and handle:
            self.handle = handle
            self._handle_stale = False

    def _on_error(self, error: Any) -> AgentErrorEvent:
        if type(error) is not dict:
            return AgentErrorEvent("agent_error", str(error)[:200], fatal=True)
        code = error.get("status") or error.get("code") or "agent_error"
        message = error.get("message")
        return AgentErrorEvent(
            str(code), message if type(message) is str else "Gemini reported an error", fatal=True
        )
