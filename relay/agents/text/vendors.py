"""Cloud speech services of the cascaded agent: streaming STT (Deepgram, AssemblyAI, Sarvam)
and streaming TTS (Deepgram Aura, ElevenLabs, OpenAI, Sarvam Bulbul), each behind
:mod:`relay.agents.text.speech`. Wire facts: ``shared/reference/text-agents-and-twiml-speech.md``.

Each vendor has a small sans-IO part (URL, headers, messages out; ``parse`` for messages
in) and uses the relay's own WebSocket client (``relay.media.websocket.connect``) with the
liveness watchdog, or ``httpx`` for OpenAI speech. Every URL and key comes from the
config (``stt_url``, ``stt_api_key``, ``tts_url``, ``tts_api_key``; vendor environment
variables as fallback), so tests point them at local fakes.

Audio: μ-law 8 kHz goes to Deepgram and AssemblyAI untouched (Deepgram per Twilio frame,
AssemblyAI batched to 60 ms: it refuses frames under 50 ms); Sarvam STT gets PCM16 8 kHz.
Deepgram Aura, ElevenLabs (``ulaw_8000``) and Sarvam (``mulaw`` at 8000) are asked for
μ-law 8 kHz; OpenAI speech only has PCM 24 kHz, resampled with ``relay.media.codec``.

Cancel (barge-in): Aura ``Clear`` (audio until ``Cleared`` is dropped); ElevenLabs and
Sarvam use one socket per reply (opened at ``begin``, while the model thinks) and close it;
OpenAI's request for the clause in flight is cancelled (its response closed).
"""

from __future__ import annotations

import base64
import logging
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import orjson
import trio

from ...errors import AgentError, ConfigError, ConnectionClosed, RelayError
from ...media import codec, websocket
from ...netguard import AddressRefused, http_target
from ..liveness import LivenessOptions, run_connection
from ..options import api_key, env_fallback, env_fallback_allowed, option_int, option_str
from .speech import (
    EventQueue,
    SpeechToText,
    SttEndOfTurn,
    SttEvent,
    SttPartial,
    SttSpeechStarted,
    TextToSpeech,
    TtsAudio,
    TtsDone,
    TtsEvent,
)

__all__ = ["STT", "TTS"]

log = logging.getLogger("relay.agents.text.vendors")


def _key(options: Mapping[str, Any], key: str, env: str, vendor: str) -> str:
    # relay.agents.options.api_key: the environment fallback only for relay.toml agents
    value = api_key(options, env, vendor, key=key)
    if any(not (0x20 < ord(c) < 0x7F) for c in value):
        raise ConfigError(f"agents.*.{key}: contains whitespace or non-printable characters")
    return value


def _ws_url(options: Mapping[str, Any], key: str, default: str) -> str:
    url = option_str(options, key, default)
    if urlsplit(url).scheme not in ("ws", "wss"):
        raise ConfigError(f"agents.*.{key}: must be ws:// or wss://, got {url!r}")
    return url


def _with_query(url: str, params: Mapping[str, Any]) -> str:
    sep = "&" if urlsplit(url).query else "?"
    return url + sep + urlencode({k: v for k, v in params.items() if v is not None and v != ""})


async def _open(url: str, headers: list[tuple[str, str]], timeout: float) -> websocket.WebSocket:
    try:
        return await websocket.connect(url, headers, timeout=timeout, send_timeout=2.0)
    except trio.TooSlowError:
        raise AgentError(f"{_safe(url)}: connect timed out", kind="agent_connect_timeout") from None
    except AddressRefused:  # relay.netguard: a tenant's agent aimed at a private address
        raise
    except (OSError, RelayError, trio.BrokenResourceError, ValueError) as exc:
        raise AgentError(f"{_safe(url)}: connect failed: {exc}", kind="agent_connect") from exc


async def _race(*fns: Callable[[], Any]) -> None:
    """Run ``fns`` together until one fails; re-raise its ConnectionClosed/AgentError as is
    (the agent's contract), never an ExceptionGroup."""
    failure: list[BaseException] = []

    async def guard(fn: Callable[[], Any]) -> None:
        try:
            await fn()
        except (ConnectionClosed, AgentError) as exc:
            failure.append(exc)
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for fn in fns:
            nursery.start_soon(guard, fn)
    if failure:
        raise failure[0]


