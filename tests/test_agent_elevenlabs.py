"""relay.agents.elevenlabs: the Trio adapter against tests/fake_elevenlabs.py over loopback."""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from fake_elevenlabs import AGENT_ID, fake_elevenlabs_server, tone

from relay.agents.base import (
    AgentAudio,
    AgentErrorEvent,
    AgentEvent,
    AgentHangup,
    AgentSpeechStarted,
    AgentToolCall,
    AgentTranscript,
    AudioFormat,
    CallInfo,
)
from relay.agents.elevenlabs import ElevenLabsAgent, options_from_config
from relay.agents.elevenlabs_protocol import ElevenLabsOptions
from relay.agents.liveness import LivenessOptions
from relay.agents.registry import create_agent
from relay.errors import AgentError, ConfigError, ConnectionClosed

CALL = CallInfo(call_sid="CA-el-1", stream_sid="MZ-el-1", from_number="+15550001111")
FAST = LivenessOptions(ping_interval_s=0.1, dead_after_s=0.6)


def make_agent(server: Any, liveness: LivenessOptions | None = None, **kw: Any) -> ElevenLabsAgent:
    kw.setdefault("api_key", server.api_key or "")
    kw.setdefault("connect_timeout_s", 3.0)
    opts = ElevenLabsOptions(agent_id=AGENT_ID, url=server.url, **kw)
    return ElevenLabsAgent(opts, liveness=liveness or LivenessOptions())


async def collect(
    agent: ElevenLabsAgent, until: Callable[[list[AgentEvent]], bool], timeout: float = 3.0
) -> list[AgentEvent]:
    events: list[AgentEvent] = []
    with trio.fail_after(timeout):
        while not until(events):
            events += await agent.receive()
    return events


def audio_of(events: list[AgentEvent]) -> bytes:
    return b"".join(e.audio for e in events if isinstance(e, AgentAudio))


@asynccontextmanager
async def running(agent: ElevenLabsAgent) -> AsyncIterator[list[BaseException]]:
    """agent.run() in the background (as the engine does); its failure is recorded."""
    failures: list[BaseException] = []

    async def runner() -> None:
        try:
            await agent.run()
        except (AgentError, ConnectionClosed) as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner)
        try:
            yield failures
        finally:
            nursery.cancel_scope.cancel()


# --- configuration --------------------------------------------------------------------------
def test_config_requires_agent_id_and_names_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ELEVENLABS_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="agent_id"):
        options_from_config({})
    with pytest.raises(ConfigError, match="connect_timeout_s"):
        options_from_config({"agent_id": "a1", "connect_timeout_s": "soon"})
    with pytest.raises(ConfigError, match="dead_after_s"):
        options_from_config({"agent_id": "a1", "dead_after_s": -1})
    with pytest.raises(ConfigError, match="dynamic_variables"):
        options_from_config({"agent_id": "a1", "dynamic_variables": "{not json"})
    with pytest.raises(ConfigError, match="tools"):
        options_from_config({"agent_id": "a1", "tools": ["not_a_registered_tool"]})
    lookup = {"name": "lookup", "url": "https://example.com/lookup", "timeout_s": 2}
    opts, tools, liveness, _ = options_from_config(
        {
            "agent_id": "a1",
            "tools": ["get_time", lookup],
            "dead_after_s": 3,
            "ping_interval_s": 1,
        }
    )
    assert opts.tools == ("get_time", "lookup") and opts.api_key == ""
    assert tools is not None and "get_time" in tools and "lookup" in tools
    assert (liveness.ping_interval_s, liveness.dead_after_s) == (1.0, 3.0)


def test_api_key_from_environment_never_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "xi-env-secret-key-987654321"
    monkeypatch.setenv("ELEVENLABS_API_KEY", secret)
    agent = create_agent({"type": "elevenlabs", "agent_id": "a1"})
    assert isinstance(agent, ElevenLabsAgent)
    assert agent.options.api_key == secret
    assert secret not in repr(agent) and secret not in repr(agent.options)


