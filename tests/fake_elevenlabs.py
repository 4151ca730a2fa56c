"""A local fake of the ElevenLabs Agents WebSocket API, for tests (trio-websocket server).

It speaks the documented protocol (``/work/shared/reference/voice-agent-apis.md``,
"ElevenLabs Agents"; the AsyncAPI contract in github.com/elevenlabs/packages) and refuses
what the real service refuses:

* the handshake needs ``?agent_id=<agent_id>`` (404 otherwise) and, for a private agent
  (``api_key`` set), ``xi-api-key`` (401 otherwise);
* the first message must be ``conversation_initiation_client_data``: audio (or anything)
  before it is an ``error`` event (``invalid_message``) and close 1008;
* the server pings (``ping_interval_s``) and closes the session (1002,
  ``ping timeout``) when a ping stays unanswered for ``ping_deadline_s``; a pong with an
  id that was never pinged is refused (close 1008);
* a ``client_tool_result`` for an id that was never issued (or already answered) is
  refused (error ``invalid_message`` + close 1008);
* the negotiated formats are configurable: ``ulaw_8000`` or ``pcm_16000`` (both
  directions separately); audio the agent sends is in the output format.

Scripted from tests through :class:`FakeConversation` methods: replies (tone or given
bytes, paced or in a burst, with their ``event_id``), interruptions, transcripts, tool
calls, errors, close, abort (TCP dies), stall (stop reading and stop sending). Server
plumbing (listener, close/abort/stall, read loop): tests/fake_vendor_ws.py.
"""

from __future__ import annotations

import base64
import binascii
import itertools
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
import trio
from fake_vendor_ws import (
    Notifier,
    TrioWsPeer,
    WSConnectionClosed,
    request_parts,
    serve_trio_fake,
    sine,
    ulaw_encode,
)
from trio_websocket import WebSocketConnection, WebSocketRequest

__all__ = [
    "AGENT_ID",
    "FakeConversation",
    "FakeElevenLabsServer",
    "FakeOptions",
    "fake_elevenlabs_server",
    "tone",
]

AGENT_ID = "agent_0123456789abcdefghijklmn"
DEFAULT_KEY = "xi-test-fake-key-0123456789abcd"

FORMATS = {"ulaw_8000": ("mulaw", 8000), "pcm_16000": ("pcm16", 16000)}


def tone(ms: int, fmt: str, hz: float = 440.0, amplitude: float = 0.3) -> bytes:
    """``ms`` of a sine in ElevenLabs format ``fmt`` (ulaw_8000 or pcm_16000)."""
    encoding, rate = FORMATS[fmt]
    pcm = sine(ms, rate, hz, amplitude)
    return ulaw_encode(pcm) if encoding == "mulaw" else pcm.tobytes()


def bytes_per_ms(fmt: str) -> int:
    encoding, rate = FORMATS[fmt]
    return rate // 1000 * (1 if encoding == "mulaw" else 2)


@dataclass
class FakeOptions:
    agent_id: str = AGENT_ID
    #: None: a public agent (no key needed); else xi-api-key must match.
    api_key: str | None = DEFAULT_KEY
    input_format: str = "ulaw_8000"
    output_format: str = "ulaw_8000"
    #: The agent's own first message (a first_message override replaces it); "" = none.
    first_message: str = ""
    greeting_ms: int = 400
    #: Server pings: interval and how long a ping may stay unanswered (0: no pings).
    ping_interval_s: float = 0.5
    ping_deadline_s: float = 2.0
    #: Reply to every N ms of caller audio with a transcript + a reply of reply_ms.
    auto_reply_after_ms: int = 0
    reply_ms: int = 500
    chunk_ms: int = 100
    pace_s: float = 0.0
    tone_hz: float = 440.0
    #: Omit user_input_audio_format from the metadata (the SDKs then assume pcm_16000).
    omit_input_format: bool = False
    #: False: never answer the initiation (a client's wait must be bounded).
    send_metadata: bool = True


