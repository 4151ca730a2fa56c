"""relay.agents.gemini_protocol: the sans-IO core (no sockets, no clocks)."""

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
    AgentResponseDone,
    AgentSpeechStarted,
    AgentToolCall,
    AgentTranscript,
)
from relay.agents.gemini_protocol import (
    DEFAULT_MODEL,
    GeminiOptions,
    GeminiProtocol,
    is_setup_complete,
    parse_duration,
)
from relay.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from relay.media.codec import client_audio_frame
from relay.media.websocket import FrameParser

KEY = "AIza-unit-test-key-0123456789"


def proto(**kw: Any) -> GeminiProtocol:
    kw.setdefault("api_key", KEY)
    return GeminiProtocol(GeminiOptions(**kw))


def msg(obj: dict[str, Any]) -> str:
    return orjson.dumps(obj).decode()


def audio_part(data: bytes = b"\x01\x00\x02\x00", mime: str = "audio/pcm;rate=24000") -> str:
    part = {"inlineData": {"mimeType": mime, "data": base64.b64encode(data).decode()}}
    return msg({"serverContent": {"modelTurn": {"parts": [part]}}})


TURN_COMPLETE = msg({"serverContent": {"turnComplete": True}})
INTERRUPTED = msg({"serverContent": {"interrupted": True}})


def said(text: str) -> str:
    return msg({"serverContent": {"outputTranscription": {"text": text}}})


def heard(text: str) -> str:
    return msg({"serverContent": {"inputTranscription": {"text": text}}})


# --- options and client messages ------------------------------------------------------------
def test_options_validate_and_mask_the_key() -> None:
    with pytest.raises(ConfigError, match="url"):
        GeminiOptions(url="https://generativelanguage.googleapis.com")
    with pytest.raises(ConfigError, match="greeting_via"):
        GeminiOptions(greeting_via="shout")
    with pytest.raises(ConfigError, match="model"):
        GeminiOptions(model="gemini live")
    with pytest.raises(ConfigError, match="reconnect_timeout_s"):
        GeminiOptions(reconnect_timeout_s=0)
    opts = GeminiOptions(api_key=KEY)
    assert KEY not in repr(opts)
    assert GeminiOptions(model="gemini-2.5-flash").model_path == "models/gemini-2.5-flash"
    assert GeminiOptions(model="projects/p/models/m").model_path == "projects/p/models/m"


def test_url_carries_the_key_but_safe_url_does_not() -> None:
    p = proto()
    assert p.ws_url().endswith(f"BidiGenerateContent?key={KEY}")
    assert KEY not in p.safe_url()
    kept = "ws://127.0.0.1:1/ws/x?key=other"
    assert proto(url=kept).ws_url() == kept


def test_setup_message_full() -> None:
    p = proto(
        voice="Puck",
        language="en-US",
        instructions="Be brief.",
        tools=[
            {
                "type": "function",
                "name": "get_time",
                "description": "time",
                "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
            },
            {"function": {"name": "hang_up", "description": "end the call"}},
        ],
        setup_extra={"realtimeInputConfig": {"automaticActivityDetection": {"disabled": False}}},
    )
    setup = orjson.loads(p.setup_message())["setup"]
    assert setup == {
        "model": DEFAULT_MODEL,
        "generationConfig": {
            "responseModalities": ["AUDIO"],
            "speechConfig": {
                "voiceConfig": {"prebuiltVoiceConfig": {"voiceName": "Puck"}},
                "languageCode": "en-US",
            },
        },
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "tools": [
            {
                "functionDeclarations": [
                    {
                        "name": "get_time",
                        "description": "time",
                        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
                    },
                    {"name": "hang_up", "description": "end the call"},
                ]
            }
        ],
        "inputAudioTranscription": {},
        "outputAudioTranscription": {},
        "sessionResumption": {},
        "contextWindowCompression": {"slidingWindow": {}},
        "realtimeInputConfig": {"automaticActivityDetection": {"disabled": False}},
    }
    resumed = orjson.loads(p.setup_message("handle-1"))["setup"]
    assert resumed["sessionResumption"] == {"handle": "handle-1"}


def test_setup_without_optional_features() -> None:
    p = proto(transcription=False, session_resumption=False, context_compression=False)
    setup = orjson.loads(p.setup_message("ignored"))["setup"]
    assert set(setup) == {"model", "generationConfig"}


def test_greeting_variants() -> None:
    assert proto().greeting_messages() == []
    (cc,) = proto(greeting="Hello!").greeting_messages()
    content = orjson.loads(cc)["clientContent"]
    assert content["turnComplete"] is True
    assert content["turns"][0]["role"] == "user"
    assert '"Hello!"' in content["turns"][0]["parts"][0]["text"]
    (rt,) = proto(greeting="Hello!", greeting_via="realtime_text").greeting_messages()
    assert "Hello!" in orjson.loads(rt)["realtimeInput"]["text"]


