"""relay.agents.deepgram: the Trio adapter against tests/fake_deepgram.py over loopback:
Settings, binary passthrough audio, barge-in, function calls (cancellation included),
KeepAlive, errors, liveness and recovery (a new session seeded with the conversation)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import trio
from agent_harness import has, running
from fake_deepgram import agent_config, fake_deepgram_server
from fake_openai import silent_server, tone

from relay.agents.base import (
    AgentAudio,
    AgentErrorEvent,
    AgentHangup,
    AgentResponseDone,
    AgentSpeechStarted,
    AgentToolCall,
    AgentTranscript,
    AudioFormat,
    CallInfo,
)
from relay.agents.deepgram import DeepgramAgent
from relay.errors import AgentError, ConfigError

CALL = CallInfo(call_sid="CA123", stream_sid="MZ456")
FAST = {"ping_interval_s": 0.2, "dead_after_s": 1.0}


def make_agent(server: Any, **extra: Any) -> DeepgramAgent:
    return DeepgramAgent.from_config(
        {k: v for k, v in agent_config(server, **extra).items() if k != "type"}
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- connect -------------------------------------------------------------------------------------
async def test_connect_sends_settings_and_waits_for_settings_applied() -> None:
    with trio.fail_after(5):
        async with fake_deepgram_server(greeting_ms=0) as server:
            agent = make_agent(
                server,
                instructions="Be brief.",
                greeting="Hello!",
                voice="aura-2-orion-en",
                think_provider="anthropic",
                think_model="claude-3-5-haiku-latest",
                tools=["get_time"],
            )
            await agent.connect(CALL)
            session = await server.wait_for_session()
            assert server.peers[0].headers["authorization"] == f"Token {server.api_key}"
            assert session.input_format == "mulaw@8000"
            assert session.output_format == "mulaw@8000/none"
            agent_cfg = session.settings["agent"]
            assert agent_cfg["think"]["prompt"] == "Be brief."
            assert agent_cfg["think"]["provider"] == {
                "type": "anthropic",
                "model": "claude-3-5-haiku-latest",
            }
            assert agent_cfg["speak"]["provider"]["model"] == "aura-2-orion-en"
            assert [f["name"] for f in agent_cfg["think"]["functions"]] == ["get_time"]
            assert agent_cfg["greeting"] == "Hello!"
            assert agent.protocol.request_id == "req-0000"
            assert agent.input_format == agent.output_format == AudioFormat("mulaw", 8000)
            agent.send_audio_b64(b64(b"\xff" * 160))
            await session.wait_for(lambda s: s.audio_frames == 1)
            assert not session.refusals
            await agent.aclose()
            await agent.aclose()


async def test_refusals_fail_connect() -> None:
    with trio.fail_after(8):
        async with fake_deepgram_server() as server:
            agent = make_agent(server, api_key="dg-wrong-SECRET-key")
            with pytest.raises(AgentError) as info:
                await agent.connect(CALL)
            assert info.value.kind == "agent_connect" and "401" in str(info.value)
            assert "SECRET" not in str(info.value) and "SECRET" not in repr(agent)
        async with fake_deepgram_server(reject_settings="unknown think provider") as server:
            with pytest.raises(AgentError) as info:
                await make_agent(server).connect(CALL)
            assert info.value.kind == "agent_session" and "INVALID_SETTINGS" in str(info.value)
        async with silent_server() as url:
            agent = DeepgramAgent.from_config(
                {"url": url, "api_key": "dg-0123456789", "connect_timeout_s": 0.3}
            )
            with pytest.raises(AgentError) as info:
                await agent.connect(CALL)
            assert info.value.kind == "agent_connect_timeout"


# --- audio -------------------------------------------------------------------------------------
async def test_greeting_and_binary_passthrough_both_ways() -> None:
    with trio.fail_after(5):
        async with fake_deepgram_server(greeting_ms=300) as server:
            agent = make_agent(server, greeting="Thanks for calling.")
            await agent.connect(CALL)
            session = await server.wait_for_session()
            async with running(agent) as got:
                await got.wait_for(has(AgentResponseDone))
                assert got.audio() == tone(300, "pcmu", server.options.tone_hz)
                assert got.of(AgentTranscript) == [AgentTranscript("agent", "Thanks for calling.")]
                caller = bytes(range(256)) * 5
                frames = [caller[i : i + 160] for i in range(0, 1280, 160)]
                agent.send_audio_b64(b64(frames[0]))
                agent.send_audio_b64_many([b64(f) for f in frames[1:]])  # one binary frame
                await session.wait_for(lambda s: len(s.audio_in) >= 1280)
                assert bytes(session.audio_in) == caller[:1280]
                assert session.audio_frames == 2
                agent.send_audio_b64("not base64!")  # a hostile payload is dropped
                assert agent.bad_payloads == 1
                reply = bytes(range(200)) * 4
                await session.send_response(audio=reply, chunk_ms=30)
                await got.wait_for(has(AgentResponseDone, 2))
                assert got.audio("1:1") == reply
                assert not session.refusals


async def test_barge_in_starts_a_new_reply() -> None:
    with trio.fail_after(5):
        async with fake_deepgram_server(greeting_ms=0) as server:
            agent = make_agent(server)
            await agent.connect(CALL)
            session = await server.wait_for_session()
            async with running(agent) as got:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lambda: session.send_response(3000, pace_s=0.02))
                    await got.wait_for(lambda ev: len(got.audio()) >= 800)
                    await session.user_started_speaking()
                await got.wait_for(has(AgentSpeechStarted))
                interrupted = got.of(AgentAudio)[0].response_id
                await session.send_response(audio=b"\x05" * 160)
                await got.wait_for(has(AgentResponseDone))
                after = got.events[[type(e) for e in got.events].index(AgentSpeechStarted) :]
                assert all(e.response_id != interrupted for e in after if isinstance(e, AgentAudio))
                assert got.audio(got.of(AgentResponseDone)[0].response_id) == b"\x05" * 160


# --- tools -------------------------------------------------------------------------------------
async def test_function_call_round_trip_and_cancellation() -> None:
    with trio.fail_after(5):
        async with fake_deepgram_server(greeting_ms=0, tool_followup_ms=200) as server:
            agent = make_agent(server, tools=["get_time"])
            await agent.connect(CALL)
            session = await server.wait_for_session()
            async with running(agent) as got:
                call_id = await session.function_call("get_time", {"timezone": "UTC"})
                await session.function_call("server_thing", {}, client_side=False)
                await got.wait_for(has(AgentToolCall))
                (call,) = got.of(AgentToolCall)
                assert call.call_id == call_id and json.loads(call.arguments) == {"timezone": "UTC"}
                assert agent.tools is not None
                agent.send_tool_result(call_id, await agent.tools.call(call.name, call.arguments))
                await session.wait_for(lambda s: len(s.function_responses) == 1)
                assert session.function_responses[0]["name"] == "get_time"
                await got.wait_for(has(AgentResponseDone))  # the follow-up response
                # a cancelled call is never answered
                cancelled = await session.function_call("get_time", {})
                await got.wait_for(has(AgentToolCall, 2))
                await session.cancel_function_call(cancelled)
                await trio.sleep(0.1)
                agent.send_tool_result(cancelled, "{}")
                agent.send_tool_result("fc_unknown", "{}")
                await trio.sleep(0.1)
                assert not session.late_responses and not session.refusals
                assert len(got.of(AgentToolCall)) == 2


async def test_keepalive_while_no_audio_flows() -> None:
    """The fake closes a session that hears neither audio nor KeepAlive for 0.6 s; with
    keepalive_s 0.2 the session stays up while the caller is silent."""
    with trio.fail_after(6):
        async with fake_deepgram_server(greeting_ms=0, idle_timeout_s=0.6) as server:
            agent = make_agent(server, keepalive_s=0.2, ping_interval_s=0.1)
            await agent.connect(CALL)
            session = await server.wait_for_session()
            async with running(agent) as got:
                for _ in range(25):  # audio flows: no KeepAlive needed
                    agent.send_audio_b64(b64(b"\xff" * 160))
                    await trio.sleep(0.02)
                assert session.keepalives == 0
                await trio.sleep(1.5)  # silence
                assert session.keepalives >= 4 and not session.refusals and not session.closed
                assert got.error is None and got.run_error is None
                assert agent.keepalives_sent >= session.keepalives


async def test_error_ends_warning_does_not() -> None:
    with trio.fail_after(5):
        async with fake_deepgram_server(greeting_ms=0) as server:
            agent = make_agent(server, reconnect=True)
            await agent.connect(CALL)
            session = await server.wait_for_session()
            async with running(agent) as got:
                await session.send_warning("SLOW_THINK", "the model is slow")
                await got.wait_for(has(AgentErrorEvent))
                assert got.of(AgentErrorEvent) == [
                    AgentErrorEvent("SLOW_THINK", "the model is slow", fatal=False)
                ]
                await session.send_error("FAILED_TO_SPEAK", "tts down")
                await session.peer.close(1000)
                await got.wait_for(has(AgentHangup))
                assert got.of(AgentHangup) == [AgentHangup("agent error: FAILED_TO_SPEAK")]
                with trio.fail_after(2):
                    while got.error is None:
                        await trio.sleep(0.01)
                assert len(server.sessions) == 1  # an Error is final: no reconnect


# --- liveness and recovery -------------------------------------------------------------------
async def test_stalled_agent_is_noticed_within_dead_after() -> None:
    with trio.fail_after(6):
        async with fake_deepgram_server(greeting_ms=0) as server:
            agent = make_agent(server, **FAST)
            await agent.connect(CALL)
            session = await server.wait_for_session()
            async with running(agent) as got:
                await trio.sleep(0.5)
                t0 = trio.current_time()
                session.peer.vanish()
                while got.run_error is None:
                    await trio.sleep(0.02)  # nobody speaks: pings alone tell
                assert isinstance(got.run_error, AgentError)
                assert got.run_error.kind == "agent_disconnected"
                assert trio.current_time() - t0 < 1.0 + 0.5


async def test_reconnect_opens_a_seeded_session() -> None:
    with trio.fail_after(8):
        async with fake_deepgram_server(greeting_ms=200) as server:
            agent = make_agent(
                server, reconnect=True, greeting="Welcome!", instructions="Be kind.", **FAST
            )
            await agent.connect(CALL)
            first = await server.wait_for_session()
            assert agent.reactor_socket() is None
            async with running(agent) as got:
                await got.wait_for(has(AgentResponseDone))
                await first.user_text("I need a taxi.")
                await first.send_response(100, transcript="Where to?")
                await got.wait_for(has(AgentResponseDone, 2))
                async with trio.open_nursery() as nursery:  # dropped mid-answer
                    nursery.start_soon(lambda: first.send_response(2000, pace_s=0.02))
                    await got.wait_for(lambda ev: len(got.audio("1:2")) >= 400)
                    await first.peer.abort()
                for _ in range(10):  # audio during the gap: dropped, never an error
                    agent.send_audio_b64(b64(b"\x7f" * 160))
                    await trio.sleep(0.01)
                second = await server.wait_for_session(1)
                assert second.prompt.startswith("Be kind.\n\n")
                assert "Caller: I need a taxi." in second.prompt
                assert "Agent: Where to?" in second.prompt
                assert "greeting" not in second.settings["agent"]
                await got.wait_for(has(AgentResponseDone, 3))  # the cut-off reply ended
                agent.send_audio_b64(b64(b"\x01" * 160))
                await second.wait_for(lambda s: bytes(s.audio_in).endswith(b"\x01" * 160))
                await second.send_response(audio=b"\x03" * 240)
                await got.wait_for(lambda ev: got.audio("2:0") == b"\x03" * 240)
                assert got.error is None and got.run_error is None
                assert agent.reconnects == 1 and not second.refusals


# --- configuration -----------------------------------------------------------------------------
def test_from_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPGRAM_API_KEY", "dg-from-env-0000000000wxyz")
    agent = DeepgramAgent.from_config(
        {
            "type": "deepgram",
            "name": "support",
            "think": '{"provider": {"type": "groq", "model": "llama"}}',
            "speak_model": "aura-2-luna-en",
            "voice": "ignored-when-speak_model-is-set",
            "keepalive_s": "5",
            "dead_after_s": 3,
            "reconnect": True,
            "tools": [{"name": "lookup", "url": "https://api.example.com/x"}],
        }
    )
    o = agent.options
    assert o.api_key == "dg-from-env-0000000000wxyz" and o.url.startswith("wss://agent.deepgram")
    assert o.think == {"provider": {"type": "groq", "model": "llama"}}
    assert o.speak_model == "aura-2-luna-en" and o.keepalive_s == 5.0
    assert agent.liveness.idle_keepalive_s == 5.0 and agent.liveness.dead_after_s == 3.0
    assert agent.reconnect and agent.tools is not None and agent.tools.names() == ["lookup"]
    assert "wxyz" in repr(agent) and "from-env" not in repr(agent)
    assert DeepgramAgent.from_config({"voice": "aura-2-x-en"}).options.speak_model == "aura-2-x-en"
    monkeypatch.delenv("DEEPGRAM_API_KEY")
    for options, key in [
        ({}, "api_key"),
        ({"api_key": "k", "keepalive_s": 0}, "keepalive_s"),
        ({"api_key": "k", "think": "nope"}, "think"),
        ({"api_key": "k", "speek": {}}, "speek"),
        ({"api_key": "k", "ping_interval_s": -1}, "ping_interval_s"),
    ]:
        with pytest.raises(ConfigError) as info:
            DeepgramAgent.from_config(options)
        assert key in str(info.value), (options, str(info.value))


def test_registry_creates_deepgram_agent() -> None:
    from relay.agents.registry import create_agent

    assert isinstance(create_agent({"type": "deepgram", "api_key": "dg-x-0000"}), DeepgramAgent)


async def test_fake_closes_a_client_that_stops_answering_pings() -> None:
    """The fakes refuse what the real services refuse: a client that no longer answers
    the server's pings is closed (1011). The relay's connection answers them all along."""
    from relay.media import websocket

    with trio.fail_after(6):
        async with fake_deepgram_server(
            greeting_ms=0, ping_interval_s=0.1, pong_timeout_s=0.5
        ) as server:
            agent = make_agent(server)
            await agent.connect(CALL)
            async with running(agent) as got:
                peer = server.peers[0]
                # several pings answered (however slow the machine), none timed out
                while peer.pings_sent < 3:
                    await trio.sleep(0.05)
                assert peer.ping_timeouts == 0 and not peer.closed
                assert got.error is None
                deaf = await websocket.connect(
                    server.url, [("Authorization", f"Token {server.api_key}")]
                )
                try:
                    await server.wait_for(lambda: len(server.peers) == 2 and server.peers[1].closed)
                    assert server.peers[1].ping_timeouts == 1
                    assert server.peers[1].close_code == 1011
                finally:
                    await trio.aclose_forcefully(deaf.stream)