# --- connect ----------------------------------------------------------------------------------
async def test_connect_initiation_first_then_ulaw_passthrough() -> None:
    with trio.fail_after(5):
        async with fake_elevenlabs_server() as server:
            agent = make_agent(server, instructions="Be kind.", greeting="Hello!", voice="v1")
            await agent.connect(CALL)
            conv = server.conversations[0]
            assert conv.headers["xi-api-key"] == server.api_key
            assert conv.query == {"agent_id": AGENT_ID}
            assert conv.received[0]["type"] == "conversation_initiation_client_data"
            override = conv.init["conversation_config_override"]  # type: ignore[index]
            assert override == {
                "agent": {"prompt": {"prompt": "Be kind."}, "first_message": "Hello!"},
                "tts": {"voice_id": "v1"},
            }
            assert agent.input_format == agent.output_format == AudioFormat("mulaw", 8000)
            # the greeting (first message) is spoken by the agent first
            events = await collect(agent, lambda ev: len(audio_of(ev)) >= 3200)
            assert AgentTranscript("agent", "Hello!") in events
            assert audio_of(events) == tone(400, "ulaw_8000")
            # caller audio: Twilio's base64 goes through byte for byte
            caller = bytes(range(256)) * 5
            payloads = [base64.b64encode(caller[i : i + 160]).decode() for i in range(0, 1280, 160)]
            agent.send_audio_b64(payloads[0])
            agent.send_audio_b64_many(payloads[1:])
            await conv.wait_for(lambda c: len(c.audio_in) >= 1280)
            assert bytes(conv.audio_in) == caller[:1280]
            assert conv.chunks_in == 8
            await agent.aclose()
            await conv.wait_closed()


async def test_pcm_formats_come_from_the_metadata() -> None:
    with trio.fail_after(5):
        async with fake_elevenlabs_server(
            input_format="pcm_16000", output_format="pcm_16000"
        ) as server:
            agent = make_agent(server)
            await agent.connect(CALL)
            assert agent.input_format == agent.output_format == AudioFormat("pcm16", 16000)
            agent.send_audio(b"\x01\x00" * 320)
            conv = server.conversations[0]
            await conv.wait_for(lambda c: len(c.audio_in) == 640)
            await agent.aclose()


async def test_public_agent_needs_no_key_and_private_one_refuses_without() -> None:
    with trio.fail_after(5):
        async with fake_elevenlabs_server(api_key=None) as server:
            agent = make_agent(server, api_key="")
            await agent.connect(CALL)
            assert "xi-api-key" not in server.conversations[0].headers
            await agent.aclose()
        async with fake_elevenlabs_server() as server:
            agent = make_agent(server, api_key="")
            with pytest.raises(AgentError) as info:
                await agent.connect(CALL)
            assert info.value.kind == "agent_connect"
            assert server.rejected[0]["status"] == 401


async def test_unbridgeable_format_fails_the_connect() -> None:
    with trio.fail_after(5):
        async with fake_elevenlabs_server(output_format="ulaw_8000") as server:
            server.options.output_format = "pcm_44100"
            agent = make_agent(server)
            with pytest.raises(AgentError, match="pcm_44100") as info:
                await agent.connect(CALL)
            assert info.value.kind == "agent_session"


async def test_connect_timeout_waiting_for_metadata() -> None:
    with trio.fail_after(5):
        async with fake_elevenlabs_server(send_metadata=False) as server:
            # time enough for the handshake on a loaded machine: the stage under test is
            # the wait for the metadata
            agent = make_agent(server, connect_timeout_s=2.0)
            with pytest.raises(AgentError, match="conversation_initiation_metadata") as info:
                await agent.connect(CALL)
            assert info.value.kind == "agent_connect_timeout"


