"""Hold while the agent connects: what the caller hears from answer to the agent's first word.

Modes (the agent's ``hold`` option):

==================== ===================================================================
``none``             silence (default)
``text``             ``<Say voice=hold_voice>hold_text</Say>`` before ``<Connect>`` (Twilio's
                     text-to-speech; it plays to its end before the stream opens, so it
                     is a prelude of known length, not something relay can cut short)
``audio``            ``hold_audio`` once, over the media stream, from the stream's start
``music``            ``hold_music`` looped over the media stream
``audio_then_music`` ``hold_audio`` once, then ``hold_music`` looped
``text_then_music``  the ``<Say>`` prelude, then ``hold_music`` looped over the stream
==================== ===================================================================

Streamed hold audio stops at the agent's first audio, instantly: its local queue is
dropped and Twilio's buffer cleared (``clear``) in the same step that queues the agent's
first frame, so there is no overlap and no gap (relay keeps at most ``media.max_lead_ms`` of
hold audio ahead at Twilio). It never counts as the agent's first audio, and caller speech
during hold does not "interrupt" it.

Files (``hold_audio``, ``hold_music``): a path or an http(s) URL, WAV or MP3, mono. They
are decoded once with libsndfile (the ``soundfile`` wheel bundles it, MP3 included), taken
to 8 kHz (relay's own polyphase resampler from 16/24 kHz; from other rates a windowed-sinc
low-pass at 3.6 kHz then interpolation, once per file) and encoded to μ-law with relay's
codec; the result is cached per file (path + size + mtime, or URL) for every later call. A
local file is checked when the agent is saved (not audio, not mono, too long: refused with
the option's name); a URL is fetched at its first call (public addresses only, bounded in
size and time) and a failure there means silence for that call, logged and counted
(``relay_errors_total{kind="hold_audio"}``).
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
import trio

from ..errors import ConfigError, ConnectionClosed
from . import codec
from .websocket import OP_TEXT, build_frame

if TYPE_CHECKING:
    from .call import Call

log = logging.getLogger("relay.media.hold")

MODES = ("none", "text", "audio", "music", "audio_then_music", "text_then_music")
#: the response id hold audio carries in the downlink buffer
HOLD_RID = "relay-hold"
MAX_AUDIO_S = 120.0
MAX_MUSIC_S = 600.0
MAX_FILE_BYTES = 50 * 1024 * 1024
FETCH_TIMEOUT_S = 10.0
#: how long a call waits for a file's first decode before going on without hold
DECODE_WAIT_S = 0.5
#: hold audio queued locally ahead of what was sent (the downlink paces the rest)
QUEUE_MS = 200
RATE = 8000


# --- options --------------------------------------------------------------------------------
@dataclass(frozen=True)
class HoldSpec:
    mode: str = "none"
    text: str = ""
    voice: str = ""
    audio: str = ""
    music: str = ""

    @property
    def says(self) -> bool:
        return self.mode in ("text", "text_then_music")

    @property
    def streams(self) -> bool:
        return self.mode in ("audio", "music", "audio_then_music", "text_then_music")


def _is_url(source: str) -> bool:
    return urlsplit(source).scheme in ("http", "https")


def parse_hold(options: Any, where: str, *, check_files: bool = True) -> HoldSpec:
    """The hold options of an agent; ConfigError names the option (``where.key``).
    ``check_files``: decode local files now (when the agent is saved; a call does not)."""
    mode = options.get("hold", "none") or "none"
    if mode not in MODES:
        raise ConfigError(f"{where}.hold: one of {', '.join(MODES)}, got {mode!r}")
    values: dict[str, str] = {}
    for key in ("hold_text", "hold_voice", "hold_audio", "hold_music"):
        value = options.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > 3000):
            raise ConfigError(f"{where}.{key}: text of at most 3000 characters")
        values[key] = (value or "").strip()
    needs = {
        "text": ("hold_text",),
        "audio": ("hold_audio",),
        "music": ("hold_music",),
        "audio_then_music": ("hold_audio", "hold_music"),
        "text_then_music": ("hold_text", "hold_music"),
    }.get(mode, ())
    for key in needs:
        if not values[key]:
            raise ConfigError(f"{where}.{key}: required with hold = {mode!r}")
    for key, limit in (("hold_audio", MAX_AUDIO_S), ("hold_music", MAX_MUSIC_S)):
        source = values[key]
        if source and check_files and not _is_url(source):
            try:
                probe(source, limit)
            except ValueError as exc:
                raise ConfigError(f"{where}.{key}: {exc}") from None
    return HoldSpec(
        mode, values["hold_text"], values["hold_voice"], values["hold_audio"], values["hold_music"]
    )


# --- decoding -------------------------------------------------------------------------------
_cache: dict[tuple[str, int, int], bytes] = {}


def load_file(path: str, max_seconds: float) -> bytes:
    """A local WAV/MP3 as μ-law 8 kHz (cached per path, size and mtime)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror}") from None
    key = (os.path.abspath(path), st.st_size, int(st.st_mtime_ns))
    hit = _cache.get(key)
    if hit is not None:
        return hit
    if st.st_size > MAX_FILE_BYTES:
        raise ValueError(f"{path!r} is larger than {MAX_FILE_BYTES // 2**20} MB")
    with open(path, "rb") as fh:
        ulaw = decode(fh.read(), max_seconds, name=path)
    if len(_cache) > 64:
        _cache.clear()
    _cache[key] = ulaw
    return ulaw


