"""A local fake of the OpenAI Realtime WebSocket API, for tests (trio-websocket server).

It speaks the real protocol closely enough to exercise the adapter end to end, in both the
GA and the beta flavour (chosen per connection: the ``OpenAI-Beta: realtime=v1`` header
means beta, and the ``session.update`` shape must then match, as with the real service):

* the handshake checks ``Authorization: Bearer <api_key>`` (401 otherwise) and ``?model=``;
* ``session.created`` on connect, ``session.updated`` (the merged session) on update, an
  ``error`` echoing the client ``event_id`` for an invalid update;
* everything received is recorded: events, session config, caller audio (decoded),
  truncates (validated: ``audio_end_ms`` beyond the generated audio is an error, as
  documented), tool outputs, ``response.create``;
* ``conversation.item.create`` is checked as the real API does: an ``error`` (recorded in
  ``item_errors``) for an unknown item type, role or content type (user: ``input_text`` /
  ``input_audio``; assistant: ``output_text``, beta ``text``, "it cannot populate
  assistant audio messages"; system: ``input_text``), text that is not a string, or a
  ``function_call_output`` whose ``call_id`` this session never issued;
* scripted from a test through :class:`FakeSession` methods: audio responses (tone or
  given bytes, in the session's output format), speech started/stopped, transcripts,
  function calls, errors, raw/malformed/binary frames, and the ways a connection dies:
  ``close`` (close frame), ``abort`` (TCP gone without one), ``stall`` (stops reading:
  no more pongs once buffers fill) and ``vanish`` (stops reading and sending, no FIN);
* automatic modes for relay end-to-end tests: ``response_ms`` answers every
  ``response.create`` (greeting, after a tool output) with that much audio;
  ``auto_reply_after_ms`` answers every N ms of caller audio with VAD events, a caller
  transcript and a response of ``auto_reply_ms``.

Usage::

    async with fake_openai_server(response_ms=400) as server:
        agent = OpenAIRealtimeAgent(OpenAIOptions(url=server.url, api_key=server.api_key))
        await agent.connect(call)
        session = await server.wait_for_session()
        await session.wait_for(lambda s: s.audio_in_ms >= 100)
        item_id = await session.send_response(ms=300)

Also :func:`silent_server`: a TCP listener that accepts and never answers (timeouts).
Server plumbing and test audio (``tone``, ``ulaw_encode``, re-exported here):
tests/fake_vendor_ws.py.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
import trio
from fake_vendor_ws import (
    Notifier,
    WSConnectionClosed,
    request_parts,
    serve_trio_fake,
    tone,
    ulaw_encode,
)
from trio_websocket import WebSocketConnection, WebSocketRequest

__all__ = [
    "FakeOpenAIServer",
    "FakeOptions",
    "FakeSession",
    "fake_openai_server",
    "silent_server",
    "tone",
    "ulaw_encode",
]

DEFAULT_KEY = "sk-test-fake-key-0123456789abcd"
BYTES_PER_MS = {"pcmu": 8, "pcm24k": 48}

# Event names that differ between GA and beta (reference: voice-agent-apis.md).
NAMES = {
    "ga": {
        "audio_delta": "response.output_audio.delta",
        "audio_done": "response.output_audio.done",
        "transcript_delta": "response.output_audio_transcript.delta",
        "transcript_done": "response.output_audio_transcript.done",
        "item_added": "conversation.item.added",
    },
    "beta": {
        "audio_delta": "response.audio.delta",
        "audio_done": "response.audio.done",
        "transcript_delta": "response.audio_transcript.delta",
        "transcript_done": "response.audio_transcript.done",
        "item_added": "conversation.item.created",
    },
}


# --- configuration ----------------------------------------------------------------------
@dataclass
class FakeOptions:
    api_key: str = DEFAULT_KEY
    #: When set, the handshake must carry ``?model=<this>``.
    model: str | None = None
    #: Refuse every handshake with this HTTP status (e.g. 401, 503).
    reject_status: int | None = None
    #: Accept the TCP connection, then never answer the handshake.
    hang_handshake: bool = False
    send_session_created: bool = True
    #: False: never answer session.update (the client's wait must be bounded).
    ack_session_update: bool = True
    #: True: answer session.update with an error echoing its event_id.
    reject_session_update: bool = False
    #: Answer every response.create with this much audio (0: record only).
    response_ms: int = 0
    response_transcript: str = "Hello, this is the fake agent."
    #: After every N ms of caller audio: VAD events, a caller transcript, a reply.
    auto_reply_after_ms: int = 0
    auto_reply_ms: int = 600
    auto_reply_transcript: str = "I heard you."
    auto_vad_events: bool = True
    #: Audio delta size and pacing (0: burst, like the real API generating faster than
    #: real time; >0: seconds between deltas, so a response can be interrupted).
    chunk_ms: int = 100
    pace_s: float = 0.0
    tone_hz: float = 440.0
    #: Include ``name`` in response.function_call_arguments.done (some versions omit it).
    name_in_args_done: bool = True
    #: Realistic latency (bench/warmstart.py): seconds before the handshake is answered
    #: (TLS + upgrade to a distant region), and before an automatic response (``response_ms``)
    #: starts (the model's time to first audio).
    handshake_delay_s: float = 0.0
    response_delay_s: float = 0.0


# --- per-connection state ---------------------------------------------------------------
@dataclass
class FakeItem:
    item_id: str
    response_id: str
    audio_bytes: int = 0
    truncated_ms: int | None = None


@dataclass
class FakeSession(Notifier):
    server: FakeOpenAIServer
    ws: WebSocketConnection
    headers: dict[str, str]
    path: str
    query: dict[str, str]
    api: str
    config: dict[str, Any] = field(default_factory=dict)
    received: list[dict[str, Any]] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    audio_in: bytearray = field(default_factory=bytearray)
    appends: int = 0
    truncates: list[dict[str, Any]] = field(default_factory=list)
    truncate_errors: list[dict[str, Any]] = field(default_factory=list)
    tool_outputs: list[dict[str, Any]] = field(default_factory=list)
    items_created: list[dict[str, Any]] = field(default_factory=list)
    #: refused conversation.item.create: {"item", "problem"}
    item_errors: list[dict[str, Any]] = field(default_factory=list)
    #: call_ids of the function calls this session issued (a result needs one of them)
    call_ids: set[str] = field(default_factory=set)
    vanished: bool = False
    response_creates: list[dict[str, Any]] = field(default_factory=list)
    session_updates: list[dict[str, Any]] = field(default_factory=list)
    items: dict[str, FakeItem] = field(default_factory=dict)
    closed: bool = False
    close_code: int | None = None
    _changed: trio.Event = field(default_factory=trio.Event)
    _resume: trio.Event | None = None
    _nursery: trio.Nursery | None = None
    _response_scope: trio.CancelScope | None = None
    _auto_pending_ms: float = 0.0
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    # -- derived state ------------------------------------------------------------------
    @property
    def options(self) -> FakeOptions:
        return self.server.options

    @property
    def input_format(self) -> str:
        return self._format("input")

    @property
    def output_format(self) -> str:
        return self._format("output")

    def _format(self, direction: str) -> str:
        """ "pcmu" or "pcm24k" from the session config (API default: PCM16 24 kHz)."""
        cfg = self.config
        if self.api == "ga":
            fmt = cfg.get("audio", {}).get(direction, {}).get("format", {})
            return "pcmu" if fmt.get("type") == "audio/pcmu" else "pcm24k"
        value = cfg.get(f"{direction}_audio_format", "pcm16")
        return "pcmu" if value == "g711_ulaw" else "pcm24k"

    @property
    def audio_in_ms(self) -> float:
        return len(self.audio_in) / BYTES_PER_MS[self.input_format]

    @property
    def configured(self) -> bool:
        return bool(self.session_updates)

    def events_of(self, etype: str) -> list[dict[str, Any]]:
        return [e for e in self.received if e.get("type") == etype]

    def generated_ms(self, item_id: str) -> float:
        item = self.items[item_id]
        return item.audio_bytes / BYTES_PER_MS[self.output_format]

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids):04d}"

    async def wait_for(
        self, predicate: Callable[[FakeSession], bool], timeout: float = 5.0
    ) -> None:
        """Wait until ``predicate(session)`` holds (re-checked on every state change)."""
        await self._wait_until(lambda: predicate(self), timeout)

    async def wait_for_event(
        self, etype: str, count: int = 1, timeout: float = 5.0
    ) -> dict[str, Any]:
        """Wait for the ``count``-th client event of type ``etype`` and return it."""
        await self.wait_for(lambda s: len(s.events_of(etype)) >= count, timeout)
        return self.events_of(etype)[count - 1]

    async def wait_closed(self, timeout: float = 5.0) -> None:
        await self.wait_for(lambda s: s.closed, timeout)

    # -- sending ------------------------------------------------------------------------
    async def send(self, event: dict[str, Any]) -> None:
        if self.vanished:
            return  # a vanished peer says nothing more
        event.setdefault("event_id", self._new_id("event"))
        self.sent.append(event)
        await self.ws.send_message(orjson.dumps(event).decode())

    async def send_raw(self, text: str) -> None:
        await self.ws.send_message(text)

    async def send_binary(self, data: bytes = b"\x00\x01binary") -> None:
        await self.ws.send_message(data)

    async def send_malformed(self) -> None:
        await self.ws.send_message('{"type": "response.output_audio.delta", "delta": ')

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the WebSocket (the client sees ConnectionClosed)."""
        with trio.move_on_after(2):
            await self.ws.aclose(code, reason)
        self.closed = True
        self._notify()

    async def abort(self) -> None:
        """Drop the TCP connection without a close frame (a dead peer)."""
        await trio.aclose_forcefully(self.ws._stream)
        self.closed = True
        self._notify()

    def stall(self) -> None:
        """Stop reading client messages (TCP backpressure once buffers fill); no replies."""
        if self._resume is None:
            self._resume = trio.Event()

    def vanish(self) -> None:
        """Stop reading and sending, the TCP connection left open (no FIN, no RST): a peer
        that is gone (crashed host, dead NAT). A response in progress stops too."""
        self.vanished = True
        if self._response_scope is not None:
            self._response_scope.cancel()
        self.stall()

    @property
    def items_seeded(self) -> list[tuple[str, str]]:
        """(role, text) of the message items the client created (its greeting prompt
        included), in order."""
        return [
            (item.get("role", ""), part.get("text", ""))
            for item in self.items_created
            if item.get("type") == "message"
            for part in item.get("content", [])
        ]

    def resume(self) -> None:
        if self._resume is not None:
            self._resume.set()
            self._resume = None

    async def send_error(
        self,
        code: str = "invalid_value",
        message: str = "fake error",
        etype: str = "invalid_request_error",
        event_id: str | None = None,
    ) -> None:
        err: dict[str, Any] = {"type": etype, "code": code, "message": message, "param": None}
        err["event_id"] = event_id
        await self.send({"type": "error", "error": err})

    async def speech_started(self, audio_start_ms: int | None = None, cancel: bool = True) -> str:
        """Caller speech detected (barge-in). ``cancel``: an in-progress paced response is
        cancelled, as server VAD does with ``interrupt_response``. Returns the user item id."""
        item_id = self._new_id("item")
        ms = int(self.audio_in_ms) if audio_start_ms is None else audio_start_ms
        if cancel and self._response_scope is not None:
            self._response_scope.cancel()
        await self.send(
            {"type": "input_audio_buffer.speech_started", "audio_start_ms": ms, "item_id": item_id}
        )
        return item_id

    async def speech_stopped(self, item_id: str | None = None) -> None:
        await self.send(
            {
                "type": "input_audio_buffer.speech_stopped",
                "audio_end_ms": int(self.audio_in_ms),
                "item_id": item_id or self._new_id("item"),
            }
        )

    async def caller_transcript(self, text: str, item_id: str | None = None) -> None:
        iid = item_id or self._new_id("item")
        await self.send(
            {
                "type": "conversation.item.input_audio_transcription.delta",
                "item_id": iid,
                "content_index": 0,
                "delta": text,
            }
        )
        await self.send(
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": iid,
                "content_index": 0,
                "transcript": text,
            }
        )

    async def send_response(
        self,
        ms: int = 500,
        *,
        audio: bytes | None = None,
        transcript: str | None = None,
        item_id: str | None = None,
        chunk_ms: int | None = None,
        pace_s: float | None = None,
        done: bool = True,
    ) -> str:
        """An assistant audio response in the session's output format, with the full
        GA/beta event sequence. Returns the assistant item id (what truncate needs).
        ``done=False`` stops after the deltas (no *.done events)."""
        fmt = self.output_format
        bpms = BYTES_PER_MS[fmt]
        data = audio if audio is not None else tone(ms, fmt, self.options.tone_hz)
        text = self.options.response_transcript if transcript is None else transcript
        chunk = max(1, (chunk_ms or self.options.chunk_ms) * bpms)
        pace = self.options.pace_s if pace_s is None else pace_s
        names = NAMES[self.api]
        rid = self._new_id("resp")
        iid = item_id or self._new_id("item")
        item = FakeItem(iid, rid)
        self.items[iid] = item
        msg_item = {"id": iid, "object": "realtime.item", "type": "message", "role": "assistant"}
        common = {"response_id": rid, "item_id": iid, "output_index": 0, "content_index": 0}
        status = "completed"
        await self.send(
            {
                "type": "response.created",
                "response": {"id": rid, "status": "in_progress", "output": []},
            }
        )
        await self.send(
            {
                "type": "response.output_item.added",
                "response_id": rid,
                "output_index": 0,
                "item": {**msg_item, "status": "in_progress", "content": []},
            }
        )
        await self.send({"type": names["item_added"], "item": {**msg_item, "content": []}})
        with trio.CancelScope() as scope:
            self._response_scope = scope
            words = text.split(" ")
            n_chunks = max(1, math.ceil(len(data) / chunk))
            for i in range(0, max(len(data), 1), chunk):
                piece = data[i : i + chunk]
                if piece:
                    item.audio_bytes += len(piece)
                    await self.send(
                        {
                            "type": names["audio_delta"],
                            **common,
                            "delta": base64.b64encode(piece).decode(),
                        }
                    )
                k = i // chunk
                part = words[k * len(words) // n_chunks : (k + 1) * len(words) // n_chunks]
                if part and text:
                    await self.send(
                        {"type": names["transcript_delta"], **common, "delta": " ".join(part) + " "}
                    )
                if pace:
                    await trio.sleep(pace)
        self._response_scope = None
        if scope.cancelled_caught:
            status = "cancelled"
        if not done:
            return iid
        await self.send({"type": names["audio_done"], **common})
        await self.send({"type": names["transcript_done"], **common, "transcript": text})
        final_item = {
            **msg_item,
            "status": "completed" if status == "completed" else "incomplete",
            "content": [{"type": "output_audio", "transcript": text}],
        }
        await self.send(
            {
                "type": "response.output_item.done",
                "response_id": rid,
                "output_index": 0,
                "item": final_item,
            }
        )
        await self.send(
            {
                "type": "response.done",
                "response": {"id": rid, "status": status, "output": [final_item]},
            }
        )
        return iid

    async def send_function_call(
        self, name: str, arguments: str | dict[str, Any] | None = None, call_id: str | None = None
    ) -> str:
        """A response whose output is one function call. Returns the call_id."""
        args = arguments if isinstance(arguments, str) else orjson.dumps(arguments or {}).decode()
        rid = self._new_id("resp")
        iid = self._new_id("item")
        cid = call_id or self._new_id("call")
        self.call_ids.add(cid)
        base = {
            "id": iid,
            "object": "realtime.item",
            "type": "function_call",
            "call_id": cid,
            "name": name,
        }
        await self.send(
            {
                "type": "response.created",
                "response": {"id": rid, "status": "in_progress", "output": []},
            }
        )
        await self.send(
            {
                "type": "response.output_item.added",
                "response_id": rid,
                "output_index": 0,
                "item": {**base, "status": "in_progress", "arguments": ""},
            }
        )
        common = {"response_id": rid, "item_id": iid, "output_index": 0, "call_id": cid}
        await self.send({"type": "response.function_call_arguments.delta", **common, "delta": args})
        done: dict[str, Any] = {"type": "response.function_call_arguments.done", **common}
        if self.options.name_in_args_done:
            done["name"] = name
        done["arguments"] = args
        await self.send(done)
        final = {**base, "status": "completed", "arguments": args}
        await self.send(
            {
                "type": "response.output_item.done",
                "response_id": rid,
                "output_index": 0,
                "item": final,
            }
        )
        await self.send(
            {
                "type": "response.done",
                "response": {"id": rid, "status": "completed", "output": [final]},
            }
        )
        return cid

    # -- receiving ----------------------------------------------------------------------
    def _default_session(self) -> dict[str, Any]:
        sid = self._new_id("sess")
        model = self.query.get("model", "gpt-realtime")
        if self.api == "ga":
            return {
                "id": sid,
                "object": "realtime.session",
                "type": "realtime",
                "model": model,
                "output_modalities": ["audio"],
                "instructions": "",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 24000},
                        "turn_detection": {"type": "server_vad"},
                        "transcription": None,
                    },
                    "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy"},
                },
                "tools": [],
                "tool_choice": "auto",
            }
        return {
            "id": sid,
            "object": "realtime.session",
            "model": model,
            "modalities": ["text", "audio"],
            "instructions": "",
            "voice": "alloy",
            "input_audio_format": "pcm16",
            "output_audio_format": "pcm16",
            "turn_detection": {"type": "server_vad"},
            "input_audio_transcription": None,
            "tools": [],
            "tool_choice": "auto",
        }

    def _validate_session(self, session: Any) -> str | None:
        if not isinstance(session, dict):
            return "session must be an object"
        ga_keys = {"type", "audio", "output_modalities"} & set(session)
        beta_keys = {"input_audio_format", "output_audio_format", "modalities", "voice"} & set(
            session
        )
        if self.api == "ga":
            if beta_keys:
                return f"Unknown parameter: 'session.{sorted(beta_keys)[0]}'."
            if session.get("type") != "realtime":
                return "Missing required parameter: 'session.type'."
            for direction in ("input", "output"):
                fmt = session.get("audio", {}).get(direction, {}).get("format")
                if fmt is None:
                    continue
                ftype = fmt.get("type") if isinstance(fmt, dict) else None
                if ftype not in ("audio/pcmu", "audio/pcma", "audio/pcm"):
                    return f"Invalid value for 'session.audio.{direction}.format': {fmt!r}"
                if ftype == "audio/pcm" and fmt.get("rate", 24000) != 24000:
                    return "Invalid value for rate: only 24000 is supported"
        else:
            if ga_keys:
                return f"Unknown parameter: 'session.{sorted(ga_keys)[0]}'."
            for key in ("input_audio_format", "output_audio_format"):
                if key in session and session[key] not in ("pcm16", "g711_ulaw", "g711_alaw"):
                    return f"Invalid value for 'session.{key}': {session[key]!r}"
        return None

    async def _on_session_update(self, event: dict[str, Any]) -> None:
        session = event.get("session")
        problem = self._validate_session(session)
        if problem is None and self.options.reject_session_update:
            problem = "session.update rejected by test"
        if problem is not None:
            await self.send_error("invalid_value", problem, event_id=event.get("event_id"))
            return
        assert isinstance(session, dict)
        _merge(self.config, session)
        self.session_updates.append(session)
        if self.options.ack_session_update:
            await self.send({"type": "session.updated", "session": self.config})

    async def _on_append(self, event: dict[str, Any]) -> None:
        audio = event.get("audio")
        try:
            data = base64.b64decode(audio, validate=True) if isinstance(audio, str) else None
        except binascii.Error:
            data = None
        if data is None:
            await self.send_error(
                "invalid_value", "Invalid 'audio': not base64", event_id=event.get("event_id")
            )
            return
        self.appends += 1
        self.audio_in += data
        if self.options.auto_reply_after_ms:
            self._auto_pending_ms += len(data) / BYTES_PER_MS[self.input_format]
            if self._auto_pending_ms >= self.options.auto_reply_after_ms:
                self._auto_pending_ms = 0.0
                assert self._nursery is not None
                self._nursery.start_soon(self._auto_reply)

    async def _auto_reply(self) -> None:
        try:
            if self.options.auto_vad_events:
                user_item = await self.speech_started()
                await self.speech_stopped(user_item)
                await self.send({"type": "input_audio_buffer.committed", "item_id": user_item})
                await self.caller_transcript(
                    f"(caller audio {int(self.audio_in_ms)} ms)", user_item
                )
            await self.send_response(
                self.options.auto_reply_ms, transcript=self.options.auto_reply_transcript
            )
        except WSConnectionClosed:
            pass

    async def _on_truncate(self, event: dict[str, Any]) -> None:
        item = self.items.get(event.get("item_id"))  # type: ignore[arg-type]
        end_ms = event.get("audio_end_ms")
        problem = None
        if item is None:
            problem = f"Item with item_id not found: {event.get('item_id')!r}"
        elif event.get("content_index") != 0:
            problem = "content_index must be 0"
        elif not isinstance(end_ms, int) or end_ms < 0:
            problem = "Invalid 'audio_end_ms'"
        elif end_ms > self.generated_ms(item.item_id) + 1e-9:
            problem = (
                f"Audio content of {self.generated_ms(item.item_id):.0f}ms is already shorter "
                f"than {end_ms}ms"
            )
        if problem is not None:
            self.truncate_errors.append({"event": event, "problem": problem})
            await self.send_error("invalid_value", problem, event_id=event.get("event_id"))
            return
        assert item is not None and isinstance(end_ms, int)
        item.truncated_ms = end_ms
        item.audio_bytes = end_ms * BYTES_PER_MS[self.output_format]
        self.truncates.append(event)
        await self.send(
            {
                "type": "conversation.item.truncated",
                "item_id": item.item_id,
                "content_index": 0,
                "audio_end_ms": end_ms,
            }
        )

    def _item_problem(self, item: dict[str, Any]) -> str | None:
        """Why the real API would refuse this item (None: it takes it)."""
        kind = item.get("type")
        if kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not isinstance(item.get("output"), str):
                return "Missing required parameter: 'item.call_id' or 'item.output'."
            if call_id not in self.call_ids:
                return f"Tool call ID '{call_id}' not found in conversation."
            return None
        if kind == "function_call":
            return None
        if kind != "message":
            return (
                f"Invalid value: {kind!r}. Supported values are: 'message', "
                "'function_call', and 'function_call_output'."
            )
        role = item.get("role")
        allowed = {
            "user": ("input_text", "input_audio"),
            "assistant": ("output_text",) if self.api == "ga" else ("text",),
            "system": ("input_text",),
        }
        if role not in allowed:
            return (
                f"Invalid value: {role!r}. Supported values are: 'user', 'assistant', and 'system'."
            )
        content = item.get("content")
        if not isinstance(content, list) or not content:
            return "Missing required parameter: 'item.content'."
        for i, part in enumerate(content):
            ctype = part.get("type") if isinstance(part, dict) else None
            if ctype not in allowed[role]:
                return (
                    f"Invalid value: {ctype!r}. Value must be one of {list(allowed[role])} "
                    f"for role {role!r} ('item.content[{i}].type')."
                )
            if ctype in ("input_text", "output_text", "text") and not isinstance(
                part.get("text"), str
            ):
                return f"Invalid type for 'item.content[{i}].text': expected a string."
        return None

    async def _on_item_create(self, event: dict[str, Any]) -> None:
        item = event.get("item")
        if not isinstance(item, dict):
            await self.send_error("invalid_value", "Missing 'item'", event_id=event.get("event_id"))
            return
        problem = self._item_problem(item)
        if problem is not None:
            self.item_errors.append({"item": item, "problem": problem})
            await self.send_error("invalid_value", problem, event_id=event.get("event_id"))
            return
        if item.get("type") == "function_call_output":
            self.tool_outputs.append(item)
        else:
            self.items_created.append(item)
        stored = {"id": item.get("id") or self._new_id("item"), "object": "realtime.item", **item}
        await self.send(
            {"type": NAMES[self.api]["item_added"], "previous_item_id": None, "item": stored}
        )

    async def _on_response_create(self, event: dict[str, Any]) -> None:
        self.response_creates.append(event)
        if self.options.response_ms and self._nursery is not None:
            self._nursery.start_soon(self._respond_safely, self.options.response_ms)

    async def _respond_safely(self, ms: int) -> None:
        try:
            if self.options.response_delay_s:
                await trio.sleep(self.options.response_delay_s)
            await self.send_response(ms)
        except WSConnectionClosed:
            pass

    async def _dispatch(self, event: dict[str, Any]) -> None:
        etype = event.get("type")
        if etype == "session.update":
            await self._on_session_update(event)
        elif etype == "input_audio_buffer.append":
            await self._on_append(event)
        elif etype == "conversation.item.truncate":
            await self._on_truncate(event)
        elif etype == "conversation.item.create":
            await self._on_item_create(event)
        elif etype == "response.create":
            await self._on_response_create(event)
        elif etype == "response.cancel":
            if self._response_scope is not None:
                self._response_scope.cancel()
        elif etype == "input_audio_buffer.commit":
            await self.send(
                {"type": "input_audio_buffer.committed", "item_id": self._new_id("item")}
            )
        elif etype == "input_audio_buffer.clear":
            self._auto_pending_ms = 0.0
            await self.send({"type": "input_audio_buffer.cleared"})
        else:
            await self.send_error(
                "invalid_value", f"Invalid value: {etype!r}", event_id=event.get("event_id")
            )

    async def _serve(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.config = self._default_session()
            try:
                if self.options.send_session_created:
                    await self.send({"type": "session.created", "session": self.config})
                await self._read_loop()
            except WSConnectionClosed as exc:
                self.close_code = exc.reason.code if exc.reason is not None else None
            nursery.cancel_scope.cancel()

    async def _read_loop(self) -> None:
        while True:
            if self._resume is not None:
                await self._resume.wait()
            message = await self.ws.get_message()
            if isinstance(message, bytes):
                await self.send_error("invalid_value", "binary frames are not supported")
                continue
            try:
                event = orjson.loads(message)
            except orjson.JSONDecodeError:
                await self.send_error("invalid_json", "The server could not parse the JSON")
                continue
            if not isinstance(event, dict):
                await self.send_error("invalid_json", "event must be an object")
                continue
            self.received.append(event)
            await self._dispatch(event)
            self._notify()


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(base.get(key), dict) and isinstance(value, dict):
            _merge(base[key], value)
        else:
            base[key] = value


# --- server ----------------------------------------------------------------------------
@dataclass
class FakeOpenAIServer(Notifier):
    options: FakeOptions
    port: int = 0
    sessions: list[FakeSession] = field(default_factory=list)
    #: Refused handshakes: {"status", "reason", "headers"}.
    rejected: list[dict[str, Any]] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    @property
    def api_key(self) -> str:
        return self.options.api_key

    async def wait_for_session(self, index: int = 0, timeout: float = 5.0) -> FakeSession:
        await self._wait_until(lambda: len(self.sessions) > index, timeout)
        return self.sessions[index]

    async def wait_for_rejection(self, timeout: float = 5.0) -> dict[str, Any]:
        await self._wait_until(lambda: bool(self.rejected), timeout)
        return self.rejected[-1]

    async def _reject(
        self, request: WebSocketRequest, status: int, reason: str, headers: dict[str, str]
    ) -> None:
        self.rejected.append({"status": status, "reason": reason, "headers": headers})
        self._notify()
        body = orjson.dumps(
            {"error": {"type": "invalid_request_error", "code": None, "message": reason}}
        )
        await request.reject(
            status, extra_headers=[(b"content-type", b"application/json")], body=body
        )

    async def handler(self, request: WebSocketRequest) -> None:
        opts = self.options
        headers, path, query = request_parts(request)
        if opts.hang_handshake:
            await trio.sleep_forever()
        if opts.handshake_delay_s:
            await trio.sleep(opts.handshake_delay_s)
        if opts.reject_status is not None:
            await self._reject(request, opts.reject_status, "rejected by test", headers)
            return
        if headers.get("authorization") != f"Bearer {opts.api_key}":
            await self._reject(
                request, 401, "Incorrect API key provided (invalid_api_key).", headers
            )
            return
        if opts.model is not None and query.get("model") != opts.model:
            await self._reject(request, 400, f"model must be {opts.model!r}", headers)
            return
        api = "beta" if headers.get("openai-beta", "").startswith("realtime") else "ga"
        ws = await request.accept()
        session = FakeSession(self, ws, headers, path, query, api)
        self.sessions.append(session)
        self._notify()
        try:
            await session._serve()
        finally:
            session.closed = True
            session._notify()


def fake_openai_server(
    options: FakeOptions | None = None, **kwargs: Any
) -> AbstractAsyncContextManager[FakeOpenAIServer]:
    """Run a fake Realtime server on 127.0.0.1 (random port) for the ``async with`` body.
    Keyword arguments are :class:`FakeOptions` fields."""
    return serve_trio_fake(
        FakeOpenAIServer(options if options is not None else FakeOptions(**kwargs))
    )


@asynccontextmanager
async def silent_server() -> AsyncIterator[str]:
    """A TCP listener that accepts connections and never says a word; yields a ws:// URL."""
    streams: list[trio.SocketStream] = []
    body_error: Exception | None = None

    async def handler(stream: trio.SocketStream) -> None:
        streams.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        try:
            yield f"ws://127.0.0.1:{port}/v1/realtime"
        except Exception as exc:
            body_error = exc
        finally:
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error
