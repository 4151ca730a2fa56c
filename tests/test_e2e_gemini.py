"""End to end with Gemini Live: a real relay on loopback, a fake Twilio (conftest) or the
built-in simulator, and tests/fake_gemini.py as the agent. Real sockets throughout.

Gemini hears PCM16 16 kHz and speaks PCM16 24 kHz: every call here goes through the
engine's resampler both ways, and the fake refuses any other rate."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest
import trio
from fake_gemini import fake_gemini_server

from relay.errors import ConnectionClosed
from relay.sim import speech
from relay.sim.simulator import simulate


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[int(np.argmax(spectrum))])


def ulaw_tone(ms: int, hz: float, amplitude: float = 9000.0) -> bytes:
    t = np.arange(8 * ms) / 8000
    return speech.mulaw_encode((np.sin(2 * np.pi * hz * t) * amplitude).astype("<i2"))


async def keep_talking(fake: Any, ms: int = 10_000) -> None:
    """The caller talks in real time until the call ends (as on a real line)."""
    try:
        await fake.send_media(ulaw_tone(ms, 300.0), realtime=True)
    except ConnectionClosed:
        pass


def gemini_agent(server: Any, **extra: Any) -> dict[str, Any]:
    """An ``[agents.<name>]`` table for a gemini agent talking to the fake."""
    return {
        "type": "gemini",
        "url": server.url,
        "api_key": server.api_key,
        "connect_timeout_s": 5.0,
        "reconnect_timeout_s": 3.0,
        **extra,
    }


async def gemini_relay(start_relay, make_config, server, *, media=None, **extra):
    cfg = make_config(
        agents={"gem": gemini_agent(server, **extra)}, default_agent="gem", media=media or {}
    )
    return await start_relay(cfg)


def media_after(fake: Any, index: int) -> bytes:
    return b"".join(
        base64.b64decode(r.msg["media"]["payload"])
        for r in fake.received[index + 1 :]
        if r.event == "media"
    )


async def test_greeting_first_and_resampled_audio_both_ways(start_relay, make_config):
    """The greeting (a clientContent turn) is answered and heard first; the caller's μ-law
    reaches Gemini as PCM16 16 kHz (what the fake accepts), Gemini's 24 kHz comes back as
    μ-law 8 kHz of the same pitch and length."""
    with trio.fail_after(15):
        async with fake_gemini_server(reply_ms=1000, tone_hz=1000.0, setup_delay_s=0.1) as server:
            relay_ = await gemini_relay(
                start_relay, make_config, server, greeting="Thanks for calling.", voice="Puck"
            )
            fake = await relay_.dial()
            conn = await server.wait_for_connection()
            await fake.wait_for(lambda f: f.audio_ms >= 990)
            assert fake.media_sent == 0  # the agent spoke first
            await trio.sleep(0.2)
            assert 8000 - 50 <= len(fake.audio) <= 8000
            heard = speech.mulaw_decode(fake.audio).astype(np.float64)
            assert abs(peak_hz(heard, 8000) - 1000.0) <= 2
            (turn,) = conn.session.client_turns  # type: ignore[union-attr]
            assert "Thanks for calling." in turn["turns"][0]["parts"][0]["text"]

            await fake.send_media(ulaw_tone(1000, 400.0))
            await conn.wait_for(lambda c: len(c.audio_in) >= 2 * 16000 - 200)
            got = np.frombuffer(bytes(conn.audio_in), dtype="<i2").astype(np.float64)
            assert abs(len(got) - 16000) < 100
            assert abs(peak_hz(got, 16000) - 400.0) <= 2
            assert not conn.refused  # right mime type and rate, nothing before setupComplete
            await fake.hang_up()
            await conn.wait_closed()
            await relay_.wait_idle()
            assert relay_.records(fake.call_sid).end_reason == "caller hung up"
            assert not relay_.metrics.errors


async def test_barge_in_clears_and_drops_the_rest_of_the_turn(start_relay, make_config, nursery):
    with trio.fail_after(15):
        async with fake_gemini_server() as server:
            relay_ = await gemini_relay(start_relay, make_config, server)
            fake = await relay_.dial()
            conn = await server.wait_for_connection()
            nursery.start_soon(lambda: conn.send_turn(3000, chunk_ms=100, pace_s=0.05))
            await fake.wait_for(lambda f: f.played_ms >= 600)
            await conn.interrupt(stale_ms=500)  # interrupted, stale audio, turnComplete
            await fake.wait_for(lambda f: len(f.clears) == 1)
            clear_at = fake.received.index(fake.clears[0])
            await trio.sleep(0.3)
            assert media_after(fake, clear_at) == b""
            await conn.send_turn(300)
            await fake.wait_for(lambda f: len(media_after(f, clear_at)) >= 2400 - 50)
            await trio.sleep(0.2)
            assert len(media_after(fake, clear_at)) <= 2400  # the new turn only
            (barge,) = relay_.records(fake.call_sid).barge_ins
            assert barge["response_id"] == "turn1" and barge["dropped_ms"] > 0
            await fake.hang_up()
            await relay_.wait_idle()


async def test_tool_round_trip_and_transcripts_in_the_record(start_relay, make_config):
    with trio.fail_after(10):
        async with fake_gemini_server(reply_ms=200) as server:
            relay_ = await gemini_relay(start_relay, make_config, server, tools=["get_time"])
            fake = await relay_.dial()
            conn = await server.wait_for_connection()
            assert conn.setup is not None
            (decl,) = conn.setup["tools"][0]["functionDeclarations"]
            assert decl["name"] == "get_time"
            await conn.input_transcription("What time is it?")
            call_id = await conn.tool_call("get_time", {"timezone": "UTC"})
            # the fake answers a tool response with a 200 ms turn
            await fake.wait_for(lambda f: f.audio_ms >= 190)
            assert conn.session is not None
            (response,) = conn.session.tool_responses
            assert response["id"] == call_id and response["name"] == "get_time"
            assert response["response"]["timezone"] == "UTC" and "iso" in response["response"]
            await trio.sleep(0.1)
            await fake.hang_up()
            await relay_.wait_idle()
            record = relay_.records(fake.call_sid)
            assert [(t["role"], t["text"]) for t in record.transcript] == [
                ("caller", "What time is it?"),
                ("agent", "Hello from the fake Gemini."),
            ]
            assert [t["call_id"] for t in record.tool_calls] == [call_id]
            assert not conn.refused


async def test_go_away_resumes_transparently(start_relay, make_config, nursery):
    """goAway: the relay resumes the session on a new connection with the latest handle;
    the caller's audio and the agent's replies keep flowing, the call does not notice."""
    with trio.fail_after(15):
        async with fake_gemini_server() as server:
            relay_ = await gemini_relay(start_relay, make_config, server)
            fake = await relay_.dial()
            conn0 = await server.wait_for_connection()
            nursery.start_soon(keep_talking, fake)
            await conn0.send_turn(200)
            await fake.wait_for(lambda f: f.audio_ms >= 190)
            handle = conn0.handles[-1]
            await conn0.go_away(1.0)
            conn1 = await server.wait_for_connection(1)
            assert conn1.resumed_from == handle and conn1.session is conn0.session
            await conn1.wait_for(lambda c: c.audio_messages >= 10)
            await conn1.send_turn(300)
            await fake.wait_for(lambda f: f.audio_ms >= 490)
            await conn0.wait_closed()
            assert not conn0.refused and not conn1.refused
            await fake.hang_up()
            await relay_.wait_idle()
            assert relay_.records(fake.call_sid).end_reason == "caller hung up"
            assert not relay_.metrics.errors


@pytest.mark.parametrize("how", ["drop", "stall"])
async def test_dead_connection_is_recovered_within_seconds(start_relay, make_config, nursery, how):
    """The agent's TCP dies, or it stops reading and sending (no FIN): the relay notices
    (at once / within dead_after_s), resumes the session, and the call goes on."""
    with trio.fail_after(15):
        async with fake_gemini_server() as server:
            relay_ = await gemini_relay(
                start_relay, make_config, server, ping_interval_s=0.25, dead_after_s=1.5
            )
            fake = await relay_.dial()
            conn0 = await server.wait_for_connection()
            nursery.start_soon(keep_talking, fake)
            await conn0.send_turn(200)
            await fake.wait_for(lambda f: f.audio_ms >= 190)
            t0 = trio.current_time()
            if how == "drop":
                await conn0.abort()
            else:
                conn0.stall()
            conn1 = await server.wait_for_connection(1, timeout=8)
            await conn1.wait_for(lambda c: c.audio_messages >= 5)
            assert trio.current_time() - t0 < 5.0
            assert conn1.resumed_from == conn0.handles[-1]
            await conn1.send_turn(300)
            await fake.wait_for(lambda f: f.audio_ms >= 490)
            assert fake.closed is None
            await fake.hang_up()
            await relay_.wait_idle()
            assert relay_.records(fake.call_sid).end_reason == "caller hung up"


async def test_stalled_connection_is_recovered_within_5_s_by_default(
    start_relay, make_config, nursery
):
    """Default liveness and recovery settings: a connection that stops reading and sending
    is noticed within 3 s and resumed on a new one, all within the issue's 5 s."""
    with trio.fail_after(15):
        async with fake_gemini_server() as server:
            table = {"type": "gemini", "url": server.url, "api_key": server.api_key}
            relay_ = await start_relay(make_config(agents={"gem": table}, default_agent="gem"))
            fake = await relay_.dial()
            conn0 = await server.wait_for_connection()
            nursery.start_soon(keep_talking, fake)
            await conn0.send_turn(200)
            await fake.wait_for(lambda f: f.audio_ms >= 190)
            t0 = trio.current_time()
            conn0.stall()
            conn1 = await server.wait_for_connection(1, timeout=8)
            await conn1.wait_for(lambda c: c.audio_messages >= 5)
            elapsed = trio.current_time() - t0
            assert elapsed < 5.0, f"recovered after {elapsed:.1f} s"
            assert conn1.resumed_from == conn0.handles[-1]
            await fake.hang_up()
            await relay_.wait_idle()
            assert relay_.records(fake.call_sid).end_reason == "caller hung up"