def test_audio_message_is_pcm_16k_and_whole_samples() -> None:
    p = proto()
    text = p.audio_message(b"\x01\x00\xff\x7f")
    assert orjson.loads(text) == {
        "realtimeInput": {"audio": {"mimeType": "audio/pcm;rate=16000", "data": "AQD/fw=="}}
    }
    with pytest.raises(LocalProtocolError):
        p.audio_message(b"\x01\x00\x02")
    with pytest.raises(LocalProtocolError):
        p.check_audio(b"\x01")


def test_compiled_audio_frame_is_the_audio_message() -> None:
    """What the adapter sends (codec.client_audio_frame around audio_parts) is exactly
    audio_message's text."""
    p = proto()
    pcm = bytes(range(256)) * 3
    head, tail = p.audio_parts
    (sent,) = FrameParser(expect_masked=True).feed(client_audio_frame(head, pcm, tail))
    assert sent == p.audio_message(pcm)


# --- server messages ------------------------------------------------------------------------
def test_setup_complete_detection_text_and_binary() -> None:
    assert is_setup_complete('{"setupComplete":{}}')
    assert is_setup_complete(b'{"setup_complete":{}}')
    assert not is_setup_complete('{"serverContent":{}}')
    p = proto()
    assert p.parse_message(b'{"setupComplete":{}}') == []
    assert p.setup_complete


def test_a_turn_audio_transcripts_and_done() -> None:
    p = proto()
    events = p.parse_message(heard("What time "))
    assert events == [AgentTranscript("caller", "What time ", final=False)]
    p.parse_message(heard("is it?"))
    events = p.parse_message(audio_part(b"\x01\x00\x02\x00"))
    assert events[0] == AgentTranscript("caller", "What time is it?")
    assert events[1] == AgentAudio(b"\x01\x00\x02\x00", "turn1")
    assert p.parse_message(said("It is ")) == [AgentTranscript("agent", "It is ", final=False)]
    p.parse_message(said("noon."))
    assert not p.idle
    events = p.parse_message(TURN_COMPLETE)
    assert events == [AgentResponseDone("turn1"), AgentTranscript("agent", "It is noon.")]
    assert p.idle
    (nxt,) = p.parse_message(audio_part())
    assert isinstance(nxt, AgentAudio) and nxt.response_id == "turn2"
    assert list(p.history) == [("caller", "What time is it?"), ("agent", "It is noon.")]


def test_content_and_turn_complete_in_one_message() -> None:
    p = proto()
    part = {"inlineData": {"mimeType": "audio/pcm;rate=24000", "data": "AQA="}}
    events = p.parse_message(
        msg({"serverContent": {"modelTurn": {"parts": [part]}, "turnComplete": True}})
    )
    assert events == [AgentAudio(b"\x01\x00", "turn1"), AgentResponseDone("turn1")]


def test_interrupted_drops_the_rest_of_the_turn() -> None:
    p = proto()
    p.parse_message(audio_part())
    p.parse_message(said("I was saying"))
    events = p.parse_message(INTERRUPTED)
    assert events == [AgentSpeechStarted(), AgentTranscript("agent", "I was saying")]
    # documented order: interrupted > (stale content) > turnComplete
    assert p.parse_message(audio_part()) == []
    assert p.parse_message(said("more")) == []
    assert p.audio_dropped == 1
    assert p.parse_message(TURN_COMPLETE) == []
    (new,) = p.parse_message(audio_part())
    assert isinstance(new, AgentAudio) and new.response_id == "turn2"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(["audio", "interrupted", "complete", "said", "heard"]), max_size=40)
)
def test_never_audio_between_interrupted_and_turn_complete(script: list[str]) -> None:
    p = proto()
    dropping = False
    rids_done: set[str] = set()
    for step in script:
        raw = {
            "audio": audio_part(),
            "interrupted": INTERRUPTED,
            "complete": TURN_COMPLETE,
            "said": said("x "),
            "heard": heard("y "),
        }[step]
        events = p.parse_message(raw)
        audio = [e for e in events if isinstance(e, AgentAudio)]
        if dropping:
            assert not audio
        for e in audio:
            assert e.response_id not in rids_done  # a finished turn never gets more audio
        rids_done |= {e.response_id for e in events if isinstance(e, AgentResponseDone)}
        if step == "interrupted":
            dropping = True
        elif step == "complete":
            dropping = False


def test_wrong_output_rate_is_refused_not_played() -> None:
    p = proto()
    (event,) = p.parse_message(audio_part(mime="audio/pcm;rate=16000"))
    assert isinstance(event, AgentErrorEvent) and not event.fatal
    assert p.bad_rate_chunks == 1
    # audio/pcm without a rate is the documented 24 kHz output
    (ok,) = p.parse_message(audio_part(mime="audio/pcm"))
    assert isinstance(ok, AgentAudio)


def test_text_parts_are_not_spoken() -> None:
    p = proto()
    turn = {"parts": [{"text": "**thinking**", "thought": True}]}
    assert p.parse_message(msg({"serverContent": {"modelTurn": turn}})) == []


