"""``python -m bench cascade``: the cascaded agent's own latency, and the local agent's CPU.

Part 1, ``latency`` (fakes, loopback): a real relay, the Twilio simulator, Deepgram live
STT + Aura TTS fakes and an OpenAI-compatible chat fake (tests/fake_stt_tts.py,
tests/fake_llm.py) that answer at once. Per reply, ``time.perf_counter`` stamps inside the
agent and the engine split "end of turn known -> first reply audio written to Twilio"
into stages; the relay's own share is the sum of the ``relay_*`` stages (the rest is the
vendors': model request -> first token -> first clause's text, clause -> TTS audio).

Part 2, ``local``: concurrent calls to ``type = "local"`` (PocketSphinx + eSpeak NG +
receptionist) with spoken callers (relay/sim/conversation_demo.py); CPU of the relay
process (eSpeak NG threads included) and of the recogniser processes, per call-second ->
how many such calls one core holds.

Writes ``bench/results/cascade.json`` and prints tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson
import trio

RESULTS = Path(__file__).resolve().parent / "results"
TESTS = Path(__file__).resolve().parent.parent / "tests"

RELAY_STAGES = (
    "relay_eot_to_llm_request",
    "relay_delta_to_clause",
    "relay_audio_to_event",
    "relay_event_to_wire",
)
VENDOR_STAGES = ("llm_first_token", "llm_stream_to_first_clause", "tts_first_audio")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


# --- part 1: latency breakdown with instant fakes ---------------------------------------------
async def latency(turns: int) -> dict[str, Any]:
    sys.path.insert(0, str(TESTS))
    from conftest import build_config  # type: ignore[import-not-found]
    from fake_llm import Reply, fake_llm  # type: ignore[import-not-found]
    from fake_stt_tts import (  # type: ignore[import-not-found]
        KEY,
        FakeAura,
        FakeDeepgramListen,
        FakeSpeechOptions,
        serve,
    )

    from relay.agents.text.agent import CascadedAgent
    from relay.http.server import RelayServer
    from relay.media.call import Call
    from relay.sim import simulator, speech

    agents: list[CascadedAgent] = []
    wire: dict[str, float] = {}  # response id -> first frame written to Twilio
    original_connect = CascadedAgent.connect
    original_on_agent = Call._on_agent

    async def connect(self: CascadedAgent, call: Any) -> None:
        agents.append(self)
        await original_connect(self, call)

    def on_agent(self: Call, events: list[Any]) -> None:
        original_on_agent(self, events)
        now = time.perf_counter()
        for ev in events:
            rid = getattr(ev, "response_id", None)
            if type(ev).__name__ == "AgentAudio" and rid not in wire:
                wire[rid] = now

    CascadedAgent.connect = connect  # type: ignore[method-assign]
    Call._on_agent = on_agent  # type: ignore[method-assign]
    text = "Sure, we open at nine in the morning. We close at five in the afternoon."
    try:
        async with fake_llm(lambda body: Reply(text=text, chunk_delay_s=0.002)) as llm:
            stt = FakeDeepgramListen(FakeSpeechOptions(transcripts=deque(["question"] * turns)))
            tts = FakeAura(FakeSpeechOptions(ms_per_char=40))
            async with serve(stt), serve(tts):
                options = {
                    "type": "cascaded",
                    "stt": "deepgram",
                    "stt_url": stt.url,
                    "stt_api_key": KEY,
                    "tts": "deepgram",
                    "tts_url": tts.url,
                    "tts_api_key": KEY,
                    "llm_url": llm.url,
                    "llm_model": "fake",
                    "llm_api_key": llm.api_key,
                    "end_call": False,
                }
                cfg = build_config(
                    agents={"bot": options}, default_agent="bot", calls={"max_duration_s": 900.0}
                )
                async with trio.open_nursery() as nursery:
                    server = RelayServer(cfg)
                    await nursery.start(server.serve)
                    segments: list[tuple[str, float]] = [("silence", 1.0)]
                    for _ in range(turns):
                        segments += [("speech", 0.8), ("silence", 5.5)]
                    audio = speech.make_script(segments)
                    await simulator.place_call(
                        cfg.public_url, cfg.twilio.auth_token, audio=audio, hangup_after_s=1.0
                    )
                    nursery.cancel_scope.cancel()
    finally:
        CascadedAgent.connect = original_connect  # type: ignore[method-assign]
        Call._on_agent = original_on_agent  # type: ignore[method-assign]
    rows: list[dict[str, float | None]] = []
    for agent in agents:
        for timing in agent.timings:
            stages = timing.stages_ms()
            t_wire = wire.get(timing.response_id)
            stages["relay_event_to_wire"] = (
                None
                if t_wire is None or timing.t_first_event is None
                else round((t_wire - timing.t_first_event) * 1000, 3)
            )
            if all(stages.get(k) is not None for k in RELAY_STAGES):
                stages["relay_total"] = round(sum(stages[k] or 0.0 for k in RELAY_STAGES), 3)
                rows.append(stages)
    summary: dict[str, Any] = {}
    for key in (*RELAY_STAGES, "relay_total", *VENDOR_STAGES):
        values = [r[key] for r in rows if r.get(key) is not None]
        summary[key] = {
            "p50_ms": round(statistics.median(values), 3) if values else None,
            "p95_ms": round(_pct(values, 95), 3) if values else None,
            "max_ms": round(max(values), 3) if values else None,
        }
    return {"turns": len(rows), "stages": summary, "rows": rows}


# --- part 2: the local agent's CPU ---------------------------------------------------------
def _proc_cpu(pid: int) -> float:
    """utime + stime of a process (seconds), from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


