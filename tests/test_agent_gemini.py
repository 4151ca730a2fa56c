"""relay.agents.gemini: the Trio adapter against tests/fake_gemini.py over loopback, and its
timed logic under a MockClock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
import pytest
import trio
import trio.testing
from fake_gemini import FakeGeminiServer, fake_gemini_server, pcm_tone

from relay.agents.base import (
    AgentAudio,
    AgentEvent,
    AgentResponseDone,
    AgentSpeechStarted,
    AgentToolCall,
    AgentTranscript,
    AudioFormat,
    CallInfo,
)
from relay.agents.gemini import GeminiLiveAgent, options_from_config
from relay.agents.gemini_protocol import GeminiOptions
from relay.agents.liveness import LivenessOptions
from relay.agents.registry import create_agent
from relay.errors import AgentError, ConfigError, ConnectionClosed
from relay.tools import ToolRegistry

CALL = CallInfo(call_sid="CA-gem-1", stream_sid="MZ-gem-1")
FAST = LivenessOptions(ping_interval_s=0.1, dead_after_s=0.6)
SLOW = LivenessOptions(ping_interval_s=5.0, dead_after_s=30.0)


def make_agent(
    server: FakeGeminiServer, liveness: LivenessOptions | None = None, **kw: Any
) -> GeminiLiveAgent:
    kw.setdefault("api_key", server.api_key)
    kw.setdefault("connect_timeout_s", 3.0)
    kw.setdefault("reconnect_timeout_s", 3.0)
    return GeminiLiveAgent(GeminiOptions(url=server.url, **kw), liveness=liveness or SLOW)


def audio_of(events: list[AgentEvent]) -> bytes:
    return b"".join(e.audio for e in events if isinstance(e, AgentAudio))


@dataclass
class Session:
    """An agent as the engine drives it: run() and a reader in the background."""

    agent: GeminiLiveAgent
    events: list[AgentEvent] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    async def wait(self, predicate: Callable[[Session], bool], timeout: float = 5.0) -> None:
        """Until ``predicate`` holds: re-checked on every batch of events, and every 20 ms
        for state that changes without events (cancellations, reconnects)."""
        with trio.fail_after(timeout):
            while not predicate(self):
                with trio.move_on_after(0.02):
                    await self.changed.wait()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


@asynccontextmanager
async def engine(agent: GeminiLiveAgent) -> AsyncIterator[Session]:
    s = Session(agent)

    async def runner() -> None:
        try:
            await agent.run()
        except (AgentError, ConnectionClosed) as exc:
            s.failures.append(exc)
            s._notify()

    async def reader() -> None:
        try:
            while True:
                s.events += await agent.receive()
                s._notify()
        except (AgentError, ConnectionClosed) as exc:
            s.failures.append(exc)
            s._notify()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner)
            nursery.start_soon(reader)
            try:
                yield s
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await agent.aclose()


async def talk(agent: GeminiLiveAgent, *, ms: int = 20, hz: float = 300.0) -> None:
    """The caller keeps talking: PCM16 16 kHz every 20 ms, as the engine sends it."""
    chunk = pcm_tone(ms, 16000, hz)
    while True:
        try:
            agent.send_audio(chunk)
        except AgentError:
            return
        await trio.sleep(ms / 1000)


# --- configuration --------------------------------------------------------------------------
def test_config_needs_a_key_and_names_bad_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="api_key"):
        options_from_config({})
    with pytest.raises(ConfigError, match="max_reconnects"):
        options_from_config({"api_key": "k", "max_reconnects": 1.5})
    with pytest.raises(ConfigError, match="session_resumption"):
        options_from_config({"api_key": "k", "session_resumption": "maybe"})
    with pytest.raises(ConfigError, match="tools"):
        options_from_config({"api_key": "k", "tools": ["no_such_tool"]})
    with pytest.raises(ConfigError, match="ping_interval_s"):
        options_from_config({"api_key": "k", "ping_interval_s": 0})
    reg = ToolRegistry()
    reg.register("lookup", lambda args: "x", "Look up", {"type": "object", "properties": {}})
    opts, tools, _, _ = options_from_config(
        {"api_key": "k", "tools": ["lookup"], "tool_registry": reg}
    )
    assert [t["name"] for t in opts.tools] == ["lookup"]
    assert tools is reg


def test_key_from_environment_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "AIza-env-secret-0123456789xyz"
    monkeypatch.setenv("GEMINI_API_KEY", secret)
    agent = create_agent({"type": "gemini", "tools": "get_time"})
    assert isinstance(agent, GeminiLiveAgent)
    assert agent.input_format == AudioFormat("pcm16", 16000)
    assert agent.output_format == AudioFormat("pcm16", 24000)
    assert secret not in repr(agent) and secret not in repr(agent.options)
    assert agent.reactor_socket() is None  # the socket changes on reconnect


# --- connect ----------------------------------------------------------------------------------
async def test_setup_first_then_greeting_then_audio_both_ways() -> None:
    with trio.fail_after(6):
        async with fake_gemini_server(setup_delay_s=0.2, reply_ms=300) as server:
            agent = make_agent(server, voice="Kore", instructions="Be brief.", greeting="Hi!")
            await agent.connect(CALL)
            conn = await server.wait_for_connection()
            assert conn.query["key"] == server.api_key
            assert conn.setup is not None
            assert conn.setup["generationConfig"]["speechConfig"]["voiceConfig"] == {
                "prebuiltVoiceConfig": {"voiceName": "Kore"}
            }
            async with engine(agent) as s:
                await s.wait(lambda s: AgentResponseDone("turn1") in s.events)
                assert audio_of(s.events) == pcm_tone(300, 24000)
                assert AgentResponseDone("turn1") in s.events
                (turn,) = conn.session.client_turns  # type: ignore[union-attr]
                assert '"Hi!"' in turn["turns"][0]["parts"][0]["text"]
                caller = pcm_tone(200, 16000, 300.0)
                agent.send_audio(caller[:3200])
                agent.send_audio(caller[3200:])
                await conn.wait_for(lambda c: len(c.audio_in) >= len(caller))
                assert bytes(conn.audio_in) == caller
                assert not conn.refused


async def test_binary_frames_are_parsed() -> None:
    with trio.fail_after(5):
        async with fake_gemini_server(binary_frames=True) as server:
            agent = make_agent(server, greeting="Hello")
            await agent.connect(CALL)
            async with engine(agent) as s:
                await s.wait(lambda s: AgentResponseDone("turn1") in s.events)
                assert len(audio_of(s.events)) == 400 * 48


async def test_bad_key_fails_without_retrying() -> None:
    with trio.fail_after(5):
        async with fake_gemini_server() as server:
            agent = make_agent(server, api_key="AIza-wrong-key")
            with pytest.raises(AgentError, match="1008") as info:
                await agent.connect(CALL)
            assert info.value.kind == "agent_session"
            assert len(server.connections) == 1


async def test_wrong_model_is_refused() -> None:
    with trio.fail_after(5):
        async with fake_gemini_server(model="models/the-right-one") as server:
            agent = make_agent(server, model="the-wrong-one")
            with pytest.raises(AgentError, match="not found"):
                await agent.connect(CALL)


# --- conversation -----------------------------------------------------------------------------
async def test_barge_in_drops_the_rest_of_the_interrupted_turn() -> None:
    with trio.fail_after(5):
        async with fake_gemini_server() as server:
            agent = make_agent(server)
            await agent.connect(CALL)
            conn = await server.wait_for_connection()
            async with engine(agent) as s:
                await conn.send_turn(200, complete=False)
                await s.wait(lambda s: len(audio_of(s.events)) == 200 * 48)
                await conn.interrupt(stale_ms=300)
                await conn.send_turn(audio=b"\x05\x00" * 480)
                await s.wait(lambda s: AgentResponseDone("turn2") in s.events)
                assert AgentSpeechStarted() in s.events
                assert audio_of(s.events) == pcm_tone(200, 24000) + b"\x05\x00" * 480
                assert agent.protocol.audio_dropped == 1


async def test_transcripts_are_final_per_utterance_and_turn() -> None:
    with trio.fail_after(5):
        async with fake_gemini_server() as server:
            agent = make_agent(server)
            await agent.connect(CALL)
            conn = await server.wait_for_connection()
            async with engine(agent) as s:
                await conn.input_transcription("What's the ")
                await conn.input_transcription("time?")
                await conn.send_turn(300, transcript="It is noon.")
                await s.wait(lambda s: AgentResponseDone("turn1") in s.events)
                finals = [e for e in s.events if isinstance(e, AgentTranscript) and e.final]
                assert finals == [
                    AgentTranscript("caller", "What's the time?"),
                    AgentTranscript("agent", "It is noon."),
                ]


async def test_tool_round_trip_cancellation_and_unknown_ids() -> None:
    with trio.fail_after(5):
        async with fake_gemini_server(reply_ms=100) as server:
            agent = make_agent(server)
            await agent.connect(CALL)
            conn = await server.wait_for_connection()
            async with engine(agent) as s:
                first = await conn.tool_call("get_time", {"timezone": "UTC"})
                second = await conn.tool_call("slow_lookup")
                await s.wait(lambda s: sum(isinstance(e, AgentToolCall) for e in s.events) == 2)
                await conn.cancel_tool_calls(second)
                await s.wait(lambda s: agent.protocol.pending_tool_calls() == [first])
                agent.send_tool_result(second, '{"late": true}')  # withdrawn: not sent
                agent.send_tool_result("invented", "{}")  # never issued: not sent
                agent.send_tool_result(first, '{"iso": "2026-01-01T00:00:00Z"}')
                await s.wait(lambda s: AgentResponseDone("turn1") in s.events)  # model answers
                assert conn.session is not None
                assert conn.session.tool_responses == [
                    {
                        "id": first,
                        "name": "get_time",
                        "response": {"iso": "2026-01-01T00:00:00Z"},
                    }
                ]
                assert not conn.refused and not conn.closed


# --- connections that end -------------------------------------------------------------------
async def test_go_away_resumes_with_the_latest_handle() -> None:
    with trio.fail_after(8):
        async with fake_gemini_server() as server:
            agent = make_agent(server)
            await agent.connect(CALL)
            conn0 = await server.wait_for_connection()
            async with engine(agent) as s, trio.open_nursery() as nursery:
                nursery.start_soon(talk, agent)
                await conn0.send_turn(100)
                await s.wait(lambda s: AgentResponseDone("turn1") in s.events)
                handle = conn0.handles[-1]
                await conn0.go_away(1.5)
                conn1 = await server.wait_for_connection(1)
                assert conn1.resumed_from == handle
                assert conn1.session is conn0.session  # the same session goes on
                await conn1.wait_for(lambda c: c.audio_messages >= 5)  # caller audio follows
                await conn1.send_turn(100)
                await s.wait(lambda s: AgentResponseDone("turn2") in s.events)
                assert agent.reconnects == agent.resumed == 1
                assert not s.failures and not conn1.refused and not conn0.refused
                nursery.cancel_scope.cancel()


async def test_go_away_waits_for_the_turn_in_progress() -> None:
    with trio.fail_after(8):
        async with fake_gemini_server() as server:
            agent = make_agent(server)
            await agent.connect(CALL)
            conn0 = await server.wait_for_connection()
            async with engine(agent) as s, trio.open_nursery() as nursery:
                long_turn = partial(conn0.send_turn, 600, chunk_ms=100, pace_s=0.1)
                nursery.start_soon(long_turn)
                await s.wait(lambda s: len(audio_of(s.events)) >= 100 * 48)
                await conn0.go_away(5.0, close=False)
                await s.wait(lambda s: AgentResponseDone("turn1") in s.events)
                conn1 = await server.wait_for_connection(1)
                # the whole answer was heard, then the switch used the handle issued after it
                assert len(audio_of(s.events)) == 600 * 48
                assert conn1.resumed_from == conn0.handles[-1]
                await conn0.wait_closed()


async def test_drop_resumes_and_keeps_caller_audio_from_the_gap() -> None:
    with trio.fail_after(8):
        async with fake_gemini_server(setup_delay_s=0.3) as server:
            agent = make_agent(server)
            await agent.connect(CALL)
            conn0 = await server.wait_for_connection()
            async with engine(agent) as s, trio.open_nursery() as nursery:
                await conn0.send_turn(100, complete=False)
                await s.wait(lambda s: len(audio_of(s.events)) == 100 * 48)
                await conn0.abort()
                await s.wait(lambda s: len(server.connections) == 2)
                nursery.start_soon(talk, agent)  # while the new connection is set up
                conn1 = await server.wait_for_connection(1)
                assert conn1.resumed_from == conn0.handles[-1]
                await conn1.wait_for(lambda c: c.audio_messages >= 10)
                # the cut-off turn was closed; the next one has its own id
                assert AgentResponseDone("turn1") in s.events
                await conn1.send_turn(100)
                await s.wait(lambda s: AgentResponseDone("turn2") in s.events)
                assert not s.failures and not conn1.refused
                nursery.cancel_scope.cancel()


async def test_stall_is_noticed_and_the_session_resumed() -> None:
    with trio.fail_after(8):
        async with fake_gemini_server() as server:
            agent = make_agent(server, liveness=FAST)
            await agent.connect(CALL)
            conn0 = await server.wait_for_connection()
            async with engine(agent) as s, trio.open_nursery() as nursery:
                nursery.start_soon(talk, agent)
                await trio.sleep(0.3)
                conn0.stall()
                t0 = trio.current_time()
                conn1 = await server.wait_for_connection(1, timeout=5)
                assert trio.current_time() - t0 < 4.0
                assert conn1.resumed_from is not None
                await conn1.wait_for(lambda c: c.audio_messages >= 5)
                assert not s.failures
                nursery.cancel_scope.cancel()


async def test_without_a_handle_a_fresh_session_gets_the_conversation_so_far() -> None:
    with trio.fail_after(8):
        async with fake_gemini_server(resumption_updates=False) as server:
            agent = make_agent(server)
            await agent.connect(CALL)
            conn0 = await server.wait_for_connection()
            async with engine(agent) as s:
                await conn0.input_transcription("My name is Ada.")
                await conn0.send_turn(100, transcript="Hello Ada.")
                await s.wait(lambda s: AgentResponseDone("turn1") in s.events)
                await conn0.abort()
                conn1 = await server.wait_for_connection(1)
                assert conn1.resumed_from is None and conn1.session is not conn0.session
                await conn1.wait_for(lambda c: bool(c.received[1:]))
                history = conn1.received[1]["clientContent"]
                assert history["turnComplete"] is False
                assert [t["parts"][0]["text"] for t in history["turns"]] == [
                    "My name is Ada.",
                    "Hello Ada.",
                ]
                assert agent.reconnects == 1 and agent.resumed == 0


async def test_refused_handle_falls_back_to_a_fresh_session() -> None:
    with trio.fail_after(8):
        async with fake_gemini_server() as server:
            agent = make_agent(server)
            await agent.connect(CALL)
            conn0 = await server.wait_for_connection()
            async with engine(agent) as s:
                await conn0.send_turn(100, transcript="Hello there.")
                await s.wait(lambda s: AgentResponseDone("turn1") in s.events)
                server.handles.clear()  # the handle expired
                await conn0.abort()
                await s.wait(lambda s: len(server.connections) == 3)
                conn2 = await server.wait_for_connection(2)
                assert server.connections[1].refused  # the resume attempt
                assert conn2.resumed_from is None
                await conn2.wait_for(lambda c: len(c.received) >= 2)
                assert conn2.received[1]["clientContent"]["turns"][0]["parts"][0]["text"] == (
                    "Hello there."
                )
                assert not s.failures and agent.reconnects == 1 and agent.resumed == 0


async def test_refused_resume_ends_the_session() -> None:
    with trio.fail_after(8):
        async with fake_gemini_server() as server:
            agent = make_agent(server)
            await agent.connect(CALL)
            conn0 = await server.wait_for_connection()
            async with engine(agent) as s:
                server.refuse_setup_code = 1008
                await conn0.abort()
                await s.wait(lambda s: len(s.failures) == 2)  # run() and receive()
                assert all(
                    isinstance(f, AgentError) and f.kind == "agent_disconnected" for f in s.failures
                )
                assert len(server.connections) == 2  # a refusal is not retried
                with pytest.raises(AgentError):
                    agent.send_audio(b"\x00\x00")


async def test_no_reconnects_allowed_ends_the_session() -> None:
    with trio.fail_after(5):
        async with fake_gemini_server() as server:
            agent = make_agent(server, max_reconnects=0)
            await agent.connect(CALL)
            conn0 = await server.wait_for_connection()
            async with engine(agent) as s:
                await conn0.close(1011, "internal error")
                await s.wait(lambda s: len(s.failures) == 2)
                assert "after 0 reconnects" in str(s.failures[0])


async def test_go_away_without_a_way_to_switch_stays_until_the_cut() -> None:
    """No handle and no fresh sessions: the connection is used until the server cuts it
    (the call goes on meanwhile), then the session ends."""
    with trio.fail_after(8):
        async with fake_gemini_server(resumption_updates=False) as server:
            agent = make_agent(server, reconnect=False)
            await agent.connect(CALL)
            conn0 = await server.wait_for_connection()
            async with engine(agent) as s:
                await conn0.go_away(1.0)
                await conn0.send_turn(100)
                await s.wait(lambda s: AgentResponseDone("turn1") in s.events)
                assert not s.failures and len(server.connections) == 1
                await s.wait(lambda s: len(s.failures) == 2)
                assert all(isinstance(f, AgentError) for f in s.failures)
                assert len(server.connections) == 1


# --- timed logic (MockClock) ------------------------------------------------------------------
@pytest.mark.parametrize("becomes_idle_at", [3.0, None])
def test_go_away_grace_timing(becomes_idle_at: float | None) -> None:
    """The grace after goAway ends when the model is idle, else GO_AWAY_MARGIN_S before
    the connection is cut (here: time left 10 s -> at most 9 s). Its own Trio run, driven
    by a MockClock: no real time passes."""

    async def scenario() -> float:
        agent = GeminiLiveAgent(GeminiOptions(api_key="k"))
        agent.protocol._in_turn = True  # a turn is being spoken
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            if becomes_idle_at is not None:

                async def finish_turn() -> None:
                    await trio.sleep(becomes_idle_at)
                    agent.protocol._in_turn = False
                    agent._notify()

                nursery.start_soon(finish_turn)
            await agent._go_away_grace(agent._gen, 10.0)
        return trio.current_time() - start

    waited = trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    if becomes_idle_at is None:
        assert 0 < waited <= 9.0 + 1e-6
    else:
        assert waited <= becomes_idle_at + 1e-6


def test_json_of_audio_is_exactly_the_documented_shape() -> None:
    agent = GeminiLiveAgent(GeminiOptions(api_key="k"))
    text = agent.protocol.audio_message(b"\x00\x01")
    assert orjson.loads(text) == {
        "realtimeInput": {"audio": {"mimeType": "audio/pcm;rate=16000", "data": "AAE="}}
    }


async def test_the_key_in_the_url_never_reaches_errors_or_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG")
    secret = "AIza-never-log-me-0123456789"
    with trio.fail_after(5):
        async with fake_gemini_server() as server:
            agent = make_agent(server, api_key=secret)  # the fake refuses it: 1008
            with pytest.raises(AgentError) as info:
                await agent.connect(CALL)
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now: connection refused
    agent = GeminiLiveAgent(GeminiOptions(url=f"ws://127.0.0.1:{port}/ws", api_key=secret))
    with trio.fail_after(5), pytest.raises(AgentError) as refused:
        await agent.connect(CALL)
    for text in (str(info.value), str(refused.value), caplog.text, repr(agent)):
        assert secret not in text
