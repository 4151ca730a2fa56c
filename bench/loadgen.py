"""Simulated Twilio calls: the load generator.

Each simulated call does what Twilio does for a bidirectional ``<Connect><Stream>``:

1. POST the signed voice webhook (form body, ``X-Twilio-Signature``) and parse the TwiML
   for ``<Stream url>`` and its ``<Parameter>`` values;
2. open the stream WebSocket with ``x-twilio-signature`` computed over the stream URL;
3. send ``connected`` and ``start`` (with ``customParameters``), then one 160-byte μ-law
   ``media`` frame every 20 ms (``sequenceNumber``/``chunk``/``timestamp`` as strings);
4. play the downlink in real time: a ``mark`` is echoed once the audio sent before it has
   played; ``clear`` empties the play queue and echoes pending marks at once;
5. at the end send ``stop`` and close the socket.

Calls are brought up one at a time from the WebSocket upgrade until the fake agent sees
that call's agent session (``session.update``). Serialising that step is what lets the
agent know which call a session belongs to even when the relay transcodes and no marker
survives; webhooks are pipelined ahead of it. Media pacing uses a phase-slot ``Ticker``.

Frame identity (see ``bench.stats``): with a μ-law passthrough agent every uplink frame
starts with a 9-byte marker (call id, frame number) that the fake agent reads back; with a
PCM agent (the relay resamples, no byte survives) every frame is one constant μ-law level
that encodes its number, read back from the middle of the frame after resampling.

Client frames use the all-zero masking key (legal RFC 6455, see ``bench.netio``), and a
tick sends the media frame and any due mark echoes in one ``send()``.
"""

from __future__ import annotations

import binascii
import os
import random
import struct
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable
from urllib.parse import urlencode, urlsplit

import orjson

from bench.netio import (
    EPOLLIN,
    EPOLLOUT,
    OP_TEXT,
    HttpRequest,
    Reactor,
    Ticker,
    WsClient,
    frame,
    monotonic_ns,
)
from bench.stats import (
    HEADER,
    HEADER_LEN,
    LEVEL_CODES,
    MAGIC,
    Leg,
    LevelTracker,
    MarkerTracker,
    Window,
)

try:
    from relay.protocol.signature import compute_signature
except ImportError:  # pragma: no cover - the bench lives in the relay repo
    import base64
    import hashlib
    import hmac

    def compute_signature(auth_token: str, url: str, params=None) -> str:
        data = url + "".join(k + str(params[k]) for k in sorted(params or {}))
        mac = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1)
        return base64.b64encode(mac.digest()).decode("ascii")


FRAME_MS = 20
FRAME_BYTES = 160  # μ-law 8 kHz, 20 ms
FRAME_NS = FRAME_MS * 1_000_000
ULAW_BYTE_NS = 125_000  # one μ-law byte is 1/8000 s of audio
# Transcoded downlink: a delta's 100 ms of audio counts as delivered once all but its
# last 10 ms (80 μ-law bytes) arrived. The allowance absorbs a resampler's algorithmic
# hold-back so that it is not mistaken for a 100 ms delay of the whole delta.
DOWN_ALLOWANCE_BYTES = 80

_rng = random.Random(1234)
# Filler: noise-like μ-law bytes that never contain 0xA5 (the marker's first byte).
FILLER = bytes(_rng.choice([b for b in range(256) if b != 0xA5]) for _ in range(4096))
_UP_REST = FILLER[: FRAME_BYTES - HEADER_LEN]
UP_REST_B64 = binascii.b2a_base64(_UP_REST, newline=False)
_b2a = binascii.b2a_base64
_HDR_PACK = HEADER.pack
_MASKED16 = struct.Struct(">BBH4x").pack  # masked text frame header, zero key
# Transcoded (PCM) mode: each uplink frame is one constant μ-law level (see bench.stats).
UP_LEVEL_B64 = [binascii.b2a_base64(bytes([c]) * FRAME_BYTES, newline=False) for c in LEVEL_CODES]


def parse_twiml(xml_text: bytes | str) -> tuple[str, dict[str, str]]:
    """``<Stream url>`` and its ``<Parameter>`` name/values from a TwiML document."""
    root = ET.fromstring(xml_text)
    stream = root.find(".//Stream")
    if stream is None or not stream.get("url"):
        raise ValueError("TwiML has no <Stream url>")
    params = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
    return stream.get("url", ""), params


class CallFailed(Exception):
    pass


