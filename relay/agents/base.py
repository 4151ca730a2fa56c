"""What the call engine knows about a voice agent.

Each adapter is a sans-IO protocol class (bytes/str in, events out) plus a thin Trio layer
implementing :class:`Agent`. The engine (``relay/call.py``) only uses this module, so adding
an adapter never touches the engine.
"""

from __future__ import annotations

import abc
import binascii
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import trio

if TYPE_CHECKING:
    from ..media.websocket import WebSocket

# --- audio formats -------------------------------------------------------------------
MULAW_8K = ("mulaw", 8000)


@dataclass(frozen=True, slots=True)
class AudioBooks:
    """What the engine's compiled reader (relay.media.codec.DownlinkHandler) needs to take
    an adapter's audio deltas off its socket itself: the WebSocket (its parser turns audio
    deltas into ``(item_id, audio)`` tuples), and the session's live bookkeeping, which the
    reader updates in place exactly as the adapter's parse would."""

    ws: WebSocket
    #: audio bytes generated per output item; only items already here are read directly
    item_bytes: dict[str, int]
    #: truncated items (their deltas take the adapter's path)
    truncated: set[str]
    #: counts ``events_in`` per delta
    protocol: Any


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """``encoding`` is "mulaw" (8 kHz G.711) or "pcm16" (signed 16-bit LE mono)."""

    encoding: str
    rate: int

    @property
    def is_twilio_native(self) -> bool:
        return self.encoding == "mulaw" and self.rate == 8000


TWILIO_FORMAT = AudioFormat("mulaw", 8000)


# --- events an agent produces ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AgentAudio:
    """Agent speech. ``audio`` is in the agent's ``output_format``; ``response_id`` groups
    the audio of one agent turn (OpenAI: the assistant item id, which truncate needs)."""

    audio: bytes
    response_id: str


@dataclass(frozen=True, slots=True)
class AgentResponseDone:
    """The agent finished generating ``response_id`` (not: the caller finished hearing it)."""

    response_id: str


@dataclass(frozen=True, slots=True)
class AgentSpeechStarted:
    """The agent detected caller speech: barge-in. The engine clears Twilio at once."""


@dataclass(frozen=True, slots=True)
class AgentSpeechStopped:
    pass


@dataclass(frozen=True, slots=True)
class AgentTranscript:
    """``role`` is "caller" or "agent"; ``final`` False for partial deltas."""

    role: str
    text: str
    final: bool = True


@dataclass(frozen=True, slots=True)
class AgentToolCall:
    call_id: str
    name: str
    arguments: str  # JSON text as the agent sent it


@dataclass(frozen=True, slots=True)
class AgentHangup:
    """The agent ends the conversation; the engine waits for the last mark, then closes."""

    reason: str = "agent ended"


@dataclass(frozen=True, slots=True)
class AgentErrorEvent:
    code: str
    message: str
    fatal: bool = False


AgentEvent = (
    AgentAudio
    | AgentResponseDone
    | AgentSpeechStarted
    | AgentSpeechStopped
    | AgentTranscript
    | AgentToolCall
    | AgentHangup
    | AgentErrorEvent
)


@dataclass(frozen=True, slots=True)
class CallInfo:
    """What an agent may know about the call it serves."""

    call_sid: str
    stream_sid: str
    from_number: str = ""
    to_number: str = ""
    custom_parameters: Mapping[str, str] = field(default_factory=dict)