async def test_unrecoverable_agent_ends_the_call(start_relay, make_config, nursery):
    """The connection drops and the service refuses the session afterwards: the call ends
    cleanly with "agent disconnected" after playing what was buffered."""
    with trio.fail_after(15):
        async with fake_gemini_server() as server:
            relay_ = await gemini_relay(start_relay, make_config, server)
            fake = await relay_.dial()
            conn0 = await server.wait_for_connection()
            nursery.start_soon(keep_talking, fake)
            await conn0.send_turn(300)
            await fake.wait_for(lambda f: f.audio_ms >= 290)
            server.refuse_setup_code = 1008
            t0 = trio.current_time()
            await conn0.abort()
            closed = await fake.wait_closed(8)
            assert closed.code == 1000 and trio.current_time() - t0 < 5.0
            await relay_.wait_idle()
            assert relay_.records(fake.call_sid).end_reason == "agent disconnected"
            assert relay_.metrics.errors.get("agent_disconnected", 0) == 1


async def test_simulated_call(start_relay, make_config):
    """relay.sim.simulator (an independent Twilio) against an auto-replying agent."""
    with trio.fail_after(20):
        async with fake_gemini_server(
            auto_reply_after_ms=1000, reply_ms=500, binary_frames=True
        ) as server:
            relay_ = await gemini_relay(start_relay, make_config, server, greeting="Hi there.")
            caller = speech.make_script([("silence", 0.3), ("speech", 1.0), ("silence", 2.0)])
            (result,) = await simulate(
                relay_.base_url, relay_.cfg.twilio.auth_token, calls=1, duration_s=3.3, audio=caller
            )
            assert result.ok, result.outcome
            assert result.invalid_messages == result.binary_frames == 0
            assert result.marks_received == result.media_received > 0
            assert result.heard_ms >= 700  # the greeting and (part of) a reply, resampled
            await relay_.wait_idle()
            record = relay_.records(result.call_sid)
            assert record.end_reason == "caller hung up"
            roles = [t["role"] for t in record.transcript]
            assert "agent" in roles and "caller" in roles
            assert not server.connections[0].refused
