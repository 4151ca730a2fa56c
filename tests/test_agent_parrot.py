"""The parrot agent: VAD turn taking, playback, barge-in, greeting, DTMF, truncate."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import trio

from relay.agents.base import (
    AgentAudio,
    AgentEvent,
    AgentHangup,
    AgentResponseDone,
    AgentSpeechStarted,
    AgentTranscript,
    CallInfo,
)
from relay.agents.parrot import EnergyVAD, ParrotAgent
from relay.agents.registry import create_agent
from relay.errors import ConfigError, ConnectionClosed
from relay.sim import speech

CALL = CallInfo(call_sid="CA" + "0" * 32, stream_sid="MZ" + "0" * 32)


async def drain(agent: ParrotAgent) -> list[AgentEvent]:
    """Everything the agent has queued (receive() blocks when there is nothing)."""
    events: list[AgentEvent] = []
    while True:
        with trio.move_on_after(0.01) as scope:
            events += await agent.receive()
        if scope.cancelled_caught:
            return events


async def feed(agent: ParrotAgent, ulaw: bytes, chunk: int = 160) -> list[tuple[float, AgentEvent]]:
    """Send caller audio like the engine does (20 ms frames); events tagged with audio time."""
    out: list[tuple[float, AgentEvent]] = []
    for i in range(0, len(ulaw), chunk):
        agent.send_audio(ulaw[i : i + chunk])
        out += [((i + chunk) / 8000, e) for e in await drain(agent)]
    return out


def script(*segments: tuple[str, float], seed: int = 0) -> bytes:
    return speech.mulaw_encode(speech.make_script(list(segments), seed=seed))


def kinds(events: list[tuple[float, AgentEvent]]) -> list[str]:
    names: list[str] = []
    for _, e in events:
        name = type(e).__name__
        if not names or names[-1] != name or name != "AgentAudio":  # collapse audio runs
            names.append(name)
    return names


def audio_of(events: list[tuple[float, AgentEvent]], response_id: str) -> bytes:
    return b"".join(
        e.audio for _, e in events if isinstance(e, AgentAudio) and e.response_id == response_id
    )


async def test_waits_for_end_of_utterance_then_plays_it_back(autojump_clock: Any) -> None:
    agent = ParrotAgent()
    await agent.connect(CALL)
    caller = script(("silence", 0.5), ("speech", 1.2), ("silence", 1.0))
    events = await feed(agent, caller)

    assert kinds(events) == [
        "AgentTranscript",
        "AgentAudio",
        "AgentTranscript",
        "AgentResponseDone",
    ]
    t_reply = events[0][0]
    assert 1.7 + 0.6 <= t_reply <= 1.7 + 0.7  # after ~600 ms of silence, not before
    first = events[1][1]
    assert isinstance(first, AgentAudio) and first.response_id == "parrot-1"
    bursts = [e for _, e in events if isinstance(e, AgentAudio)]
    assert all(len(b.audio) == 800 for b in bursts[:-1])  # 100 ms bursts
    reply = audio_of(events, "parrot-1")
    # the echo is the caller's own audio: onset included, trailing silence mostly trimmed
    start = caller.find(reply)
    assert start >= 0 and start / 8000 <= 0.5
    assert 1.2 <= len(reply) / 8000 <= 1.2 + 0.3 + 0.2
    assert events[0][1] == AgentTranscript("caller", f"[utterance {len(reply) / 8000:.1f} s]")
    assert events[-2][1] == AgentTranscript("agent", f"[echo {len(reply) / 8000:.1f} s]")
    assert events[-1][1] == AgentResponseDone("parrot-1")
    assert not any(isinstance(e, AgentSpeechStarted) for _, e in events)


async def test_barge_in_while_reply_plays(autojump_clock: Any) -> None:
    agent = ParrotAgent()
    await agent.connect(CALL)
    # reply to the first utterance starts ~1.6 s and lasts ~1.3 s; caller speaks at 2.0 s
    caller = script(("speech", 1.0), ("silence", 1.0), ("speech", 0.8), ("silence", 1.0), seed=5)
    events = await feed(agent, caller)

    assert kinds(events) == [
        "AgentTranscript", "AgentAudio", "AgentTranscript", "AgentResponseDone",  # reply 1
        "AgentSpeechStarted",  # barge-in: the engine clears Twilio
        "AgentSpeechStopped",
        "AgentTranscript", "AgentAudio", "AgentTranscript", "AgentResponseDone",  # reply 2
    ]  # fmt: skip
    barge_t = next(t for t, e in events if isinstance(e, AgentSpeechStarted))
    assert 2.0 <= barge_t <= 2.0 + 0.1  # ~60 ms of speech is enough
    assert agent.barge_ins == 1 and len(agent.utterances) == 2
    assert audio_of(events, "parrot-2")


async def test_no_barge_in_once_reply_has_played(autojump_clock: Any) -> None:
    agent = ParrotAgent()
    await agent.connect(CALL)
    caller = script(("speech", 0.8), ("silence", 3.0), ("speech", 0.8), ("silence", 1.0))
    events = await feed(agent, caller)
    assert not any(isinstance(e, AgentSpeechStarted) for _, e in events)
    assert [e.response_id for _, e in events if isinstance(e, AgentResponseDone)] == [
        "parrot-1",
        "parrot-2",
    ]


async def test_greeting_speaks_first_and_can_be_interrupted(autojump_clock: Any) -> None:
    agent = ParrotAgent.from_config({"greeting": True})
    await agent.connect(CALL)
    events = [(0.0, e) for e in await drain(agent)]
    greeting = audio_of(events, "parrot-1-greeting")
    assert greeting == speech.mulaw_encode(speech.greeting_chime())
    assert events[-2][1] == AgentTranscript("agent", "[greeting]")
    assert events[-1][1] == AgentResponseDone("parrot-1-greeting")
    assert agent.replying

    later = await feed(agent, script(("silence", 0.2), ("speech", 0.5), ("silence", 1.0)))
    assert isinstance(later[0][1], AgentSpeechStarted)  # caller talked over the greeting


async def test_hangup_digit_says_goodbye_then_hangs_up(autojump_clock: Any) -> None:
    agent = ParrotAgent()
    await agent.connect(CALL)
    agent.send_dtmf("1")
    assert await drain(agent) == []
    agent.send_dtmf("#")
    events = await drain(agent)
    assert agent.dtmf_digits == ["1", "#"]
    assert isinstance(events[0], AgentAudio) and events[0].response_id == "parrot-1-bye"
    assert b"".join(e.audio for e in events if isinstance(e, AgentAudio)) == speech.mulaw_encode(
        speech.goodbye_chime()
    )
    assert events[-2:] == [AgentResponseDone("parrot-1-bye"), AgentHangup("caller pressed #")]
    # after hanging up the parrot ignores the caller
    assert await feed(agent, script(("speech", 1.0), ("silence", 1.0))) == []


async def test_truncate_is_recorded_and_ends_reply(autojump_clock: Any) -> None:
    agent = ParrotAgent()
    await agent.connect(CALL)
    await feed(agent, script(("speech", 1.0), ("silence", 0.7)))
    assert agent.replying
    agent.truncate("parrot-1", 420)
    assert agent.truncations == {"parrot-1": 420}
    assert not agent.replying  # speech now is a new turn, not a barge-in
    events = await feed(agent, script(("speech", 0.5), ("silence", 1.0)))
    assert not any(isinstance(e, AgentSpeechStarted) for _, e in events)


async def test_max_utterance_cuts_long_talk(autojump_clock: Any) -> None:
    agent = ParrotAgent.from_config({"max_utterance_s": 2})
    await agent.connect(CALL)
    events = await feed(agent, script(("speech", 6.0), ("silence", 1.0)))
    done = [(t, e) for t, e in events if isinstance(e, AgentResponseDone)]
    assert len(done) == 1 and 1.9 <= done[0][0] <= 2.5  # replied at the cap, rest ignored
    assert len(audio_of(events, "parrot-1")) == 2 * 8000
    assert not any(isinstance(e, AgentSpeechStarted) for _, e in events)


async def test_odd_chunk_sizes_are_buffered(autojump_clock: Any) -> None:
    agent = ParrotAgent()
    await agent.connect(CALL)
    caller = script(("speech", 1.0), ("silence", 1.0))
    events = await feed(agent, caller, chunk=97)
    assert [type(e) for _, e in events].count(AgentResponseDone) == 1


async def test_receive_raises_after_aclose() -> None:
    agent = ParrotAgent()
    await agent.connect(CALL)
    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:

            async def waiter() -> None:
                with pytest.raises(ConnectionClosed):
                    await agent.receive()

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            await agent.aclose()
    with pytest.raises(ConnectionClosed):
        await agent.receive()
    agent.send_audio(b"\xff" * 160)  # harmless after close
    await agent.aclose()  # idempotent


def test_from_config_coerces_and_validates() -> None:
    agent = ParrotAgent.from_config(
        {"type": "parrot", "greeting": "true", "max_utterance_s": "3.5", "vad_end_ms": "400"}
    )
    assert agent.greeting is True and agent.vad.end_frames == 20
    assert isinstance(create_agent({"type": "parrot"}), ParrotAgent)
    with pytest.raises(ConfigError, match="unknown option"):
        ParrotAgent.from_config({"greting": True})
    with pytest.raises(ConfigError, match="max_utterance_s"):
        ParrotAgent.from_config({"max_utterance_s": "long"})
    with pytest.raises(ConfigError, match="greeting"):
        ParrotAgent.from_config({"greeting": "maybe"})
    with pytest.raises(ConfigError, match="hangup_digit"):
        ParrotAgent.from_config({"hangup_digit": "##"})
    assert ParrotAgent.from_config({"hangup_digit": ""}).hangup_digit == ""


def test_vad_tracks_noise_floor() -> None:
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(8000 * 5) * 32768 * 10 ** (-40 / 20)  # loud line noise
    talk = speech.speech(1.5, seed=2, level_dbfs=-15).astype(np.float64)
    pcm = np.concatenate([noise, noise[:12000] + talk, noise[:16000]])
    vad = EnergyVAD()
    events = [
        (i * 0.02, e)
        for i, level in enumerate(speech.frame_dbfs(pcm))
        if (e := vad.update(float(level))) is not None
    ]
    # at most a short false start while the floor is learned, then only the real speech
    real = [(t, e) for t, e in events if t > 1.0]
    assert [e for _, e in real] == ["start", "end"]
    assert real[0][0] == pytest.approx(5.0, abs=0.1)
    assert real[1][0] == pytest.approx(6.5 + 0.6, abs=0.15)
