"""``relay demo``: spoken conversations with the offline voice agent, on this machine.

A relay on a loopback port answers with ``type = "local"`` (PocketSphinx + eSpeak NG + the
receptionist brain); the Twilio simulator places calls whose callers say real sentences,
synthesised with eSpeak NG in voices other than the agent's. Each caller waits for the
agent's answer before the next question (the script leaves room for the expected answer);
one caller talks over a long answer (a real barge-in: Twilio ``clear``, the rest of the
answer never heard and dropped from the agent's history).

Printed per call and turn: what the caller said, what the agent recognised, what it
answered (as heard: cut answers end with "…"), how much of it the caller heard, and the
time from the end of the question to the first word of the answer (measured on the
caller's side, from audio); then the recognition accuracy over the demo's sentences.
"""

from __future__ import annotations

import difflib
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

from .. import interrupt
from ..agents.text.espeak import synthesize_ulaw
from ..agents.text.receptionist import ReceptionistBrain, classify
from ..config import Config
from ..http.server import RelayServer
from . import simulator

AGENT_VOICE = "en-us+f3"
AGENT_RATE = 165
SILENCE = b"\xff"  # μ-law silence


@dataclass
class Line:
    text: str
    #: speak this long after the previous answer *started* (a barge-in), not after it ended
    interrupt_after_s: float | None = None


@dataclass
class Caller:
    voice: str
    rate_wpm: int
    lines: list[Line]


CALLERS: list[Caller] = [
    Caller(
        "en-us+f5",
        150,
        [
            Line("What are your opening hours?"),
            Line("What time is it now?"),
            Line("Thank you, goodbye."),
        ],
    ),
    Caller(
        "en-us+f2",
        150,
        [
            Line("Are you open on Saturday?"),
            Line("Could you tell me the time?"),
            Line("I would like to speak to someone."),
            Line("That is all, thank you."),
        ],
    ),
    Caller(
        "en-us+klatt4",
        165,
        [
            Line("What are your opening hours?"),
            Line("Are you open on Sunday?", interrupt_after_s=2.5),
            Line("Thank you, goodbye."),
        ],
    ),
]


def demo_config() -> Config:
    cfg = Config()
    cfg.server.host = "127.0.0.1"
    cfg.server.port = 0
    cfg.twilio.auth_token = secrets.token_hex(16)
    cfg.security.admin_key = secrets.token_hex(16)
    cfg.agents = {
        "receptionist": {"type": "local", "voice": AGENT_VOICE, "rate_wpm": AGENT_RATE},
        "parrot": {"type": "parrot", "greeting": True},
    }
    cfg.calls.default_agent = "receptionist"
    cfg.validate()
    return cfg


def _seconds(ulaw_len: int) -> float:
    return ulaw_len / 8000.0


def expected_answer(line: str) -> str:
    """The receptionist's answer to ``line`` when recognised right (the time is a guess
    of the same length), to leave the caller's script room for it."""
    brain = ReceptionistBrain()
    intent = classify(line)
    if intent == "time":
        return "It is 10:45 a.m. on Wednesday. Anything else?"
    text, _calls = brain._answer({"role": "user", "content": line}, [], {"end_call", "get_time"})
    return text


@dataclass
class Script:
    audio: bytes
    #: (start_s, end_s) of each line in the caller's audio
    spans: list[tuple[float, float]] = field(default_factory=list)


def build_script(caller: Caller, *, margin_s: float = 1.6) -> Script:
    """The caller's whole side of the call: silence while the agent greets, then each line
    followed by silence long enough for its expected answer (eSpeak NG, both sides)."""
    greeting = synthesize_ulaw(ReceptionistBrain().greeting(), AGENT_VOICE, AGENT_RATE)
    parts = [SILENCE * int(8000 * (0.6 + _seconds(len(greeting)) + margin_s))]
    spans: list[tuple[float, float]] = []
    t = _seconds(len(parts[0]))
    for i, line in enumerate(caller.lines):
        voice = synthesize_ulaw(line.text, caller.voice, caller.rate_wpm)
        spans.append((t, t + _seconds(len(voice))))
        parts.append(voice)
        t += _seconds(len(voice))
        following = caller.lines[i + 1] if i + 1 < len(caller.lines) else None
        answer = synthesize_ulaw(expected_answer(line.text), AGENT_VOICE, AGENT_RATE)
        if following is not None and following.interrupt_after_s is not None:
            gap = 1.0 + following.interrupt_after_s  # answer starts ~1 s after the question
        else:
            gap = 1.0 + _seconds(len(answer)) + margin_s
        parts.append(SILENCE * int(8000 * gap))
        t += gap
    return Script(b"".join(parts), spans)


# --- scoring ------------------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def word_matches(reference: str, hypothesis: str) -> tuple[int, int]:
    """(words of ``reference`` found in order in ``hypothesis``, words of ``reference``)."""
    ref, hyp = _words(reference), _words(hypothesis)
    matcher = difflib.SequenceMatcher(None, ref, hyp, autojunk=False)
    return sum(block.size for block in matcher.get_matching_blocks()), len(ref)


@dataclass
class TurnReport:
    said: str
    recognised: str = ""
    answer: str = ""
    interrupted: bool = False
    heard_ms: int = 0
    latency_s: float | None = None

    @property
    def intent_ok(self) -> bool:
        return classify(self.said) == classify(self.recognised)


@dataclass
class CallReport:
    caller: Caller
    result: Any
    greeting: str = ""
    turns: list[TurnReport] = field(default_factory=list)
    end_reason: str = ""


