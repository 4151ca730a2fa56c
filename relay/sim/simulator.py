"""A Twilio call simulator: plays the part of Twilio (and the caller) against a relay.

Everything it sends and expects follows ``shared/reference/twilio-media-streams.md``:

1. The voice webhook: a signed ``application/x-www-form-urlencoded`` POST to
   ``{url_base}/twilio/voice``; the TwiML answer is parsed for ``<Connect><Stream>``.
2. The Media Streams WebSocket: upgrade signed with ``x-twilio-signature`` over the
   ``wss://`` URL without params; ``connected``, ``start``, then one ``media`` message per
   20 ms on an absolute schedule (``sequenceNumber``, ``chunk``, ``timestamp`` are strings),
   ``dtmf`` at scripted times, ``stop`` when the caller hangs up.
3. Twilio's outbound buffer: ``media`` is queued and "played" in real time (20 ms per
   20 ms), a ``mark`` is echoed once the audio before it has played (at once if nothing is
   buffered), ``clear`` drops the buffer and echoes pending marks immediately. Malformed
   messages are counted like Twilio logs them (31950 binary frame, 31951 invalid message).

What the caller "heard" is written to a WAV; a :class:`CallResult` keeps counters and a
timeline (caller speech, agent turns, clears, marks, hang-up) for reports and tests.

Network access goes through an *opener* ``(host, port, tls) -> trio stream``; tests pass one
built on in-memory streams so a whole call runs deterministically under ``MockClock``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import email.utils
import hashlib
import math
import secrets
import ssl
import wave
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlencode, urljoin, urlsplit

import h11
import numpy as np
import numpy.typing as npt
import orjson
import trio
import trio_websocket

from ..protocol.signature import compute_signature
from . import speech

RATE = speech.RATE
FRAME_BYTES = speech.FRAME  # 160 bytes of μ-law = 20 ms (observed Twilio frame size)
FRAME_S = FRAME_BYTES / RATE
SILENCE_FRAME = bytes([speech.ULAW_SILENCE]) * FRAME_BYTES
MAX_TWIML_BYTES = 64 * 1024  # error 11750: TwiML response > 64 kB
TWILIO_USER_AGENT = "TwilioProxy/1.1"
SERVER_EVENTS = frozenset({"media", "mark", "clear"})  # all a bidirectional stream accepts

#: ``(host, port, tls) -> connected byte stream``
Opener = Callable[[str, int, bool], Awaitable[trio.abc.Stream]]
#: ``(call_sid, t_seconds_since_stream_start, kind, detail)``
EventCallback = Callable[[str, float, str, str], None]


async def open_tcp(host: str, port: int, tls: bool) -> trio.abc.Stream:
    """Default opener: TCP, plus TLS with the system trust store for https/wss."""
    if tls:
        return await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=ssl.create_default_context(), https_compatible=True
        )
    return await trio.open_tcp_stream(host, port)


# --- WAV ------------------------------------------------------------------------------------
def write_wav(path: str | Path, pcm: npt.ArrayLike | bytes, rate: int = RATE) -> Path:
    """Write mono 16-bit PCM (int16 array or PCM16 LE bytes) as a WAV file."""
    if isinstance(pcm, bytes | bytearray | memoryview):
        data = bytes(pcm)
    else:
        data = np.asarray(pcm, dtype="<i2").tobytes()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(out), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data)
    return out


def _resample_linear(
    x: npt.NDArray[np.float64], rate: int, out_rate: int
) -> npt.NDArray[np.float64]:
    if rate == out_rate or len(x) == 0:
        return x
    if rate > out_rate:  # crude anti-alias: box filter as wide as the decimation step
        width = math.ceil(rate / out_rate)
        x = np.convolve(x, np.ones(width) / width, mode="same")
    n_out = round(len(x) * out_rate / rate)
    return np.interp(np.arange(n_out) * (rate / out_rate), np.arange(len(x)), x)


def load_wav(path: str | Path) -> bytes:
    """Read a PCM WAV and return μ-law 8 kHz mono bytes, ready to stream.

    8 kHz mono 16-bit is used as is; other PCM widths, channel counts and rates are mixed
    down to mono and linearly resampled (good enough for test calls, not for music).
    """
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{path}: not a PCM WAV file ({exc}); convert it to 16-bit PCM") from None
    if width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128.0) * 256.0
    elif width == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float64)
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v & 0x800000, v - (1 << 24), v) / 256.0).astype(np.float64)
    elif width == 4:
        x = np.frombuffer(raw, dtype="<i4").astype(np.float64) / 65536.0
    else:
        raise ValueError(f"{path}: unsupported sample width {width} bytes")
    if channels > 1:
        x = x[: len(x) - len(x) % channels].reshape(-1, channels).mean(axis=1)
    x = _resample_linear(x, rate, RATE)
    return speech.mulaw_encode(np.clip(np.round(x), -32768, 32767).astype(np.int16))


# --- HTTP (webhooks) ------------------------------------------------------------------------
@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    truncated: bool = False  # body exceeded the limit (only the first bytes kept)


async def http_post_form(
    url: str,
    form: Mapping[str, str],
    *,
    auth_token: str,
    opener: Opener = open_tcp,
    timeout: float = 15.0,
    max_body: int = MAX_TWIML_BYTES,
) -> HttpResponse:
    """POST ``form`` to ``url`` the way Twilio does, signed with ``X-Twilio-Signature``.

    Signature rule: HMAC-SHA1 over the exact URL requested plus sorted ``name+value`` pairs.
    One request per connection (``Connection: close``), bounded by ``timeout`` overall.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    body = urlencode(dict(form)).encode()
    headers = [
        ("Host", parts.netloc),
        ("User-Agent", TWILIO_USER_AGENT),
        ("Accept", "*/*"),
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Content-Length", str(len(body))),
        ("X-Twilio-Signature", compute_signature(auth_token, url, form)),
        ("Connection", "close"),
    ]
    conn = h11.Connection(h11.CLIENT)
    with trio.fail_after(timeout):
        stream = await opener(parts.hostname, port, tls)
        try:
            request = h11.Request(method="POST", target=target, headers=headers)
            await stream.send_all(
                conn.send(request) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
            )
            return await _read_response(conn, stream, max_body)
        finally:
            await trio.aclose_forcefully(stream)