# --- session ----------------------------------------------------------------------------------
async def test_pings_are_answered_so_the_session_stays_open() -> None:
    with trio.fail_after(6):
        async with fake_elevenlabs_server(ping_interval_s=0.05, ping_deadline_s=0.3) as server:
            agent = make_agent(server)
            await agent.connect(CALL)
            conv = server.conversations[0]
            async with trio.open_nursery() as nursery:

                async def read() -> None:
                    while True:
                        await agent.receive()

                nursery.start_soon(read)
                await conv.wait_for(lambda c: len(c.pongs) >= 10)
                nursery.cancel_scope.cancel()
            assert not conv.closed and not conv.refused
            assert conv.pongs == list(range(1, len(conv.pongs) + 1))
            await agent.aclose()


async def test_unanswered_pings_end_the_session_at_the_fake() -> None:
    """The fake enforces the deadline: a client that never reads gets closed (1002)."""
    with trio.fail_after(6):
        async with fake_elevenlabs_server(ping_interval_s=0.05, ping_deadline_s=0.3) as server:
            agent = make_agent(server)
            await agent.connect(CALL)
            conv = server.conversations[0]
            await conv.wait_closed(3)  # nobody calls receive(): pings pile up
            assert conv.close_code == 1002 and conv.refused == ["ping timeout"]
            await agent.aclose()


async def test_barge_in_drops_stale_audio_of_the_interrupted_reply() -> None:
    with trio.fail_after(5):
        async with fake_elevenlabs_server() as server:
            agent = make_agent(server)
            await agent.connect(CALL)
            conv = server.conversations[0]
            eid = await conv.send_reply(200)
            events = await collect(agent, lambda ev: len(audio_of(ev)) >= 1600)
            await conv.interrupt(eid)
            await conv.send_audio(b"\x11" * 160, eid)  # stale: still in flight
            await conv.send_audio(b"\x22" * 160, eid - 1)  # older still
            new = await conv.send_reply(audio=b"\x33" * 320)
            events = await collect(agent, lambda ev: len(audio_of(ev)) >= 320)
            assert AgentSpeechStarted() in events
            assert audio_of(events) == b"\x33" * 320
            assert {e.response_id for e in events if isinstance(e, AgentAudio)} == {f"ev{new}"}
            assert agent.protocol.stale_audio_dropped == 2
            await agent.aclose()


async def test_tool_round_trip_and_unknown_ids_are_never_sent() -> None:
    with trio.fail_after(5):
        async with fake_elevenlabs_server() as server:
            agent = make_agent(server)
            await agent.connect(CALL)
            conv = server.conversations[0]
            call_id = await conv.tool_call("get_time", {"timezone": "UTC"})
            events = await collect(agent, lambda ev: any(isinstance(e, AgentToolCall) for e in ev))
            (call,) = [e for e in events if isinstance(e, AgentToolCall)]
            assert (call.call_id, call.name, call.arguments) == (
                call_id,
                "get_time",
                '{"timezone":"UTC"}',
            )
            agent.send_tool_result("made-up-id", "nope")  # the fake would close on it
            agent.send_tool_result(call_id, '{"iso":"2026-01-01T00:00:00+00:00"}')
            await conv.wait_for(lambda c: len(c.tool_results) == 1)
            (result,) = conv.tool_results
            assert result["tool_call_id"] == call_id and result["is_error"] is False
            assert not conv.refused and not conv.closed
            await agent.aclose()


async def test_undefined_client_tool_is_refused_without_the_engine() -> None:
    with trio.fail_after(5):
        async with fake_elevenlabs_server() as server:
            agent = make_agent(server, tools=["get_time"])
            await agent.connect(CALL)
            conv = server.conversations[0]
            await conv.tool_call("transfer_to_human")
            events = await collect(agent, lambda ev: bool(ev))
            assert [type(e) for e in events] == [AgentErrorEvent]
            await conv.wait_for(lambda c: len(c.tool_results) == 1)
            assert conv.tool_results[0]["is_error"] is True
            await agent.aclose()


