"""What the sans-IO vendor protocol cores share (``*_protocol.py``; no sockets, no Trio, no
clocks): JSON out and in, typed field access that turns a malformed event into
:class:`~relay.errors.RemoteProtocolError` (kind ``agent_protocol``), dispatch of
``{"type": …}`` events to handlers with counters of the ignored ones, flat function-tool
schemas, the endpoint URL with a query parameter, and the option checks every vendor has
(a ``ws://``/``wss://`` URL, an API key that is safe in a header, masked in ``repr``).
"""

from __future__ import annotations

import binascii
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import orjson

from ..errors import ConfigError, RemoteProtocolError
from .base import AgentEvent

__all__ = [
    "AudioMessage",
    "EventDispatcher",
    "bad_event",
    "check_header_secret",
    "check_ws_url",
    "deep_merge",
    "dumps",
    "join_prompt",
    "load_object",
    "mask_secret",
    "normalize_tool",
    "opt_str",
    "refuse_binary",
    "str_field",
    "tool_arguments",
    "with_query",
]

#: a protocol core's handler, kept unbound: bound methods in a dict on the instance would
#: make every session a reference cycle that only the cyclic collector frees (relay/gcpolicy.py)
Handler = Callable[[Any, dict[str, Any], str], list[AgentEvent]]

#: At most this many distinct ignored event types are counted (a peer sending random
#: types must not grow the counter without bound).
MAX_IGNORED_TYPES = 64


# --- JSON -------------------------------------------------------------------------------------
def dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode("utf-8")


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``extra`` into ``base`` (nested tables merged, other values replaced): how the
    ``*_extra`` options add API fields the adapter does not know yet."""
    for key, value in extra.items():
        cur = base.get(key)
        if isinstance(cur, dict) and isinstance(value, Mapping):
            deep_merge(cur, value)
        else:
            base[key] = value
    return base


def load_object(message: str | bytes, what: str = "agent event") -> dict[str, Any]:
    """One JSON object from the wire, or RemoteProtocolError."""
    try:
        msg = orjson.loads(message)
    except orjson.JSONDecodeError as exc:
        raise RemoteProtocolError(
            f"agent sent malformed JSON: {exc}", kind="agent_protocol"
        ) from None
    if type(msg) is not dict:
        raise RemoteProtocolError(f"{what} is not a JSON object", kind="agent_protocol")
    return msg


def refuse_binary(message: str | bytes, api: str) -> str:
    """``message`` when it is text; a binary frame from a JSON-text API is malformed."""
    if type(message) is not str:
        raise RemoteProtocolError(
            f"agent sent a binary frame ({len(message)} bytes); {api} is JSON text",
            kind="agent_protocol",
        )
    return message


def bad_event(etype: str, what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"agent event {etype!r}: {what}", kind="agent_protocol")


def str_field(msg: Mapping[str, Any], key: str, etype: str) -> str:
    value = msg.get(key)
    if type(value) is not str:
        raise bad_event(etype, f"field {key!r} must be a string")
    return value


def opt_str(value: Any) -> str:
    """A string field that is only displayed: absence and odd types are tolerated."""
    if value is None:
        return ""
    return value if type(value) is str else str(value)


def tool_arguments(args: Any, etype: str, what: str = "arguments") -> str:
    """A tool call's arguments as JSON text: absent -> ``{}``, text as sent, an object
    serialised; anything else is malformed."""
    if args is None:
        return "{}"
    if type(args) is str:
        return args
    if type(args) is dict:
        return dumps(args)
    raise bad_event(etype, f"{what} must be an object or JSON text")


class EventDispatcher:
    """Base of the protocol cores whose server events are JSON objects with a ``type``:
    :meth:`dispatch` calls the handler registered in ``_handlers`` for it (handler(self,
    msg, type) -> events) and counts the events and the types nobody handles."""

    def __init__(self) -> None:
        self.events_in = 0
        self.ignored = 0
        self.ignored_types: Counter[str] = Counter()
        self._handlers: dict[str, Handler] = {}

    def dispatch(self, message: str | bytes) -> list[AgentEvent]:
        msg = load_object(message)
        self.events_in += 1
        etype = msg.get("type")
        handler = self._handlers.get(etype) if type(etype) is str else None
        if handler is None:
            self._ignore(etype)
            return []
        return handler(self, msg, etype)  # type: ignore[arg-type]

    def _ignore(self, etype: Any) -> None:
        self.ignored += 1
        key = etype if type(etype) is str else "<no type>"
        if key in self.ignored_types or len(self.ignored_types) < MAX_IGNORED_TYPES:
            self.ignored_types[key[:80]] += 1


# --- client messages --------------------------------------------------------------------------
class AudioMessage:
    """The JSON message that carries caller audio as base64, built by concatenation on the
    hot path: base64 (A-Z a-z 0-9 + / =) never needs JSON escaping, so Twilio's payload
    string goes in untouched. ``wrap(b64)`` gives the message's shape (serialised once, to
    find where the audio goes); a payload that is not plain base64 (maybe hostile) is
    serialised properly instead."""

    _MARK = "\x00audio\x00"

    def __init__(self, wrap: Callable[[str], Any]) -> None:
        self._wrap = wrap
        text = dumps(wrap(self._MARK))
        head, mark, tail = text.partition(dumps(self._MARK)[1:-1])
        if not mark:
            raise ValueError("the audio must be a string value of the message")
        self._head = head
        self._tail = tail
        #: the message around the audio as UTF-8, for WebSocket.send_b64_texts_nowait
        self.head_bytes = head.encode("utf-8")
        self.tail_bytes = tail.encode("utf-8")

    def b64(self, payload: str) -> str:
        """The message for audio already in base64 (Twilio's ``media.payload``)."""
        if '"' in payload or "\\" in payload or not payload.isprintable():
            return dumps(self._wrap(payload))
        return self._head + payload + self._tail

    def raw(self, audio: bytes) -> str:
        """The message for raw audio bytes."""
        return self._head + binascii.b2a_base64(audio, newline=False).decode("ascii") + self._tail


def normalize_tool(tool: Any) -> dict[str, Any]:
    """A flat function tool ``{"type":"function","name","description","parameters"}``
    (the Chat Completions shape ``{"type":"function","function":{...}}`` is flattened)."""
    if not isinstance(tool, Mapping):
        raise ConfigError(f"agents.*.tools: a tool must be a table, got {type(tool).__name__}")
    inner = tool.get("function")
    src: Mapping[str, Any] = inner if isinstance(inner, Mapping) else tool
    name = src.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"agents.*.tools: tool without a name: {dict(tool)!r}")
    params = src.get("parameters")
    return {
        "type": "function",
        "name": name,
        "description": str(src.get("description") or ""),
        "parameters": dict(params)
        if isinstance(params, Mapping)
        else {"type": "object", "properties": {}},
    }


