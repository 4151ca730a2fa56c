"""relay.agents.elevenlabs_protocol: the sans-IO core (no sockets, no clocks)."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.agents.base import (
    AgentAudio,
    AgentErrorEvent,
    AgentHangup,
    AgentResponseDone,
    AgentSpeechStarted,
    AgentToolCall,
    AgentTranscript,
    AudioFormat,
)
from relay.agents.elevenlabs_protocol import (
    ElevenLabsOptions,
    ElevenLabsProtocol,
    parse_audio_format,
)
from relay.errors import ConfigError, RemoteProtocolError

AGENT = "agent_abc123"


def proto(**kw: Any) -> ElevenLabsProtocol:
    return ElevenLabsProtocol(ElevenLabsOptions(agent_id=AGENT, **kw))


def msg(obj: dict[str, Any]) -> str:
    return orjson.dumps(obj).decode()


def metadata(inp: str | None = "ulaw_8000", out: str = "ulaw_8000") -> str:
    event: dict[str, Any] = {"conversation_id": "conv_1", "agent_output_audio_format": out}
    if inp is not None:
        event["user_input_audio_format"] = inp
    return msg(
        {
            "type": "conversation_initiation_metadata",
            "conversation_initiation_metadata_event": event,
        }
    )


def audio(event_id: int, data: bytes = b"\x01\x02\x03\x04") -> str:
    return msg(
        {
            "type": "audio",
            "audio_event": {"audio_base_64": base64.b64encode(data).decode(), "event_id": event_id},
        }
    )


def interruption(event_id: int) -> str:
    return msg({"type": "interruption", "interruption_event": {"event_id": event_id}})


def ready(**kw: Any) -> ElevenLabsProtocol:
    p = proto(**kw)
    assert p.parse_message(metadata()) == []
    return p


# --- options and client messages ------------------------------------------------------------
def test_options_validate_and_mask_the_key() -> None:
    with pytest.raises(ConfigError, match="agent_id"):
        ElevenLabsOptions(agent_id="")
    with pytest.raises(ConfigError, match="agent_id"):
        ElevenLabsOptions(agent_id="a b")
    with pytest.raises(ConfigError, match="url"):
        ElevenLabsOptions(agent_id=AGENT, url="https://api.elevenlabs.io")
    with pytest.raises(ConfigError, match="api_key"):
        ElevenLabsOptions(agent_id=AGENT, api_key="key\r\nX-Evil: 1")
    opts = ElevenLabsOptions(agent_id=AGENT, api_key="xi-secret-key-123456789")
    assert "xi-secret-key-123456789" not in repr(opts)
    assert "6789" in repr(opts)


def test_url_gets_agent_id_once() -> None:
    assert proto().ws_url() == (f"wss://api.elevenlabs.io/v1/convai/conversation?agent_id={AGENT}")
    p = proto(url="ws://127.0.0.1:9/v1/convai/conversation?region=eu")
    assert p.ws_url() == f"ws://127.0.0.1:9/v1/convai/conversation?region=eu&agent_id={AGENT}"
    kept = "ws://h/v1/convai/conversation?agent_id=other"
    assert proto(url=kept).ws_url() == kept


def test_headers_only_with_a_key() -> None:
    assert proto().handshake_headers() == []
    assert proto(api_key="k123").handshake_headers() == [("xi-api-key", "k123")]


def test_initiation_sends_only_configured_overrides() -> None:
    assert orjson.loads(proto().initiation_message()) == {
        "type": "conversation_initiation_client_data"
    }
    p = proto(
        instructions="Be brief.",
        greeting="Hi, relay here.",
        voice="voice_42",
        language="fr",
        dynamic_variables={"caller": "+1555"},
        init_extra={"custom_llm_extra_body": {"temperature": 0.2}},
    )
    assert orjson.loads(p.initiation_message()) == {
        "type": "conversation_initiation_client_data",
        "conversation_config_override": {
            "agent": {
                "prompt": {"prompt": "Be brief."},
                "first_message": "Hi, relay here.",
                "language": "fr",
            },
            "tts": {"voice_id": "voice_42"},
        },
        "dynamic_variables": {"caller": "+1555"},
        "custom_llm_extra_body": {"temperature": 0.2},
    }


def test_audio_chunk_passthrough_is_concatenation() -> None:
    p = proto()
    payload = base64.b64encode(bytes(range(160))).decode()
    text = p.audio_chunk_b64(payload)
    assert text == '{"user_audio_chunk":"' + payload + '"}'
    assert orjson.loads(text) == {"user_audio_chunk": payload}
    assert orjson.loads(p.audio_chunk(b"\x00\xff")) == {"user_audio_chunk": "AP8="}
    # not base64 (hostile): escaped, still valid JSON
    assert orjson.loads(p.audio_chunk_b64('a"b\\')) == {"user_audio_chunk": 'a"b\\'}


# --- metadata and formats -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("ulaw_8000", AudioFormat("mulaw", 8000)),
        ("pcm_16000", AudioFormat("pcm16", 16000)),
        ("pcm_44100", AudioFormat("pcm16", 44100)),
        ("ulaw_16000", None),
        ("mp3_44100", None),
        ("pcm", None),
    ],
)
def test_parse_audio_format(name: str, fmt: AudioFormat | None) -> None:
    assert parse_audio_format(name) == fmt


def test_metadata_sets_formats() -> None:
    p = proto()
    assert not p.ready
    assert p.parse_message(metadata("pcm_16000", "ulaw_8000")) == []
    assert p.ready and p.conversation_id == "conv_1"
    assert p.input_format == AudioFormat("pcm16", 16000)
    assert p.output_format == AudioFormat("mulaw", 8000)


def test_metadata_without_input_format_means_pcm_16000() -> None:
    p = proto()
    p.parse_message(metadata(None, "pcm_16000"))
    assert p.input_format == AudioFormat("pcm16", 16000)
    assert p.input_format_name == "pcm_16000"


def test_unbridgeable_format_is_fatal_and_says_what_to_change() -> None:
    p = proto()
    (event,) = p.parse_message(metadata("ulaw_8000", "pcm_44100"))
    assert isinstance(event, AgentErrorEvent) and event.fatal
    assert "pcm_44100" in event.message and "ulaw_8000" in event.message
    assert not p.ready


# --- audio, barge-in ------------------------------------------------------------------------
def test_audio_of_one_reply_shares_a_response_id_and_ends_with_the_next() -> None:
    p = ready()
    (a1,) = p.parse_message(audio(5, b"\x01\x02"))
    (a2,) = p.parse_message(audio(5, b"\x03\x04"))
    assert isinstance(a1, AgentAudio) and isinstance(a2, AgentAudio)
    assert a1.response_id == a2.response_id == "ev5"
    assert a1.audio + a2.audio == b"\x01\x02\x03\x04"
    done, a3 = p.parse_message(audio(7))
    assert done == AgentResponseDone("ev5")
    assert isinstance(a3, AgentAudio) and a3.response_id == "ev7"
    # the caller's turn ends the reply too
    events = p.parse_message(
        msg(
            {
                "type": "user_transcript",
                "user_transcription_event": {"user_transcript": " yes ", "event_id": 8},
            }
        )
    )
    assert events == [AgentResponseDone("ev7"), AgentTranscript("caller", "yes")]


def test_interruption_naming_the_reply_drops_its_stale_audio() -> None:
    p = ready()
    p.parse_message(audio(3))
    p.parse_message(audio(4))
    assert p.parse_message(interruption(4)) == [AgentSpeechStarted()]
    # still in flight: the interrupted reply (4) and older ones
    assert p.parse_message(audio(4)) == []
    assert p.parse_message(audio(3)) == []
    assert p.stale_audio_dropped == 2
    (new,) = p.parse_message(audio(6))
    assert isinstance(new, AgentAudio) and new.response_id == "ev6"


def test_interruption_naming_the_next_turn_keeps_that_reply() -> None:
    """N > every id heard so far: audio with id N is the new answer (JS SDK semantics)."""
    p = ready()
    p.parse_message(audio(3))
    p.parse_message(interruption(5))
    assert p.parse_message(audio(3)) == []
    assert p.parse_message(audio(4)) == []
    (new,) = p.parse_message(audio(5))
    assert isinstance(new, AgentAudio) and new.response_id == "ev5"


@settings(max_examples=200, deadline=None)
@given(
    before=st.lists(st.integers(1, 30), max_size=12),
    n=st.integers(1, 30),
    after=st.lists(st.integers(1, 30), max_size=12),
)
def test_no_audio_older_than_the_interruption_plays(
    before: list[int], n: int, after: list[int]
) -> None:
    p = ready()
    for eid in sorted(before):
        p.parse_message(audio(eid))
    p.parse_message(interruption(n))
    heard_n = any(eid >= n for eid in before)  # the id named a reply that was heard already
    for eid in after:
        played = [e for e in p.parse_message(audio(eid)) if isinstance(e, AgentAudio)]
        if eid < n or (eid == n and heard_n):
            assert played == []
        else:
            assert played and played[0].response_id == f"ev{eid}"


def test_interruption_floor_never_moves_back() -> None:
    p = ready()
    p.parse_message(audio(9))
    p.parse_message(interruption(9))
    p.parse_message(interruption(2))  # late, older interruption
    assert p.parse_message(audio(5)) == []


# --- ping, transcripts, tools, errors -------------------------------------------------------
def test_ping_is_answered_through_the_outbox() -> None:
    p = ready()
    ping = msg({"type": "ping", "ping_event": {"event_id": 17, "ping_ms": 40}})
    assert p.parse_message(ping) == []
    assert p.outbox == ['{"type":"pong","event_id":17}']
    assert orjson.loads(p.outbox[0]) == {"type": "pong", "event_id": 17}


def test_transcripts() -> None:
    p = ready()
    agent = msg(
        {"type": "agent_response", "agent_response_event": {"agent_response": "Hi!", "event_id": 1}}
    )
    tentative = msg(
        {
            "type": "tentative_user_transcript",
            "tentative_user_transcription_event": {"user_transcript": "hel", "event_id": 2},
        }
    )
    assert p.parse_message(agent) == [AgentTranscript("agent", "Hi!")]
    assert p.parse_message(tentative) == [AgentTranscript("caller", "hel", final=False)]


def tool_call(call_id: str, name: str = "get_time", params: Any = None) -> str:
    return msg(
        {
            "type": "client_tool_call",
            "client_tool_call": {
                "tool_name": name,
                "tool_call_id": call_id,
                "parameters": params if params is not None else {"timezone": "UTC"},
                "event_id": 3,
            },
        }
    )


def test_tool_call_round_trip() -> None:
    p = ready()
    (call,) = p.parse_message(tool_call("t1"))
    assert call == AgentToolCall("t1", "get_time", '{"timezone":"UTC"}')
    assert p.parse_message(tool_call("t1")) == []  # a repeat is reported once
    result = orjson.loads(p.tool_result("t1", '{"iso":"2026"}') or "")
    assert result == {
        "type": "client_tool_result",
        "tool_call_id": "t1",
        "result": '{"iso":"2026"}',
        "is_error": False,
    }
    assert p.tool_result("t1", "again") is None  # answered already
    assert p.tool_result("never-issued", "x") is None


def test_tool_error_output_sets_is_error() -> None:
    p = ready()
    p.parse_message(tool_call("t2"))
    result = orjson.loads(p.tool_result("t2", '{"error":"tool get_time timed out"}') or "")
    assert result["is_error"] is True


def test_undefined_client_tool_is_refused_like_the_sdk() -> None:
    p = ready(tools=["get_time"])
    (event,) = p.parse_message(tool_call("t3", name="transfer_call"))
    assert isinstance(event, AgentErrorEvent) and not event.fatal
    (reply,) = [orjson.loads(t) for t in p.outbox]
    assert reply["tool_call_id"] == "t3" and reply["is_error"] is True
    assert p.pending_tool_calls() == []


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (
            {"code": 1000, "error_type": "max_duration_exceeded", "message": "max"},
            AgentHangup("agent max duration"),
        ),
        ({"code": 1000, "message": "bye"}, AgentHangup("agent ended")),
        (
            {"code": 1002, "error_type": "llm_timeout", "message": "LLM took too long"},
            AgentErrorEvent("llm_timeout", "LLM took too long", fatal=True),
        ),
        (
            {"code": 1008, "reason": "bad override"},
            AgentErrorEvent("close_1008", "bad override", True),
        ),
    ],
)
def test_errors(event: dict[str, Any], expected: Any) -> None:
    p = ready()
    events = p.parse_message(msg({"type": "error", "error_event": event}))
    assert events[-1] == expected


def test_error_with_odd_shape_is_still_an_error() -> None:
    p = ready()
    (event,) = p.parse_message(msg({"type": "error", "error_event": "boom"}))
    assert isinstance(event, AgentErrorEvent) and event.fatal and "boom" in event.message


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[1,2]",
        msg({"type": "audio", "audio_event": {"audio_base_64": "!!!", "event_id": 1}}),
        msg({"type": "audio", "audio_event": {"audio_base_64": "AAAA"}}),
        msg({"type": "ping", "ping_event": {}}),
        msg({"type": "interruption"}),
        msg({"type": "client_tool_call", "client_tool_call": {"tool_name": "x"}}),
    ],
)
def test_malformed_input_is_a_remote_protocol_error(raw: str) -> None:
    p = ready()
    with pytest.raises(RemoteProtocolError) as info:
        p.parse_message(raw)
    assert info.value.kind == "agent_protocol"


def test_unknown_events_are_counted_not_errors() -> None:
    p = ready()
    assert p.parse_message(msg({"type": "vad_score", "vad_score_event": {"vad_score": 0.3}})) == []
    assert p.parse_message(b'{"type":"agent_response_correction"}') == []  # binary frame too
    assert p.ignored_types == {"vad_score": 1, "agent_response_correction": 1}