async def local(calls: int) -> dict[str, Any]:
    from relay.agents.text.local_speech import EspeakTTS, SphinxPool, SphinxSTT
    from relay.http.server import RelayServer
    from relay.sim import conversation_demo as demo
    from relay.sim import simulator

    synths: list[EspeakTTS] = []
    vad_s = [0.0]
    original_init = EspeakTTS.__init__
    original_send = SphinxSTT.send_audio

    def init(self: EspeakTTS, *a: Any, **kw: Any) -> None:
        original_init(self, *a, **kw)
        synths.append(self)

    def send_audio(self: SphinxSTT, ulaw: bytes) -> None:
        t = time.thread_time()  # CPU of this thread: GIL waits are not counted
        original_send(self, ulaw)
        vad_s[0] += time.thread_time() - t

    EspeakTTS.__init__ = init  # type: ignore[method-assign]
    SphinxSTT.send_audio = send_audio  # type: ignore[method-assign]
    cfg = demo.demo_config()
    cfg.agents["receptionist"]["recognizer_processes"] = 1  # one core's worth of recognition
    chosen = [demo.CALLERS[i % len(demo.CALLERS)] for i in range(calls)]
    scripts = [await trio.to_thread.run_sync(demo.build_script, c) for c in chosen]
    results: list[Any] = []
    async with trio.open_nursery() as nursery:
        server = RelayServer(cfg)
        await nursery.start(server.serve)
        # warm the recogniser process and eSpeak NG before measuring
        await simulator.place_call(
            cfg.public_url, cfg.twilio.auth_token, audio=b"\xff" * 8000, duration_s=1.0
        )
        pool = SphinxPool.get()
        pids = [w.process.pid for w in pool.workers]
        cpu0 = time.process_time()
        workers0 = sum(_proc_cpu(p) for p in pids)
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            await trio.sleep(i * 0.1)
            results.append(
                await simulator.place_call(
                    cfg.public_url,
                    cfg.twilio.auth_token,
                    audio=scripts[i].audio,
                    hangup_after_s=3.0,
                    max_duration_s=90.0,
                )
            )

        async with trio.open_nursery() as calls_nursery:
            for i in range(calls):
                calls_nursery.start_soon(one, i)
        wall = time.perf_counter() - t0
        relay_cpu = time.process_time() - cpu0
        workers_cpu = sum(_proc_cpu(p) for p in pids) - workers0
        nursery.cancel_scope.cancel()
    EspeakTTS.__init__ = original_init  # type: ignore[method-assign]
    SphinxSTT.send_audio = original_send  # type: ignore[method-assign]
    call_seconds = sum(r.duration_s for r in results)
    synth_cpu = sum(t.cpu_ms for t in synths) / 1000
    agent_cpu = workers_cpu + synth_cpu + vad_s[0]
    per_call = agent_cpu / call_seconds if call_seconds else float("nan")
    total_per_call = (relay_cpu + workers_cpu) / call_seconds if call_seconds else float("nan")
    return {
        "calls": calls,
        "wall_s": round(wall, 2),
        "call_seconds": round(call_seconds, 1),
        "relay_process_cpu_s": round(relay_cpu, 3),
        "recogniser_cpu_s": round(workers_cpu, 3),
        "synthesis_cpu_s": round(synth_cpu, 3),
        "vad_cpu_s": round(vad_s[0], 3),
        "agent_cpu_per_call_second_pct": round(100 * per_call, 2),
        "agent_calls_per_core": round(1 / per_call, 1) if per_call else None,
        "all_cpu_per_call_second_pct": round(100 * total_per_call, 2),
        "all_calls_per_core": round(1 / total_per_call, 1) if total_per_call else None,
        "ok_calls": sum(r.ok for r in results),
        "note": "the simulator (Twilio side) runs in the relay process and is included",
    }


def _print(result: dict[str, Any]) -> None:
    lat = result.get("latency")
    if lat:
        print(
            f"\ncascaded agent: end of turn -> first reply audio on the wire ({lat['turns']} turns)"
        )
        print(f"  {'stage':<30} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9}")
        for key, row in lat["stages"].items():
            owner = "relay " if key.startswith("relay") else "vendor"
            print(
                f"  {owner} {key:<23} {row['p50_ms'] if row['p50_ms'] is not None else '-':>9} "
                f"{row['p95_ms'] if row['p95_ms'] is not None else '-':>9} "
                f"{row['max_ms'] if row['max_ms'] is not None else '-':>9}"
            )
    loc = result.get("local")
    if loc:
        print(f"\nlocal agent: {loc['calls']} concurrent calls, {loc['call_seconds']} call-seconds")
        print(
            f"  agent CPU: recognition {loc['recogniser_cpu_s']} s (processes), synthesis "
            f"{loc['synthesis_cpu_s']} s (threads), VAD {loc['vad_cpu_s']} s (loop) -> "
            f"{loc['agent_cpu_per_call_second_pct']} % of a core per call -> "
            f"{loc['agent_calls_per_core']} calls per core"
        )
        print(
            f"  everything (relay process with the simulator + recognisers): "
            f"{loc['all_cpu_per_call_second_pct']} % of a core per call -> "
            f"{loc['all_calls_per_core']} calls per core ({loc['ok_calls']} calls ok)"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench cascade", description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("latency", "local", "both"), default="both")
    p.add_argument("--turns", type=int, default=12, help="replies measured (latency)")
    p.add_argument("--calls", type=int, default=4, help="concurrent local-agent calls")
    p.add_argument("--out", type=Path, default=RESULTS / "cascade.json")
    args = p.parse_args(argv)
    result: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    if args.part in ("latency", "both"):
        result["latency"] = trio.run(latency, args.turns)
    if args.part in ("local", "both"):
        result["local"] = trio.run(local, args.calls)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    _print(result)
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
