"""The parrot: a dependency-free local voice agent that repeats what the caller said.

It exercises everything the engine must handle with a real agent, without a network or an
API key: turn taking (energy VAD), streamed replies with response ids, barge-in (caller
speech while a reply is still playing -> ``AgentSpeechStarted``), transcripts, a greeting,
DTMF and an agent-initiated hang-up.

Timing comes from the caller's audio, not from a timer: Twilio sends the caller's audio in
real time (one 20 ms frame every 20 ms), so "samples received since the reply started" is
how much of the reply the caller has had time to hear. That keeps the agent deterministic
in tests and correct under a mock clock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any, ClassVar

from ..errors import ConfigError
from ..sim import speech
from .base import (
    Agent,
    AgentAudio,
    AgentEvent,
    AgentHangup,
    AgentResponseDone,
    AgentSpeechStarted,
    AgentSpeechStopped,
    AgentTranscript,
    CallInfo,
)
from .echo import LocalEvents, check_options

RATE = speech.RATE
FRAME = speech.FRAME  # VAD frame: 20 ms
BURST = RATE // 10  # reply audio goes out in 100 ms events


class EnergyVAD:
    """Frame-energy voice activity detector with a noise-floor tracker and hangover.

    A frame is "loud" when its level exceeds ``max(threshold_dbfs, noise_floor + snr_db)``.
    The noise floor is the quietest frame of the last ``floor_window_s``: speech always has
    gaps (between words, between syllables) that reach the floor, while steady line noise
    raises it, so noise alone never counts as speech. Speech starts after ``start_ms`` of
    consecutive loud frames and ends after ``end_ms`` of consecutive quiet ones.
    """

    def __init__(
        self,
        *,
        threshold_dbfs: float = -45.0,
        snr_db: float = 12.0,
        start_ms: float = 60.0,
        end_ms: float = 600.0,
        frame_ms: float = 20.0,
        floor_window_s: float = 3.0,
    ) -> None:
        self.threshold_dbfs = threshold_dbfs
        self.snr_db = snr_db
        self.start_frames = max(1, math.ceil(start_ms / frame_ms))
        self.end_frames = max(1, math.ceil(end_ms / frame_ms))
        self._levels: deque[float] = deque(maxlen=max(1, round(floor_window_s * 1000 / frame_ms)))
        self.speaking = False
        self._run = 0
        self._quiet = 0

    @property
    def noise_floor(self) -> float:
        return min(self._levels) if self._levels else -120.0

    @property
    def threshold(self) -> float:
        return max(self.threshold_dbfs, self.noise_floor + self.snr_db)

    def update(self, level_dbfs: float) -> str | None:
        """Feed one frame's level; returns "start", "end" or None."""
        loud = level_dbfs > self.threshold  # judged against the floor *before* this frame
        self._levels.append(level_dbfs)
        if not self.speaking:
            self._run = self._run + 1 if loud else 0
            if self._run >= self.start_frames:
                self.speaking, self._quiet = True, 0
                return "start"
        else:
            self._quiet = 0 if loud else self._quiet + 1
            if self._quiet >= self.end_frames:
                self.speaking, self._run = False, 0
                return "end"
        return None


# --- options --------------------------------------------------------------------------------
def _opt_float(options: Mapping[str, Any], key: str, default: float) -> float:
    value = options.get(key, default)
    try:
        result = float(value)  # environment overrides arrive as strings
    except (TypeError, ValueError):
        raise ConfigError(f"agents: parrot option {key} must be a number, got {value!r}") from None
    if result < 0 and key != "vad_threshold_dbfs":
        raise ConfigError(f"agents: parrot option {key} must be >= 0, got {value!r}")
    return result


def _opt_bool(options: Mapping[str, Any], key: str, default: bool) -> bool:
    value = options.get(key, default)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"agents: parrot option {key} must be true or false, got {value!r}")