async def _read_response(
    conn: h11.Connection, stream: trio.abc.Stream, max_body: int
) -> HttpResponse:
    response = HttpResponse(0, {}, b"")
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))  # b"" = EOF
        elif isinstance(event, h11.Response):
            response.status = event.status_code
            response.headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > max_body:
                response.truncated = True
                break
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    response.body = bytes(body[:max_body])
    return response


# --- TwiML ----------------------------------------------------------------------------------
@dataclass
class TwimlPlan:
    """What Twilio would do with a TwiML answer, as far as the simulator cares."""

    verbs: list[str] = field(default_factory=list)  # top-level verbs in order
    stream_url: str | None = None
    stream_name: str | None = None
    track: str | None = None
    parameters: dict[str, str] = field(default_factory=dict)  # -> start.customParameters
    status_callback: str | None = None
    status_callback_method: str = "POST"
    after_connect: list[str] = field(default_factory=list)  # verbs run once the stream ends
    connect_action: str | None = None  # <Connect action>: fetched once the stream ends
    rejected: str | None = None  # why no bidirectional stream will be opened
    warnings: list[str] = field(default_factory=list)


def parse_twiml(text: str | bytes) -> TwimlPlan:
    """Find ``<Connect><Stream url>`` (and its ``<Parameter>``s) or why there is none."""
    plan = TwimlPlan()
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        plan.rejected = f"invalid TwiML (12100 document parse failure: {exc})"
        return plan
    if root.tag != "Response":
        plan.rejected = f"invalid TwiML (root is <{root.tag}>, not <Response>)"
        return plan
    plan.verbs = [child.tag for child in root]
    for index, verb in enumerate(root):
        if verb.tag == "Connect":
            _parse_connect(verb, plan)
            plan.connect_action = verb.get("action")
            plan.after_connect = plan.verbs[index + 1 :]
            break
        if verb.tag == "Reject":  # must be the first verb; the caller hears busy/not in service
            plan.rejected = f"reject ({verb.get('reason', 'rejected')})"
            return plan
        if verb.tag == "Hangup":
            plan.rejected = "hangup"
            return plan
    else:
        said = " ".join((v.text or "").strip() for v in root if v.tag == "Say")
        kinds = "+".join(plan.verbs) or "empty"
        plan.rejected = f"no <Connect><Stream> ({kinds}{': ' + said[:80] if said else ''})"
        return plan
    if "Pause" in plan.after_connect:
        plan.warnings.append("<Pause> after <Connect>: the call stays up after the stream ends")
    return plan


def _parse_connect(connect: ET.Element, plan: TwimlPlan) -> None:
    stream = connect.find("Stream")
    if stream is None:
        plan.rejected = "no <Stream> inside <Connect>"
        return
    url = stream.get("url")
    if not url:
        plan.rejected = "<Stream> without url"
        return
    parts = urlsplit(url)
    if parts.query:  # Twilio drops query strings; data belongs in <Parameter>
        plan.warnings.append("stream url query string is stripped by Twilio; use <Parameter>")
        url = url.split("?", 1)[0]
    track = stream.get("track")
    if track not in (None, "inbound_track"):  # with <Connect> only inbound_track is allowed
        plan.rejected = f"31941: invalid track {track!r} for <Connect><Stream>"
        return
    plan.stream_url = url
    plan.stream_name = stream.get("name")
    plan.track = track
    plan.status_callback = stream.get("statusCallback")
    plan.status_callback_method = (stream.get("statusCallbackMethod") or "POST").upper()
    for param in stream.findall("Parameter"):
        name, value = param.get("name"), param.get("value", "")
        if not name:
            continue
        if len(name) + len(value) > 500:
            plan.warnings.append(f"<Parameter {name}> longer than Twilio's ~500 characters")
        plan.parameters[name] = value


