"""relay.agents.openai: the Trio adapter against tests/fake_openai.py over loopback."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
import trio
from fake_openai import FakeOptions, fake_openai_server, silent_server, tone

from relay.agents.base import (
    AgentAudio,
    AgentErrorEvent,
    AgentEvent,
    AgentResponseDone,
    AgentSpeechStarted,
    AgentSpeechStopped,
    AgentToolCall,
    AgentTranscript,
    AudioFormat,
    CallInfo,
)
from relay.agents.liveness import LivenessOptions
from relay.agents.openai import OpenAIRealtimeAgent
from relay.agents.openai_protocol import OpenAIOptions
from relay.errors import AgentError, ConfigError, ConnectionClosed
from relay.media.websocket import SendTimedOut
from relay.tools import default_registry

CALL = CallInfo(call_sid="CA123", stream_sid="MZ456", from_number="+15550001111")
KEY = "sk-test-fake-key-0123456789abcd"


def make_agent(url: str, **kw: Any) -> OpenAIRealtimeAgent:
    kw.setdefault("api_key", KEY)
    kw.setdefault("connect_timeout_s", 3.0)
    return OpenAIRealtimeAgent(OpenAIOptions(url=url, **kw))


async def collect(
    agent: OpenAIRealtimeAgent,
    until: Callable[[list[AgentEvent]], bool],
    timeout: float = 3.0,
) -> list[AgentEvent]:
    events: list[AgentEvent] = []
    with trio.fail_after(timeout):
        while not until(events):
            events += await agent.receive()
    return events


def audio_of(events: list[AgentEvent], item_id: str | None = None) -> bytes:
    return b"".join(
        e.audio
        for e in events
        if isinstance(e, AgentAudio) and (item_id is None or e.response_id == item_id)
    )


def errors(events: list[AgentEvent]) -> list[AgentErrorEvent]:
    return [e for e in events if isinstance(e, AgentErrorEvent)]


def has(kind: type) -> Callable[[list[AgentEvent]], bool]:
    return lambda events: any(isinstance(e, kind) for e in events)


# --- connect ----------------------------------------------------------------------------
async def test_connect_ga_auth_and_session_update() -> None:
    with trio.fail_after(5):
        async with fake_openai_server(model="gpt-realtime") as server:
            agent = make_agent(server.url, instructions="Be nice.", voice="cedar")
            await agent.connect(CALL)
            session = server.sessions[0]
            assert session.headers["authorization"] == f"Bearer {KEY}"
            assert "openai-beta" not in session.headers
            assert session.query == {"model": "gpt-realtime"}
            assert session.api == "ga"
            [update] = session.session_updates
            assert update["type"] == "realtime"
            assert update["audio"]["input"]["format"] == {"type": "audio/pcmu"}
            assert update["audio"]["output"]["voice"] == "cedar"
            assert update["instructions"] == "Be nice."
            assert agent.protocol.configured and agent.protocol.session_id
            assert agent.connected
            assert agent.input_format == agent.output_format == AudioFormat("mulaw", 8000)
            assert not session.items_created and not session.response_creates  # no greeting
            await agent.aclose()
            await agent.aclose()  # idempotent
            await session.wait_closed()
            assert not agent.connected


async def test_connect_beta() -> None:
    with trio.fail_after(5):
        async with fake_openai_server() as server:
            agent = make_agent(server.url, api="beta", audio="pcm24k")
            await agent.connect(CALL)
            session = server.sessions[0]
            assert session.headers["openai-beta"] == "realtime=v1"
            assert session.api == "beta"
            assert session.config["input_audio_format"] == "pcm16"
            assert session.input_format == session.output_format == "pcm24k"
            assert agent.input_format == agent.output_format == AudioFormat("pcm16", 24000)
            await agent.aclose()


async def test_wrong_api_key_is_refused_and_not_leaked() -> None:
    with trio.fail_after(5):
        async with fake_openai_server(api_key="sk-the-right-one-0000") as server:
            agent = make_agent(server.url, api_key="sk-wrong-SECRET-key-9999")
            with pytest.raises(AgentError) as info:
                await agent.connect(CALL)
            assert info.value.kind == "agent_connect"
            assert "401" in str(info.value)
            assert "SECRET" not in str(info.value) and "SECRET" not in repr(agent)
            assert server.rejected[0]["status"] == 401


async def test_rejected_session_update_fails_connect() -> None:
    with trio.fail_after(5):
        async with fake_openai_server(reject_session_update=True) as server:
            agent = make_agent(server.url)
            with pytest.raises(AgentError) as info:
                await agent.connect(CALL)
            assert info.value.kind == "agent_session"
            await server.sessions[0].wait_closed()


async def test_connect_timeout_silent_tcp() -> None:
    with trio.fail_after(5):
        async with silent_server() as url:
            agent = make_agent(url, connect_timeout_s=0.3)
            start = trio.current_time()
            with pytest.raises(AgentError) as info:
                await agent.connect(CALL)
            assert info.value.kind == "agent_connect_timeout"
            assert trio.current_time() - start < 1.5


async def test_connect_timeout_no_session_updated() -> None:
    with trio.fail_after(5):
        async with fake_openai_server(ack_session_update=False) as server:
            # Long enough for the TCP + WebSocket handshake on a loaded CI machine (0.3 s
            # once ran out while still waiting for the handshake): the stage that times
            # out must be the wait for session.updated.
            agent = make_agent(server.url, connect_timeout_s=2.0)
            with pytest.raises(AgentError) as info:
                await agent.connect(CALL)
            assert info.value.kind == "agent_connect_timeout"
            assert "session.updated" in str(info.value)
            await server.sessions[0].wait_closed()


async def test_connect_refused_port() -> None:
    with trio.fail_after(5):
        async with silent_server() as url:
            pass  # the listener is gone: connection refused
        with pytest.raises(AgentError) as info:
            await make_agent(url).connect(CALL)
        assert info.value.kind == "agent_connect"


async def test_greeting_speaks_first() -> None:
    with trio.fail_after(5):
        async with fake_openai_server(response_ms=300) as server:
            agent = make_agent(server.url, greeting="Thanks for calling Acme.")
            await agent.connect(CALL)
            events = await collect(
                agent, lambda ev: any(isinstance(e, AgentTranscript) and e.final for e in ev)
            )
            session = server.sessions[0]
            [item] = session.items_created
            assert "Thanks for calling Acme." in item["content"][0]["text"]
            assert len(session.response_creates) == 1
            assert len(audio_of(events)) == 300 * 8
            assert AgentTranscript("agent", "Hello, this is the fake agent.") in events
            await agent.aclose()


# --- audio --------------------------------------------------------------------------------
@pytest.mark.parametrize(("audio", "bpms"), [("pcmu", 8), ("pcm24k", 48)])
async def test_audio_both_ways(audio: str, bpms: int) -> None:
    with trio.fail_after(5):
        async with fake_openai_server() as server:
            agent = make_agent(server.url, audio=audio)
            await agent.connect(CALL)
            session = server.sessions[0]
            assert session.input_format == audio
            caller = tone(100, audio, hz=300)
            payload = base64.b64encode(caller[: len(caller) // 2]).decode()
            agent.send_audio_b64(payload)  # passthrough of a base64 string
            agent.send_audio(caller[len(caller) // 2 :])
            await session.wait_for(lambda s: s.appends == 2)
            assert bytes(session.audio_in) == caller
            assert session.audio_in_ms == 100
            first = session.events_of("input_audio_buffer.append")[0]
            assert first == {"type": "input_audio_buffer.append", "audio": payload}

            reply = tone(250, audio, hz=500)
            item_id = await session.send_response(audio=reply, chunk_ms=40)
            events = await collect(agent, has(AgentResponseDone))
            assert audio_of(events, item_id) == reply
            assert all(e.response_id == item_id for e in events if isinstance(e, AgentAudio))
            assert [e for e in events if isinstance(e, AgentResponseDone)] == [
                AgentResponseDone(item_id)
            ]
            assert agent.protocol.generated_ms(item_id) == len(reply) // bpms == 250
            partial = [e for e in events if isinstance(e, AgentTranscript) and not e.final]
            assert partial and all(e.role == "agent" for e in partial)
            await agent.aclose()


async def test_truncate_clamped_and_accepted_by_server() -> None:
    with trio.fail_after(5):
        async with fake_openai_server() as server:
            agent = make_agent(server.url)
            await agent.connect(CALL)
            session = server.sessions[0]
            item_id = await session.send_response(ms=500)
            await collect(agent, has(AgentResponseDone))
            agent.truncate(item_id, 10_000)  # more than generated: clamped to 500
            agent.truncate(item_id, 120)
            agent.truncate(item_id, 300)  # item is now 120 ms long: clamped again
            agent.truncate("item_never_seen", 50)  # skipped, nothing sent
            await session.wait_for(lambda s: len(s.events_of("conversation.item.truncate")) == 3)
            assert [t["audio_end_ms"] for t in session.truncates] == [500, 120, 120]
            assert session.truncate_errors == []
            assert all(t["content_index"] == 0 for t in session.truncates)
            assert session.items[item_id].truncated_ms == 120
            await agent.aclose()


async def test_barge_in_transcripts_and_errors() -> None:
    with trio.fail_after(5):
        async with fake_openai_server() as server:
            agent = make_agent(server.url)
            await agent.connect(CALL)
            session = server.sessions[0]
            await session.speech_started()
            await session.speech_stopped()
            await session.caller_transcript("what time is it")
            await session.send_error("invalid_value", "something minor")
            events = await collect(agent, has(AgentErrorEvent))
            assert AgentSpeechStarted() in events and AgentSpeechStopped() in events
            assert AgentTranscript("caller", "what time is it") in events
            assert AgentErrorEvent("invalid_value", "something minor", fatal=False) in events
            await session.send_error("session_expired", "60 minutes", etype="invalid_request_error")
            [err] = errors(await collect(agent, has(AgentErrorEvent)))
            assert err.fatal
            await agent.aclose()


async def test_auto_reply_mode() -> None:
    with trio.fail_after(5):
        async with fake_openai_server(auto_reply_after_ms=200, auto_reply_ms=300) as server:
            agent = make_agent(server.url)
            await agent.connect(CALL)
            frame = base64.b64encode(b"\xff" * 160).decode()  # 20 ms of μ-law silence
            for _ in range(10):
                agent.send_audio_b64(frame)
            events = await collect(agent, has(AgentResponseDone))
            assert isinstance(events[0], AgentSpeechStarted)
            assert any(isinstance(e, AgentTranscript) and e.role == "caller" for e in events)
            assert len(audio_of(events)) == 300 * 8
            await agent.aclose()


# --- tools ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name_in_done", [True, False])
async def test_tool_call_round_trip(name_in_done: bool) -> None:
    registry = default_registry()
    with trio.fail_after(5):
        async with fake_openai_server(name_in_args_done=name_in_done, response_ms=100) as server:
            agent = make_agent(server.url, tools=registry.schemas_openai())
            await agent.connect(CALL)
            session = server.sessions[0]
            assert session.config["tools"][0]["name"] == "get_time"
            call_id = await session.send_function_call("get_time", {"timezone": "UTC"})
            events = await collect(agent, has(AgentToolCall))
            [call] = [e for e in events if isinstance(e, AgentToolCall)]
            assert call.call_id == call_id and call.name == "get_time"
            output = await registry.call(call.name, call.arguments)
            agent.send_tool_result(call.call_id, output)
            await session.wait_for(lambda s: bool(s.tool_outputs) and bool(s.response_creates))
            [out] = session.tool_outputs
            assert out["call_id"] == call_id
            assert json.loads(out["output"])["timezone"] == "UTC"
            # the model answers after the tool output (response.create)
            events = await collect(agent, has(AgentResponseDone))
            assert not any(isinstance(e, AgentToolCall) for e in events)  # reported once
            await agent.aclose()


# --- failure modes ------------------------------------------------------------------------
async def test_server_close_raises_connection_closed() -> None:
    with trio.fail_after(5):
        async with fake_openai_server() as server:
            agent = make_agent(server.url)
            await agent.connect(CALL)
            session = server.sessions[0]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.close, 1011, "server going away")
                with pytest.raises(ConnectionClosed) as info:
                    while True:
                        await agent.receive()
            assert info.value.code == 1011
            with pytest.raises(ConnectionClosed):
                agent.send_audio_b64("AAAA")
            await agent.aclose()


async def test_tcp_drop_raises_connection_closed() -> None:
    with trio.fail_after(5):
        async with fake_openai_server() as server:
            agent = make_agent(server.url)
            await agent.connect(CALL)
            await server.sessions[0].abort()
            with pytest.raises(ConnectionClosed):
                while True:
                    await agent.receive()
            await agent.aclose()


async def test_malformed_and_binary_are_non_fatal_until_budget() -> None:
    with trio.fail_after(5):
        async with fake_openai_server() as server:
            agent = OpenAIRealtimeAgent(
                OpenAIOptions(url=server.url, api_key=KEY), max_protocol_errors=2
            )
            await agent.connect(CALL)
            session = server.sessions[0]
            await session.send_malformed()
            await session.send_binary()
            events = errors(await collect(agent, lambda ev: len(ev) >= 2))
            assert [e.code for e in events] == ["agent_protocol", "agent_protocol"]
            assert not any(e.fatal for e in events)
            await session.send_malformed()
            with pytest.raises(AgentError) as info:
                await collect(agent, lambda ev: False)
            assert info.value.kind == "agent_protocol"
            await session.wait_closed()


async def test_send_before_connect_is_local_error() -> None:
    from relay.errors import LocalProtocolError

    agent = make_agent("ws://127.0.0.1:9/v1/realtime")
    with pytest.raises(LocalProtocolError):
        agent.send_audio_b64("AAAA")
    await agent.aclose()  # no-op before connect


# --- configuration --------------------------------------------------------------------------
def test_repr_masks_api_key() -> None:
    agent = make_agent("wss://api.openai.com/v1/realtime", api_key="sk-proj-TOPSECRETVALUE9abcd")
    text = repr(agent)
    assert "TOPSECRET" not in text and "sk-…abcd" in text
    assert "TOPSECRET" not in repr(agent.options)


def test_from_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env-000000000000wxyz")
    agent = OpenAIRealtimeAgent.from_config(
        {
            "url": "ws://127.0.0.1:1/v1/realtime",
            "audio": "pcm24k",
            "api": "beta",
            "greeting": "Hello!",
            "connect_timeout_s": "4",
            "send_timeout_s": 1,
            "wait_for_session": "false",
            "tools": ["get_time"],
        }
    )
    o = agent.options
    assert o.api_key == "sk-from-env-000000000000wxyz"
    assert (o.audio, o.api, o.greeting, o.connect_timeout_s, o.send_timeout_s) == (
        "pcm24k",
        "beta",
        "Hello!",
        4.0,
        1.0,
    )
    assert o.wait_for_session is False
    assert o.model == "gpt-realtime" and o.voice == "marin"
    assert [t["name"] for t in o.tools] == ["get_time"]
    assert agent.tools is not None and "get_time" in agent.tools
    assert agent.output_format == AudioFormat("pcm16", 24000)
    assert OpenAIRealtimeAgent.supports_truncate

    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ConfigError):
        OpenAIRealtimeAgent.from_config({})
    with pytest.raises(ConfigError):
        OpenAIRealtimeAgent.from_config({"api_key": "k", "audio": "opus"})
    with pytest.raises(ConfigError):
        OpenAIRealtimeAgent.from_config({"api_key": "k", "tools": ["no_such_tool"]})


def test_registry_creates_openai_agent() -> None:
    from relay.agents.registry import create_agent

    agent = create_agent({"type": "openai", "api_key": "sk-x-000000000000"})
    assert isinstance(agent, OpenAIRealtimeAgent)


@pytest.mark.parametrize("opts", [FakeOptions(hang_handshake=True)])
async def test_connect_timeout_hung_handshake(opts: FakeOptions) -> None:
    with trio.fail_after(5):
        async with fake_openai_server(opts) as server:
            agent = make_agent(server.url, connect_timeout_s=0.3)
            with pytest.raises(AgentError) as info:
                await agent.connect(CALL)
            assert info.value.kind == "agent_connect_timeout"
            assert "handshake" in str(info.value)


async def test_handshake_refused_status() -> None:
    with trio.fail_after(5):
        async with fake_openai_server(reject_status=503) as server:
            with pytest.raises(AgentError) as info:
                await make_agent(server.url).connect(CALL)
            assert info.value.kind == "agent_connect" and "503" in str(info.value)


async def test_greeting_without_waiting_for_session() -> None:
    with trio.fail_after(5):
        async with fake_openai_server(response_ms=200) as server:
            agent = make_agent(server.url, greeting="Hi!", wait_for_session=False)
            await agent.connect(CALL)
            events = await collect(agent, has(AgentResponseDone))
            assert len(audio_of(events)) == 200 * 8
            assert agent.protocol.configured
            session = server.sessions[0]
            types = [e["type"] for e in session.received]
            assert types == ["session.update", "conversation.item.create", "response.create"]
            await agent.aclose()


async def test_stalled_agent_send_times_out() -> None:
    """Sends never block; a peer that stops reading ends the session with SendTimedOut,
    either from the bounded flusher (``run``) or from the bounded write buffer."""
    with trio.fail_after(5):
        async with fake_openai_server() as server:
            agent = make_agent(server.url, send_timeout_s=0.3)
            await agent.connect(CALL)
            server.sessions[0].stall()  # stops reading: TCP backpressure
            chunk = b"\xff" * 48_000
            errors: list[ConnectionClosed] = []

            async def run() -> None:
                try:
                    await agent.run()
                except ConnectionClosed as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                while not errors:
                    try:
                        agent.send_audio(chunk)
                    except ConnectionClosed as exc:
                        errors.append(exc)
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            assert isinstance(errors[0], SendTimedOut)
            await agent.aclose()


async def test_aclose_when_cancelled_still_closes_tcp() -> None:
    with trio.fail_after(5):
        async with fake_openai_server() as server:
            agent = make_agent(server.url)
            await agent.connect(CALL)
            with trio.CancelScope() as scope:
                scope.cancel()  # e.g. from the finally of a cancelled call
                try:
                    await agent.aclose()
                except trio.Cancelled:
                    pass
            assert agent._ws is not None
            stream = agent._ws.stream
            assert isinstance(stream, trio.SocketStream) and stream.socket.fileno() == -1
            await server.sessions[0].wait_closed()


# --- reconnect ------------------------------------------------------------------------------
def reconnecting_agent(url: str, timeout_s: float = 3.0, **kw: Any) -> OpenAIRealtimeAgent:
    kw.setdefault("api_key", KEY)
    kw.setdefault("connect_timeout_s", 3.0)
    return OpenAIRealtimeAgent(
        OpenAIOptions(url=url, **kw),
        reconnect=True,
        reconnect_timeout_s=timeout_s,
        liveness=LivenessOptions(ping_interval_s=0.2, dead_after_s=1.0),
    )


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await trio.sleep(0.005)


def final_transcripts(events: list[AgentEvent]) -> list[str]:
    return [e.text for e in events if isinstance(e, AgentTranscript) and e.final]


async def test_reactor_fast_path_only_without_reconnect() -> None:
    with trio.fail_after(5):
        async with fake_openai_server() as server:
            plain = make_agent(server.url)
            await plain.connect(CALL)
            assert plain.reactor_socket() is not None  # the engine reads the socket itself
            recovering = reconnecting_agent(server.url)
            await recovering.connect(CALL)
            assert recovering.reactor_socket() is None  # the socket changes under the engine
            await plain.aclose()
            await recovering.aclose()


async def test_reconnect_seeds_a_new_session_and_keeps_the_gap_audio() -> None:
    """The connection drops: a new session gets the same configuration, the conversation
    so far as text items (no greeting, no response.create), then the caller audio sent
    meanwhile, in order; a result for the old session's tool call is not sent to it."""
    registry = default_registry()
    with trio.fail_after(10):
        async with fake_openai_server(response_ms=200, response_transcript="Welcome!") as server:
            agent = reconnecting_agent(
                server.url,
                greeting="Welcome!",
                instructions="Be brief.",
                tools=registry.schemas_openai(),
            )
            await agent.connect(CALL)
            first = server.sessions[0]
            events: list[AgentEvent] = []

            async def read() -> None:
                while True:
                    events.extend(await agent.receive())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(agent.run)
                nursery.start_soon(read)
                await until(lambda: "Welcome!" in final_transcripts(events))
                user = await first.speech_started()
                await first.caller_transcript("A table for two.", user)
                await first.send_response(100, transcript="For what time?")
                call_id = await first.send_function_call("get_time", {})
                await until(lambda: any(isinstance(e, AgentToolCall) for e in events))
                await first.abort()
                frame = 0
                while len(server.sessions) < 2 or not server.sessions[1].configured:
                    agent.send_audio(bytes([frame % 256]) * 160)  # 20 ms, numbered
                    frame += 1
                    await trio.sleep(0.01)
                second = server.sessions[1]
                agent.send_tool_result(call_id, "{}")  # issued by the lost session: dropped
                for _ in range(5):
                    agent.send_audio(bytes([frame % 256]) * 160)
                    frame += 1
                last = (frame - 1) % 256
                await second.wait_for(lambda s: len(s.audio_in) > 0 and s.audio_in[-1] == last)
                assert second.items_seeded == [
                    ("assistant", "Welcome!"),
                    ("user", "A table for two."),
                    ("assistant", "For what time?"),
                ]
                assert not second.item_errors and not second.response_creates
                update = second.session_updates[0]
                assert update["instructions"].startswith("Be brief.\n\n")
                assert update["audio"] == first.session_updates[0]["audio"]
                assert update["tools"] == first.session_updates[0]["tools"]
                types = [e["type"] for e in second.received]
                assert types[:4] == ["session.update"] + ["conversation.item.create"] * 3
                # the gap's audio first, then what followed: nothing lost, nothing reordered
                numbers = [second.audio_in[i] for i in range(0, len(second.audio_in), 160)]
                assert numbers == [n % 256 for n in range(frame - len(numbers), frame)]
                assert agent.kept_audio >= 1 and agent.reconnects == 1
                assert agent.protocol.dropped_results == 1 and not second.tool_outputs
                reply = await second.send_response(100, transcript="At eight?")
                await until(lambda: "At eight?" in final_transcripts(events))
                assert audio_of(events, reply) == tone(100, "pcmu", server.options.tone_hz)
                nursery.cancel_scope.cancel()
            await agent.aclose()


