"""Sans-IO Twilio ConversationRelay WebSocket protocol (``<Connect><ConversationRelay>``).

Twilio runs speech recognition and text-to-speech itself; the WebSocket carries only text.
``ConversationRelay.parse(text)`` turns one message from Twilio into one frozen event;
:func:`text_message`, :func:`end_message` and friends build what relay sends. No sockets
here. Message shapes follow Twilio's "ConversationRelay WebSocket messages" page (digest in
``shared/reference/text-agents-and-twiml-speech.md``, section 2):

* Twilio -> app: ``setup`` (first, once: ``sessionId``, ``callSid``, ``accountSid``,
  ``from``, ``to``, ``customParameters`` from ``<Parameter>``), ``prompt`` {``voicePrompt``,
  ``lang``, ``last``}, ``interrupt`` {``utteranceUntilInterrupt``,
  ``durationUntilInterruptMs``}, ``dtmf`` {``digit``}, ``error`` {``description``};
* app -> Twilio: ``text`` {``token``, ``last``, ``interruptible``, ``preemptible``},
  ``play``, ``sendDigits``, ``language``, ``end`` {``handoffData``: a *string*}.

Twilio ends the session with error 64107 on a message it cannot accept; we are as strict
with what we receive: anything malformed raises :class:`ConversationRelayError`.
``durationUntilInterruptMs`` appears as a number in one part of Twilio's docs and as a
string in another: both are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from ..errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "ConversationRelay",
    "ConversationRelayError",
    "CrDtmf",
    "CrError",
    "CrEvent",
    "CrInterrupt",
    "CrPrompt",
    "CrSetup",
    "end_message",
    "language_message",
    "play_message",
    "send_digits_message",
    "text_message",
]

#: Twilio's own limit on a WebSocket message is 64 kB; a prompt is a sentence or two
MAX_MESSAGE_CHARS = 64 * 1024
DTMF_DIGITS = frozenset("0123456789*#ABCDw")


class ConversationRelayError(RemoteProtocolError):
    """Twilio (or whoever pretends to be it) sent a message we cannot accept."""

    kind = "cr_protocol"


@dataclass(frozen=True, slots=True)
class CrSetup:
    session_id: str
    call_sid: str
    account_sid: str
    from_number: str = ""
    to_number: str = ""
    direction: str = ""
    custom_parameters: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class CrPrompt:
    text: str
    lang: str = ""
    #: False for partial prompts (``partialPrompts="true"``); True for the final one
    last: bool = True


@dataclass(frozen=True, slots=True)
class CrInterrupt:
    #: what the caller heard of the agent's answer before speaking over it
    utterance: str
    duration_ms: int | None = None


@dataclass(frozen=True, slots=True)
class CrDtmf:
    digit: str


@dataclass(frozen=True, slots=True)
class CrError:
    description: str


CrEvent = CrSetup | CrPrompt | CrInterrupt | CrDtmf | CrError


def _str(msg: dict[str, Any], key: str, kind: str, *, required: bool = True) -> str:
    value = msg.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ConversationRelayError(f"{kind}.{key}: expected a string, got {value!r:.60}")
    return value


class ConversationRelay:
    """One session's inbound parser: ``setup`` must come first and only once."""

    def __init__(self) -> None:
        self.setup: CrSetup | None = None
        self.messages = 0

    def parse(self, text: str) -> CrEvent:
        self.messages += 1
        if len(text) > MAX_MESSAGE_CHARS:
            raise ConversationRelayError("message larger than 64 kB")
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise ConversationRelayError(f"not JSON: {text[:60]!r}") from None
        if not isinstance(msg, dict):
            raise ConversationRelayError("message is not a JSON object")
        kind = msg.get("type")
        if kind == "setup":
            if self.setup is not None:
                raise ConversationRelayError("second setup message")
            self.setup = self._setup(msg)
            return self.setup
        if self.setup is None:
            raise ConversationRelayError(f"{kind!r} before setup")
        if kind == "prompt":
            last = msg.get("last", True)
            if not isinstance(last, bool):
                raise ConversationRelayError(f"prompt.last: expected a boolean, got {last!r:.20}")
            return CrPrompt(
                _str(msg, "voicePrompt", "prompt"),
                _str(msg, "lang", "prompt", required=False),
                last,
            )
        if kind == "interrupt":
            return CrInterrupt(
                _str(msg, "utteranceUntilInterrupt", "interrupt", required=False),
                _duration(msg.get("durationUntilInterruptMs")),
            )
        if kind == "dtmf":
            digit = _str(msg, "digit", "dtmf")
            if len(digit) != 1 or digit not in DTMF_DIGITS:
                raise ConversationRelayError(f"dtmf.digit: not a keypad digit: {digit!r:.10}")
            return CrDtmf(digit)
        if kind == "error":
            return CrError(_str(msg, "description", "error", required=False)[:500])
        raise ConversationRelayError(f"unknown message type {kind!r:.40}")

    @staticmethod
    def _setup(msg: dict[str, Any]) -> CrSetup:
        call_sid = _str(msg, "callSid", "setup")
        if not call_sid.startswith("CA") or len(call_sid) > 64:
            raise ConversationRelayError("setup.callSid: not a call SID")
        params = msg.get("customParameters") or {}
        if not isinstance(params, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in params.items()
        ):
            raise ConversationRelayError("setup.customParameters: expected strings")
        return CrSetup(
            session_id=_str(msg, "sessionId", "setup", required=False),
            call_sid=call_sid,
            account_sid=_str(msg, "accountSid", "setup", required=False),
            from_number=_str(msg, "from", "setup", required=False),
            to_number=_str(msg, "to", "setup", required=False),
            direction=_str(msg, "direction", "setup", required=False),
            custom_parameters=dict(params),
        )


