"""relay.agents.assemblyai: the Trio adapter against tests/fake_assemblyai.py over loopback:
connect, passthrough audio, barge-in, tools in the documented order, errors, liveness and
recovery (session.resume, then a new seeded session)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import trio
from agent_harness import has, running
from fake_assemblyai import agent_config, fake_assemblyai_server
from fake_openai import silent_server, tone

from relay.agents.assemblyai import AssemblyAIAgent
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
from relay.errors import AgentError, ConfigError, ConnectionClosed

CALL = CallInfo(call_sid="CA123", stream_sid="MZ456")
FAST = {"ping_interval_s": 0.2, "dead_after_s": 1.0}


def make_agent(server: Any, **extra: Any) -> AssemblyAIAgent:
    return AssemblyAIAgent.from_config(
        {k: v for k, v in agent_config(server, **extra).items() if k != "type"}
    )


# --- connect -------------------------------------------------------------------------------------
async def test_connect_configures_pcmu_and_waits_for_ready() -> None:
    """No audio before session.ready: connect() returns only once it arrived, so audio sent
    right after is accepted (the fake refuses early audio)."""
    with trio.fail_after(5):
        async with fake_assemblyai_server(ready_delay_s=0.2, greeting_ms=0) as server:
            agent = make_agent(server, instructions="Be brief.", voice="Ivy", greeting="Hello!")
            t0 = trio.current_time()
            await agent.connect(CALL)
            assert trio.current_time() - t0 >= 0.2
            session = await server.wait_for_session()
            peer = server.peers[0]
            assert peer.headers["authorization"] == f"Bearer {server.api_key}"
            assert session.input_format == session.output_format == "pcmu"
            assert session.config["system_prompt"] == "Be brief."
            assert session.config["greeting"] == "Hello!"
            assert session.config["output"]["voice"] == "ivy"
            assert agent.protocol.session_id == session.session_id
            assert agent.input_format == agent.output_format == AudioFormat("mulaw", 8000)
            agent.send_audio_b64(base64.b64encode(b"\xff" * 160).decode())
            await session.wait_for(lambda s: s.appends == 1)
            assert not session.refusals and not server.refusals
            await agent.aclose()
            await agent.aclose()  # idempotent
            await server.wait_for(lambda: peer.closed)
            assert session.events_of("session.end")  # a clean goodbye


async def test_wrong_key_is_refused_and_not_leaked() -> None:
    with trio.fail_after(5):
        async with fake_assemblyai_server() as server:
            agent = make_agent(server, api_key="aai-wrong-SECRET-key-9999")
            with pytest.raises(AgentError) as info:
                await agent.connect(CALL)
            assert info.value.kind == "agent_connect" and "401" in str(info.value)
            assert "SECRET" not in str(info.value) and "SECRET" not in repr(agent)


async def test_refused_configuration_fails_connect() -> None:
    with trio.fail_after(5):
        async with fake_assemblyai_server(reject_session="invalid_voice") as server:
            with pytest.raises(AgentError) as info:
                await make_agent(server).connect(CALL)
            assert info.value.kind == "agent_session" and "invalid_voice" in str(info.value)


async def test_connect_timeouts() -> None:
    with trio.fail_after(5):
        async with silent_server() as url:
            agent = AssemblyAIAgent.from_config(
                {"url": url, "api_key": "k-0123456789", "connect_timeout_s": 0.3}
            )
            with pytest.raises(AgentError) as info:
                await agent.connect(CALL)
            assert info.value.kind == "agent_connect_timeout" and "handshake" in str(info.value)
        async with fake_assemblyai_server(ready_delay_s=10) as server:
            with pytest.raises(AgentError) as info:
                # time enough for the handshake on a loaded machine: the stage under
                # test is the wait for session.ready
                await make_agent(server, connect_timeout_s=2.0).connect(CALL)
            assert info.value.kind == "agent_connect_timeout" and "session.ready" in str(info.value)


# --- audio -------------------------------------------------------------------------------------
async def test_greeting_and_passthrough_audio_both_ways() -> None:
    with trio.fail_after(5):
        async with fake_assemblyai_server(greeting_ms=300) as server:
            agent = make_agent(server, greeting="Thanks for calling.")
            await agent.connect(CALL)
            session = await server.wait_for_session()
            async with running(agent) as got:
                await got.wait_for(has(AgentResponseDone))
                assert got.audio() == tone(300, "pcmu", server.options.tone_hz)
                assert got.of(AgentTranscript) == [AgentTranscript("agent", "Thanks for calling.")]
                caller = bytes(range(256)) * 5
                payloads = [
                    base64.b64encode(caller[i : i + 160]).decode() for i in range(0, 1280, 160)
                ]
                agent.send_audio_b64(payloads[0])
                agent.send_audio_b64_many(payloads[1:])
                await session.wait_for(lambda s: len(s.audio_in) >= 1280)
                assert bytes(session.audio_in) == caller[:1280]
                # the very Twilio payload strings went into input.audio
                assert [e["audio"] for e in session.events_of("input.audio")] == payloads
                reply = bytes(range(200)) * 4
                rid = await session.send_reply(audio=reply, chunk_ms=30)
                await got.wait_for(has(AgentResponseDone, 2))
                assert got.audio(f"1:{rid}") == reply


async def test_barge_in_drops_audio_in_flight() -> None:
    with trio.fail_after(5):
        async with fake_assemblyai_server(greeting_ms=0, stale_chunks=3) as server:
            agent = make_agent(server)
            await agent.connect(CALL)
            session = await server.wait_for_session()
            async with running(agent) as got:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lambda: session.send_reply(3000, chunk_ms=100, pace_s=0.02))
                    await got.wait_for(lambda ev: len(got.audio()) >= 800)
                    await session.speech_started()
                await got.wait_for(has(AgentResponseDone))
                before = len(got.audio())
                kinds = [type(e) for e in got.events]
                assert AgentSpeechStarted in kinds
                # after the interruption, no audio of that reply came through
                done_at = kinds.index(AgentResponseDone)
                assert not any(k is AgentAudio for k in kinds[done_at:])
                # the chunks in flight before reply.done carry the interrupted reply's id,
                # which the engine has dropped at the speech event
                rids = {e.response_id for e in got.of(AgentAudio)}
                assert len(rids) == 1
                await trio.sleep(0.1)
                assert len(got.audio()) == before


# --- tools -------------------------------------------------------------------------------------
async def test_tool_result_waits_for_reply_done() -> None:
    """The engine answers at once; the adapter holds the result until the reply.done that
    follows tool.call (the fake refuses anything else), then the agent talks again."""
    with trio.fail_after(5):
        async with fake_assemblyai_server(greeting_ms=0, tool_followup_ms=200) as server:
            agent = make_agent(server, tools=["get_time"])
            await agent.connect(CALL)
            session = await server.wait_for_session()
            assert [t["name"] for t in session.config["tools"]] == ["get_time"]
            assert agent.tools is not None and "get_time" in agent.tools
            async with running(agent) as got:
                call_id = await session.tool_call("get_time", {"timezone": "UTC"})
                await got.wait_for(has(AgentToolCall))
                (call,) = got.of(AgentToolCall)
                assert (call.call_id, call.name, json.loads(call.arguments)) == (
                    call_id,
                    "get_time",
                    {"timezone": "UTC"},
                )
                output = await agent.tools.call(call.name, call.arguments)
                agent.send_tool_result(call.call_id, output)
                await session.wait_for(lambda s: len(s.tool_results) == 1)
                assert session.tool_results[0]["result"] == output
                agent.send_tool_result("no-such-call", "{}")  # never sent
                await got.wait_for(has(AgentResponseDone, 2))  # the follow-up reply
                assert not session.refusals


async def test_errors_and_session_end() -> None:
    with trio.fail_after(5):
        async with fake_assemblyai_server(greeting_ms=0) as server:
            agent = make_agent(server)
            await agent.connect(CALL)
            session = await server.wait_for_session()
            async with running(agent) as got:
                await session.send_error("unknown_call_id", "minor")
                await got.wait_for(has(AgentErrorEvent))
                assert got.of(AgentErrorEvent) == [AgentErrorEvent("unknown_call_id", "minor")]
                await session.send_error("insufficient_funds", "pay up")
                await got.wait_for(has(AgentHangup))
                assert got.of(AgentHangup) == [AgentHangup("agent error: insufficient_funds")]
                assert got.of(AgentErrorEvent)[-1].fatal


async def test_server_close_without_reconnect_ends_the_session() -> None:
    with trio.fail_after(5):
        async with fake_assemblyai_server(greeting_ms=0) as server:
            agent = make_agent(server)
            await agent.connect(CALL)
            await server.wait_for_session()
            assert agent.reactor_socket() is not None  # the reactor may read it
            async with running(agent) as got:
                await server.peers[0].abort()
                await got.wait_for(lambda ev: got.error is not None or got.run_error is not None)
                with trio.fail_after(2):
                    while got.error is None:
                        await trio.sleep(0.01)
                assert isinstance(got.error, ConnectionClosed)
                with pytest.raises(ConnectionClosed):
                    agent.send_audio_b64("AAAA")


# --- liveness and recovery -------------------------------------------------------------------
@pytest.mark.parametrize("how", ["vanish", "stall"])
async def test_dead_agent_is_noticed_within_dead_after(how: str) -> None:
    with trio.fail_after(8):
        async with fake_assemblyai_server(greeting_ms=0) as server:
            agent = make_agent(server, **FAST)
            await agent.connect(CALL)
            await server.wait_for_session()
            async with running(agent) as got:
                await trio.sleep(0.5)  # pings answered meanwhile
                assert got.run_error is None
                peer = server.peers[0]
                t0 = trio.current_time()
                peer.vanish() if how == "vanish" else peer.stall()
                while got.run_error is None:
                    agent.send_audio_b64(base64.b64encode(b"\xff" * 160).decode())
                    await trio.sleep(0.02)
                elapsed = trio.current_time() - t0
                assert isinstance(got.run_error, AgentError)
                assert got.run_error.kind == "agent_disconnected"
                assert elapsed < 1.0 + 0.5  # dead_after_s, loosely


async def test_reconnect_resumes_the_session() -> None:
    """The connection drops mid-call: session.resume on a new connection continues the
    same session; the reader never sees the gap and audio flows again."""
    with trio.fail_after(8):
        async with fake_assemblyai_server(greeting_ms=0) as server:
            agent = make_agent(server, reconnect=True, **FAST)
            await agent.connect(CALL)
            session = await server.wait_for_session()
            assert agent.reactor_socket() is None  # the socket may change: read via receive()
            async with running(agent) as got:
                await session.send_reply(200, transcript="Before the drop.")
                await got.wait_for(has(AgentResponseDone))
                await server.peers[0].abort()
                # audio during the gap is dropped, never an error
                for _ in range(20):
                    agent.send_audio_b64(base64.b64encode(b"\x7f" * 160).decode())
                    await trio.sleep(0.01)
                await session.wait_for(lambda s: s.resumes == 1 and s.connected)
                assert len(server.sessions) == 1 and session.connections == 2
                before = len(session.audio_in)
                agent.send_audio_b64(base64.b64encode(b"\x01" * 160).decode())
                await session.wait_for(lambda s: len(s.audio_in) == before + 160)
                rid = await session.send_reply(audio=b"\x02" * 400)
                await got.wait_for(lambda ev: got.audio(f"1:{rid}") == b"\x02" * 400)
                assert got.error is None and got.run_error is None
                assert agent.reconnects == 1 and agent.resumes == 1
                assert not session.refusals


async def test_refused_resume_opens_a_seeded_session() -> None:
    """The vanished connection is found dead by the watchdog; the resume is refused (the
    window is over), so a new session carries the conversation in its system prompt and
    does not greet again."""
    with trio.fail_after(10):
        async with fake_assemblyai_server(greeting_ms=200, allow_resume=False) as server:
            agent = make_agent(
                server, reconnect=True, greeting="Welcome!", instructions="Be kind.", **FAST
            )
            await agent.connect(CALL)
            first = await server.wait_for_session()
            async with running(agent) as got:
                await got.wait_for(has(AgentResponseDone))  # the greeting
                await first.user_transcript("I need a taxi to the airport.")
                await first.send_reply(100, transcript="Sure, when?")
                await got.wait_for(has(AgentResponseDone, 2))
                server.peers[0].vanish()
                second = await server.wait_for_session(1, timeout=5)
                prompt = second.config["system_prompt"]
                assert prompt.startswith("Be kind.\n\n")
                assert "Caller: I need a taxi to the airport." in prompt
                assert "Agent: Sure, when?" in prompt and "Agent: Welcome!" in prompt
                assert "greeting" not in second.config
                await second.wait_for(lambda s: s.ready)
                rid = await second.send_reply(audio=b"\x03" * 240)
                await got.wait_for(lambda ev: got.audio(f"2:{rid}") == b"\x03" * 240)
                assert got.error is None and got.run_error is None
                assert agent.reconnects == 1 and agent.resumes == 0
                assert server.rejected == [] and not second.refusals


async def test_recovery_gives_up_after_reconnect_timeout() -> None:
    with trio.fail_after(8):
        async with fake_assemblyai_server(greeting_ms=0) as server:
            agent = make_agent(server, reconnect=True, reconnect_timeout_s=1.0, **FAST)
            await agent.connect(CALL)
            await server.wait_for_session()
            server.options.reject_status = 503  # every new connection is refused
            async with running(agent) as got:
                await server.peers[0].abort()
                with trio.fail_after(4):
                    while got.error is None or got.run_error is None:
                        await trio.sleep(0.02)
                for exc in (got.error, got.run_error):
                    assert isinstance(exc, AgentError) and exc.kind == "agent_disconnected"
                assert len(server.rejected) >= 2  # it did retry
                with pytest.raises(AgentError):
                    agent.send_audio_b64("AAAA")


async def test_no_recovery_after_the_server_ended_the_session() -> None:
    with trio.fail_after(5):
        async with fake_assemblyai_server(greeting_ms=0) as server:
            agent = make_agent(server, reconnect=True)
            await agent.connect(CALL)
            session = await server.wait_for_session()
            async with running(agent) as got:
                await session.end_session()
                await got.wait_for(has(AgentHangup))
                with trio.fail_after(2):
                    while got.error is None:
                        await trio.sleep(0.01)
                assert len(server.peers) == 1  # no reconnect attempt


# --- configuration -----------------------------------------------------------------------------
def test_from_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASSEMBLYAI_API_KEY", "aai-from-env-0000000000wxyz")
    agent = AssemblyAIAgent.from_config(
        {
            "type": "assemblyai",
            "name": "support",
            "voice": "Claire",
            "greeting": "Hi",
            "connect_timeout_s": "4",
            "turn_detection": '{"vad_threshold": 0.3}',
            "tools": [
                "get_time",
                {"name": "lookup", "url": "https://api.example.com/x", "headers": {"K": "SECRETV"}},
            ],
            "ping_interval_s": 1,
            "dead_after_s": "3",
            "reconnect": "true",
            "resume": False,
        }
    )
    o = agent.options
    assert o.api_key == "aai-from-env-0000000000wxyz" and o.url.startswith(
        "wss://agents.assemblyai"
    )
    assert (o.voice, o.greeting, o.connect_timeout_s) == ("claire", "Hi", 4.0)
    assert o.turn_detection == {"vad_threshold": 0.3}
    assert [t["name"] for t in o.tools] == ["get_time", "lookup"]
    assert agent.tools is not None and agent.tools.names() == ["get_time", "lookup"]
    assert (agent.liveness.ping_interval_s, agent.liveness.dead_after_s) == (1.0, 3.0)
    assert agent.reconnect and not agent.resume
    assert "wxyz" in repr(agent) and "from-env" not in repr(agent) and "SECRETV" not in repr(agent)
    monkeypatch.delenv("ASSEMBLYAI_API_KEY")
    for options, key in [
        ({}, "api_key"),
        ({"api_key": "k", "url": "http://x"}, "url"),
        ({"api_key": "k", "connect_timeout_s": "x"}, "connect_timeout_s"),
        ({"api_key": "k", "dead_after_s": 0}, "dead_after_s"),
        ({"api_key": "k", "reconnect": "maybe"}, "reconnect"),
        ({"api_key": "k", "tools": ["nope"]}, "tools"),
        ({"api_key": "k", "voise": "ivy"}, "voise"),
        ({"api_key": "k", "turn_detection": "[1"}, "turn_detection"),
    ]:
        with pytest.raises(ConfigError) as info:
            AssemblyAIAgent.from_config(options)
        assert key in str(info.value), (options, str(info.value))


def test_registry_creates_assemblyai_agent() -> None:
    from relay.agents.registry import create_agent

    agent = create_agent({"type": "assemblyai", "api_key": "aai-x-000000000000"})
    assert isinstance(agent, AssemblyAIAgent)


async def test_send_before_connect_is_local_error() -> None:
    from relay.errors import LocalProtocolError

    agent = AssemblyAIAgent.from_config({"api_key": "k-000000"})
    with pytest.raises(LocalProtocolError):
        agent.send_audio_b64("AAAA")
    await agent.aclose()