# --- results --------------------------------------------------------------------------------
@dataclass
class CallResult:
    """Everything observed during one simulated call. Times are seconds."""

    call_sid: str
    account_sid: str = ""
    stream_sid: str = ""
    from_: str = ""
    to: str = ""
    http_status: int = 0
    twiml: str = ""
    stream_url: str = ""
    custom_parameters: dict[str, str] = field(default_factory=dict)
    rejected: str | None = None  # the TwiML did not open a stream (reject, hangup, HTTP error)
    refused: str | None = None  # the WebSocket upgrade failed (403, timeout, ...)
    error: str | None = None  # anything else that ended the call abnormally
    hung_up_by: str | None = None  # "caller" | "relay"
    close_code: int | None = None
    close_reason: str = ""
    webhook_s: float | None = None  # POST -> TwiML
    connect_s: float | None = None  # TCP + upgrade
    duration_s: float = 0.0  # stream start -> hang-up
    media_sent: int = 0
    dtmf_sent: int = 0
    media_received: int = 0
    bytes_received: int = 0
    marks_received: int = 0
    marks_echoed: int = 0
    marks_discarded: int = 0  # echoed because of a clear: audio discarded, not played
    clears: int = 0
    heard_ms: int = 0  # agent audio actually played to the caller
    dropped_ms: int = 0  # agent audio discarded by clears
    unplayed_ms_at_hangup: int = 0  # agent audio still buffered when the call ended
    invalid_messages: int = 0  # Twilio warning 31951
    binary_frames: int = 0  # Twilio warning 31950
    first_agent_audio_s: float | None = None  # `start` sent -> first media received
    after_twiml: str = ""  # what the <Connect action> URL answered once the stream ended
    said: list[str] = field(default_factory=list)  # <Say> texts of that answer
    wav_path: str | None = None
    warnings: list[str] = field(default_factory=list)
    timeline: list[tuple[float, str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """The call was answered with a stream and ended by a hang-up, not an error."""
        return not (self.rejected or self.refused or self.error) and self.hung_up_by is not None

    @property
    def outcome(self) -> str:
        if self.rejected:
            return f"rejected: {self.rejected}"
        if self.refused:
            return f"refused: {self.refused}"
        if self.error:
            return f"error: {self.error}"
        return f"hung up by {self.hung_up_by}" if self.hung_up_by else "incomplete"

    def times(self, kind: str) -> list[float]:
        return [t for t, k, _ in self.timeline if k == kind]

    def response_latencies(self) -> list[float]:
        """End of each caller utterance -> first agent audio of the reply that follows."""
        out: list[float] = []
        pending: float | None = None
        for t, kind, _ in self.timeline:
            if kind == "caller_speech_stop":
                pending = t
            elif kind in ("caller_speech_start", "dtmf"):  # a key press prompts its own reply
                pending = None
            elif kind == "agent_audio_start" and pending is not None:
                out.append(t - pending)
                pending = None
        return out

    def barge_in_latencies(self) -> list[float]:
        """Caller starts talking over agent audio -> the relay's ``clear`` arrives."""
        out: list[float] = []
        speaking = False
        pending: float | None = None
        for t, kind, _ in self.timeline:
            if kind == "agent_audio_start":
                speaking = True
            elif kind == "agent_audio_end":
                speaking, pending = False, None
            elif kind == "caller_speech_start" and speaking:
                pending = t
            elif kind == "clear":
                if pending is not None:
                    out.append(t - pending)
                speaking, pending = False, None
        return out

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["ok"] = self.ok
        data["response_latencies"] = self.response_latencies()
        data["barge_in_latencies"] = self.barge_in_latencies()
        return data


# --- Twilio's outbound buffer ----------------------------------------------------------------
class _Mark:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class Playout:
    """Twilio's buffer of audio to play to the caller, marks interleaved.

    Doc rules implemented: audio plays in order; a mark is echoed when the audio sent before
    it has finished playing, or at once if nothing is buffered; ``clear`` empties the buffer
    and every pending mark is echoed immediately (meaning *discarded*, not *played*).

    ``tick`` is called every 20 ms: it returns the marks whose audio finished during the
    previous frame, then the next frame to play (silence-padded). A mark that arrives while
    the last frame is still playing waits for the next tick, like one in the buffer would.
    """

    def __init__(self, frame_bytes: int = FRAME_BYTES) -> None:
        self.frame_bytes = frame_bytes
        self._items: deque[bytes | _Mark] = deque()
        self._offset = 0  # bytes of the head audio chunk already played
        self._due: list[str] = []  # marks reached by the frame now playing
        self.buffered = 0  # audio bytes queued, not yet played
        self.playing = False  # the frame now playing holds agent audio

    @property
    def pending_marks(self) -> int:
        return len(self._due) + sum(1 for item in self._items if isinstance(item, _Mark))

    @property
    def idle(self) -> bool:
        return self.buffered == 0 and not self._items and not self._due and not self.playing

    def push_audio(self, ulaw: bytes) -> None:
        if ulaw:
            self._items.append(ulaw)
            self.buffered += len(ulaw)

    def push_mark(self, name: str) -> bool:
        """Queue a mark; True when it must be echoed right away (nothing buffered)."""
        if self._items:
            self._items.append(_Mark(name))
            return False
        if self.playing or self._due:
            self._due.append(name)  # behind the frame now playing
            return False
        return True

    def clear(self) -> tuple[int, list[str]]:
        """Drop queued audio; returns (bytes dropped, marks to echo now in order)."""
        marks = self._due + [item.name for item in self._items if isinstance(item, _Mark)]
        dropped = self.buffered
        self._items.clear()
        self._due = []
        self._offset = 0
        self.buffered = 0
        return dropped, marks

    def tick(self) -> tuple[bytes, int, list[str]]:
        """Advance 20 ms: (frame to play, agent-audio bytes in it, marks finished by now)."""
        done, self._due = self._due, []
        out = bytearray()
        need = self.frame_bytes
        while self._items and len(out) < need:
            head = self._items[0]
            if isinstance(head, _Mark):  # crossed mid-frame: finished once this frame has
                self._due.append(head.name)
                self._items.popleft()
                continue
            take = head[self._offset : self._offset + need - len(out)]
            out += take
            self._offset += len(take)
            if self._offset >= len(head):
                self._items.popleft()
                self._offset = 0
        while self._items and isinstance(self._items[0], _Mark):  # right behind this frame
            self._due.append(cast(_Mark, self._items.popleft()).name)
        audio = len(out)
        self.buffered -= audio
        self.playing = audio > 0
        if audio < need:
            out += SILENCE_FRAME[: need - audio]
        return bytes(out), audio, done


# --- the call -------------------------------------------------------------------------------
def _sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def _account_sid_for(auth_token: str) -> str:
    """A stable fake AccountSid per auth token (real calls of one account share it)."""
    return "AC" + hashlib.sha256(auth_token.encode()).hexdigest()[:32]


def _as_ulaw(audio: npt.ArrayLike | bytes | None, fallback_s: float) -> bytes:
    if audio is None:
        return speech.mulaw_encode(speech.default_caller_script(fallback_s))
    if isinstance(audio, bytes | bytearray | memoryview):
        return bytes(audio)
    return speech.mulaw_encode(np.asarray(audio, dtype=np.int16))


@dataclass
class _Dial:
    host: str
    port: int
    tls: bool
    resource: str
    host_header: str
    extra_headers: list[tuple[bytes, bytes]]


def _dial_plan(stream_url: str, url_base: str, dial_stream_host: bool, signature: str) -> _Dial:
    """Where to open the socket for ``stream_url`` and with which headers.

    Twilio dials the public ``wss://`` URL. Locally that host is usually a tunnel or proxy
    in front of the relay, so by default the simulator dials ``url_base`` instead (TLS only
    if it is https) and sends what such a proxy adds: the public ``Host`` and
    ``X-Forwarded-Proto``. The signature is always over the public URL, as Twilio signs it.
    """
    s = urlsplit(stream_url)
    base = urlsplit(url_base)
    stream_tls = s.scheme in ("wss", "https")
    if dial_stream_host or not base.hostname:
        host, tls = s.hostname or "", stream_tls
        port = s.port or (443 if tls else 80)
    else:
        host, tls = base.hostname, base.scheme == "https"
        port = base.port or (443 if tls else 80)
    headers = [
        (b"x-twilio-signature", signature.encode()),
        (b"user-agent", b"Twilio.TmeWs/1.0"),
    ]
    if stream_tls and not tls:  # we play the TLS-terminating proxy
        headers.append((b"x-forwarded-proto", b"https"))
    return _Dial(host, port, tls, s.path or "/", s.netloc, headers)


class _EofWatch(trio.abc.Stream):
    """Pass-through stream that notices when the peer closes (for the handshake race)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.eof = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.inner.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.eof.set()
            raise
        if not data:
            self.eof.set()
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class CallOptions:
    url_base: str
    auth_token: str
    audio: bytes  # μ-law 8 kHz
    to: str
    from_: str
    call_sid: str
    account_sid: str
    duration_s: float | None
    hangup_after_s: float | None
    max_duration_s: float
    dtmf: list[tuple[float, str]]
    record_path: str | None
    on_event: EventCallback | None
    connect_timeout: float
    send_timeout: float
    disconnect_timeout: float
    turn_gap_s: float
    status_callback: str | None
    dial_stream_host: bool
    opener: Opener
    #: the voice URL to request (default ``url_base/twilio/voice``); an outbound call's
    #: carries the query string its creator put in ``Url``
    webhook_url: str | None = None
    direction: str = "inbound"
    extra_params: dict[str, str] = field(default_factory=dict)
    #: set from outside to end the call the way Twilio does (``stop``, close): a REST
    #: hang-up or redirect of the live call
    end_event: trio.Event | None = None


class _Call:
    """One call: webhook, stream session, callbacks. Fills ``self.result``."""

    def __init__(self, opts: CallOptions) -> None:
        self.o = opts
        self.result = CallResult(
            call_sid=opts.call_sid, account_sid=opts.account_sid, from_=opts.from_, to=opts.to
        )
        self.webhook_url = opts.webhook_url or opts.url_base.rstrip("/") + "/twilio/voice"
        self.plan = TwimlPlan()

    def _base_params(self) -> dict[str, str]:
        o = self.o
        return {
            "CallSid": o.call_sid,
            "AccountSid": o.account_sid,
            "From": o.from_,
            "To": o.to,
            "Caller": o.from_,
            "Called": o.to,
            "ApiVersion": "2010-04-01",
            "Direction": o.direction,
            **o.extra_params,
        }

    async def run(self) -> CallResult:
        r = self.result
        try:
            if await self._webhook():
                await self._stream()
            if r.hung_up_by == "relay" and self.plan.connect_action:
                await self._connect_action()
        except* (OSError, trio.TooSlowError, trio.BrokenResourceError, h11.ProtocolError) as group:
            r.error = _describe(group)
        if r.hung_up_by is not None and self.o.status_callback:
            await self._call_completed()
        return r

    async def _webhook(self) -> bool:
        r = self.result
        params = self._base_params() | {"CallStatus": "ringing"}
        start = trio.current_time()
        response = await http_post_form(
            self.webhook_url,
            params,
            auth_token=self.o.auth_token,
            opener=self.o.opener,
            timeout=self.o.connect_timeout,
        )
        r.webhook_s = trio.current_time() - start
        r.http_status = response.status
        r.twiml = response.body.decode("utf-8", "replace")
        if response.status != 200:
            r.rejected = f"HTTP {response.status} from voice webhook"
            return False
        if response.truncated:
            r.rejected = "11750: TwiML response larger than 64 kB"
            return False
        self.plan = parse_twiml(response.body)
        r.warnings += self.plan.warnings
        stream_scheme = urlsplit(self.plan.stream_url or "").scheme
        if self.webhook_url.startswith("https:") and stream_scheme != "wss":
            # Twilio refuses anything but wss:// (31922); a local http relay may use ws://
            r.warnings.append(f"31922: stream url must be wss:// (got {stream_scheme}://)")
        if self.webhook_url.startswith("https:") and urlsplit(self.plan.stream_url or "").port:
            r.warnings.append("stream url has a port: Twilio's signature may not match")
        if self.plan.rejected:
            r.rejected = self.plan.rejected
            return False
        r.stream_url = self.plan.stream_url or ""
        r.custom_parameters = dict(self.plan.parameters)
        return True

    async def _stream(self) -> None:
        r, o = self.result, self.o
        signature = compute_signature(o.auth_token, r.stream_url)  # URL, no params
        dial = _dial_plan(r.stream_url, o.url_base, o.dial_stream_host, signature)
        start = trio.current_time()
        try:
            with trio.fail_after(o.connect_timeout):
                raw = await o.opener(dial.host, dial.port, dial.tls)
        except OSError as exc:
            r.refused = f"31902: connection refused ({exc})"
            return
        except trio.TooSlowError:
            r.refused = "31901: connection timeout"
            return
        stream = _EofWatch(raw)
        try:
            async with trio.open_nursery() as nursery:
                ws = await self._handshake(nursery, stream, dial)
                if ws is None:
                    await trio.aclose_forcefully(stream)
                    return
                r.connect_s = trio.current_time() - start
                r.stream_sid = _sid("MZ")
                if self.plan.status_callback:
                    nursery.start_soon(self._stream_status, "stream-started")
                session = _Session(ws, r, o, self.plan)
                await session.run()
                with trio.move_on_after(o.disconnect_timeout):
                    await ws.aclose()
                await trio.aclose_forcefully(stream)
        except* trio_websocket.ConnectionRejected as group:
            rejection = cast(trio_websocket.ConnectionRejected, _first(group))
            r.refused = f"31920: upgrade answered HTTP {rejection.status_code}"
        finally:
            if self.plan.status_callback and r.stream_sid:
                # shielded so a cancelled batch still reports, bounded so it cannot hang
                with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                    await self._stream_status("stream-error" if r.error else "stream-stopped")

    async def _handshake(
        self, nursery: trio.Nursery, stream: _EofWatch, dial: _Dial
    ) -> trio_websocket.WebSocketConnection | None:
        """Upgrade; None (with ``refused`` set) on timeout or a close before the answer."""
        got: list[trio_websocket.WebSocketConnection] = []

        async def upgrade(cancel: trio.CancelScope) -> None:
            ws = await trio_websocket.wrap_client_stream(
                nursery,
                cast(trio.SocketStream, stream),
                dial.host_header,
                dial.resource,
                extra_headers=dial.extra_headers,
                message_queue_size=64,
            )
            got.append(ws)
            cancel.cancel()

        async def closed(cancel: trio.CancelScope) -> None:
            await stream.eof.wait()
            cancel.cancel()

        with trio.move_on_after(self.o.connect_timeout) as timer:
            async with trio.open_nursery() as race:
                race.start_soon(upgrade, race.cancel_scope)
                race.start_soon(closed, race.cancel_scope)
        if got:
            return got[0]
        self.result.refused = (
            "31920: no handshake answer (timeout)"
            if timer.cancelled_caught
            else "31920: connection closed during handshake"
        )
        return None

    async def _connect_action(self) -> None:
        """The relay closed the stream: Twilio requests ``<Connect action>`` and runs its
        answer (here: the ``<Say>`` texts are kept, as what the caller heard)."""
        assert self.plan.connect_action
        params = self._base_params() | {"CallStatus": "in-progress"}
        response = await http_post_form(
            urljoin(self.webhook_url, self.plan.connect_action),
            params,
            auth_token=self.o.auth_token,
            opener=self.o.opener,
            timeout=self.o.connect_timeout,
        )
        r = self.result
        r.after_twiml = response.body.decode("utf-8", "replace")
        try:
            root = ET.fromstring(response.body)
        except ET.ParseError:
            r.warnings.append("12100: <Connect action> answered invalid TwiML")
            return
        r.said = [(verb.text or "").strip() for verb in root if verb.tag == "Say"]

    async def _post_callback(self, url: str, params: dict[str, str]) -> None:
        """Status callbacks are fire-and-forget for Twilio: failures are only warnings."""
        try:
            resp = await http_post_form(
                url,
                params,
                auth_token=self.o.auth_token,
                opener=self.o.opener,
                timeout=self.o.connect_timeout,
            )
            if resp.status >= 400:
                self.result.warnings.append(f"status callback {url} answered {resp.status}")
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, h11.ProtocolError) as exc:
            self.result.warnings.append(f"status callback {url} failed: {exc!r}")

    async def _stream_status(self, event: str) -> None:
        plan, r = self.plan, self.result
        assert plan.status_callback
        if plan.status_callback_method != "POST":
            r.warnings.append("stream statusCallbackMethod other than POST is not simulated")
            return
        params = {
            "AccountSid": r.account_sid,
            "CallSid": r.call_sid,
            "StreamSid": r.stream_sid,
            "StreamName": plan.stream_name or r.stream_sid,
            "StreamEvent": event,
            "Timestamp": datetime.now(UTC).isoformat(),
        }
        if event == "stream-error":
            params["StreamError"] = r.error or "stream error"
        await self._post_callback(urljoin(self.webhook_url, plan.status_callback), params)

    async def _call_completed(self) -> None:
        """The number's status callback for the terminal ``completed`` event."""
        assert self.o.status_callback
        params = self._base_params() | {
            "CallStatus": "completed",
            "CallDuration": str(math.ceil(self.result.duration_s)),
            "SequenceNumber": "0",
            "CallbackSource": "call-progress-events",
            "Timestamp": email.utils.format_datetime(datetime.now(UTC)),
        }
        with trio.CancelScope(shield=True), trio.move_on_after(2.0):
            await self._post_callback(urljoin(self.webhook_url, self.o.status_callback), params)


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _describe(group: BaseExceptionGroup[Any]) -> str:
    exc = _first(group)
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    return f"{type(exc).__name__}: {exc}"


class _Session:
    """The Media Streams conversation on an open WebSocket."""

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
        result: CallResult,
        opts: CallOptions,
        plan: TwimlPlan,
    ) -> None:
        self.ws = ws
        self.r = result
        self.o = opts
        self.plan = plan
        self.playout = Playout()
        self.seq = 0
        self.t0 = 0.0
        self.started = False  # `start` sent: the stream clock runs (t0 may be 0 on MockClock)
        self.audio = opts.audio
        self.n_frames = math.ceil(len(self.audio) / FRAME_BYTES)
        self.dtmf = deque(sorted(opts.dtmf))
        self.speech_marks = self._caller_speech_frames()
        self.heard = bytearray() if opts.record_path else None
        self.turn_active = False
        self.last_agent_audio = 0.0  # end of the last played agent frame (s since start)
        self.last_rx = 0.0
        self.caller_hung_up = False
        self.scope = trio.CancelScope()

    def _caller_speech_frames(self) -> dict[int, list[str]]:
        """Frame index -> caller_speech_start/stop, from the audio we are about to send."""
        events: dict[int, list[str]] = {}
        for start, stop in speech.detect_speech(speech.mulaw_decode(self.audio)):
            events.setdefault(round(start / FRAME_S), []).append("caller_speech_start")
            events.setdefault(round(stop / FRAME_S), []).append("caller_speech_stop")
        return events

    # --- bookkeeping --------------------------------------------------------------------
    def now(self) -> float:
        return trio.current_time() - self.t0

    def event(self, kind: str, detail: str = "", t: float | None = None) -> None:
        when = self.now() if t is None else t
        self.r.timeline.append((round(when, 4), kind, detail))
        if self.o.on_event is not None:
            self.o.on_event(self.r.call_sid, when, kind, detail)

    def warn(self, text: str) -> None:
        if len(self.r.warnings) < 50:
            self.r.warnings.append(text)

    async def send(self, message: dict[str, Any], *, numbered: bool = True) -> None:
        """Send one JSON text frame; every Twilio message but ``connected`` is numbered."""
        if numbered:
            self.seq += 1
            message = {"event": message["event"], "sequenceNumber": str(self.seq)} | message
        with trio.fail_after(self.o.send_timeout):  # a half-dead socket must not stall us
            await self.ws.send_message(orjson.dumps(message).decode())

    # --- lifecycle ----------------------------------------------------------------------
    async def run(self) -> None:
        r, o = self.r, self.o
        try:
            with self.scope:
                await self.send(
                    {"event": "connected", "protocol": "Call", "version": "1.0.0"}, numbered=False
                )
                self.t0 = trio.current_time()
                self.started = True
                await self.send(
                    {
                        "event": "start",
                        "streamSid": r.stream_sid,
                        "start": {
                            "accountSid": r.account_sid,
                            "streamSid": r.stream_sid,
                            "callSid": r.call_sid,
                            "tracks": ["inbound"],
                            "mediaFormat": {
                                "encoding": "audio/x-mulaw",
                                "sampleRate": 8000,
                                "channels": 1,
                            },
                            "customParameters": dict(self.plan.parameters),
                        },
                    }
                )
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._receiver)
                    nursery.start_soon(self._ticker)
                    if o.end_event is not None:
                        nursery.start_soon(self._ended_by_twilio, o.end_event)
        except* trio_websocket.ConnectionClosed:
            self._closed_by_relay()
        except* trio.TooSlowError:
            r.error = f"31903: a send blocked for more than {o.send_timeout:g} s"
        finally:
            self._finish()

    def _finish(self) -> None:
        r = self.r
        r.duration_s = round(self.now(), 3) if self.started else 0.0
        r.unplayed_ms_at_hangup = self.playout.buffered // 8
        if self.turn_active:
            self.event("agent_audio_end", "call ended", t=min(self.last_agent_audio, self.now()))
        r.timeline.sort(key=lambda item: item[0])
        if self.heard is not None and self.o.record_path:
            r.wav_path = str(write_wav(self.o.record_path, speech.mulaw_decode(bytes(self.heard))))

    def _closed_by_relay(self) -> None:
        """The server closed the socket: for Twilio that is a clean hang-up by the relay."""
        if self.caller_hung_up or self.r.hung_up_by is not None:
            return
        reason = self.ws.closed
        self.r.hung_up_by = "relay"
        self.r.close_code = reason.code if reason else 1006
        self.r.close_reason = (reason.reason or "") if reason else ""
        self.event("hangup", f"relay (close {self.r.close_code})")
        if self.r.close_code != 1000:  # Twilio logs 31921 for an unexpected close code
            self.warn(f"31921: relay closed the stream with code {self.r.close_code}")
        self.scope.cancel()

    async def _hang_up(self) -> None:
        """The caller hangs up: ``stop``, then close the socket."""
        r = self.r
        await self.send(
            {
                "event": "stop",
                "streamSid": r.stream_sid,
                "stop": {"accountSid": r.account_sid, "callSid": r.call_sid},
            }
        )
        self.caller_hung_up = True
        r.hung_up_by = "caller"
        self.event("hangup", "caller")
        with trio.move_on_after(self.o.disconnect_timeout):
            await self.ws.aclose(1000)
        reason = self.ws.closed
        r.close_code = reason.code if reason else 1000
        self.scope.cancel()

    async def _ended_by_twilio(self, event: trio.Event) -> None:
        """A REST hang-up or redirect: Twilio sends ``stop`` and closes the stream."""
        await event.wait()
        if self.r.hung_up_by is None:
            await self._hang_up()
            self.r.hung_up_by = "twilio"

    # --- the 20 ms clock ------------------------------------------------------------------
    async def _ticker(self) -> None:
        """Every 20 ms on an absolute schedule: finish marks, play a frame, send a frame."""
        try:
            k = 0
            while True:
                await trio.sleep_until(self.t0 + k * FRAME_S)  # no drift: t0 + k * 20 ms
                t = k * FRAME_S
                if self._caller_done(k):
                    await self._hang_up()
                    return
                frame, audio_bytes, done = self.playout.tick()
                for name in done:
                    await self._echo_mark(name)
                self._played(frame, audio_bytes, t)
                while self.dtmf and self.dtmf[0][0] <= t + 1e-9:
                    await self._send_dtmf(self.dtmf.popleft()[1])
                for kind in self.speech_marks.get(k, ()):
                    self.event(kind, t=t)
                await self._send_media(k)
                k += 1
        except trio_websocket.ConnectionClosed:
            self._closed_by_relay()

    def _played(self, frame: bytes, audio_bytes: int, t: float) -> None:
        if self.heard is not None:
            self.heard += frame
        if audio_bytes:
            self.r.heard_ms += audio_bytes // 8
            self.last_agent_audio = t + audio_bytes / RATE
        elif (
            self.turn_active
            and self.playout.buffered == 0
            and t - self.last_agent_audio >= self.o.turn_gap_s
        ):
            self.turn_active = False
            self.event("agent_audio_end", "", t=self.last_agent_audio)

    def _caller_done(self, k: int) -> bool:
        t = k * FRAME_S
        o = self.o
        if o.duration_s is not None and t >= o.duration_s - 1e-9:
            return True
        if t >= o.max_duration_s:
            return True
        if k < self.n_frames or o.hangup_after_s is None:
            return False
        audio_end = self.n_frames * FRAME_S
        quiet_since = max(audio_end, self.last_agent_audio, self.last_rx)
        return self.playout.idle and t - quiet_since >= o.hangup_after_s - 1e-9

    async def _send_media(self, k: int) -> None:
        chunk = self.audio[k * FRAME_BYTES : (k + 1) * FRAME_BYTES]
        if len(chunk) < FRAME_BYTES:  # after the script Twilio keeps sending line audio
            chunk += SILENCE_FRAME[len(chunk) :]
        await self.send(
            {
                "event": "media",
                "streamSid": self.r.stream_sid,
                "media": {
                    "track": "inbound",
                    "chunk": str(k + 1),
                    "timestamp": str(k * 20),
                    "payload": base64.b64encode(chunk).decode("ascii"),
                },
            }
        )
        self.r.media_sent += 1

    async def _send_dtmf(self, digit: str) -> None:
        await self.send(
            {
                "event": "dtmf",
                "streamSid": self.r.stream_sid,
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
        )
        self.r.dtmf_sent += 1
        self.event("dtmf", digit)

    async def _echo_mark(self, name: str, discarded: bool = False) -> None:
        await self.send({"event": "mark", "streamSid": self.r.stream_sid, "mark": {"name": name}})
        self.r.marks_echoed += 1
        self.r.marks_discarded += discarded
        self.event("mark_echo", name + (" (discarded)" if discarded else ""))

    # --- what the relay sends -----------------------------------------------------------
    async def _receiver(self) -> None:
        try:
            while True:
                message = await self.ws.get_message()
                await self._on_message(message)
        except trio_websocket.ConnectionClosed:
            self._closed_by_relay()

    def _invalid(self, why: str) -> None:
        self.r.invalid_messages += 1
        self.warn(f"31951 invalid message: {why}")

    async def _on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            self.r.binary_frames += 1
            self.warn("31950: binary frame (Media Streams messages are JSON text)")
            return
        try:
            data = orjson.loads(message)
        except orjson.JSONDecodeError:
            self._invalid("not JSON")
            return
        if not isinstance(data, dict):
            self._invalid("not a JSON object")
            return
        event = data.get("event")
        if event not in SERVER_EVENTS:
            self._invalid(f"unknown event {event!r}")
            return
        if data.get("streamSid") != self.r.stream_sid:
            self._invalid(f"{event}: wrong streamSid {data.get('streamSid')!r}")
            return
        if event == "media":
            self._on_media(data)
        elif event == "mark":
            await self._on_mark(data)
        else:
            await self._on_clear()

    def _on_media(self, data: dict[str, Any]) -> None:
        media = data.get("media")
        payload = media.get("payload") if isinstance(media, dict) else None
        if not isinstance(payload, str):
            self._invalid("media without a payload string")
            return
        try:
            audio = base64.b64decode(payload, validate=True)
        except binascii.Error:
            self._invalid("media payload is not base64")
            return
        r = self.r
        r.media_received += 1
        r.bytes_received += len(audio)
        self.last_rx = self.now()
        if r.first_agent_audio_s is None:
            r.first_agent_audio_s = round(self.last_rx, 4)
        if not self.turn_active and audio:
            self.turn_active = True
            self.event("agent_audio_start", f"{len(audio)} bytes")
        self.playout.push_audio(audio)

    async def _on_mark(self, data: dict[str, Any]) -> None:
        mark = data.get("mark")
        name = mark.get("name") if isinstance(mark, dict) else None
        if not isinstance(name, str):
            self._invalid("mark without a name")
            return
        self.r.marks_received += 1
        if self.playout.push_mark(name):  # nothing buffered: echo at once (doc rule)
            await self._echo_mark(name)

    async def _on_clear(self) -> None:
        dropped, marks = self.playout.clear()
        self.r.clears += 1
        self.r.dropped_ms += dropped // 8
        self.event("clear", f"dropped {dropped // 8} ms, {len(marks)} marks")
        if self.turn_active:
            self.turn_active = False
            self.event("agent_audio_end", "cleared")
        for name in marks:  # echo after clear = discarded, not played
            await self._echo_mark(name, discarded=True)


async def place_call(
    url_base: str,
    auth_token: str,
    *,
    audio: npt.ArrayLike | bytes | None = None,
    to: str = "+15550100000",
    from_: str = "+15550100001",
    call_sid: str | None = None,
    account_sid: str | None = None,
    duration_s: float | None = None,
    dtmf: Sequence[tuple[float, str]] = (),
    record_path: str | Path | None = None,
    on_event: EventCallback | None = None,
    hangup_after_s: float | None = None,
    connect_timeout: float = 10.0,
    max_duration_s: float = 600.0,
    send_timeout: float = 5.0,
    disconnect_timeout: float = 2.0,
    turn_gap_s: float = 0.3,
    status_callback: str | None = "/twilio/status",
    dial_stream_host: bool = False,
    opener: Opener | None = None,
    webhook_url: str | None = None,
    direction: str = "inbound",
    extra_params: Mapping[str, str] | None = None,
    end_event: trio.Event | None = None,
) -> CallResult:
    """Place one simulated inbound call to the relay at ``url_base`` and return what happened.

    ``audio`` is what the caller says: int16 samples at 8 kHz, or μ-law bytes (None: a
    default turn-taking script). After it, the caller stays on the line sending silence.
    The caller hangs up at ``duration_s`` after the stream started if given; otherwise once
    the audio is over and the agent has been quiet for ``hangup_after_s`` (default 2.5 s),
    and never later than ``max_duration_s``. ``dtmf`` is ``[(at_s, digit), ...]`` relative
    to stream start. ``on_event(call_sid, t, kind, detail)`` sees timeline events live.
    ``status_callback`` (relative to ``url_base`` or absolute; None: off) gets the
    ``completed`` call status, as when configured on a Twilio number.

    The callee side of an outbound call (the relay placed it through the REST API):
    ``webhook_url`` is the ``Url`` it gave (query string included, signed as is),
    ``direction`` ``outbound-api``, ``extra_params`` e.g. ``AnsweredBy``; ``end_event``
    set ends the call the way a REST hang-up or redirect does (``stop``, then close).

    Network, protocol and handshake failures do not raise: they are reported in the result
    (``rejected``, ``refused``, ``error``), so one bad call never takes a batch down.
    """
    if hangup_after_s is None and duration_s is None:
        hangup_after_s = 2.5
    ulaw = _as_ulaw(audio, duration_s or 10.0)
    opts = CallOptions(
        url_base=url_base,
        auth_token=auth_token,
        audio=ulaw,
        to=to,
        from_=from_,
        call_sid=call_sid or _sid("CA"),
        account_sid=account_sid or _account_sid_for(auth_token),
        duration_s=duration_s,
        hangup_after_s=hangup_after_s,
        max_duration_s=max_duration_s,
        dtmf=[(float(at), str(digit)) for at, digit in dtmf],
        record_path=str(record_path) if record_path is not None else None,
        on_event=on_event,
        connect_timeout=connect_timeout,
        send_timeout=send_timeout,
        disconnect_timeout=disconnect_timeout,
        turn_gap_s=turn_gap_s,
        status_callback=status_callback,
        dial_stream_host=dial_stream_host,
        opener=opener or open_tcp,
        webhook_url=webhook_url,
        direction=direction,
        extra_params=dict(extra_params or {}),
        end_event=end_event,
    )
    return await _Call(opts).run()


async def simulate(
    url_base: str,
    auth_token: str,
    calls: int = 1,
    duration_s: float | None = 10.0,
    audio: npt.ArrayLike | bytes | None = None,
    *,
    stagger_s: float = 0.2,
    out_dir: str | Path | None = None,
    **call_options: Any,
) -> list[CallResult]:
    """Place ``calls`` concurrent calls, started ``stagger_s`` apart; results in call order.

    Without ``audio`` each call gets its own voice (a different seed of the default script).
    With ``out_dir`` each call's heard audio goes to ``out_dir/call-<n>-<CallSid>.wav``.
    Extra keyword arguments go to :func:`place_call`.
    """
    results: list[CallResult | None] = [None] * calls
    script_s = duration_s or 10.0

    async def one(index: int) -> None:
        await trio.sleep(index * stagger_s)
        call_sid = _sid("CA")
        record = Path(out_dir) / f"call-{index + 1}-{call_sid}.wav" if out_dir is not None else None
        caller_audio = (
            audio if audio is not None else speech.default_caller_script(script_s, seed=index)
        )
        results[index] = await place_call(
            url_base,
            auth_token,
            audio=caller_audio,
            call_sid=call_sid,
            duration_s=duration_s,
            record_path=record,
            **call_options,
        )

    async with trio.open_nursery() as nursery:
        for i in range(calls):
            nursery.start_soon(one, i)
    return [r for r in results if r is not None]


# --- report ---------------------------------------------------------------------------------
def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}ms"


