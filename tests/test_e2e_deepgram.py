"""End to end with the Deepgram Voice Agent API: a real relay on loopback, a fake Twilio
(conftest) or the built-in simulator, and tests/fake_deepgram.py as the agent. Real
sockets throughout."""

from __future__ import annotations

import json

import pytest
import trio
from agent_harness import keep_talking, random_ulaw
from fake_deepgram import agent_config, fake_deepgram_server
from fake_http import Request, http_server, json_reply
from fake_openai import tone

from relay.sim import speech
from relay.sim.simulator import simulate


async def dg_relay(start_relay, make_config, server, *, media=None, **extra):
    cfg = make_config(
        agents={"dg": agent_config(server, **extra)}, default_agent="dg", media=media or {}
    )
    return await start_relay(cfg)


@pytest.mark.parametrize("reactor", [True, False], ids=["reactor", "task-per-socket"])
async def test_greeting_first_and_binary_passthrough_byte_identical(
    start_relay, make_config, reactor
):
    """mulaw 8 kHz in binary frames both ways: the greeting plays first; caller audio
    reaches Deepgram byte for byte (decoded once from Twilio's base64, never as JSON); the
    agent's binary audio reaches Twilio byte for byte."""
    with trio.fail_after(15):
        async with fake_deepgram_server(greeting_ms=400) as server:
            relay_ = await dg_relay(
                start_relay,
                make_config,
                server,
                greeting="Thanks for calling.",
                media={"reactor": reactor},
            )
            fake = await relay_.dial()
            session = await server.wait_for_session()
            greeting = tone(400, "pcmu", server.options.tone_hz)
            await fake.wait_for(lambda f: len(f.audio) >= len(greeting))
            assert fake.media_sent == 0 and fake.audio == greeting
            assert session.settings["agent"]["greeting"] == "Thanks for calling."
            caller = random_ulaw(1000, seed=1)
            await fake.send_media(caller)
            await session.wait_for(lambda s: len(s.audio_in) >= len(caller))
            assert bytes(session.audio_in) == caller
            reply = random_ulaw(730, seed=2)
            await session.send_response(audio=reply, chunk_ms=30)
            await fake.wait_for(lambda f: len(f.audio) >= len(greeting) + len(reply))
            assert fake.audio == greeting + reply
            assert not session.refusals and not fake.invalid
            await fake.hang_up()
            await relay_.wait_idle()
            assert relay_.records(fake.call_sid).end_reason == "caller hung up"
            assert not relay_.metrics.errors


async def test_barge_in_clears_with_no_stale_audio_after(start_relay, make_config, nursery):
    with trio.fail_after(15):
        async with fake_deepgram_server(greeting_ms=0) as server:
            relay_ = await dg_relay(start_relay, make_config, server)
            fake = await relay_.dial()
            session = await server.wait_for_session()
            # generated faster than real time: the relay holds audio when the caller speaks
            nursery.start_soon(lambda: session.send_response(4000, pace_s=0.05))
            await fake.wait_for(lambda f: f.played_ms >= 800)
            await session.user_started_speaking()
            await fake.wait_for(lambda f: len(f.clears) == 1)
            await session.user_text("Hold on.")
            await trio.sleep(0.4)
            after = fake.received[fake.received.index(fake.clears[0]) + 1 :]
            assert not [r for r in after if r.event == "media"], "stale audio after clear"
            heard = len(fake.audio)
            reply = random_ulaw(300, seed=5)
            await session.send_response(audio=reply)
            await fake.wait_for(lambda f: len(f.audio) >= heard + len(reply))
            assert fake.audio[heard:] == reply
            assert relay_.metrics.barge_ins == 1
            (barge,) = relay_.records(fake.call_sid).barge_ins
            assert barge["heard_ms"] >= 700 and barge["dropped_ms"] > 0
            await fake.hang_up()
            await relay_.wait_idle()


