"""``relay demo``: the whole call flow on this machine, no account and no key.

Starts a relay on a loopback port with the built-in ``parrot`` agent, then the built-in
Twilio simulator places a few calls against it. Each caller hears the greeting chime, says
something, hears it played back, talks over the second playback (a real barge-in: the relay
sends Twilio ``clear``), and hangs up. Printed: per-call timelines (turns, barge-in, time to
first agent audio) and the relay's per-frame latency; written: what each caller heard, as WAV.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import trio

from .. import interrupt
from ..config import Config
from ..http.server import RelayServer
from . import simulator, speech

# (kind, seconds): greeting plays during the first silence; the parrot repeats the first
# utterance during the second; the caller cuts the second playback short ~0.8 s in.
CALLER_SCRIPT: list[tuple[str, float]] = [
    ("silence", 2.0),
    ("speech", 1.6),
    ("silence", 3.2),
    ("speech", 2.4),
    ("silence", 1.4),
    ("speech", 1.2),
    ("silence", 3.4),
]


def demo_config() -> Config:
    cfg = Config()
    cfg.server.host = "127.0.0.1"
    cfg.server.port = 0
    # The simulated Twilio side and the agents run on this relay's own event loop, so its
    # loop lag is theirs too: admission control would refuse the demo's own calls.
    cfg.server.admission = False
    cfg.twilio.auth_token = secrets.token_hex(16)  # the simulator signs with the same token
    cfg.security.admin_key = secrets.token_hex(16)
    cfg.agents = {"parrot": {"type": "parrot", "greeting": True}}
    cfg.calls.default_agent = "parrot"
    cfg.validate()
    return cfg


def cfg_store_url(server: RelayServer) -> str:
    store = server.state.control.store
    return store.describe() if store is not None else "memory (not persisted)"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def format_timelines(results: list[Any], server: RelayServer) -> str:
    lines: list[str] = []
    for i, result in enumerate(results, 1):
        record = server.state.records.get(result.call_sid)
        lines.append(f"\ncall {i}  {result.call_sid}")
        if result.refused:
            lines.append(f"  refused: {result.refused}")
            continue
        echoes = 0
        for t, kind, detail in result.timeline:
            if kind == "mark_echo":  # one per 100 ms frame: counted, not listed
                echoes += 1
                continue
            lines.append(f"  {t:7.2f} s  {kind:<20} {detail}")
        lines.append(f"  mark echoes: {echoes} (one per frame heard, or discarded after a clear)")
        lines.append(
            f"  time to first agent audio (caller side): {_ms(result.first_agent_audio_s)}"
        )
        if record is not None:
            for b in record.barge_ins:
                lines.append(
                    f"  relay: barge-in at {b['t']:.2f} s, caller heard {b['heard_ms']} ms of "
                    f"the reply, {b['dropped_ms']} ms dropped"
                )
            lines.append(f"  relay: ended ({record.end_reason}), DTMF {record.dtmf or '-'}")
        lines.append(f"  heard audio: {result.wav_path}")
    m = server.state.metrics
    lines.append("\nrelay per-frame latency (receive -> forwarded, this process):")
    for name, hist in (("caller -> agent", m.latency_up), ("agent -> caller", m.latency_down)):
        lines.append(
            f"  {name}: p50 {hist.percentile(50) * 1e6:7.1f} µs   p99 "
            f"{hist.percentile(99) * 1e6:7.1f} µs   ({hist.count} batches)"
        )
    lines.append(
        f"  barge-ins: {m.barge_ins}, clear sent within p99 "
        f"{m.barge_in_to_clear.percentile(99) * 1e6:.0f} µs of the agent's event"
    )
    return "\n".join(lines)


async def run_demo(calls: int, out_dir: Path) -> tuple[list[Any], RelayServer]:
    cfg = demo_config()
    out_dir.mkdir(parents=True, exist_ok=True)
    audio = speech.make_script(CALLER_SCRIPT)
    async with trio.open_nursery() as nursery:
        server = RelayServer(cfg)
        await nursery.start(server.serve)
        base = cfg.public_url
        print(f"relay listening on {base} (parrot agent); placing {calls} simulated call(s)...")
        results = await simulator.simulate(
            base,
            cfg.twilio.auth_token,
            calls=calls,
            duration_s=None,  # hang up once the script is over and the parrot is quiet
            audio=audio,
            out_dir=out_dir,
        )
        # let the relay finish closing the calls before reading its records
        with trio.move_on_after(3):
            while server.state.metrics.active_calls:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    return results, server


def main(calls: int = 3, out_dir: Path = Path("out/demo"), agent: str = "local") -> int:
    status = _inbound(calls, out_dir, agent)
    # then an outbound call and a caller not on an allowlist (relay/sim/policy_demo.py)
    from .policy_demo import main as policy_main

    return policy_main() or status


def _inbound(calls: int, out_dir: Path, agent: str) -> int:
    if agent == "local":  # spoken conversations with the offline voice agent
        from .conversation_demo import main as conversation_main

        return conversation_main(calls, out_dir)
    results, server = interrupt.run(run_demo, calls, out_dir)
    print(format_timelines(results, server))
    heard_ok = bool(results) and all(r.ok and r.media_received > 0 for r in results)
    print(f"\ncall history saved in {cfg_store_url(server)}: see it with `relay calls`")
    print("\nOK: every caller heard the parrot" if heard_ok else "\nFAILED: a caller heard nothing")
    return 0 if heard_ok else 1
