"""relay.agents.openai_protocol: sans-IO OpenAI Realtime core (GA and beta)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.agents.base import (
    AgentAudio,
    AgentErrorEvent,
    AgentResponseDone,
    AgentSpeechStarted,
    AgentSpeechStopped,
    AgentToolCall,
    AgentTranscript,
)
from relay.agents.openai_protocol import (
    SESSION_UPDATE_EVENT_ID,
    OpenAIOptions,
    OpenAIRealtimeProtocol,
    mask_secret,
)
from relay.errors import ConfigError, RemoteProtocolError

TOOL = {
    "type": "function",
    "name": "get_time",
    "description": "Get the time.",
    "parameters": {"type": "object", "properties": {}},
}


def proto(**kw: Any) -> OpenAIRealtimeProtocol:
    kw.setdefault("api_key", "sk-test-0123456789abcd")
    return OpenAIRealtimeProtocol(OpenAIOptions(**kw))


def ev(**fields: Any) -> str:
    return json.dumps(fields)


def one_error(events: list[Any]) -> AgentErrorEvent:
    [e] = events
    assert isinstance(e, AgentErrorEvent)
    return e


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- options ---------------------------------------------------------------------------
def test_options_validation() -> None:
    with pytest.raises(ConfigError):
        OpenAIOptions(audio="opus")
    with pytest.raises(ConfigError):
        OpenAIOptions(api="v2")
    with pytest.raises(ConfigError):
        OpenAIOptions(url="https://api.openai.com/v1/realtime")
    with pytest.raises(ConfigError):
        OpenAIOptions(connect_timeout_s=0)
    with pytest.raises(ConfigError):
        OpenAIOptions(tools=[{"description": "no name"}])


def test_options_repr_masks_key() -> None:
    key = "sk-proj-SECRETSECRETSECRET1234abcd"
    r = repr(OpenAIOptions(api_key=key))
    assert key not in r and "SECRET" not in r
    assert "sk-…abcd" in r
    assert mask_secret("") == "<unset>"
    assert "short" not in mask_secret("short")


def test_chat_completions_tool_shape_is_flattened() -> None:
    o = OpenAIOptions(tools=[{"type": "function", "function": TOOL}])
    assert o.tools[0] == TOOL


# --- URL and headers -------------------------------------------------------------------
def test_ws_url_and_headers() -> None:
    p = proto()
    assert p.ws_url() == "wss://api.openai.com/v1/realtime?model=gpt-realtime"
    assert p.handshake_headers() == [("Authorization", "Bearer sk-test-0123456789abcd")]
    p = proto(url="ws://127.0.0.1:9/v1/realtime?region=eu", model="m 1", api="beta")
    assert p.ws_url() == "ws://127.0.0.1:9/v1/realtime?region=eu&model=m%201"
    assert ("OpenAI-Beta", "realtime=v1") in p.handshake_headers()
    # an explicit model in the URL wins, unchanged
    p = proto(url="wss://x/v1/realtime?model=gpt-4o-realtime-preview")
    assert p.ws_url() == "wss://x/v1/realtime?model=gpt-4o-realtime-preview"


# --- session.update ---------------------------------------------------------------------
def test_session_update_ga_pcmu() -> None:
    p = proto(instructions="Be brief.", tools=[TOOL], transcription_model="gpt-4o-transcribe")
    msg = json.loads(p.session_update())
    assert msg["type"] == "session.update"
    assert msg["event_id"] == SESSION_UPDATE_EVENT_ID
    s = msg["session"]
    assert s["type"] == "realtime"
    assert s["model"] == "gpt-realtime"
    assert s["output_modalities"] == ["audio"]
    assert s["instructions"] == "Be brief."
    assert s["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    assert s["audio"]["input"]["turn_detection"] == {"type": "server_vad"}
    assert s["audio"]["input"]["transcription"] == {"model": "gpt-4o-transcribe"}
    assert s["audio"]["output"] == {"format": {"type": "audio/pcmu"}, "voice": "marin"}
    assert s["tools"] == [TOOL]
    assert s["tool_choice"] == "auto"
    for beta_key in ("input_audio_format", "output_audio_format", "modalities", "voice"):
        assert beta_key not in s


def test_session_update_ga_pcm24k_and_turn_detection() -> None:
    p = proto(audio="pcm24k", turn_detection={"type": "semantic_vad", "eagerness": "low"})
    s = json.loads(p.session_update())["session"]
    assert s["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert s["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert s["audio"]["input"]["turn_detection"] == {"type": "semantic_vad", "eagerness": "low"}
    assert "tools" not in s and "instructions" not in s
    s = json.loads(proto(turn_detection={"type": "none"}).session_update())["session"]
    assert s["audio"]["input"]["turn_detection"] is None


def test_session_update_beta() -> None:
    p = proto(api="beta", voice="alloy", tools=[TOOL], transcription_model="whisper-1")
    s = json.loads(p.session_update())["session"]
    assert s["input_audio_format"] == s["output_audio_format"] == "g711_ulaw"
    assert s["modalities"] == ["audio", "text"]
    assert s["voice"] == "alloy"
    assert s["turn_detection"] == {"type": "server_vad"}
    assert s["input_audio_transcription"] == {"model": "whisper-1"}
    assert s["tools"] == [TOOL]
    assert "type" not in s and "audio" not in s and "output_modalities" not in s
    s = json.loads(proto(api="beta", audio="pcm24k").session_update())["session"]
    assert s["input_audio_format"] == s["output_audio_format"] == "pcm16"


def test_session_extra_deep_merge() -> None:
    extra = {
        "audio": {"input": {"noise_reduction": {"type": "near_field"}}},
        "max_output_tokens": 512,
    }
    s = json.loads(proto(session_extra=extra).session_update())["session"]
    assert s["audio"]["input"]["noise_reduction"] == {"type": "near_field"}
    assert s["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    assert s["max_output_tokens"] == 512


# --- client messages --------------------------------------------------------------------
def test_greeting_messages() -> None:
    assert proto().greeting_messages() == []
    msgs = [json.loads(m) for m in proto(greeting='Hi, "Acme" here!').greeting_messages()]
    assert [m["type"] for m in msgs] == ["conversation.item.create", "response.create"]
    item = msgs[0]["item"]
    assert item["type"] == "message" and item["role"] == "user"
    assert item["content"][0]["type"] == "input_text"
    assert 'Hi, "Acme" here!' in item["content"][0]["text"]


@given(st.binary(max_size=2000))
def test_append_fast_path_matches_json(audio: bytes) -> None:
    p = proto()
    payload = b64(audio)
    fast = p.append_audio_b64(payload)
    assert json.loads(fast) == {"type": "input_audio_buffer.append", "audio": payload}
    assert fast == json.dumps(
        {"type": "input_audio_buffer.append", "audio": payload}, separators=(",", ":")
    )
    assert p.append_audio(audio) == fast


def test_append_escapes_hostile_payload() -> None:
    bad = 'AAAA","type":"response.create'
    msg = json.loads(proto().append_audio_b64(bad))
    assert msg == {"type": "input_audio_buffer.append", "audio": bad}
    assert json.loads(proto().append_audio_b64("a\\b"))["audio"] == "a\\b"


def test_tool_result_messages() -> None:
    msgs = [json.loads(m) for m in proto().tool_result("call_1", '{"ok": true}')]
    assert msgs[0] == {
        "type": "conversation.item.create",
        "item": {"type": "function_call_output", "call_id": "call_1", "output": '{"ok": true}'},
    }
    assert msgs[1] == {"type": "response.create"}


# --- parse: every mapped event, GA and beta names ------------------------------------------
@pytest.mark.parametrize(("audio", "bpms"), [("pcmu", 8), ("pcm24k", 48)], ids=["pcmu", "pcm24k"])
@pytest.mark.parametrize("name", ["response.output_audio.delta", "response.audio.delta"])
def test_audio_delta_and_generated_ms(name: str, audio: str, bpms: int) -> None:
    p = proto(audio=audio)
    data = bytes(range(256)) * 2
    events = p.parse(ev(type=name, item_id="item_1", response_id="resp_1", delta=b64(data)))
    assert events == [AgentAudio(data, "item_1")]
    p.parse(ev(type=name, item_id="item_1", response_id="resp_1", delta=b64(data)))
    assert p.generated_ms("item_1") == 2 * len(data) // bpms
    assert p.knows_item("item_1") and not p.knows_item("item_2")
    assert p.parse(ev(type=name, item_id="item_1", delta="")) == []


@pytest.mark.parametrize("name", ["response.output_audio.done", "response.audio.done"])
def test_audio_done_once_per_item(name: str) -> None:
    p = proto()
    p.parse(ev(type="response.output_audio.delta", item_id="i1", delta=b64(b"\xff" * 80)))
    assert p.parse(ev(type=name, item_id="i1", response_id="r1")) == [AgentResponseDone("i1")]
    assert p.parse(ev(type=name, item_id="i1", response_id="r1")) == []
    done = {"type": "response.done", "response": {"id": "r1", "status": "completed",
            "output": [{"id": "i1", "type": "message", "role": "assistant"}]}}  # fmt: skip
    assert p.parse(json.dumps(done)) == []


def test_response_done_finishes_items_without_audio_done() -> None:
    p = proto()
    p.parse(ev(type="response.audio.delta", item_id="i1", delta=b64(b"\xff" * 80)))
    done = {
        "type": "response.done",
        "response": {
            "id": "r1",
            "status": "cancelled",
            "output": [
                {"id": "i1", "type": "message", "role": "assistant"},
                {"id": "i_unknown", "type": "message", "role": "assistant"},
                "junk",
            ],
        },
    }
    assert p.parse(json.dumps(done)) == [AgentResponseDone("i1")]
    assert p.parse(json.dumps(done)) == []


def test_response_done_failed_reports_error() -> None:
    p = proto()
    done = {"type": "response.done", "response": {"id": "r", "status": "failed", "output": [],
            "status_details": {"type": "failed", "error": {"type": "insufficient_quota",
                                                            "code": "insufficient_quota",
                                                            "message": "quota"}}}}  # fmt: skip
    [err] = p.parse(json.dumps(done))
    assert err == AgentErrorEvent("insufficient_quota", "quota", fatal=True)


def test_speech_events() -> None:
    p = proto()
    started = ev(type="input_audio_buffer.speech_started", audio_start_ms=100, item_id="u1")
    assert p.parse(started) == [AgentSpeechStarted()]
    stopped = ev(type="input_audio_buffer.speech_stopped", audio_end_ms=900, item_id="u1")
    assert p.parse(stopped) == [AgentSpeechStopped()]


@pytest.mark.parametrize(
    "prefix", ["response.output_audio_transcript", "response.audio_transcript"]
)
def test_agent_transcripts(prefix: str) -> None:
    p = proto()
    assert p.parse(ev(type=f"{prefix}.delta", item_id="i", delta="Hel")) == [
        AgentTranscript("agent", "Hel", final=False)
    ]
    assert p.parse(ev(type=f"{prefix}.delta", item_id="i", delta="")) == []
    assert p.parse(ev(type=f"{prefix}.done", item_id="i", transcript="Hello")) == [
        AgentTranscript("agent", "Hello")
    ]


def test_caller_transcripts() -> None:
    p = proto()
    base = "conversation.item.input_audio_transcription"
    assert p.parse(ev(type=f"{base}.completed", item_id="u", transcript="hi")) == [
        AgentTranscript("caller", "hi")
    ]
    assert p.parse(ev(type=f"{base}.delta", item_id="u", delta="h")) == [
        AgentTranscript("caller", "h", final=False)
    ]
    [err] = p.parse(ev(type=f"{base}.failed", item_id="u", error={"message": "nope"}))
    assert err == AgentErrorEvent("transcription_failed", "nope")


def test_function_call_with_and_without_name() -> None:
    p = proto()
    done = ev(
        type="response.function_call_arguments.done",
        call_id="c1",
        item_id="fc1",
        name="get_time",
        arguments='{"timezone":"UTC"}',
    )
    assert p.parse(done) == [AgentToolCall("c1", "get_time", '{"timezone":"UTC"}')]
    assert p.parse(done) == []  # reported once per call_id
    # name omitted in .done: taken from response.output_item.added
    added = {"type": "response.output_item.added", "response_id": "r", "output_index": 0,
             "item": {"id": "fc2", "type": "function_call", "call_id": "c2", "name": "lookup",
                      "arguments": "", "status": "in_progress"}}  # fmt: skip
    assert p.parse(json.dumps(added)) == []
    done2 = ev(
        type="response.function_call_arguments.done", call_id="c2", item_id="fc2", arguments="{}"
    )
    assert p.parse(done2) == [AgentToolCall("c2", "lookup", "{}")]
    # and the response.done that follows does not repeat it
    fc = {
        "id": "fc2",
        "type": "function_call",
        "call_id": "c2",
        "name": "lookup",
        "arguments": "{}",
    }
    rdone = {
        "type": "response.done",
        "response": {"id": "r", "status": "completed", "output": [fc]},
    }
    assert p.parse(json.dumps(rdone)) == []


def test_function_call_fallback_from_item_done() -> None:
    p = proto()
    item = {"id": "fc", "type": "function_call", "call_id": "c9", "name": "f",
            "arguments": '{"a":1}', "status": "completed"}  # fmt: skip
    msg = {"type": "response.output_item.done", "response_id": "r", "output_index": 0, "item": item}
    assert p.parse(json.dumps(msg)) == [AgentToolCall("c9", "f", '{"a":1}')]


def test_errors_fatal_and_not() -> None:
    p = proto()
    err = {"type": "invalid_request_error", "code": "invalid_value", "message": "bad"}
    assert p.parse(ev(type="error", error=err)) == [AgentErrorEvent("invalid_value", "bad")]
    for code in ("invalid_api_key", "session_expired"):
        e = one_error(
            p.parse(ev(type="error", error={"type": "invalid_request_error", "code": code}))
        )
        assert e.fatal and e.code == code
    e = one_error(p.parse(ev(type="error", error={"type": "authentication_error", "message": "x"})))
    assert e.fatal and e.code == "authentication_error"
    e = one_error(p.parse(ev(type="error", error="weird")))
    assert e == AgentErrorEvent("unknown", "weird")
    assert p.session_error is None


def test_rejected_session_update_is_fatal() -> None:
    p = proto()
    err = {"type": "invalid_request_error", "code": "unknown_parameter", "message": "nope",
           "event_id": SESSION_UPDATE_EVENT_ID}  # fmt: skip
    e = one_error(p.parse(ev(type="error", error=err)))
    assert e.fatal and "session.update rejected" in e.message
    assert p.session_error == e


def test_session_tracking_and_format_check() -> None:
    p = proto()
    assert p.parse(ev(type="session.created", session={"id": "sess_1"})) == []
    assert p.session_created and not p.configured and p.session_id == "sess_1"
    good = {"id": "sess_1", "audio": {"input": {"format": {"type": "audio/pcmu"}},
            "output": {"format": {"type": "audio/pcmu"}, "voice": "marin"}}}  # fmt: skip
    assert p.parse(ev(type="session.updated", session=good)) == []
    assert p.configured
    bad = {"id": "sess_1", "audio": {"output": {"format": {"type": "audio/pcm", "rate": 24000}}}}
    e = one_error(p.parse(ev(type="session.updated", session=bad)))
    assert e.fatal and e.code == "session_format_mismatch"
    pb = proto(api="beta", audio="pcm24k")
    assert pb.parse(ev(type="session.updated", session={"output_audio_format": "pcm16"})) == []
    e = one_error(pb.parse(ev(type="session.updated", session={"input_audio_format": "g711_ulaw"})))
    assert e.fatal


def test_unknown_events_ignored_and_counted() -> None:
    p = proto()
    assert p.parse(ev(type="rate_limits.updated", rate_limits=[])) == []
    assert p.parse(ev(type="response.created", response={})) == []
    assert p.parse(ev(no_type=1)) == []
    assert p.ignored == 3
    assert p.ignored_types["rate_limits.updated"] == 1


# --- truncate ---------------------------------------------------------------------------
@pytest.mark.parametrize(("audio", "bpms"), [("pcmu", 8), ("pcm24k", 48)])
def test_truncate_clamps_to_generated_audio(audio: str, bpms: int) -> None:
    p = proto(audio=audio)
    p.parse(
        ev(type="response.output_audio.delta", item_id="i1", delta=b64(b"\x00" * (bpms * 500 + 3)))
    )
    assert p.generated_ms("i1") == 500

    def trunc(ms: int) -> dict[str, Any]:
        return json.loads(p.truncate("i1", ms))

    assert trunc(200) == {"type": "conversation.item.truncate", "item_id": "i1", "content_index": 0,
                          "audio_end_ms": 200}  # fmt: skip
    # the item now holds 200 ms, like the server's: a later, larger N is clamped to it
    assert trunc(10_000)["audio_end_ms"] == 200
    # deltas still in flight after the truncate do not lengthen the item
    p.parse(ev(type="response.output_audio.delta", item_id="i1", delta=b64(b"\x00" * bpms * 100)))
    assert p.generated_ms("i1") == 200
    assert trunc(-5)["audio_end_ms"] == 0
    # unknown item: nothing was generated
    assert json.loads(p.truncate("nope", 300))["audio_end_ms"] == 0


def test_truncate_clamp_upper_bound() -> None:
    p = proto()
    p.parse(ev(type="response.audio.delta", item_id="i1", delta=b64(b"\xff" * 1600)))
    assert json.loads(p.truncate("i1", 10_000))["audio_end_ms"] == 200


def test_item_tracking_is_bounded() -> None:
    p = proto()
    for i in range(300):
        p.parse(ev(type="response.audio.delta", item_id=f"i{i}", delta=b64(b"\xff" * 8)))
    assert not p.knows_item("i0") and p.knows_item("i299")
    assert len(p._item_bytes) <= 256


# --- malformed input ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "",
        "[1, 2]",
        '"just a string"',
        ev(type="response.output_audio.delta", item_id="i", delta=5),
        ev(type="response.output_audio.delta", delta="AAAA"),
        ev(type="response.output_audio.delta", item_id="i", delta="A"),  # bad padding
        ev(type="response.output_audio.delta", item_id="i", delta="ÄÖ"),
        ev(type="response.done", response="x"),
        ev(type="response.done", response={"output": "x"}),
        ev(type="response.function_call_arguments.done", call_id="c"),
        ev(type="response.output_audio_transcript.done"),
        ev(type="response.output_audio.done", item_id=None),
    ],
)
def test_malformed_raises_remote_protocol_error(text: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        proto().parse(text)
    assert info.value.kind == "agent_protocol"


def test_binary_frame_is_protocol_error() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        proto().parse_message(b'{"type":"session.created"}')
    assert info.value.kind == "agent_protocol"
    assert proto().parse_message(ev(type="session.created")) == []


KNOWN_TYPES = [
    "response.output_audio.delta",
    "response.audio.delta",
    "response.output_audio.done",
    "response.audio.done",
    "response.done",
    "input_audio_buffer.speech_started",
    "input_audio_buffer.speech_stopped",
    "response.output_audio_transcript.delta",
    "response.audio_transcript.done",
    "conversation.item.input_audio_transcription.completed",
    "conversation.item.input_audio_transcription.failed",
    "response.function_call_arguments.done",
    "response.output_item.added",
    "response.output_item.done",
    "error",
    "session.created",
    "session.updated",
    "something.new",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["delta", "item_id", "response", "output", "error", "session", "call_id", "name",
     "arguments", "transcript", "item", "status", "id", "type", "audio"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(KNOWN_TYPES) | st.text(max_size=30) | json_values,
    st.dictionaries(field_names | st.text(max_size=8), json_values, max_size=6),
)
def test_parse_never_crashes(etype: Any, fields: dict[str, Any]) -> None:
    p = proto()
    text = json.dumps({**fields, "type": etype})
    try:
        events = p.parse(text)
    except RemoteProtocolError:
        return
    for e in events:
        assert isinstance(
            e,
            AgentAudio | AgentResponseDone | AgentSpeechStarted | AgentSpeechStopped
            | AgentTranscript | AgentToolCall | AgentErrorEvent,
        )  # fmt: skip
    # every string field of an emitted event is a str (never None or another type)
    for e in events:
        for attr in ("response_id", "text", "call_id", "name", "arguments", "code", "message"):
            if hasattr(e, attr):
                assert isinstance(getattr(e, attr), str)


def test_api_key_must_be_header_safe() -> None:
    for bad in ("sk-abc\r\nX-Evil: 1", "sk abc", "sk-ключ"):
        with pytest.raises(ConfigError) as info:
            OpenAIOptions(api_key=bad)
        assert bad not in str(info.value)


# --- a new session that continues the call (reconnect) ---------------------------------------
def conversation(p: OpenAIRealtimeProtocol, *, names: str = "ga") -> None:
    """Greeting reply a1, caller turn u1, reply a2 (200 ms, interrupted by the caller's u2)."""
    delta = "response.output_audio.delta" if names == "ga" else "response.audio.delta"
    tdelta = (
        "response.output_audio_transcript.delta"
        if names == "ga"
        else "response.audio_transcript.delta"
    )
    tdone = (
        "response.output_audio_transcript.done"
        if names == "ga"
        else "response.audio_transcript.done"
    )
    p.parse(ev(type=delta, item_id="a1", delta=b64(b"\xff" * 800)))
    p.parse(ev(type=tdone, item_id="a1", transcript="Welcome  to the\nline."))
    p.parse(ev(type="input_audio_buffer.speech_started", audio_start_ms=0, item_id="u1"))
    p.parse(ev(type=delta, item_id="a2", delta=b64(b"\xff" * 800)))  # before u1's transcript
    p.parse(ev(type=tdelta, item_id="a2", delta="Let me check "))
    p.parse(ev(type=delta, item_id="a2", delta=b64(b"\xff" * 800)))
    p.parse(ev(type=tdelta, item_id="a2", delta="the calendar."))
    p.parse(
        ev(
            type="conversation.item.input_audio_transcription.completed",
            item_id="u1",
            content_index=0,
            transcript="A table for two.",
        )
    )
    p.parse(ev(type="input_audio_buffer.speech_started", audio_start_ms=900, item_id="u2"))


def test_history_in_conversation_order_and_cut_to_what_was_heard() -> None:
    p = proto()
    conversation(p)
    assert p.history() == [
        ("agent", "Welcome to the line."),
        ("caller", "A table for two."),
        ("agent", "Let me check the calendar."),
    ]  # u2 has no transcript (yet): left out
    json.loads(p.truncate("a2", 100))  # the caller heard half of its 200 ms
    assert p.history()[-1] == ("agent", "Let me check…")
    p.note_heard("a2", 150)  # later, larger: what was heard does not grow back
    assert p.history()[-1] == ("agent", "Let me check…")
    p.note_heard("a2", 0)
    assert p.history() == [("agent", "Welcome to the line."), ("caller", "A table for two.")]


@pytest.mark.parametrize("api", ["ga", "beta"])
def test_seed_messages_are_text_items_of_the_api_flavour(api: str) -> None:
    p = proto(api=api, greeting="Hi!")
    conversation(p, names=api)
    msgs = [json.loads(m) for m in p.seed_messages()]
    assert [m["type"] for m in msgs] == ["conversation.item.create"] * 3
    agent_type = "output_text" if api == "ga" else "text"
    assert [m["item"] for m in msgs] == [
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": agent_type, "text": "Welcome to the line."}],
        },
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "A table for two."}],
        },
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": agent_type, "text": "Let me check the calendar."}],
        },
    ]  # fmt: skip
    assert proto().seed_messages() == []


