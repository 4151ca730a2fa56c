"""A local fake of the AssemblyAI Voice Agent API (``wss://agents.assemblyai.com/v1/ws``).

Speaks the documented protocol and refuses what the real service refuses:

* the handshake needs ``Authorization: Bearer <api_key>`` (401 otherwise);
* the first message must be ``session.update`` or ``session.resume``; audio formats are
  validated (``audio/pcm``/``audio/pcmu``/``audio/pcma``; lowercase voices) and the output
  format cannot change after ``session.ready``; without a format the API default (PCM
  24 kHz) applies;
* ``input.audio`` before ``session.ready`` is refused (``session.error``, recorded in
  ``refusals``); so is a ``tool.result`` with an unknown ``call_id`` or one sent before the
  ``reply.done`` that follows its ``tool.call`` (the documented order);
* sessions survive a lost connection for ``resume_window_s`` (30 s): ``session.resume``
  with the ``session_id`` continues them (same id, same conversation); afterwards, or for
  an unknown id, ``session.error`` ``session_not_found`` and a close.

Scripted by tests through :class:`FakeAASession` (replies with audio and transcripts,
barge-in, tool calls, errors, ending) and the connection controls of
:class:`fake_vendor_ws.WsPeer` (stall, vanish, abort, close). Automatic modes:
``greeting_ms`` (the greeting is spoken as that much audio), ``auto_reply_after_ms`` (VAD
events, a caller transcript and a reply after every N ms of caller audio),
``tool_followup_ms`` (a reply after each accepted tool result).

Usage::

    async with fake_assemblyai_server(greeting_ms=400) as server:
        session = await server.wait_for_session()
        await session.wait_for(lambda s: s.audio_in_ms >= 100)
"""

from __future__ import annotations

import base64
import binascii
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import trio
from fake_vendor_ws import FakeWsOptions, FakeWsServer, WsPeer, serve_fake, tone

__all__ = [
    "FakeAAOptions",
    "FakeAASession",
    "FakeAssemblyAIServer",
    "fake_assemblyai_server",
]

DEFAULT_KEY = "aai-test-key-0123456789abcdef"
FORMATS = {"audio/pcm", "audio/pcmu", "audio/pcma"}


@dataclass
class FakeAAOptions(FakeWsOptions):
    api_key: str = DEFAULT_KEY
    #: Delay between session.update and session.ready.
    ready_delay_s: float = 0.0
    #: Speak the configured greeting as this much audio (0: no greeting audio).
    greeting_ms: int = 400
    #: After every N ms of caller audio: VAD events, a caller transcript, a reply.
    auto_reply_after_ms: int = 0
    auto_reply_ms: int = 600
    auto_reply_transcript: str = "I heard you."
    #: After an accepted tool.result: a reply of this much audio (0: none).
    tool_followup_ms: int = 300
    #: Audio chunk size and pacing of replies (0: burst).
    chunk_ms: int = 100
    pace_s: float = 0.0
    #: reply.audio chunks still sent after input.speech.started when a reply is
    #: interrupted (audio in flight), before reply.done status "interrupted".
    stale_chunks: int = 2
    resume_window_s: float = 30.0
    #: False: every session.resume is refused (session_not_found).
    allow_resume: bool = True
    tone_hz: float = 440.0
    #: Refuse every session.update with this session.error code.
    reject_session: str | None = None


def _fmt_key(fmt: Any) -> str:
    """'pcmu' for μ-law 8 kHz, 'pcm24k' for the default PCM16 24 kHz, else as given."""
    if not isinstance(fmt, dict):
        return "pcm24k"
    enc = fmt.get("encoding", "audio/pcm")
    rate = fmt.get("sample_rate", 8000 if enc in ("audio/pcmu", "audio/pcma") else 24000)
    if enc == "audio/pcmu" and rate == 8000:
        return "pcmu"
    if enc == "audio/pcm" and rate == 24000:
        return "pcm24k"
    return f"{enc}@{rate}"


