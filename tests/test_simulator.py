"""The Twilio call simulator against a fake relay written here (h11 + trio-websocket).

Most tests run the whole call over in-memory streams under ``MockClock(autojump)``
(pytest-trio's ``autojump_clock`` fixture), so 20 ms pacing and mark timing are exact and
a multi-second call takes milliseconds. One smoke test uses real TCP.
"""

from __future__ import annotations

import base64
import math
import wave
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import h11
import numpy as np
import orjson
import pytest
import trio
import trio.testing
import trio_websocket

from relay.agents.base import AgentAudio, AgentHangup, AgentSpeechStarted, CallInfo
from relay.agents.parrot import ParrotAgent
from relay.errors import ConnectionClosed
from relay.protocol.signature import validate_signature
from relay.sim import simulator, speech
from relay.sim.simulator import CallResult, Playout, parse_twiml, place_call

TOKEN = "test-auth-token-0123456789"
BASE = "http://relay.test"
STREAM_URL = "wss://relay.test/twilio/stream"
TWIML = (
    '<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
    f'<Stream url="{STREAM_URL}" statusCallback="/twilio/status">'
    '<Parameter name="token" value="tok-123"/><Parameter name="agent" value="parrot"/>'
    "</Stream></Connect></Response>"
)

Script = Callable[["StreamPeer"], Awaitable[None]]


class _Prefixed(trio.abc.Stream):
    """Replays bytes already read (the request head) before the rest of the stream."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self.inner, self.prefix = inner, prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.prefix:
            data, self.prefix = self.prefix, b""
            return data
        return bytes(await self.inner.receive_some(max_bytes))

    async def send_all(self, data: Any) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


class StreamPeer:
    """The relay's end of one media stream: records what the simulator sent, with times."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.received: list[tuple[float, Any]] = []  # (time, parsed JSON message)
        self.t_start = 0.0
        self.started = trio.Event()
        # every message from the simulator, for scripts that act on them (e.g. a bridge)
        self._inbox_send, self.inbox = trio.open_memory_channel[Any](math.inf)

    async def read_all(self) -> None:
        try:
            while True:
                message = orjson.loads(await self.ws.get_message())
                if message.get("event") == "start":
                    self.t_start = trio.current_time()
                    self.started.set()
                self.received.append((trio.current_time(), message))
                self._inbox_send.send_nowait(message)
        except trio_websocket.ConnectionClosed:
            self._inbox_send.send_nowait({"event": "closed"})

    @property
    def stream_sid(self) -> str:
        return next(m["streamSid"] for _, m in self.received if m.get("event") == "start")

    def of(self, event: str) -> list[tuple[float, Any]]:
        """Messages of one kind, timed from the `start` message."""
        return [(t - self.t_start, m) for t, m in self.received if m.get("event") == event]

    async def send(self, event: str, **body: Any) -> None:
        message = {"event": event, "streamSid": self.stream_sid, **body}
        await self.ws.send_message(orjson.dumps(message).decode())

    async def send_audio(self, ulaw: bytes) -> None:
        await self.send("media", media={"payload": base64.b64encode(ulaw).decode()})

    async def sleep_until(self, t: float) -> None:
        await trio.sleep_until(self.t_start + t)


