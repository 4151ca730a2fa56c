"""CALIBRATION PEER: a minimal relay with a known, injected delay (default 0).

Not a real relay: it trusts its peers, keeps no state beyond what forwarding needs and
never paces audio. It exists for two reasons:

- the tests run it in-process with e.g. ``delay_ms=30`` and check that the measured
  latency of each leg comes out at 30 ms (the measuring code measures what it claims);
- ``python -m bench load --targets null`` runs it as a separate process to show how many
  calls the load generator can drive before it, not the target, becomes the limit.

It checks X-Twilio-Signature on the webhook and on the stream upgrade like Twilio
expects. With ``transcode=True`` it stands in for a resampling relay with the crudest
possible resampler (sample repetition up, decimation down; G.711 μ-law both ways), which
is enough for the benchmark's level-coded frames.

    python -m bench.peers.null_relay --port 5070 --agent-url ws://127.0.0.1:9000/v1/realtime
"""

from __future__ import annotations

import argparse
import binascii
import functools
import gc
import os
import struct
from urllib.parse import parse_qsl, urlsplit

import orjson

from bench.loadgen import compute_signature
from bench.netio import HttpConn, Listener, Reactor, WsClient, frame, monotonic_ns
from bench.stats import ULAW_LINEAR, linear_to_ulaw

_UP = [struct.pack("<3h", v, v, v) for v in ULAW_LINEAR]  # μ-law code -> 3 PCM samples


def ulaw8k_b64_to_pcm24k_b64(audio: str) -> str:
    pcm = b"".join([_UP[c] for c in binascii.a2b_base64(audio)])
    return binascii.b2a_base64(pcm, newline=False).decode()


@functools.lru_cache(maxsize=65536)
def _encode(v: int) -> int:
    return linear_to_ulaw(v)


