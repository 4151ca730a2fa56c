"""Warm start (relay/control/warm.py): the agent session opens while relay answers the voice
webhook and is handed to the call when its stream's ``start`` arrives. End to end over
loopback: signed webhooks, a real stream, the fake OpenAI Realtime server (with a
handshake and time-to-first-audio delay where the test is about latency)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from conftest import TOKEN_SECRET
from fake_openai import fake_openai_server

from relay.agents.registry import validate_agent
from relay.control.features import CallFeatures
from relay.errors import ConfigError

GREETING_MS = 400


def gpt(e2e: Any, oai: Any, **extra: Any) -> dict[str, Any]:
    return e2e.openai_agent(oai, greeting="Hello, thanks for calling.", **extra)


def greeting_generated(session: Any) -> bool:
    return sum(item.audio_bytes for item in session.items.values()) >= GREETING_MS * 8


# --- options --------------------------------------------------------------------------------
def test_warm_start_defaults_on_for_network_agents_only() -> None:
    assert CallFeatures().warm("openai") and CallFeatures().warm("gemini")
    assert not CallFeatures().warm("parrot") and not CallFeatures().warm("echo")
    assert not CallFeatures().warm("local") and not CallFeatures().warm("some-test-adapter")
    assert CallFeatures.from_options({"warm_start": "false"}).warm("openai") is False
    assert CallFeatures.from_options({"warm_start": True}).warm("parrot") is True
    with pytest.raises(ConfigError, match=r"agents\.x\.warm_start: "):
        validate_agent({"type": "parrot", "warm_start": "sometimes"}, where="agents.x")


# --- calls ------------------------------------------------------------------------------------
async def test_warm_session_is_opened_at_the_webhook_and_handed_to_the_stream(
    start_relay, make_config, e2e
):
    with trio.fail_after(15):
        async with fake_openai_server(response_ms=GREETING_MS) as oai:
            relay_ = await start_relay(
                make_config(agents={"gpt": gpt(e2e, oai)}, default_agent="gpt")
            )
            call_sid = e2e.sid("CA")
            response, twiml = await relay_.voice(call_sid)
            assert response.status == 200 and twiml is not None
            # Before Twilio opens the stream: configured, and the greeting generated.
            session = await e2e.agent_session(oai)
            await relay_.wait_until(lambda: greeting_generated(session))
            assert session.config["instructions"] == ""
            assert call_sid in relay_.state.warm
            fake = await relay_.connect(call_sid, twiml)
            await fake.wait_for(lambda f: f.audio_ms >= GREETING_MS)
            await fake.hang_up()
            record = await relay_.wait_record(call_sid, "completed")
        assert record.warm_start and record.end_reason == "caller hung up"
        assert len(oai.sessions) == 1  # the call used the webhook's session, no second one
        assert session.closed
        assert dict(relay_.metrics.warm_starts) == {"started": 1, "claimed": 1}
        assert 'relay_warm_starts_total{outcome="claimed"} 1' in relay_.metrics.render()
        assert not relay_.state.warm


async def test_warm_start_shortens_start_to_first_greeting_audio(start_relay, make_config, e2e):
    """The same call, warm and cold, against a fake with a realistic handshake and time to
    first audio: warm, the greeting is ready when the stream starts."""
    with trio.fail_after(20):
        async with fake_openai_server(
            response_ms=GREETING_MS, handshake_delay_s=0.25, response_delay_s=0.3
        ) as oai:
            cfg = make_config(
                agents={"warm": gpt(e2e, oai), "cold": gpt(e2e, oai, warm_start=False)},
                numbers={"+15550001111": "warm", "+15550002222": "cold"},
            )
            relay_ = await start_relay(cfg)
            heard: dict[str, float] = {}
            for name, number in (("warm", "+15550001111"), ("cold", "+15550002222")):
                call_sid = e2e.sid("CA")
                _response, twiml = await relay_.voice(call_sid, to=number)
                assert twiml is not None
                await trio.sleep(0.7)  # Twilio reading the TwiML and opening the stream
                fake = await relay_.connect(call_sid, twiml)
                started = trio.current_time()
                await fake.wait_for(lambda f: bool(f.media))
                heard[name] = fake.of("media")[0].t - started
                await fake.hang_up()
                record = await relay_.wait_record(call_sid, "completed")
                assert record.warm_start is (name == "warm")
        # cold pays handshake + time to first audio after `start`; warm paid it before
        assert heard["warm"] < heard["cold"]
        assert heard["cold"] - heard["warm"] > 0.25


async def test_warm_connect_still_running_at_start_is_awaited(start_relay, make_config, e2e):
    with trio.fail_after(15):
        async with fake_openai_server(response_ms=GREETING_MS, handshake_delay_s=0.5) as oai:
            relay_ = await start_relay(
                make_config(agents={"gpt": gpt(e2e, oai)}, default_agent="gpt")
            )
            fake = await relay_.dial()  # the stream starts while the handshake is pending
            await fake.wait_for(lambda f: f.audio_ms >= GREETING_MS)
            await fake.hang_up()
            record = await relay_.wait_record(fake.call_sid, "completed")
        assert record.warm_start and len(oai.sessions) == 1
        assert relay_.metrics.warm_starts["claimed"] == 1


async def test_warm_session_whose_stream_never_comes_is_closed_and_counted(
    start_relay, make_config, e2e
):
    with trio.fail_after(15):
        async with fake_openai_server(response_ms=GREETING_MS) as oai:
            cfg = make_config(
                agents={"gpt": gpt(e2e, oai)}, default_agent="gpt", calls={"warm_start_ttl_s": 0.5}
            )
            relay_ = await start_relay(cfg)
            await relay_.voice(e2e.sid("CA"))
            session = await e2e.agent_session(oai)
            with trio.fail_after(0.5 + 3.0):  # the bound, plus the close
                await session.wait_closed()
            await relay_.wait_until(lambda: relay_.metrics.warm_starts["expired"] == 1)
        assert not relay_.state.warm and relay_.metrics.warm_starts["claimed"] == 0


async def test_terminal_status_closes_the_warm_session_at_once(start_relay, make_config, e2e):
    with trio.fail_after(15):
        async with fake_openai_server(response_ms=GREETING_MS) as oai:
            relay_ = await start_relay(
                make_config(agents={"gpt": gpt(e2e, oai)}, default_agent="gpt")
            )
            call_sid = e2e.sid("CA")
            await relay_.voice(call_sid)
            session = await e2e.agent_session(oai)
            status = relay_.voice_params(call_sid, "+15550009999", "+15550001234")
            status["CallStatus"] = "no-answer"  # the caller hung up while ringing
            assert (await relay_.post_form("/twilio/status", status)).status == 204
            await session.wait_closed(timeout=3.0)  # well within warm_start_ttl_s (15 s)
            await relay_.wait_until(lambda: relay_.metrics.warm_starts["discarded"] == 1)
        assert not relay_.state.warm


async def test_a_stream_with_a_bad_token_never_gets_the_warm_session(start_relay, make_config, e2e):
    with trio.fail_after(15):
        async with fake_openai_server(response_ms=GREETING_MS) as oai:
            cfg = make_config(
                agents={"gpt": gpt(e2e, oai)}, default_agent="gpt", calls={"warm_start_ttl_s": 1.0}
            )
            relay_ = await start_relay(cfg)
            call_sid = e2e.sid("CA")
            _response, twiml = await relay_.voice(call_sid)
            session = await e2e.agent_session(oai)
            forged = {**twiml.parameters, "token": twiml.parameters["token"][:-4] + "AAAA"}
            fake = await relay_.connect(call_sid, twiml, custom_parameters=forged)
            assert (await fake.wait_closed()).code == 1008
            await session.wait_closed(timeout=5.0)
            await relay_.wait_until(lambda: relay_.metrics.warm_starts["expired"] == 1)
        assert relay_.metrics.warm_starts["claimed"] == 0
        assert not session.audio_in  # the forged stream's audio never reached the agent
        assert relay_.metrics.calls_total == 0


async def test_warm_connect_failure_ends_the_call_like_a_cold_one(start_relay, make_config, e2e):
    with trio.fail_after(15):
        async with fake_openai_server(reject_status=401) as oai:
            relay_ = await start_relay(
                make_config(agents={"gpt": gpt(e2e, oai)}, default_agent="gpt")
            )
            fake = await relay_.dial()
            await fake.wait_closed()
            record = await relay_.wait_record(fake.call_sid, "completed")
        assert record.end_reason == "agent connect failed" and record.warm_start
        assert len(oai.rejected) == 1  # one attempt: the stream took the warm one's error
        assert relay_.metrics.errors["agent_connect"] == 1


async def test_stream_on_another_process_connects_cold_and_the_warm_one_expires(
    start_relay, make_config, e2e
):
    """Two relays sharing the token secret (a load balancer in front): A answers the
    webhook and warms a session, Twilio's stream lands on B."""
    with trio.fail_after(20):
        async with fake_openai_server(response_ms=GREETING_MS) as oai:
            agents = {"gpt": gpt(e2e, oai)}
            a = await start_relay(
                make_config(agents=agents, default_agent="gpt", calls={"warm_start_ttl_s": 1.0})
            )
            b = await start_relay(make_config(agents=agents, default_agent="gpt"))
            assert a.cfg.security.token_secret == b.cfg.security.token_secret == TOKEN_SECRET
            call_sid = e2e.sid("CA")
            _response, twiml = await a.voice(call_sid)
            warm_session = await e2e.agent_session(oai, 0)
            twiml.stream_url = twiml.stream_url.replace(str(a.port), str(b.port))
            fake = await b.connect(call_sid, twiml)
            await fake.wait_for(lambda f: f.audio_ms >= GREETING_MS)
            assert len(oai.sessions) == 2
            await warm_session.wait_closed(timeout=5.0)
            await fake.hang_up()
            record = await b.wait_record(call_sid, "completed")
        assert not record.warm_start
        assert a.metrics.warm_starts["expired"] == 1 and b.metrics.warm_starts["claimed"] == 0


async def test_local_agents_start_cold_unless_asked(start_relay, make_config):
    cfg = make_config(
        agents={
            "coldparrot": {"type": "parrot", "greeting": True},
            "warmparrot": {"type": "parrot", "greeting": True, "warm_start": True},
        },
        numbers={"+15550001111": "warmparrot", "+15550002222": "coldparrot"},
    )
    relay_ = await start_relay(cfg)
    with trio.fail_after(10):
        cold = await relay_.dial(to="+15550002222")
        warm = await relay_.dial(to="+15550001111")
        for fake in (cold, warm):
            await fake.wait_for(lambda f: f.audio_ms > 300)  # the greeting chime
            await fake.hang_up()
        assert not (await relay_.wait_record(cold.call_sid, "completed")).warm_start
        assert (await relay_.wait_record(warm.call_sid, "completed")).warm_start
    assert dict(relay_.metrics.warm_starts) == {"started": 1, "claimed": 1}
