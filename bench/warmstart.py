"""``python -m bench warmstart``: stream ``start`` -> first greeting audio, warm vs cold.

What a caller waits for once Twilio has opened the media stream: with a cold start relay
connects the agent when ``start`` arrives (handshake, session setup, then the model's time
to first audio); with warm start (relay/control/warm.py) all of that began while relay
answered the voice webhook, during the time Twilio takes to read the TwiML and open the
stream.

Setup, all on loopback in one process: a real relay (``RelayServer``, store ``memory``),
the fake OpenAI Realtime server of the test suite (tests/fake_openai.py) with a
configurable handshake delay and time to first audio, and Twilio played here: the signed
voice webhook, a pause of ``gap`` ms (Twilio fetching the TwiML and dialling the stream),
the signed stream upgrade, ``connected`` + ``start``; the clock runs from sending
``start`` to receiving the first ``media`` message. Calls run one at a time, warm and
cold interleaved, so neither gets a warmer cache or a quieter machine.

Defaults model a vendor in another region: 300 ms handshake (TCP + TLS + upgrade), 400 ms
to the first audio of a response; Twilio's webhook-to-``start`` gap 300 ms (fast) and
1000 ms (a short ``<Say>`` prelude, or a slow path). Results: a table on stdout and JSON
(``bench/results/warmstart.json`` by default).
"""

from __future__ import annotations

import argparse
import platform
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import trio

from bench.report import save_json

RESULTS = Path(__file__).resolve().parent / "results"
TESTS = Path(__file__).resolve().parent.parent / "tests"
NUMBERS = {"warm": "+15550001111", "cold": "+15550002222"}


def _fake_openai() -> Any:
    if str(TESTS) not in sys.path:  # the test suite's fake; bench/ is a dev tool in the repo
        sys.path.insert(0, str(TESTS))
    import fake_openai

    return fake_openai


def _config(oai: Any) -> Any:
    from relay.config import Config

    cfg = Config()
    cfg.server.host, cfg.server.port, cfg.server.public_url = "127.0.0.1", 0, ""
    cfg.twilio.auth_token = secrets.token_hex(16)
    cfg.store.url = "memory"
    base = {
        "type": "openai",
        "url": oai.url,
        "api_key": oai.api_key,
        "audio": "pcmu",
        "greeting": "Hello, thanks for calling.",
    }
    cfg.agents = {
        "warm": {**base, "warm_start": True},
        "cold": {**base, "warm_start": False},
    }
    cfg.numbers = {number: name for name, number in NUMBERS.items()}
    cfg.calls.default_agent = "warm"
    return cfg


async def _one_call(cfg: Any, mode: str, gap_s: float) -> float:
    """One call; seconds from ``start`` sent to the first ``media`` received."""
    from relay.media import websocket
    from relay.protocol.signature import compute_signature
    from relay.sim import simulator

    token = cfg.twilio.auth_token
    call_sid = "CA" + secrets.token_hex(16)
    account = "AC" + secrets.token_hex(16)
    params = {
        "CallSid": call_sid,
        "AccountSid": account,
        "From": "+14155550123",
        "To": NUMBERS[mode],
        "CallStatus": "ringing",
        "ApiVersion": "2010-04-01",
        "Direction": "inbound",
    }
    response = await simulator.http_post_form(
        cfg.public_url + "/twilio/voice", params, auth_token=token, timeout=10.0
    )
    plan = simulator.parse_twiml(response.body)
    if plan.stream_url is None:
        raise RuntimeError(f"no stream in the TwiML: {plan.rejected}")
    await trio.sleep(gap_s)
    ws = await websocket.connect(
        plan.stream_url, [("x-twilio-signature", compute_signature(token, plan.stream_url))]
    )
    stream_sid = "MZ" + secrets.token_hex(16)
    try:
        await ws.send_text(orjson.dumps({"event": "connected", "protocol": "Call"}).decode())
        start = {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": stream_sid,
            "start": {
                "accountSid": account,
                "streamSid": stream_sid,
                "callSid": call_sid,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": plan.parameters,
            },
        }
        await ws.send_text(orjson.dumps(start).decode())
        started = time.perf_counter()
        with trio.fail_after(15):
            while True:
                for message in await ws.receive():
                    if isinstance(message, str) and '"media"' in message:
                        return time.perf_counter() - started
    finally:
        stop = {"event": "stop", "streamSid": stream_sid, "stop": {"callSid": call_sid}}
        with trio.move_on_after(2):
            await ws.send_text(orjson.dumps(stop).decode())
            await ws.aclose()


