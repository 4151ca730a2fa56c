"""The sans-IO ConversationRelay protocol and the Twilio-speech TwiML builders."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import orjson
import pytest

from relay.agents.registry import validate_agent
from relay.agents.text.conversation import History
from relay.agents.twilio_speech.conversation_relay import _cut_to_spoken
from relay.errors import ConfigError, LocalProtocolError
from relay.protocol.conversation_relay import (
    ConversationRelay,
    ConversationRelayError,
    CrDtmf,
    CrError,
    CrInterrupt,
    CrPrompt,
    CrSetup,
    end_message,
    send_digits_message,
    text_message,
)
from relay.protocol.twiml_speech import gather_twiml, split_for_say

SETUP = {
    "type": "setup",
    "sessionId": "VX1",
    "callSid": "CA" + "a" * 32,
    "accountSid": "AC" + "b" * 32,
    "from": "+15550001",
    "to": "+15550002",
    "customParameters": {"token": "t", "agent": "a", "tenant": "default"},
}


def parser() -> ConversationRelay:
    p = ConversationRelay()
    assert isinstance(p.parse(orjson.dumps(SETUP).decode()), CrSetup)
    return p


def test_setup_then_messages() -> None:
    p = ConversationRelay()
    setup = p.parse(orjson.dumps(SETUP).decode())
    assert isinstance(setup, CrSetup) and setup.custom_parameters["agent"] == "a"
    assert p.parse('{"type":"prompt","voicePrompt":"Hi","lang":"en-US","last":true}') == CrPrompt(
        "Hi", "en-US", True
    )
    assert p.parse('{"type":"prompt","voicePrompt":"Hi","last":false}').last is False
    assert p.parse('{"type":"dtmf","digit":"#"}') == CrDtmf("#")
    assert p.parse('{"type":"error","description":"bad"}') == CrError("bad")


@pytest.mark.parametrize("duration", ['"460"', "460", "460.0", '" 460 "'])
def test_interrupt_duration_number_or_string(duration: str) -> None:
    event = parser().parse(
        '{"type":"interrupt","utteranceUntilInterrupt":"We open","durationUntilInterruptMs":'
        + duration
        + "}"
    )
    assert event == CrInterrupt("We open", 460)


@pytest.mark.parametrize(
    "message",
    [
        "not json",
        "[1]",
        '{"type":"prompt"}',
        '{"type":"prompt","voicePrompt":1}',
        '{"type":"prompt","voicePrompt":"x","last":"yes"}',
        '{"type":"dtmf","digit":"12"}',
        '{"type":"interrupt","durationUntilInterruptMs":"soon"}',
        '{"type":"interrupt","durationUntilInterruptMs":true}',
        '{"type":"wat"}',
        orjson.dumps(SETUP).decode(),  # a second setup
    ],
)
def test_refuses_malformed(message: str) -> None:
    with pytest.raises(ConversationRelayError):
        parser().parse(message)


def test_setup_must_come_first() -> None:
    with pytest.raises(ConversationRelayError):
        ConversationRelay().parse('{"type":"prompt","voicePrompt":"Hi"}')
    bad = dict(SETUP, callSid="XX1")
    with pytest.raises(ConversationRelayError):
        ConversationRelay().parse(orjson.dumps(bad).decode())


def test_outbound_messages() -> None:
    assert orjson.loads(text_message("Hi", False)) == {"type": "text", "token": "Hi", "last": False}
    end = orjson.loads(end_message({"reason": "x"}))
    assert end == {"type": "end", "handoffData": '{"reason":"x"}'}  # a string, as Twilio wants
    with pytest.raises(LocalProtocolError):
        send_digits_message("12x")


def test_cut_to_spoken_spans_messages() -> None:
    h = History("sys")
    a = h.add_assistant("Let me check.")
    h.add_tool_result("c", "{}")
    b = h.add_assistant("It is noon, and we close at six.")
    heard = _cut_to_spoken(h, [a, b], "Let me check. It is noon, and")
    assert heard == "Let me check. It is noon, and"
    assert h.assistant_text(b) == "It is noon, and"
    assert _cut_to_spoken(h, [a, b], "") == ""
    assert h.assistant_text(a) == ""


def test_split_for_say_limits() -> None:
    text = "One sentence here. " * 400
    pieces = split_for_say(text, 3000)
    assert all(len(p) <= 3000 for p in pieces) and len(pieces) > 1
    assert " ".join(pieces) == " ".join(text.split())
    assert split_for_say("x" * 5000, 3000)[0] == "x" * 3000


def test_options_validated() -> None:
    base = {"type": "twilio-speech", "llm_url": "http://127.0.0.1:1/v1", "llm_model": "m"}
    agent = validate_agent({**base, "mode": "gather", "speech_timeout": 2})
    assert agent.settings.speech_timeout == "2"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="mode"):
        validate_agent({**base, "mode": "sms"})
    with pytest.raises(ConfigError, match="voic"):
        validate_agent({**base, "voic": "x"})
    with pytest.raises(ConfigError, match="llm_url"):
        validate_agent({"type": "twilio-speech"})


def test_gather_twiml_escapes_and_nests() -> None:
    agent = validate_agent(
        {"type": "twilio-speech", "mode": "gather", "llm_url": "http://h/v1", "llm_model": "m"}
    )
    xml = gather_twiml(agent.settings, "Fish & chips <today>", action="http://h/a?x=1&y=2")  # type: ignore[attr-defined]
    root = ET.fromstring(xml)
    assert root[0].tag == "Gather" and root[0].find("Say").text == "Fish & chips <today>"
    assert root[0].get("action") == "http://h/a?x=1&y=2"
