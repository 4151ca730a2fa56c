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

The API key is never logged; ``repr`` shows it masked (``sk-…abcd``).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import orjson
import trio

from ..errors import (
    AgentError,
    ConfigError,
    LocalProtocolError,
    RelayError,
    RemoteProtocolError,
)
from ..media import websocket
from ..tools import ToolRegistry, default_registry
from .base import Agent, AgentErrorEvent, AgentEvent, AudioFormat, CallInfo
from .openai_protocol import DEFAULT_URL, OpenAIOptions, OpenAIRealtimeProtocol, mask_secret

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
    }
)


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    if isinstance(value, int):
        return bool(value)
    raise ConfigError(f"agents.*.{key}: expected a boolean, got {value!r}")


def _as_float(key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"agents.*.{key}: expected a number, got {value!r}") from None


def _as_mapping(key: str, value: Any) -> Mapping[str, Any] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):  # environment overrides arrive as JSON text
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise ConfigError(f"agents.*.{key}: not valid JSON: {value!r}") from None
    if not isinstance(value, Mapping):
        raise ConfigError(f"agents.*.{key}: expected a table/object, got {value!r}")
    return value


def _resolve_tools(
    value: Any, registry: ToolRegistry | None
) -> tuple[list[Any], ToolRegistry | None]:
    """``tools`` may be: a ToolRegistry; a list of tool names (looked up in ``registry`` or
    the built-in registry) and/or schema mappings; a JSON list or comma-separated names."""
    if value is None or value == "" or value == []:
        return ([], registry)
    if isinstance(value, ToolRegistry):
        return (value.schemas_openai(), value)
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ConfigError(f"agents.*.tools: expected a list, got {value!r}")
    names = [v for v in value if isinstance(v, str)]
    schemas: list[Any] = [v for v in value if not isinstance(v, str)]
    if names:
        source = registry if registry is not None else default_registry()
        try:
            sub = source.subset(names)
        except KeyError as exc:
            raise ConfigError(f"agents.*.tools: {exc.args[0]}") from None
        schemas = sub.schemas_openai() + schemas
        if registry is None:
            registry = sub
    return (schemas, registry)


def options_from_config(
    options: Mapping[str, Any],
) -> tuple[OpenAIOptions, ToolRegistry | None, int]:
    """Config keys of ``[agents.<name>]`` (ARCHITECTURE.md) -> (options, tools, max errors)."""
    unknown = sorted(set(options) - _KNOWN_KEYS)
    if unknown:
        log.warning("openai agent: ignoring unknown config keys %s", ", ".join(unknown))
    # strip(): a key pasted with a trailing newline would break the handshake header
    api_key = (
        str(options.get("api_key") or "").strip() or os.environ.get("OPENAI_API_KEY", "").strip()
    )
    if not api_key:
        raise ConfigError(
            "openai agent: api_key is empty (set agents.<name>.api_key, "
            "RELAY_AGENTS_<NAME>_API_KEY or OPENAI_API_KEY)"
        )
    registry = options.get("tool_registry")
    if registry is not None and not isinstance(registry, ToolRegistry):
        raise ConfigError("openai agent: tool_registry must be a relay.tools.ToolRegistry")
    tools, registry = _resolve_tools(options.get("tools"), registry)
    transcription = options.get("transcription_model") or None
    opts = OpenAIOptions(
        url=str(options.get("url") or DEFAULT_URL),
        api_key=api_key,
        model=str(options.get("model") or "gpt-realtime"),
        voice=str(options.get("voice") or "marin"),
        audio=str(options.get("audio") or "pcmu"),
        api=str(options.get("api") or "ga"),
        instructions=str(options.get("instructions") or ""),
        greeting=str(options.get("greeting") or ""),
        tools=tools,
        transcription_model=str(transcription) if transcription else None,
        turn_detection=_as_mapping("turn_detection", options.get("turn_detection")),
        tool_choice=str(options.get("tool_choice") or "auto"),
        session_extra=_as_mapping("session_extra", options.get("session_extra")),
        connect_timeout_s=_as_float("connect_timeout_s", options.get("connect_timeout_s", 10)),
        send_timeout_s=_as_float("send_timeout_s", options.get("send_timeout_s", 2)),
        wait_for_session=_as_bool("wait_for_session", options.get("wait_for_session", True)),
    )
    max_errors = int(_as_float("max_protocol_errors", options.get("max_protocol_errors", 10)))
    return opts, registry, max_errors


