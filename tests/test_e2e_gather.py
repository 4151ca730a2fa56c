"""``<Gather input="speech">`` + ``<Say>`` end to end over loopback: the real relay, the
simulator following its TwiML like Twilio (relay/sim/gather.py) and a local
OpenAI-compatible chat server (tests/fake_llm.py)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio
from fake_llm import Reply, fake_llm

from relay.sim import gather as gsim
from relay.sim.gather import Utterance

AGENT = "gatherer"
SCALE = 0.05  # simulated speech and timeouts run 20x faster; HTTP is real


def options(llm: Any, **extra: Any) -> dict[str, Any]:
    return {
        "type": "twilio-speech",
        "mode": "gather",
        "llm_url": llm.url,
        "llm_model": "fake-model",
        "llm_api_key": llm.api_key,
        "instructions": "You are a helpful receptionist.",
        "welcome_greeting": "Hello, how can I help?",
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


async def call(
    relay: Any, e2e: Any, script: list[Utterance], **kwargs: Any
) -> gsim.GatherCallResult:
    with trio.fail_after(20):
        return await gsim.place_call(
            relay.base_url,
            e2e.AUTH_TOKEN,
            script,
            time_scale=kwargs.pop("time_scale", SCALE),
            **kwargs,
        )


async def test_greeting_gather_twiml(make_config: Any, start_relay: Any, e2e: Any) -> None:
    async with fake_llm(lambda body: Reply("Hi.")) as llm:
        relay = await start(make_config, start_relay, llm, hints="bakery,sourdough")
        response, _ = await relay.voice("CA" + "4" * 32)
        root = ET.fromstring(response.text)
        assert [v.tag for v in root] == ["Gather", "Redirect"]
        g = root[0]
        assert g.get("input") == "speech" and g.get("bargeIn") == "true"
        assert g.get("speechModel") == "googlev2_telephony" and g.get("speechTimeout") == "auto"
        assert g.get("hints") == "bakery,sourdough"
        say = g.find("Say")
        assert say is not None and say.text == "Hello, how can I help?"
        assert say.get("voice") == "Polly.Salli"
        action = urlsplit(g.get("action", ""))
        assert action.path == "/twilio/speech/turn"
        query = parse_qs(action.query)
        assert query["a"] == [AGENT] and query["n"] == ["0"] and query["t"][0]
        assert urlsplit(g.get("partialResultCallback", "")).path == "/twilio/speech/partial"
        assert root[1].text == g.get("action")


async def test_multi_turn_with_tool_and_hangup(
    make_config: Any, start_relay: Any, e2e: Any
) -> None:
    def respond(body: dict[str, Any]) -> Reply:
        last = body["messages"][-1]
        if last["role"] == "tool":
            return Reply("It is noon right now.")
        text = last.get("content") or ""
        if "time" in text:
            return Reply("", tool_calls=[("get_time", "{}")])
        if "bye" in text:
            return Reply("Goodbye, have a nice day!", tool_calls=[("end_call", "{}")])
        return Reply("We open at nine.")

    async with fake_llm(respond) as llm:
        relay = await start(make_config, start_relay, llm, tools=["get_time"], early_answer=False)
        result = await call(
            relay,
            e2e,
            [
                Utterance("When do you open?"),
                Utterance("What time is it?"),
                Utterance("Thanks, bye."),
            ],
        )
        assert result.error is None and not result.http_errors, result
        assert result.said == [
            "Hello, how can I help?",
            "We open at nine.",
            "It is noon right now.",
            "Goodbye, have a nice day!",
        ]
        assert result.end == "hangup" and len(result.answer_s) == 3
        record = relay.records(result.call_sid)
        assert [t["name"] for t in record.tool_calls] == ["get_time", "end_call"]
        assert record.status == "completed" and record.end_reason == "agent ended"
        assert [t["role"] for t in record.transcript] == ["agent"] + ["caller", "agent"] * 3
        # the third request carries the whole conversation (state kept between webhooks)
        roles = [m["role"] for m in llm.requests[2]["messages"]]
        assert roles[:4] == ["system", "assistant", "user", "assistant"]


async def test_early_answer_used(make_config: Any, start_relay: Any, e2e: Any) -> None:
    async with fake_llm(lambda body: Reply("We open at nine.", first_token_delay_s=0.4)) as llm:
        relay = await start(make_config, start_relay, llm)
        result = await call(relay, e2e, [Utterance("When do you open tomorrow?")])
        assert result.partials_posted >= 4
        assert "We open at nine." in result.said
        record = relay.records(result.call_sid)
        assert record.stats["turns"][0]["early"] == "used"
        # the final answer did not wait for a new model request: it reused the prepared one
        finals = [r for r in llm.requests if last_user(r) == "When do you open tomorrow?"]
        assert len(finals) == 1


async def test_early_answer_discarded_when_final_differs(
    make_config: Any, start_relay: Any, e2e: Any
) -> None:
    async with fake_llm(lambda body: Reply(f"You said: {last_user(body)}")) as llm:
        relay = await start(make_config, start_relay, llm)
        result = await call(
            relay,
            e2e,
            [Utterance("I want two loaves", partial_text="I want to leave")],
        )
        assert "You said: I want two loaves" in result.said
        record = relay.records(result.call_sid)
        assert record.stats["turns"][0]["early"] == "discarded"
        assert any(last_user(r) == "I want two loaves" for r in llm.requests)


async def test_silence_reprompts_once_then_ends(
    make_config: Any, start_relay: Any, e2e: Any
) -> None:
    async with fake_llm(lambda body: Reply("Hi.")) as llm:
        relay = await start(make_config, start_relay, llm)
        result = await call(relay, e2e, [Utterance(""), Utterance("")])
        assert result.redirects == 2
        assert result.said == [
            "Hello, how can I help?",
            "Are you still there?",
            "I did not hear anything, so I will hang up. Goodbye.",
        ]
        assert result.end == "hangup" and not llm.requests
        record = relay.records(result.call_sid)
        assert record.end_reason == "no input"


async def test_model_failure_apologises_and_keeps_the_call(
    make_config: Any, start_relay: Any, e2e: Any
) -> None:
    replies = iter([Reply(status=500), Reply("Now I can help.")])
    async with fake_llm(lambda body: next(replies)) as llm:
        relay = await start(make_config, start_relay, llm, early_answer=False)
        result = await call(relay, e2e, [Utterance("Hello there?"), Utterance("Hello again?")])
        assert not result.http_errors
        assert result.said[1].startswith("Sorry, I am having trouble")
        assert result.said[2] == "Now I can help."
        assert relay.metrics.errors["llm_error"] == 1


async def test_barge_in_cuts_the_say(make_config: Any, start_relay: Any, e2e: Any) -> None:
    async with fake_llm(lambda body: Reply("Fine.")) as llm:
        relay = await start(make_config, start_relay, llm)
        result = await call(relay, e2e, [Utterance("Hours please.", barge_in_after_s=0.5)])
        assert result.said[0].endswith("…")
        assert "Fine." in result.said


async def test_bad_signature_and_bad_token(make_config: Any, start_relay: Any, e2e: Any) -> None:
    async with fake_llm(lambda body: Reply("Hi.")) as llm:
        relay = await start(make_config, start_relay, llm)
        sid = "CA" + "5" * 32
        response, _ = await relay.voice(sid)
        action = ET.fromstring(response.text)[0].get("action", "")
        path = action.removeprefix(relay.base_url)
        params = relay.voice_params(sid, "+15550009999", "+15550001234", SpeechResult="hi")
        params["AccountSid"] = relay.cfg.twilio.account_sid
        bad = await relay.post_form(path, params, auth_token=e2e.OTHER_TOKEN)
        assert bad.status == 403
        forged = path.split("&t=")[0] + "&t=9999999999.forged"
        bad_token = await relay.post_form(forged, params)
        assert bad_token.status == 403
        other_call = params | {"CallSid": "CA" + "6" * 32}
        assert (await relay.post_form(path, other_call)).status == 403
        assert relay.metrics.webhooks["speech_turn_bad_signature"] == 1
        assert relay.metrics.webhooks["speech_turn_bad_token"] == 2
        ok = await relay.post_form(path, params)
        assert ok.status == 200 and "<Gather" in ok.text


async def test_another_process_reads_the_state_from_the_store(
    make_config: Any, start_relay: Any, e2e: Any
) -> None:
    async with fake_llm(lambda body: Reply("We open at nine.")) as llm:
        relay = await start(make_config, start_relay, llm)
        sid = "CA" + "7" * 32
        response, _ = await relay.voice(sid)
        action = ET.fromstring(response.text)[0].get("action", "")
        assert await relay.state.control.history.flush(5.0)
        relay.state.records._records.pop(sid)  # this process never saw the call
        params = relay.voice_params(sid, "+15550009999", "+15550001234", SpeechResult="When?")
        params["AccountSid"] = relay.cfg.twilio.account_sid
        answer = await relay.post_form(action.removeprefix(relay.base_url), params)
        assert answer.status == 200 and "We open at nine." in answer.text
        # the greeting came back from the store into the model's history
        assert llm.requests[0]["messages"][1] == {
            "role": "assistant",
            "content": "Hello, how can I help?",
        }
