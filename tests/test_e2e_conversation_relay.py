"""ConversationRelay end to end over loopback: the real relay, the simulator playing Twilio's
side of the text WebSocket (relay/sim/conversation_relay.py) and a local OpenAI-compatible
chat server (tests/fake_llm.py)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import orjson
import trio
from fake_llm import Reply, fake_llm

from relay.media import websocket as wsmod
from relay.protocol.signature import compute_signature
from relay.sim import conversation_relay as crsim
from relay.sim.conversation_relay import Turn

AGENT = "speaker"


def options(llm: Any, **extra: Any) -> dict[str, Any]:
    return {
        "type": "twilio-speech",
        "llm_url": llm.url,
        "llm_model": "fake-model",
        "llm_api_key": llm.api_key,
        "instructions": "You are a helpful receptionist.",
        "welcome_greeting": "Hello, how can I help?",
        "voice": "en-US-Journey-O",
        "tts_provider": "Google",
        **extra,
    }


def last_user(body: dict[str, Any]) -> str:
    for m in reversed(body["messages"]):
        if m["role"] == "user":
            return str(m["content"])
    return ""


async def start(make_config: Any, start_relay: Any, llm: Any, **extra: Any) -> Any:
    cfg = make_config(agents={AGENT: options(llm, **extra)}, default_agent=AGENT)
    return await start_relay(cfg)


async def call(relay: Any, e2e: Any, script: list[Turn], **kwargs: Any) -> crsim.CrCallResult:
    with trio.fail_after(20):
        return await crsim.place_call(relay.base_url, e2e.AUTH_TOKEN, script, **kwargs)


async def test_twiml_asks_for_conversation_relay(
    make_config: Any, start_relay: Any, e2e: Any
) -> None:
    async with fake_llm(lambda body: Reply("Hi.")) as llm:
        relay = await start(
            make_config, start_relay, llm, hints=["Relay", "bakery"], language="en-US"
        )
        response, _ = await relay.voice("CA" + "1" * 32)
        assert response.status == 200
        root = ET.fromstring(response.text)
        cr = root.find("Connect/ConversationRelay")
        assert cr is not None
        assert cr.get("url", "").startswith("ws://") and cr.get("url", "").endswith(
            "/twilio/conversation/" + relay.cfg.twilio.account_sid
        )
        assert cr.get("welcomeGreeting") == "Hello, how can I help?"
        assert cr.get("dtmfDetection") == "true"
        assert cr.get("ttsProvider") == "Google" and cr.get("hints") == "Relay,bakery"
        params = {p.get("name"): p.get("value") for p in cr.findall("Parameter")}
        assert set(params) == {"token", "agent", "tenant"} and params["agent"] == AGENT
        assert (
            root.find("Connect")
            .get("action", "")
            .startswith(relay.base_url + "/twilio/speech/handoff")
        )


async def test_multi_turn_streams_tokens(make_config: Any, start_relay: Any, e2e: Any) -> None:
    answers = {
        "What time do you open?": "We open at nine in the morning.",
        "And on Sunday?": "On Sunday we are closed.",
    }
    async with fake_llm(lambda body: Reply(answers.get(last_user(body), "Sorry?"))) as llm:
        relay = await start(make_config, start_relay, llm)
        result = await call(relay, e2e, [Turn("What time do you open?"), Turn("And on Sunday?")])
        assert result.error is None and not result.invalid, result
        assert result.answers == list(answers.values())
        assert len(result.first_token_s) == 2
        # the model saw the greeting and the first exchange on the second turn
        second = llm.requests[1]["messages"]
        assert [m["role"] for m in second] == ["system", "assistant", "user", "assistant", "user"]
        assert second[1]["content"] == "Hello, how can I help?"
        record = await relay.wait_record(result.call_sid, "completed")
        assert record.end_reason == "caller hung up"
        assert [t["role"] for t in record.transcript] == [
            "agent",
            "caller",
            "agent",
            "caller",
            "agent",
        ]
        turns = record.stats["turns"]
        assert len(turns) == 2 and all(t["relay_prompt_to_request_ms"] >= 0 for t in turns)
        assert relay.metrics.active_calls == 0


async def test_tool_call_then_end_call(make_config: Any, start_relay: Any, e2e: Any) -> None:
    def respond(body: dict[str, Any]) -> Reply:
        last = body["messages"][-1]
        if last["role"] == "user" and "time" in last["content"]:
            return Reply("Let me check.", tool_calls=[("get_time", "{}")])
        if last["role"] == "tool":
            return Reply("It is noon.")
        return Reply("Goodbye!", tool_calls=[("end_call", "{}")])

    async with fake_llm(respond) as llm:
        relay = await start(make_config, start_relay, llm, tools=["get_time"])
        result = await call(
            relay, e2e, [Turn("What time is it?"), Turn("Thanks, bye.")], linger_s=5.0
        )
        assert result.answers[0].startswith("Let me check.") and "noon" in result.answers[0]
        assert result.ended and result.handoff == {"reason": "agent ended"}
        assert "<Hangup" in result.after_twiml
        record = await relay.wait_record(result.call_sid, "completed")
        assert [t["name"] for t in record.tool_calls] == ["get_time", "end_call"]
        assert record.end_reason == "agent ended"
        # the tool's answer went back to the model before its second round
        assert any(m["role"] == "tool" for m in llm.requests[1]["messages"])


async def test_interrupt_keeps_only_what_was_spoken(
    make_config: Any, start_relay: Any, e2e: Any
) -> None:
    long = (
        "We have sourdough, rye, baguettes, croissants, brioche, focaccia and many more "
        "breads today."
    )

    def respond(body: dict[str, Any]) -> Reply:
        if last_user(body) == "What bread do you have?":
            return Reply(long, chunk_delay_s=0.05)
        return Reply("Sure, one rye.")

    async with fake_llm(respond) as llm:
        relay = await start(make_config, start_relay, llm)
        result = await call(
            relay,
            e2e,
            [Turn("What bread do you have?"), Turn("Rye please.", interrupt_after_s=1.0)],
            chars_per_s=15.0,
        )
        assert result.interrupts == 1
        heard = result.answers[0]
        assert heard and long.startswith(heard) and len(heard) < len(long)
        second = llm.requests[1]["messages"]
        kept = [m for m in second if m["role"] == "assistant"][-1]["content"]
        assert kept == heard  # the history keeps what was spoken, not what was generated
        record = await relay.wait_record(result.call_sid, "completed")
        assert record.barge_ins and record.barge_ins[0]["heard"] == heard
        assert any(t["text"].endswith("…") for t in record.transcript if t["role"] == "agent")


async def test_dtmf_goes_to_the_agent(make_config: Any, start_relay: Any, e2e: Any) -> None:
    async with fake_llm(lambda body: Reply("You pressed a key.")) as llm:
        relay = await start(make_config, start_relay, llm)
        result = await call(relay, e2e, [Turn(dtmf="5")])
        assert result.answers == ["You pressed a key."]
        assert "5" in last_user(llm.requests[0])
        record = await relay.wait_record(result.call_sid, "completed")
        assert record.dtmf == ["5"]


async def test_model_failure_apologises_and_goes_on(
    make_config: Any, start_relay: Any, e2e: Any
) -> None:
    replies = iter([Reply(status=500), Reply("Now I can help.")])
    async with fake_llm(lambda body: next(replies)) as llm:
        relay = await start(make_config, start_relay, llm)
        result = await call(relay, e2e, [Turn("Hello?"), Turn("Hello again?")])
        assert result.answers[0].startswith("Sorry")
        assert result.answers[1] == "Now I can help."
        assert relay.metrics.errors["llm_error"] == 1


async def test_partial_prompts_use_the_final(make_config: Any, start_relay: Any, e2e: Any) -> None:
    async with fake_llm(lambda body: Reply("Yes.")) as llm:
        relay = await start(make_config, start_relay, llm)
        result = await call(relay, e2e, [Turn("Are you open today?", partials=True)])
        assert result.answers == ["Yes."]
        assert len(llm.requests) == 1 and last_user(llm.requests[0]) == "Are you open today?"


async def test_bad_signature_and_bad_token(make_config: Any, start_relay: Any, e2e: Any) -> None:
    async with fake_llm(lambda body: Reply("Hi.")) as llm:
        relay = await start(make_config, start_relay, llm)
        url = (
            relay.cfg.stream_url.removesuffix("/twilio/stream")
            + "/twilio/conversation/"
            + relay.cfg.twilio.account_sid
        )
        with trio.fail_after(10):
            # unsigned / wrongly signed upgrades are refused before any WebSocket exists
            for signature in ("", compute_signature(e2e.OTHER_TOKEN, url)):
                headers = [("X-Twilio-Signature", signature)] if signature else []
                try:
                    await wsmod.connect(url, headers)
                except Exception as exc:
                    assert "403" in str(exc)
                else:
                    raise AssertionError("upgrade accepted")
            assert relay.metrics.errors["bad_signature"] == 2
            # a signed upgrade whose setup carries a forged token is closed (policy)
            ws = await wsmod.connect(
                url, [("X-Twilio-Signature", compute_signature(e2e.AUTH_TOKEN, url))]
            )
            setup = {
                "type": "setup",
                "callSid": "CA" + "2" * 32,
                "accountSid": relay.cfg.twilio.account_sid,
                "customParameters": {
                    "token": "9999999999.forged",
                    "agent": AGENT,
                    "tenant": "default",
                },
            }
            await ws.send_text(orjson.dumps(setup).decode())
            try:
                while True:
                    await ws.receive()
            except Exception as exc:
                assert getattr(exc, "code", None) == 1008
            assert relay.metrics.errors["cr_token"] == 1


async def test_malformed_message_is_refused(make_config: Any, start_relay: Any, e2e: Any) -> None:
    async with fake_llm(lambda body: Reply("Hi.")) as llm:
        relay = await start(make_config, start_relay, llm)
        response, _ = await relay.voice("CA" + "3" * 32)
        root = ET.fromstring(response.text)
        cr = root.find("Connect/ConversationRelay")
        assert cr is not None
        params = {p.get("name"): p.get("value") for p in cr.findall("Parameter")}
        url = cr.get("url", "")
        with trio.fail_after(10):
            ws = await wsmod.connect(
                url, [("X-Twilio-Signature", compute_signature(e2e.AUTH_TOKEN, url))]
            )
            setup = {"type": "setup", "callSid": "CA" + "3" * 32, "customParameters": params}
            await ws.send_text(orjson.dumps(setup).decode())
            await ws.send_text('{"type": "prompt", "voicePrompt": 42}')
            try:
                while True:
                    await ws.receive()
            except Exception as exc:
                assert getattr(exc, "code", None) == 1008
        record = await relay.wait_record("CA" + "3" * 32, "completed")
        assert record.end_reason.startswith("bad message from Twilio")
        assert relay.metrics.errors["cr_protocol"] == 1


_: Callable[..., Any] | None = None


async def test_drain_ends_a_session_with_the_fallback_message(
    make_config: Any, start_relay: Any, e2e: Any
) -> None:
    """SIGTERM's drain waits for ConversationRelay sessions like for media calls, then ends
    the rest with ``end`` (reason drained); the <Connect action> says the fallback message."""
    from relay.http.drain import drain

    async with fake_llm(lambda body: Reply("Hi.")) as llm:
        relay = await start(
            make_config, start_relay, llm, fallback_message="We are restarting, goodbye."
        )
        counts: dict[str, int] = {}
        results: list[crsim.CrCallResult] = []

        async def caller() -> None:  # stays on the line, silent, until relay ends the call
            results.append(await call(relay, e2e, [], linger_s=15.0))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            await relay.wait_until(lambda: bool(relay.state.speech_sessions))

            async def run_drain() -> None:
                counts.update(await drain(relay.server, timeout_s=0.5))

            nursery.start_soon(run_drain)
        (result,) = results
        assert result.ended and result.handoff == {"reason": "drained"}
        assert "We are restarting, goodbye." in result.after_twiml
        assert "<Hangup" in result.after_twiml
        assert counts == {"finished": 0, "ended": 1}
        record = await relay.wait_record(result.call_sid, "completed")
        assert record.end_reason == "drained" and record.fallback_message_played
        assert not relay.state.speech_sessions and relay.metrics.active_calls == 0