async def test_normal_close_is_a_hang_up_then_closed() -> None:
    """ElevenLabs closing with 1000 is the agent ending the conversation: the reader gets
    AgentHangup (then ConnectionClosed); run() ends quietly instead of failing the call."""
    with trio.fail_after(5):
        async with fake_elevenlabs_server() as server:
            agent = make_agent(server)
            await agent.connect(CALL)
            conv = server.conversations[0]
            async with running(agent) as failures, trio.open_nursery() as nursery:
                await conv.send_reply(100)
                nursery.start_soon(conv.close, 1000, "conversation ended")
                events = await collect(
                    agent, lambda ev: any(isinstance(e, AgentHangup) for e in ev)
                )
                assert events[-1] == AgentHangup("agent ended")
                # caller audio still arriving is dropped, not a send failure
                agent.send_audio_b64(base64.b64encode(b"\xff" * 160).decode())
                agent.send_audio(b"\x00\x00")
                with pytest.raises(ConnectionClosed):
                    await agent.receive()
                await trio.sleep(0.2)
                assert failures == []
            await agent.aclose()


async def test_error_event_is_fatal() -> None:
    with trio.fail_after(5):
        async with fake_elevenlabs_server() as server:
            agent = make_agent(server)
            await agent.connect(CALL)
            conv = server.conversations[0]
            await conv.send_error(1002, "llm_timeout", "LLM response took over 20 seconds")
            (event,) = await collect(agent, lambda ev: bool(ev))
            assert isinstance(event, AgentErrorEvent) and event.fatal
            assert event.code == "llm_timeout"
            await agent.aclose()


async def test_drop_is_not_a_hang_up() -> None:
    with trio.fail_after(5):
        async with fake_elevenlabs_server() as server:
            agent = make_agent(server)
            await agent.connect(CALL)
            await server.conversations[0].abort()
            with pytest.raises(ConnectionClosed) as info:
                await collect(agent, lambda ev: False)
            assert info.value.code == 1006
            await agent.aclose()


async def test_stalled_agent_is_declared_dead_by_liveness() -> None:
    """The agent stops reading and sending (no FIN): run() gives up within dead_after_s."""
    with trio.fail_after(6):
        async with fake_elevenlabs_server(ping_interval_s=0) as server:
            agent = make_agent(server, liveness=FAST)
            await agent.connect(CALL)
            conv = server.conversations[0]
            async with running(agent) as failures, trio.open_nursery() as nursery:

                async def read() -> None:
                    try:
                        while True:
                            await agent.receive()
                    except ConnectionClosed:
                        pass

                async def talk() -> None:  # the caller keeps talking, as on a real call
                    while True:
                        agent.send_audio_b64(base64.b64encode(b"\xff" * 160).decode())
                        await trio.sleep(0.02)

                nursery.start_soon(read)
                nursery.start_soon(talk)
                await trio.sleep(0.3)
                assert not failures  # healthy: pongs keep coming
                conv.stall()
                t0 = trio.current_time()
                while not failures:
                    await trio.sleep(0.02)
                assert trio.current_time() - t0 < 3.0
                nursery.cancel_scope.cancel()
            (failure,) = failures
            assert isinstance(failure, AgentError) and failure.kind == "agent_disconnected"
            await agent.aclose()


async def test_reactor_path_answers_pings_and_reports_the_hang_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """read_events_nowait (the engine's reactor path) behaves like receive()."""
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(5):
        async with fake_elevenlabs_server(ping_interval_s=0.05) as server:
            agent = make_agent(server, api_key=server.api_key)
            await agent.connect(CALL)
            sock = agent.reactor_socket()
            assert sock is not None
            conv = server.conversations[0]
            events: list[AgentEvent] = []
            with trio.fail_after(3):
                while len(conv.pongs) < 3:
                    await trio.lowlevel.wait_readable(sock)
                    events += agent.read_events_nowait()
                await conv.send_reply(100)
                await conv.close(1000)
                while not any(isinstance(e, AgentHangup) for e in events):
                    await trio.lowlevel.wait_readable(sock)
                    events += agent.read_events_nowait()
            assert len(audio_of(events)) == 800
            with pytest.raises(ConnectionClosed):
                agent.read_events_nowait()
            await agent.aclose()
    assert server.api_key not in caplog.text  # type: ignore[operator]