class FakeRelay:
    """The relay side: answers the webhook with TwiML and serves media streams.

    It checks what Twilio guarantees (signatures) and records everything with trio's clock.
    ``script(peer)`` runs for each stream once its `start` message has arrived.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        twiml: str = TWIML,
        script: Script | None = None,
        reject_status: int | None = None,
    ) -> None:
        self.nursery = nursery
        self.twiml = twiml
        self.script = script
        self.reject_status = reject_status
        self.webhooks: list[tuple[str, dict[str, str], bool]] = []  # path, form, signature ok
        self.upgrade_headers: dict[str, str] = {}
        self.peers: list[StreamPeer] = []

    @property
    def peer(self) -> StreamPeer:
        return self.peers[0]

    async def opener(self, host: str, port: int, tls: bool) -> trio.abc.Stream:
        assert (host, port, tls) == ("relay.test", 80, False)
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self._serve, server)
        return client

    async def _serve(self, stream: trio.abc.Stream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
        if b"upgrade: websocket" in buf.lower():
            await self._websocket(_Prefixed(stream, buf))
        else:
            await self._http(stream, buf)

    async def _http(self, stream: trio.abc.Stream, buf: bytes) -> None:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(buf)
        request: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        assert request is not None
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        assert headers["content-type"] == "application/x-www-form-urlencoded"
        form = dict(parse_qsl(body.decode(), keep_blank_values=True))
        path = request.target.decode()
        url = f"http://{headers['host']}{path}"
        ok = validate_signature(TOKEN, url, form, headers.get("x-twilio-signature"))
        self.webhooks.append((path, form, ok))
        reply = self.twiml.encode() if path == "/twilio/voice" else b""
        await stream.send_all(
            conn.send(h11.Response(status_code=200, headers=[("Content-Length", str(len(reply)))]))
            + conn.send(h11.Data(data=reply))
            + conn.send(h11.EndOfMessage())
        )
        await stream.aclose()

    async def _websocket(self, stream: trio.abc.Stream) -> None:
        request = await trio_websocket.wrap_server_stream(self.nursery, stream)
        self.upgrade_headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        if self.reject_status is not None:
            await request.reject(self.reject_status, body=b"no")
            return
        peer = StreamPeer(await request.accept())
        self.peers.append(peer)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.read_all)
            if self.script is not None:
                await peer.started.wait()
                await self.script(peer)


async def run_call(
    script: Script | None = None,
    *,
    twiml: str = TWIML,
    reject_status: int | None = None,
    **kwargs: Any,
) -> tuple[CallResult, FakeRelay]:
    kwargs.setdefault("audio", speech.make_script([("speech", 1.0)], seed=3))
    kwargs.setdefault("duration_s", 1.0)
    with trio.fail_after(120):  # virtual seconds under the autojump clock
        async with trio.open_nursery() as nursery:
            relay = FakeRelay(nursery, twiml=twiml, script=script, reject_status=reject_status)
            result = await place_call(BASE, TOKEN, opener=relay.opener, **kwargs)
            nursery.cancel_scope.cancel()
    return result, relay


def tone_ulaw(ms: int, hz: float = 440.0) -> bytes:
    t = np.arange(ms * 8) / 8000
    return speech.mulaw_encode((np.sin(2 * np.pi * hz * t) * 8000).astype(np.int16))


# --- the protocol ------------------------------------------------------------------------------
async def test_signed_webhook_and_message_formats(autojump_clock: trio.abc.Clock) -> None:
    result, relay = await run_call(dtmf=[(0.1, "5")])

    path, form, signed = relay.webhooks[0]
    assert path == "/twilio/voice" and signed
    assert form["CallSid"].startswith("CA") and len(form["CallSid"]) == 34
    assert form["AccountSid"].startswith("AC") and len(form["AccountSid"]) == 34
    assert form["CallStatus"] == "ringing" and form["Direction"] == "inbound"
    assert form["ApiVersion"] == "2010-04-01" and form["To"] == "+15550100000"

    headers = relay.upgrade_headers
    assert validate_signature(TOKEN, STREAM_URL, None, headers["x-twilio-signature"])
    assert headers["x-forwarded-proto"] == "https"  # we dialled plain http: act as the proxy

    messages = [m for _, m in relay.peer.received]
    assert messages[0] == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    start = messages[1]
    assert start["event"] == "start" and start["sequenceNumber"] == "1"
    assert start["streamSid"].startswith("MZ") and len(start["streamSid"]) == 34
    assert start["start"] == {
        "accountSid": form["AccountSid"],
        "streamSid": start["streamSid"],
        "callSid": form["CallSid"],
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"token": "tok-123", "agent": "parrot"},
    }
    # sequence numbers are strings and count every message after `connected`
    assert [m["sequenceNumber"] for m in messages[1:]] == [str(i) for i in range(1, len(messages))]

    media = [m for m in messages if m["event"] == "media"]
    assert len(media) == 50 == result.media_sent  # 1 s of 20 ms frames
    for i, m in enumerate(media):
        assert m["streamSid"] == start["streamSid"]
        assert m["media"]["track"] == "inbound"
        assert m["media"]["chunk"] == str(i + 1)
        assert m["media"]["timestamp"] == str(i * 20)
        assert len(base64.b64decode(m["media"]["payload"])) == 160

    dtmf = relay.peer.of("dtmf")
    assert [m["dtmf"] for _, m in dtmf] == [{"track": "inbound_track", "digit": "5"}]
    assert dtmf[0][0] == pytest.approx(0.1)

    stop = messages[-1]
    assert stop["event"] == "stop"
    assert stop["stop"] == {"accountSid": form["AccountSid"], "callSid": form["CallSid"]}
    assert result.hung_up_by == "caller" and result.close_code == 1000 and result.ok

    # stream status callbacks (TwiML statusCallback) and the call's `completed` callback
    callbacks = [(p, f) for p, f, ok in relay.webhooks[1:] if ok]
    events = [f.get("StreamEvent") or f.get("CallStatus") for _, f in callbacks]
    assert sorted(events) == ["completed", "stream-started", "stream-stopped"]
    done = next(f for _, f in callbacks if f.get("CallStatus") == "completed")
    assert done["CallDuration"] == "1"


async def test_media_paced_every_20ms_on_trio_clock(autojump_clock: trio.abc.Clock) -> None:
    result, relay = await run_call(duration_s=2.0)
    times = [t for t, _ in relay.peer.of("media")]
    assert len(times) == 100
    # absolute schedule: frame k leaves at exactly start + k * 20 ms (no drift)
    assert np.allclose(times, np.arange(100) * 0.02, atol=1e-9)
    assert result.duration_s == pytest.approx(2.0)


async def test_mark_echoed_only_after_preceding_audio_played(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def script(peer: StreamPeer) -> None:
        await peer.send("mark", mark={"name": "empty"})  # nothing buffered: echo at once
        await peer.sleep_until(0.1)
        await peer.send_audio(tone_ulaw(300))
        await peer.send("mark", mark={"name": "after-300ms"})

    result, relay = await run_call(script, duration_s=1.0)
    echoes = {m["mark"]["name"]: t for t, m in relay.peer.of("mark")}
    assert echoes["empty"] == pytest.approx(0.0, abs=1e-6)
    # played from the 0.12 s tick, 15 frames, echoed at the tick after the last one
    assert 0.4 <= echoes["after-300ms"] <= 0.44
    assert result.marks_received == 2 == result.marks_echoed and result.marks_discarded == 0
    assert result.heard_ms == 300 and result.dropped_ms == 0
    assert result.first_agent_audio_s == pytest.approx(0.1)


async def test_clear_drops_audio_and_echoes_marks_at_once(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    async def script(peer: StreamPeer) -> None:
        await peer.send_audio(tone_ulaw(2000))
        await peer.send("mark", mark={"name": "m1"})
        await peer.send_audio(tone_ulaw(500))
        await peer.send("mark", mark={"name": "m2"})
        await peer.sleep_until(0.5)
        await peer.send("clear")

    wav = tmp_path / "heard.wav"
    result, relay = await run_call(script, duration_s=1.5, record_path=wav)
    echoes = [(t, m["mark"]["name"]) for t, m in relay.peer.of("mark")]
    assert [name for _, name in echoes] == ["m1", "m2"]
    assert all(t == pytest.approx(0.5, abs=1e-6) for t, _ in echoes)  # immediately, in order
    assert result.clears == 1 and result.marks_discarded == 2
    assert 480 <= result.heard_ms <= 520
    assert result.heard_ms + result.dropped_ms == 2500
    kinds = [k for _, k, _ in result.timeline]
    assert "clear" in kinds and kinds.index("agent_audio_start") < kinds.index("clear")

    # the WAV holds what was played, silence included: tone until the clear, then silence
    with wave.open(str(wav)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    assert len(pcm) == 1.5 * 8000
    played = int(result.heard_ms * 8)
    first = 160  # the audio arrived just after the t=0 tick: playout starts on the next one
    assert not pcm[:first].any()
    assert np.array_equal(
        pcm[first : first + played], speech.mulaw_decode(tone_ulaw(2000))[:played]
    )
    assert not pcm[first + played :].any()
    assert result.wav_path == str(wav)


async def test_relay_hangup_is_recorded(autojump_clock: trio.abc.Clock) -> None:
    async def script(peer: StreamPeer) -> None:
        await peer.sleep_until(0.5)
        await peer.ws.aclose(1000, "agent ended")

    result, relay = await run_call(script, duration_s=5.0)
    assert result.hung_up_by == "relay" and result.close_code == 1000 and result.ok
    assert result.duration_s == pytest.approx(0.5, abs=0.03)
    assert not relay.peer.of("stop")  # the socket is gone: Twilio has nothing to send a stop on
    assert result.timeline[-1][1] == "hangup"


async def test_caller_hangs_up_once_agent_quiet(autojump_clock: trio.abc.Clock) -> None:
    async def script(peer: StreamPeer) -> None:
        await peer.sleep_until(0.8)
        await peer.send_audio(tone_ulaw(1000))

    audio = speech.make_script([("speech", 0.5)], seed=1)
    result, relay = await run_call(script, audio=audio, duration_s=None, hangup_after_s=1.0)
    stop_t = relay.peer.of("stop")[0][0]
    assert stop_t == pytest.approx(0.82 + 1.0 + 1.0, abs=0.05)  # reply played, then 1 s quiet
    assert result.heard_ms == 1000 and result.hung_up_by == "caller"


async def test_timeline_turns_and_latencies(autojump_clock: trio.abc.Clock) -> None:
    audio = speech.make_script([("silence", 0.2), ("speech", 1.0), ("silence", 2.0)], seed=2)

    async def script(peer: StreamPeer) -> None:
        await peer.sleep_until(1.7)  # 500 ms after the caller stops
        await peer.send_audio(tone_ulaw(600))

    result, _ = await run_call(script, audio=audio, duration_s=3.2)
    kinds = [k for _, k, _ in result.timeline]
    assert kinds[:2] == ["caller_speech_start", "caller_speech_stop"]
    assert result.times("caller_speech_start")[0] == pytest.approx(0.2, abs=0.05)
    assert result.times("caller_speech_stop")[0] == pytest.approx(1.2, abs=0.05)
    assert result.times("agent_audio_start") == [pytest.approx(1.7)]
    assert result.times("agent_audio_end")[0] == pytest.approx(2.32, abs=0.03)
    assert result.response_latencies() == [pytest.approx(0.5, abs=0.05)]
    assert result.first_agent_audio_s == pytest.approx(1.7)


async def test_invalid_and_binary_messages_counted(autojump_clock: trio.abc.Clock) -> None:
    async def script(peer: StreamPeer) -> None:
        await peer.ws.send_message(b"\x00\x01")
        await peer.ws.send_message("{not json")
        await peer.ws.send_message(
            orjson.dumps({"event": "play", "streamSid": peer.stream_sid}).decode()
        )
        await peer.ws.send_message(
            orjson.dumps({"event": "clear", "streamSid": "MZother"}).decode()
        )
        await peer.send("media", media={"payload": "***"})
        await peer.send("mark", mark={})

    result, _ = await run_call(script, duration_s=0.2)
    assert result.binary_frames == 1
    assert result.invalid_messages == 5
    assert result.clears == 0 and result.media_received == 0
    assert any(w.startswith("31950") for w in result.warnings)
    assert sum(w.startswith("31951") for w in result.warnings) == 5


async def test_upgrade_refused(autojump_clock: trio.abc.Clock) -> None:
    result, _ = await run_call(reject_status=403)
    assert result.refused is not None and "403" in result.refused
    assert not result.ok and result.hung_up_by is None and result.media_sent == 0


@pytest.mark.parametrize(
    ("twiml", "expected"),
    [
        ('<Response><Reject reason="busy"/></Response>', "reject (busy)"),
        ("<Response><Hangup/></Response>", "hangup"),
        ("<Response><Say>Sorry, closed.</Say></Response>", "no <Connect><Stream> (Say: Sorry"),
        ("<Response><Connect><Stream/></Connect></Response>", "<Stream> without url"),
        ("not xml", "invalid TwiML"),
    ],
)
async def test_twiml_without_stream(
    autojump_clock: trio.abc.Clock, twiml: str, expected: str
) -> None:
    result, relay = await run_call(twiml=twiml)
    assert result.rejected is not None and result.rejected.startswith(expected)
    assert not relay.peers and not result.ok


def test_parse_twiml_details() -> None:
    plan = parse_twiml(
        '<Response><Say>hi</Say><Connect><Stream url="wss://h/s?x=1" name="n" '
        'statusCallback="https://h/cb"><Parameter name="a" value="1"/></Stream></Connect>'
        "<Pause length='60'/></Response>"
    )
    assert plan.stream_url == "wss://h/s"  # Twilio strips the query string
    assert plan.parameters == {"a": "1"} and plan.stream_name == "n"
    assert plan.status_callback == "https://h/cb" and plan.after_connect == ["Pause"]
    assert len(plan.warnings) == 2  # query string stripped, <Pause> after <Connect>
    bad = parse_twiml(
        '<Response><Connect><Stream url="wss://h/s" track="both_tracks"/></Connect></Response>'
    )
    assert bad.rejected is not None and bad.rejected.startswith("31941")


# --- Twilio's buffer, unit level ----------------------------------------------------------
def test_playout_rules() -> None:
    p = Playout()
    assert p.push_mark("now") is True  # nothing buffered
    p.push_audio(b"\x01" * 200)
    assert p.push_mark("a") is False
    frame, audio, done = p.tick()
    assert (frame, audio, done) == (b"\x01" * 160, 160, [])
    frame, audio, done = p.tick()
    assert frame == b"\x01" * 40 + b"\xff" * 120 and audio == 40 and done == []
    assert p.push_mark("b") is False  # the last frame is still playing
    assert p.tick() == (b"\xff" * 160, 0, ["a", "b"])  # both finished with that frame
    assert p.idle and p.push_mark("c") is True

    p.push_audio(b"\x02" * 500)
    p.push_mark("x")
    p.push_audio(b"\x03" * 500)
    p.push_mark("y")
    p.tick()
    dropped, marks = p.clear()
    assert dropped == 840 and marks == ["x", "y"] and p.buffered == 0


# --- several calls, real TCP, WAV helpers ------------------------------------------------
async def test_simulate_concurrent_calls_and_report(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    async def script(peer: StreamPeer) -> None:
        await peer.send_audio(tone_ulaw(200))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            relay = FakeRelay(nursery, script=script)
            results = await simulator.simulate(
                BASE, TOKEN, calls=3, duration_s=0.6, out_dir=tmp_path, opener=relay.opener
            )
            nursery.cancel_scope.cancel()
    assert len(results) == 3 and all(r.ok for r in results)
    assert len({r.call_sid for r in results}) == 3 == len({r.stream_sid for r in results})
    assert all(r.heard_ms == 200 and r.invalid_messages == 0 for r in results)
    starts = sorted(p.t_start for p in relay.peers)
    assert np.allclose(np.diff(starts), 0.2)  # staggered
    assert all(Path(r.wav_path or "").exists() for r in results)
    report = simulator.format_report(results)
    assert "3/3 calls ok" in report and results[0].call_sid[:10] in report
    assert "hung up by caller" in report


async def test_real_tcp_smoke() -> None:
    received: list[str] = []

    async def handler(stream: trio.SocketStream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += await stream.receive_some(65536)
        if b"upgrade: websocket" not in buf.lower():
            twiml = TWIML.replace(STREAM_URL, f"ws://127.0.0.1:{port}/twilio/stream").encode()
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(twiml)}\r\nConnection: close\r\n\r\n"
            await stream.send_all(head.encode() + twiml)
            await stream.aclose()
            return
        request = await trio_websocket.wrap_server_stream(nursery, _Prefixed(stream, buf))
        ws = await request.accept()
        try:
            while True:
                received.append(orjson.loads(await ws.get_message())["event"])
        except trio_websocket.ConnectionClosed:
            pass

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            result = await place_call(
                f"http://127.0.0.1:{port}",
                TOKEN,
                audio=speech.speech(0.2),
                duration_s=0.2,
                status_callback=None,
            )
            nursery.cancel_scope.cancel()
    assert result.ok and result.media_sent == 10
    assert received[:2] == ["connected", "start"] and received[-1] == "stop"


def test_wav_roundtrip_and_conversion(tmp_path: Path) -> None:
    pcm = speech.speech(0.5, seed=4)
    path = simulator.write_wav(tmp_path / "a.wav", pcm)
    assert simulator.load_wav(path) == speech.mulaw_encode(pcm)

    # 16 kHz stereo is mixed down and resampled to 8 kHz mono
    stereo = tmp_path / "b.wav"
    with wave.open(str(stereo), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        t = np.arange(16000) / 16000
        tone = (np.sin(2 * np.pi * 300 * t) * 10000).astype("<i2")
        w.writeframes(np.stack([tone, tone], axis=1).tobytes())
    ulaw = simulator.load_wav(stereo)
    assert len(ulaw) == 8000
    level = speech.frame_dbfs(speech.mulaw_decode(ulaw))
    assert abs(np.median(level) - 20 * np.log10(10000 / 32768 / np.sqrt(2))) < 1.0

    bogus = tmp_path / "c.wav"
    bogus.write_bytes(b"RIFF....WAVEfmt garbage")
    with pytest.raises(ValueError, match="not a PCM WAV"):
        simulator.load_wav(bogus)


# --- simulator + parrot through a minimal bridge (what relay/call.py does, much simplified) ---
async def parrot_bridge(peer: StreamPeer) -> None:
    """Caller audio -> parrot; parrot audio -> media + a mark per burst; barge-in -> clear;
    AgentHangup -> close once the last mark is echoed (the goodbye has been heard)."""
    agent = ParrotAgent(greeting=True)
    await agent.connect(CallInfo(call_sid="CA" + "2" * 32, stream_sid=peer.stream_sid))
    last_mark: list[str] = []
    hangup = trio.Event()
    heard_all = trio.Event()

    async def downlink() -> None:
        n = 0
        try:
            while True:
                for event in await agent.receive():
                    if isinstance(event, AgentAudio):
                        n += 1
                        await peer.send_audio(event.audio)
                        await peer.send("mark", mark={"name": f"{event.response_id}:{n}"})
                        last_mark[:] = [f"{event.response_id}:{n}"]
                    elif isinstance(event, AgentSpeechStarted):
                        await peer.send("clear")
                    elif isinstance(event, AgentHangup):
                        hangup.set()
        except ConnectionClosed:
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(downlink)
        async for message in peer.inbox:
            event = message["event"]
            if event == "media":
                agent.send_audio(base64.b64decode(message["media"]["payload"]))
            elif event == "dtmf":
                agent.send_dtmf(message["dtmf"]["digit"])
            elif event == "mark" and hangup.is_set() and [message["mark"]["name"]] == last_mark:
                heard_all.set()
            if heard_all.is_set() or event in ("stop", "closed"):
                break
        await agent.aclose()
        if heard_all.is_set():
            await peer.ws.aclose(1000)


async def test_conversation_with_parrot(autojump_clock: trio.abc.Clock, tmp_path: Path) -> None:
    caller = speech.make_script(
        [
            ("silence", 1.5),  # the greeting chime plays (~0.8 s)
            ("speech", 1.0),  # utterance 1, echoed from ~3.1 s for ~1.3 s
            ("silence", 1.0),
            ("speech", 0.8),  # talks over the echo at 3.5 s: barge-in
            ("silence", 3.0),
        ],
        seed=11,
    )
    live: list[tuple[str, float, str, str]] = []
    result, _ = await run_call(
        parrot_bridge,
        audio=caller,
        duration_s=None,
        dtmf=[(7.0, "#")],
        record_path=tmp_path / "call.wav",
        on_event=lambda *event: live.append(event),
    )
    assert sorted((round(t, 4), k, d) for _, t, k, d in live) == sorted(result.timeline)
    assert {sid for sid, *_ in live} == {result.call_sid}
    assert orjson.loads(orjson.dumps(result.to_dict()))["ok"] is True
    assert result.ok and result.hung_up_by == "relay" and result.close_code == 1000
    starts = result.times("agent_audio_start")
    assert len(starts) == 4  # greeting, echo 1, echo 2, goodbye
    assert starts[0] == pytest.approx(0.0, abs=0.03)
    [barge] = result.barge_in_latencies()
    assert barge < 0.1  # ~60 ms of VAD, then clear
    assert result.clears == 1 and result.marks_discarded > 0
    assert all(0.55 <= lat <= 0.75 for lat in result.response_latencies())  # 600 ms end-of-turn
    assert result.times("dtmf") == [pytest.approx(7.0)]
    assert result.times("hangup")[0] > 7.5  # after the goodbye chime had played
    assert result.unplayed_ms_at_hangup == 0
    assert result.invalid_messages == 0 and result.binary_frames == 0


async def test_speaks_the_same_protocol_as_relay_parser(autojump_clock: trio.abc.Clock) -> None:
    """Cross-check with relay.protocol.twilio: what the simulator sends parses there, and
    what the relay builds is valid for the simulator."""
    from relay.protocol import twilio as proto

    parsed: list[object] = []

    async def script(peer: StreamPeer) -> None:
        stream = proto.TwilioStream()
        for _ in range(2):  # connected, start: the script runs once start has arrived
            parsed.append(stream.parse(orjson.dumps(await peer.inbox.receive()).decode()))
        await peer.ws.send_message(stream.media_message(tone_ulaw(100)).decode())
        await peer.ws.send_message(stream.mark_message("m1").decode())
        await peer.ws.send_message(stream.clear_message().decode())
        async for message in peer.inbox:
            if message["event"] == "closed":
                break
            parsed.append(stream.parse(orjson.dumps(message).decode()))

    result, _ = await run_call(script, dtmf=[(0.5, "7")])
    kinds = [type(p).__name__ for p in parsed]
    assert kinds[:2] == ["Connected", "Start"] and kinds[-1] == "Stop"
    assert {"Media", "Dtmf", "MarkEcho"} <= set(kinds)
    assert result.invalid_messages == 0 and result.clears == 1 and result.media_received == 1