def _safe(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _json(message: str | bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(message)
    except orjson.JSONDecodeError:
        raise AgentError(f"not JSON: {message[:80]!r}", kind="agent_protocol") from None
    if not isinstance(obj, dict):
        raise AgentError("not a JSON object", kind="agent_protocol")
    return obj


# --- streaming STT over one WebSocket ----------------------------------------------------
class _WsSTT(SpeechToText):
    def __init__(self, url: str, headers: list[tuple[str, str]], timeout: float) -> None:
        self.url = url
        self.headers = headers
        self.timeout = timeout
        self.ws: websocket.WebSocket | None = None
        self._events: EventQueue[SttEvent] = EventQueue()
        self.liveness = LivenessOptions()

    async def connect(self) -> None:
        self.ws = await _open(self.url, self.headers, self.timeout)

    def _socket(self) -> websocket.WebSocket:
        if self.ws is None:
            raise ConnectionClosed(1006, "not connected")
        return self.ws

    def _idle(self) -> None:  # keep-alive hook
        return None

    async def run(self) -> None:
        ws = self._socket()
        await _race(
            partial(self._reader, ws),
            partial(run_connection, ws, self.liveness.with_keepalive(4.0), on_idle=self._idle),
        )

    async def _reader(self, ws: websocket.WebSocket) -> None:
        while True:
            for message in await ws.receive():
                events = self.parse(message)
                if events:
                    self._events.put(*events)

    def parse(self, message: str | bytes) -> list[SttEvent]:
        raise NotImplementedError

    async def receive(self) -> list[SttEvent]:
        return await self._events.get_batch()

    def _goodbye(self) -> str | None:
        return None

    async def aclose(self) -> None:
        self._events.close()
        ws, self.ws = self.ws, None
        if ws is None:
            return
        with trio.move_on_after(1.0):
            try:
                bye = self._goodbye()
                if bye:
                    ws.send_text_nowait(bye)
                await ws.aclose()
            except Exception:
                log.debug("stt close", exc_info=True)
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(ws.stream)


class DeepgramSTT(_WsSTT):
    """``/v1/listen``: μ-law 8 kHz binary frames; finals assembled until ``speech_final``
    or ``UtteranceEnd`` (whichever first); ``SpeechStarted`` is the barge-in signal."""

    name = "deepgram"
    DEFAULT_URL = "wss://api.deepgram.com/v1/listen"

    def __init__(self, options: Mapping[str, Any]) -> None:
        params = {
            "model": option_str(options, "stt_model", "nova-3"),
            "language": option_str(options, "stt_language", "en"),
            "encoding": "mulaw",
            "sample_rate": 8000,
            "channels": 1,
            "interim_results": "true",
            "endpointing": option_int(options, "stt_endpointing_ms", 300),
            "utterance_end_ms": 1000,
            "vad_events": "true",
            "smart_format": "true",
        }
        url = _with_query(_ws_url(options, "stt_url", self.DEFAULT_URL), params)
        key = _key(options, "stt_api_key", "DEEPGRAM_API_KEY", "deepgram")
        super().__init__(url, [("Authorization", f"Token {key}")], _timeout(options))
        self._finals: list[str] = []

    def send_audio(self, ulaw: bytes) -> None:
        if self.ws is not None:
            self.ws.send_bytes_nowait(ulaw)

    def _idle(self) -> None:
        if self.ws is not None:
            self.ws.send_text_nowait('{"type":"KeepAlive"}')

    def _goodbye(self) -> str:
        return '{"type":"CloseStream"}'

    def parse(self, message: str | bytes) -> list[SttEvent]:
        msg = _json(message)
        kind = msg.get("type")
        if kind == "SpeechStarted":
            return [SttSpeechStarted()]
        if kind == "UtteranceEnd":
            return self._turn_end()
        if kind != "Results":
            return []
        alts = (msg.get("channel") or {}).get("alternatives") or [{}]
        text = str(alts[0].get("transcript") or "").strip()
        out: list[SttEvent] = []
        if msg.get("is_final"):
            if text:
                self._finals.append(text)
            if msg.get("speech_final"):
                out += self._turn_end()
        elif text:
            out.append(SttPartial(" ".join([*self._finals, text])))
        return out

    def _turn_end(self) -> list[SttEvent]:
        if not self._finals:
            return []
        text, self._finals = " ".join(self._finals), []
        return [SttEndOfTurn(text, time.perf_counter())]


class AssemblyAISTT(_WsSTT):
    """Universal-Streaming v3: μ-law 8 kHz in binary frames of >= 50 ms (60 ms here);
    ``Turn`` with ``end_of_turn`` ends a turn (once per ``turn_order``); ``Terminate``
    at the end (sessions are billed until then)."""

    name = "assemblyai"
    DEFAULT_URL = "wss://streaming.assemblyai.com/v3/ws"
    BATCH = 480  # 60 ms of μ-law

    def __init__(self, options: Mapping[str, Any]) -> None:
        params = {
            "sample_rate": 8000,
            "encoding": "pcm_mulaw",
            "speech_model": option_str(options, "stt_model", "universal-streaming-english"),
            "format_turns": "false",
        }
        url = _with_query(_ws_url(options, "stt_url", self.DEFAULT_URL), params)
        key = _key(options, "stt_api_key", "ASSEMBLYAI_API_KEY", "assemblyai")
        super().__init__(url, [("Authorization", key)], _timeout(options))
        self._batch = bytearray()
        self._ended: set[int] = set()

    def send_audio(self, ulaw: bytes) -> None:
        self._batch += ulaw
        if len(self._batch) >= self.BATCH and self.ws is not None:
            self.ws.send_bytes_nowait(bytes(self._batch))
            self._batch.clear()

    def _goodbye(self) -> str:
        return '{"type":"Terminate"}'

    def parse(self, message: str | bytes) -> list[SttEvent]:
        msg = _json(message)
        kind = msg.get("type")
        if kind == "SpeechStarted":
            return [SttSpeechStarted()]
        if kind == "Error":
            raise AgentError(f"assemblyai: {msg.get('error')}", kind="agent_session")
        if kind != "Turn":
            return []
        text = str(msg.get("transcript") or "").strip()
        order = msg.get("turn_order")
        if msg.get("end_of_turn"):
            if isinstance(order, int) and order in self._ended:
                return []  # a formatted repeat of a turn already answered
            if isinstance(order, int):
                self._ended.add(order)
            return [SttEndOfTurn(text, time.perf_counter())]
        return [SttPartial(text)] if text else []


class SarvamSTT(_WsSTT):
    """Saaras streaming (``/speech-to-text/ws``): PCM16 8 kHz in JSON (base64),
    ``vad_signals``: ``START_SPEECH`` is the barge-in signal, the ``data`` transcript
    that follows a pause is the turn."""

    name = "sarvam"
    DEFAULT_URL = "wss://api.sarvam.ai/speech-to-text/ws"
    BATCH = 1600  # 100 ms of PCM16 8 kHz

    def __init__(self, options: Mapping[str, Any]) -> None:
        params = {
            "language-code": option_str(options, "stt_language", "en-IN"),
            "model": option_str(options, "stt_model", "saaras:v3"),
            "mode": "transcribe",
            "sample_rate": 8000,
            "input_audio_codec": "pcm_s16le",
            "vad_signals": "true",
            "high_vad_sensitivity": "true",
        }
        url = _with_query(_ws_url(options, "stt_url", self.DEFAULT_URL), params)
        key = _key(options, "stt_api_key", "SARVAM_API_KEY", "sarvam")
        super().__init__(url, [("Api-Subscription-Key", key)], _timeout(options))
        self._batch = bytearray()

    def send_audio(self, ulaw: bytes) -> None:
        self._batch += codec.ulaw_decode(ulaw)
        if len(self._batch) >= self.BATCH and self.ws is not None:
            data = base64.b64encode(bytes(self._batch)).decode()
            self._batch.clear()
            self.ws.send_text_nowait(
                orjson.dumps(
                    {"audio": {"data": data, "sample_rate": "8000", "encoding": "audio/wav"}}
                ).decode()
            )

    def parse(self, message: str | bytes) -> list[SttEvent]:
        msg = _json(message)
        kind = msg.get("type")
        data: dict[str, Any] = msg["data"] if isinstance(msg.get("data"), dict) else {}
        if kind == "events":
            signal = data.get("signal_type") or data.get("event_type")
            return [SttSpeechStarted()] if signal == "START_SPEECH" else []
        if kind == "data":
            return [SttEndOfTurn(str(data.get("transcript") or ""), time.perf_counter())]
        if kind == "error":
            raise AgentError(f"sarvam: {data.get('error') or data}", kind="agent_session")
        return []


# --- TTS: Deepgram Aura on one socket ----------------------------------------------------
class DeepgramTTS(TextToSpeech):
    """Aura WebSocket (``/v1/speak``, μ-law 8 kHz binary audio). ``Flush`` is capped (20
    per minute): it is sent after the first clause of a reply (so speech starts at once)
    and at its end; ``Flushed`` of the final one means the reply is complete. Barge-in:
    ``Clear``; audio until ``Cleared`` belongs to the cancelled reply and is dropped."""

    name = "deepgram"
    DEFAULT_URL = "wss://api.deepgram.com/v1/speak"

    def __init__(self, options: Mapping[str, Any]) -> None:
        params = {
            "model": option_str(
                options, "tts_voice", option_str(options, "tts_model", "aura-2-thalia-en")
            ),
            "encoding": "mulaw",
            "sample_rate": 8000,
            "container": "none",
        }
        self.url = _with_query(_ws_url(options, "tts_url", self.DEFAULT_URL), params)
        key = _key(options, "tts_api_key", "DEEPGRAM_API_KEY", "deepgram")
        self.headers = [("Authorization", f"Token {key}")]
        self.timeout = _timeout(options)
        self.ws: websocket.WebSocket | None = None
        self._events: EventQueue[TtsEvent] = EventQueue()
        self._current: str | None = None  # the reply whose audio arrives now
        self._flushes: deque[tuple[str, bool]] = deque()  # (rid, final) per Flush sent
        self._flushed_first: set[str] = set()
        self._clearing = 0
        self.flush_count = 0

    async def connect(self) -> None:
        self.ws = await _open(self.url, self.headers, self.timeout)

    def _send(self, obj: dict[str, Any]) -> None:
        if self.ws is not None:
            self.ws.send_text_nowait(orjson.dumps(obj).decode())

    def speak(self, response_id: str, clause: int, text: str) -> None:
        self._current = response_id
        self._send({"type": "Speak", "text": text})
        if response_id not in self._flushed_first:
            self._flushed_first.add(response_id)
            self._flush(response_id, final=False)

    def _flush(self, response_id: str, final: bool) -> None:
        self._flushes.append((response_id, final))
        self.flush_count += 1
        self._send({"type": "Flush"})

    def end(self, response_id: str) -> None:
        if response_id not in self._flushed_first:  # a reply with no text at all
            self._events.put(TtsDone(response_id))
            return
        self._flush(response_id, final=True)

    def cancel(self, response_id: str) -> None:
        if self._current == response_id or any(rid == response_id for rid, _ in self._flushes):
            self._clearing += 1
            self._current = None
            self._flushes = deque(f for f in self._flushes if f[0] != response_id)
            self._send({"type": "Clear"})

    async def run(self) -> None:
        ws = self.ws
        assert ws is not None
        await _race(partial(self._reader, ws), partial(run_connection, ws, LivenessOptions()))

    async def _reader(self, ws: websocket.WebSocket) -> None:
        while True:
            for message in await ws.receive():
                if isinstance(message, bytes):
                    if self._clearing or self._current is None:
                        continue
                    self._events.put(TtsAudio(self._current, message, None, time.perf_counter()))
                    continue
                msg = _json(message)
                kind = msg.get("type")
                if kind == "Cleared":
                    self._clearing = max(0, self._clearing - 1)
                elif kind == "Flushed" and self._flushes:
                    rid, final = self._flushes.popleft()
                    if final:
                        self._events.put(TtsDone(rid))
                elif kind == "Error":
                    raise AgentError(
                        f"deepgram tts: {msg.get('description')}", kind="agent_session"
                    )
                elif kind == "Warning":
                    log.warning("deepgram tts warning: %s", msg.get("description"))

    async def receive(self) -> list[TtsEvent]:
        return await self._events.get_batch()

    async def aclose(self) -> None:
        self._events.close()
        ws, self.ws = self.ws, None
        if ws is not None:
            with trio.move_on_after(1.0):
                try:
                    ws.send_text_nowait('{"type":"Close"}')
                    await ws.aclose()
                except Exception:
                    log.debug("tts close", exc_info=True)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(ws.stream)


# --- TTS with one socket per reply (ElevenLabs, Sarvam) ---------------------------------------
@dataclass
class _ReplySocket:
    rid: str
    pending: list[str] = field(default_factory=list)
    ws: websocket.WebSocket | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    ended: bool = False
    cancelled: bool = False
    flushes: int = 0
    finals: int = 0


class _PerReplyTTS(TextToSpeech):
    """A socket per reply, opened at :meth:`begin` (while the model thinks) and closed at
    its end; cancelling a reply closes its socket, so late audio cannot be mistaken for
    the next reply's."""

    def __init__(self, url: str, headers: list[tuple[str, str]], timeout: float) -> None:
        self.url = url
        self.headers = headers
        self.timeout = timeout
        self._events: EventQueue[TtsEvent] = EventQueue()
        self._replies: dict[str, _ReplySocket] = {}
        self._spawn: list[_ReplySocket] = []
        self._wake = trio.Event()
        self.connects = 0

    async def connect(self) -> None:
        return None  # per reply

    def begin(self, response_id: str) -> None:
        reply = self._replies.get(response_id)
        if reply is None:
            reply = self._replies[response_id] = _ReplySocket(response_id)
            self._spawn.append(reply)
            self._wake.set()

    def _send(self, reply: _ReplySocket, text: str) -> None:
        if reply.ws is None:
            reply.pending.append(text)
        else:
            reply.ws.send_text_nowait(text)

    def speak(self, response_id: str, clause: int, text: str) -> None:
        self.begin(response_id)
        reply = self._replies[response_id]
        for message in self.text_messages(reply, text):
            self._send(reply, message)

    def end(self, response_id: str) -> None:
        self.begin(response_id)
        reply = self._replies[response_id]
        reply.ended = True
        for message in self.end_messages(reply):
            self._send(reply, message)
        if reply.flushes == 0 and not reply.cancelled:
            self._done(reply)

    def cancel(self, response_id: str) -> None:
        reply = self._replies.get(response_id)
        if reply is not None:
            reply.cancelled = True
            reply.scope.cancel()

    def _done(self, reply: _ReplySocket) -> None:
        if not reply.cancelled:
            self._events.put(TtsDone(reply.rid))
        reply.cancelled = True
        reply.scope.cancel()
        self._replies.pop(reply.rid, None)

    async def run(self) -> None:
        failure: list[BaseException] = []

        async def serve(reply: _ReplySocket) -> None:
            try:
                await self._serve(reply)
            except (AgentError, ConnectionClosed) as exc:
                failure.append(exc)
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            while True:
                while self._spawn:
                    nursery.start_soon(serve, self._spawn.pop(0))
                self._wake = trio.Event()
                await self._wake.wait()
        if failure:
            raise failure[0]

    async def _serve(self, reply: _ReplySocket) -> None:
        with reply.scope:
            ws = await _open(self.url, self.headers, self.timeout)
            self.connects += 1
            try:
                for message in self.start_messages():
                    ws.send_text_nowait(message)
                reply.ws = ws
                for message in reply.pending:
                    ws.send_text_nowait(message)
                reply.pending.clear()
                while True:
                    try:
                        batch = await ws.receive()
                    except ConnectionClosed:
                        if reply.ended:
                            self._done(reply)
                            return
                        raise
                    for incoming in batch:
                        self.on_message(reply, incoming)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(ws.stream)

    def start_messages(self) -> list[str]:
        raise NotImplementedError

    def text_messages(self, reply: _ReplySocket, text: str) -> list[str]:
        raise NotImplementedError

    def end_messages(self, reply: _ReplySocket) -> list[str]:
        raise NotImplementedError

    def on_message(self, reply: _ReplySocket, message: str | bytes) -> None:
        raise NotImplementedError

    def _audio(self, reply: _ReplySocket, ulaw: bytes) -> None:
        if not reply.cancelled and ulaw:
            self._events.put(TtsAudio(reply.rid, ulaw, None, time.perf_counter()))

    async def receive(self) -> list[TtsEvent]:
        return await self._events.get_batch()

    async def aclose(self) -> None:
        self._events.close()
        for reply in list(self._replies.values()):
            reply.cancelled = True
            reply.scope.cancel()


class ElevenLabsTTS(_PerReplyTTS):
    """Stream-input WebSocket, ``output_format=ulaw_8000``: one context (socket) per reply;
    each clause is sent with ``flush`` (audio now, not after 120 characters);
    ``{"text": ""}`` ends the reply, ``isFinal`` confirms its last audio."""

    name = "elevenlabs"
    DEFAULT_URL = "wss://api.elevenlabs.io/v1/text-to-speech/{voice}/stream-input"

    def __init__(self, options: Mapping[str, Any]) -> None:
        voice = option_str(options, "tts_voice", "21m00Tcm4TlvDq8ikWAM")
        base = _ws_url(options, "tts_url", self.DEFAULT_URL).replace(
            "{voice}", quote(voice, safe="")
        )
        url = _with_query(
            base,
            {
                "model_id": option_str(options, "tts_model", "eleven_flash_v2_5"),
                "output_format": "ulaw_8000",
            },
        )
        key = _key(options, "tts_api_key", "ELEVENLABS_API_KEY", "elevenlabs")
        super().__init__(url, [("xi-api-key", key)], _timeout(options))

    def start_messages(self) -> list[str]:
        return [
            orjson.dumps(
                {
                    "text": " ",
                    "voice_settings": {"stability": 0.5, "similarity_boost": 0.8},
                    "generation_config": {"chunk_length_schedule": [50, 120, 160, 250]},
                }
            ).decode()
        ]

    def text_messages(self, reply: _ReplySocket, text: str) -> list[str]:
        return [orjson.dumps({"text": text.strip() + " ", "flush": True}).decode()]

    def end_messages(self, reply: _ReplySocket) -> list[str]:
        reply.flushes = 1  # isFinal follows the end of the stream
        return ['{"text":""}']

    def on_message(self, reply: _ReplySocket, message: str | bytes) -> None:
        msg = _json(message)
        if msg.get("error") or (msg.get("message") and not msg.get("audio")):
            raise AgentError(
                f"elevenlabs: {msg.get('error') or msg.get('message')}", kind="agent_session"
            )
        audio = msg.get("audio")
        if isinstance(audio, str) and audio:
            self._audio(reply, base64.b64decode(audio))
        if msg.get("isFinal") or msg.get("is_final"):
            self._done(reply)


class SarvamTTS(_PerReplyTTS):
    """Bulbul WebSocket (``/text-to-speech/ws``): ``config`` first (8 kHz μ-law), then
    ``text`` + ``flush`` per clause; with ``send_completion_event`` each flush is confirmed
    by an ``event`` ``final`` (our reading: the reply is done when every flush was)."""

    name = "sarvam"
    DEFAULT_URL = "wss://api.sarvam.ai/text-to-speech/ws"

    def __init__(self, options: Mapping[str, Any]) -> None:
        model = option_str(options, "tts_model", "bulbul:v2")
        url = _with_query(
            _ws_url(options, "tts_url", self.DEFAULT_URL),
            {"model": model, "send_completion_event": "true"},
        )
        key = _key(options, "tts_api_key", "SARVAM_API_KEY", "sarvam")
        super().__init__(url, [("Api-Subscription-Key", key)], _timeout(options))
        self.config = {
            "target_language_code": option_str(options, "tts_language", "en-IN"),
            "speaker": option_str(options, "tts_voice", "anushka"),
            "speech_sample_rate": 8000,
            "output_audio_codec": "mulaw",
            "min_buffer_size": 30,
        }

    def start_messages(self) -> list[str]:
        return [orjson.dumps({"type": "config", "data": self.config}).decode()]

    def text_messages(self, reply: _ReplySocket, text: str) -> list[str]:
        reply.flushes += 1
        return [
            orjson.dumps({"type": "text", "data": {"text": text}}).decode(),
            '{"type":"flush"}',
        ]

    def end_messages(self, reply: _ReplySocket) -> list[str]:
        if reply.flushes and reply.finals >= reply.flushes:
            self._done(reply)
        return []

    def on_message(self, reply: _ReplySocket, message: str | bytes) -> None:
        msg = _json(message)
        kind = msg.get("type")
        data: dict[str, Any] = msg["data"] if isinstance(msg.get("data"), dict) else {}
        if kind == "audio":
            self._audio(reply, _strip_wav(base64.b64decode(str(data.get("audio") or ""))))
        elif kind == "event" and data.get("event_type") == "final":
            reply.finals += 1
            if reply.ended and reply.finals >= reply.flushes:
                self._done(reply)
        elif kind == "error":
            raise AgentError(f"sarvam tts: {data.get('message') or data}", kind="agent_session")


def _strip_wav(data: bytes) -> bytes:
    """Raw samples of a WAV chunk (some services wrap each chunk); raw data passes."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return data
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if cid == b"data":
            return data[pos + 8 : pos + 8 + size]
        pos += 8 + size
    return b""


# --- TTS: OpenAI speech over HTTP, one request per clause --------------------------------
class OpenAITTS(TextToSpeech):
    """``POST {tts_url}/audio/speech`` with ``response_format=pcm`` (24 kHz s16le, streamed):
    one request per clause, in order; resampled 3:1 to μ-law by the relay's codec.
    Cancel = the request in flight is cancelled (response closed)."""

    name = "openai"
    DEFAULT_URL = "https://api.openai.com/v1"

    def __init__(self, options: Mapping[str, Any]) -> None:
        url = option_str(options, "tts_url", self.DEFAULT_URL)
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"agents.*.tts_url: must be http(s)://..., got {url!r}")
        self.endpoint = url.rstrip("/") + "/audio/speech"
        self.api_key = _key(options, "tts_api_key", "OPENAI_API_KEY", "openai")
        self.model = option_str(options, "tts_model", "gpt-4o-mini-tts")
        self.voice = option_str(options, "tts_voice", "alloy")
        self.timeout = _timeout(options)
        self._events: EventQueue[TtsEvent] = EventQueue()
        self._queue: deque[tuple[str, int | None, str]] = deque()
        self._cancelled: set[str] = set()
        self._wake = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._current: str | None = None
        self._client: Any = None
        self.requests = 0

    async def connect(self) -> None:
        import httpx

        from .llm import _ssl_context

        self._client = httpx.AsyncClient(
            verify=_ssl_context(),
            timeout=httpx.Timeout(self.timeout, read=self.timeout),
            trust_env=False,
        )

    def speak(self, response_id: str, clause: int, text: str) -> None:
        self._queue.append((response_id, clause, text))
        self._wake.set()

    def end(self, response_id: str) -> None:
        self._queue.append((response_id, None, ""))
        self._wake.set()

    def cancel(self, response_id: str) -> None:
        self._cancelled.add(response_id)
        self._queue = deque(q for q in self._queue if q[0] != response_id)
        if self._current == response_id and self._scope is not None:
            self._scope.cancel()

    async def run(self) -> None:
        while True:
            if not self._queue:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            rid, clause, text = self._queue.popleft()
            if rid in self._cancelled:
                continue
            if clause is None:
                self._events.put(TtsDone(rid))
                continue
            self._current = rid
            with trio.CancelScope() as self._scope:
                await self._synthesize(rid, clause, text)
            self._current = None

    async def _synthesize(self, rid: str, clause: int, text: str) -> None:
        import httpx

        body = {"model": self.model, "input": text, "voice": self.voice, "response_format": "pcm"}
        to_ulaw = codec.PcmToUlaw(24000)
        odd = b""
        self.requests += 1
        # a tenant's agent (relay.netguard): checked at every request, connected to the
        # address checked; a refusal (AddressRefused, an AgentError) ends the agent
        url, headers, extensions = await http_target(
            self.endpoint,
            {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"},
            what="openai speech",
        )
        try:
            async with self._client.stream(
                "POST",
                url,
                content=orjson.dumps(body),
                headers=headers,
                extensions=extensions,
            ) as response:
                if response.status_code != 200:
                    detail = (await response.aread())[:200].decode("utf-8", "replace")
                    raise AgentError(
                        f"openai speech: HTTP {response.status_code}: {detail}",
                        kind="agent_session",
                    )
                async for chunk in response.aiter_raw():
                    data = odd + chunk
                    cut = len(data) - len(data) % 2
                    odd = data[cut:]
                    ulaw = to_ulaw.feed(data[:cut])
                    if ulaw and rid not in self._cancelled:
                        self._events.put(TtsAudio(rid, ulaw, clause, time.perf_counter()))
            tail = to_ulaw.flush()
            if tail and rid not in self._cancelled:
                self._events.put(TtsAudio(rid, tail, clause, time.perf_counter()))
        except (httpx.HTTPError, OSError) as exc:
            raise AgentError(f"openai speech failed: {exc}", kind="agent_disconnected") from exc

    async def receive(self) -> list[TtsEvent]:
        return await self._events.get_batch()

    async def aclose(self) -> None:
        self._events.close()
        if self._scope is not None:
            self._scope.cancel()
        if self._client is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await self._client.aclose()


# --- registry ---------------------------------------------------------------------------------
def _timeout(options: Mapping[str, Any]) -> float:
    value = options.get("connect_timeout_s")
    try:
        return float(value) if value not in (None, "") else 5.0
    except (TypeError, ValueError):
        raise ConfigError(f"agents.*.connect_timeout_s: expected a number, got {value!r}") from None


_STT_KEYS = frozenset({"stt_url", "stt_api_key", "stt_model", "stt_language", "stt_endpointing_ms"})
_TTS_KEYS = frozenset({"tts_url", "tts_api_key", "tts_model", "tts_voice", "tts_language"})
Factory = Callable[[Mapping[str, Any]], tuple[Callable[[], Any], frozenset[str]]]


def _cloud(cls: Any, keys: frozenset[str]) -> Factory:
    def make(options: Mapping[str, Any]) -> tuple[Callable[[], Any], frozenset[str]]:
        cls(options)  # validate now: a bad config fails at load, not at the first call
        # The per-call instance is built later, outside the registry's env_fallback scope:
        # carry the agent's own rule (a stored agent never takes a key from the environment).
        return partial(_per_call, cls, dict(options), env_fallback_allowed()), keys

    return make


def _per_call(cls: Any, options: dict[str, Any], fallback: bool) -> Any:
    """A call's STT/TTS of a validated config, under the agent's key rule
    (relay.agents.options.api_key); a config that no longer holds is the agent's failure."""
    with env_fallback(fallback):
        try:
            return cls(options)
        except ConfigError as exc:
            raise AgentError(f"{cls.name}: {exc}", kind="agent_config") from None


def _local_stt(options: Mapping[str, Any]) -> tuple[Callable[[], Any], frozenset[str]]:
    from .factory import LOCAL_STT_KEYS, local_stt_factory
    from .receptionist import CORPUS

    return local_stt_factory(options, CORPUS), LOCAL_STT_KEYS


def _local_tts(options: Mapping[str, Any]) -> tuple[Callable[[], Any], frozenset[str]]:
    from .factory import LOCAL_TTS_KEYS, local_tts_factory

    return local_tts_factory(options), LOCAL_TTS_KEYS


STT: dict[str, Factory] = {
    "deepgram": _cloud(DeepgramSTT, _STT_KEYS),
    "assemblyai": _cloud(AssemblyAISTT, _STT_KEYS),
    "sarvam": _cloud(SarvamSTT, _STT_KEYS),
    "local": _local_stt,
}
TTS: dict[str, Factory] = {
    "deepgram": _cloud(DeepgramTTS, _TTS_KEYS),
    "elevenlabs": _cloud(ElevenLabsTTS, _TTS_KEYS),
    "openai": _cloud(OpenAITTS, _TTS_KEYS),
    "sarvam": _cloud(SarvamTTS, _TTS_KEYS),
    "local": _local_tts,
}