def _heard_segments(result: Any) -> list[tuple[float, float, bool]]:
    """(start, end, cut by a clear) of each stretch of agent audio the caller heard."""
    out: list[tuple[float, float, bool]] = []
    start: float | None = None
    for t, kind, detail in result.timeline:
        if kind == "agent_audio_start":
            start = t
        elif kind == "agent_audio_end" and start is not None:
            out.append((start, t, detail == "cleared"))
            start = None
    return out


def analyse(caller: Caller, script: Script, result: Any, record: Any) -> CallReport:
    report = CallReport(caller, result, end_reason=record.end_reason if record else "")
    transcript = list(record.transcript) if record is not None else []
    caller_texts = [e["text"] for e in transcript if e["role"] == "caller"]
    # agent entries after each caller entry (the greeting comes before the first)
    answers: list[str] = []
    seen_caller = 0
    for entry in transcript:
        if entry["role"] == "caller":
            seen_caller += 1
            answers.append("")
        elif seen_caller == 0:
            report.greeting = entry["text"]
        else:
            answers[-1] = (answers[-1] + " " + entry["text"]).strip()
    segments = _heard_segments(result)
    for i, line in enumerate(caller.lines):
        turn = TurnReport(line.text)
        if i < len(caller_texts):
            turn.recognised = caller_texts[i]
            turn.answer = answers[i]
        q_end = script.spans[i][1]
        # the answer: the first stretch of agent audio starting after the question ended
        after = [s for s in segments if s[0] >= q_end - 0.05]
        if after and turn.recognised:
            start, end, cut = after[0]
            turn.latency_s = start - q_end
            turn.heard_ms = int((end - start) * 1000)
            turn.interrupted = cut
        report.turns.append(turn)
    return report


def format_report(reports: list[CallReport], server: RelayServer) -> str:
    lines: list[str] = []
    matched = total = intents = turns = 0
    latencies: list[float] = []
    for n, rep in enumerate(reports, 1):
        r = rep.result
        lines.append(f"\ncall {n}  {r.call_sid}  caller voice {rep.caller.voice} ({r.outcome})")
        if rep.greeting:
            lines.append(f"  agent greeted    : {rep.greeting}")
        for k, t in enumerate(rep.turns, 1):
            m, w = word_matches(t.said, t.recognised)
            matched, total = matched + m, total + w
            intents += t.intent_ok
            turns += 1
            if t.latency_s is not None:
                latencies.append(t.latency_s)
            lines.append(f"  [{k}] caller said  : {t.said}")
            mark = (
                "intent ok"
                if t.intent_ok
                else f"intent {classify(t.recognised)} (wanted {classify(t.said)})"
            )
            lines.append(
                f"      recognised   : {t.recognised or '(nothing)'}  [{m}/{w} words, {mark}]"
            )
            lines.append(f"      agent answer : {t.answer or '-'}")
            heard = f"{t.heard_ms / 1000:.1f} s of audio" + (
                ", cut off by the caller (barge-in: clear)" if t.interrupted else ""
            )
            lines.append(f"      caller heard : {heard}")
            if t.latency_s is not None:
                lines.append(
                    f"      end of question -> first word of answer: {t.latency_s * 1000:.0f} ms"
                )
        lines.append(f"  call ended: {rep.end_reason or '-'}; heard audio: {r.wav_path}")
    lines.append("")
    if total:
        lines.append(
            f"recognition over {turns} demo sentences: {matched}/{total} words "
            f"({100 * matched / total:.0f} %), intents {intents}/{turns}"
        )
    if latencies:
        arr = np.array(latencies) * 1000
        lines.append(
            "end of question -> first word of answer (caller side, includes the agent's "
            f"500 ms end-of-turn silence): median {np.median(arr):.0f} ms, max {arr.max():.0f} ms"
        )
    metrics = server.state.metrics
    lines.append(
        f"relay: {metrics.barge_ins} barge-in(s), clear sent within p99 "
        f"{metrics.barge_in_to_clear.percentile(99) * 1e6:.0f} µs of the agent's event"
    )
    return "\n".join(lines)


async def run_demo(calls: int, out_dir: Path) -> tuple[list[CallReport], RelayServer]:
    cfg = demo_config()
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = [CALLERS[i % len(CALLERS)] for i in range(calls)]
    scripts = [await trio.to_thread.run_sync(build_script, c) for c in chosen]
    results: list[Any] = [None] * calls
    async with trio.open_nursery() as nursery:
        server = RelayServer(cfg)
        await nursery.start(server.serve)
        print(
            f"relay listening on {cfg.public_url} (offline voice agent: PocketSphinx + "
            f"eSpeak NG); placing {calls} simulated call(s)..."
        )

        async def one(i: int) -> None:
            await trio.sleep(i * 0.3)
            sid = simulator._sid("CA")
            results[i] = await simulator.place_call(
                cfg.public_url,
                cfg.twilio.auth_token,
                audio=scripts[i].audio,
                call_sid=sid,
                hangup_after_s=4.0,
                max_duration_s=120.0,
                record_path=out_dir / f"call-{i + 1}-{sid}.wav",
            )

        async with trio.open_nursery() as calls_nursery:
            for i in range(calls):
                calls_nursery.start_soon(one, i)
        with trio.move_on_after(3):
            while server.state.metrics.active_calls:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    reports = [
        analyse(chosen[i], scripts[i], results[i], server.state.records.get(results[i].call_sid))
        for i in range(calls)
    ]
    return reports, server


def main(calls: int = 3, out_dir: Path = Path("out/demo")) -> int:
    reports, server = interrupt.run(run_demo, calls, out_dir)
    print(format_report(reports, server))
    ok = bool(reports) and all(
        rep.result.ok and any(t.recognised for t in rep.turns) and rep.result.media_received
        for rep in reports
    )
    print(
        "\nOK: every caller held a spoken conversation with the agent"
        if ok
        else "\nFAILED: a call did not hold a conversation"
    )
    return 0 if ok else 1