class Agent(abc.ABC):
    """One agent session per call.

    Sending is non-blocking, like a transport's ``write()``: ``send_*`` hand the message to
    the adapter's socket at once (or to its bounded buffer) and raise
    ``relay.errors.ConnectionClosed`` / ``AgentError`` when the session is gone. That lets
    the engine react to a Twilio message without yielding mid-way (barge-in is atomic) and
    keeps a half-dead agent socket from stalling the caller's side: the adapter's
    :meth:`run` task drains what the kernel did not take, under a send timeout.

    Receiving: :meth:`receive` awaits the next batch of events. Adapters on a plain TCP
    socket may also offer :meth:`reactor_socket` + :meth:`read_events_nowait`, so the
    process-wide reactor reads them without a task wake-up per message.
    """

    name: ClassVar[str] = "agent"
    input_format: AudioFormat = TWILIO_FORMAT
    output_format: AudioFormat = TWILIO_FORMAT
    #: True when ``truncate`` tells the agent what was heard (OpenAI); else a no-op.
    supports_truncate: ClassVar[bool] = False

    @abc.abstractmethod
    async def connect(self, call: CallInfo) -> None:
        """Open the session and configure it (greeting included when configured)."""

    async def run(self) -> None:
        """Background work for the session's lifetime (flushing, keepalives), run in the
        call's nursery. Raise ConnectionClosed/AgentError when the session dies."""
        await trio.sleep_forever()

    @abc.abstractmethod
    def send_audio(self, audio: bytes) -> None:
        """Caller audio in ``input_format`` (raw bytes)."""

    def send_audio_b64(self, payload: str) -> None:
        """Caller audio already base64-encoded in ``input_format``.

        With μ-law passthrough the engine hands over Twilio's payload string untouched;
        JSON-based adapters override this to skip a decode/encode round trip.
        """
        self.send_audio(binascii.a2b_base64(payload))

    def send_audio_b64_many(self, payloads: list[str]) -> None:
        """Several base64 frames at once (one receive batch); adapters may send them in one
        write. Default: one ``send_audio_b64`` each."""
        for payload in payloads:
            self.send_audio_b64(payload)

    @abc.abstractmethod
    async def receive(self) -> list[AgentEvent]:
        """Wait for the next batch of events (never empty). Raises
        ``relay.errors.ConnectionClosed`` when the session ended, ``AgentError`` on failure."""

    def reactor_socket(self) -> socket.socket | None:
        """The plain TCP socket to multiplex, or None to be read through :meth:`receive`."""
        return None

    def audio_splice(self) -> tuple[WebSocket, bytes, bytes] | None:
        """``(ws, head, tail)`` when :meth:`send_audio_b64_many` is exactly
        ``ws.send_b64_texts_nowait(head, payloads, tail)`` and :meth:`send_audio` exactly
        ``ws.send_audio_text_nowait(head, audio, tail)`` for the whole session while ``ws``
        is open (no reconnect: :meth:`reactor_socket` is ``ws``'s socket). The engine may
        then build and write the caller's audio to ``ws`` itself (the uplink pump,
        relay.media.codec.UplinkPump); any failure still goes through the adapter's own
        paths. None (the default): the adapter sends."""
        return None

    def read_events_nowait(self) -> list[AgentEvent]:
        """Events from one non-blocking read ([] if nothing complete arrived)."""
        raise NotImplementedError

    def audio_books(self) -> AudioBooks | None:
        """Set when the engine may read :meth:`reactor_socket` itself for the whole
        session: a read holding only audio deltas of items in the books is then handled
        without the adapter, and the rest of a read goes to :meth:`events_from` (the
        engine answers control frames through the WebSocket). None (the default): the
        adapter reads."""
        return None

    def events_from(self, messages: list[str | bytes | tuple[str, bytes]]) -> list[AgentEvent]:
        """The events of data messages the engine read from :meth:`reactor_socket` (see
        :meth:`audio_books`), exactly as :meth:`read_events_nowait` would give them."""
        raise NotImplementedError

    @property
    def events_waiting(self) -> bool:
        """Events are held in the adapter for the next read (the engine's reader must
        let the adapter read then)."""
        return False

    def send_dtmf(self, digit: str) -> None:  # noqa: B027 - optional
        """Forward a keypad digit where the protocol allows; default: nothing to do."""

    def truncate(self, response_id: str, audio_end_ms: int) -> None:  # noqa: B027
        """Tell the agent the caller heard only ``audio_end_ms`` of ``response_id``."""

    def send_tool_result(self, call_id: str, output: str) -> None:  # noqa: B027
        """Answer an ``AgentToolCall``."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close the session; must not raise and must return promptly."""


AgentFactory = Callable[[Mapping[str, Any]], Agent]
