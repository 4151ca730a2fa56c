"""``python -m bench twilio-speech``: Twilio-native speech agents (no audio through relay).

Part 1, ``conversation-relay``: a real relay, the ConversationRelay simulator
(relay/sim/conversation_relay.py) and the local chat fake (tests/fake_llm.py), in one
process. Per reply, ``time.perf_counter`` stamps inside the session split ``prompt`` parsed
-> first ``text`` token written into relay's share (prompt -> model request written, first
delta parsed -> token on the wire) and the model's (request -> first delta). CPU per call is
the whole process's (relay + simulator + fake model): an upper bound of relay's.

Part 2, ``gather``: the Gather simulator (relay/sim/gather.py, speech at real speed) against
a chat fake with a realistic first-token delay; the time from the final ``SpeechResult``
POST to the TwiML answer, with and without early answers (partial results starting the
model while the caller finishes).

Writes ``bench/results/twilio-speech.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import trio

RESULTS = Path(__file__).resolve().parent / "results"
TESTS = Path(__file__).resolve().parent.parent / "tests"
QUESTIONS = [
    "What time do you open tomorrow morning?",
    "Do you have sourdough bread today?",
    "Can I order a birthday cake for Saturday?",
]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(_pct(values, 50), 3),
        "p95": round(_pct(values, 95), 3),
        "mean": round(statistics.fmean(values), 3) if values else float("nan"),
    }


async def _relay(agent: dict[str, Any]) -> Any:
    from conftest import build_config  # type: ignore[import-not-found]

    from relay.http.server import RelayServer

    cfg = build_config(agents={"speech": agent}, default_agent="speech")
    cfg.store.url = "memory"
    return RelayServer(cfg)


async def conversation_relay(calls: int, turns: int, first_token_s: float) -> dict[str, Any]:
    sys.path.insert(0, str(TESTS))
    from conftest import AUTH_TOKEN  # type: ignore[import-not-found]
    from fake_llm import Reply, fake_llm  # type: ignore[import-not-found]

    from relay.sim import conversation_relay as crsim

    answer = "Sure. We open at nine in the morning and close at six in the evening."
    async with fake_llm(lambda body: Reply(answer, first_token_delay_s=first_token_s)) as llm:
        agent = {
            "type": "twilio-speech",
            "llm_url": llm.url,
            "llm_model": "fake",
            "llm_api_key": llm.api_key,
        }
        server = await _relay(agent)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            results = []
            script = [crsim.Turn(QUESTIONS[i % len(QUESTIONS)], gap_s=0.05) for i in range(turns)]
            for _ in range(calls):
                results.append(
                    await crsim.place_call(
                        server.cfg.public_url, AUTH_TOKEN, script, chars_per_s=2000.0, linger_s=0
                    )
                )
            cpu = time.process_time() - cpu0
            wall = time.perf_counter() - wall0
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    stages: dict[str, list[float]] = {}
    for record in server.state.records.newest(calls):
        for turn in record.stats.get("turns", []):
            for key, value in turn.items():
                if value is not None:
                    stages.setdefault(key, []).append(value)
    share = [
        a + b
        for a, b in zip(
            stages.get("relay_prompt_to_request_ms", []),
            stages.get("relay_token_to_wire_ms", []),
            strict=False,
        )
    ]
    return {
        "calls": calls,
        "turns_per_call": turns,
        "model_first_token_delay_s": first_token_s,
        "ok_calls": sum(1 for r in results if r.error is None and len(r.answers) == turns),
        "relay_share_ms": _summary(share),
        "stages_ms": {k: _summary(v) for k, v in stages.items()},
        "simulator_prompt_to_first_token_ms": _summary(
            [s * 1000 for r in results for s in r.first_token_s]
        ),
        "cpu_s_per_call_upper_bound": round(cpu / max(1, calls), 4),
        "cpu_ms_per_turn_upper_bound": round(cpu * 1000 / max(1, calls * turns), 2),
        "wall_s": round(wall, 2),
    }


async def gather(calls: int, first_token_s: float) -> dict[str, Any]:
    sys.path.insert(0, str(TESTS))
    from conftest import AUTH_TOKEN
    from fake_llm import Reply, fake_llm

    from relay.sim import gather as gsim

    out: dict[str, Any] = {"model_first_token_delay_s": first_token_s}
    reply = "We open at nine in the morning. Anything else?"
    for early in (False, True):
        async with fake_llm(lambda body: Reply(reply, first_token_delay_s=first_token_s)) as llm:
            agent = {
                "type": "twilio-speech",
                "mode": "gather",
                "llm_url": llm.url,
                "llm_model": "fake",
                "llm_api_key": llm.api_key,
                "early_answer": early,
            }
            server = await _relay(agent)
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                results = []
                for _ in range(calls):
                    script = [gsim.Utterance(q) for q in QUESTIONS]
                    results.append(await gsim.place_call(server.cfg.public_url, AUTH_TOKEN, script))
                nursery.cancel_scope.cancel()
        answers = [s * 1000 for r in results for s in r.answer_s]
        server_ms = [
            t["answer_ms"]
            for record in server.state.records.newest(calls)
            for t in record.stats.get("turns", [])
        ]
        used = sum(
            1
            for record in server.state.records.newest(calls)
            for t in record.stats.get("turns", [])
            if t.get("early") == "used"
        )
        out["early" if early else "plain"] = {
            "final_result_to_twiml_ms": _summary(answers),
            "server_answer_ms": _summary(server_ms),
            "early_answers_used": used,
            "model_requests": len(llm.requests),
        }
    plain = out["plain"]["final_result_to_twiml_ms"]["p50"]
    early_p50 = out["early"]["final_result_to_twiml_ms"]["p50"]
    out["gain_p50_ms"] = round(plain - early_p50, 1)
    return out


def _print(result: dict[str, Any]) -> None:
    cr = result.get("conversation_relay")
    if cr:
        print("ConversationRelay: prompt -> first text token (ms)")
        print(f"  {'stage':34} {'p50':>8} {'p95':>8}")
        share = cr["relay_share_ms"]
        print(f"  {'relay share (both relay stages)':34} {share['p50']:8.3f} {share['p95']:8.3f}")
        for key, s in cr["stages_ms"].items():
            print(f"  {key:34} {s['p50']:8.3f} {s['p95']:8.3f}")
        sim = cr["simulator_prompt_to_first_token_ms"]
        print(f"  {'simulator: prompt sent -> token':34} {sim['p50']:8.3f} {sim['p95']:8.3f}")
        print(
            f"  CPU (relay + simulator + fake model): {cr['cpu_ms_per_turn_upper_bound']} ms per "
            f"turn, {cr['cpu_s_per_call_upper_bound']} s per {cr['turns_per_call']}-turn call; "
            f"{cr['ok_calls']}/{cr['calls']} calls ok"
        )
    g = result.get("gather")
    if g:
        delay = g["model_first_token_delay_s"]
        print(f"\nGather: final SpeechResult POST -> TwiML (model first token {delay} s)")
        print(f"  {'':10} {'p50 ms':>8} {'p95 ms':>8} {'early used':>11} {'requests':>9}")
        for key in ("plain", "early"):
            s = g[key]["final_result_to_twiml_ms"]
            used, requests = g[key]["early_answers_used"], g[key]["model_requests"]
            print(f"  {key:10} {s['p50']:8.1f} {s['p95']:8.1f} {used:11d} {requests:9d}")
        print(f"  early-answer gain (p50): {g['gain_p50_ms']} ms")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench twilio-speech", description=__doc__.split("\n")[0]
    )
    p.add_argument("--part", choices=("conversation-relay", "gather", "both"), default="both")
    p.add_argument("--calls", type=int, default=4)
    p.add_argument("--turns", type=int, default=10, help="ConversationRelay turns per call")
    p.add_argument("--first-token-s", type=float, default=0.0, help="ConversationRelay model delay")
    p.add_argument("--gather-first-token-s", type=float, default=0.5, help="Gather model delay")
    p.add_argument("--out", type=Path, default=RESULTS / "twilio-speech.json")
    args = p.parse_args(argv)
    result: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    if args.part in ("conversation-relay", "both"):
        result["conversation_relay"] = trio.run(
            conversation_relay, args.calls, args.turns, args.first_token_s
        )
    if args.part in ("gather", "both"):
        result["gather"] = trio.run(gather, max(1, args.calls // 2), args.gather_first_token_s)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    _print(result)
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