async def test_function_calls_python_and_http(start_relay, make_config):
    async def respond(req: Request) -> tuple[int, bytes]:
        return json_reply({"order": req.json["order"], "status": "shipped"})

    with trio.fail_after(15):
        async with (
            http_server(respond) as api,
            fake_deepgram_server(greeting_ms=0, tool_followup_ms=200) as server,
        ):
            http_tool = {
                "name": "lookup_order",
                "description": "Find an order.",
                "url": api.url("/orders"),
                "parameters": {"type": "object", "properties": {"order": {"type": "string"}}},
                "allow_private": True,
            }
            relay_ = await dg_relay(start_relay, make_config, server, tools=["get_time", http_tool])
            fake = await relay_.dial()
            session = await server.wait_for_session()
            functions = session.settings["agent"]["think"]["functions"]
            assert [f["name"] for f in functions] == ["get_time", "lookup_order"]
            await session.function_call("lookup_order", {"order": "A-17"})
            await session.wait_for(lambda s: len(s.function_responses) == 1)
            assert json.loads(session.function_responses[0]["content"]) == {
                "order": "A-17",
                "status": "shipped",
            }
            await session.function_call("get_time", {"timezone": "UTC"})
            await session.wait_for(lambda s: len(s.function_responses) == 2)
            assert json.loads(session.function_responses[1]["content"])["timezone"] == "UTC"
            cancelled = await session.function_call("lookup_order", {"order": "B-2"})
            await session.cancel_function_call(cancelled)
            await fake.wait_for(lambda f: f.audio_ms >= 400)  # the two follow-ups
            await api.wait_for(lambda s: len(s.requests) == 2)
            await trio.sleep(0.2)
            assert not session.refusals and not session.late_responses
            await fake.hang_up()
            await relay_.wait_idle()
            names = [c["name"] for c in relay_.records(fake.call_sid).tool_calls]
            assert names[:2] == ["lookup_order", "get_time"]


async def test_transcripts_and_dtmf_in_the_call_record(start_relay, make_config):
    with trio.fail_after(15):
        async with fake_deepgram_server(greeting_ms=200) as server:
            relay_ = await dg_relay(start_relay, make_config, server, greeting="Hi there!")
            fake = await relay_.dial()
            session = await server.wait_for_session()
            await fake.wait_for(lambda f: f.audio_ms >= 200)
            await session.user_text("What are your opening hours?")
            await session.send_response(200, transcript="We open at nine.")
            await fake.wait_for(lambda f: f.audio_ms >= 400)
            await fake.send_dtmf("5")  # the API cannot take DTMF: recorded only
            await relay_.wait_until(lambda: relay_.records(fake.call_sid).dtmf == ["5"])
            await fake.hang_up()
            await relay_.wait_idle()
            record = relay_.records(fake.call_sid)
            assert [(t["role"], t["text"]) for t in record.transcript] == [
                ("agent", "Hi there!"),
                ("caller", "What are your opening hours?"),
                ("agent", "We open at nine."),
            ]
            assert not session.refusals


async def test_keepalive_keeps_a_silent_call_up(start_relay, make_config):
    """No caller audio at all (the uplink stalls): KeepAlive keeps the session that the
    fake would otherwise close after 1 s of silence."""
    with trio.fail_after(15):
        async with fake_deepgram_server(greeting_ms=0, idle_timeout_s=1.0) as server:
            relay_ = await dg_relay(
                start_relay, make_config, server, keepalive_s=0.3, ping_interval_s=0.1
            )
            fake = await relay_.dial()
            session = await server.wait_for_session()
            await trio.sleep(2.0)
            assert session.keepalives >= 3 and not session.refusals and not session.closed
            assert fake.closed is None
            await fake.hang_up()
            await relay_.wait_idle()


async def test_agent_drop_ends_the_call(start_relay, make_config):
    with trio.fail_after(15):
        async with fake_deepgram_server(greeting_ms=0) as server:
            relay_ = await dg_relay(start_relay, make_config, server)
            fake = await relay_.dial()
            session = await server.wait_for_session()
            reply = random_ulaw(500, seed=3)
            await session.send_response(audio=reply)
            await fake.wait_for(lambda f: len(f.audio) >= 100)
            await session.peer.abort()
            closed = await fake.wait_closed()
            assert closed.code == 1000 and fake.audio == reply
            await relay_.wait_idle()
            assert relay_.records(fake.call_sid).end_reason == "agent disconnected"
            assert relay_.metrics.errors["agent_disconnected"] == 1


