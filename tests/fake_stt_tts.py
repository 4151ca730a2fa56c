"""Local fakes of the cascaded agent's speech vendors, on tests/fake_vendor_ws.py:

* Deepgram live STT ``/v1/listen`` and Aura TTS ``/v1/speak`` (``Authorization: Token``);
* AssemblyAI Universal-Streaming v3 ``/v3/ws`` (raw key in ``Authorization``);
* ElevenLabs stream-input ``/v1/text-to-speech/<voice>/stream-input`` (``xi-api-key``);
* Sarvam STT ``/speech-to-text/ws`` and Bulbul TTS ``/text-to-speech/ws``
  (``Api-Subscription-Key``).

They cannot understand speech: an energy detector on the audio received finds utterances
(speech after >= 60 ms of loud frames, end after 300 ms quiet) and each utterance is
"recognised" as the next entry of ``transcripts`` (default "hello"). TTS fakes answer text
with a tone, 60 ms per character. What the real services refuse is refused here too and
recorded in ``refusals``: wrong auth (401), raw audio without encoding/sample rate
(Deepgram 400), AssemblyAI without ``speech_model``/with frames under 50 ms (close 3007),
audio as a text frame (Deepgram), Aura's flush cap (20 per minute: a Warning), ElevenLabs'
first message not ``{"text": " "}``, Sarvam TTS text before ``config``.
"""

from __future__ import annotations

import base64
import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import trio
from fake_vendor_ws import FakeWsOptions, FakeWsServer, WsPeer, serve_fake

from relay.media.codec import ulaw_decode, ulaw_encode

__all__ = [
    "FakeAssemblyAI",
    "FakeAura",
    "FakeDeepgramListen",
    "FakeElevenLabs",
    "FakeSarvamSTT",
    "FakeSarvamTTS",
    "serve",
]

KEY = "vendor-test-key-0123456789abcdef"


def tone_ulaw(ms: float, hz: float = 500.0) -> bytes:
    n = int(8 * ms)
    t = np.arange(n) / 8000
    return ulaw_encode((np.sin(2 * math.pi * hz * t) * 0.3 * 32767).astype("<i2").tobytes())


