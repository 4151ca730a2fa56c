"""Sans-IO core of the OpenAI Realtime adapter: wire text in, :mod:`relay.agents.base` events
out, and the client messages the adapter sends. No sockets, no Trio, no clocks.

Rules followed (``/work/shared/reference/voice-agent-apis.md``, "OpenAI Realtime"):

* GA and beta differ in the ``session.update`` shape (nested ``session.audio`` with format
  objects vs flat ``input_audio_format`` strings) and in event names
  (``response.output_audio.delta`` vs ``response.audio.delta``, ...). :meth:`parse` accepts
  both name sets whatever ``api`` is configured ("vendors rename things").
* ``conversation.item.truncate``: "N larger than the generated audio is an error", so the
  protocol counts the audio bytes it parsed per assistant item and clamps N to them.
* Errors are "mostly non-fatal": only authentication, quota, session expiry (the 60 min
  cap) and a rejected ``session.update`` (the session would run with the wrong audio
  format) are reported with ``fatal=True``.

* A Realtime session cannot be resumed. After a lost connection the adapter opens a new
  session (same ``session.update``, plus :data:`RECONNECT_NOTE` in the instructions) and
  seeds it with the conversation so far: :meth:`OpenAIRealtimeProtocol.seed_messages`, one
  ``conversation.item.create`` per text turn (``input_text`` for the caller,
  ``output_text``, beta ``text``, for the agent: "it cannot populate assistant audio
  messages"), built from the transcripts parsed here. An agent turn the caller interrupted
  is cut to the share of its audio the caller heard (what :meth:`truncate` was told).
  Caller turns exist only with ``transcription_model`` (no transcripts otherwise).

Malformed agent input (bad JSON, a known event with wrongly typed fields, undecodable
base64, a binary frame) raises :class:`relay.errors.RemoteProtocolError` with kind
``agent_protocol``; the Trio layer decides what that means for the call.
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from ..errors import ConfigError
from .base import (
    AgentAudio,
    AgentErrorEvent,
    AgentEvent,
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
    mask_secret,
    normalize_tool,
    opt_str,
    refuse_binary,
    str_field,
    with_query,
)

__all__ = [
    "BYTES_PER_MS",
    "DEFAULT_URL",
    "FATAL_ERROR_CODES",
    "MAX_HISTORY",
    "RECONNECT_NOTE",
    "SESSION_UPDATE_EVENT_ID",
    "OpenAIOptions",
    "OpenAIRealtimeProtocol",
    "mask_secret",
]

DEFAULT_URL = "wss://api.openai.com/v1/realtime"

#: Client ``event_id`` of our ``session.update``; the server echoes it in ``error.event_id``
#: when it rejects the update, which is how a rejected configuration is recognised.
SESSION_UPDATE_EVENT_ID = "relay_session_update"

#: Generated audio bytes per millisecond: μ-law 8 kHz = 8 B/ms, PCM16 24 kHz = 48 B/ms.
BYTES_PER_MS: Mapping[str, int] = {"pcmu": 8, "pcm24k": 48}

#: ``error.code`` / ``error.type`` values after which the session cannot go on.
FATAL_ERROR_CODES = frozenset(
    {
        "invalid_api_key",
        "authentication_error",
        "permission_denied",
        "insufficient_quota",
        "session_expired",
        "model_not_found",
    }
)
FATAL_ERROR_TYPES = frozenset({"authentication_error", "permission_error"})

#: Per-item bookkeeping is bounded: only recent items can still be playing or truncated.
MAX_TRACKED_ITEMS = 256

#: Turns kept to seed a new session after a lost connection (the newest are kept).
MAX_HISTORY = 200

#: Appended to the instructions of a session that continues a call after a lost connection.
RECONNECT_NOTE = (
    "This phone call was briefly interrupted by a technical problem and continues now on a "
    "new connection; the conversation so far is in this session's history. Do not greet the "
    "caller again and do not mention the interruption unless asked; continue the "
    "conversation where it stopped."
)

_AUDIO_FORMATS = ("pcmu", "pcm24k")
_APIS = ("ga", "beta")


@dataclass(frozen=True, slots=True)
class OpenAIOptions:
    """Everything an OpenAI Realtime session is configured with.

    ``audio``: "pcmu" (μ-law 8 kHz both ways: Twilio passthrough) or "pcm24k" (PCM16
    24 kHz both ways; the engine resamples). ``api``: "ga" or "beta" (session shape, the
    ``OpenAI-Beta`` header). ``turn_detection``: None means ``{"type": "server_vad"}``;
    ``{"type": "none"}`` disables it (sent as ``null``); other mappings are sent verbatim.
    ``session_extra`` is deep-merged into the ``session`` object (new API fields).
    """

    url: str = DEFAULT_URL
    api_key: str = field(default="", repr=False)
    model: str = "gpt-realtime"
    voice: str = "marin"
    audio: str = "pcmu"
    api: str = "ga"
    instructions: str = ""
    greeting: str = ""
    tools: Sequence[Mapping[str, Any]] = ()
    transcription_model: str | None = None
    turn_detection: Mapping[str, Any] | None = None
    tool_choice: str = "auto"
    session_extra: Mapping[str, Any] | None = None
    connect_timeout_s: float = 10.0
    send_timeout_s: float = 2.0
    #: Wait for ``session.updated`` before the greeting (bounded by ``connect_timeout_s``).
    wait_for_session: bool = True

    def __post_init__(self) -> None:
        if self.audio not in _AUDIO_FORMATS:
            raise ConfigError(f"openai audio must be one of {_AUDIO_FORMATS}, got {self.audio!r}")
        if self.api not in _APIS:
            raise ConfigError(f"openai api must be one of {_APIS}, got {self.api!r}")
        check_ws_url(self.url)
        if not self.model:
            raise ConfigError("openai model must not be empty")
        if not (self.connect_timeout_s > 0 and self.send_timeout_s > 0):
            raise ConfigError("openai connect_timeout_s and send_timeout_s must be > 0")
        check_header_secret(self.api_key)
        # Realtime tools are flat (reference: session.update ``tools``).
        object.__setattr__(self, "tools", tuple(normalize_tool(t) for t in self.tools))

    def __repr__(self) -> str:
        return (
            f"OpenAIOptions(url={self.url!r}, model={self.model!r}, api={self.api!r}, "
            f"audio={self.audio!r}, voice={self.voice!r}, tools={len(self.tools)}, "
            f"api_key={mask_secret(self.api_key)!r})"
        )


_APPEND = AudioMessage(lambda b64: {"type": "input_audio_buffer.append", "audio": b64})


@dataclass(slots=True)
class _Turn:
    """One turn of the conversation, kept to seed a new session."""

    role: str  # "caller" or "agent"
    text: str = ""  # the final transcript ("" until it arrives)
    deltas: list[str] = field(default_factory=list)  # agent: transcript so far
    generated_ms: int = 0  # agent: audio generated (when truncated or the connection ended)
    heard_ms: int | None = None  # agent: what the caller heard, when interrupted
    heard_text: str | None = None  # agent: the part of the transcript that was heard

    def seed_text(self) -> str:
        if self.heard_text is not None:
            return self.heard_text
        return " ".join((self.text or "".join(self.deltas)).split())

    def heard(self, heard_ms: int, generated_ms: int) -> None:
        """Interrupted after ``heard_ms`` of ``generated_ms``: the transcript of the audio
        generated so far (the deltas; the final transcript when none came) is cut to the
        same share."""
        self.generated_ms = max(self.generated_ms, generated_ms)
        heard = max(0, min(heard_ms, self.generated_ms))
        if self.heard_ms is not None and heard >= self.heard_ms:
            return
        self.heard_ms = heard
        text = " ".join(("".join(self.deltas) or self.text).split())
        self.heard_text = heard_part(text, heard, self.generated_ms)


def heard_part(text: str, heard_ms: int | None, generated_ms: int) -> str:
    """The share of ``text`` the caller heard: ``heard_ms`` of ``generated_ms`` of audio
    (all of it when nothing was cut), cut back to a whole word and marked with "…"."""
    if heard_ms is None or generated_ms <= 0 or heard_ms >= generated_ms:
        return text
    n = len(text) * max(0, heard_ms) // generated_ms
    cut = text[:n]
    if n < len(text) and not text[n].isspace():
        cut = cut.rpartition(" ")[0]  # drop the word that was cut in half
    cut = cut.rstrip(" ,;:")
    return f"{cut}…" if cut else ""


class OpenAIRealtimeProtocol(EventDispatcher):
    """State of one Realtime session as seen from the relay (sans-IO)."""

    def __init__(self, options: OpenAIOptions) -> None:
        super().__init__()
        self.options = options
        self.bytes_per_ms = BYTES_PER_MS[options.audio]
        #: True once ``session.updated`` arrived (our configuration is in effect).
        self.configured = False
        self.session_created = False
        self.session_id: str | None = None
        #: The last session object the server sent (session.created / session.updated).
        self.session: dict[str, Any] | None = None
        #: Set when the server rejected our session.update (error.event_id matched).
        self.session_error: AgentErrorEvent | None = None
        # item_id -> audio bytes generated (insertion ordered, bounded)
        self._item_bytes: dict[str, int] = {}
        self._done: set[str] = set()
        self._truncated: set[str] = set()
        # call_id/item_id -> function name (the .done event may omit ``name``)
        self._function_names: dict[str, str] = {}
        self._tool_calls: dict[str, None] = {}
        # tool calls issued on an earlier connection: the current session never saw them
        self._void_calls: dict[str, None] = {}
        #: tool results not sent because their call belonged to an earlier connection
        self.dropped_results = 0
        # conversation so far, by item id (insertion ordered = conversation order, bounded)
        self._turns: dict[str, _Turn] = {}
        h = self._handlers
        for name in ("response.output_audio.delta", "response.audio.delta"):
            h[name] = type(self)._on_audio_delta
        for name in ("response.output_audio.done", "response.audio.done"):
            h[name] = type(self)._on_audio_done
        h["response.done"] = type(self)._on_response_done
        h["input_audio_buffer.speech_started"] = type(self)._on_speech_started
        h["input_audio_buffer.speech_stopped"] = type(self)._on_speech_stopped
        for name in ("response.output_audio_transcript.delta", "response.audio_transcript.delta"):
            h[name] = type(self)._on_agent_transcript_delta
        for name in ("response.output_audio_transcript.done", "response.audio_transcript.done"):
            h[name] = type(self)._on_agent_transcript_done
        h["conversation.item.input_audio_transcription.delta"] = type(self)._on_caller_delta
        h["conversation.item.input_audio_transcription.completed"] = type(self)._on_caller_done
        h["conversation.item.input_audio_transcription.failed"] = type(self)._on_caller_failed
        h["response.function_call_arguments.done"] = type(self)._on_function_args_done
        h["response.output_item.added"] = type(self)._on_output_item
        h["response.output_item.done"] = type(self)._on_output_item
        h["error"] = type(self)._on_error
        h["session.created"] = type(self)._on_session
        h["session.updated"] = type(self)._on_session

    # -- client messages ---------------------------------------------------------------
    def ws_url(self) -> str:
        """The endpoint with ``?model=`` appended (an existing query, incl. model, is kept)."""
        return with_query(self.options.url, "model", self.options.model)

    def handshake_headers(self) -> list[tuple[str, str]]:
        """``Authorization: Bearer <key>``; beta also needs ``OpenAI-Beta: realtime=v1``."""
        headers = [("Authorization", f"Bearer {self.options.api_key}")]
        if self.options.api == "beta":
            headers.append(("OpenAI-Beta", "realtime=v1"))
        return headers

    def _turn_detection(self) -> dict[str, Any] | None:
        td = self.options.turn_detection
        if td is None:
            return {"type": "server_vad"}
        if td.get("type") in ("none", None):
            return None
        return dict(td)

    def session_update(self, *, seeded: bool = False) -> str:
        """The ``session.update`` for the configured API flavour. ``seeded``: the session
        continues a call after a lost connection (:data:`RECONNECT_NOTE` is added to the
        instructions)."""
        o = self.options
        session: dict[str, Any]
        if o.api == "ga":
            # GA: session.type "realtime", output_modalities, nested audio.{input,output}
            # with format objects ({"type":"audio/pcmu"} or {"type":"audio/pcm","rate":24000}).
            fmt: dict[str, Any] = (
                {"type": "audio/pcmu"}
                if o.audio == "pcmu"
                else {"type": "audio/pcm", "rate": 24000}
            )
            audio_in: dict[str, Any] = {"format": fmt, "turn_detection": self._turn_detection()}
            if o.transcription_model:
                audio_in["transcription"] = {"model": o.transcription_model}
            session = {
                "type": "realtime",
                "model": o.model,
                "output_modalities": ["audio"],
                "audio": {"input": audio_in, "output": {"format": dict(fmt), "voice": o.voice}},
            }
        else:
            # Beta: flat input_audio_format/output_audio_format strings, modalities incl. text.
            bfmt = "g711_ulaw" if o.audio == "pcmu" else "pcm16"
            session = {
                "modalities": ["audio", "text"],
                "voice": o.voice,
                "input_audio_format": bfmt,
                "output_audio_format": bfmt,
                "turn_detection": self._turn_detection(),
            }
            if o.transcription_model:
                session["input_audio_transcription"] = {"model": o.transcription_model}
        instructions = o.instructions
        if seeded:
            instructions = f"{instructions}\n\n{RECONNECT_NOTE}" if instructions else RECONNECT_NOTE
        if instructions:
            session["instructions"] = instructions
        if o.tools:
            session["tools"] = [dict(t) for t in o.tools]
            session["tool_choice"] = o.tool_choice
        if o.session_extra:
            deep_merge(session, o.session_extra)
        return dumps(
            {"type": "session.update", "event_id": SESSION_UPDATE_EVENT_ID, "session": session}
        )

    def greeting_messages(self) -> list[str]:
        """Speak first: ``conversation.item.create`` then ``response.create`` (reference:
        "Greeting / speak first"). The prompt is a user message asking for the exact words,
        as in the Twilio/OpenAI speech-assistant sample. Empty when no greeting is set."""
        greeting = self.options.greeting
        if not greeting:
            return []
        prompt = f'Greet the caller by saying exactly: "{greeting}"'
        item = {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": prompt}],
        }
        return [
            dumps({"type": "conversation.item.create", "item": item}),
            dumps({"type": "response.create"}),
        ]

    def seed_messages(self) -> list[str]:
        """One ``conversation.item.create`` per turn of the conversation so far, oldest
        first, for a new session that continues the call (no ``response.create``: the model
        waits for the caller, it does not greet again)."""
        agent_type = "output_text" if self.options.api == "ga" else "text"
        messages = []
        for role, text in self.history():
            if role == "caller":
                item_role, content_type = "user", "input_text"
            else:
                item_role, content_type = "assistant", agent_type
            item = {
                "type": "message",
                "role": item_role,
                "content": [{"type": content_type, "text": text}],
            }
            messages.append(dumps({"type": "conversation.item.create", "item": item}))
        return messages

    def history(self) -> list[tuple[str, str]]:
        """The conversation so far as (role, text), role "caller" or "agent"; agent turns
        the caller interrupted are cut to what was heard, empty turns left out."""
        turns = [(t.role, t.seed_text()) for t in self._turns.values()]
        return [(role, text) for role, text in turns if text]

    def _turn(self, item_id: str, role: str) -> _Turn:
        turn = self._turns.get(item_id)
        if turn is None:
            if len(self._turns) >= MAX_HISTORY:
                del self._turns[next(iter(self._turns))]
            turn = self._turns[item_id] = _Turn(role)
        return turn

    # -- connection lifecycle --------------------------------------------------------------
    def begin_connection(self) -> None:
        """A new connection (and session) is being opened. Items and tool calls of the old
        session are unknown to the new one: truncates of its items are not sent (what the
        caller heard still goes into the history), results of its tool calls are dropped."""
        self.configured = False
        self.session_created = False
        self.session_error = None
        for item_id, n in self._item_bytes.items():
            turn = self._turns.get(item_id)
            if turn is not None and turn.heard_ms is None:
                turn.generated_ms = n // self.bytes_per_ms
        self._item_bytes.clear()
        self._done.clear()
        self._truncated.clear()
        self._function_names.clear()
        for call_id in self._tool_calls:
            if len(self._void_calls) >= MAX_TRACKED_ITEMS:
                del self._void_calls[next(iter(self._void_calls))]
            self._void_calls[call_id] = None
        self._tool_calls.clear()

    def connection_lost(self) -> list[AgentEvent]:
        """The connection died: the replies it was sending are over for the engine."""
        self.configured = False
        events: list[AgentEvent] = []
        for item_id in list(self._item_bytes):
            if item_id not in self._done and item_id not in self._truncated:
                events += self._finish(item_id)
        return events

    #: (head, tail) of the append message around the base64 audio, UTF-8: the hot path
    #: splices Twilio's payload in (WebSocket.send_b64_texts_nowait)
    append_parts = (_APPEND.head_bytes, _APPEND.tail_bytes)

    def append_audio_b64(self, payload: str) -> str:
        """``input_audio_buffer.append`` for caller audio already in base64 (hot path:
        concatenation, see :class:`~relay.agents.wire.AudioMessage`)."""
        return _APPEND.b64(payload)

    def append_audio(self, audio: bytes) -> str:
        return _APPEND.raw(audio)

    def generated_ms(self, item_id: str) -> int:
        """Milliseconds of audio the agent generated for ``item_id`` (whole ms, floor)."""
        return self._item_bytes.get(item_id, 0) // self.bytes_per_ms

    def audio_books(self) -> tuple[dict[str, int], set[str]]:
        """The live bookkeeping of audio deltas: bytes generated per item, truncated items.
        A compiled reader (relay.media.codec.DownlinkHandler) updates it in place for a
        delta of a known, untruncated item exactly as :meth:`_audio` would; the objects
        are never replaced (cleared in place), so it may hold them for the session."""
        return self._item_bytes, self._truncated

    def knows_item(self, item_id: str) -> bool:
        return item_id in self._item_bytes

    def truncate(self, item_id: str, audio_end_ms: int) -> str:
        """``conversation.item.truncate`` (content_index 0) with ``audio_end_ms`` clamped to
        [0, generated ms]: "N larger than the generated audio is an error". The tracked
        length shrinks to N, as the server's item does, and stops growing (deltas already in
        flight are not added to the server's truncated item), so a later truncate stays valid."""
        generated = self._item_bytes.get(item_id, 0) // self.bytes_per_ms
        self.note_heard(item_id, audio_end_ms)
        ms = max(0, min(int(audio_end_ms), generated))
        if item_id in self._item_bytes:
            self._item_bytes[item_id] = ms * self.bytes_per_ms
            self._truncated.add(item_id)
        return dumps(
            {
                "type": "conversation.item.truncate",
                "item_id": item_id,
                "content_index": 0,
                "audio_end_ms": ms,
            }
        )

    def note_heard(self, item_id: str, audio_end_ms: int) -> None:
        """The caller heard ``audio_end_ms`` of agent item ``item_id`` (a barge-in): its
        turn in the history is cut to that. Also for an item of an earlier session, which
        the current one cannot truncate."""
        turn = self._turns.get(item_id)
        if turn is None or turn.role != "agent":
            return
        turn.heard(int(audio_end_ms), self._item_bytes.get(item_id, 0) // self.bytes_per_ms)

    def tool_result(self, call_id: str, output: str) -> list[str]:
        """``function_call_output`` item, then ``response.create`` so the model answers;
        nothing for a call issued on an earlier connection (the session never made it)."""
        if call_id in self._void_calls:
            self.dropped_results += 1
            return []
        item = {"type": "function_call_output", "call_id": call_id, "output": output}
        return [
            dumps({"type": "conversation.item.create", "item": item}),
            dumps({"type": "response.create"}),
        ]

    def cancel_response(self) -> str:
        return dumps({"type": "response.cancel"})

    # -- server messages -----------------------------------------------------------------
    def parse_message(self, message: str | bytes | tuple[str, bytes]) -> list[AgentEvent]:
        """A WebSocket message as received: OpenAI sends only text frames. An audio delta
        may arrive already parsed as ``(item_id, audio)`` (relay's compiled frame reader,
        ``codec.ServerFrameParser(openai_audio=True)``: the same event, minus the JSON)."""
        if type(message) is tuple:
            self.events_in += 1
            return self._audio(*message)
        return self.dispatch(refuse_binary(cast("str | bytes", message), "OpenAI Realtime"))

    def parse(self, text: str | bytes) -> list[AgentEvent]:
        """One server event (JSON text) -> zero or more agent events."""
        return self.dispatch(text)

    # bookkeeping ---------------------------------------------------------------------
    def _track(self, item_id: str) -> None:
        items = self._item_bytes
        if item_id not in items:
            if len(items) >= MAX_TRACKED_ITEMS:
                oldest = next(iter(items))
                del items[oldest]
                self._done.discard(oldest)
                self._truncated.discard(oldest)
            items[item_id] = 0

    def _finish(self, item_id: str) -> list[AgentEvent]:
        if item_id in self._done:
            return []
        self._track(item_id)
        self._done.add(item_id)
        return [AgentResponseDone(item_id)]

    def _remember_call(self, call_id: str) -> bool:
        """True the first time ``call_id`` is seen: a tool call is reported once."""
        if call_id in self._tool_calls:
            return False
        if len(self._tool_calls) >= MAX_TRACKED_ITEMS:
            del self._tool_calls[next(iter(self._tool_calls))]
        self._tool_calls[call_id] = None
        return True

    # handlers --------------------------------------------------------------------------
    def _on_audio_delta(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        delta = msg.get("delta")
        item_id = msg.get("item_id")
        if type(delta) is not str or type(item_id) is not str:
            raise bad_event(etype, "delta and item_id must be strings")
        try:
            audio = binascii.a2b_base64(delta)
        except (binascii.Error, ValueError):
            raise bad_event(etype, "delta is not valid base64") from None
        return self._audio(item_id, audio)

    def _audio(self, item_id: str, audio: bytes) -> list[AgentEvent]:
        items = self._item_bytes
        n = items.get(item_id)
        if n is None:
            self._track(item_id)
            self._turn(item_id, "agent")
            n = 0
        if not audio:
            return []
        if item_id not in self._truncated:
            # Deltas still in flight after a truncate do not lengthen the server's item.
            items[item_id] = n + len(audio)
        return [AgentAudio(audio, item_id)]

    def _on_audio_done(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        return self._finish(str_field(msg, "item_id", etype))

    def _on_response_done(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        resp = msg.get("response")
        if type(resp) is not dict:
            raise bad_event(etype, "response must be an object")
        output = resp.get("output")
        if output is None:
            output = []
        if type(output) is not list:
            raise bad_event(etype, "response.output must be a list")
        status = resp.get("status")
        events: list[AgentEvent] = []
        for item in output:
            if type(item) is not dict:
                continue
            item_id = item.get("id")
            kind = item.get("type")
            if kind == "message" and type(item_id) is str:
                # Only items that produced audio: the engine knows no others.
                if item_id in self._item_bytes:
                    events += self._finish(item_id)
            elif kind == "function_call" and status == "completed":
                events += self._tool_call_from_item(item)
        if status == "failed":
            details = resp.get("status_details")
            err = details.get("error") if type(details) is dict else None
            if type(err) is not dict:
                err = {}
            code = opt_str(err.get("code") or err.get("type")) or "response_failed"
            events.append(
                AgentErrorEvent(
                    code,
                    opt_str(err.get("message")) or "response failed",
                    fatal=self._is_fatal(code, opt_str(err.get("type"))),
                )
            )
        return events

    def _on_speech_started(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        item_id = msg.get("item_id")
        if type(item_id) is str:
            # the caller's turn takes its place in the conversation now, before the reply
            # to it; its transcript comes later
            self._turn(item_id, "caller")
        return [AgentSpeechStarted()]

    def _on_speech_stopped(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        return [AgentSpeechStopped()]

    def _on_agent_transcript_delta(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        delta = str_field(msg, "delta", etype)
        if not delta:
            return []
        item_id = msg.get("item_id")
        if type(item_id) is str:
            turn = self._turn(item_id, "agent")
            if len(turn.deltas) < 1000:
                turn.deltas.append(delta)
        return [AgentTranscript("agent", delta, final=False)]

    def _on_agent_transcript_done(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        transcript = str_field(msg, "transcript", etype)
        item_id = msg.get("item_id")
        if type(item_id) is str:
            self._turn(item_id, "agent").text = transcript
        return [AgentTranscript("agent", transcript)]

    def _on_caller_delta(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        delta = str_field(msg, "delta", etype)
        return [AgentTranscript("caller", delta, final=False)] if delta else []

    def _on_caller_done(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        transcript = str_field(msg, "transcript", etype)
        item_id = msg.get("item_id")
        if type(item_id) is str:
            self._turn(item_id, "caller").text = transcript
        return [AgentTranscript("caller", transcript)]

    def _on_caller_failed(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        err = msg.get("error")
        message = opt_str(err.get("message")) if type(err) is dict else ""
        return [AgentErrorEvent("transcription_failed", message or "caller transcription failed")]

    def _on_output_item(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        item = msg.get("item")
        if type(item) is not dict or item.get("type") != "function_call":
            return []
        name = item.get("name")
        call_id = item.get("call_id")
        item_id = item.get("id")
        if type(name) is str and name:
            for key in (call_id, item_id):
                if type(key) is str:
                    if len(self._function_names) >= MAX_TRACKED_ITEMS:
                        del self._function_names[next(iter(self._function_names))]
                    self._function_names[key] = name
        # Fallback when no arguments.done was seen: a completed function_call item.
        if etype == "response.output_item.done" and item.get("status") == "completed":
            return self._tool_call_from_item(item)
        return []

    def _tool_call_from_item(self, item: dict[str, Any]) -> list[AgentEvent]:
        call_id = item.get("call_id")
        name = item.get("name")
        arguments = item.get("arguments")
        if type(call_id) is not str or type(name) is not str or type(arguments) is not str:
            return []
        if not self._remember_call(call_id):
            return []
        return [AgentToolCall(call_id, name, arguments)]

    def _on_function_args_done(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        call_id = str_field(msg, "call_id", etype)
        arguments = str_field(msg, "arguments", etype)
        name = msg.get("name")
        if type(name) is not str or not name:
            # Some API versions omit ``name`` here; it came with response.output_item.added.
            item_id = msg.get("item_id")
            name = self._function_names.get(call_id) or (
                self._function_names.get(item_id, "") if type(item_id) is str else ""
            )
        if not self._remember_call(call_id):
            return []
        return [AgentToolCall(call_id, name, arguments)]

    @staticmethod
    def _is_fatal(code: str, etype: str) -> bool:
        return code in FATAL_ERROR_CODES or etype in FATAL_ERROR_TYPES

    def _on_error(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        # {"type":"error","error":{type,code,message,param,event_id}}: tolerate odd shapes,
        # an error report must never itself become a protocol error.
        err = msg.get("error")
        if type(err) is not dict:
            err = {"message": opt_str(err)}
        etype_ = opt_str(err.get("type"))
        code = opt_str(err.get("code")) or etype_ or "unknown"
        message = opt_str(err.get("message"))
        fatal = self._is_fatal(code, etype_)
        if err.get("event_id") == SESSION_UPDATE_EVENT_ID:
            # Our configuration was refused: audio format, voice or tools would be wrong.
            fatal = True
            message = f"session.update rejected: {message}"
        event = AgentErrorEvent(code, message, fatal=fatal)
        if err.get("event_id") == SESSION_UPDATE_EVENT_ID:
            self.session_error = event
        return [event]

    def _on_session(self, msg: dict[str, Any], etype: str) -> list[AgentEvent]:
        session = msg.get("session")
        if type(session) is dict:
            self.session = session
            sid = session.get("id")
            if type(sid) is str:
                self.session_id = sid
        if etype == "session.created":
            self.session_created = True
            return []
        self.configured = True
        mismatch = self._format_mismatch(session) if type(session) is dict else None
        if mismatch:
            return [AgentErrorEvent("session_format_mismatch", mismatch, fatal=True)]
        return []

    def _format_mismatch(self, session: dict[str, Any]) -> str | None:
        """Compare the audio formats the server echoed with ours (only fields present)."""
        pcmu = self.options.audio == "pcmu"
        found: list[tuple[str, Any]] = []
        audio = session.get("audio")
        if type(audio) is dict:
            for direction in ("input", "output"):
                part = audio.get(direction)
                fmt = part.get("format") if type(part) is dict else None
                if type(fmt) is dict and "type" in fmt:
                    ok = fmt["type"] == "audio/pcmu" if pcmu else fmt["type"] == "audio/pcm"
                    if not ok or (not pcmu and fmt.get("rate", 24000) != 24000):
                        found.append((f"audio.{direction}.format", fmt))
        for key in ("input_audio_format", "output_audio_format"):
            if key in session:
                want = "g711_ulaw" if pcmu else "pcm16"
                if session[key] != want:
                    found.append((key, session[key]))
        if not found:
            return None
        return "server audio format differs from the configured one: " + ", ".join(
            f"{k}={v!r}" for k, v in found
        )