class FakeAASession:
    """One Voice Agent session (a conversation); it may span several connections."""

    def __init__(self, server: FakeAssemblyAIServer, session_id: str, config: dict[str, Any]):
        self.server = server
        self.session_id = session_id
        self.config = config
        self.peer: WsPeer | None = None
        self.connections = 0
        self.resumes = 0
        self.received: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []
        self.audio_in = bytearray()
        self.appends = 0
        self.refusals: list[dict[str, Any]] = []
        self.tool_calls: dict[str, dict[str, Any]] = {}  # call_id -> {name, args, done}
        self.tool_results: list[dict[str, Any]] = []
        self.replies: list[str] = []
        self.ended = False
        #: session.ready was sent (input.audio before it is refused)
        self.ready = False
        self.disconnected_at: float | None = None
        self._reply_scope: trio.CancelScope | None = None
        self._reply_id: str | None = None
        self._auto_pending_ms = 0.0
        self._ids = itertools.count(1)
        self._reply_lock = trio.Lock()

    # -- derived ---------------------------------------------------------------------------
    @property
    def options(self) -> FakeAAOptions:
        return self.server.options

    @property
    def input_format(self) -> str:
        return _fmt_key(self.config.get("input", {}).get("format"))

    @property
    def output_format(self) -> str:
        return _fmt_key(self.config.get("output", {}).get("format"))

    @property
    def bytes_per_ms(self) -> int:
        return 8 if self.input_format == "pcmu" else 48

    @property
    def audio_in_ms(self) -> float:
        return len(self.audio_in) / self.bytes_per_ms

    @property
    def connected(self) -> bool:
        return self.peer is not None and not self.peer.closed

    def events_of(self, etype: str) -> list[dict[str, Any]]:
        return [e for e in self.received if e.get("type") == etype]

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}_{self.session_id[-4:]}_{next(self._ids):04d}"

    async def wait_for(
        self, predicate: Callable[[FakeAASession], bool], timeout: float = 5.0
    ) -> None:
        await self.server.wait_for(lambda: predicate(self), timeout)

    # -- sending -----------------------------------------------------------------------------
    async def send(self, event: dict[str, Any]) -> None:
        self.sent.append(event)
        if self.peer is not None:
            await self.peer.send_json(event)

    async def send_error(self, code: str = "invalid_request", message: str = "fake error") -> None:
        await self.send({"type": "session.error", "code": code, "message": message})

    async def refuse(self, code: str, message: str, event: Any = None) -> None:
        self.refusals.append({"code": code, "message": message, "event": event})
        self.server.notify()
        await self.send_error(code, message)

    async def speech_started(self, *, interrupt: bool = True) -> None:
        """Caller speech (barge-in): a reply in progress is interrupted: a few chunks still
        in flight, then ``reply.done`` status ``interrupted`` and the trimmed transcript."""
        await self.send({"type": "input.speech.started"})
        scope = self._reply_scope
        if interrupt and scope is not None:
            scope.cancel()
            rid = self._reply_id
            for _ in range(self.options.stale_chunks):
                chunk = tone(self.options.chunk_ms, self.output_format, 999.0)
                await self.send({"type": "reply.audio", "data": base64.b64encode(chunk).decode()})
            await self.send(
                {
                    "type": "transcript.agent",
                    "text": "Sure, let me",
                    "reply_id": rid,
                    "interrupted": True,
                }
            )
            await self.send({"type": "reply.done", "status": "interrupted"})

    async def speech_stopped(self) -> None:
        await self.send({"type": "input.speech.stopped"})

    async def user_transcript(self, text: str) -> None:
        await self.send({"type": "transcript.user.delta", "text": text[: len(text) // 2]})
        await self.send({"type": "transcript.user", "text": text, "item_id": self._new_id("item")})

    async def send_reply(
        self,
        ms: int = 500,
        *,
        audio: bytes | None = None,
        transcript: str = "Hello from the fake agent.",
        chunk_ms: int | None = None,
        pace_s: float | None = None,
    ) -> str:
        """A whole reply: reply.started, reply.audio chunks, transcript.agent, reply.done.
        Returns the reply id. Interruptible by :meth:`speech_started`."""
        data = audio if audio is not None else tone(ms, self.output_format, self.options.tone_hz)
        bpms = 8 if self.output_format == "pcmu" else 48
        chunk = max(1, (chunk_ms or self.options.chunk_ms) * bpms)
        pace = self.options.pace_s if pace_s is None else pace_s
        async with self._reply_lock:  # one reply at a time, as the real service
            return await self._reply(data, bpms, chunk, pace, transcript)

    async def _reply(self, data: bytes, bpms: int, chunk: int, pace: float, transcript: str) -> str:
        rid = self._new_id("reply")
        self.replies.append(rid)
        self._reply_id = rid
        await self.send({"type": "reply.started", "reply_id": rid})
        with trio.CancelScope() as scope:
            self._reply_scope = scope
            for i in range(0, len(data), chunk):
                await self.send(
                    {"type": "reply.audio", "data": base64.b64encode(data[i : i + chunk]).decode()}
                )
                if pace:
                    await trio.sleep(pace)
            await self.send(
                {
                    "type": "transcript.agent",
                    "text": transcript,
                    "reply_id": rid,
                    "interrupted": False,
                }
            )
            await self.send({"type": "reply.done", "status": "completed"})
        if self._reply_scope is scope:
            self._reply_scope = None
        return rid

    async def tool_call(self, name: str, arguments: dict[str, Any], *, say_ms: int = 0) -> str:
        """A reply that calls a tool: reply.started, (audio), tool.call, reply.done. The
        relay must answer after that reply.done. Returns the call id."""
        async with self._reply_lock:
            return await self._tool_call(name, arguments, say_ms)

    async def _tool_call(self, name: str, arguments: dict[str, Any], say_ms: int) -> str:
        call_id = self._new_id("call")
        rid = self._new_id("reply")
        self.replies.append(rid)
        await self.send({"type": "reply.started", "reply_id": rid})
        if say_ms:
            data = tone(say_ms, self.output_format, self.options.tone_hz)
            await self.send({"type": "reply.audio", "data": base64.b64encode(data).decode()})
        self.tool_calls[call_id] = {"name": name, "arguments": arguments, "done": False}
        await self.send(
            {"type": "tool.call", "call_id": call_id, "name": name, "arguments": arguments}
        )
        await trio.sleep(0.05)  # a result sent now would break the documented order
        self.tool_calls[call_id]["done"] = True
        await self.send({"type": "reply.done", "status": "completed"})
        return call_id

    async def end_session(self) -> None:
        self.ended = True
        await self.send({"type": "session.ended"})
        if self.peer is not None:
            await self.peer.close(1000, "session ended")

    # -- receiving ---------------------------------------------------------------------------
    async def on_event(self, peer: WsPeer, event: dict[str, Any]) -> None:
        etype = event.get("type")
        if etype == "input.audio" and not self.ready:
            await self.refuse("invalid_state", "input.audio before session.ready", "input.audio")
        elif etype == "input.audio":
            await self._on_audio(event)
        elif etype == "tool.result":
            await self._on_tool_result(event)
        elif etype == "session.update":
            await self._on_update(event)
        elif etype == "reply.create":
            self._spawn(self.send_reply, self.options.auto_reply_ms)
        elif etype == "session.end":
            self.ended = True
            await self.send({"type": "session.ended"})
            await peer.close(1000, "session ended")
        else:
            await self.refuse("unknown_event", f"unknown event type {etype!r}", event)

    async def _on_audio(self, event: dict[str, Any]) -> None:
        audio = event.get("audio")
        try:
            data = base64.b64decode(audio, validate=True) if isinstance(audio, str) else None
        except binascii.Error:
            data = None
        if data is None:
            await self.refuse("invalid_audio", "input.audio must be base64", None)
            return
        self.appends += 1
        self.audio_in += data
        if self.options.auto_reply_after_ms:
            self._auto_pending_ms += len(data) / self.bytes_per_ms
            if self._auto_pending_ms >= self.options.auto_reply_after_ms:
                self._auto_pending_ms = 0.0
                self._spawn(self._auto_reply)

    async def _auto_reply(self) -> None:
        await self.speech_started()
        await self.speech_stopped()
        await self.user_transcript(f"(caller audio {int(self.audio_in_ms)} ms)")
        await self.send_reply(
            self.options.auto_reply_ms, transcript=self.options.auto_reply_transcript
        )

    async def _on_tool_result(self, event: dict[str, Any]) -> None:
        call_id = event.get("call_id")
        call = self.tool_calls.get(call_id) if isinstance(call_id, str) else None
        if call is None:
            await self.refuse("unknown_call_id", f"no tool call {call_id!r}", event)
            return
        if not call["done"]:
            await self.refuse("tool_result_too_early", "tool.result before reply.done", event)
            return
        if not isinstance(event.get("result"), str):
            await self.refuse("invalid_tool_result", "result must be a string", event)
            return
        del self.tool_calls[call_id]
        self.tool_results.append(event)
        self.server.notify()
        if self.options.tool_followup_ms:
            self._spawn(self.send_reply, self.options.tool_followup_ms, transcript="Done.")

    async def _on_update(self, event: dict[str, Any]) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            await self.refuse("invalid_format", "session must be an object", event)
            return
        new_out = session.get("output", {}).get("format")
        if new_out is not None and _fmt_key(new_out) != self.output_format:
            await self.refuse("invalid_update", "output format cannot change after ready", event)
            return
        _merge(self.config, session)
        await self.send({"type": "session.updated"})

    def _spawn(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        peer = self.peer
        if peer is None or peer.nursery is None:
            return

        async def run() -> None:
            try:
                await fn(*args, **kwargs)
            except trio.Cancelled:
                raise
            except Exception:  # the connection went away mid-reply
                pass

        peer.nursery.start_soon(run)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(base.get(key), dict) and isinstance(value, dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _config_problem(session: Any) -> tuple[str, str] | None:
    if not isinstance(session, dict):
        return ("invalid_format", "session must be an object")
    for direction in ("input", "output"):
        part = session.get(direction, {})
        if not isinstance(part, dict):
            return ("invalid_format", f"session.{direction} must be an object")
        fmt = part.get("format")
        if fmt is None:
            continue
        if not isinstance(fmt, dict) or fmt.get("encoding") not in FORMATS:
            return ("invalid_format", f"unsupported {direction} format {fmt!r}")
        rate = fmt.get("sample_rate")
        if rate is not None and (not isinstance(rate, int) or rate <= 0):
            return ("invalid_format", f"bad {direction} sample_rate {rate!r}")
    voice = session.get("output", {}).get("voice")
    if voice is not None and (not isinstance(voice, str) or voice != voice.lower()):
        return ("invalid_voice", f"voice names are lowercase, got {voice!r}")
    for tool in session.get("tools", []) or []:
        if not isinstance(tool, dict) or tool.get("type") != "function" or not tool.get("name"):
            return ("invalid_tools", f"bad tool {tool!r}")
    return None


class FakeAssemblyAIServer(FakeWsServer):
    path = "/v1/ws"

    def __init__(self, options: FakeAAOptions) -> None:
        super().__init__(options)
        self.options: FakeAAOptions = options
        self.sessions: list[FakeAASession] = []
        self.by_id: dict[str, FakeAASession] = {}
        #: refusals before any session exists (audio before session.ready)
        self.refusals: list[dict[str, Any]] = []
        self._sid = itertools.count(1)

    def authorize(self, headers: dict[str, str], query: dict[str, str]) -> tuple[int, str] | None:
        if headers.get("authorization") != f"Bearer {self.options.api_key}":
            return (401, "Invalid API key")
        return None

    async def wait_for_session(self, index: int = 0, timeout: float = 5.0) -> FakeAASession:
        """The ``index``-th session once it is ready (configured)."""
        await self.wait_for(lambda: len(self.sessions) > index, timeout)
        return self.sessions[index]

    async def serve_peer(self, peer: WsPeer) -> None:
        session: FakeAASession | None = None
        try:
            async for message in peer.messages():
                if not isinstance(message, str):
                    await peer.send_json(
                        {"type": "session.error", "code": "invalid_format", "message": "binary"}
                    )
                    continue
                try:
                    event = orjson.loads(message)
                except orjson.JSONDecodeError:
                    event = None
                if not isinstance(event, dict):
                    await peer.send_json(
                        {"type": "session.error", "code": "invalid_format", "message": "not JSON"}
                    )
                    continue
                if session is None and event.get("type") == "input.audio":
                    # Refused: no audio before session.ready.
                    self.refusals.append({"code": "invalid_state", "event": "input.audio"})
                    self.notify()
                    await peer.send_json(
                        {
                            "type": "session.error",
                            "code": "invalid_state",
                            "message": "input.audio before session.ready",
                        }
                    )
                    continue
                if session is None:
                    session = await self._start(peer, event)
                    if session is None:
                        return
                    continue
                session.received.append(event)
                await session.on_event(peer, event)
                self.notify()
        finally:
            if session is not None and session.peer is peer:
                session.peer = None
                session.disconnected_at = trio.current_time()
                if session._reply_scope is not None:
                    session._reply_scope.cancel()
                self.notify()

    async def _start(self, peer: WsPeer, event: dict[str, Any]) -> FakeAASession | None:
        """The first message: session.update (new) or session.resume."""
        etype = event.get("type")
        if etype == "session.resume":
            sid = event.get("session_id")
            session = self.by_id.get(sid) if isinstance(sid, str) else None
            expired = (
                not self.options.allow_resume
                or session is None
                or session.ended
                or (
                    session.disconnected_at is not None
                    and trio.current_time() - session.disconnected_at > self.options.resume_window_s
                )
            )
            if expired:
                await peer.send_json(
                    {
                        "type": "session.error",
                        "code": "session_not_found",
                        "message": f"no resumable session {sid!r}",
                    }
                )
                await peer.close(1008, "session not found")
                return None
            assert session is not None
            old = session.peer
            if old is not None and not old.closed:
                # Taken over by the new connection (the old one may be half-dead); the
                # streaming API's 4103 "this session has been reconnected".
                session.peer = None
                old.vanished = True  # nothing more goes out on the old connection
                old._finish(4103)
            session.received.append(event)
            session.peer = peer
            session.connections += 1
            session.resumes += 1
            session.disconnected_at = None
            session.ready = True
            await session.send({"type": "session.ready", "session_id": session.session_id})
            self.notify()
            return session
        if etype != "session.update":
            await peer.send_json(
                {"type": "session.error", "code": "invalid_state", "message": "configure first"}
            )
            await peer.close(1008, "session.update expected")
            return None
        cfg = event.get("session")
        problem = _config_problem(cfg)
        if problem is None and self.options.reject_session:
            problem = (self.options.reject_session, "refused by test")
        if problem is not None:
            await peer.send_json(
                {"type": "session.error", "code": problem[0], "message": problem[1]}
            )
            await peer.close(1008, problem[0])
            return None
        assert isinstance(cfg, dict)
        sid = f"sess_{next(self._sid):04d}"
        session = FakeAASession(self, sid, dict(cfg))
        session.received.append(event)
        session.peer = peer
        session.connections = 1
        self.sessions.append(session)
        self.by_id[sid] = session
        session._spawn(self._ready, session)  # the reader goes on: early audio is seen
        return session

    async def _ready(self, session: FakeAASession) -> None:
        if self.options.ready_delay_s:
            await trio.sleep(self.options.ready_delay_s)
        session.ready = True
        await session.send({"type": "session.ready", "session_id": session.session_id})
        self.notify()
        greeting = session.config.get("greeting")
        if greeting and self.options.greeting_ms:
            await session.send_reply(self.options.greeting_ms, transcript=greeting)


@asynccontextmanager
async def fake_assemblyai_server(
    options: FakeAAOptions | None = None, **kwargs: Any
) -> AsyncIterator[FakeAssemblyAIServer]:
    """Run a fake Voice Agent server on 127.0.0.1 (random port) for the ``async with`` body.
    Keyword arguments are :class:`FakeAAOptions` fields."""
    opts = options if options is not None else FakeAAOptions(**kwargs)
    async with serve_fake(FakeAssemblyAIServer(opts)) as server:
        yield server


def agent_config(server: FakeAssemblyAIServer, **extra: Any) -> dict[str, Any]:
    """An ``[agents.NAME]`` table for an assemblyai agent talking to ``server``."""
    return {
        "type": "assemblyai",
        "url": server.url,
        "api_key": server.api_key,
        "connect_timeout_s": 5.0,
        **extra,
    }
