"""A local fake of the Gemini Live API (BidiGenerateContent over WebSocket), for tests.

It speaks the documented protocol (``/work/shared/reference/voice-agent-apis.md``, "Gemini
Live"; https://ai.google.dev/api/live) and refuses what the real service refuses, the way
it does (close 1007 "invalid argument", 1008 for the API key):

* the handshake URL needs ``?key=<api_key>`` (else the socket is closed with 1008);
* the first message must be ``setup`` (with a ``models/…`` model and AUDIO responses);
  ``setupComplete`` follows after ``setup_delay_s``, and *anything* received before it
  was sent is refused;
* caller audio must be ``realtimeInput.audio`` with ``mimeType`` exactly
  ``audio/pcm;rate=16000``, base64 data of whole 16-bit samples: a wrong mime type or
  sample rate is refused;
* a ``toolResponse`` naming an id this connection did not issue (or that was cancelled,
  or already answered) is refused;
* resumption: ``sessionResumptionUpdate`` handles are issued (after setupComplete and
  after every completed turn, ``resumable`` only between turns); a ``setup`` with a handle
  continues that session (same :class:`FakeGeminiSession`), an unknown handle is refused;
  ``go_away()`` announces the end of a connection and closes it when the time is up.

Server messages go out as text, or as JSON in binary frames (``binary_frames``), as the
real service does. Scripted from tests through :class:`FakeGeminiConnection`: model turns
(24 kHz tone or given bytes, paced or burst, with output transcription), interruptions
(optionally followed by stale audio of the interrupted turn), input transcription, tool
calls and cancellations, goAway, resumption updates, close, abort, stall. Server plumbing
(listener, close/abort/stall, read loop): tests/fake_vendor_ws.py.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import math
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
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
)
from trio_websocket import WebSocketConnection, WebSocketRequest

__all__ = [
    "DEFAULT_KEY",
    "FakeGeminiConnection",
    "FakeGeminiServer",
    "FakeGeminiSession",
    "FakeOptions",
    "fake_gemini_server",
    "pcm_tone",
]

DEFAULT_KEY = "AIza-test-fake-key-0123456789abcd"
PATH = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
INPUT_MIME = "audio/pcm;rate=16000"
OUTPUT_MIME = "audio/pcm;rate=24000"


def pcm_tone(ms: int, rate: int = 24000, hz: float = 440.0, amplitude: float = 0.3) -> bytes:
    """``ms`` of a sine as PCM16 LE at ``rate``."""
    return sine(ms, rate, hz, amplitude).tobytes()


@dataclass
class FakeOptions:
    api_key: str = DEFAULT_KEY
    #: When set, setup.model must be exactly this.
    model: str | None = None
    setup_delay_s: float = 0.05
    #: Send server messages as JSON in binary frames.
    binary_frames: bool = False
    #: Answer a completed client turn (the greeting) / realtimeInput.text with this much audio.
    reply_ms: int = 400
    #: Answer every N ms of caller audio with input transcription + a reply of reply_ms.
    auto_reply_after_ms: int = 0
    chunk_ms: int = 100
    pace_s: float = 0.0
    tone_hz: float = 440.0
    #: Issue sessionResumptionUpdate handles (needs sessionResumption in setup).
    resumption_updates: bool = True


@dataclass
class FakeGeminiSession:
    """State that survives resumption: what the model has heard and said."""

    session_id: str
    audio_in: bytearray = field(default_factory=bytearray)
    client_turns: list[dict[str, Any]] = field(default_factory=list)
    tool_responses: list[dict[str, Any]] = field(default_factory=list)
    connections: int = 0


@dataclass
class FakeGeminiConnection(TrioWsPeer):
    server: FakeGeminiServer
    ws: WebSocketConnection
    query: dict[str, str]
    index: int
    setup: dict[str, Any] | None = None
    session: FakeGeminiSession | None = None
    resumed_from: str | None = None
    setup_complete_sent: bool = False
    audio_in: bytearray = field(default_factory=bytearray)
    audio_messages: int = 0
    handles: list[str] = field(default_factory=list)
    _turn_scope: trio.CancelScope | None = None
    _tool_calls: dict[str, str] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _auto_pending_ms: float = 0.0
    turns_sent: int = 0

    @property
    def options(self) -> FakeOptions:
        return self.server.options

    @property
    def audio_in_ms(self) -> float:
        return len(self.audio_in) / 32.0

    @property
    def transcription(self) -> bool:
        return bool(self.setup and "outputAudioTranscription" in self.setup)

    async def wait_for(
        self, predicate: Callable[[FakeGeminiConnection], bool], timeout: float = 5.0
    ) -> None:
        await self._wait_until(lambda: predicate(self), timeout)

    async def wait_setup(self, timeout: float = 5.0) -> None:
        await self.wait_for(lambda c: c.setup_complete_sent, timeout)

    async def wait_closed(self, timeout: float = 5.0) -> None:
        await self.wait_for(lambda c: c.closed, timeout)

    # -- sending --------------------------------------------------------------------------
    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        data = orjson.dumps(message)
        await self.ws.send_message(data if self.options.binary_frames else data.decode())

    def _stop_output(self) -> None:
        if self._turn_scope is not None:
            self._turn_scope.cancel()

    async def refuse(self, reason: str, code: int = 1007) -> None:
        self.refused.append(reason)
        self._notify()
        await self.close(code, reason[:120])

    def _new_handle(self) -> str:
        assert self.session is not None
        handle = f"h-{self.session.session_id}-{self.index}-{next(self._ids)}"
        self.server.handles[handle] = self.session
        self.handles.append(handle)
        return handle

    async def resumption_update(self, resumable: bool = True) -> str | None:
        handle = self._new_handle() if resumable else None
        update: dict[str, Any] = {"resumable": resumable}
        if handle:
            update["newHandle"] = handle
        await self.send({"sessionResumptionUpdate": update})
        return handle

    async def send_turn(
        self,
        ms: int | None = None,
        *,
        audio: bytes | None = None,
        transcript: str = "Hello from the fake Gemini.",
        chunk_ms: int | None = None,
        pace_s: float | None = None,
        complete: bool = True,
        mime: str = OUTPUT_MIME,
    ) -> int:
        """A model turn: audio parts (24 kHz PCM16) with output transcription fragments,
        then ``turnComplete``. Returns the turn number. ``interrupt()`` cuts it short."""
        data = (
            audio
            if audio is not None
            else pcm_tone(ms or self.options.reply_ms, 24000, self.options.tone_hz)
        )
        chunk = max(2, (chunk_ms or self.options.chunk_ms) * 48)
        pace = self.options.pace_s if pace_s is None else pace_s
        self.turns_sent += 1
        turn = self.turns_sent
        words = transcript.split()
        n_chunks = max(1, math.ceil(len(data) / chunk))
        with trio.CancelScope() as scope:
            self._turn_scope = scope
            for k, i in enumerate(range(0, len(data), chunk)):
                part = {
                    "inlineData": {
                        "mimeType": mime,
                        "data": base64.b64encode(data[i : i + chunk]).decode(),
                    }
                }
                await self.send({"serverContent": {"modelTurn": {"parts": [part]}}})
                said = words[k * len(words) // n_chunks : (k + 1) * len(words) // n_chunks]
                if said and self.transcription:
                    await self.send(
                        {"serverContent": {"outputTranscription": {"text": " ".join(said) + " "}}}
                    )
                if pace:
                    await trio.sleep(pace)
            if complete:
                await self.send({"serverContent": {"generationComplete": True}})
                await self.send({"serverContent": {"turnComplete": True}})
                if self.options.resumption_updates and self._resumption_enabled():
                    await self.resumption_update(True)
        self._turn_scope = None
        return turn

    async def interrupt(self, *, stale_ms: int = 0) -> None:
        """Barge-in as documented: ``interrupted``, (here: ``stale_ms`` of audio that a
        client must drop), then ``turnComplete``."""
        if self._turn_scope is not None:
            self._turn_scope.cancel()
        await self.send({"serverContent": {"interrupted": True}})
        if stale_ms:
            part = {
                "inlineData": {
                    "mimeType": OUTPUT_MIME,
                    "data": base64.b64encode(pcm_tone(stale_ms, 24000, 1000.0)).decode(),
                }
            }
            await self.send({"serverContent": {"modelTurn": {"parts": [part]}}})
            await self.send({"serverContent": {"outputTranscription": {"text": "stale words "}}})
        await self.send({"serverContent": {"turnComplete": True}})

    async def input_transcription(self, text: str) -> None:
        await self.send({"serverContent": {"inputTranscription": {"text": text}}})

    async def tool_call(self, name: str, args: dict[str, Any] | None = None) -> str:
        call_id = f"function-call-{self.index}-{next(self._ids)}"
        self._tool_calls[call_id] = name
        await self.send(
            {"toolCall": {"functionCalls": [{"id": call_id, "name": name, "args": args or {}}]}}
        )
        return call_id

    async def cancel_tool_calls(self, *ids: str) -> None:
        for call_id in ids:
            self._tool_calls.pop(call_id, None)
        await self.send({"toolCallCancellation": {"ids": list(ids)}})

    async def go_away(self, time_left_s: float = 1.0, *, close: bool = True) -> None:
        """``goAway``; with ``close`` the connection is closed when the time is up."""
        await self.send({"goAway": {"timeLeft": f"{time_left_s:g}s"}})
        if close:
            assert self._nursery is not None

            async def cut() -> None:
                await trio.sleep(time_left_s)
                await self.close(1000, "connection lifetime reached")

            self._nursery.start_soon(cut)

    # -- receiving ------------------------------------------------------------------------
    def _resumption_enabled(self) -> bool:
        return bool(self.setup and "sessionResumption" in self.setup)

    async def _on_setup(self, msg: dict[str, Any]) -> None:
        setup = msg.get("setup")
        if not isinstance(setup, dict):
            await self.refuse("the first message must be setup")
            return
        model = setup.get("model")
        if not isinstance(model, str) or not model.startswith("models/"):
            await self.refuse(f"invalid model {model!r}")
            return
        if self.options.model is not None and model != self.options.model:
            await self.refuse(f"model {model!r} not found", code=1008)
            return
        modalities = (setup.get("generationConfig") or {}).get("responseModalities")
        if modalities != ["AUDIO"]:
            await self.refuse(f"responseModalities must be ['AUDIO'], got {modalities!r}")
            return
        resumption = setup.get("sessionResumption")
        handle = resumption.get("handle") if isinstance(resumption, dict) else None
        if handle:
            session = self.server.handles.get(handle)
            if session is None:
                await self.refuse(f"invalid session resumption handle {handle!r}")
                return
            self.resumed_from = handle
        else:
            session = FakeGeminiSession(f"s{len(self.server.sessions) + 1}")
            self.server.sessions.append(session)
        session.connections += 1
        self.session = session
        self.setup = setup
        assert self._nursery is not None
        self._nursery.start_soon(self._complete_setup)

    async def _complete_setup(self) -> None:
        await trio.sleep(self.options.setup_delay_s)
        if self.closed:
            return
        try:
            await self.send({"setupComplete": {}})
            self.setup_complete_sent = True
            self._notify()
            if self.options.resumption_updates and self._resumption_enabled():
                await self.resumption_update(True)
        except WSConnectionClosed:
            pass

    async def _on_message(self, msg: dict[str, Any]) -> None:
        if self.setup is None:
            await self._on_setup(msg)
            return
        if not self.setup_complete_sent:
            await self.refuse(f"message before setupComplete: {sorted(msg)}")
            return
        assert self.session is not None
        if "realtimeInput" in msg:
            await self._on_realtime_input(msg["realtimeInput"])
        elif "clientContent" in msg:
            content = msg["clientContent"]
            if not isinstance(content, dict) or not isinstance(content.get("turns"), list):
                await self.refuse("clientContent.turns must be a list")
                return
            self.session.client_turns.append(content)
            if content.get("turnComplete"):
                self._start(self._reply)
        elif "toolResponse" in msg:
            await self._on_tool_response(msg["toolResponse"])
        else:
            await self.refuse(f"unknown client message {sorted(msg)}")

    async def _on_realtime_input(self, rt: Any) -> None:
        assert self.session is not None
        if not isinstance(rt, dict):
            await self.refuse("realtimeInput must be an object")
            return
        if "text" in rt:
            self._start(self._reply)
            return
        audio = rt.get("audio")
        if not isinstance(audio, dict):
            await self.refuse(f"unsupported realtimeInput {sorted(rt)}")
            return
        if audio.get("mimeType") != INPUT_MIME:
            await self.refuse(f"unsupported audio mimeType {audio.get('mimeType')!r}")
            return
        try:
            data = base64.b64decode(audio.get("data") or "", validate=True)
        except (binascii.Error, TypeError):
            await self.refuse("audio data is not base64")
            return
        if len(data) % 2:
            await self.refuse("PCM16 audio of odd length")
            return
        self.audio_in += data
        self.session.audio_in += data
        self.audio_messages += 1
        if self.options.auto_reply_after_ms:
            self._auto_pending_ms += len(data) / 32.0
            if self._auto_pending_ms >= self.options.auto_reply_after_ms:
                self._auto_pending_ms = 0.0
                self._start(self._auto_reply)

    async def _on_tool_response(self, tr: Any) -> None:
        assert self.session is not None
        responses = tr.get("functionResponses") if isinstance(tr, dict) else None
        if not isinstance(responses, list) or not responses:
            await self.refuse("toolResponse.functionResponses must be a non-empty list")
            return
        for resp in responses:
            call_id = resp.get("id") if isinstance(resp, dict) else None
            name = self._tool_calls.pop(call_id, None) if isinstance(call_id, str) else None
            if (
                name is None
                or resp.get("name") != name
                or not isinstance(resp.get("response"), dict)
            ):
                await self.refuse(f"toolResponse for unknown function call id {call_id!r}")
                return
            self.session.tool_responses.append(resp)
        self._start(self._reply)

    async def _reply(self) -> None:
        await self.send_turn(self.options.reply_ms)

    async def _auto_reply(self) -> None:
        await self.input_transcription(f"(caller audio {int(self.audio_in_ms)} ms)")
        await self.send_turn(self.options.reply_ms, transcript="I heard you.")


@dataclass
class FakeGeminiServer(Notifier):
    options: FakeOptions
    port: int = 0
    connections: list[FakeGeminiConnection] = field(default_factory=list)
    sessions: list[FakeGeminiSession] = field(default_factory=list)
    handles: dict[str, FakeGeminiSession] = field(default_factory=dict)
    #: When set, refuse every new connection's setup with this close code.
    refuse_setup_code: int | None = None
    _changed: trio.Event = field(default_factory=trio.Event)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{PATH}"

    @property
    def api_key(self) -> str:
        return self.options.api_key

    async def wait_for_connection(
        self, index: int = 0, timeout: float = 5.0
    ) -> FakeGeminiConnection:
        """The ``index``-th connection once its setupComplete went out."""
        await self._wait_until(lambda: len(self.connections) > index, timeout)
        conn = self.connections[index]
        await conn.wait_setup(timeout)
        return conn

    async def handler(self, request: WebSocketRequest) -> None:
        _, path, query = request_parts(request)
        if path != PATH:
            await request.reject(404)
            return
        ws = await request.accept()
        conn = FakeGeminiConnection(self, ws, query, len(self.connections))
        self.connections.append(conn)
        self._notify()
        try:
            if query.get("key") != self.options.api_key:
                await conn.refuse("API key not valid. Please pass a valid API key.", code=1008)
                return
            if self.refuse_setup_code is not None:
                await conn.refuse("refused by test", code=self.refuse_setup_code)
                return
            await conn._serve()
        finally:
            conn._mark_closed(conn.close_code or 1006, conn.close_reason)
            self._notify()


def fake_gemini_server(
    options: FakeOptions | None = None, **kwargs: Any
) -> AbstractAsyncContextManager[FakeGeminiServer]:
    """Run a fake Gemini Live server on 127.0.0.1 (random port) for the body."""
    return serve_trio_fake(
        FakeGeminiServer(options if options is not None else FakeOptions(**kwargs))
    )
