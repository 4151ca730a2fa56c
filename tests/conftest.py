"""Shared fixtures for the end-to-end tests: a real relay on loopback, and a fake Twilio.

* ``make_config(...)``: a :class:`relay.config.Config` built in code (port 0, known
  secrets, parrot/echo agents, optional openai agents pointed at ``tests/fake_openai.py``).
* ``start_relay(cfg)``: runs a real :class:`relay.http.server.RelayServer` in the test's nursery
  and returns a :class:`Relay` handle: raw HTTP (h11) with Twilio signatures, the voice
  webhook, status callbacks, WebSocket upgrades, and ``dial()`` for a whole fake call.
* :class:`FakeTwilio`: plays Twilio's side of one Media Stream with the relay's own
  sans-IO WebSocket client (so a test controls every byte: binary frames, oversized
  messages, TCP drops, a socket nobody reads). It records everything the relay sends with
  arrival times and, unless told otherwise, simulates Twilio's outbound buffer: audio plays
  in real time and each ``mark`` is echoed when the audio before it has played; ``clear``
  empties the buffer and echoes pending marks at once (meaning *discarded*).

Tests get all of this through fixtures (``make_config``, ``start_relay``, and ``e2e`` for
constants and helpers), never by importing this module: conftest modules are not meant to
be imported, and a fixture keeps the coupling explicit in each test's signature.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlencode

import h11
import orjson
import pytest
import trio

from relay.config import Config
from relay.errors import ConnectionClosed
from relay.http.server import RelayServer
from relay.media.websocket import (
    OP_BINARY,
    OP_TEXT,
    WebSocket,
    accept_key,
    build_frame,
    parse_head,
    read_http_head,
)
from relay.protocol.signature import compute_signature

# Secrets with distinctive shapes, so "never logged" checks cannot match by accident.
AUTH_TOKEN = "twilio-auth-token-e2e-5f1d3c9a7b"
ADMIN_KEY = "admin-key-e2e-8c2e4a6f0d"
TOKEN_SECRET = "stream-token-secret-e2e-3b7d9f1e5a"
#: what the built-in simulator sends for AUTH_TOKEN's account (relay.sim.simulator)
ACCOUNT_SID = "AC" + hashlib.sha256(AUTH_TOKEN.encode()).hexdigest()[:32]
OTHER_TOKEN = "not-the-auth-token-0000000000"

FRAME_BYTES = 160  # 20 ms of μ-law 8 kHz: what Twilio sends


# --- configuration ------------------------------------------------------------------------
def openai_agent(server: Any, *, audio: str = "pcmu", greeting: str = "", **extra: Any) -> dict:
    """An ``[agents.<name>]`` table for an openai agent talking to a FakeOpenAIServer."""
    return {
        "type": "openai",
        "url": server.url,
        "api_key": server.api_key,
        "audio": audio,
        "greeting": greeting,
        "connect_timeout_s": 5.0,
        **extra,
    }


def build_config(
    *,
    agents: Mapping[str, Mapping[str, Any]] | None = None,
    default_agent: str = "parrot",
    numbers: Mapping[str, str] | None = None,
    admin_key: str = ADMIN_KEY,
    **sections: Mapping[str, Any],
) -> Config:
    """A validated Config: ``sections`` are per-section overrides, e.g. ``media={...}``."""
    cfg = Config()
    cfg.server.host = "127.0.0.1"
    cfg.server.port = 0  # RelayServer then sets public_url to what it bound
    cfg.server.public_url = ""
    cfg.twilio.auth_token = AUTH_TOKEN
    cfg.twilio.account_sid = ACCOUNT_SID
    # the control plane on a real (in-memory) SQLite store; PostgreSQL in test_store_*.py
    cfg.store.url = "sqlite://"
    cfg.security.admin_key = admin_key
    cfg.security.token_secret = TOKEN_SECRET
    cfg.calls.default_agent = default_agent
    # short caps: a test that hangs should fail on its own fail_after, not run for an hour
    cfg.calls.max_duration_s = 60.0
    cfg.media.final_mark_timeout_s = 5.0
    # CI runs four test processes on two cores: a test relay's loop is often tens of ms
    # behind, which admission control would rightly refuse calls for (tests/test_headroom.py
    # covers that rule); the CPU and descriptor rules stay on
    cfg.server.admission_max_lag_ms = 10_000.0
    cfg.agents = {
        "parrot": {"type": "parrot", "greeting": False},
        "echo": {"type": "echo"},
    }
    if agents:
        cfg.agents.update({k: dict(v) for k, v in agents.items()})
    cfg.numbers = dict(numbers or {})
    for section, values in sections.items():
        obj = getattr(cfg, section)
        for key, value in values.items():
            if not hasattr(obj, key):
                raise AttributeError(f"{section}.{key}")
            setattr(obj, key, value)
    # public_url is only known once the server has bound its port: validate the rest now
    saved = cfg.server.public_url
    cfg.server.public_url = saved or "http://127.0.0.1:1"
    try:
        cfg.validate()
    finally:
        cfg.server.public_url = saved
    return cfg


@pytest.fixture
def make_config() -> Callable[..., Config]:
    return build_config


# --- HTTP -----------------------------------------------------------------------------------
@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


async def http_request(
    port: int,
    method: str,
    target: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    timeout: float = 5.0,
) -> HttpResponse:
    """One HTTP/1.1 request over a fresh loopback connection (h11 client)."""
    conn = h11.Connection(h11.CLIENT)
    all_headers = [("Host", f"127.0.0.1:{port}"), ("Connection", "close"), *headers]
    if method != "GET" or body:
        all_headers.append(("Content-Length", str(len(body))))
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            data = conn.send(h11.Request(method=method, target=target, headers=all_headers))
            if body:
                data += conn.send(h11.Data(data=body))
            data += conn.send(h11.EndOfMessage())
            await stream.send_all(data)
            response = HttpResponse(0, {}, b"")
            chunks = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    response.status = event.status_code
                    response.headers = {
                        k.decode().lower(): v.decode("latin-1") for k, v in event.headers
                    }
                elif isinstance(event, h11.Data):
                    chunks += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            response.body = bytes(chunks)
            return response
        finally:
            await trio.aclose_forcefully(stream)


@dataclass
class Twiml:
    """What the voice webhook answered, parsed."""

    xml: str
    root: ET.Element
    verbs: list[str]
    stream_url: str | None = None
    status_callback: str | None = None
    status_callback_method: str | None = None
    parameters: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Twiml:
        root = ET.fromstring(text)
        plan = cls(text, root, [child.tag for child in root])
        stream = root.find("Connect/Stream")
        if stream is not None:
            plan.stream_url = stream.get("url")
            plan.status_callback = stream.get("statusCallback")
            plan.status_callback_method = stream.get("statusCallbackMethod")
            plan.parameters = {
                p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")
            }
        return plan


class UpgradeRefused(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"upgrade refused: HTTP {status}")
        self.status = status
        self.body = body


def _sid(prefix: str) -> str:
    return prefix + os.urandom(16).hex()


# --- the relay ------------------------------------------------------------------------------
class Relay:
    """A running RelayServer plus the client helpers the tests need."""

    def __init__(self, server: RelayServer, nursery: trio.Nursery) -> None:
        self.server = server
        self.nursery = nursery
        self.cfg = server.cfg
        self.state = server.state
        self.metrics = server.state.metrics
        self.port = server.ports[0]

    @property
    def base_url(self) -> str:
        return self.cfg.public_url

    def records(self, call_sid: str) -> Any:
        record = self.state.records.get(call_sid)
        assert record is not None, f"no record for {call_sid}"
        return record

    # -- HTTP ------------------------------------------------------------------------------
    async def get(self, path: str, headers: Sequence[tuple[str, str]] = ()) -> HttpResponse:
        return await http_request(self.port, "GET", path, headers=headers)

    async def post_form(
        self,
        path: str,
        params: Mapping[str, str],
        *,
        sign: bool = True,
        signature: str | None = None,
        auth_token: str = AUTH_TOKEN,
        signed_url: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> HttpResponse:
        """POST a form the way Twilio does. ``sign`` False: no X-Twilio-Signature at all;
        ``signature`` overrides the computed one; ``signed_url`` is the URL to sign (default:
        the public URL + ``path``, as Twilio would)."""
        all_headers = [("Content-Type", "application/x-www-form-urlencoded"), *headers]
        if sign:
            url = signed_url if signed_url is not None else self.base_url + path
            sig = signature if signature is not None else compute_signature(auth_token, url, params)
            all_headers.append(("X-Twilio-Signature", sig))
        body = urlencode(dict(params)).encode()
        return await http_request(self.port, "POST", path, headers=all_headers, body=body)

    @staticmethod
    def voice_params(call_sid: str, to: str, from_: str, **extra: str) -> dict[str, str]:
        return {
            "CallSid": call_sid,
            "AccountSid": ACCOUNT_SID,
            "From": from_,
            "To": to,
            "CallStatus": "ringing",
            "ApiVersion": "2010-04-01",
            "Direction": "inbound",
            **extra,
        }

    async def voice(
        self,
        call_sid: str | None = None,
        *,
        to: str = "+15550009999",
        from_: str = "+15550001234",
        account_sid: str = ACCOUNT_SID,
        extra: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> tuple[HttpResponse, Twiml | None]:
        """The voice webhook for a new inbound call; returns the response and its TwiML.
        ``account_sid`` (and ``auth_token`` in ``kwargs``): a tenant's account."""
        params = self.voice_params(call_sid or _sid("CA"), to, from_, **(extra or {}))
        params["AccountSid"] = account_sid
        response = await self.post_form("/twilio/voice", params, **kwargs)
        twiml = Twiml.parse(response.text) if response.status == 200 else None
        return response, twiml

    # -- WebSocket -------------------------------------------------------------------------
    def stream_signature(self, auth_token: str = AUTH_TOKEN) -> str:
        # Twilio signs the wss:// (here ws://) stream URL with no query and no params.
        return compute_signature(auth_token, self.cfg.stream_url)

    async def open_stream(
        self,
        *,
        signature: str | None = "auto",
        extra_headers: Sequence[tuple[str, str]] = (),
        rcvbuf: int | None = None,
        pipelined: bytes = b"",
        path: str = "/twilio/stream",
    ) -> WebSocket:
        """Open the media WebSocket. ``signature`` None sends no signature header.
        ``rcvbuf`` shrinks the client's receive buffer (set before connect, so the TCP
        window really is small). ``pipelined`` bytes go in the same write as the request.
        Raises :class:`UpgradeRefused` on a non-101 answer."""
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", self.port))
        stream = trio.SocketStream(sock)
        try:
            key = base64.b64encode(os.urandom(16)).decode()
            lines = [
                f"GET {path} HTTP/1.1",
                f"Host: 127.0.0.1:{self.port}",
                "Upgrade: websocket",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {key}",
                "Sec-WebSocket-Version: 13",
                "User-Agent: Twilio.TmeWs/1.0",
            ]
            if signature == "auto":
                signature = self.stream_signature()
            if signature is not None:
                lines.append(f"x-twilio-signature: {signature}")
            lines += [f"{k}: {v}" for k, v in extra_headers]
            await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode() + pipelined)
            head, rest = await read_http_head(stream)
            status_line, headers = parse_head(head)
            status = int(status_line.split(" ")[1])
            if status != 101:
                body = rest
                with trio.move_on_after(1):
                    while True:
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            break
                        body += chunk
                raise UpgradeRefused(status, body)
            assert headers.get("sec-websocket-accept") == accept_key(key)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return WebSocket(
            stream, client_side=True, max_message=16 * 1024 * 1024, send_timeout=2.0, leftover=rest
        )

    async def dial(
        self,
        call_sid: str | None = None,
        *,
        to: str = "+15550009999",
        from_: str = "+15550001234",
        **kwargs: Any,
    ) -> FakeTwilio:
        """A whole inbound call up to ``start``: signed webhook -> TwiML -> signed upgrade ->
        ``connected`` + ``start`` with the TwiML's parameters (see :meth:`connect`)."""
        call_sid = call_sid or _sid("CA")
        response, twiml = await self.voice(call_sid, to=to, from_=from_)
        assert response.status == 200, response.text
        assert twiml is not None
        return await self.connect(call_sid, twiml, **kwargs)

    async def connect(
        self,
        call_sid: str,
        twiml: Twiml,
        *,
        playout: bool = True,
        mark_delay: float = 0.0,
        start: bool = True,
        rcvbuf: int | None = None,
        read: bool = True,
        custom_parameters: Mapping[str, str] | None = None,
        auth_token: str = AUTH_TOKEN,
    ) -> FakeTwilio:
        """Twilio's side once it has the TwiML: open the stream the TwiML names and send
        ``connected`` + ``start`` (unless ``start`` is False). ``read`` False: nothing ever
        reads the socket (a half-dead Twilio). ``custom_parameters`` replace the TwiML's."""
        assert twiml.stream_url is not None, twiml.xml
        assert twiml.stream_url.startswith(self.cfg.stream_url), twiml.xml
        # Twilio signs the stream URL it connects to with the account's token
        ws = await self.open_stream(
            rcvbuf=rcvbuf,
            path="/" + twiml.stream_url.split("/", 3)[3],
            signature=compute_signature(auth_token, twiml.stream_url),
        )
        params = dict(twiml.parameters if custom_parameters is None else custom_parameters)
        fake = FakeTwilio(ws, call_sid, params, twiml=twiml, playout=playout, mark_delay=mark_delay)
        if read:
            self.nursery.start_soon(fake.run_reader)
        if start:
            await fake.send_connected()
            await fake.send_start()
        return fake

    # -- waiting ---------------------------------------------------------------------------
    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Poll ``predicate`` (relay state has no change notifications to wait on)."""
        with trio.fail_after(timeout):
            while not predicate():
                await trio.sleep(0.005)

    async def wait_idle(self, timeout: float = 5.0) -> None:
        """Every call task tree has ended."""
        await self.wait_until(
            lambda: not self.state.calls and self.metrics.active_calls == 0, timeout
        )

    async def wait_record(self, call_sid: str, status: str, timeout: float = 5.0) -> Any:
        def done() -> bool:
            record = self.state.records.get(call_sid)
            return record is not None and record.status == status

        await self.wait_until(done, timeout)
        return self.records(call_sid)


@pytest.fixture
async def start_relay(nursery: trio.Nursery) -> Callable[[Config], Any]:
    """``relay = await start_relay(cfg)``: a RelayServer on 127.0.0.1:<random port>,
    running until the test ends (the test nursery is cancelled then)."""

    async def start(cfg: Config) -> Relay:
        server = RelayServer(cfg)
        await nursery.start(server.serve)
        return Relay(server, nursery)

    return start


# --- fake Twilio ---------------------------------------------------------------------------
@dataclass
class Received:
    t: float
    msg: dict[str, Any]

    @property
    def event(self) -> str:
        return str(self.msg.get("event"))


class FakeTwilio:
    """Twilio's side of one Media Stream, over the relay's WebSocket client.

    Playout model (``playout=True``): Twilio plays buffered audio in real time from the
    moment it arrives (or when the previous audio ends); a mark is echoed once the audio
    sent before it has played (+ ``mark_delay``, to simulate a slow network), at once when
    nothing is buffered; ``clear`` drops the buffer and echoes every pending mark at once.
    ``played_ms`` counts audio whose mark came back as *played*: exactly what the relay can
    know about what the caller heard.
    """

    def __init__(
        self,
        ws: WebSocket,
        call_sid: str,
        parameters: dict[str, str],
        *,
        twiml: Twiml | None = None,
        playout: bool = True,
        mark_delay: float = 0.0,
    ) -> None:
        self.ws = ws
        self.call_sid = call_sid
        self.stream_sid = _sid("MZ")
        self.account_sid = "AC" + "0" * 32
        self.parameters = parameters
        self.twiml = twiml
        self.playout = playout
        self.mark_delay = mark_delay
        self.seq = 0
        self.ts_ms = 0  # media.timestamp of the next frame we send
        self.received: list[Received] = []
        self.invalid: list[str | bytes] = []  # anything not a JSON object from the relay
        self.closed: ConnectionClosed | None = None
        self.closed_at: float | None = None
        self.media_sent = 0
        self.first_media_sent_at: float | None = None
        # playout bookkeeping
        self._play_end = 0.0
        self._sent_ms = 0.0  # agent audio received so far, in ms
        self._pending: list[tuple[float, str, float]] = []  # (due, mark name, audio ms before)
        self._pending_changed = trio.Event()
        self.echoes: list[tuple[float, str, bool]] = []  # (time, name, discarded)
        self.played_ms = 0.0
        self.played_ms_at_clear: list[float] = []
        self._changed = trio.Event()
        self._resume: trio.Event | None = None

    # -- what the relay sent ---------------------------------------------------------------
    def of(self, event: str) -> list[Received]:
        return [r for r in self.received if r.event == event]

    @property
    def events(self) -> list[str]:
        return [r.event for r in self.received]

    @property
    def media(self) -> list[bytes]:
        return [base64.b64decode(r.msg["media"]["payload"]) for r in self.of("media")]

    @property
    def audio(self) -> bytes:
        return b"".join(self.media)

    @property
    def audio_ms(self) -> float:
        return len(self.audio) / 8.0

    @property
    def clears(self) -> list[Received]:
        return self.of("clear")

    @property
    def marks(self) -> list[str]:
        return [r.msg["mark"]["name"] for r in self.of("mark")]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[FakeTwilio], bool], timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            while not predicate(self):
                await self._changed.wait()

    async def wait_closed(self, timeout: float = 5.0) -> ConnectionClosed:
        await self.wait_for(lambda f: f.closed is not None, timeout)
        assert self.closed is not None
        return self.closed

    # -- reading -----------------------------------------------------------------------------
    async def run_reader(self) -> None:
        """Read until the relay closes; runs in the relay fixture's nursery."""
        async with trio.open_nursery() as nursery:
            if self.playout:
                nursery.start_soon(self._echo_task)
            try:
                while True:
                    if self._resume is not None:
                        await self._resume.wait()
                    batch = await self.ws.receive()
                    now = trio.current_time()
                    for item in batch:
                        await self._on_message(now, item)
                    self._notify()
            except ConnectionClosed as exc:
                self.closed = exc
                self.closed_at = trio.current_time()
                self._notify()
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(self.ws.stream)

    async def _on_message(self, now: float, item: str | bytes) -> None:
        try:
            msg = orjson.loads(item) if isinstance(item, str) else None
        except orjson.JSONDecodeError:
            msg = None
        if not isinstance(msg, dict):
            self.invalid.append(item)
            return
        self.received.append(Received(now, msg))
        event = msg.get("event")
        if not self.playout:
            return
        if event == "media":
            ms = len(base64.b64decode(msg["media"]["payload"])) / 8.0
            self._play_end = max(now, self._play_end) + ms / 1000.0
            self._sent_ms += ms
        elif event == "mark":
            name = msg["mark"]["name"]
            due = max(now, self._play_end) + self.mark_delay
            self._pending.append((due, name, self._sent_ms))
            self._pending_changed.set()
        elif event == "clear":
            # Twilio: buffer emptied, every pending mark echoed at once = discarded
            self.played_ms_at_clear.append(self.played_ms)
            self._play_end = now
            self._sent_ms = self.played_ms
            pending, self._pending = self._pending, []
            for _due, name, _ms in pending:
                await self._echo(name, discarded=True)

    async def _echo_task(self) -> None:
        while True:
            if not self._pending:
                self._pending_changed = trio.Event()
                await self._pending_changed.wait()
                continue
            due, name, ms = self._pending[0]
            if trio.current_time() < due:
                self._pending_changed = trio.Event()
                with trio.move_on_at(due):
                    await self._pending_changed.wait()
                continue
            self._pending.pop(0)
            self.played_ms = ms
            await self._echo(name, discarded=False)
            self._notify()

    async def _echo(self, name: str, *, discarded: bool) -> None:
        self.echoes.append((trio.current_time(), name, discarded))
        try:
            await self.send({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})
        except ConnectionClosed:
            pass

    def pause_reading(self) -> None:
        """Stop reading (after the batch in hand): the relay's writes back up once the TCP
        window and its socket buffer are full (use a small ``rcvbuf`` to get there fast)."""
        if self._resume is None:
            self._resume = trio.Event()

    def resume_reading(self) -> None:
        if self._resume is not None:
            self._resume.set()
            self._resume = None

    # -- sending -------------------------------------------------------------------------------
    async def send(self, message: dict[str, Any], *, numbered: bool = True) -> None:
        if numbered:
            self.seq += 1
            message = {"event": message["event"], "sequenceNumber": str(self.seq), **message}
        await self.ws.send_text(orjson.dumps(message).decode())

    async def send_raw(self, text: str) -> None:
        await self.ws.send_text(text)

    async def send_binary(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def send_frame(self, opcode: int, payload: bytes) -> None:
        """A hand-built (masked) frame straight onto the socket."""
        await self.ws.stream.send_all(build_frame(opcode, payload, mask=True))

    async def send_connected(self) -> None:
        await self.send(
            {"event": "connected", "protocol": "Call", "version": "1.0.0"}, numbered=False
        )

    def start_message(self) -> dict[str, Any]:
        return {
            "event": "start",
            "streamSid": self.stream_sid,
            "start": {
                "accountSid": self.account_sid,
                "streamSid": self.stream_sid,
                "callSid": self.call_sid,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": dict(self.parameters),
            },
        }

    async def send_start(self) -> None:
        await self.send(self.start_message())

    def media_message(self, ulaw: bytes, *, stream_sid: str | None = None) -> dict[str, Any]:
        self.ts_ms += len(ulaw) // 8
        return {
            "event": "media",
            "streamSid": stream_sid or self.stream_sid,
            "media": {
                "track": "inbound",
                "chunk": str(self.media_sent + 1),
                "timestamp": str(self.ts_ms - len(ulaw) // 8),
                "payload": base64.b64encode(ulaw).decode(),
            },
        }

    async def send_media(self, ulaw: bytes, *, realtime: bool = False) -> None:
        """``ulaw`` as 20 ms frames; ``realtime`` paces them on an absolute 20 ms clock."""
        t0 = trio.current_time()
        for k, i in enumerate(range(0, len(ulaw), FRAME_BYTES)):
            if realtime:
                await trio.sleep_until(t0 + k * 0.02)
            if self.first_media_sent_at is None:
                self.first_media_sent_at = trio.current_time()
            await self.send(self.media_message(ulaw[i : i + FRAME_BYTES]))
            self.media_sent += 1

    async def send_dtmf(self, digit: str) -> None:
        await self.send(
            {
                "event": "dtmf",
                "streamSid": self.stream_sid,
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
        )

    async def echo_mark(self, name: str) -> None:
        await self._echo(name, discarded=False)

    async def send_stop(self) -> None:
        await self.send(
            {
                "event": "stop",
                "streamSid": self.stream_sid,
                "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
            }
        )

    async def hang_up(self) -> None:
        """What Twilio does when the caller hangs up: ``stop``, then a normal close."""
        await self.send_stop()
        with trio.move_on_after(2):
            await self.ws.aclose(1000, "")

    async def drop(self) -> None:
        """The TCP connection dies: no ``stop``, no close frame."""
        self.ws.closed = ConnectionClosed(1006, "dropped by test")
        await trio.aclose_forcefully(self.ws.stream)


async def agent_session(oai: Any, index: int = 0, timeout: float = 5.0) -> Any:
    """The ``index``-th session of a FakeOpenAIServer once the relay has configured it.

    The fake accepts the WebSocket before ``session.update`` arrives; audio scripted
    before that would be generated in the API's default format (PCM 24 kHz)."""
    session = await oai.wait_for_session(index, timeout)
    await session.wait_for(lambda s: s.configured, timeout)
    return session


@pytest.fixture
def e2e() -> SimpleNamespace:
    """Constants and helpers of this module, handed to tests as a fixture."""
    return SimpleNamespace(
        AUTH_TOKEN=AUTH_TOKEN,
        ADMIN_KEY=ADMIN_KEY,
        TOKEN_SECRET=TOKEN_SECRET,
        OTHER_TOKEN=OTHER_TOKEN,
        FRAME_BYTES=FRAME_BYTES,
        OP_TEXT=OP_TEXT,
        OP_BINARY=OP_BINARY,
        UpgradeRefused=UpgradeRefused,
        Twiml=Twiml,
        http_request=http_request,
        openai_agent=openai_agent,
        agent_session=agent_session,
        sid=_sid,
        Relay=Relay,
    )


# --- the control-plane store on both engines ------------------------------------------------
@pytest.fixture(scope="session")
def pg_server_url() -> Any:
    """A real PostgreSQL server for the session (tests/pgserver.py); never skipped."""
    from pgserver import postgres_server

    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: Any, tmp_path: Any) -> str:
    """A fresh, empty database URL on each engine (SQLite file / PostgreSQL schema)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/relay.db"
    from pgserver import reset_database

    url: str = request.getfixturevalue("pg_server_url")
    reset_database(url)
    return url


async def api_request(
    relay_: Relay,
    method: str,
    path: str,
    key: str | None,
    body: Any = None,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    """One /api/v1 request; answers (status, parsed JSON or None)."""
    headers = [("Authorization", f"Bearer {key}")] if key else []
    data = raw if raw is not None else (orjson.dumps(body) if body is not None else b"")
    if data:
        headers.append(("Content-Type", "application/json"))
    response = await http_request(relay_.port, method, path, headers=headers, body=data)
    parsed = orjson.loads(response.body) if response.body.strip() else None
    return response.status, parsed