class Utterances:
    """Energy-based utterance finder over PCM16 8 kHz (20 ms frames)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.speaking = False
        self.loud = 0
        self.quiet = 0
        self.ms = 0.0

    def feed_pcm(self, pcm: bytes) -> list[str]:
        self.buf += pcm
        out: list[str] = []
        while len(self.buf) >= 320:
            frame = np.frombuffer(bytes(self.buf[:320]), dtype="<i2").astype(np.float64)
            del self.buf[:320]
            self.ms += 20
            level = 10 * math.log10(float(np.mean(frame**2)) / 32768.0**2 + 1e-12)
            if level > -40:
                self.loud += 1
                self.quiet = 0
            else:
                self.quiet += 1
                self.loud = 0
            if not self.speaking and self.loud >= 3:
                self.speaking = True
                out.append("start")
            elif self.speaking and self.quiet >= 15:
                self.speaking = False
                out.append("end")
        return out


@dataclass
class FakeSpeechOptions(FakeWsOptions):
    api_key: str = KEY
    transcripts: deque[str] = field(default_factory=deque)
    #: ms of tone per character of TTS text
    ms_per_char: float = 60.0


class _Base(FakeWsServer):
    def __init__(self, options: FakeSpeechOptions | None = None) -> None:
        super().__init__(options or FakeSpeechOptions())
        self.opts: FakeSpeechOptions = self.options  # type: ignore[assignment]
        self.refusals: list[str] = []
        self.received: list[Any] = []
        self.recognised: list[str] = []

    def next_transcript(self) -> str:
        text = self.opts.transcripts.popleft() if self.opts.transcripts else "hello"
        self.recognised.append(text)
        return text

    async def refuse(self, peer: WsPeer, why: str, code: int = 1008) -> None:
        self.refusals.append(why)
        self.notify()
        await peer.close(code, why[:100])


# --- Deepgram ----------------------------------------------------------------------------------
class FakeDeepgramListen(_Base):
    path = "/v1/listen"

    def authorize(self, headers: dict[str, str], query: dict[str, str]) -> tuple[int, str] | None:
        if headers.get("authorization") != f"Token {self.api_key}":
            return (401, "invalid credentials")
        if query.get("encoding") and not query.get("sample_rate"):
            return (400, "raw audio needs encoding and sample_rate")
        if query.get("encoding") not in (None, "mulaw", "linear16", "alaw"):
            return (400, "unsupported encoding")
        return None

    async def serve_peer(self, peer: WsPeer) -> None:
        finder = Utterances()
        mulaw = peer.query.get("encoding") == "mulaw"
        async for message in peer.messages():
            if isinstance(message, str):
                msg = orjson.loads(message)
                self.received.append(msg)
                if msg.get("type") == "CloseStream":
                    await peer.send_json({"type": "Metadata", "request_id": "fake"})
                    await peer.close(1000)
                    return
                if msg.get("type") not in ("KeepAlive", "Finalize"):
                    await self.refuse(peer, "text frame is not a control message")
                    return
                continue
            pcm = ulaw_decode(message) if mulaw else message
            for ev in finder.feed_pcm(pcm):
                if ev == "start":
                    await peer.send_json(
                        {"type": "SpeechStarted", "channel": [0, 1], "timestamp": finder.ms / 1000}
                    )
                    await peer.send_json(_dg_results("", is_final=False, speech_final=False))
                else:
                    text = self.next_transcript()
                    words = text.split()
                    half = " ".join(words[: max(1, len(words) // 2)])
                    await peer.send_json(_dg_results(half, is_final=False, speech_final=False))
                    await peer.send_json(_dg_results(half, is_final=True, speech_final=False))
                    rest = " ".join(words[max(1, len(words) // 2) :])
                    await peer.send_json(_dg_results(rest, is_final=True, speech_final=True))


def _dg_results(text: str, *, is_final: bool, speech_final: bool) -> dict[str, Any]:
    return {
        "type": "Results",
        "channel_index": [0, 1],
        "is_final": is_final,
        "speech_final": speech_final,
        "channel": {"alternatives": [{"transcript": text, "confidence": 0.9, "words": []}]},
    }


class FakeAura(_Base):
    path = "/v1/speak"

    def __init__(self, options: FakeSpeechOptions | None = None) -> None:
        super().__init__(options)
        self.flush_times: list[float] = []
        self.clears = 0
        self.spoken: list[str] = []

    def authorize(self, headers: dict[str, str], query: dict[str, str]) -> tuple[int, str] | None:
        if headers.get("authorization") != f"Token {self.api_key}":
            return (401, "invalid credentials")
        if query.get("encoding") != "mulaw" or query.get("sample_rate") != "8000":
            return (400, "test expects mulaw 8000")
        return None

    async def serve_peer(self, peer: WsPeer) -> None:
        text: list[str] = []
        seq = 0
        send_scope: trio.CancelScope | None = None

        async def generate(chars: int, seq_id: int, scope: trio.CancelScope) -> None:
            with scope:
                audio = tone_ulaw(chars * self.opts.ms_per_char)
                for i in range(0, len(audio), 1600):  # 200 ms per frame, as fast as it can
                    await peer.send_bytes(audio[i : i + 1600])
                    await trio.sleep(0.005)
                await peer.send_json({"type": "Flushed", "sequence_id": seq_id})

        async with trio.open_nursery() as nursery:
            async for message in peer.messages():
                if isinstance(message, bytes):
                    await self.refuse(peer, "binary frame to /v1/speak")
                    return
                msg = orjson.loads(message)
                self.received.append(msg)
                kind = msg.get("type")
                if kind == "Speak":
                    text.append(str(msg.get("text", "")))
                    self.spoken.append(str(msg.get("text", "")))
                elif kind == "Flush":
                    now = trio.current_time()
                    self.flush_times = [t for t in self.flush_times if now - t < 60] + [now]
                    if len(self.flush_times) > 20:
                        self.refusals.append("flush cap")
                        await peer.send_json(
                            {"type": "Warning", "description": "flush limit", "code": "W"}
                        )
                        continue
                    chars = sum(len(t) for t in text)
                    text.clear()
                    send_scope = trio.CancelScope()
                    nursery.start_soon(generate, chars, seq, send_scope)
                    seq += 1
                elif kind == "Clear":
                    self.clears += 1
                    text.clear()
                    if send_scope is not None:
                        send_scope.cancel()
                    await peer.send_json({"type": "Cleared", "sequence_id": seq})
                elif kind == "Close":
                    await peer.close(1000)
                    return
                else:
                    await self.refuse(peer, f"unknown message {kind}")
                    return
            nursery.cancel_scope.cancel()


# --- AssemblyAI v3 -----------------------------------------------------------------------
class FakeAssemblyAI(_Base):
    path = "/v3/ws"

    def authorize(self, headers: dict[str, str], query: dict[str, str]) -> tuple[int, str] | None:
        if headers.get("authorization") != self.api_key:
            return (401, "invalid API key")
        return None

    async def serve_peer(self, peer: WsPeer) -> None:
        q = peer.query
        if not q.get("speech_model"):
            await self.refuse(peer, "speech_model is required", 3006)
            return
        if q.get("encoding") != "pcm_mulaw" or q.get("sample_rate") != "8000":
            await self.refuse(peer, "test expects pcm_mulaw at 8000", 3006)
            return
        await peer.send_json({"type": "Begin", "id": "fake-session", "expires_at": 0})
        finder = Utterances()
        order = 0
        async for message in peer.messages():
            if isinstance(message, str):
                msg = orjson.loads(message)
                self.received.append(msg)
                if msg.get("type") == "Terminate":
                    await peer.send_json(
                        {"type": "Termination", "audio_duration_seconds": finder.ms / 1000}
                    )
                    await peer.close(1000)
                    return
                continue
            ms = len(message) / 8
            if ms < 50 or ms > 1000:
                await self.refuse(peer, f"audio frame of {ms:.0f} ms (50-1000 allowed)", 3007)
                return
            for ev in finder.feed_pcm(ulaw_decode(message)):
                if ev == "start":
                    await peer.send_json({"type": "SpeechStarted", "timestamp": int(finder.ms)})
                else:
                    text = self.next_transcript()
                    base = {
                        "type": "Turn",
                        "turn_order": order,
                        "turn_is_formatted": False,
                        "words": [],
                    }
                    await peer.send_json(
                        {**base, "end_of_turn": False, "transcript": text.split()[0]}
                    )
                    await peer.send_json({**base, "end_of_turn": True, "transcript": text})
                    order += 1


# --- ElevenLabs stream-input -------------------------------------------------------------
class FakeElevenLabs(_Base):
    path = "/v1/text-to-speech/voice123/stream-input"

    def __init__(self, options: FakeSpeechOptions | None = None) -> None:
        super().__init__(options)
        self.contexts = 0
        self.spoken: list[str] = []

    def authorize(self, headers: dict[str, str], query: dict[str, str]) -> tuple[int, str] | None:
        if headers.get("xi-api-key") != self.api_key:
            return (401, "invalid_api_key")
        if query.get("output_format") != "ulaw_8000":
            return (400, "test expects ulaw_8000")
        return None

    async def serve_peer(self, peer: WsPeer) -> None:
        self.contexts += 1
        first = True
        async for message in peer.messages():
            msg = orjson.loads(message)
            self.received.append(msg)
            text = msg.get("text")
            if first:
                first = False
                if text != " ":
                    await self.refuse(peer, 'the first message must be {"text": " "}')
                    return
                continue
            if text == "":
                await peer.send_json({"audio": None, "isFinal": True})
                await peer.close(1000)
                return
            if not isinstance(text, str):
                await self.refuse(peer, "text is required")
                return
            self.spoken.append(text)
            audio = tone_ulaw(len(text) * self.opts.ms_per_char)
            for i in range(0, len(audio), 1600):
                await peer.send_json(
                    {
                        "audio": base64.b64encode(audio[i : i + 1600]).decode(),
                        "isFinal": None,
                        "normalizedAlignment": None,
                    }
                )
                await trio.sleep(0.005)


# --- Sarvam ------------------------------------------------------------------------------
class FakeSarvamSTT(_Base):
    path = "/speech-to-text/ws"

    def authorize(self, headers: dict[str, str], query: dict[str, str]) -> tuple[int, str] | None:
        if headers.get("api-subscription-key") != self.api_key:
            return (403, "invalid subscription key")
        if query.get("sample_rate") not in ("8000", "16000"):
            return (400, "sample_rate must be 8000 or 16000")
        return None

    async def serve_peer(self, peer: WsPeer) -> None:
        finder = Utterances()
        async for message in peer.messages():
            msg = orjson.loads(message)
            audio = msg.get("audio")
            if not isinstance(audio, dict) or "data" not in audio:
                if msg.get("type") == "flush":
                    continue
                await peer.send_json(
                    {"type": "error", "data": {"error": "invalid message", "code": "400"}}
                )
                self.refusals.append("invalid message")
                continue
            for ev in finder.feed_pcm(base64.b64decode(audio["data"])):
                if ev == "start":
                    await peer.send_json(
                        {
                            "type": "events",
                            "data": {"signal_type": "START_SPEECH", "occured_at": finder.ms},
                        }
                    )
                else:
                    await peer.send_json(
                        {
                            "type": "events",
                            "data": {"signal_type": "END_SPEECH", "occured_at": finder.ms},
                        }
                    )
                    await peer.send_json(
                        {
                            "type": "data",
                            "data": {
                                "request_id": "r",
                                "transcript": self.next_transcript(),
                                "language_code": "en-IN",
                            },
                        }
                    )


class FakeSarvamTTS(_Base):
    path = "/text-to-speech/ws"

    def __init__(self, options: FakeSpeechOptions | None = None) -> None:
        super().__init__(options)
        self.contexts = 0
        self.spoken: list[str] = []

    def authorize(self, headers: dict[str, str], query: dict[str, str]) -> tuple[int, str] | None:
        if headers.get("api-subscription-key") != self.api_key:
            return (403, "invalid subscription key")
        return None

    async def serve_peer(self, peer: WsPeer) -> None:
        self.contexts += 1
        config: dict[str, Any] | None = None
        text: list[str] = []
        async for message in peer.messages():
            msg = orjson.loads(message)
            self.received.append(msg)
            kind = msg.get("type")
            if kind == "config":
                config = msg.get("data") or {}
                if not config.get("speaker") or not config.get("target_language_code"):
                    await peer.send_json(
                        {
                            "type": "error",
                            "data": {"message": "speaker and target_language_code required"},
                        }
                    )
                continue
            if config is None:
                self.refusals.append("text before config")
                await peer.send_json({"type": "error", "data": {"message": "send config first"}})
                await peer.close(1008)
                return
            if kind == "text":
                text.append(str((msg.get("data") or {}).get("text", "")))
                self.spoken.append(text[-1])
            elif kind == "flush":
                audio = tone_ulaw(sum(len(t) for t in text) * self.opts.ms_per_char)
                text.clear()
                for i in range(0, len(audio), 1600):
                    await peer.send_json(
                        {
                            "type": "audio",
                            "data": {
                                "audio": base64.b64encode(audio[i : i + 1600]).decode(),
                                "content_type": "audio/mulaw",
                            },
                        }
                    )
                    await trio.sleep(0.005)
                await peer.send_json({"type": "event", "data": {"event_type": "final"}})
            elif kind == "ping":
                continue


@asynccontextmanager
async def serve(server: _Base) -> AsyncIterator[Any]:
    async with serve_fake(server) as s:
        yield s