def test_tool_call_response_and_cancellation() -> None:
    p = proto()
    calls = msg(
        {
            "toolCall": {
                "functionCalls": [
                    {"id": "fc1", "name": "get_time", "args": {"timezone": "UTC"}},
                    {"id": "fc2", "name": "lookup"},
                ]
            }
        }
    )
    events = p.parse_message(calls)
    assert events == [
        AgentToolCall("fc1", "get_time", '{"timezone":"UTC"}'),
        AgentToolCall("fc2", "lookup", "{}"),
    ]
    assert not p.idle
    response = orjson.loads(p.tool_response("fc1", '{"iso":"2026-01-01"}') or "")
    assert response == {
        "toolResponse": {
            "functionResponses": [
                {"id": "fc1", "name": "get_time", "response": {"iso": "2026-01-01"}}
            ]
        }
    }
    assert p.tool_response("fc1", "{}") is None  # answered once
    p.parse_message(msg({"toolCallCancellation": {"ids": ["fc2"]}}))
    assert p.tool_response("fc2", "late") is None
    assert p.parse_message(calls) == [AgentToolCall("fc1", "get_time", '{"timezone":"UTC"}')]
    assert p.tool_response("unknown", "x") is None


@pytest.mark.parametrize(
    ("output", "response"),
    [
        ('{"a":1}', {"a": 1}),
        ('"plain"', {"output": "plain"}),
        ("[1,2]", {"output": [1, 2]}),
        ("not json at all", {"output": "not json at all"}),
        ('{"error":"boom"}', {"error": "boom"}),
    ],
)
def test_tool_response_is_always_an_object(output: str, response: Any) -> None:
    p = proto()
    p.parse_message(msg({"toolCall": {"functionCalls": [{"id": "f", "name": "t"}]}}))
    sent = orjson.loads(p.tool_response("f", output) or "")
    assert sent["toolResponse"]["functionResponses"][0]["response"] == response


def test_resumption_handles_and_go_away() -> None:
    p = proto()
    p.parse_message(msg({"sessionResumptionUpdate": {"newHandle": "h1", "resumable": True}}))
    assert p.handle == "h1" and p.resumable
    # not resumable right now: the previous handle is kept
    p.parse_message(msg({"sessionResumptionUpdate": {"resumable": False}}))
    assert p.handle == "h1" and not p.resumable
    p.parse_message(msg({"session_resumption_update": {"new_handle": "h2", "resumable": True}}))
    assert p.handle == "h2"
    assert p.parse_message(msg({"goAway": {"timeLeft": "7.5s"}})) == []
    assert p.go_away_s == 7.5


def test_begin_connection_closes_the_turn_and_forgets_tool_calls() -> None:
    p = proto()
    p.parse_message(audio_part())
    p.parse_message(said("half a sen"))
    p.parse_message(msg({"toolCall": {"functionCalls": [{"id": "f", "name": "t"}]}}))
    p.parse_message(msg({"goAway": {"timeLeft": "1s"}}))
    events = p.begin_connection()
    assert events == [AgentResponseDone("turn1"), AgentTranscript("agent", "half a sen")]
    assert p.go_away_s is None and not p.setup_complete
    assert p.tool_response("f", "{}") is None
    (a,) = p.parse_message(audio_part())
    assert isinstance(a, AgentAudio) and a.response_id == "turn2"


def test_history_message_seeds_a_fresh_session() -> None:
    p = proto()
    assert p.history_message() is None
    p.parse_message(heard("hello"))
    p.parse_message(said("hi there"))
    p.parse_message(TURN_COMPLETE)
    content = orjson.loads(p.history_message() or "")["clientContent"]
    assert content["turnComplete"] is False
    assert content["turns"] == [
        {"role": "user", "parts": [{"text": "hello"}]},
        {"role": "model", "parts": [{"text": "hi there"}]},
    ]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("10s", 10.0),
        ("1.5s", 1.5),
        (".25s", 0.25),
        ({"seconds": 3, "nanos": 5e8}, 3.5),
        ("x", None),
    ],
)
def test_parse_duration(value: Any, seconds: float | None) -> None:
    assert parse_duration(value) == seconds


def test_error_message_is_fatal() -> None:
    p = proto()
    (event,) = p.parse_message(
        msg({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "quota"}})
    )
    assert event == AgentErrorEvent("RESOURCE_EXHAUSTED", "quota", fatal=True)


@pytest.mark.parametrize(
    "raw",
    [
        "nope",
        "[]",
        msg({"serverContent": "x"}),
        msg({"serverContent": {"modelTurn": {"parts": "x"}}}),
        audio_part().replace("AQACAA==", "!!!!"),
        msg({"toolCall": {"functionCalls": [{"name": "no id"}]}}),
        msg({"toolCallCancellation": {"ids": "f1"}}),
        audio_part(b"\x01\x02\x03"),
    ],
)
def test_malformed_input_is_a_remote_protocol_error(raw: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        proto().parse_message(raw)
    assert info.value.kind == "agent_protocol"


def test_unknown_and_usage_messages() -> None:
    p = proto()
    assert p.parse_message(msg({"usageMetadata": {"totalTokenCount": 3}})) == []
    assert p.parse_message(msg({"voiceActivity": {"type": "START"}})) == []
    assert p.ignored_types == {"voiceActivity": 1}
