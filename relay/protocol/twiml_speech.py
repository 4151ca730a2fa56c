"""TwiML for Twilio-native speech: ``<Connect><ConversationRelay>`` and the
``<Gather input="speech">`` + ``<Say>`` loop. Built with twilio-python's TwiML classes, as
the voice webhook builds ``<Connect><Stream>``. Pure functions: no I/O.

Twilio rules kept here (``shared/reference/text-agents-and-twiml-speech.md``, section 2):

* only verbs *nested* in ``<Gather>`` can be barged in and are heard by recognition, so the
  answer goes inside the next ``<Gather>``;
* ``<Say>`` is limited per voice (error 13521): Polly 3000 characters, Google 5000, the
  basic voices 4096; a TwiML document is at most 64 kB (error 11750);
* ``<Redirect>`` after ``<Gather>`` is the only loop: no speech and
  ``actionOnEmptyResult`` unset skip ``action`` and run the next verb.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from twilio.twiml.voice_response import Connect, Dial, Gather, VoiceResponse

if TYPE_CHECKING:
    from ..agents.twilio_speech.config import SpeechSettings

__all__ = [
    "MAX_TWIML_BYTES",
    "conversation_relay_twiml",
    "gather_twiml",
    "hangup_twiml",
    "say_limit",
    "split_for_say",
]

MAX_TWIML_BYTES = 64 * 1024
#: what is left for the answer's text once the rest of the document is written
MAX_ANSWER_CHARS = 20_000
_SENTENCE = re.compile(r"(?<=[.!?…])\s+")


def say_limit(voice: str) -> int:
    """Characters one ``<Say>`` may hold with ``voice`` (Twilio error 13521)."""
    if voice.startswith("Polly."):
        return 3000
    if voice.startswith("Google."):
        return 5000
    return 4096


def split_for_say(text: str, limit: int) -> list[str]:
    """Cut ``text`` into ``<Say>``-sized pieces at sentence ends (then at spaces)."""
    text = " ".join(text.split())[:MAX_ANSWER_CHARS]
    if not text:
        return []
    out: list[str] = []
    piece = ""
    for sentence in _SENTENCE.split(text):
        while len(sentence) > limit:  # one sentence longer than a <Say>: cut at a space
            cut = sentence.rfind(" ", 0, limit)
            cut = cut if cut > 0 else limit
            if piece:
                out.append(piece)
                piece = ""
            out.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if piece and len(piece) + 1 + len(sentence) > limit:
            out.append(piece)
            piece = sentence
        else:
            piece = f"{piece} {sentence}" if piece else sentence
    if piece:
        out.append(piece)
    return [p for p in out if p]


def _say_kwargs(settings: SpeechSettings) -> dict[str, str]:
    kwargs = {}
    if settings.voice:
        kwargs["voice"] = settings.voice
    if settings.language:
        kwargs["language"] = settings.language
    return kwargs


def conversation_relay_twiml(
    settings: SpeechSettings,
    url: str,
    parameters: Mapping[str, str],
    *,
    action: str = "",
    prelude: Iterable[str] = (),
) -> str:
    """``<Connect action><ConversationRelay …><Parameter …/></ConversationRelay></Connect>``.

    DTMF detection is asked for explicitly: Twilio sends ``dtmf`` messages only then."""
    response = VoiceResponse()
    for text in prelude:
        response.say(text, **_say_kwargs(settings))
    connect = Connect(**({"action": action, "method": "POST"} if action else {}))
    attrs: dict[str, str] = {
        "url": url,
        "dtmf_detection": "true" if settings.dtmf_detection else "false",
        "interruptible": settings.interruptible,
    }
    optional = {
        "welcome_greeting": settings.greeting,
        "voice": settings.voice,
        "tts_provider": settings.tts_provider,
        "transcription_provider": settings.transcription_provider,
        "speech_model": settings.speech_model,
        "language": settings.language,
        "hints": settings.hints,
    }
    attrs.update({k: v for k, v in optional.items() if v})
    if settings.profanity_filter is not None:
        attrs["profanity_filter"] = "true" if settings.profanity_filter else "false"
    relay = connect.conversation_relay(**attrs)
    for name, value in parameters.items():
        relay.parameter(name=name, value=value)
    response.append(connect)
    return str(response)


def gather_twiml(
    settings: SpeechSettings,
    text: str,
    *,
    action: str,
    partial: str = "",
    redirect: str = "",
) -> str:
    """The answer said inside a speech ``<Gather>`` (so the caller can cut in), then a
    ``<Redirect>`` to ``redirect`` for when nothing was said."""
    response = VoiceResponse()
    attrs: dict[str, str] = {
        "input": "speech",
        "action": action,
        "method": "POST",
        "speech_timeout": settings.speech_timeout,
        "timeout": str(settings.gather_timeout_s),
        "barge_in": "true",
    }
    if settings.speech_model:
        attrs["speech_model"] = settings.speech_model
    if settings.language:
        attrs["language"] = settings.language
    if settings.hints:
        attrs["hints"] = settings.hints
    if settings.profanity_filter is not None:
        attrs["profanity_filter"] = "true" if settings.profanity_filter else "false"
    if partial:
        attrs["partial_result_callback"] = partial
        attrs["partial_result_callback_method"] = "POST"
    gather = Gather(**attrs)
    for piece in split_for_say(text, say_limit(settings.voice)):
        gather.say(piece, **_say_kwargs(settings))
    response.append(gather)
    if redirect:
        response.redirect(redirect, method="POST")
    return str(response)


def hangup_twiml(settings: SpeechSettings, text: str = "") -> str:
    """Say ``text`` (not interruptible: the call is ending), then hang up."""
    response = VoiceResponse()
    for piece in split_for_say(text, say_limit(settings.voice)):
        response.say(piece, **_say_kwargs(settings))
    response.hangup()
    return str(response)


def dial_twiml(settings: SpeechSettings, text: str, target: str, caller_id: str) -> str:
    """Say ``text``, then ``<Dial>`` the transfer target."""
    response = VoiceResponse()
    for piece in split_for_say(text, say_limit(settings.voice)):
        response.say(piece, **_say_kwargs(settings))
    dial = Dial(caller_id=caller_id) if caller_id else Dial()
    dial.number(target)
    response.append(dial)
    return str(response)