class OpenAIRealtimeAgent(Agent):
    name: ClassVar[str] = "openai"
    supports_truncate: ClassVar[bool] = True

    def __init__(
        self,
        options: OpenAIOptions,
        *,
        tools: ToolRegistry | None = None,
        max_protocol_errors: int = 10,
    ) -> None:
        self.options = options
        self.protocol = OpenAIRealtimeProtocol(options)
        self.input_format = self.output_format = _FORMATS[options.audio]
        #: Registry that can execute the tools announced to the model (None: schemas only).
        self.tools = tools
        self.max_protocol_errors = max_protocol_errors
        self.protocol_errors = 0
        self.call: CallInfo | None = None
        self._ws: websocket.WebSocket | None = None
        self._pending: list[AgentEvent] = []
        self._closing = False

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> OpenAIRealtimeAgent:
        opts, tools, max_errors = options_from_config(options)
        return cls(opts, tools=tools, max_protocol_errors=max_errors)

    def __repr__(self) -> str:
        o = self.options
        return (
            f"OpenAIRealtimeAgent(url={o.url!r}, model={o.model!r}, api={o.api!r}, "
            f"audio={o.audio!r}, voice={o.voice!r}, api_key={mask_secret(o.api_key)!r})"
        )

    @property
    def connected(self) -> bool:
        return self._ws is not None and self._ws.closed is None

    # -- lifecycle -----------------------------------------------------------------------
    async def connect(self, call: CallInfo) -> None:
        if self._ws is not None:
            raise LocalProtocolError("OpenAIRealtimeAgent.connect called twice")
        self.call = call
        o = self.options
        proto = self.protocol
        try:
            with trio.fail_after(o.connect_timeout_s):
                self._ws = ws = await websocket.connect(
                    proto.ws_url(),
                    proto.handshake_headers(),
                    timeout=o.connect_timeout_s,
                    send_timeout=o.send_timeout_s,
                )
                await ws.send_text(proto.session_update())
                if o.wait_for_session:
                    await self._wait_configured(ws)
                greeting = proto.greeting_messages()
                if greeting:
                    await ws.send_texts(greeting)
        except trio.TooSlowError:
            await self._abort()
            stage = "handshake" if self._ws is None else "session.updated"
            raise AgentError(
                f"OpenAI Realtime connect timed out after {o.connect_timeout_s:g} s "
                f"(waiting for {stage})",
                kind="agent_connect_timeout",
            ) from None
        except AgentError:
            await self._abort()
            raise
        except (OSError, RelayError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # relay.media.websocket.connect lets trio's BrokenResourceError through (TLS failure,
            # reset during the handshake); ValueError covers unencodable header values.
            await self._abort()
            raise AgentError(
                f"OpenAI Realtime connect failed: {exc}", kind="agent_connect"
            ) from exc
        except ValueError as exc:
            await self._abort()
            raise AgentError(
                f"OpenAI Realtime connect failed: {exc}", kind="agent_connect"
            ) from None
        except BaseException:
            await self._abort()
            raise
        log.info(
            "openai session %s configured (model=%s api=%s audio=%s call=%s)",
            proto.session_id,
            o.model,
            o.api,
            o.audio,
            call.call_sid,
        )

    async def _wait_configured(self, ws: websocket.WebSocket) -> None:
        """Read until ``session.updated``; events that arrive meanwhile are kept for
        :meth:`receive`. A rejected session.update or a fatal error fails the connect."""
        proto = self.protocol
        while not proto.configured:
            for message in await ws.receive():
                try:
                    events = proto.parse_message(message)
                except RemoteProtocolError as exc:
                    raise AgentError(
                        f"OpenAI Realtime protocol error during setup: {exc}", kind="agent_protocol"
                    ) from exc
                for event in events:
                    if isinstance(event, AgentErrorEvent) and event.fatal:
                        raise AgentError(
                            f"OpenAI Realtime session failed: {event.code}: {event.message}",
                            kind="agent_session",
                        )
                self._pending += events

    async def _abort(self) -> None:
        ws = self._ws
        if ws is not None:
            with trio.CancelScope(shield=True):
                try:
                    await ws.aclose(websocket.CLOSE_GOING_AWAY)
                except Exception:  # aclose must not hide the original error
                    log.debug("openai: error closing after failed connect", exc_info=True)

    async def aclose(self) -> None:
        ws = self._ws
        if ws is None or self._closing:
            return
        self._closing = True
        try:
            await ws.aclose()
        except Exception:
            log.debug("openai: error while closing", exc_info=True)
        finally:
            # WebSocket.aclose skips closing TCP when it is itself cancelled (e.g. from the
            # finally of a cancelled call): make sure the socket never leaks.
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(ws.stream)

    # -- sending (non-blocking; see Agent) -------------------------------------------------
    def _socket(self) -> websocket.WebSocket:
        ws = self._ws
        if ws is None:
            raise LocalProtocolError("OpenAIRealtimeAgent used before connect()")
        return ws

    async def run(self) -> None:
        """Drain what the kernel did not take at once, under the send timeout."""
        await self._socket().run_flusher()

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

    # -- receiving -----------------------------------------------------------------------
    def _parse(self, batch: list[str | bytes]) -> list[AgentEvent]:
        parse = self.protocol.parse_message
        events: list[AgentEvent] = []
        for message in batch:
            try:
                events += parse(message)
            except RemoteProtocolError as exc:
                events.append(self._protocol_error(exc))
        return events

    async def receive(self) -> list[AgentEvent]:
        if self._pending:
            events, self._pending = self._pending, []
            return events
        ws = self._socket()
        while True:
            events = self._parse(await ws.receive())  # ConnectionClosed when it ended
            if events:
                return events

    def reactor_socket(self) -> socket.socket | None:
        return self._socket().raw_socket

    def read_events_nowait(self) -> list[AgentEvent]:
        events, self._pending = self._pending, []
        return events + self._parse(self._socket().read_nowait())

    def _protocol_error(self, exc: RemoteProtocolError) -> AgentErrorEvent:
        self.protocol_errors += 1
        log.warning("openai: protocol error %d: %s", self.protocol_errors, str(exc)[:200])
        if self.protocol_errors > self.max_protocol_errors:
            self._socket().close_nowait(websocket.CLOSE_PROTOCOL_ERROR, "protocol error")
            raise AgentError(
                f"OpenAI Realtime: {self.protocol_errors} malformed messages, giving up "
                f"(last: {exc})",
                kind="agent_protocol",
            ) from exc
        return AgentErrorEvent("agent_protocol", str(exc), fatal=False)


def create(options: Mapping[str, Any]) -> Agent:
    """``AgentFactory`` for the ``openai`` agent type."""
    return OpenAIRealtimeAgent.from_config(options)