def join_prompt(instructions: str, context: str) -> str:
    """The system prompt of a session that continues a call: the configured instructions,
    then the conversation so far (either may be empty)."""
    if instructions and context:
        return f"{instructions}\n\n{context}"
    return instructions or context


def with_query(url: str, name: str, value: str) -> str:
    """``url`` with ``?name=value`` appended (kept as is when its query names ``name``)."""
    parts = urlsplit(url)
    if any(k == name for k, _ in parse_qsl(parts.query, keep_blank_values=True)):
        return url
    base, _, frag = url.partition("#")
    sep = "&" if parts.query else ("" if base.endswith("?") else "?")
    return f"{base}{sep}{name}={quote(value, safe='')}" + (f"#{frag}" if frag else "")


# --- options -------------------------------------------------------------------------------
def check_ws_url(url: str) -> None:
    if urlsplit(url).scheme not in ("ws", "wss"):
        raise ConfigError(f"agents.*.url: must be ws:// or wss://, got {url!r}")


def check_header_secret(secret: str, key: str = "api_key") -> None:
    """A secret that goes into an HTTP header or a URL: no spaces, controls (header
    injection) or non-ASCII."""
    if any(not (0x20 < ord(c) < 0x7F) for c in secret):
        raise ConfigError(f"agents.*.{key}: contains whitespace or non-printable characters")


def mask_secret(secret: str) -> str:
    """``sk-…abcd``: enough to tell keys apart in logs, never enough to use one."""
    if not secret:
        return "<unset>"
    if len(secret) <= 12:
        return "…" + secret[-2:] if len(secret) > 6 else "…"
    return secret[:3] + "…" + secret[-4:]
