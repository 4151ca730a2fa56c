"""Type stub of the compiled relay.media._codec (semantics: relay.media.codec_ref)."""

import select
from array import array
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from typing_extensions import Buffer

_C = TypeVar("_C")

def ulaw_encode(pcm: Buffer) -> bytes: ...
def ulaw_decode(ulaw: Buffer) -> bytes: ...
def alaw_encode(pcm: Buffer) -> bytes: ...
def alaw_decode(alaw: Buffer) -> bytes: ...
def b64decode(data: str | Buffer) -> bytes: ...
def _filter_taps(rate: int) -> tuple[float, ...]: ...
def _set_kernel(name: str) -> None: ...
def _get_kernel() -> str: ...

_FILTER_HEX: str

class Resampler:
    in_rate: int
    out_rate: int
    def __init__(self, in_rate: int, out_rate: int) -> None: ...
    @property
    def delay_ms(self) -> float: ...
    def process(self, pcm: Buffer) -> bytes: ...
    def flush(self) -> bytes: ...
    def reset(self) -> None: ...

class UlawToPcm:
    out_rate: int
    def __init__(self, out_rate: int) -> None: ...
    @property
    def delay_ms(self) -> float: ...
    def feed(self, ulaw: Buffer) -> bytes: ...
    def feed_b64(self, payload: str | Buffer) -> bytes: ...
    def feed_b64_many(self, payloads: list[str | bytes]) -> bytes: ...
    def flush(self) -> bytes: ...
    def reset(self) -> None: ...

class PcmToUlaw:
    in_rate: int
    def __init__(self, in_rate: int) -> None: ...
    @property
    def delay_ms(self) -> float: ...
    def feed(self, pcm: Buffer) -> bytes: ...
    def feed_b64(self, b64: str | Buffer) -> bytes: ...
    def flush(self) -> bytes: ...
    def reset(self) -> None: ...

class UplinkJitterBuffer:
    frame_ms: int
    reorder_ms: int
    max_fill_ms: int
    max_held: int
    gaps_filled: int
    silence_ms: int
    skipped_ms: int
    duplicates: int
    late_drops: int
    overflow_drops: int
    frames_out: int
    def __init__(
        self, frame_ms: int = 20, reorder_ms: int = 0, max_fill_ms: int = 2000, max_held: int = 50
    ) -> None: ...
    @property
    def held(self) -> int: ...
    @property
    def held_ms(self) -> int: ...
    def push(
        self, timestamp_ms: int, payload: object, duration_ms: int | None = None
    ) -> list[tuple[int, object | None, int]]: ...
    def flush(self) -> list[tuple[int, object | None, int]]: ...
    def reset(self) -> None: ...

class DownlinkBuffer:
    frame_ms: int
    max_lead_ms: int
    max_buffer_ms: int
    slack_ms: int
    frames_out: int
    overflow_bytes: int
    ignored_marks: int
    def __init__(
        self,
        frame_ms: int = 100,
        max_lead_ms: int = 200,
        max_buffer_ms: int = 600_000,
        slack_ms: int = 0,
    ) -> None: ...
    @property
    def pending_marks(self) -> int: ...
    @property
    def buffered_ms(self) -> int: ...
    @property
    def idle(self) -> bool: ...
    @property
    def overflow_ms(self) -> int: ...
    def push(self, ulaw: Buffer, response_id: str) -> None: ...
    def end_response(self, response_id: str) -> None: ...
    def drop_response(self, response_id: str) -> None: ...
    def pull(self, now_ms: float) -> list[tuple[bytes, str, str]]: ...
    def next_due(self, now_ms: float) -> float | None: ...
    def heard_ms(self, response_id: str, now_ms: float) -> int: ...
    def on_mark(self, name: str, now_ms: float) -> tuple[str, int] | None: ...
    def echoes(self, names: Iterable[str], now_ms: float) -> None: ...
    def clear(self, now_ms: float) -> tuple[str | None, int, int]: ...

def ws_mask(data: bytes | bytearray | memoryview, key: bytes | bytearray | memoryview) -> bytes: ...
def client_b64_frames(head: bytes, payloads: list[str], tail: bytes) -> bytes | None: ...
def client_audio_frame(head: bytes, audio: Buffer, tail: bytes) -> bytes: ...
def twilio_frames(
    media_prefix: bytes, mark_prefix: bytes, frames: list[tuple[bytes, str, str]]
) -> bytes: ...