class Uplink:
    """One call's uplink: a 20 ms ``media`` frame per ``tick`` (the media ticker's member).

    Pure-Python reference of ``bench._genfast.Uplink`` (same constructor, same bytes on the
    wire). A tick sends the frame and any mark echoes that are due in one ``send()``; the
    send time of every frame goes to the call's uplink ``Leg`` (``up_times``/``up_seen``).
    """

    __slots__ = (
        "_tmpl",
        "call",
        "idx",
        "k",
        "level_b64",
        "marks",
        "nlevels",
        "passthrough",
        "seq",
        "up_seen",
        "up_times",
    )

    def __init__(
        self,
        call: TwilioCall,
        idx: int,
        sid: bytes,
        passthrough: bool,
        rest_b64: bytes,
        level_b64: list[bytes],
        up_times: list[int],
        up_seen: bytearray,
        marks: deque,
    ) -> None:
        self.call = call
        self.idx = idx
        self.k = 0  # next uplink frame number
        self.seq = 1  # Twilio sequenceNumber of the last message sent (start was 1)
        self.passthrough = passthrough
        self.level_b64 = level_b64
        self.nlevels = len(level_b64)
        self.up_times = up_times
        self.up_seen = up_seen
        self.marks = marks
        self._tmpl = (
            b'{"event":"media","sequenceNumber":"%d","streamSid":"'
            + sid
            + b'","media":{"track":"inbound","chunk":"%d","timestamp":"%d","payload":"%s'
            + (rest_b64 if passthrough else b"")
            + b'"}}'
        )

    def tick(self, now: int) -> None:
        """One 20 ms uplink frame, plus any mark echoes that are due (one send)."""
        k = self.k
        self.k = k + 1
        seq = self.seq = self.seq + 1
        if self.passthrough:
            idx = self.idx
            payload = _b2a(
                _HDR_PACK(MAGIC, idx, k, (idx * 31 + k * 7 + 0x5A) & 0xFF), newline=False
            )
        else:
            payload = self.level_b64[k % self.nlevels]
        msg = self._tmpl % (seq, k + 1, k * FRAME_MS, payload)
        out = _MASKED16(0x81, 0xFE, len(msg)) + msg
        marks = self.marks
        if marks and marks[0][0] <= now:
            out += self.call._due_mark_echoes(now)
        self.up_times.append(monotonic_ns())
        self.up_seen.append(0)
        call = self.call
        if call._out is None and not call.closed:  # inlined Stream.send, common case
            try:
                n = call.sock.send(out)  # type: ignore[union-attr]
            except BlockingIOError:
                n = 0
            except OSError:
                call.close()
                return
            if n < len(out):
                call._out = bytearray(out[n:])
                call.reactor.modify(call.fd, EPOLLIN | EPOLLOUT)
        else:
            call.send(out)