@dataclass
class FakeConversation(TrioWsPeer):
    server: FakeElevenLabsServer
    ws: WebSocketConnection
    headers: dict[str, str]
    query: dict[str, str]
    conversation_id: str
    init: dict[str, Any] | None = None
    audio_in: bytearray = field(default_factory=bytearray)
    chunks_in: int = 0
    pongs: list[int] = field(default_factory=list)
    pings_sent: int = 0
    tool_results: list[dict[str, Any]] = field(default_factory=list)
    _reply_scope: trio.CancelScope | None = None
    _event_ids: Any = field(default_factory=lambda: itertools.count(1))
    _ping_ids: Any = field(default_factory=lambda: itertools.count(1))
    _unanswered: dict[int, float] = field(default_factory=dict)
    _tool_calls: dict[str, str] = field(default_factory=dict)
    _auto_pending_ms: float = 0.0

    @property
    def options(self) -> FakeOptions:
        return self.server.options

    @property
    def audio_in_ms(self) -> float:
        return len(self.audio_in) / bytes_per_ms(self.options.input_format)

    @property
    def stalled(self) -> bool:
        return self._stalled is not None

    def next_event_id(self) -> int:
        return next(self._event_ids)

    async def wait_for(
        self, predicate: Callable[[FakeConversation], bool], timeout: float = 5.0
    ) -> None:
        await self._wait_until(lambda: predicate(self), timeout)

    async def wait_closed(self, timeout: float = 5.0) -> None:
        await self.wait_for(lambda c: c.closed, timeout)

    # -- sending ------------------------------------------------------------------------
    async def send(self, event: dict[str, Any]) -> None:
        self.sent.append(event)
        await self.ws.send_message(orjson.dumps(event).decode())

    def _stop_output(self) -> None:
        # a stall stops pings too (the pinger waits while stalled)
        if self._reply_scope is not None:
            self._reply_scope.cancel()

    async def refuse(self, reason: str, error_type: str = "invalid_message") -> None:
        """What the service does with a contract violation: an error event, close 1008."""
        self.refused.append(reason)
        try:
            await self.send(
                {
                    "type": "error",
                    "error_event": {
                        "code": 1008,
                        "message": reason,
                        "error_type": error_type,
                        "reason": reason,
                    },
                }
            )
        except WSConnectionClosed:
            pass
        await self.close(1008, reason[:100])

    async def send_error(
        self, code: int = 1002, error_type: str = "llm_error", message: str = "fake error"
    ) -> None:
        await self.send(
            {
                "type": "error",
                "error_event": {"code": code, "message": message, "error_type": error_type},
            }
        )

    async def send_reply(
        self,
        ms: int | None = None,
        *,
        audio: bytes | None = None,
        transcript: str = "Hello from the fake agent.",
        event_id: int | None = None,
        chunk_ms: int | None = None,
        pace_s: float | None = None,
    ) -> int:
        """An agent reply: ``agent_response`` then its audio chunks (all with one
        ``event_id``). Returns the event id. A stall or interrupt() cancels the rest."""
        fmt = self.options.output_format
        data = audio if audio is not None else tone(ms or self.options.reply_ms, fmt)
        eid = self.next_event_id() if event_id is None else event_id
        chunk = max(1, (chunk_ms or self.options.chunk_ms) * bytes_per_ms(fmt))
        pace = self.options.pace_s if pace_s is None else pace_s
        await self.send(
            {
                "type": "agent_response",
                "agent_response_event": {"agent_response": transcript, "event_id": eid},
            }
        )
        with trio.CancelScope() as scope:
            self._reply_scope = scope
            for i in range(0, len(data), chunk):
                await self.send_audio(data[i : i + chunk], eid)
                if pace:
                    await trio.sleep(pace)
        self._reply_scope = None
        return eid

    async def send_audio(self, data: bytes, event_id: int) -> None:
        await self.send(
            {
                "type": "audio",
                "audio_event": {
                    "audio_base_64": base64.b64encode(data).decode(),
                    "event_id": event_id,
                },
            }
        )

    async def interrupt(self, event_id: int | None = None, *, cancel: bool = True) -> int:
        """``interruption`` (the caller spoke over the agent). ``event_id`` defaults to a
        new id; ``cancel`` stops a paced reply in progress."""
        if cancel and self._reply_scope is not None:
            self._reply_scope.cancel()
        eid = self.next_event_id() if event_id is None else event_id
        await self.send({"type": "interruption", "interruption_event": {"event_id": eid}})
        return eid

    async def user_transcript(self, text: str, *, tentative: bool = False) -> None:
        eid = self.next_event_id()
        if tentative:
            await self.send(
                {
                    "type": "tentative_user_transcript",
                    "tentative_user_transcription_event": {
                        "user_transcript": text,
                        "event_id": eid,
                    },
                }
            )
            return
        await self.send(
            {
                "type": "user_transcript",
                "user_transcription_event": {"user_transcript": text, "event_id": eid},
            }
        )

    async def tool_call(self, name: str, parameters: dict[str, Any] | None = None) -> str:
        call_id = f"toolu_{next(self._event_ids):04d}"
        self._tool_calls[call_id] = name
        await self.send(
            {
                "type": "client_tool_call",
                "client_tool_call": {
                    "tool_name": name,
                    "tool_call_id": call_id,
                    "parameters": parameters or {},
                    "event_id": self.next_event_id(),
                },
            }
        )
        return call_id

    async def ping(self) -> int:
        eid = next(self._ping_ids)
        self._unanswered[eid] = trio.current_time()
        self.pings_sent += 1
        await self.send({"type": "ping", "ping_event": {"event_id": eid, "ping_ms": 12}})
        return eid

    # -- receiving ----------------------------------------------------------------------
    async def _metadata(self) -> None:
        event: dict[str, Any] = {
            "conversation_id": self.conversation_id,
            "agent_output_audio_format": self.options.output_format,
        }
        if not self.options.omit_input_format:
            event["user_input_audio_format"] = self.options.input_format
        await self.send(
            {
                "type": "conversation_initiation_metadata",
                "conversation_initiation_metadata_event": event,
            }
        )

    async def _on_init(self, msg: dict[str, Any]) -> None:
        self.init = msg
        override = msg.get("conversation_config_override") or {}
        agent = override.get("agent") or {}
        if not self.options.send_metadata:
            return
        await self._metadata()
        first = agent.get("first_message", self.options.first_message)
        if first:
            self._start(partial(self.send_reply, self.options.greeting_ms, transcript=first))

    async def _on_message(self, msg: dict[str, Any]) -> None:
        if self.init is None:
            if msg.get("type") == "conversation_initiation_client_data":
                await self._on_init(msg)
            else:
                await self.refuse("first message must be conversation_initiation_client_data")
            return
        if "user_audio_chunk" in msg:
            chunk = msg["user_audio_chunk"]
            try:
                data = base64.b64decode(chunk, validate=True) if isinstance(chunk, str) else None
            except binascii.Error:
                data = None
            if data is None:
                await self.refuse("user_audio_chunk is not base64")
                return
            self.audio_in += data
            self.chunks_in += 1
            if self.options.auto_reply_after_ms:
                self._auto_pending_ms += len(data) / bytes_per_ms(self.options.input_format)
                if self._auto_pending_ms >= self.options.auto_reply_after_ms:
                    self._auto_pending_ms = 0.0
                    self._start(self._auto_reply)
            return
        etype = msg.get("type")
        if etype == "pong":
            eid = msg.get("event_id")
            if not isinstance(eid, int) or self._unanswered.pop(eid, None) is None:
                await self.refuse(f"pong for unknown ping event_id {eid!r}")
                return
            self.pongs.append(eid)
        elif etype == "client_tool_result":
            call_id = msg.get("tool_call_id")
            if (
                not isinstance(call_id, str)
                or self._tool_calls.pop(call_id, None) is None
                or not isinstance(msg.get("result"), str)
                or not isinstance(msg.get("is_error"), bool)
            ):
                await self.refuse(f"invalid client_tool_result for {call_id!r}")
                return
            self.tool_results.append(msg)
        elif etype in ("user_activity", "contextual_update", "user_message", "feedback"):
            pass
        else:
            await self.refuse(f"unknown message type {etype!r}")

    async def _auto_reply(self) -> None:
        await self.user_transcript(f"(caller audio {int(self.audio_in_ms)} ms)")
        await self.send_reply(self.options.reply_ms, transcript="I heard you.")

    async def _pinger(self) -> None:
        interval = self.options.ping_interval_s
        if not interval:
            return
        while True:
            await trio.sleep(interval)
            if self._stalled is not None:
                await self._stalled.wait()
                continue
            if self.init is None:
                continue
            now = trio.current_time()
            if (
                self._unanswered
                and now - min(self._unanswered.values()) > self.options.ping_deadline_s
            ):
                self.refused.append("ping timeout")
                await self.close(1002, "ping timeout")
                return
            await self.ping()


