"""Sans-IO Twilio Media Streams protocol (bidirectional ``<Connect><Stream>``).

``TwilioStream.parse(text)`` turns one WebSocket text message into one frozen event;
``media_frame``/``mark_frame``/``clear_frame`` build outbound messages. No sockets here: the
Trio layer in ``relay/call.py`` only moves bytes. Rules cited from Twilio's "Media Streams -
WebSocket Messages" page (digest in the project's reference notes):

* ``sequenceNumber``, ``media.chunk`` and ``media.timestamp`` are *strings*;
* a stream begins ``connected`` then ``start``; every later message carries the same
  ``streamSid`` (a wrong one is Twilio's error 31951 on their side; we treat it the same);
* outbound audio is base64 μ-law 8 kHz, any length; ``mark`` is echoed when the audio
  before it played, or at once after a ``clear`` (then it means *discarded*).
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..errors import LocalProtocolError, RemoteProtocolError


class TwilioProtocolError(RemoteProtocolError):
    """Twilio (or whoever pretends to be it) sent a message we cannot accept."""


@dataclass(frozen=True, slots=True)
class Connected:
    protocol: str
    version: str


@dataclass(frozen=True, slots=True)
class Start:
    stream_sid: str
    call_sid: str
    account_sid: str
    tracks: tuple[str, ...]
    encoding: str
    sample_rate: int
    channels: int
    custom_parameters: dict[str, str] = field(hash=False, compare=True)


@dataclass(frozen=True, slots=True)
class Media:
    timestamp_ms: int
    payload: str  # base64 μ-law, passed through untouched when the agent speaks μ-law
    chunk: int
    track: str


@dataclass(frozen=True, slots=True)
class Dtmf:
    digit: str
    track: str


@dataclass(frozen=True, slots=True)
class MarkEcho:
    name: str


@dataclass(frozen=True, slots=True)
class Stop:
    call_sid: str


TwilioEvent = Connected | Start | Media | Dtmf | MarkEcho | Stop

_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError


def _str(d: dict[str, Any], key: str, where: str) -> str:
    value = d.get(key)
    if not isinstance(value, str):
        raise TwilioProtocolError(f"{where}.{key} missing or not a string", kind="twilio_message")
    return value


class TwilioStream:
    """State of one Media Stream: validates message order and the streamSid."""

    __slots__ = ("_clear", "_mark_prefix", "_media_prefix", "call_sid", "started", "stream_sid")

    def __init__(self) -> None:
        self.stream_sid: str | None = None
        self.call_sid: str | None = None
        self.started = False
        self._media_prefix = b""
        self._mark_prefix = b""
        self._clear = b""

    # -- inbound ----------------------------------------------------------------------
    def parse(self, text: str) -> TwilioEvent:
        try:
            msg = _loads(text)
        except _JSONDecodeError:
            raise TwilioProtocolError("malformed JSON from Twilio", kind="twilio_json") from None
        if type(msg) is not dict:
            raise TwilioProtocolError("Twilio message is not a JSON object", kind="twilio_message")
        event = msg.get("event")
        if event == "media":  # the hot path first: 50 per second per call
            self._check_sid(msg)
            media = msg.get("media")
            if type(media) is not dict:
                raise TwilioProtocolError("media event without media object", kind="twilio_message")
            payload = media.get("payload")
            ts = media.get("timestamp")
            if type(payload) is not str or type(ts) is not str:
                raise TwilioProtocolError(
                    "media.payload/timestamp missing or not strings", kind="twilio_message"
                )
            try:
                timestamp = int(ts)
                chunk = int(media.get("chunk") or 0)
            except ValueError:
                raise TwilioProtocolError(
                    f"media.timestamp {ts!r} is not an integer string", kind="twilio_message"
                ) from None
            return Media(timestamp, payload, chunk, media.get("track") or "inbound")
        if event == "mark":
            self._check_sid(msg)
            mark = msg.get("mark")
            if type(mark) is not dict:
                raise TwilioProtocolError("mark event without mark object", kind="twilio_message")
            return MarkEcho(_str(mark, "name", "mark"))
        if event == "dtmf":
            self._check_sid(msg)
            dtmf = msg.get("dtmf")
            if type(dtmf) is not dict:
                raise TwilioProtocolError("dtmf event without dtmf object", kind="twilio_message")
            return Dtmf(_str(dtmf, "digit", "dtmf"), str(dtmf.get("track", "inbound_track")))
        if event == "start":
            return self._start(msg)
        if event == "stop":
            self._check_sid(msg)
            stop = msg.get("stop")
            call_sid = stop.get("callSid", "") if type(stop) is dict else ""
            return Stop(str(call_sid))
        if event == "connected":
            if self.started:
                raise TwilioProtocolError("connected after start", kind="twilio_order")
            return Connected(str(msg.get("protocol", "")), str(msg.get("version", "")))
        raise TwilioProtocolError(f"unknown Twilio event {str(event)[:40]!r}", kind="twilio_event")

    def _check_sid(self, msg: dict[str, Any]) -> None:
        if not self.started:
            raise TwilioProtocolError(f"{msg.get('event')} before start", kind="twilio_order")
        if msg.get("streamSid") != self.stream_sid:
            raise TwilioProtocolError("message for another streamSid", kind="twilio_stream_sid")

    def _start(self, msg: dict[str, Any]) -> Start:
        if self.started:
            raise TwilioProtocolError("second start on one stream", kind="twilio_order")
        start = msg.get("start")
        if type(start) is not dict:
            raise TwilioProtocolError("start event without start object", kind="twilio_message")
        stream_sid = msg.get("streamSid") or start.get("streamSid")
        if not isinstance(stream_sid, str) or not stream_sid:
            raise TwilioProtocolError("start without streamSid", kind="twilio_message")
        call_sid = _str(start, "callSid", "start")
        fmt = start.get("mediaFormat") or {}
        if type(fmt) is not dict:
            raise TwilioProtocolError("start.mediaFormat is not an object", kind="twilio_message")
        params = start.get("customParameters") or {}
        if type(params) is not dict:
            raise TwilioProtocolError(
                "start.customParameters is not an object", kind="twilio_message"
            )
        tracks = start.get("tracks") or ["inbound"]
        event = Start(
            stream_sid=stream_sid,
            call_sid=call_sid,
            account_sid=str(start.get("accountSid", "")),
            tracks=tuple(str(t) for t in tracks) if isinstance(tracks, list) else ("inbound",),
            encoding=str(fmt.get("encoding", "audio/x-mulaw")),
            sample_rate=int(fmt.get("sampleRate", 8000)),
            channels=int(fmt.get("channels", 1)),
            custom_parameters={str(k): str(v) for k, v in params.items()},
        )
        if event.encoding != "audio/x-mulaw" or event.sample_rate != 8000 or event.channels != 1:
            raise TwilioProtocolError(
                f"unsupported media format {event.encoding}/{event.sample_rate}/{event.channels}",
                kind="twilio_format",
            )
        self.started = True
        self.stream_sid = stream_sid
        self.call_sid = call_sid
        sid = orjson.dumps(stream_sid)
        # Outbound messages are built by concatenation: base64 and our mark names need no
        # JSON escaping, and this runs for every frame sent to Twilio.
        self._media_prefix = b'{"event":"media","streamSid":' + sid + b',"media":{"payload":"'
        self._mark_prefix = b'{"event":"mark","streamSid":' + sid + b',"mark":{"name":"'
        self._clear = b'{"event":"clear","streamSid":' + sid + b"}"
        return event

    # -- outbound (bytes of a JSON text message) ---------------------------------------
    def _need_start(self) -> None:
        # The common sample relay sends media with streamSid null before start: never.
        if not self.started:
            raise LocalProtocolError("cannot send to Twilio before the start event")

    def media_message(self, ulaw: bytes) -> bytes:
        self._need_start()
        return self._media_prefix + binascii.b2a_base64(ulaw, newline=False) + b'"}}'

    def media_message_b64(self, payload_b64: bytes) -> bytes:
        self._need_start()
        return self._media_prefix + payload_b64 + b'"}}'

    @property
    def media_prefix(self) -> bytes:
        """Outbound ``media`` JSON up to the payload's opening quote (for building many
        frames at once: relay.media.codec.twilio_frames)."""
        self._need_start()
        return self._media_prefix

    @property
    def mark_prefix(self) -> bytes:
        """Outbound ``mark`` JSON up to the name's opening quote."""
        self._need_start()
        return self._mark_prefix

    def mark_message(self, name: str) -> bytes:
        self._need_start()
        return self._mark_prefix + name.encode("ascii") + b'"}}'

    def clear_message(self) -> bytes:
        self._need_start()
        return self._clear
