"""The sans-IO part of a text agent on the phone: no sockets, no clock, no Trio.

* :class:`SSEParser` turns the bytes of a ``text/event-stream`` body into events (CRLF, CR
  or LF line ends, ``:`` comment lines that gateways send as keep-alives, multi-line
  ``data``, chunks cut anywhere, even inside a CRLF or a UTF-8 sequence).
* :class:`ChatStream` folds the ``data`` of an OpenAI-compatible Chat Completions stream
  into text deltas and, at the end, the tool calls: fragments are concatenated per
  ``index`` (positionally when a server omits it, as Gemini and Ollama do), arguments are
  parsed only once complete, and "a tool call happened" is decided from the accumulated
  calls, not from ``finish_reason``. An event carrying ``error`` raises
  :class:`ChatStreamError`, as the openai SDK does.
* :class:`ClauseSplitter` cuts the streamed reply into pieces to speak: the first at a
  clause boundary once it is long enough to sound natural, later ones at sentence ends;
  never inside a number, a time, an abbreviation, a URL or an e-mail address.
* :class:`History` is the conversation in Chat Completions message form, with the system
  prompt and a bound on its length; :class:`SpokenReply` remembers which text of an
  assistant turn went to speech with how much audio, so a barge-in keeps in the history
  only what the caller heard (the cascaded equivalent of OpenAI's ``truncate``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = [
    "ChatStream",
    "ChatStreamError",
    "ClauseSplitter",
    "History",
    "SSEEvent",
    "SSEParser",
    "SpokenReply",
    "ToolCall",
    "heard_prefix",
]


# --- server-sent events ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SSEParser:
    """Incremental ``text/event-stream`` parser (WHATWG HTML, "Parsing an event stream").

    ``feed(bytes)`` returns the events completed by those bytes. Lines may end in CRLF, LF
    or CR; a CR at the very end of a chunk is held back in case its LF comes next. Lines
    starting with ``:`` are comments; an event is dispatched at a blank line when it has
    data. ``max_line`` bounds what a broken server can make us buffer.
    """

    def __init__(self, max_line: int = 1 << 20) -> None:
        self._buf = bytearray()
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self.max_line = max_line
        self.comments = 0

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buf += chunk
        events: list[SSEEvent] = []
        buf = self._buf
        start = 0
        n = len(buf)
        while start < n:
            lf = buf.find(b"\n", start)
            cr = buf.find(b"\r", start)
            if cr != -1 and (lf == -1 or cr < lf):
                if cr + 1 == n:  # a CR at the end: its LF may be in the next chunk
                    break
                end, skip = cr, 2 if buf[cr + 1] == 0x0A else 1
            elif lf != -1:
                end, skip = lf, 1
            else:
                break
            self._line(bytes(buf[start:end]).decode("utf-8", "replace"), events)
            start = end + skip
        del buf[:start]
        if len(buf) > self.max_line:
            raise ChatStreamError(f"event-stream line longer than {self.max_line} bytes")
        return events

    def _line(self, line: str, events: list[SSEEvent]) -> None:
        if not line:
            if self._data:
                events.append(SSEEvent("\n".join(self._data), self._event or "message", self._id))
            self._data, self._event = [], ""
            return
        if line[0] == ":":
            self.comments += 1
            return
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value

    def close(self) -> list[SSEEvent]:
        """End of body: a last event without its blank line is dropped (per the spec)."""
        self._buf.clear()
        self._data, self._event = [], ""
        return []


# --- Chat Completions stream ------------------------------------------------------------
class ChatStreamError(Exception):
    """The model endpoint sent an error event or something that is not its protocol."""


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, complete
    #: provider extras to echo back on the next request (Gemini's thought_signature)
    extra: dict[str, Any] = field(default_factory=dict)

    def message_form(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        out.update(self.extra)
        return out


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class ChatStream:
    """Fold one streamed Chat Completions response (the ``data`` of each SSE event).

    ``feed(data)`` returns the text deltas of that event (possibly empty). After ``[DONE]``
    (``done``), or once the body ended, read :attr:`text`, :meth:`tool_calls`,
    :attr:`finish_reason` and :attr:`usage`.
    """

    def __init__(self) -> None:
        self.parts: list[str] = []
        self._calls: list[_PartialCall] = []
        self._by_index: dict[int, _PartialCall] = {}
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.done = False
        self.refusal = ""
        self.chunks = 0

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def feed(self, data: str) -> list[str]:
        if self.done:
            return []
        if data.strip() == "[DONE]":
            self.done = True
            return []
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ChatStreamError(f"event data is not JSON: {data[:120]!r}") from None
        if not isinstance(obj, dict):
            raise ChatStreamError("event data is not a JSON object")
        if obj.get("error") is not None:
            err = obj["error"]
            message = err.get("message") if isinstance(err, dict) else str(err)
            raise ChatStreamError(f"model error: {message}")
        self.chunks += 1
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
        choices = obj.get("choices")
        if not choices:  # the usage chunk (choices [] or null, vLLM)
            return []
        if not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise ChatStreamError("choices is not a list of objects")
        choice = choices[0]  # n = 1
        out: list[str] = []
        delta = choice.get("delta") or {}
        if isinstance(delta, dict):
            content = delta.get("content")
            if isinstance(content, str) and content:
                self.parts.append(content)
                out.append(content)
            refusal = delta.get("refusal")
            if isinstance(refusal, str):
                self.refusal += refusal
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for position, fragment in enumerate(calls):
                    if isinstance(fragment, dict):
                        self._tool_fragment(fragment, position)
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            self.finish_reason = reason
        return out

    def _tool_fragment(self, fragment: dict[str, Any], position: int) -> None:
        index = fragment.get("index")
        function = fragment.get("function") or {}
        call_id = fragment.get("id")
        if isinstance(index, int):
            call = self._by_index.get(index)
            if call is None:
                call = self._by_index[index] = _PartialCall()
                self._calls.append(call)
        elif call_id or not self._calls:
            # No index (Gemini, Ollama): a fragment with an id starts a call; defaulting
            # to 0 would merge parallel calls into one.
            call = _PartialCall()
            self._calls.append(call)
        else:
            call = self._calls[-1]
        if isinstance(call_id, str) and call_id:
            call.id = call_id
        if isinstance(function, dict):
            name = function.get("name")
            if isinstance(name, str) and name:
                call.name = name if not call.name else call.name
            args = function.get("arguments")
            if isinstance(args, str):
                call.arguments.append(args)
            elif isinstance(args, dict):  # a few servers send an object
                call.arguments.append(orjson.dumps(args).decode())
        for key, value in fragment.items():
            if key not in ("index", "id", "type", "function"):
                call.extra[key] = value

    def tool_calls(self) -> list[ToolCall]:
        """The complete calls (ids invented where a server sent none)."""
        out: list[ToolCall] = []
        for n, call in enumerate(self._calls):
            if not call.name:
                continue
            args = "".join(call.arguments).strip() or "{}"
            out.append(ToolCall(call.id or f"call_{n}", call.name, args, dict(call.extra)))
        return out


# --- clauses to speak ----------------------------------------------------------------------
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e approx dept inc ltd corp mt ft a.m p.m "
    "jan feb apr jun jul aug sep sept oct nov dec mon tue thu fri".split()
)
_SENTENCE_END = frozenset(".!?…")
_CLAUSE_END = frozenset(",;:—–")
_QUOTES = {'"': '"', "“": "”", "(": ")", "«": "»"}


class ClauseSplitter:
    """Cut streamed text into speakable pieces.

    The first piece goes out at the first clause boundary (``, ; : —``) once it has
    ``first_min`` characters, or at the first sentence end, so the caller hears the
    answer start early; later pieces go at sentence ends once ``min_chars`` long (clause
    boundaries only past ``max_chars``). A boundary counts only when followed by
    whitespace, which keeps ``3.5``, ``10:30``, ``example.com`` and ``a@b.co`` whole;
    abbreviations (``Dr.``, ``e.g.``) and text inside an open quote or parenthesis never
    end a piece. :meth:`flush` returns the rest at the end of the reply.
    """

    def __init__(self, first_min: int = 20, min_chars: int = 40, max_chars: int = 200) -> None:
        self.first_min = first_min
        self.min_chars = min_chars
        self.max_chars = max_chars
        self._buf = ""
        self._scan = 0  # boundaries before this offset were already judged
        self.emitted = 0

    def feed(self, text: str) -> list[str]:
        self._buf += text
        out: list[str] = []
        while True:
            cut = self._find_cut()
            if cut is None:
                return out
            piece, self._buf = self._buf[:cut].strip(), self._buf[cut:]
            self._scan = 0
            if piece:
                out.append(piece)
                self.emitted += 1

    def flush(self) -> str:
        piece, self._buf, self._scan = self._buf.strip(), "", 0
        if piece:
            self.emitted += 1
        return piece

    def _find_cut(self) -> int | None:
        buf = self._buf
        first = self.emitted == 0
        need = self.first_min if first else self.min_chars
        depth: list[str] = []
        for i, ch in enumerate(buf):
            closing = depth[-1] if depth else None
            if ch == closing:
                depth.pop()
                continue
            if ch in _QUOTES and not (ch == '"' and closing == '"'):
                depth.append(_QUOTES[ch])
                continue
            if i < self._scan or depth or i + 1 >= len(buf) or not buf[i + 1].isspace():
                continue
            if ch in _SENTENCE_END:
                if ch == "." and self._abbreviation(buf, i):
                    continue
                if len(buf[: i + 1].strip()) >= (2 if first else need):
                    return i + 1
            elif ch in _CLAUSE_END and (
                (first and i + 1 >= need) or (not first and i + 1 >= self.max_chars)
            ):
                return i + 1
        # judged everything but the last char (its follower is unknown yet)
        self._scan = max(0, len(buf) - 1)
        if len(buf) > self.max_chars * 2:  # no boundary at all: cut at a space
            space = buf.rfind(" ", 0, self.max_chars)
            if space > 0:
                return space
        return None

    @staticmethod
    def _abbreviation(buf: str, dot: int) -> bool:
        start = dot
        while start > 0 and (buf[start - 1].isalpha() or buf[start - 1] == "."):
            start -= 1
        word = buf[start:dot].lower()
        if word in _ABBREVIATIONS:
            return True
        # single letters ("J. Smith"), and initialisms such as "U.S."
        return len(word) == 1 or (len(word) > 2 and "." in word and len(word.replace(".", "")) <= 4)


# --- history ---------------------------------------------------------------------------------
class History:
    """The conversation as Chat Completions messages (system prompt kept apart).

    ``max_messages`` bounds what is sent: the oldest turns go first, never splitting an
    assistant message with tool calls from its tool results."""

    def __init__(self, system_prompt: str = "", max_messages: int = 60) -> None:
        self.system_prompt = system_prompt
        self.max_messages = max_messages
        self.messages: list[dict[str, Any]] = []

    def add_user(self, text: str) -> int:
        self.messages.append({"role": "user", "content": text})
        return len(self.messages) - 1

    def add_assistant(self, text: str, tool_calls: Iterable[ToolCall] = ()) -> int:
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        calls = [c.message_form() for c in tool_calls]
        if calls:
            message["tool_calls"] = calls
        elif not text:
            message["content"] = ""
        self.messages.append(message)
        return len(self.messages) - 1

    def add_tool_result(self, call_id: str, content: str) -> int:
        self.messages.append({"role": "tool", "tool_call_id": call_id, "content": content})
        return len(self.messages) - 1

    def set_assistant_text(self, index: int, text: str) -> None:
        """Replace what an assistant turn said (what the caller heard). An assistant turn
        left with no words and no tool calls is removed from what the model sees."""
        message = self.messages[index]
        assert message["role"] == "assistant"
        message["content"] = text if text else (None if message.get("tool_calls") else "")

    def assistant_text(self, index: int) -> str:
        return str(self.messages[index].get("content") or "")

    def last_user_text(self) -> str:
        for message in reversed(self.messages):
            if message["role"] == "user":
                return str(message["content"])
        return ""

    def request_messages(self) -> list[dict[str, Any]]:
        kept = [
            m
            for m in self.messages
            if not (m["role"] == "assistant" and not m.get("content") and not m.get("tool_calls"))
        ]
        if len(kept) > self.max_messages:
            kept = kept[-self.max_messages :]
            while kept and kept[0]["role"] == "tool":  # its assistant message was cut off
                kept.pop(0)
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + kept

    def transcript(self) -> list[tuple[str, str]]:
        """(role, text) of what was said, for logs and seeding."""
        out: list[tuple[str, str]] = []
        for m in self.messages:
            if m["role"] in ("user", "assistant") and m.get("content"):
                out.append((m["role"], str(m["content"])))
        return out


# --- what the caller heard -------------------------------------------------------------------
_WORD = re.compile(r"\S+")


def heard_prefix(text: str, fraction: float) -> str:
    """The words of ``text`` the caller heard when ``fraction`` of its audio played: a word
    counts once its (character-proportional) middle was played."""
    if fraction >= 1.0:
        return text
    if fraction <= 0.0 or not text:
        return ""
    limit = fraction * len(text)
    end = 0
    for match in _WORD.finditer(text):
        if (match.start() + match.end()) / 2 > limit:
            break
        end = match.end()
    return text[:end]


#: speaking rate assumed before a vendor tells us better: chars of text per ms of audio
DEFAULT_CHARS_PER_MS = 0.014


@dataclass
class _Clause:
    text: str
    message: int | None = None  # history index of the assistant message it belongs to
    start_ms: float | None = None  # audio offset of its first sample in the reply
    audio_ms: float = 0.0
    done: bool = False  # all of its audio has arrived


class SpokenReply:
    """One assistant turn as it goes to speech: its clauses, in order, with their audio.

    ``add_audio(ms, clause)`` records audio as the TTS delivers it; TTS vendors whose audio
    is per clause (one request per clause, or in-process synthesis) pass the clause index,
    the others ``None`` (audio then spread over the text at the speaking rate, measured
    once the reply's audio is complete). :meth:`heard_clauses` turns the engine's
    ``truncate(response_id, audio_end_ms)`` into the words the caller heard, clause by
    clause (each clause knows its history message).
    """

    def __init__(self, response_id: str) -> None:
        self.response_id = response_id
        self.clauses: list[_Clause] = []
        self.audio_ms = 0.0
        self.per_clause = True
        self.finished = False  # the TTS delivered everything

    @property
    def text(self) -> str:
        return " ".join(c.text for c in self.clauses)

    def add_clause(self, text: str, message: int | None = None) -> int:
        self.clauses.append(_Clause(text, message))
        return len(self.clauses) - 1

    def assign_message(self, message: int) -> None:
        """Clauses not yet tied to a history message belong to ``message``."""
        for c in self.clauses:
            if c.message is None:
                c.message = message

    def add_audio(self, ms: float, clause: int | None = None) -> None:
        if clause is None:
            self.per_clause = False
        elif 0 <= clause < len(self.clauses):
            for earlier in self.clauses[:clause]:
                earlier.done = True
            c = self.clauses[clause]
            if c.start_ms is None:
                c.start_ms = self.audio_ms
            c.audio_ms += ms
        self.audio_ms += ms

    def finish(self) -> None:
        self.finished = True
        for c in self.clauses:
            c.done = True

    def heard_clauses(self, heard_ms: float) -> list[str]:
        """Per clause, the words heard after ``heard_ms`` of the reply's audio played."""
        out = [""] * len(self.clauses)
        if self.per_clause:
            for i, c in enumerate(self.clauses):
                if c.start_ms is None or heard_ms <= c.start_ms:
                    break
                played = heard_ms - c.start_ms
                total = (
                    c.audio_ms if c.done else max(c.audio_ms, len(c.text) / DEFAULT_CHARS_PER_MS)
                )
                out[i] = heard_prefix(c.text, played / total if total > 0 else 0.0)
                if played < total:
                    break
            return out
        rate = DEFAULT_CHARS_PER_MS
        if self.finished and self.audio_ms > 0:
            rate = len(self.text) / self.audio_ms
        chars = min(heard_ms, self.audio_ms) * rate
        for i, c in enumerate(self.clauses):
            if chars <= 0:
                break
            size = len(c.text) + 1
            out[i] = heard_prefix(c.text, chars / len(c.text) if c.text else 0.0)
            chars -= size
        return out

    def heard_text(self, heard_ms: float) -> str:
        return " ".join(t for t in self.heard_clauses(heard_ms) if t)

    def heard_by_message(self, heard_ms: float) -> dict[int, str]:
        """History index -> the words of that assistant message the caller heard."""
        out: dict[int, list[str]] = {}
        for c, heard in zip(self.clauses, self.heard_clauses(heard_ms), strict=True):
            if c.message is not None:
                out.setdefault(c.message, [])
                if heard:
                    out[c.message].append(heard)
        return {k: " ".join(v) for k, v in out.items()}