def test_seeded_session_update_notes_the_interruption() -> None:
    from relay.agents.openai_protocol import RECONNECT_NOTE

    p = proto(instructions="Be brief.", tools=[TOOL])
    first = json.loads(p.session_update())["session"]
    again = json.loads(p.session_update(seeded=True))["session"]
    assert again.pop("instructions") == f"Be brief.\n\n{RECONNECT_NOTE}"
    first.pop("instructions")
    assert again == first  # voice, tools, formats: the same
    assert json.loads(proto().session_update(seeded=True))["session"]["instructions"] == (
        RECONNECT_NOTE
    )


def test_new_connection_forgets_the_old_sessions_items_and_calls() -> None:
    p = proto()
    conversation(p)
    call = ev(
        type="response.function_call_arguments.done",
        item_id="f1",
        call_id="call_1",
        name="get_time",
        arguments="{}",
    )
    assert p.parse(call) == [AgentToolCall("call_1", "get_time", "{}")]
    # the connection dies while a2 plays: its reply is over for the engine
    assert p.connection_lost() == [AgentResponseDone("a1"), AgentResponseDone("a2")]
    p.begin_connection()
    assert not p.configured and not p.knows_item("a2")
    assert p.tool_result("call_1", "{}") == [] and p.dropped_results == 1
    assert len(p.tool_result("call_2", "{}")) == 2  # not an old call: sent
    p.note_heard("a2", 100)  # a barge-in on audio of the old session still cuts its turn
    assert p.history()[-1] == ("agent", "Let me check…")
    # the same call id again on the new session is a new call
    assert p.parse(call) == [AgentToolCall("call_1", "get_time", "{}")]


@pytest.mark.parametrize(
    ("heard", "expected"),
    [
        (None, "One two three four."),
        (1000, "One two three four."),
        (500, "One two…"),
        (520, "One two…"),  # "three" cut in half: left out
        (100, ""),  # not even the first word
        (0, ""),
    ],
)
def test_heard_part(heard: int | None, expected: str) -> None:
    from relay.agents.openai_protocol import heard_part

    assert heard_part("One two three four.", heard, 1000) == expected
