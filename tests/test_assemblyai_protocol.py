"""relay.agents.assemblyai_protocol: the sans-IO core (no sockets, no Trio)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.agents.assemblyai_protocol import (
    AssemblyAIOptions,
    AssemblyAIProtocol,
    normalize_tool,
)
from relay.agents.base import (
    AgentAudio,
    AgentErrorEvent,
    AgentHangup,
    AgentResponseDone,
    AgentSpeechStarted,
    AgentSpeechStopped,
    AgentToolCall,
    AgentTranscript,
)
from relay.errors import ConfigError, RemoteProtocolError

TOOL = {"type": "function", "name": "get_time", "description": "Time.", "parameters": {}}


def proto(**kw: Any) -> AssemblyAIProtocol:
    kw.setdefault("api_key", "aai-key-0123456789")
    return AssemblyAIProtocol(AssemblyAIOptions(**kw))


def feed(p: AssemblyAIProtocol, *events: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    for event in events:
        out += p.parse_message(json.dumps(event))
    return out


def audio(data: bytes) -> dict[str, Any]:
    return {"type": "reply.audio", "data": base64.b64encode(data).decode()}


def ready(p: AssemblyAIProtocol, sid: str = "sess_1") -> None:
    assert feed(p, {"type": "session.ready", "session_id": sid}) == []
    assert p.ready and p.session_id == sid


# --- client messages ---------------------------------------------------------------------------
def test_session_update_is_pcmu_both_ways() -> None:
    p = proto(
        instructions="Be brief.",
        greeting="Hi!",
        voice="Ivy ",
        tools=[{"type": "function", "function": {"name": "get_time", "description": "Time."}}],
        turn_detection={"vad_threshold": 0.4},
        session_extra={"output": {"volume": 80}, "max_session_duration_seconds": 600},
    )
    msg = json.loads(p.session_update())
    assert msg["type"] == "session.update"
    s = msg["session"]
    assert s["input"]["format"] == {"encoding": "audio/pcmu", "sample_rate": 8000}
    assert s["output"]["format"] == {"encoding": "audio/pcmu", "sample_rate": 8000}
    assert s["output"]["voice"] == "ivy"  # voice names are lowercase
    assert s["output"]["volume"] == 80 and s["max_session_duration_seconds"] == 600
    assert s["input"]["turn_detection"] == {"vad_threshold": 0.4}
    assert s["system_prompt"] == "Be brief." and s["greeting"] == "Hi!"
    assert s["tools"] == [
        {
            "type": "function",
            "name": "get_time",
            "description": "Time.",
            "parameters": {"type": "object", "properties": {}},
        }
    ]
    # a session that continues the call: context in the prompt, no greeting
    seeded = json.loads(p.session_update(context="Caller: hello", greeting=False))["session"]
    assert seeded["system_prompt"] == "Be brief.\n\nCaller: hello"
    assert "greeting" not in seeded


def test_resume_end_and_headers() -> None:
    p = proto()
    with pytest.raises(ValueError):
        p.session_resume()
    ready(p, "sess_42")
    assert json.loads(p.session_resume()) == {"type": "session.resume", "session_id": "sess_42"}
    assert json.loads(p.session_end()) == {"type": "session.end"}
    assert p.handshake_headers() == [("Authorization", "Bearer aai-key-0123456789")]


@given(st.binary(max_size=400))
def test_input_audio_b64_is_the_twilio_payload_untouched(data: bytes) -> None:
    p = proto()
    payload = base64.b64encode(data).decode()
    msg = p.input_audio_b64(payload)
    assert json.loads(msg) == {"type": "input.audio", "audio": payload}
    assert payload in msg  # the very same string, no re-encoding
    assert json.loads(p.input_audio(data)) == {"type": "input.audio", "audio": payload}


@given(st.text(max_size=50))
def test_input_audio_b64_escapes_hostile_text(text: str) -> None:
    assert json.loads(proto().input_audio_b64(text)) == {"type": "input.audio", "audio": text}


def test_options_validation_and_masking() -> None:
    with pytest.raises(ConfigError, match="url"):
        AssemblyAIOptions(url="https://agents.assemblyai.com/v1/ws")
    with pytest.raises(ConfigError, match="api_key"):
        AssemblyAIOptions(api_key="key with space")
    with pytest.raises(ConfigError, match="connect_timeout_s"):
        AssemblyAIOptions(connect_timeout_s=0)
    with pytest.raises(ConfigError, match="tools"):
        normalize_tool({"description": "no name"})
    text = repr(AssemblyAIOptions(api_key="aai-SECRETSECRETSECRET-wxyz"))
    assert "SECRETSECRET" not in text and "wxyz" in text


# --- server messages ---------------------------------------------------------------------------
def test_reply_audio_gets_the_reply_id_of_reply_started() -> None:
    p = proto()
    ready(p)
    events = feed(
        p,
        {"type": "reply.started", "reply_id": "r1"},
        audio(b"\x01" * 160),
        audio(b"\x02" * 80),
        {"type": "transcript.agent", "text": "Hello there.", "reply_id": "r1"},
        {"type": "reply.done", "status": "completed"},
    )
    assert events == [
        AgentAudio(b"\x01" * 160, "1:r1"),
        AgentAudio(b"\x02" * 80, "1:r1"),
        AgentTranscript("agent", "Hello there."),
        AgentResponseDone("1:r1"),
    ]
    assert list(p.history) == [("agent", "Hello there.")]


def test_audio_without_reply_started_gets_a_synthetic_reply() -> None:
    p = proto()
    ready(p)
    (ev,) = feed(p, audio(b"\x05" * 8))
    assert isinstance(ev, AgentAudio) and ev.response_id.startswith("1:reply-")


def test_interrupted_reply_drops_audio_still_in_flight() -> None:
    p = proto()
    ready(p)
    feed(p, {"type": "reply.started", "reply_id": "r1"}, audio(b"\x01" * 160))
    assert feed(p, {"type": "input.speech.started"}) == [AgentSpeechStarted()]
    # chunks in flight, then the interruption, then more stale audio
    events = feed(
        p,
        audio(b"\x02" * 160),  # the engine drops these by reply id (it cleared already)
        {"type": "reply.done", "status": "interrupted"},
        audio(b"\x03" * 160),
        audio(b"\x04" * 160),
    )
    assert events == [AgentAudio(b"\x02" * 160, "1:r1"), AgentResponseDone("1:r1")]
    assert p.dropped_audio_chunks == 2
    # the next reply plays normally
    events = feed(p, {"type": "reply.started", "reply_id": "r2"}, audio(b"\x05" * 10))
    assert events == [AgentAudio(b"\x05" * 10, "1:r2")]


def test_interruption_without_speech_event_still_clears() -> None:
    p = proto()
    ready(p)
    feed(p, {"type": "reply.started", "reply_id": "r1"}, audio(b"\x01" * 16))
    events = feed(p, {"type": "reply.done", "status": "interrupted"})
    assert events == [AgentSpeechStarted(), AgentResponseDone("1:r1")]


def test_vad_and_caller_transcripts() -> None:
    p = proto()
    ready(p)
    events = feed(
        p,
        {"type": "input.speech.started"},
        {"type": "transcript.user.delta", "text": "What's the"},
        {"type": "input.speech.stopped"},
        {"type": "transcript.user", "text": "What's the weather?", "item_id": "i1"},
    )
    assert events == [
        AgentSpeechStarted(),
        AgentTranscript("caller", "What's the", final=False),
        AgentSpeechStopped(),
        AgentTranscript("caller", "What's the weather?"),
    ]
    assert list(p.history) == [("caller", "What's the weather?")]


def test_tool_result_is_held_until_reply_done() -> None:
    p = proto()
    ready(p)
    events = feed(
        p,
        {"type": "reply.started", "reply_id": "r1"},
        {"type": "tool.call", "call_id": "c1", "name": "get_time", "arguments": {"tz": "UTC"}},
    )
    assert events == [AgentToolCall("c1", "get_time", '{"tz":"UTC"}')]
    assert p.tool_result("c1", '{"t": 1}') == []  # reply.done not seen yet: held
    assert p.outbox == []
    assert feed(p, {"type": "reply.done"}) == [AgentResponseDone("1:r1")]
    (msg,) = p.take_outbox()
    assert json.loads(msg) == {"type": "tool.result", "call_id": "c1", "result": '{"t": 1}'}
    assert p.tool_result("c1", "again") == []  # answered already: never twice
    assert p.unknown_tool_results == 1


def test_tool_result_after_reply_done_goes_at_once() -> None:
    p = proto()
    ready(p)
    feed(
        p,
        {"type": "reply.started", "reply_id": "r1"},
        {"type": "tool.call", "call_id": "c1", "name": "f", "args": {}},  # older docs: args
        {"type": "reply.done"},
    )
    (msg,) = p.tool_result("c1", "ok")
    assert json.loads(msg)["call_id"] == "c1"
    assert p.tool_result("nope", "x") == [] and p.unknown_tool_results == 1


def test_tool_call_reported_once_and_outside_a_reply() -> None:
    p = proto()
    ready(p)
    call = {"type": "tool.call", "call_id": "c9", "name": "f", "arguments": "{}"}
    assert feed(p, call, call) == [AgentToolCall("c9", "f", "{}")]
    assert len(p.tool_result("c9", "ok")) == 1  # no reply open: ready at once


def test_errors_before_and_after_ready() -> None:
    p = proto()
    (ev,) = feed(p, {"type": "session.error", "code": "invalid_voice", "message": "bad voice"})
    assert ev == AgentErrorEvent("invalid_voice", "bad voice", fatal=True)
    assert p.session_error == ev  # connect fails with it
    ready(p)
    assert feed(p, {"type": "session.error", "code": "unknown_call_id", "message": "x"}) == [
        AgentErrorEvent("unknown_call_id", "x", fatal=False)
    ]
    events = feed(p, {"type": "session.error", "code": "insufficient_funds", "message": "pay"})
    assert events == [
        AgentHangup("agent error: insufficient_funds"),
        AgentErrorEvent("insufficient_funds", "pay", fatal=True),
    ]
    assert p.ended
    # odd shapes never become protocol errors
    assert feed(proto(), {"type": "session.error", "error": {"code": 5}})[0].code == "5"


def test_session_ended_hangs_up_after_the_reply() -> None:
    p = proto()
    ready(p)
    feed(p, {"type": "reply.started", "reply_id": "r1"}, audio(b"\x01"))
    assert feed(p, {"type": "session.ended"}) == [
        AgentResponseDone("1:r1"),
        AgentHangup("agent ended"),
    ]
    assert p.ended


def test_new_session_after_a_lost_connection() -> None:
    p = proto()
    ready(p)
    feed(
        p,
        {"type": "reply.started", "reply_id": "r1"},
        audio(b"\x01"),
        {"type": "tool.call", "call_id": "c1", "name": "f", "arguments": {}},
    )
    assert p.connection_lost() == [AgentResponseDone("1:r1")]
    assert not p.ready
    # resume: same session, the call stays answerable, the cut-off reply stays dropped
    p.begin_connection("resume")
    ready(p)
    assert feed(p, audio(b"\x02")) == []
    assert feed(p, {"type": "reply.done"}) == []
    assert len(p.take_outbox()) == 0 and len(p.tool_result("c1", "ok")) == 1
    # seeded: a new session, ids namespaced anew, old calls forgotten
    feed(p, {"type": "tool.call", "call_id": "c2", "name": "f", "arguments": {}})
    p.connection_lost()
    p.begin_connection("seeded")
    assert p.session_id is None and p.generation == 2
    ready(p, "sess_2")
    assert p.tool_result("c2", "late") == []
    events = feed(p, {"type": "reply.started", "reply_id": "r1"}, audio(b"\x03"))
    assert events == [AgentAudio(b"\x03", "2:r1")]  # never collides with "1:r1"


@pytest.mark.parametrize(
    "message",
    [
        "not json",
        "[1, 2]",
        '{"type": "reply.audio", "data": 5}',
        '{"type": "reply.audio", "data": "@@@"}',
        '{"type": "transcript.user", "text": null}',
        '{"type": "tool.call", "call_id": "c", "name": "f", "arguments": [1]}',
        b"\x00binary",
    ],
)
def test_malformed_input_is_a_remote_protocol_error(message: str | bytes) -> None:
    p = proto()
    ready(p)
    with pytest.raises(RemoteProtocolError) as info:
        p.parse_message(message)
    assert info.value.kind == "agent_protocol"


def test_unknown_events_are_ignored_and_counted() -> None:
    p = proto()
    assert feed(p, {"type": "session.updated"}, {"type": "brand.new"}, {"no": "type"}) == []
    assert p.ignored == 2 and p.ignored_types["brand.new"] == 1


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_types = st.sampled_from(
    [
        "session.ready",
        "session.error",
        "session.ended",
        "input.speech.started",
        "input.speech.stopped",
        "transcript.user.delta",
        "transcript.user",
        "transcript.agent",
        "reply.started",
        "reply.audio",
        "reply.done",
        "tool.call",
        "whatever",
    ]
)


@given(
    st.lists(
        st.tuples(
            _types,
            st.dictionaries(
                st.sampled_from(
                    [
                        "data",
                        "text",
                        "reply_id",
                        "status",
                        "call_id",
                        "name",
                        "arguments",
                        "code",
                        "session_id",
                    ]
                ),
                _json,
                max_size=4,
            ),
        ),
        max_size=30,
    )
)
def test_any_event_sequence_only_raises_protocol_errors(
    events: list[tuple[str, dict[str, Any]]],
) -> None:
    p = proto()
    for etype, fields in events:
        try:
            out = p.parse_message(json.dumps({"type": etype, **fields}))
        except RemoteProtocolError:
            continue
        for ev in out:
            if isinstance(ev, AgentAudio):
                assert ev.response_id.startswith(f"{p.generation}:")
        p.take_outbox()