def pcm24k_b64_to_ulaw8k_b64(audio: str) -> str:
    pcm = binascii.a2b_base64(audio)
    samples = memoryview(pcm[: len(pcm) // 6 * 6]).cast("h")[::3]
    return binascii.b2a_base64(bytes([_encode(v) for v in samples]), newline=False).decode()


class _AgentLink(WsClient):
    def __init__(self, call: _RelayCall, host: str, port: int) -> None:
        super().__init__(
            call.relay.reactor,
            host,
            port,
            call.relay.agent_path,
            {"Authorization": "Bearer " + os.environ.get("OPENAI_API_KEY", "sk-x")},
        )
        self.call = call
        self.pending: list[bytes] = []

    def on_upgraded(self, now: int) -> None:
        fmt = (
            {"type": "audio/pcm", "rate": 24000}
            if self.call.relay.transcode
            else {"type": "audio/pcmu"}
        )
        update = {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "audio": {"input": {"format": fmt}, "output": {"format": fmt}},
            },
        }
        self.send(frame(orjson.dumps(update), masked=True) + b"".join(self.pending))
        self.pending = []

    def deliver(self, data: bytes) -> None:
        if self.upgraded:
            self.send(data)
        else:
            self.pending.append(data)

    def on_message(self, opcode: int, payload: bytes, now: int) -> None:
        msg = orjson.loads(payload)
        kind = msg["type"]
        call = self.call
        if kind == "response.output_audio.delta":
            audio = msg["delta"]
            if call.relay.transcode:
                audio = pcm24k_b64_to_ulaw8k_b64(audio)
            media = orjson.dumps(
                {"event": "media", "streamSid": call.sid, "media": {"payload": audio}}
            )
            mark = orjson.dumps(
                {"event": "mark", "streamSid": call.sid, "mark": {"name": msg["item_id"]}}
            )
            call.later(call.to_twilio, frame(media) + frame(mark))
        elif kind == "input_audio_buffer.speech_started":
            call.later(
                call.to_twilio, frame(orjson.dumps({"event": "clear", "streamSid": call.sid}))
            )


class _RelayCall:
    def __init__(self, relay: DelayRelay, conn: HttpConn) -> None:
        self.relay = relay
        self.conn = conn
        self.sid = None
        self.link: _AgentLink | None = None
        self.media_seen = 0
        conn.on_ws_message = self.from_twilio

    def later(self, fn, data: bytes) -> None:
        delay = self.relay.delay_ns
        if delay:
            self.relay.reactor.call_at(monotonic_ns() + delay, fn, data)
        else:  # calibration runs: no timer per message
            fn(data)

    def to_twilio(self, data: bytes) -> None:
        self.conn.send(data)

    def from_twilio(self, opcode: int, payload: bytes, now: int) -> None:
        msg = orjson.loads(payload)
        event = msg["event"]
        relay = self.relay
        if event == "start":
            self.sid = msg["start"]["streamSid"]
            if not msg["start"]["customParameters"].get("token", "").startswith("t-"):
                self.conn.ws_close(1008)
                return
            self.link = _AgentLink(self, relay.agent_host, relay.agent_port)
            self.link.start()
        elif event == "media":
            self.media_seen += 1
            if relay.drop_every and self.media_seen % relay.drop_every == 0:
                return
            audio = msg["media"]["payload"]
            if relay.transcode:
                audio = ulaw8k_b64_to_pcm24k_b64(audio)
            append = orjson.dumps({"type": "input_audio_buffer.append", "audio": audio})
            self.later(self.link.deliver, frame(append, masked=True))
        elif event == "stop":
            if self.link is not None:
                self.link.ws_close()
            self.conn.ws_close()


class DelayRelay:
    """Twilio <-> agent relay that delays every forwarded message by ``delay_ms``."""

    def __init__(
        self,
        reactor: Reactor,
        agent_url: str,
        delay_ms: float = 0.0,
        transcode: bool = False,
        drop_every: int = 0,
        auth_token: str = "",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.reactor = reactor
        self.delay_ns = int(delay_ms * 1e6)
        self.transcode = transcode
        self.drop_every = drop_every
        parts = urlsplit(agent_url)
        self.agent_host, self.agent_port = parts.hostname, parts.port
        self.agent_path = parts.path or "/"
        self.auth_token = auth_token
        self.listener = Listener(reactor, lambda r, s: HttpConn(r, s, self), host, port)
        self.base = f"http://{self.listener.host}:{self.listener.port}"
        self.bad_signatures = 0

    def on_request(self, conn, method, path, headers, body) -> None:
        if method == "POST" and path == "/twilio/voice":
            params = dict(parse_qsl(body.decode()))
            sig = compute_signature(self.auth_token, self.base + path, params)
            if headers.get("x-twilio-signature") != sig:
                self.bad_signatures += 1
                conn.respond(403, b"bad signature")
                return
            url = f"ws://{self.listener.host}:{self.listener.port}/twilio/stream"
            twiml = (
                f'<Response><Connect><Stream url="{url}"><Parameter name="token" '
                f'value="t-{params["CallSid"]}"/></Stream></Connect></Response>'
            )
            conn.respond(200, twiml.encode(), "application/xml")
        elif path == "/twilio/stream":
            url = f"ws://{self.listener.host}:{self.listener.port}/twilio/stream"
            if headers.get("x-twilio-signature") != compute_signature(self.auth_token, url):
                self.bad_signatures += 1
                conn.respond(403, b"bad signature")
                return
            conn.accept_websocket(headers)
            call = _RelayCall(self, conn)
            engine = self.reactor.engine
            if (
                engine is not None
                and not conn.closed
                and not (self.delay_ns or self.transcode or self.drop_every)
            ):
                # Calibration runs: the uplink forwarded by compiled code (bench._genfast)
                self.reactor.set_callback(conn.fd, engine.NullTwilioReader(conn, call))
        elif path in ("/", "/healthz"):
            conn.respond(200, b"ok\n")
        else:
            conn.respond(404, b"")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="calibration relay with an injected delay")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5070)
    parser.add_argument("--agent-url", required=True)
    parser.add_argument("--audio", default="pcmu", choices=["pcmu", "pcm24k"])
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    # The compiled loop when the harness has built it (it does before starting targets);
    # never a build from here, so a target process starts in a known time.
    from bench import genfast

    reactor = Reactor(engine=genfast.load(build=False)[0])
    # Per-message garbage is acyclic; a cyclic collection over 1,000+ connections pauses
    # the loop for tens of milliseconds, which would read as latency of a relay that has
    # none. A calibration run lives for seconds, so no collector at all.
    gc.disable()
    DelayRelay(
        reactor,
        args.agent_url,
        args.delay_ms,
        transcode=args.audio == "pcm24k",
        auth_token=os.environ.get("RELAY_TWILIO_AUTH_TOKEN", ""),
        host=args.host,
        port=args.port,
    )
    try:
        reactor.run()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