class TwilioFrameParser(Generic[_C]):
    stream_sid: str
    max_message: int
    def __init__(
        self,
        stream_sid: str,
        *,
        max_message: int = 65536,
        control: Callable[[int, bytes], _C],
        violation: Callable[[str, int], Exception],
    ) -> None: ...
    def feed(self, data: bytes) -> list[str | bytes | tuple[int, str] | tuple[str] | _C]: ...

def twilio_uplink(
    parser: TwilioFrameParser[Any],
    jitter: UplinkJitterBuffer,
    data: bytes,
    silence: Callable[[int], str],
) -> tuple[list[str], list[str] | None, int, list[Any] | None]: ...

PUMP_IDLE: int
PUMP_SENT: int
PUMP_UNSENT: int
PUMP_PARSED: int
PUMP_CLOSED: int

class UplinkPump:
    parser: TwilioFrameParser[Any]
    twilio_fd: int
    agent_fd: int
    media: int
    sent: int
    payloads: list[str] | None
    marks: list[str] | None
    rest: list[Any] | None
    unsent: bytes | None
    error: int
    def __init__(
        self,
        parser: TwilioFrameParser[Any],
        jitter: UplinkJitterBuffer,
        silence: Callable[[int], str],
        twilio_fd: int,
        agent_fd: int,
        head: bytes,
        tail: bytes,
        to_pcm: UlawToPcm | None = None,
    ) -> None: ...
    def pump(self) -> int: ...

class PumpHandler:
    pump: UplinkPump
    armed: bool
    source: Any
    dest: Any
    def __init__(
        self,
        pump: UplinkPump,
        source: Any,
        dest: Any,
        metrics: Any,
        latency: Any,
        fallback: Callable[[], object],
        on_marks: Callable[[list[str]], object],
        on_result: Callable[[int, float], object],
        on_error: Callable[[Exception], object],
    ) -> None: ...
    def __call__(self) -> None: ...

class DownlinkHandler:
    armed: bool
    agent_fd: int
    twilio_fd: int
    source: Any
    dest: Any
    def __init__(
        self,
        agent_fd: int,
        twilio_fd: int,
        source: Any,
        dest: Any,
        parser: ServerFrameParser[Any],
        downlink: DownlinkBuffer,
        item_bytes: dict[str, int],
        truncated: set[str],
        protocol: Any,
        to_ulaw: PcmToUlaw | None,
        media_prefix: bytes,
        mark_prefix: bytes,
        call: Any,
        metrics: Any,
        latency: Any,
        clock: Callable[[], float],
        stamp: bool,
        ready: Callable[[], bool],
        fallback: Callable[[], object],
        on_closed: Callable[[int], object],
        on_rest: Callable[[list[Any], int, float, bool], object],
        on_unsent: Callable[[bytes], bool],
        wake: Callable[[], object],
        on_error: Callable[[Exception], object],
    ) -> None: ...
    def __call__(self) -> None: ...

class ServerFrameParser(Generic[_C]):
    max_message: int
    openai_audio: bool
    def __init__(
        self,
        *,
        max_message: int = 65536,
        control: Callable[[int, bytes], _C],
        violation: Callable[[str, int], Exception],
        openai_audio: bool = False,
    ) -> None: ...
    def feed(self, data: bytes) -> list[str | bytes | tuple[str, bytes] | _C]: ...

class Histogram:
    bounds: tuple[float, ...]
    window: int
    count: int
    sum: float
    def __init__(self, bounds: tuple[float, ...] | list[float], window: int = 8192) -> None: ...
    def observe(self, value: float) -> None: ...
    @property
    def counts(self) -> list[int]: ...
    @property
    def recent(self) -> array[float]: ...
    def percentile(self, q: float) -> float: ...
    def quantile(self, q: float) -> float: ...
    def render(self, name: str, labels: str = "") -> list[str]: ...

def timer_expirations(fd: int) -> int: ...

class ReactorCore:
    rate: float
    last: float
    wakeups: int
    dispatched: int
    handler_errors: int
    def __init__(
        self,
        epoll: select.epoll,
        clock: Callable[[], float],
        on_error: Callable[[int], object],
        heap: list[Any],
        run_due: Callable[[float], object],
    ) -> None: ...
    def use_clock_offset(self, offset: float) -> None: ...
    def now(self) -> float: ...
    def __len__(self) -> int: ...
    def handler(self, fd: int) -> Callable[[], object] | None: ...
    def set_handler(self, fd: int, handler: Callable[[], object]) -> None: ...
    def drop(self, fd: int) -> None: ...
    def poll(self) -> int: ...
    def serve(self, coalesce_s: float) -> bool: ...
