"""End to end with ElevenLabs Agents: a real relay on loopback, a fake Twilio (conftest) or
the built-in simulator, and tests/fake_elevenlabs.py as the agent. Real sockets throughout."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest
import trio
from agent_harness import keep_talking, random_ulaw
from fake_elevenlabs import AGENT_ID, fake_elevenlabs_server, tone

from relay.sim import speech
from relay.sim.simulator import simulate


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[int(np.argmax(spectrum))])


def eleven_agent(server: Any, **extra: Any) -> dict[str, Any]:
    """An ``[agents.<name>]`` table for an elevenlabs agent talking to the fake."""
    return {
        "type": "elevenlabs",
        "url": server.url,
        "agent_id": AGENT_ID,
        "api_key": server.api_key or "",
        "connect_timeout_s": 5.0,
        **extra,
    }


async def el_relay(start_relay, make_config, server, *, media=None, **extra):
    cfg = make_config(
        agents={"el": eleven_agent(server, **extra)},
        default_agent="el",
        media=media or {},
    )
    return await start_relay(cfg)


@pytest.mark.parametrize("reactor", [True, False], ids=["reactor", "task-per-socket"])
async def test_greeting_first_and_ulaw_passthrough_byte_identical(
    start_relay, make_config, reactor
):
    """ulaw_8000 both ways: the greeting plays first, untouched; caller audio reaches the
    agent byte for byte (Twilio's base64 straight into user_audio_chunk); replies too. The
    agent's pings are answered all along."""
    with trio.fail_after(15):
        async with fake_elevenlabs_server(ping_interval_s=0.1, ping_deadline_s=0.5) as server:
            relay_ = await el_relay(
                start_relay,
                make_config,
                server,
                greeting="Thanks for calling.",
                media={"reactor": reactor},
            )
            fake = await relay_.dial()
            conv = await server.wait_for_conversation()
            greeting = tone(400, "ulaw_8000")
            await fake.wait_for(lambda f: len(f.audio) >= len(greeting))
            assert fake.media_sent == 0  # the agent spoke first
            assert fake.audio == greeting
            override = conv.init["conversation_config_override"]  # type: ignore[index]
            assert override["agent"]["first_message"] == "Thanks for calling."

            caller = random_ulaw(1000, seed=11)
            await fake.send_media(caller)
            await conv.wait_for(lambda c: len(c.audio_in) >= len(caller))
            assert bytes(conv.audio_in) == caller

            reply = random_ulaw(730, seed=12)
            await conv.send_reply(audio=reply, chunk_ms=30)
            await fake.wait_for(lambda f: len(f.audio) >= len(greeting) + len(reply))
            assert fake.audio == greeting + reply
            await trio.sleep(0.5)  # a few more pings
            assert len(conv.pongs) >= 5 and not conv.refused and not conv.closed
            await fake.hang_up()
            await conv.wait_closed()
            await relay_.wait_idle()
            record = relay_.records(fake.call_sid)
            assert record.end_reason == "caller hung up"
            assert record.first_agent_audio_ms is not None
            assert not relay_.metrics.errors


async def test_pcm_16000_is_resampled_both_ways(start_relay, make_config):
    """An agent set to pcm_16000: the formats are known only after connect, and the
    engine resamples μ-law 8 kHz <-> PCM16 16 kHz (frequency and duration preserved)."""
    with trio.fail_after(15):
        async with fake_elevenlabs_server(
            input_format="pcm_16000", output_format="pcm_16000"
        ) as server:
            relay_ = await el_relay(start_relay, make_config, server)
            fake = await relay_.dial()
            conv = await server.wait_for_conversation()
            t = np.arange(8000) / 8000
            caller = speech.mulaw_encode((np.sin(2 * np.pi * 400 * t) * 9000).astype("<i2"))
            await fake.send_media(caller)
            await conv.wait_for(lambda c: len(c.audio_in) >= 2 * 16000 - 200)
            got = np.frombuffer(bytes(conv.audio_in), dtype="<i2").astype(np.float64)
            assert abs(len(got) - 16000) < 100
            assert abs(peak_hz(got, 16000) - 400) <= 2

            await conv.send_reply(audio=tone(1000, "pcm_16000", hz=1000.0), chunk_ms=35)
            await fake.wait_for(lambda f: len(f.audio) >= 8000 - 50)
            await trio.sleep(0.2)
            assert 8000 - 50 <= len(fake.audio) <= 8000
            heard = speech.mulaw_decode(fake.audio).astype(np.float64)
            assert abs(peak_hz(heard, 8000) - 1000) <= 2
            await fake.hang_up()
            await relay_.wait_idle()


async def test_barge_in_clears_and_no_stale_audio_follows(start_relay, make_config, nursery):
    """The caller talks over a long reply: clear at once; audio of the interrupted reply
    still arriving (same event_id, or older) never reaches Twilio; the next reply does."""
    with trio.fail_after(15):
        async with fake_elevenlabs_server() as server:
            relay_ = await el_relay(start_relay, make_config, server)
            fake = await relay_.dial()
            conv = await server.wait_for_conversation()
            eid = conv.next_event_id()
            nursery.start_soon(
                lambda: conv.send_reply(3000, event_id=eid, chunk_ms=100, pace_s=0.05)
            )
            await fake.wait_for(lambda f: f.played_ms >= 600)
            await conv.interrupt(eid, cancel=True)
            await fake.wait_for(lambda f: len(f.clears) == 1)
            clear_at = fake.received.index(fake.clears[0])
            await conv.send_audio(b"\x55" * 800, eid)  # stale, in flight
            await conv.send_audio(b"\x66" * 800, eid - 1)
            await trio.sleep(0.3)
            assert [r for r in fake.received[clear_at + 1 :] if r.event == "media"] == []
            fresh = random_ulaw(300, seed=13)
            await conv.send_reply(audio=fresh)
            await fake.wait_for(
                lambda f: sum(1 for r in f.received[clear_at + 1 :] if r.event == "media") >= 3
            )
            await trio.sleep(0.2)
            after = b"".join(
                base64.b64decode(r.msg["media"]["payload"])
                for r in fake.received[clear_at + 1 :]
                if r.event == "media"
            )
            assert after == fresh
            (barge,) = relay_.records(fake.call_sid).barge_ins
            assert barge["response_id"] == f"ev{eid}" and barge["dropped_ms"] > 0
            assert relay_.metrics.barge_ins == 1
            await fake.hang_up()
            await relay_.wait_idle()


async def test_tool_round_trip_and_transcripts_in_the_record(start_relay, make_config):
    with trio.fail_after(10):
        async with fake_elevenlabs_server() as server:
            relay_ = await el_relay(start_relay, make_config, server, tools=["get_time"])
            fake = await relay_.dial()
            conv = await server.wait_for_conversation()
            await conv.user_transcript("what time is it", tentative=True)
            await conv.user_transcript("What time is it?")
            call_id = await conv.tool_call("get_time", {"timezone": "UTC"})
            await conv.wait_for(lambda c: len(c.tool_results) == 1)
            (result,) = conv.tool_results
            assert result["tool_call_id"] == call_id and result["is_error"] is False
            assert '"timezone":"UTC"' in result["result"] and '"iso"' in result["result"]
            await conv.send_reply(200, transcript="It is noon in UTC.")
            await fake.wait_for(lambda f: f.audio_ms >= 200)
            await fake.hang_up()
            await relay_.wait_idle()
            record = relay_.records(fake.call_sid)
            assert [(t["role"], t["text"]) for t in record.transcript] == [
                ("caller", "What time is it?"),
                ("agent", "It is noon in UTC."),
            ]
            (tool,) = record.tool_calls
            assert tool["name"] == "get_time" and tool["call_id"] == call_id
            assert not conv.refused


async def test_dtmf_is_recorded_only(start_relay, make_config):
    """The Agents API has no DTMF message: the digit is recorded, nothing is sent."""
    with trio.fail_after(10):
        async with fake_elevenlabs_server() as server:
            relay_ = await el_relay(start_relay, make_config, server)
            fake = await relay_.dial()
            conv = await server.wait_for_conversation()
            await fake.send_dtmf("5")
            await relay_.wait_until(lambda: relay_.records(fake.call_sid).dtmf == ["5"])
            await trio.sleep(0.1)
            assert [m.get("type") for m in conv.received] == ["conversation_initiation_client_data"]
            await fake.hang_up()
            await relay_.wait_idle()


async def test_agent_ending_the_conversation_hangs_up_after_the_last_word(start_relay, make_config):
    with trio.fail_after(10):
        async with fake_elevenlabs_server() as server:
            relay_ = await el_relay(start_relay, make_config, server)
            fake = await relay_.dial()
            conv = await server.wait_for_conversation()
            goodbye = random_ulaw(500, seed=14)
            await conv.send_reply(audio=goodbye, transcript="Goodbye!")
            await conv.close(1000, "conversation ended by agent")
            closed = await fake.wait_closed()
            assert closed.code == 1000 and fake.audio == goodbye
            played = [t for t, _, gone in fake.echoes if not gone]
            assert fake.closed_at >= played[-1]  # after the last mark
            await relay_.wait_idle()
            assert relay_.records(fake.call_sid).end_reason == "agent ended"
            assert not relay_.metrics.errors


@pytest.mark.parametrize("how", ["drop", "stall"])
async def test_dead_agent_ends_the_call_within_seconds(start_relay, make_config, nursery, how):
    """The agent's TCP dies, or it stops reading and sending (no FIN): the call ends with
    "agent disconnected" within 5 s, after playing what was buffered."""
    with trio.fail_after(15):
        async with fake_elevenlabs_server(ping_interval_s=0) as server:
            relay_ = await el_relay(
                start_relay, make_config, server, ping_interval_s=0.25, dead_after_s=1.5
            )
            fake = await relay_.dial()
            conv = await server.wait_for_conversation()
            nursery.start_soon(keep_talking, fake)
            await conv.send_reply(300)
            await fake.wait_for(lambda f: f.audio_ms >= 300)
            t0 = trio.current_time()
            if how == "drop":
                await conv.abort()
            else:
                conv.stall()
            closed = await fake.wait_closed(8)
            assert trio.current_time() - t0 < 5.0
            assert closed.code == 1000
            await relay_.wait_idle()
            record = relay_.records(fake.call_sid)
            assert record.end_reason == "agent disconnected"
            assert relay_.metrics.errors.get("agent_disconnected", 0) == 1


async def test_simulated_call(start_relay, make_config):
    """relay.sim.simulator (an independent Twilio) against an auto-replying agent."""
    with trio.fail_after(20):
        async with fake_elevenlabs_server(auto_reply_after_ms=1000, reply_ms=500) as server:
            relay_ = await el_relay(start_relay, make_config, server, greeting="Hi there.")
            caller = speech.make_script([("silence", 0.3), ("speech", 1.0), ("silence", 2.0)])
            (result,) = await simulate(
                relay_.base_url, relay_.cfg.twilio.auth_token, calls=1, duration_s=3.3, audio=caller
            )
            assert result.ok, result.outcome
            assert result.invalid_messages == result.binary_frames == 0
            assert result.marks_received == result.media_received > 0
            assert result.heard_ms >= 400 + 400  # the greeting and at least part of a reply
            await relay_.wait_idle()
            record = relay_.records(result.call_sid)
            assert record.end_reason == "caller hung up"
            roles = [t["role"] for t in record.transcript]
            assert "agent" in roles and "caller" in roles
            assert not server.conversations[0].refused
