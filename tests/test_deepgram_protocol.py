"""relay.agents.deepgram_protocol: the sans-IO core (no sockets, no Trio)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.agents.base import (
    AgentAudio,
    AgentErrorEvent,
    AgentHangup,
    AgentResponseDone,
    AgentSpeechStarted,
    AgentToolCall,
    AgentTranscript,
)
from relay.agents.deepgram_protocol import DeepgramOptions, DeepgramProtocol
from relay.errors import ConfigError, RemoteProtocolError


def proto(**kw: Any) -> DeepgramProtocol:
    kw.setdefault("api_key", "dg-key-0123456789")
    return DeepgramProtocol(DeepgramOptions(**kw))


def feed(p: DeepgramProtocol, *messages: dict[str, Any] | bytes) -> list[Any]:
    out: list[Any] = []
    for message in messages:
        out += p.parse_message(message if isinstance(message, bytes) else json.dumps(message))
    return out


def configured(p: DeepgramProtocol) -> None:
    assert feed(p, {"type": "Welcome", "request_id": "req-1"}, {"type": "SettingsApplied"}) == []
    assert p.configured and p.request_id == "req-1"


# --- client messages ---------------------------------------------------------------------------
def test_settings_mulaw_both_ways_and_agent_parts() -> None:
    p = proto(
        instructions="Be brief.",
        greeting="Hello!",
        think_model="gpt-4.1-mini",
        speak_model="aura-2-orion-en",
        tools=[{"type": "function", "name": "get_time", "description": "Time.", "parameters": {}}],
        settings_extra={
            "tags": ["relay"],
            "agent": {"listen": {"provider": {"smart_format": True}}},
        },
    )
    msg = json.loads(p.settings())
    assert msg["type"] == "Settings" and msg["tags"] == ["relay"]
    assert msg["audio"] == {
        "input": {"encoding": "mulaw", "sample_rate": 8000},
        "output": {"encoding": "mulaw", "sample_rate": 8000, "container": "none"},
    }
    agent = msg["agent"]
    assert agent["language"] == "en" and agent["greeting"] == "Hello!"
    assert agent["listen"] == {
        "provider": {"type": "deepgram", "model": "nova-3", "smart_format": True}
    }
    assert agent["think"]["provider"] == {"type": "open_ai", "model": "gpt-4.1-mini"}
    assert agent["think"]["prompt"] == "Be brief."
    assert agent["think"]["functions"] == [
        {"name": "get_time", "description": "Time.", "parameters": {}}
    ]
    assert agent["speak"] == {"provider": {"type": "deepgram", "model": "aura-2-orion-en"}}
    seeded = json.loads(p.settings(context="Caller: hi", greeting=False))["agent"]
    assert seeded["think"]["prompt"] == "Be brief.\n\nCaller: hi" and "greeting" not in seeded
    assert p.handshake_headers() == [("Authorization", "Token dg-key-0123456789")]
    assert json.loads(p.keepalive()) == {"type": "KeepAlive"}


def test_raw_listen_think_speak_tables_win() -> None:
    think = {"provider": {"type": "anthropic", "model": "claude-x"}, "endpoint": {"url": "u"}}
    p = proto(
        listen={"provider": {"type": "deepgram", "model": "flux-general-en"}},
        think=think,
        speak={"provider": {"type": "eleven_labs", "model_id": "a"}},
        instructions="Hi.",
    )
    agent = json.loads(p.settings())["agent"]
    assert agent["listen"]["provider"]["model"] == "flux-general-en"
    assert agent["think"] == {**think, "prompt": "Hi."}
    assert think == {
        "provider": {"type": "anthropic", "model": "claude-x"},
        "endpoint": {"url": "u"},
    }
    assert agent["speak"] == {"provider": {"type": "eleven_labs", "model_id": "a"}}


def test_options_validation_and_masking() -> None:
    with pytest.raises(ConfigError, match="url"):
        DeepgramOptions(url="http://x")
    with pytest.raises(ConfigError, match="keepalive_s"):
        DeepgramOptions(keepalive_s=0)
    with pytest.raises(ConfigError, match="think_model"):
        DeepgramOptions(think_model="")
    with pytest.raises(ConfigError, match="api_key"):
        DeepgramOptions(api_key="a b")
    text = repr(DeepgramOptions(api_key="dg-SECRETSECRETSECRET-wxyz"))
    assert "SECRETSECRET" not in text and "wxyz" in text


# --- server messages ---------------------------------------------------------------------------
def test_binary_audio_is_numbered_into_replies() -> None:
    p = proto()
    configured(p)
    events = feed(
        p,
        {"type": "ConversationText", "role": "assistant", "content": "Hello."},
        {"type": "AgentStartedSpeaking", "total_latency": 0.2},
        b"\x01" * 160,
        b"\x02" * 80,
        {"type": "AgentAudioDone"},
        {"type": "AgentStartedSpeaking"},
        b"\x03" * 8,
        {"type": "AgentAudioDone"},
    )
    assert events == [
        AgentTranscript("agent", "Hello."),
        AgentAudio(b"\x01" * 160, "1:0"),
        AgentAudio(b"\x02" * 80, "1:0"),
        AgentResponseDone("1:0"),
        AgentAudio(b"\x03" * 8, "1:1"),
        AgentResponseDone("1:1"),
    ]
    assert list(p.history) == [("agent", "Hello.")]
    assert feed(p, b"") == []


def test_barge_in_starts_a_new_reply() -> None:
    p = proto()
    configured(p)
    feed(p, b"\x01" * 160)
    events = feed(
        p,
        {"type": "UserStartedSpeaking"},
        {"type": "ConversationText", "role": "user", "content": "Stop."},
        b"\x02" * 16,
    )
    assert events == [
        AgentSpeechStarted(),
        AgentTranscript("caller", "Stop."),
        AgentAudio(b"\x02" * 16, "1:1"),  # not the interrupted "1:0"
    ]
    assert feed(p, {"type": "UserStartedSpeaking"}, {"type": "UserStartedSpeaking"}) == [
        AgentSpeechStarted(),
        AgentSpeechStarted(),
    ]


def test_function_calls_client_side_only_and_cancellation() -> None:
    p = proto()
    configured(p)
    events = feed(
        p,
        {
            "type": "FunctionCallRequest",
            "functions": [
                {"id": "f1", "name": "get_time", "arguments": '{"tz":"UTC"}', "client_side": True},
                {"id": "f2", "name": "server_fn", "arguments": "{}", "client_side": False},
                {"id": "f3", "name": "book", "arguments": "{}", "client_side": True},
            ],
        },
    )
    assert events == [
        AgentToolCall("f1", "get_time", '{"tz":"UTC"}'),
        AgentToolCall("f3", "book", "{}"),
    ]
    assert p.server_side_calls == 1
    response = p.function_response("f1", '{"t": 1}')
    assert response is not None and json.loads(response) == {
        "type": "FunctionCallResponse",
        "id": "f1",
        "name": "get_time",
        "content": '{"t": 1}',
    }
    assert p.function_response("f1", "again") is None  # answered already
    assert feed(p, {"type": "FunctionCallCancelled", "functions": [{"id": "f3"}]}) == []
    assert p.function_response("f3", "late") is None  # cancelled: never answered
    assert p.function_response("f2", "x") is None  # the server's own function
    assert p.dropped_results == 3
    # a re-sent request for a cancelled call is not reported again
    again = {"id": "f3", "name": "book", "arguments": "{}", "client_side": True}
    assert feed(p, {"type": "FunctionCallRequest", "functions": [again]}) == []


def test_error_is_fatal_warning_is_not() -> None:
    p = proto()
    (ev,) = feed(p, {"type": "Error", "code": "INVALID_SETTINGS", "description": "bad"})
    assert ev == AgentErrorEvent("INVALID_SETTINGS", "bad", fatal=True) and p.session_error == ev
    p = proto()
    configured(p)
    assert feed(p, {"type": "Warning", "code": "SLOW", "description": "meh"}) == [
        AgentErrorEvent("SLOW", "meh", fatal=False)
    ]
    feed(p, b"\x01")
    assert feed(p, {"type": "Error", "code": "FAILED_TO_THINK", "description": "llm down"}) == [
        AgentResponseDone("1:0"),
        AgentHangup("agent error: FAILED_TO_THINK"),
        AgentErrorEvent("FAILED_TO_THINK", "llm down", fatal=True),
    ]
    assert p.ended


def test_new_session_after_a_lost_connection() -> None:
    p = proto()
    configured(p)
    feed(
        p,
        {"type": "ConversationText", "role": "user", "content": "Hi"},
        b"\x01",
        {
            "type": "FunctionCallRequest",
            "functions": [{"id": "f1", "name": "x", "arguments": "{}", "client_side": True}],
        },
    )
    assert p.connection_lost() == [AgentResponseDone("1:0")]
    p.begin_connection()
    assert p.generation == 2 and not p.configured
    configured(p)
    assert p.function_response("f1", "stale") is None  # void in the new session
    assert feed(p, b"\x02") == [AgentAudio(b"\x02", "2:0")]
    assert list(p.history) == [("caller", "Hi")]


@pytest.mark.parametrize(
    "message",
    [
        "not json",
        "[]",
        '{"type": "ConversationText", "role": "user", "content": 5}',
        '{"type": "FunctionCallRequest", "functions": "f"}',
        '{"type": "FunctionCallRequest", "functions": [{"id": 1, "name": "f"}]}',
        '{"type": "FunctionCallRequest", "functions": [{"id": "1", "name": "f",'
        ' "client_side": true, "arguments": [1]}]}',
    ],
)
def test_malformed_control_messages(message: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        proto().parse_message(message)
    assert info.value.kind == "agent_protocol"


def test_unknown_and_informational_events_are_ignored() -> None:
    p = proto()
    events = feed(
        p,
        {"type": "AgentThinking", "content": "hmm"},
        {"type": "PromptUpdated"},
        {"type": "FunctionCallResponse", "id": "s1", "content": "server did it"},
        {"type": "ConversationText", "role": "system", "content": "x"},
    )
    assert events == [] and p.ignored == 3


@given(
    st.lists(
        st.one_of(
            st.binary(max_size=50),
            st.sampled_from(
                [
                    {"type": "UserStartedSpeaking"},
                    {"type": "AgentStartedSpeaking"},
                    {"type": "AgentAudioDone"},
                    {"type": "SettingsApplied"},
                    {"type": "ConversationText", "role": "assistant", "content": "x"},
                ]
            ),
        ),
        max_size=40,
    )
)
def test_audio_always_belongs_to_an_open_reply(messages: list[Any]) -> None:
    """Whatever the order, audio after a reply was closed (done, interrupted) never carries
    that reply's id again."""
    p = proto()
    closed: set[str] = set()
    for message in messages:
        for ev in feed(p, message):
            if isinstance(ev, AgentAudio):
                assert ev.response_id not in closed
            elif isinstance(ev, AgentResponseDone):
                closed.add(ev.response_id)
        if message == {"type": "UserStartedSpeaking"}:
            closed.update(f"1:{n}" for n in range(p._n))