def _duration(value: Any) -> int | None:
    # A number in the message reference, a string in the interrupt example: accept both.
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ConversationRelayError("interrupt.durationUntilInterruptMs: not a number")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ConversationRelayError(
                f"interrupt.durationUntilInterruptMs: not a number: {value!r:.20}"
            ) from None
    else:
        raise ConversationRelayError("interrupt.durationUntilInterruptMs: not a number")
    if not 0 <= number < 86_400_000:
        raise ConversationRelayError("interrupt.durationUntilInterruptMs: out of range")
    return int(number)


# --- app -> Twilio ---------------------------------------------------------------------------
def text_message(
    token: str,
    last: bool,
    *,
    interruptible: bool | None = None,
    preemptible: bool | None = None,
) -> str:
    """One piece of the answer for Twilio's TTS; ``last`` True ends the answer (Twilio
    speaks tokens as they come, so the first words are heard before the model is done)."""
    msg: dict[str, Any] = {"type": "text", "token": token, "last": last}
    if interruptible is not None:
        msg["interruptible"] = interruptible
    if preemptible is not None:
        msg["preemptible"] = preemptible
    return orjson.dumps(msg).decode()


def end_message(handoff: dict[str, Any] | str | None = None) -> str:
    """End the session; Twilio then runs ``<Connect action>`` with ``HandoffData``."""
    msg: dict[str, Any] = {"type": "end"}
    if handoff is not None:
        # handoffData is a string field: an object goes as its JSON text
        msg["handoffData"] = handoff if isinstance(handoff, str) else orjson.dumps(handoff).decode()
    return orjson.dumps(msg).decode()


def play_message(source: str, *, loop: int = 1, interruptible: bool | None = None) -> str:
    msg: dict[str, Any] = {"type": "play", "source": source, "loop": loop}
    if interruptible is not None:
        msg["interruptible"] = interruptible
    return orjson.dumps(msg).decode()


def send_digits_message(digits: str) -> str:
    if not digits or any(d not in DTMF_DIGITS for d in digits):
        raise LocalProtocolError(f"sendDigits: not keypad digits: {digits!r}")
    return orjson.dumps({"type": "sendDigits", "digits": digits}).decode()


def language_message(tts_language: str = "", transcription_language: str = "") -> str:
    msg: dict[str, Any] = {"type": "language"}
    if tts_language:
        msg["ttsLanguage"] = tts_language
    if transcription_language:
        msg["transcriptionLanguage"] = transcription_language
    return orjson.dumps(msg).decode()
