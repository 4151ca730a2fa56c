"""What the cascaded agent knows about a speech-to-text or text-to-speech service.

Every STT (Deepgram, AssemblyAI, Sarvam, the offline PocketSphinx one) and every TTS
(Deepgram Aura, ElevenLabs, OpenAI, Sarvam Bulbul, the offline eSpeak NG one) implements
one of the two small interfaces below, so the agent (``relay/agents/text/agent.py``) never
knows which vendor it talks to. Audio is always Twilio's: μ-law 8 kHz in and out; an
adapter whose vendor wants or gives something else converts (``relay.media.codec``).

Sending is non-blocking (``send_audio``, ``speak``, ``end``, ``cancel`` return at once, as
the engine's agent contract requires); :meth:`run` does the background work in the call's
task tree and :meth:`receive` awaits the next batch of events.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio

from ...errors import ConnectionClosed

__all__ = [
    "EventQueue",
    "SpeechToText",
    "SttEndOfTurn",
    "SttEvent",
    "SttPartial",
    "SttSpeechStarted",
    "TextToSpeech",
    "TtsAudio",
    "TtsDone",
    "TtsEvent",
]


# --- events ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SttSpeechStarted:
    """The caller started talking (the barge-in trigger)."""


@dataclass(frozen=True, slots=True)
class SttPartial:
    """Interim words of the turn in progress (replace each other)."""

    text: str


@dataclass(frozen=True, slots=True)
class SttEndOfTurn:
    """The caller finished a turn; ``text`` is the whole utterance (may be empty)."""

    text: str
    #: time.perf_counter() when the end of turn was known here (latency breakdown)
    t: float = 0.0


SttEvent = SttSpeechStarted | SttPartial | SttEndOfTurn


@dataclass(frozen=True, slots=True)
class TtsAudio:
    """μ-law 8 kHz audio of reply ``response_id``; ``clause`` when the vendor's audio is
    known to belong to one clause (per-clause synthesis), else None."""

    response_id: str
    ulaw: bytes
    clause: int | None = None
    #: time.perf_counter() when the audio arrived (latency breakdown)
    t: float = 0.0


@dataclass(frozen=True, slots=True)
class TtsDone:
    """Every piece of audio of ``response_id`` has been delivered."""

    response_id: str


TtsEvent = TtsAudio | TtsDone

E = TypeVar("E")


class EventQueue(Generic[E]):
    """Unbounded queue with the ``receive`` contract: a non-empty batch, or
    ConnectionClosed once closed (producers are paced by real-time audio)."""

    def __init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[E](math.inf)
        self.closed = False

    def put(self, *events: E) -> None:
        if self.closed:
            return
        for event in events:
            self._send.send_nowait(event)

    async def get_batch(self) -> list[E]:
        if self.closed:
            raise ConnectionClosed(1000, "closed")
        try:
            batch = [await self._recv.receive()]
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ConnectionClosed(1000, "closed") from None
        while True:
            try:
                batch.append(self._recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return batch

    def close(self) -> None:
        self.closed = True
        self._send.close()


# --- interfaces ------------------------------------------------------------------------------
class SpeechToText(abc.ABC):
    name = "stt"

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the session (bounded by the adapter's connect timeout)."""

    @abc.abstractmethod
    def send_audio(self, ulaw: bytes) -> None:
        """Caller audio, μ-law 8 kHz, in arrival order (non-blocking)."""

    @abc.abstractmethod
    async def receive(self) -> list[SttEvent]:
        """The next batch of events; ConnectionClosed/AgentError when the session ended."""

    async def run(self) -> None:
        """Background work for the session's lifetime."""
        await trio.sleep_forever()

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close; must not raise and must return promptly."""


class TextToSpeech(abc.ABC):
    name = "tts"

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the session (some vendors connect per reply, in :meth:`begin`)."""

    def begin(self, response_id: str) -> None:  # noqa: B027 - optional
        """A reply is about to start (the caller's turn just ended): vendors that need a
        connection or context per reply open it now, while the model thinks."""

    @abc.abstractmethod
    def speak(self, response_id: str, clause: int, text: str) -> None:
        """Synthesize one more clause of ``response_id`` (clauses arrive in order)."""

    @abc.abstractmethod
    def end(self, response_id: str) -> None:
        """No more text for ``response_id``: flush; TtsDone follows its last audio."""

    @abc.abstractmethod
    def cancel(self, response_id: str) -> None:
        """Barge-in: drop the text and audio of ``response_id`` not yet delivered."""

    @abc.abstractmethod
    async def receive(self) -> list[TtsEvent]:
        """The next batch of events; ConnectionClosed/AgentError when the session ended."""

    async def run(self) -> None:
        await trio.sleep_forever()

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close; must not raise and must return promptly."""