def _median(values: Sequence[float]) -> float | None:
    return float(np.median(values)) if values else None


def format_report(results: Sequence[CallResult]) -> str:
    """A compact per-call table plus a one-line summary."""
    header = (
        "#", "call", "outcome", "secs", "sent", "recv", "heard", "drop", "marks", "clr",
        "1st audio", "resp p50", "barge p50", "bad",
    )  # fmt: skip
    rows: list[tuple[str, ...]] = [header]
    for i, r in enumerate(results, 1):
        rows.append(
            (
                str(i),
                r.call_sid[:10] + "…",
                r.outcome[:40],
                f"{r.duration_s:.1f}",
                str(r.media_sent),
                str(r.media_received),
                f"{r.heard_ms / 1000:.1f}s",
                f"{r.dropped_ms / 1000:.1f}s",
                f"{r.marks_echoed}/{r.marks_received}",
                str(r.clears),
                _fmt_s(r.first_agent_audio_s),
                _fmt_s(_median(r.response_latencies())),
                _fmt_s(_median(r.barge_in_latencies())),
                str(r.invalid_messages + r.binary_frames),
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    ok = sum(r.ok for r in results)
    firsts = [r.first_agent_audio_s for r in results if r.first_agent_audio_s is not None]
    lines.append(
        f"{ok}/{len(results)} calls ok; first agent audio p50 {_fmt_s(_median(firsts))}; "
        f"invalid messages {sum(r.invalid_messages for r in results)}, "
        f"binary frames {sum(r.binary_frames for r in results)}"
    )
    for i, r in enumerate(results, 1):
        for w in r.warnings[:3]:
            lines.append(f"  call {i}: {w}")
    return "\n".join(lines)
