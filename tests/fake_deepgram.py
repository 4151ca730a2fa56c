"""A local fake of the Deepgram Voice Agent API V1 (``/v1/agent/converse``).

Speaks the documented protocol and refuses what the real service refuses:

* the handshake needs ``Authorization: Token <api_key>`` (401 otherwise); ``Welcome`` on
  connect;
* the first message must be ``Settings`` (JSON); audio before it is refused (``Error``,
  close); ``Settings`` is validated (encodings, sample rates, think provider); without an
  input format the API default (linear16 16 kHz) applies;
* audio must come as **binary** frames: a text message that is not a known JSON control
  message (e.g. audio as JSON) is refused with ``Error`` and a close;
* a ``FunctionCallResponse`` for an id that was never requested (or answered twice) is
  refused (``Error``); one for a cancelled call is dropped (recorded in ``late_responses``);
* with ``idle_timeout_s``, no audio and no ``KeepAlive`` for that long -> ``Error``
  ``CLIENT_MESSAGE_TIMEOUT`` and a close, as the real service does after ~10 s.

Everything refused is recorded in ``refusals``. Scripted by tests through
:class:`FakeDGSession` (responses as binary audio between ``ConversationText`` /
``AgentStartedSpeaking`` and ``AgentAudioDone``, barge-in, function calls and
cancellations, errors, warnings) and the connection controls of
:class:`fake_vendor_ws.WsPeer` (stall, vanish, abort, close). Automatic modes: the greeting
(``greeting_ms``), ``auto_reply_after_ms``, ``tool_followup_ms``.

Deepgram has no session resumption: every connection is a new :class:`FakeDGSession`.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import trio
from fake_vendor_ws import FakeWsOptions, FakeWsServer, WsPeer, serve_fake, tone

__all__ = ["FakeDGOptions", "FakeDGSession", "FakeDeepgramServer", "fake_deepgram_server"]

DEFAULT_KEY = "dg-test-key-0123456789abcdef"
ENCODINGS = {"linear16", "mulaw", "alaw", "flac", "opus", "mp3", "aac"}
CONTROL_TYPES = {
    "Settings",
    "KeepAlive",
    "FunctionCallResponse",
    "InjectAgentMessage",
    "InjectUserMessage",
    "UpdatePrompt",
    "UpdateSpeak",
    "UpdateThink",
    "UpdateListen",
}


@dataclass
class FakeDGOptions(FakeWsOptions):
    api_key: str = DEFAULT_KEY
    #: Speak the configured greeting as this much audio (0: no greeting audio).
    greeting_ms: int = 400
    auto_reply_after_ms: int = 0
    auto_reply_ms: int = 600
    auto_reply_transcript: str = "I heard you."
    #: After an accepted FunctionCallResponse: a response of this much audio (0: none).
    tool_followup_ms: int = 300
    chunk_ms: int = 100
    pace_s: float = 0.0
    tone_hz: float = 440.0
    #: Close sessions that send neither audio nor KeepAlive for this long (None: never).
    idle_timeout_s: float | None = None
    #: Refuse every Settings with this Error code.
    reject_settings: str | None = None


def _fmt(part: Any, default: str) -> str:
    if not isinstance(part, dict):
        return default
    return f"{part.get('encoding', 'linear16')}@{part.get('sample_rate', 16000)}"


class FakeDGSession:
    """One connection = one Voice Agent session."""

    def __init__(self, server: FakeDeepgramServer, peer: WsPeer, index: int) -> None:
        self.server = server
        self.peer = peer
        self.index = index
        self.settings: dict[str, Any] = {}
        self.configured = False
        self.received: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any] | bytes] = []
        self.audio_in = bytearray()
        self.audio_frames = 0
        self.keepalives = 0
        self.refusals: list[dict[str, Any]] = []
        self.function_requests: dict[str, dict[str, Any]] = {}
        self.function_responses: list[dict[str, Any]] = []
        self.cancelled: set[str] = set()
        self.late_responses: list[dict[str, Any]] = []
        self.last_input = trio.current_time()
        self._response_scope: trio.CancelScope | None = None
        self._auto_pending_ms = 0.0
        self._ids = itertools.count(1)

    @property
    def options(self) -> FakeDGOptions:
        return self.server.options

    @property
    def input_format(self) -> str:
        return _fmt(self.settings.get("audio", {}).get("input"), "linear16@16000")

    @property
    def output_format(self) -> str:
        out = self.settings.get("audio", {}).get("output")
        return _fmt(out, "linear16@24000") + (
            f"/{out.get('container', 'none')}" if isinstance(out, dict) else "/none"
        )

    @property
    def prompt(self) -> str:
        return str(self.settings.get("agent", {}).get("think", {}).get("prompt", ""))

    @property
    def audio_in_ms(self) -> float:
        return len(self.audio_in) / (8 if self.input_format == "mulaw@8000" else 32)

    @property
    def closed(self) -> bool:
        return self.peer.closed

    def events_of(self, etype: str) -> list[dict[str, Any]]:
        return [e for e in self.received if e.get("type") == etype]

    async def wait_for(
        self, predicate: Callable[[FakeDGSession], bool], timeout: float = 5.0
    ) -> None:
        await self.server.wait_for(lambda: predicate(self), timeout)

    # -- sending -----------------------------------------------------------------------------
    async def send(self, event: dict[str, Any]) -> None:
        self.sent.append(event)
        await self.peer.send_json(event)

    async def send_audio(self, data: bytes) -> None:
        self.sent.append(data)
        await self.peer.send_bytes(data)

    async def fatal(self, code: str, description: str, event: Any = None) -> None:
        """Refuse: ``Error`` (fatal by the docs) and close."""
        self.refusals.append({"code": code, "description": description, "event": event})
        self.server.notify()
        await self.send({"type": "Error", "code": code, "description": description})
        await self.peer.close(1008, code)

    async def send_error(self, code: str = "FAKE_ERROR", description: str = "fake") -> None:
        await self.send({"type": "Error", "code": code, "description": description})

    async def send_warning(self, code: str = "FAKE_WARNING", description: str = "fake") -> None:
        await self.send({"type": "Warning", "code": code, "description": description})

    async def user_started_speaking(self, *, interrupt: bool = True) -> None:
        """Barge-in: the response in progress stops right here (no more of its audio)."""
        if interrupt and self._response_scope is not None:
            self._response_scope.cancel()
            self._response_scope = None
        await self.send({"type": "UserStartedSpeaking"})

    async def user_text(self, text: str) -> None:
        await self.send({"type": "ConversationText", "role": "user", "content": text})

    async def send_response(
        self,
        ms: int = 500,
        *,
        audio: bytes | None = None,
        transcript: str = "Hello from the fake agent.",
        chunk_ms: int | None = None,
        pace_s: float | None = None,
    ) -> None:
        """ConversationText(assistant), AgentStartedSpeaking, binary audio, AgentAudioDone.
        Interruptible by :meth:`user_started_speaking`."""
        data = audio if audio is not None else tone(ms, "pcmu", self.options.tone_hz)
        chunk = max(1, (chunk_ms or self.options.chunk_ms) * 8)
        pace = self.options.pace_s if pace_s is None else pace_s
        await self.send({"type": "ConversationText", "role": "assistant", "content": transcript})
        await self.send({"type": "AgentStartedSpeaking", "total_latency": 0.1, "tts_latency": 0.05})
        with trio.CancelScope() as scope:
            self._response_scope = scope
            for i in range(0, len(data), chunk):
                await self.send_audio(data[i : i + chunk])
                if pace:
                    await trio.sleep(pace)
            await self.send({"type": "AgentAudioDone"})
        if self._response_scope is scope:
            self._response_scope = None

    async def function_call(
        self, name: str, arguments: dict[str, Any], *, client_side: bool = True
    ) -> str:
        call_id = f"fc_{self.index}_{next(self._ids):04d}"
        self.function_requests[call_id] = {"name": name, "arguments": arguments}
        await self.send(
            {
                "type": "FunctionCallRequest",
                "functions": [
                    {
                        "id": call_id,
                        "name": name,
                        "arguments": orjson.dumps(arguments).decode(),
                        "client_side": client_side,
                    }
                ],
            }
        )
        return call_id

    async def cancel_function_call(self, call_id: str) -> None:
        self.cancelled.add(call_id)
        await self.send(
            {"type": "FunctionCallCancelled", "functions": [{"id": call_id, "name": "?"}]}
        )

    # -- receiving ---------------------------------------------------------------------------
    async def on_binary(self, data: bytes) -> None:
        if not self.configured:
            await self.fatal("SETTINGS_REQUIRED", "audio before Settings", "binary")
            return
        self.audio_frames += 1
        self.audio_in += data
        self.last_input = trio.current_time()
        if self.options.auto_reply_after_ms:
            self._auto_pending_ms += len(data) / 8
            if self._auto_pending_ms >= self.options.auto_reply_after_ms:
                self._auto_pending_ms = 0.0
                self._spawn(self._auto_reply)

    async def _auto_reply(self) -> None:
        await self.user_started_speaking()
        await self.user_text(f"(caller audio {int(self.audio_in_ms)} ms)")
        await self.send_response(
            self.options.auto_reply_ms, transcript=self.options.auto_reply_transcript
        )

    async def on_text(self, text: str) -> None:
        try:
            event = orjson.loads(text)
        except orjson.JSONDecodeError:
            event = None
        if not isinstance(event, dict) or event.get("type") not in CONTROL_TYPES:
            # e.g. audio sent as JSON: Deepgram takes audio only as binary frames
            await self.fatal("UNPARSABLE_CLIENT_MESSAGE", "not a client message", text[:200])
            return
        self.received.append(event)
        etype = event["type"]
        if etype == "Settings":
            await self._on_settings(event)
        elif not self.configured:
            await self.fatal("SETTINGS_REQUIRED", f"{etype} before Settings", event)
        elif etype == "KeepAlive":
            self.keepalives += 1
            self.last_input = trio.current_time()
        elif etype == "FunctionCallResponse":
            await self._on_function_response(event)
        self.server.notify()

    async def _on_settings(self, event: dict[str, Any]) -> None:
        if self.configured:
            await self.fatal("SETTINGS_ALREADY_APPLIED", "Settings sent twice", event)
            return
        problem = _settings_problem(event)
        if problem is None and self.options.reject_settings:
            problem = self.options.reject_settings
        if problem is not None:
            await self.fatal("INVALID_SETTINGS", problem, event)
            return
        self.settings = event
        self.configured = True
        self.last_input = trio.current_time()
        await self.send({"type": "SettingsApplied"})
        greeting = event.get("agent", {}).get("greeting")
        if greeting and self.options.greeting_ms:
            self._spawn(self.send_response, self.options.greeting_ms, transcript=greeting)

    async def _on_function_response(self, event: dict[str, Any]) -> None:
        call_id = event.get("id")
        if isinstance(call_id, str) and call_id in self.cancelled:
            self.late_responses.append(event)  # "a late response is dropped"
            return
        request = self.function_requests.pop(call_id, None) if isinstance(call_id, str) else None
        if request is None:
            await self.fatal("INVALID_FUNCTION_CALL_ID", f"no function call {call_id!r}", event)
            return
        if event.get("name") != request["name"] or not isinstance(event.get("content"), str):
            await self.fatal("INVALID_FUNCTION_CALL_RESPONSE", "name/content mismatch", event)
            return
        self.function_responses.append(event)
        if self.options.tool_followup_ms:
            self._spawn(self.send_response, self.options.tool_followup_ms, transcript="Done.")

    async def idle_watch(self) -> None:
        timeout = self.options.idle_timeout_s
        if timeout is None:
            return
        while not self.peer.closed:
            await trio.sleep(min(0.05, timeout / 4))
            if self.configured and trio.current_time() - self.last_input > timeout:
                self.refusals.append({"code": "CLIENT_MESSAGE_TIMEOUT"})
                await self.send(
                    {
                        "type": "Error",
                        "code": "CLIENT_MESSAGE_TIMEOUT",
                        "description": "no audio or KeepAlive received",
                    }
                )
                await self.peer.close(1011, "idle")
                return

    def _spawn(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        nursery = self.peer.nursery
        if nursery is None:
            return

        async def run() -> None:
            try:
                await fn(*args, **kwargs)
            except trio.Cancelled:
                raise
            except Exception:  # the connection went away mid-response
                pass

        nursery.start_soon(run)


def _settings_problem(event: dict[str, Any]) -> str | None:
    audio = event.get("audio", {})
    if not isinstance(audio, dict):
        return "audio must be an object"
    for direction in ("input", "output"):
        part = audio.get(direction)
        if part is None:
            continue
        if not isinstance(part, dict) or part.get("encoding") not in ENCODINGS:
            return f"unsupported {direction} encoding {part!r}"
        rate = part.get("sample_rate")
        if rate is not None and (not isinstance(rate, int) or rate <= 0):
            return f"bad {direction} sample_rate {rate!r}"
    out = audio.get("output")
    if isinstance(out, dict) and out.get("container", "none") not in ("none", "wav", "ogg"):
        return f"bad container {out.get('container')!r}"
    agent = event.get("agent")
    if not isinstance(agent, dict):
        return "agent must be an object"
    think = agent.get("think")
    if not isinstance(think, dict) or not isinstance(think.get("provider"), dict):
        return "agent.think.provider is required"
    if not think["provider"].get("type"):
        return "agent.think.provider.type is required"
    for fn in think.get("functions", []) or []:
        if not isinstance(fn, dict) or not fn.get("name") or "type" in fn:
            return f"bad function {fn!r}"
    for key in ("listen", "speak"):
        part = agent.get(key)
        if part is not None and not isinstance(part, dict | list):
            return f"agent.{key} must be an object"
    return None


class FakeDeepgramServer(FakeWsServer):
    path = "/v1/agent/converse"

    def __init__(self, options: FakeDGOptions) -> None:
        super().__init__(options)
        self.options: FakeDGOptions = options
        self.sessions: list[FakeDGSession] = []

    def authorize(self, headers: dict[str, str], query: dict[str, str]) -> tuple[int, str] | None:
        if headers.get("authorization") != f"Token {self.options.api_key}":
            return (401, "INVALID_AUTH")
        return None

    async def wait_for_session(self, index: int = 0, timeout: float = 5.0) -> FakeDGSession:
        """The ``index``-th session once its Settings were applied."""
        await self.wait_for(
            lambda: len(self.sessions) > index and self.sessions[index].configured, timeout
        )
        return self.sessions[index]

    async def serve_peer(self, peer: WsPeer) -> None:
        session = FakeDGSession(self, peer, len(self.sessions))
        self.sessions.append(session)
        self.notify()
        await session.send({"type": "Welcome", "request_id": f"req-{session.index:04d}"})
        assert peer.nursery is not None
        peer.nursery.start_soon(session.idle_watch)
        try:
            async for message in peer.messages():
                if isinstance(message, bytes):
                    await session.on_binary(message)
                else:
                    await session.on_text(message)
                self.notify()
        finally:
            if session._response_scope is not None:
                session._response_scope.cancel()
            self.notify()


@asynccontextmanager
async def fake_deepgram_server(
    options: FakeDGOptions | None = None, **kwargs: Any
) -> AsyncIterator[FakeDeepgramServer]:
    """Run a fake Voice Agent server on 127.0.0.1 (random port) for the ``async with``
    body. Keyword arguments are :class:`FakeDGOptions` fields."""
    opts = options if options is not None else FakeDGOptions(**kwargs)
    async with serve_fake(FakeDeepgramServer(opts)) as server:
        yield server


def agent_config(server: FakeDeepgramServer, **extra: Any) -> dict[str, Any]:
    """An ``[agents.NAME]`` table for a deepgram agent talking to ``server``."""
    return {
        "type": "deepgram",
        "url": server.url,
        "api_key": server.api_key,
        "connect_timeout_s": 5.0,
        **extra,
    }