async def test_reconnect_that_fails_ends_the_session() -> None:
    with trio.fail_after(5):
        async with fake_openai_server() as server:
            agent = reconnecting_agent(server.url, timeout_s=0.5)
            await agent.connect(CALL)
            server.options.reject_status = 503  # no new session to be had
            await server.sessions[0].abort()
            ran: list[AgentError] = []

            async def run() -> None:
                try:
                    await agent.run()
                except AgentError as exc:
                    ran.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                with pytest.raises(AgentError) as info:
                    while True:
                        await agent.receive()
            assert info.value.kind == "agent_disconnected" and ran == [info.value]
            assert "not recovered within 0.5 s" in str(info.value)
            with pytest.raises(AgentError):
                agent.send_audio(b"\xff" * 160)
            await agent.aclose()


async def test_fake_refuses_items_the_real_api_refuses() -> None:
    with trio.fail_after(5):
        async with fake_openai_server() as server:
            agent = make_agent(server.url)
            await agent.connect(CALL)
            session = server.sessions[0]

            def message(role: str, ctype: str, text: Any = "x") -> dict[str, Any]:
                return {"type": "message", "role": role, "content": [{"type": ctype, "text": text}]}

            bad = [
                message("narrator", "input_text"),
                message("assistant", "text"),  # beta's name; this is a GA session
                message("assistant", "output_audio"),  # cannot populate assistant audio
                message("user", "output_text"),
                message("user", "input_text", 1),
                {"type": "function_call_output", "call_id": "call_never_made", "output": "{}"},
                {"type": "note"},
            ]
            for item in bad:
                agent._socket().send_text_nowait(
                    json.dumps({"type": "conversation.item.create", "item": item})
                )
            events = await collect(agent, lambda ev: len(errors(ev)) >= len(bad))
            assert len(errors(events)) == len(bad) and not any(e.fatal for e in errors(events))
            assert [e["item"] for e in session.item_errors] == bad
            assert session.items_created == []
            await agent.aclose()


def test_from_config_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    agent = OpenAIRealtimeAgent.from_config(
        {"api_key": "sk-x-000000000000", "reconnect": "true", "reconnect_timeout_s": 4}
    )
    assert agent.reconnect is True and agent.reconnect_timeout_s == 4.0
    assert "reconnect=True" in repr(agent)
    agent = OpenAIRealtimeAgent.from_config({"api_key": "sk-x-000000000000"})
    assert agent.reconnect is False
    with pytest.raises(ConfigError):
        OpenAIRealtimeAgent.from_config({"api_key": "k", "reconnect_timeout_s": -1})