async def test_agent_error_ends_the_call_with_its_code(start_relay, make_config):
    with trio.fail_after(15):
        async with fake_deepgram_server(greeting_ms=0) as server:
            relay_ = await dg_relay(start_relay, make_config, server)
            fake = await relay_.dial()
            session = await server.wait_for_session()
            await session.send_error("FAILED_TO_THINK", "the LLM is down")
            await fake.wait_closed()
            await relay_.wait_idle()
            assert relay_.records(fake.call_sid).end_reason == "agent error: FAILED_TO_THINK"
            assert relay_.metrics.errors["agent_error"] == 1


async def test_agent_stall_ends_the_call_within_5_s(start_relay, make_config, nursery):
    """The agent stops reading while the caller talks (its pongs stop, nothing more comes):
    default liveness (1 s pings, dead after 3 s) ends the call within 5 s."""
    with trio.fail_after(15):
        async with fake_deepgram_server(greeting_ms=0) as server:
            relay_ = await dg_relay(start_relay, make_config, server)
            fake = await relay_.dial()
            session = await server.wait_for_session()
            nursery.start_soon(keep_talking, fake)
            await session.wait_for(lambda s: s.audio_frames >= 10)
            t0 = trio.current_time()
            session.peer.stall()
            await fake.wait_closed(8)
            elapsed = trio.current_time() - t0
            assert elapsed < 4.5, f"noticed after {elapsed:.1f} s"  # 3 s + closing
            await relay_.wait_idle()
            assert relay_.records(fake.call_sid).end_reason == "agent disconnected"
            assert relay_.metrics.errors["agent_disconnected"] == 1


@pytest.mark.parametrize("how", ["abort", "vanish"])
async def test_reconnect_continues_the_call_in_a_new_session(
    start_relay, make_config, nursery, how
):
    with trio.fail_after(15):
        async with fake_deepgram_server(greeting_ms=200) as server:
            relay_ = await dg_relay(
                start_relay,
                make_config,
                server,
                reconnect=True,
                greeting="Welcome!",
                ping_interval_s=0.2,
                dead_after_s=1.0,
            )
            fake = await relay_.dial()
            first = await server.wait_for_session()
            await fake.wait_for(lambda f: f.audio_ms >= 200)
            await first.user_text("Book a table for two.")
            await first.send_response(100, transcript="For what time?")
            await fake.wait_for(lambda f: f.audio_ms >= 300)
            nursery.start_soon(keep_talking, fake)
            await first.wait_for(lambda s: s.audio_frames >= 5)
            await first.peer.abort() if how == "abort" else first.peer.vanish()
            second = await server.wait_for_session(1, timeout=5)
            assert "Caller: Book a table for two." in second.prompt
            assert "Agent: Welcome!" in second.prompt and "Agent: For what time?" in second.prompt
            assert "greeting" not in second.settings["agent"]
            await second.wait_for(lambda s: s.audio_frames >= 10)  # caller audio flows again
            heard = len(fake.audio)
            reply = random_ulaw(300, seed=4)
            await second.send_response(audio=reply)
            await fake.wait_for(lambda f: len(f.audio) >= heard + len(reply))
            assert fake.audio[heard:] == reply and fake.closed is None
            await fake.hang_up()
            await relay_.wait_idle()
            record = relay_.records(fake.call_sid)
            assert record.end_reason == "caller hung up" and not relay_.metrics.errors


async def test_simulator_call_against_the_fake(start_relay, make_config):
    with trio.fail_after(20):
        async with fake_deepgram_server(
            greeting_ms=300, auto_reply_after_ms=800, auto_reply_ms=400
        ) as server:
            relay_ = await dg_relay(start_relay, make_config, server, greeting="Hello!")
            caller = speech.make_script([("silence", 0.2), ("speech", 0.8), ("silence", 1.8)])
            (result,) = await simulate(
                relay_.base_url, relay_.cfg.twilio.auth_token, calls=1, duration_s=2.8, audio=caller
            )
            assert result.ok, result.outcome
            assert result.invalid_messages == result.binary_frames == 0
            assert result.media_received > 0 and result.marks_received == result.media_received
            assert result.heard_ms >= 300
            await relay_.wait_idle()
            record = relay_.records(result.call_sid)
            assert record.end_reason == "caller hung up"
            assert any(t["role"] == "caller" for t in record.transcript)
            assert not server.sessions[0].refusals