@dataclass
class FakeElevenLabsServer(Notifier):
    options: FakeOptions
    port: int = 0
    conversations: list[FakeConversation] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/convai/conversation"

    @property
    def api_key(self) -> str | None:
        return self.options.api_key

    async def wait_for_conversation(self, index: int = 0, timeout: float = 5.0) -> FakeConversation:
        await self._wait_until(lambda: len(self.conversations) > index, timeout)
        return self.conversations[index]

    async def handler(self, request: WebSocketRequest) -> None:
        opts = self.options
        headers, _, query = request_parts(request)
        status = None
        if query.get("agent_id") != opts.agent_id:
            status, reason = 404, "agent not found"
        elif opts.api_key is not None and headers.get("xi-api-key") != opts.api_key:
            status, reason = 401, "invalid api key"
        if status is not None:
            self.rejected.append({"status": status, "reason": reason, "headers": headers})
            self._notify()
            await request.reject(status, body=orjson.dumps({"detail": reason}))
            return
        ws = await request.accept()
        conv = FakeConversation(self, ws, headers, query, f"conv_{len(self.conversations) + 1:04d}")
        self.conversations.append(conv)
        self._notify()
        try:
            await conv._serve(conv._pinger)
        finally:
            conv._mark_closed(conv.close_code or 1006, conv.close_reason)


def fake_elevenlabs_server(
    options: FakeOptions | None = None, **kwargs: Any
) -> AbstractAsyncContextManager[FakeElevenLabsServer]:
    """Run a fake ElevenLabs Agents server on 127.0.0.1 (random port) for the body."""
    return serve_trio_fake(
        FakeElevenLabsServer(options if options is not None else FakeOptions(**kwargs))
    )