class TwilioCall(WsClient):
    """One simulated call's media stream (after its webhook was answered)."""

    def __init__(self, gen: LoadGenerator, idx: int, stream_url: str, params: dict) -> None:
        parts = urlsplit(stream_url)
        if parts.scheme not in ("ws", "wss"):
            raise CallFailed(f"stream url {stream_url!r} is not ws(s)://")
        # No TLS on loopback: a wss:// URL (a relay that assumes a TLS proxy in front) is
        # dialled as plain ws to the same host and port as the webhook.
        host = parts.hostname or gen.host
        port = parts.port or (gen.port if parts.scheme == "wss" else 80)
        signature = compute_signature(gen.auth_token, stream_url)
        super().__init__(
            gen.reactor, host, port, parts.path or "/", {"x-twilio-signature": signature}
        )
        self.gen = gen
        self.idx = idx
        self.stream_url = stream_url
        self.custom_params = params
        self.call_sid = gen.call_sid(idx)
        self.stream_sid = "MZ" + os.urandom(16).hex()
        self.sid_b = self.stream_sid.encode()
        self.up = Leg(gen.window, gen.up_lat)
        self.up_times = self.up.send_times  # the tick appends directly (hot path)
        self.up_seen = self.up.seen
        self.passthrough = gen.passthrough
        self.down = Leg(gen.window, gen.down_lat)
        self.agent = None  # fake agent session, once claimed
        self.play_end = 0
        self.marks: deque = deque()
        # The ticker member that sends the 20 ms media frames: compiled when the reactor
        # runs bench.genfast's engine, else the pure-Python reference below.
        engine = getattr(gen.reactor, "engine", None)
        self.uplink = (engine.Uplink if engine is not None else Uplink)(
            self,
            idx,
            self.sid_b,
            gen.passthrough,
            UP_REST_B64,
            UP_LEVEL_B64,
            self.up_times,
            self.up_seen,
            self.marks,
        )
        self.down_levels = LevelTracker(self.down, gen.down_frame_bytes, DOWN_ALLOWANCE_BYTES)
        down = self.down
        self.down_markers = MarkerTracker(
            gen.down_frame_bytes, DOWN_ALLOWANCE_BYTES, lambda call: down, expected=idx
        )
        self.t_upgrade_sent = 0
        self.t_start = 0
        self.t_first_audio = 0
        self.t_barge = 0
        self.t_clear = 0
        self.t_stop = 0
        self.failed: str | None = None
        self.stopping = False
        self.finished = False
        self.proto_errors = 0
        self.misrouted = 0
        self.marks_echoed = 0
        self.clears = 0
        self.media_msgs = 0
        self._mark_tmpl = (
            b'{"event":"mark","sequenceNumber":"%d","streamSid":"'
            + self.sid_b
            + b'","mark":{"name":%s}}'
        )

    # -- setup ---------------------------------------------------------------------
    def on_upgraded(self, now: int) -> None:
        start = {
            "event": "start",
            "sequenceNumber": "1",
            "start": {
                "accountSid": self.gen.account_sid,
                "streamSid": self.stream_sid,
                "callSid": self.call_sid,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": self.custom_params,
            },
            "streamSid": self.stream_sid,
        }
        connected = b'{"event":"connected","protocol":"Call","version":"1.0.0"}'
        self.t_start = monotonic_ns()
        self.send(frame(connected, masked=True) + frame(orjson.dumps(start), masked=True))
        engine = getattr(self.reactor, "engine", None)
        if engine is not None and not self.closed:
            # Compiled downlink reads for media and marks (see bench._genfast).
            self.reactor.set_callback(self.fd, engine.TwilioReader(self))
        # Twilio starts media right after start; first frame one period later.
        self.gen.media_ticker.join(self.uplink, self.t_start + FRAME_NS)

    def on_upgrade_failed(self, status_line: str) -> None:
        self.fail(f"upgrade refused: {status_line}")

    def on_connect_failed(self, exc: OSError) -> None:
        self.fail(f"connect failed: {exc}")

    def fail(self, reason: str) -> None:
        if self.failed is None and not self.stopping:
            self.failed = reason
            self.gen.on_call_failed(self)
        self.gen.media_ticker.leave(self.uplink)
        self.close()

    # -- uplink (the 20 ms frames themselves are sent by ``self.uplink``) ----------------
    @property
    def k(self) -> int:
        """Uplink frames sent so far."""
        return self.uplink.k

    @property
    def seq(self) -> int:
        """Twilio ``sequenceNumber`` of the last message sent."""
        return self.uplink.seq

    @seq.setter
    def seq(self, value: int) -> None:
        self.uplink.seq = value

    def _mark_echo(self, name_json: bytes) -> bytes:
        """The echo of a mark whose name is ``name_json`` (the JSON string, quotes
        included, exactly as it will be written back)."""
        self.seq += 1
        self.marks_echoed += 1
        return frame(self._mark_tmpl % (self.seq, name_json), masked=True)

    def _due_mark_echoes(self, now: int) -> bytes:
        marks = self.marks
        out = []
        while marks and marks[0][0] <= now:
            out.append(self._mark_echo(marks.popleft()[1]))
        return b"".join(out)

    # -- downlink ------------------------------------------------------------------
    def on_message(self, opcode: int, payload: bytes, now: int) -> None:
        if opcode != OP_TEXT:
            self.proto_errors += 1  # Twilio: binary frames are warning 31950
            return
        try:
            msg = orjson.loads(payload)
            event = msg["event"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.proto_errors += 1
            return
        if msg.get("streamSid") != self.stream_sid:
            self.proto_errors += 1  # e.g. streamSid null before start (31951)
        if event == "media":
            self._on_media(msg, now)
        elif event == "mark":
            self._on_mark(msg, now)
        elif event == "clear":
            self._on_clear(now)
        else:
            self.proto_errors += 1

    def _on_media(self, msg: dict, now: int) -> None:
        try:
            b64 = msg["media"]["payload"]
        except (KeyError, TypeError):
            self.proto_errors += 1
            return
        self.media_msgs += 1
        if not self.t_first_audio:
            self.t_first_audio = now
        if self.gen.passthrough:
            nbytes = self.down_markers.feed(b64, now)
        else:
            data = binascii.a2b_base64(b64)
            nbytes = len(data)
            self.down_levels.feed(data, True, now)
        # Real-time playback model: audio queues behind what is still playing.
        start = self.play_end if self.play_end > now else now
        self.play_end = start + nbytes * ULAW_BYTE_NS

    def _on_mark(self, msg: dict, now: int) -> None:
        try:
            name = msg["mark"]["name"]
        except (KeyError, TypeError):
            self.proto_errors += 1
            return
        self.on_mark_json(orjson.dumps(name), now)

    def on_mark_json(self, name_json: bytes, now: int) -> None:
        """A mark arrived (also called by the compiled reader, see bench._genfast)."""
        if self.play_end <= now:
            self.send(self._mark_echo(name_json))  # nothing buffered: echo at once
        else:
            self.marks.append((self.play_end, name_json))

    def _on_clear(self, now: int) -> None:
        self.clears += 1
        if self.t_barge and not self.t_clear:
            self.t_clear = now
        self.play_end = now
        if self.marks:  # cleared audio's marks come back at once (discarded, not played)
            out = b"".join(self._mark_echo(name) for _, name in self.marks)
            self.marks.clear()
            self.send(out)

    # -- teardown ------------------------------------------------------------------
    def stop(self) -> None:
        if self.stopping or self.closed:
            return
        self.stopping = True
        self.gen.media_ticker.leave(self.uplink)
        self.seq += 1
        stop = {
            "event": "stop",
            "sequenceNumber": str(self.seq),
            "streamSid": self.stream_sid,
            "stop": {"accountSid": self.gen.account_sid, "callSid": self.call_sid},
        }
        self.t_stop = monotonic_ns()
        self.send(frame(orjson.dumps(stop), masked=True))
        self.ws_close(1000)

    def on_remote_close(self, payload: bytes, now: int) -> None:
        if not self.stopping:
            self.fail("relay closed the stream before the call ended")

    def on_closed(self) -> None:
        self.finished = True
        self.gen.media_ticker.leave(self.uplink)
        if not self.stopping and self.failed is None:
            self.failed = "stream connection lost"
            self.gen.on_call_failed(self)
        self.gen.on_call_closed(self)


class LoadGenerator:
    """Brings up ``n`` calls against ``base_url`` and keeps their media flowing."""

    def __init__(
        self,
        reactor: Reactor,
        base_url: str,
        auth_token: str,
        *,
        webhook_path: str = "/twilio/voice",
        passthrough: bool = True,
        down_frame_bytes: int = 800,
        window: Window | None = None,
        setup_timeout_s: float = 5.0,
        webhook_concurrency: int = 8,
        arrival_rate: float = 0.0,
    ) -> None:
        parts = urlsplit(base_url)
        self.reactor = reactor
        self.base_url = base_url.rstrip("/")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.auth_token = auth_token
        self.webhook_path = webhook_path
        self.passthrough = passthrough
        self.down_frame_bytes = down_frame_bytes
        self.window = window or Window()
        self.setup_timeout_ns = int(setup_timeout_s * 1e9)
        self.webhook_concurrency = webhook_concurrency
        #: callers per second (0: as fast as ``webhook_concurrency`` allows)
        self.arrival_ns = int(1e9 / arrival_rate) if arrival_rate > 0 else 0
        self._next_arrival_ns = 0
        self._arrival_timer: list | None = None
        self.account_sid = "AC" + "b" * 32
        self.up_lat: list[int] = []
        self.down_lat: list[int] = []
        self.calls: list[TwilioCall | None] = []
        self.failures: list[str] = []
        self.media_ticker = Ticker(reactor, FRAME_NS, int(os.environ.get("BENCH_SLOTS", "20")))
        self._run = os.urandom(4).hex()
        self._webhooks_todo: deque[int] = deque()
        self._webhooks_inflight = 0
        self._ready: deque[TwilioCall] = deque()
        self.awaiting: TwilioCall | None = None
        self._await_timer: list | None = None
        self.established = 0
        self.failed = 0
        self.refused = 0  # webhooks answered <Reject> (admission control)
        self.dropped = 0
        self.open_calls = 0
        self.on_progress: Callable[[], None] | None = None

    # -- identities ----------------------------------------------------------------
    def call_sid(self, idx: int) -> str:
        return f"CA{self._run}{idx:028x}"

    def webhook_params(self, idx: int) -> dict[str, str]:
        return {
            "AccountSid": self.account_sid,
            "ApiVersion": "2010-04-01",
            "CallSid": self.call_sid(idx),
            "CallStatus": "ringing",
            "Direction": "inbound",
            "From": f"+1555{idx:07d}",
            "To": "+15550100000",
        }

    # -- ramp ------------------------------------------------------------------------
    def add_calls(self, n: int) -> None:
        """Queue ``n`` more calls; they come up as fast as the serial setup allows."""
        for _ in range(n):
            idx = len(self.calls)
            self.calls.append(None)
            self._webhooks_todo.append(idx)
        self._pump_webhooks()

    @property
    def settled(self) -> bool:
        """All queued calls are either established or failed."""
        return self.established + self.failed + self.refused >= len(self.calls)

    def _pump_webhooks(self) -> None:
        self._arrival_timer = None
        while self._webhooks_todo and self._webhooks_inflight < self.webhook_concurrency:
            if self.arrival_ns:
                now = monotonic_ns()
                if now < self._next_arrival_ns:
                    if self._arrival_timer is None:
                        self._arrival_timer = self.reactor.call_at(
                            self._next_arrival_ns, self._pump_webhooks
                        )
                    return
                # paced from the schedule, not from now, so a timer a little late does not
                # slow the rate; after a longer gap the schedule restarts from now
                self._next_arrival_ns = max(self._next_arrival_ns, now - self.arrival_ns, 1)
                self._next_arrival_ns += self.arrival_ns
                if self._next_arrival_ns <= now:  # the first caller: the next one waits
                    self._next_arrival_ns = now + self.arrival_ns
            idx = self._webhooks_todo.popleft()
            self._webhooks_inflight += 1
            params = self.webhook_params(idx)
            url = self.base_url + self.webhook_path
            body = urlencode(params).encode()
            headers = {
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Twilio-Signature": compute_signature(self.auth_token, url, params),
                "User-Agent": "TwilioProxy/1.1",
            }
            HttpRequest(
                self.reactor,
                self.host,
                self.port,
                "POST",
                self.webhook_path,
                headers,
                body,
                lambda st, h, b, idx=idx: self._on_webhook(idx, st, h, b),
            )

    def _on_webhook(self, idx: int, status: int | None, headers: dict, body: bytes) -> None:
        self._webhooks_inflight -= 1
        self._pump_webhooks()
        if status != 200:
            self._fail_idx(idx, f"webhook: HTTP {status} {body[:120]!r}")
            return
        if b"<Reject" in body:  # admission control said busy: refused, not failed
            self.refused += 1
            return
        try:
            url, params = parse_twiml(body)
            call = TwilioCall(self, idx, url, params)
        except (ET.ParseError, ValueError, CallFailed) as exc:
            self._fail_idx(idx, f"webhook: bad TwiML: {exc}")
            return
        self.calls[idx] = call
        self._ready.append(call)
        self._pump_upgrades()

    def _pump_upgrades(self) -> None:
        if self.awaiting is not None or not self._ready:
            return
        call = self._ready.popleft()
        self.awaiting = call
        call.t_upgrade_sent = monotonic_ns()
        self._await_timer = self.reactor.call_at(
            call.t_upgrade_sent + self.setup_timeout_ns, self._setup_timeout, call
        )
        call.start()

    def _setup_timeout(self, call: TwilioCall) -> None:
        if self.awaiting is call:
            call.fail("no agent session within the setup timeout")

    def claim_session(self, session: object) -> TwilioCall | None:
        """The fake agent saw a new session: it belongs to the call being set up."""
        call = self.awaiting
        if call is None or call.closed:
            return None
        call.agent = session
        self.awaiting = None
        self.reactor.cancel(self._await_timer)
        self.established += 1
        self.open_calls += 1
        self._pump_upgrades()
        return call

    def _fail_idx(self, idx: int, reason: str) -> None:
        self.failed += 1
        self.failures.append(f"call {idx}: {reason}")

    def on_call_failed(self, call: TwilioCall) -> None:
        if call.agent is None:  # failed during setup
            self.failed += 1
        else:  # an established call that broke mid-run
            self.dropped += 1
        self.failures.append(f"call {call.idx}: {call.failed}")
        if self.awaiting is call:
            self.awaiting = None
            self.reactor.cancel(self._await_timer)
            self._pump_upgrades()

    def on_call_closed(self, call: TwilioCall) -> None:
        if call.agent is not None:
            self.open_calls -= 1

    # -- end ---------------------------------------------------------------------------
    def live_calls(self) -> list[TwilioCall]:
        return [c for c in self.calls if c is not None and c.agent is not None]

    def stop_all(self, spread_s: float = 0.2) -> None:
        """Hang up every call, spread over ``spread_s`` like real hang-ups."""
        calls = self.live_calls()
        now = monotonic_ns()
        for i, call in enumerate(calls):
            at = now + int(spread_s * 1e9 * i / max(1, len(calls)))
            self.reactor.call_at(at, call.stop)

    def all_closed(self) -> bool:
        return all(c is None or c.closed for c in self.calls)

    def close(self) -> None:
        self.media_ticker.stop()
        for c in self.calls:
            if c is not None:
                c.close()