def probe(path: str, max_seconds: float) -> None:
    """Check a local file without decoding it (what saving an agent costs: headers only)."""
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror}") from None
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{path!r} is larger than {MAX_FILE_BYTES // 2**20} MB")
    with open(path, "rb") as fh:
        _open_checked(fh, max_seconds, path).close()


def _open_checked(source: Any, max_seconds: float, name: str) -> Any:
    import soundfile

    try:
        f = soundfile.SoundFile(source)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        raise ValueError(f"{name!r} is not a WAV or MP3 file ({exc})") from None
    problem = ""
    if f.format not in ("WAV", "WAVEX", "MP3", "MPEG"):
        problem = f"{name!r} is {f.format}, not WAV or MP3"
    elif f.channels != 1:
        problem = f"{name!r} has {f.channels} channels; hold audio must be mono"
    elif f.frames > max_seconds * f.samplerate:
        seconds = f.frames / f.samplerate
        problem = f"{name!r} lasts {seconds:.0f} s, more than {max_seconds:g} s"
    if problem:
        f.close()
        raise ValueError(problem)
    return f


def decode(data: bytes, max_seconds: float, *, name: str = "audio") -> bytes:
    """WAV or MP3 bytes -> μ-law 8 kHz mono. ValueError says what is wrong."""
    import soundfile

    with _open_checked(io.BytesIO(data), max_seconds, name) as f:
        rate = f.samplerate
        try:
            samples = f.read(dtype="float32")
        except (soundfile.LibsndfileError, RuntimeError) as exc:
            raise ValueError(f"{name!r} could not be decoded ({exc})") from None
    if len(samples) == 0:
        raise ValueError(f"{name!r} holds no audio")
    pcm = to_8k(samples, rate)
    return bytes(codec.ulaw_encode(pcm.tobytes()))


def to_8k(samples: Any, rate: int) -> Any:
    """float32 samples at ``rate`` -> int16 at 8 kHz."""
    x = np.asarray(samples, dtype=np.float64)
    if rate in (8000, 16000, 24000):
        pcm = _to_int16(x).tobytes()
        if rate == RATE:
            return np.frombuffer(pcm, dtype="<i2")
        rs = codec.Resampler(rate, RATE)  # relay's polyphase resampler (relay/media/_codec)
        return np.frombuffer(rs.process(pcm) + rs.flush(), dtype="<i2")
    # Other rates (44.1, 48 kHz, ...): a windowed-sinc low-pass below 4 kHz, then
    # interpolation at the 8 kHz instants; once per file, off the media path.
    cutoff = 3600.0 / rate
    half = math.ceil(2 * rate / 1000)  # 2 ms of taps each side: ~40 dB at 4 kHz
    n = np.arange(-half, half + 1)
    taps = 2 * cutoff * np.sinc(2 * cutoff * n) * np.blackman(len(n))
    filtered = np.convolve(x, taps / taps.sum(), mode="same")
    count = int(len(x) * RATE / rate)
    y = np.interp(np.arange(count) * (rate / RATE), np.arange(len(x)), filtered)
    return _to_int16(y)


def _to_int16(x: Any) -> Any:
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype("<i2")


class HoldLibrary:
    """Decoded hold files of this process, fetched and decoded once each."""

    def __init__(self) -> None:
        self._urls: dict[str, bytes] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._decoding: set[str] = set()
        self.failures = 0

    def _load(self, source: str, max_seconds: float) -> bytes:  # in a worker thread
        try:
            return load_file(source, max_seconds)
        finally:
            self._decoding.discard(source)

    async def get(self, source: str, max_seconds: float) -> bytes | None:
        """μ-law of ``source``, or None (logged) when it cannot be had. A local file not
        decoded yet is given :data:`DECODE_WAIT_S`; past that the call goes on without
        hold while the decode finishes in its thread, for the next calls."""
        lock = self._locks.setdefault(source, trio.Lock())
        async with lock:
            try:
                if not _is_url(source):
                    if source in self._decoding:
                        return None  # an earlier call's decode is still running
                    self._decoding.add(source)
                    with trio.move_on_after(DECODE_WAIT_S):
                        return await trio.to_thread.run_sync(
                            self._load, source, max_seconds, abandon_on_cancel=True
                        )
                    log.info("hold audio %s still decoding: this call holds in silence", source)
                    return None
                hit = self._urls.get(source)
                if hit is None:
                    data = await fetch(source)
                    hit = await trio.to_thread.run_sync(decode, data, max_seconds)
                    self._urls[source] = hit
                return hit
            except (ValueError, OSError) as exc:
                self.failures += 1
                log.warning("hold audio %s unusable: %s", source[:200], exc)
                return None


async def fetch(url: str) -> bytes:
    """GET a hold file: public addresses only, bounded in size and time."""
    import httpx

    from .. import netguard
    from ..errors import RelayError

    try:  # connect to the address just checked (relay.netguard): no DNS rebinding
        target, headers, extensions = await netguard.http_target(
            url, {}, what=f"hold audio {urlsplit(url).hostname or ''}", refuse_private=True
        )
    except RelayError as exc:
        raise ValueError(str(exc)) from None
    with trio.fail_after(FETCH_TIMEOUT_S):
        async with httpx.AsyncClient(follow_redirects=False, timeout=FETCH_TIMEOUT_S) as client:
            async with client.stream(
                "GET", target, headers=headers, extensions=extensions
            ) as response:
                if response.status_code != 200:
                    raise ValueError(f"HTTP {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_FILE_BYTES:
                        raise ValueError("larger than the hold file limit")
    return bytes(body)


# --- playing --------------------------------------------------------------------------------
class HoldPlayer:
    """Feeds hold audio into a call's downlink buffer until the agent speaks."""

    def __init__(self, intro: bytes, music: bytes) -> None:
        self.intro = intro
        self.music = music
        self.active = bool(intro or music)
        self._pos = 0
        self._in_music = not intro
        self.sent_ms = 0

    def _chunk(self, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            source = self.music if self._in_music else self.intro
            if not source:
                break
            piece = source[self._pos : self._pos + size - len(out)]
            out += piece
            self._pos += len(piece)
            if self._pos >= len(source):
                self._pos = 0
                if not self._in_music:
                    self._in_music = True
                elif not self.music:
                    break
        return bytes(out)

    def top_up(self, call: Call) -> bool:
        """Queue hold audio up to :data:`QUEUE_MS` ahead; False once there is none left."""
        if not self.active:
            return False
        downlink = call.downlink
        if downlink.buffered_ms < QUEUE_MS:
            chunk = self._chunk(QUEUE_MS * 8)
            if not chunk:
                return downlink.buffered_ms > 0
            downlink.push(chunk, HOLD_RID)
            self.sent_ms += len(chunk) // 8
        return True

    async def pump(self, call: Call) -> None:
        """Keep hold audio flowing (runs while the agent connects, then in the call's
        nursery) until :meth:`stop` or the audio runs out."""
        while self.top_up(call):
            call._send_due()
            now_ms = trio.current_time() * 1000.0
            due = call.downlink.next_due(now_ms)
            wait = 0.05 if due is None else min(0.1, max(0.005, (due - now_ms) / 1000.0))
            await trio.sleep(wait)

    def stop(self, call: Call) -> None:
        """The agent's first audio: drop local hold audio and clear Twilio's buffer."""
        if not self.active:
            return
        self.active = False
        downlink = call.downlink
        if downlink.idle:
            return
        downlink.clear(trio.current_time() * 1000.0)
        downlink.drop_response(HOLD_RID)
        try:  # Twilio drops what it still holds of the hold audio
            call.ws.send_frames_nowait([build_frame(OP_TEXT, call.proto.clear_message())])
        except ConnectionClosed as exc:
            call._twilio_closed(exc)


async def while_connecting(player: HoldPlayer | None, call: Call, connect: Any) -> None:
    """Await ``connect()`` with the hold audio playing meanwhile; its error, unwrapped."""
    if player is None:
        await connect()
        return
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(player.pump, call)
        try:
            await connect()
        except BaseException as exc:  # re-raised outside the nursery: no ExceptionGroup
            error = exc
        finally:
            nursery.cancel_scope.cancel()
    if error is not None:
        try:
            raise error
        finally:
            del error  # else this frame and the exception form a cycle (relay/gcpolicy.py)


def add_prelude(response: Any, spec: HoldSpec) -> None:
    """``<Say>`` the hold text before ``<Connect>`` (modes text, text_then_music)."""
    if spec.says:
        response.say(spec.text, **({"voice": spec.voice} if spec.voice else {}))


async def player_for(call: Call, spec: HoldSpec) -> HoldPlayer | None:
    """The call's hold player (files from the process's library), or None."""
    if not spec.streams:
        return None
    library: HoldLibrary = call.state.hold_library
    intro = b""
    if spec.mode == "audio" or spec.mode == "audio_then_music":
        intro = await library.get(spec.audio, MAX_AUDIO_S) or b""
    music = b""
    if spec.mode in ("music", "audio_then_music", "text_then_music"):
        music = await library.get(spec.music, MAX_MUSIC_S) or b""
    if not intro and not music:
        call.metrics.error("hold_audio")
        return None
    return HoldPlayer(intro, music)