def _summary(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000.0 for s in samples)
    return {
        "calls": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p90_ms": round(ms[min(len(ms) - 1, int(0.9 * len(ms)))], 1),
        "min_ms": round(ms[0], 1),
        "max_ms": round(ms[-1], 1),
        "mean_ms": round(statistics.fmean(ms), 1),
    }


async def run(calls: int, gaps_ms: list[int], handshake_ms: int, first_audio_ms: int) -> dict:
    from relay.http.server import RelayServer

    fake_openai = _fake_openai()
    results: dict[str, Any] = {
        "what": "stream start -> first greeting audio at the caller (ms)",
        "fake_openai": {"handshake_ms": handshake_ms, "first_audio_ms": first_audio_ms},
        "calls_per_mode": calls,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "gaps": [],
    }
    async with fake_openai.fake_openai_server(
        response_ms=600,
        handshake_delay_s=handshake_ms / 1000.0,
        response_delay_s=first_audio_ms / 1000.0,
    ) as oai:
        cfg = _config(oai)
        async with trio.open_nursery() as nursery:
            server = RelayServer(cfg)
            await nursery.start(server.serve)
            for gap in gaps_ms:
                samples: dict[str, list[float]] = {"warm": [], "cold": []}
                await _one_call(cfg, "cold", gap / 1000.0)  # warm-up: imports, first TLS-less
                for _ in range(calls):
                    for mode in ("warm", "cold"):
                        samples[mode].append(await _one_call(cfg, mode, gap / 1000.0))
                        await trio.sleep(0.05)
                entry = {"gap_ms": gap, **{m: _summary(v) for m, v in samples.items()}}
                entry["saved_p50_ms"] = round(entry["cold"]["p50_ms"] - entry["warm"]["p50_ms"], 1)
                results["gaps"].append(entry)
            warm = server.state.metrics.warm_starts
            results["relay_warm_starts"] = dict(warm)
            nursery.cancel_scope.cancel()
    return results


def table(results: dict) -> str:
    fo = results["fake_openai"]
    lines = [
        f"stream start -> first greeting audio at the caller, {results['calls_per_mode']} calls "
        f"per row (fake OpenAI: {fo['handshake_ms']} ms handshake, {fo['first_audio_ms']} ms "
        "to first audio)",
        f"{'webhook->start gap':>18}  {'mode':<5} {'p50':>8} {'p90':>8} {'min':>8} {'max':>8}",
    ]
    for entry in results["gaps"]:
        for mode in ("cold", "warm"):
            s = entry[mode]
            lines.append(
                f"{entry['gap_ms']:>15} ms  {mode:<5} {s['p50_ms']:>6.0f} ms "
                f"{s['p90_ms']:>5.0f} ms {s['min_ms']:>5.0f} ms {s['max_ms']:>5.0f} ms"
            )
        lines.append(f"{'':>18}  saved at p50: {entry['saved_p50_ms']:.0f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench warmstart", description=__doc__)
    parser.add_argument("--calls", type=int, default=20, help="calls per mode and gap")
    parser.add_argument("--gaps", default="300,1000", help="webhook answer -> start, ms")
    parser.add_argument("--handshake-ms", type=int, default=300)
    parser.add_argument("--first-audio-ms", type=int, default=400)
    parser.add_argument("--out", type=Path, default=RESULTS / "warmstart.json")
    args = parser.parse_args(argv)
    gaps = [int(g) for g in args.gaps.split(",") if g.strip()]
    results = trio.run(run, args.calls, gaps, args.handshake_ms, args.first_audio_ms)
    print(table(results))
    save_json(args.out, results)
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