class ParrotAgent(Agent):
    """Repeats each caller utterance once the caller stops talking."""

    name: ClassVar[str] = "parrot"
    supports_truncate: ClassVar[bool] = True  # uses it to know a reply stopped playing

    OPTIONS: ClassVar[tuple[str, ...]] = (
        "greeting",
        "hangup_digit",
        "max_utterance_s",
        "vad_threshold_dbfs",
        "vad_snr_db",
        "vad_start_ms",
        "vad_end_ms",
        "preroll_ms",
        "reply_tail_ms",
    )

    def __init__(
        self,
        *,
        greeting: bool = False,
        hangup_digit: str = "#",
        max_utterance_s: float = 8.0,
        vad_threshold_dbfs: float = -45.0,
        vad_snr_db: float = 12.0,
        vad_start_ms: float = 60.0,
        vad_end_ms: float = 600.0,
        preroll_ms: float = 200.0,
        reply_tail_ms: float = 300.0,
    ) -> None:
        self.greeting = greeting
        self.hangup_digit = hangup_digit
        self.vad = EnergyVAD(
            threshold_dbfs=vad_threshold_dbfs,
            snr_db=vad_snr_db,
            start_ms=vad_start_ms,
            end_ms=vad_end_ms,
        )
        self._max_utterance = int(max_utterance_s * RATE)
        # keep the frames that made the VAD fire (plus a little) so the echo has its onset
        self._preroll: deque[bytes] = deque(
            maxlen=max(1, math.ceil((preroll_ms + vad_start_ms) / 20.0))
        )
        self._keep_tail = int(0.15 * RATE)  # trailing silence kept at the end of an utterance
        self._reply_tail = int(reply_tail_ms / 1000 * RATE)
        self._events = LocalEvents()
        self._pending = bytearray()  # caller audio not yet a whole VAD frame
        self._recording: bytearray | None = None
        self._ignoring = False  # rest of an utterance cut by max_utterance_s
        self._barged_in = False
        self._clock = 0  # caller samples received: the call's real-time clock
        self._reply_id: str | None = None
        self._reply_end = 0  # caller-clock sample at which the current reply has played
        self._responses = 0
        self._hung_up = False
        self.call: CallInfo | None = None
        # observable state, for tests and call records
        self.utterances: list[float] = []  # seconds, per caller utterance answered
        self.barge_ins = 0
        self.dtmf_digits: list[str] = []
        self.truncations: dict[str, int] = {}  # response_id -> heard ms reported by engine

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> ParrotAgent:
        check_options(cls.name, options, cls.OPTIONS)
        digit = str(options.get("hangup_digit", "#"))
        if len(digit) > 1:
            raise ConfigError(f"agents: parrot option hangup_digit must be one key, got {digit!r}")
        return cls(
            greeting=_opt_bool(options, "greeting", False),
            hangup_digit=digit,
            max_utterance_s=_opt_float(options, "max_utterance_s", 8.0),
            vad_threshold_dbfs=_opt_float(options, "vad_threshold_dbfs", -45.0),
            vad_snr_db=_opt_float(options, "vad_snr_db", 12.0),
            vad_start_ms=_opt_float(options, "vad_start_ms", 60.0),
            vad_end_ms=_opt_float(options, "vad_end_ms", 600.0),
            preroll_ms=_opt_float(options, "preroll_ms", 200.0),
            reply_tail_ms=_opt_float(options, "reply_tail_ms", 300.0),
        )

    # --- Agent API ------------------------------------------------------------------------
    async def connect(self, call: CallInfo) -> None:
        self.call = call
        if self.greeting:
            self._reply(speech.mulaw_encode(speech.greeting_chime()), "greeting", "[greeting]")

    def send_audio(self, audio: bytes) -> None:
        if self._hung_up or self._events.closed:
            return
        self._pending += audio
        whole = len(self._pending) - len(self._pending) % FRAME
        for start in range(0, whole, FRAME):
            self._on_frame(bytes(self._pending[start : start + FRAME]))
        del self._pending[:whole]

    def send_dtmf(self, digit: str) -> None:
        self.dtmf_digits.append(digit)
        if self._hung_up or not self.hangup_digit or digit != self.hangup_digit:
            return
        self._hung_up = True
        self._reply(speech.mulaw_encode(speech.goodbye_chime()), "bye", "[goodbye]")
        # the engine plays the goodbye to its last mark before closing (AgentHangup contract)
        self._events.put(AgentHangup(f"caller pressed {digit}"))

    def truncate(self, response_id: str, audio_end_ms: int) -> None:
        self.truncations[response_id] = audio_end_ms
        if response_id == self._reply_id:
            self._reply_id = None  # the caller stopped hearing it: no longer "playing"

    async def receive(self) -> list[AgentEvent]:
        return await self._events.get_batch()

    async def aclose(self) -> None:
        self._events.close()

    # --- turn taking ----------------------------------------------------------------------
    @property
    def replying(self) -> bool:
        """True while a reply should still be playing to the caller (caller-audio clock)."""
        return self._reply_id is not None and self._clock < self._reply_end

    def _on_frame(self, frame: bytes) -> None:
        level = float(speech.frame_dbfs(speech.mulaw_decode(frame), FRAME)[0])
        event = self.vad.update(level)
        self._clock += len(frame)
        if self._ignoring:
            self._ignoring = event != "end"
            return
        if self._recording is None:
            self._preroll.append(frame)
            if event == "start":
                self._start_utterance()
            return
        self._recording += frame
        if event == "end":
            self._finish_utterance(trim=(self.vad.end_frames * FRAME) - self._keep_tail)
        elif len(self._recording) >= self._max_utterance:
            self._finish_utterance(trim=0)
            self._ignoring = self.vad.speaking  # the caller talks on; wait for a pause

    def _start_utterance(self) -> None:
        if self.replying:
            # Barge-in: the engine clears Twilio's buffer at once and truncates the reply.
            self.barge_ins += 1
            self._barged_in = True
            self._events.put(AgentSpeechStarted())
        self._reply_id = None
        self._recording = bytearray(b"".join(self._preroll))
        self._preroll.clear()

    def _finish_utterance(self, trim: int) -> None:
        assert self._recording is not None
        utterance = bytes(self._recording[: max(0, len(self._recording) - trim)])
        self._recording = None
        if self._barged_in:
            self._barged_in = False
            self._events.put(AgentSpeechStopped())
        if not utterance:
            return
        seconds = len(utterance) / RATE
        self.utterances.append(seconds)
        self._events.put(AgentTranscript("caller", f"[utterance {seconds:.1f} s]"))
        self._reply(utterance, None, f"[echo {seconds:.1f} s]")

    def _reply(self, ulaw: bytes, label: str | None, transcript: str) -> None:
        """Queue one response: audio in 100 ms bursts, its transcript, then done."""
        self._responses += 1
        response_id = f"parrot-{self._responses}" + (f"-{label}" if label else "")
        events: list[AgentEvent] = [
            AgentAudio(ulaw[i : i + BURST], response_id) for i in range(0, len(ulaw), BURST)
        ]
        events += [AgentTranscript("agent", transcript), AgentResponseDone(response_id)]
        self._events.put(*events)
        self._reply_id = response_id
        # the relay starts playing at once; allow a little for its buffering and the network
        self._reply_end = self._clock + len(ulaw) + self._reply_tail
