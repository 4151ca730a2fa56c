"""The cascaded agent end to end over loopback: the real relay, the Twilio simulator, and
local fakes of each STT/TTS vendor plus an OpenAI-compatible chat endpoint
(tests/fake_stt_tts.py, tests/fake_llm.py)."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
from fake_llm import Reply, fake_llm
from fake_stt_tts import (
    KEY,
    FakeAssemblyAI,
    FakeAura,
    FakeDeepgramListen,
    FakeElevenLabs,
    FakeSarvamSTT,
    FakeSarvamTTS,
    FakeSpeechOptions,
    serve,
)

from relay.sim import simulator, speech

STT_FAKES = {"deepgram": FakeDeepgramListen, "assemblyai": FakeAssemblyAI, "sarvam": FakeSarvamSTT}
TTS_FAKES = {"deepgram": FakeAura, "elevenlabs": FakeElevenLabs, "sarvam": FakeSarvamTTS}


class Rig:
    def __init__(self, llm: Any, stt: Any, tts: Any, options: dict[str, Any]) -> None:
        self.llm = llm
        self.stt = stt
        self.tts = tts
        self.options = options


@asynccontextmanager
async def rig(
    stt: str,
    tts: str,
    respond: Callable[[dict[str, Any]], Reply],
    transcripts: list[str],
    **extra: Any,
) -> AsyncIterator[Rig]:
    async with fake_llm(respond) as llm:
        stt_server = STT_FAKES[stt](FakeSpeechOptions(transcripts=deque(transcripts)))
        async with serve(stt_server):
            options: dict[str, Any] = {
                "type": "cascaded",
                "stt": stt,
                "stt_url": stt_server.url.replace(stt_server.path, "") + stt_server.path,
                "stt_api_key": KEY,
                "tts": tts,
                "llm_url": llm.url,
                "llm_model": "fake-model",
                "llm_api_key": llm.api_key,
                "instructions": "You are a helpful receptionist.",
                "greeting": "Hello, how can I help?",
                **extra,
            }
            if tts == "openai":
                options.update(tts_url=llm.url, tts_api_key=llm.api_key)
                yield Rig(llm, stt_server, llm, options)
                return
            tts_server = TTS_FAKES[tts](FakeSpeechOptions())
            async with serve(tts_server):
                url = tts_server.url
                if tts == "elevenlabs":
                    url = url.replace("voice123", "{voice}")
                    options["tts_voice"] = "voice123"
                options.update(tts_url=url, tts_api_key=KEY)
                yield Rig(llm, stt_server, tts_server, options)


def script(*segments: tuple[str, float]) -> Any:
    return speech.make_script(list(segments))


async def call(
    make_config: Any, start_relay: Any, options: dict[str, Any], audio: Any, **kw: Any
) -> tuple[Any, Any]:
    cfg = make_config(agents={"bot": options}, default_agent="bot")
    relay = await start_relay(cfg)
    with trio.fail_after(40):
        result = await simulator.place_call(
            relay.base_url,
            cfg.twilio.auth_token,
            audio=audio,
            hangup_after_s=kw.pop("hangup_after_s", 2.0),
            **kw,
        )
    record = await relay.wait_record(result.call_sid, "completed")
    return result, record


def roles(record: Any, role: str) -> list[str]:
    return [e["text"] for e in record.transcript if e["role"] == role]


TWO_TURNS = (("silence", 2.5), ("speech", 1.0), ("silence", 3.5), ("speech", 1.0), ("silence", 3.0))


@pytest.mark.parametrize(
    "stt,tts",
    [
        ("deepgram", "deepgram"),
        ("assemblyai", "elevenlabs"),
        ("sarvam", "sarvam"),
        ("deepgram", "openai"),
        ("assemblyai", "deepgram"),
        ("sarvam", "elevenlabs"),
    ],
)
async def test_two_turn_conversation(
    make_config: Any, start_relay: Any, stt: str, tts: str
) -> None:
    answers = iter(["We open at nine. See you soon!", "It costs five dollars."])

    def respond(body: dict[str, Any]) -> Reply:
        return Reply(text=next(answers))

    async with rig(stt, tts, respond, ["when do you open", "how much is bread"]) as r:
        result, record = await call(make_config, start_relay, r.options, script(*TWO_TURNS))
    assert roles(record, "caller") == ["when do you open", "how much is bread"]
    assert roles(record, "agent") == [
        "Hello, how can I help?",
        "We open at nine. See you soon!",
        "It costs five dollars.",
    ]
    assert record.transcript[0]["role"] == "agent"  # greeting first
    # the model saw the conversation so far, system prompt first
    last = r.llm.requests[-1]["messages"]
    assert [m["role"] for m in last] == ["system", "assistant", "user", "assistant", "user"]
    assert last[3]["content"] == "We open at nine. See you soon!"
    assert result.heard_ms > 3000 and result.clears == 0
    assert not r.llm.refusals and not r.stt.refusals
    if tts != "openai":
        assert not r.tts.refusals
    else:
        assert [q["response_format"] for q in r.llm.speech_requests] == ["pcm"] * len(
            r.llm.speech_requests
        )


async def test_tool_round_trip(make_config: Any, start_relay: Any) -> None:
    def respond(body: dict[str, Any]) -> Reply:
        if body["messages"][-1]["role"] == "tool":
            result = orjson.loads(body["messages"][-1]["content"])
            return Reply(text=f"It is {result['weekday']} today.")
        return Reply(text="Let me check.", tool_calls=[("get_time", '{"timezone": "UTC"}')])

    async with rig("deepgram", "deepgram", respond, ["what day is it"], tools=["get_time"]) as r:
        _result, record = await call(
            make_config,
            start_relay,
            r.options,
            script(("silence", 2.5), ("speech", 1.0), ("silence", 5.0)),
        )
    assert [t["name"] for t in record.tool_calls] == ["get_time"]
    second = r.llm.requests[-1]["messages"]
    assert (
        second[-2]["role"] == "assistant"
        and second[-2]["tool_calls"][0]["function"]["name"] == "get_time"
    )
    assert second[-1]["role"] == "tool"
    tools = r.llm.requests[0]["tools"]
    assert {t["function"]["name"] for t in tools} == {"get_time", "end_call"}
    agent = roles(record, "agent")
    assert agent[-1].startswith("Let me check. It is ") and agent[-1].endswith("today.")


@pytest.mark.parametrize("tts", ["deepgram", "elevenlabs", "openai"])
async def test_barge_in_cancels_the_model_and_keeps_what_was_heard(
    make_config: Any, start_relay: Any, tts: str
) -> None:
    long = " ".join(f"Sentence number {i} is part of a very long answer." for i in range(1, 40))
    replies = iter([Reply(text=long, chunk_delay_s=0.03), Reply(text="Sure, go ahead.")])

    async with rig(
        "deepgram", tts, lambda body: next(replies), ["tell me everything", "stop please"]
    ) as r:
        audio = script(
            ("silence", 2.5), ("speech", 1.0), ("silence", 3.0), ("speech", 1.0), ("silence", 3.0)
        )
        result, record = await call(make_config, start_relay, r.options, audio)
    assert result.clears == 1 and len(record.barge_ins) == 1
    assert r.llm.disconnects >= 1  # the long stream was cancelled mid-way
    heard = record.barge_ins[0]["heard_ms"]
    assert 500 < heard < 4000
    second = r.llm.requests[-1]["messages"]
    kept = second[-2]
    assert kept["role"] == "assistant" and kept["content"]
    assert len(kept["content"]) < len(long) / 3 and long.startswith(kept["content"])
    assert roles(record, "agent")[-1] == "Sure, go ahead."
    if tts == "deepgram":
        assert r.tts.clears >= 1
    elif tts == "elevenlabs":
        assert r.tts.contexts >= 3  # greeting, the cut reply, the next one


@pytest.mark.parametrize("failure", ["status", "hang", "stall"])
async def test_model_failure_apologises_and_goes_on(
    make_config: Any, start_relay: Any, failure: str
) -> None:
    bad = {
        "status": Reply(status=500),
        "hang": Reply(hang=True),
        "stall": Reply(text="I was about to say something", stall_after=3),
    }[failure]
    replies = iter([bad, Reply(text="All good now.")])

    async with rig(
        "deepgram", "deepgram", lambda body: next(replies), ["first", "second"], llm_timeout_s=1.0
    ) as r:
        audio = script(
            ("silence", 2.5), ("speech", 1.0), ("silence", 5.0), ("speech", 1.0), ("silence", 3.0)
        )
        result, record = await call(make_config, start_relay, r.options, audio)
    agent = roles(record, "agent")
    assert any("Sorry, I am having trouble" in a for a in agent)
    assert agent[-1] == "All good now."
    assert result.hung_up_by == "caller"
    # the apology came within a few seconds of the end of the first turn
    first_end = next(e["t"] for e in record.transcript if e["role"] == "caller")
    apology_t = next(e["t"] for e in record.transcript if "Sorry" in e["text"])
    assert apology_t - first_end < 5.0


async def test_model_failing_twice_ends_the_call(make_config: Any, start_relay: Any) -> None:
    async with rig("deepgram", "deepgram", lambda body: Reply(status=503), ["one", "two"]) as r:
        audio = script(
            ("silence", 2.5), ("speech", 1.0), ("silence", 5.0), ("speech", 1.0), ("silence", 8.0)
        )
        result, record = await call(make_config, start_relay, r.options, audio, hangup_after_s=6.0)
    assert result.hung_up_by == "relay"
    assert record.end_reason == "agent ended the call"
    assert roles(record, "agent")[-1].startswith("Sorry, I cannot help you right now")


async def test_config_refuses_unknown_vendor_and_keys(make_config: Any) -> None:
    from relay.agents.registry import validate_agent
    from relay.errors import ConfigError

    base = {
        "type": "cascaded",
        "stt": "deepgram",
        "tts": "deepgram",
        "stt_api_key": "k",
        "tts_api_key": "k",
        "llm_url": "http://x/v1",
        "llm_model": "m",
    }
    validate_agent(base)
    with pytest.raises(ConfigError, match="stt"):
        validate_agent({**base, "stt": "whisper"})
    with pytest.raises(ConfigError, match="bogus"):
        validate_agent({**base, "bogus": 1})
    with pytest.raises(ConfigError, match="llm_url"):
        validate_agent({k: v for k, v in base.items() if k != "llm_url"})


async def test_fakes_refuse_what_the_vendors_refuse() -> None:
    import httpx

    from relay.errors import AgentError, ConnectionClosed
    from relay.media import websocket

    server = FakeAssemblyAI()
    async with serve(server):
        url = f"{server.url}?sample_rate=8000&encoding=pcm_mulaw&speech_model=u"
        ws = await websocket.connect(url, [("Authorization", KEY)])
        ws.send_bytes_nowait(b"\xff" * 160)  # one Twilio frame: 20 ms < 50 ms
        with trio.fail_after(5), pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.receive()
        assert closed.value.code == 3007 and server.refusals
        # the adapter batches Twilio frames to 60 ms, so a whole call is never refused
        from relay.agents.text.vendors import AssemblyAISTT

        stt = AssemblyAISTT({"stt_api_key": KEY, "stt_url": server.url})
        await stt.connect()
        for _ in range(10):
            stt.send_audio(b"\xff" * 160)
        await trio.sleep(0.2)
        assert len(server.refusals) == 1
        await stt.aclose()
    dg = FakeDeepgramListen()
    async with serve(dg):
        from relay.agents.text.vendors import DeepgramSTT

        with pytest.raises(AgentError, match="401"):
            await DeepgramSTT({"stt_api_key": "wrong", "stt_url": dg.url}).connect()
    async with fake_llm(lambda body: Reply(text="x")) as llm:
        async with httpx.AsyncClient() as client:
            flat = {"type": "function", "name": "f", "parameters": {}}
            answer = await client.post(
                llm.url + "/chat/completions",
                json={
                    "model": "m",
                    "messages": [{"role": "user", "content": "x"}],
                    "tools": [flat],
                },
                headers={"Authorization": f"Bearer {llm.api_key}"},
            )
        assert answer.status_code == 400 and "tools[0].function" in answer.text
