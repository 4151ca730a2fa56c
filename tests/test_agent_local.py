"""The offline voice agent with the real PocketSphinx and eSpeak NG (no fakes): recognised
intents on a fixed sentence set, and whole calls through the relay with the simulator.
Assertions are on intents and behaviour, not on timings. eSpeak NG's output is not
bit-exact from run to run, so the sentences of the call tests are ones recognised right in
every measured run."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from relay.agents.text.espeak import synthesize_ulaw
from relay.agents.text.local_speech import EspeakTTS, SphinxSTT
from relay.agents.text.receptionist import CORPUS, ReceptionistBrain, classify
from relay.agents.text.speech import SttEndOfTurn, SttSpeechStarted, TtsAudio, TtsDone
from relay.sim import simulator

SENTENCES = [
    ("What are your opening hours?", "hours"),
    ("Are you open on Saturday?", "hours"),
    ("What time is it now?", "time"),
    ("Could you tell me the time?", "time"),
    ("Can I talk to a person please?", "person"),
    ("I would like to speak to someone.", "person"),
    ("Thank you, goodbye.", "goodbye"),
    ("That is all, thank you.", "goodbye"),
]
SILENCE = b"\xff"


@pytest.mark.parametrize("voice", ["en-us+f5", "en-us+f2"])
async def test_recognised_intents_on_phone_audio(voice: str) -> None:
    stt = SphinxSTT(CORPUS, processes=1)
    await stt.connect()
    audio = SILENCE * 4000
    for text, _intent in SENTENCES:
        audio += synthesize_ulaw(text, voice, 150) + SILENCE * 8000
    recognised: list[str] = []
    started = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stt.run)
        for i in range(0, len(audio), 160):  # as Twilio sends it, faster than real time
            stt.send_audio(audio[i : i + 160])
            if i % 16000 == 0:
                await trio.sleep(0)
        with trio.fail_after(30):
            while len(recognised) < len(SENTENCES):
                for event in await stt.receive():
                    started += isinstance(event, SttSpeechStarted)
                    if isinstance(event, SttEndOfTurn):
                        recognised.append(event.text)
        nursery.cancel_scope.cancel()
    await stt.aclose()
    assert started == len(SENTENCES)
    # eSpeak NG's output varies slightly from run to run (it is not bit-exact), and one
    # short question ("What time is it now?") is missed now and then: measured over 10
    # runs per voice, never more than one miss in 8
    right = [classify(t) == intent for t, (_s, intent) in zip(recognised, SENTENCES, strict=True)]
    assert sum(right) >= len(SENTENCES) - 1, recognised


async def test_espeak_tts_speaks_clauses_in_order_and_cancels() -> None:
    tts = EspeakTTS()
    await tts.connect()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tts.run)
        tts.speak("r1", 0, "Hello there.")
        tts.speak("r1", 1, "We open at nine.")
        tts.end("r1")
        tts.speak("r2", 0, "This is cancelled before it is spoken.")
        tts.cancel("r2")
        tts.end("r2")
        events: list[Any] = []
        with trio.fail_after(10):
            while not any(isinstance(e, TtsDone) for e in events):
                events += await tts.receive()
        nursery.cancel_scope.cancel()
    audio = [e for e in events if isinstance(e, TtsAudio)]
    assert [(e.response_id, e.clause) for e in audio] == [("r1", 0), ("r1", 1)]
    assert all(len(e.ulaw) > 4000 for e in audio)  # > 0.5 s of speech each
    assert not any(getattr(e, "response_id", "") == "r2" for e in events)


def caller_audio(lines: list[tuple[str, float]], voice: str = "en-us+f5") -> bytes:
    """Each line after the given silence (seconds)."""
    out = b""
    for text, pause in lines:
        out += SILENCE * int(8000 * pause) + synthesize_ulaw(text, voice, 150)
    return out + SILENCE * 8000


async def recognise(audio: bytes, turns: int, vad_end_ms: float = 500.0) -> list[str]:
    """What a fresh recogniser session (as a call gets) hears in ``audio``."""
    stt = SphinxSTT(CORPUS, processes=1, vad_end_ms=vad_end_ms)
    await stt.connect()
    heard: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stt.run)
        for i in range(0, len(audio), 160):
            stt.send_audio(audio[i : i + 160])
            if i % 16000 == 0:
                await trio.sleep(0)
        with trio.fail_after(30):
            while len(heard) < turns:
                heard += [e.text for e in await stt.receive() if isinstance(e, SttEndOfTurn)]
        nursery.cancel_scope.cancel()
    await stt.aclose()
    return heard


async def heard_right(
    lines: list[tuple[str, float]], intents: list[str], vad_end_ms: float = 500.0
) -> bytes:
    """Caller audio the recogniser gets right. eSpeak NG is not bit-exact, and about one
    synthesis in ten of a short question is misheard (test above); decoding the same bytes
    is deterministic, so a call test that checks its input first tests the call, not luck."""
    for _ in range(6):
        audio = caller_audio(lines)
        heard = await recognise(audio, len(intents), vad_end_ms)
        if [classify(t) for t in heard] == intents:
            return audio
    raise AssertionError(f"no synthesis of {lines} was recognised as {intents}: {heard}")


async def test_recognition_of_the_same_bytes_is_deterministic() -> None:
    audio = caller_audio([("Could you tell me the time?", 0.5), ("Thank you, goodbye.", 1.0)])
    assert await recognise(audio, 2) == await recognise(audio, 2)


async def test_local_agent_call_end_to_end(make_config: Any, start_relay: Any) -> None:
    cfg = make_config(agents={"desk": {"type": "local", "vad_end_ms": 400}}, default_agent="desk")
    relay = await start_relay(cfg)
    greeting_s = len(synthesize_ulaw(ReceptionistBrain().greeting(), "en-us+f3", 165)) / 8000
    audio = await heard_right(
        [
            ("What are your opening hours?", greeting_s + 2.0),
            ("Could you tell me the time?", 11.0),
            ("Thank you, goodbye.", 6.0),
        ],
        ["hours", "time", "goodbye"],
        vad_end_ms=400,
    )
    with trio.fail_after(60):
        result = await simulator.place_call(
            relay.base_url,
            cfg.twilio.auth_token,
            audio=audio,
            hangup_after_s=6.0,
            max_duration_s=50.0,
        )
    record = await relay.wait_record(result.call_sid, "completed")
    callers = [e["text"] for e in record.transcript if e["role"] == "caller"]
    agents = [e["text"] for e in record.transcript if e["role"] == "agent"]
    assert [classify(t) for t in callers] == ["hours", "time", "goodbye"], callers
    assert agents[0].startswith("Hello, thanks for calling")
    assert any("We are open" in a for a in agents)
    assert any(a.startswith("It is ") for a in agents)  # through the get_time tool
    assert [t["name"] for t in record.tool_calls] == ["get_time"]
    assert agents[-1] == "Thank you for calling. Goodbye!"
    assert result.hung_up_by == "relay" and record.end_reason == "agent ended the call"
    assert result.heard_ms > 10000 and result.clears == 0


async def test_local_agent_barge_in_keeps_only_what_was_heard(
    make_config: Any, start_relay: Any
) -> None:
    cfg = make_config(agents={"desk": {"type": "local"}}, default_agent="desk")
    relay = await start_relay(cfg)
    greeting_s = len(synthesize_ulaw(ReceptionistBrain().greeting(), "en-us+f3", 165)) / 8000
    audio = await heard_right(
        [
            ("What are your opening hours?", greeting_s + 2.0),
            ("Are you open on Sunday?", 3.0),  # ~2 s into the long hours answer
        ],
        ["hours", "hours"],
    )
    with trio.fail_after(60):
        result = await simulator.place_call(
            relay.base_url, cfg.twilio.auth_token, audio=audio, hangup_after_s=5.0
        )
    record = await relay.wait_record(result.call_sid, "completed")
    assert result.clears == 1 and len(record.barge_ins) == 1
    agents = [e["text"] for e in record.transcript if e["role"] == "agent"]
    cut = [a for a in agents if a.endswith("…")]
    assert len(cut) == 1 and cut[0].startswith("We are open")
    assert "closed on Sunday" not in cut[0]  # the rest of the answer was never heard
    assert agents[-1].startswith("On Sunday we are closed")


def test_recogniser_model_files_go_with_the_run() -> None:
    """The pool kills its recogniser processes when the run ends (they cannot clean up
    after themselves), so it removes their model directories too."""
    import os

    from relay.agents.text.local_speech import SphinxPool

    seen: list[str] = []

    async def main() -> None:
        worker = await SphinxPool.get().worker(CORPUS, 10.0, 1)
        seen.append(worker.workdir)
        assert os.listdir(worker.workdir)  # the language model the process reads

    trio.run(main)
    assert seen and not os.path.exists(seen[0])
