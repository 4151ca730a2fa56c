"""``[agents.NAME] type = "twilio-speech"``: options -> :class:`TwilioSpeechAgent`.

The agent object holds configuration only: Twilio does the speech, so there is no media
session to open. The voice webhook asks it for TwiML (:mod:`relay.protocol.twiml_speech`),
and the ConversationRelay session / the Gather webhooks drive its chat model through
:class:`~relay.agents.text.llm.Conversation`. Unknown keys are refused with their name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...errors import AgentError, ConfigError
from ...tools import ToolRegistry
from ..base import Agent, AgentEvent, CallInfo
from ..options import option_bool, option_int, option_seconds, option_str
from ..text.agent import END_CALL_SCHEMA, tool_options
from ..text.factory import _COMMON_KEYS, _check, llm_brain_factory
from ..text.llm import Brain

__all__ = ["MODES", "SpeechSettings", "TwilioSpeechAgent"]

MODES = ("conversation-relay", "gather")
INTERRUPTIBLE = ("any", "speech", "dtmf", "none")

_KEYS = _COMMON_KEYS | {
    "mode",
    "welcome_greeting",
    "voice",
    "tts_provider",
    "transcription_provider",
    "speech_model",
    "language",
    "hints",
    "interruptible",
    "dtmf_detection",
    "speech_timeout",
    "gather_timeout_s",
    "early_answer",
    "no_input_prompt",
    "no_input_goodbye",
    "goodbye",
    "profanity_filter",
}


@dataclass(frozen=True)
class SpeechSettings:
    """What goes into the TwiML (attribute values as Twilio spells them)."""

    mode: str
    greeting: str
    voice: str
    tts_provider: str
    transcription_provider: str
    speech_model: str
    language: str
    hints: str
    interruptible: str
    dtmf_detection: bool
    speech_timeout: str
    gather_timeout_s: int
    profanity_filter: bool | None
    early_answer: bool
    no_input_prompt: str
    no_input_goodbye: str
    goodbye: str
    apology: str
    goodbye_on_failure: str
    max_llm_failures: int
    extra: dict[str, Any] = field(default_factory=dict)


def _hints(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return ",".join(v.strip() for v in value if v.strip())
    raise ConfigError("agents.*.hints: a comma-separated string or a list of strings")


def _speech_timeout(options: Mapping[str, Any]) -> str:
    value = options.get("speech_timeout")
    if value is None or value == "" or value == "auto":
        return "auto"  # Twilio: "stops recognizing speech at the first pause"
    seconds = option_seconds(options, "speech_timeout", 2.0)
    if seconds > 60:
        raise ConfigError("agents.*.speech_timeout: at most 60 seconds, or auto")
    return f"{seconds:g}"


class TwilioSpeechAgent(Agent):
    """A chat model on the phone through Twilio's own speech (no media stream)."""

    name: ClassVar[str] = "twilio-speech"

    def __init__(
        self,
        settings: SpeechSettings,
        *,
        brain: Callable[[], Brain],
        instructions: str,
        tools: list[dict[str, Any]],
        tool_registry: ToolRegistry | None,
        max_tool_rounds: int,
        tool_timeout_s: float,
    ) -> None:
        self.settings = settings
        self.brain_factory = brain
        self.instructions = instructions
        self.tool_schemas = tools
        self.tools = tool_registry
        self.max_tool_rounds = max_tool_rounds
        self.tool_timeout_s = tool_timeout_s

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> TwilioSpeechAgent:
        _check("twilio-speech", options, _KEYS)
        mode = option_str(options, "mode", "conversation-relay")
        if mode not in MODES:
            raise ConfigError(f"agents.*.mode: one of {', '.join(MODES)}, got {mode!r}")
        gather = mode == "gather"
        interruptible = options.get("interruptible", "any")
        if isinstance(interruptible, bool):
            interruptible = "any" if interruptible else "none"
        if interruptible not in INTERRUPTIBLE:
            raise ConfigError(f"agents.*.interruptible: one of {', '.join(INTERRUPTIBLE)}")
        brain = llm_brain_factory(options, required=True)
        assert brain is not None
        tools, registry = tool_options(options)
        if option_bool(options, "end_call", True):
            tools.append(dict(END_CALL_SCHEMA))
        profanity = options.get("profanity_filter")
        greeting = option_str(options, "welcome_greeting") or option_str(options, "greeting")
        settings = SpeechSettings(
            mode=mode,
            greeting=greeting,
            # Gather's <Say> needs a voice; Polly.Salli is what the issue asks for
            voice=option_str(options, "voice", "Polly.Salli" if gather else ""),
            tts_provider=option_str(options, "tts_provider"),
            transcription_provider=option_str(options, "transcription_provider"),
            speech_model=option_str(
                options, "speech_model", "googlev2_telephony" if gather else ""
            ),
            language=option_str(options, "language"),
            hints=_hints(options.get("hints")),
            interruptible=str(interruptible),
            dtmf_detection=option_bool(options, "dtmf_detection", True),
            speech_timeout=_speech_timeout(options),
            gather_timeout_s=max(1, option_int(options, "gather_timeout_s", 5)),
            profanity_filter=None
            if profanity is None
            else option_bool(options, "profanity_filter", True),
            early_answer=option_bool(options, "early_answer", True),
            no_input_prompt=option_str(options, "no_input_prompt", "Are you still there?"),
            no_input_goodbye=option_str(
                options, "no_input_goodbye", "I did not hear anything, so I will hang up. Goodbye."
            ),
            goodbye=option_str(options, "goodbye", "Goodbye."),
            apology=option_str(
                options,
                "apology",
                "Sorry, I am having trouble answering right now. Please say that again.",
            ),
            goodbye_on_failure=option_str(
                options,
                "goodbye_on_failure",
                "Sorry, I cannot help you right now. Please call again later. Goodbye.",
            ),
            max_llm_failures=max(1, option_int(options, "max_llm_failures", 2)),
        )
        return cls(
            settings,
            brain=brain,
            instructions=option_str(options, "instructions"),
            tools=tools,
            tool_registry=registry,
            max_tool_rounds=option_int(options, "max_tool_rounds", 4),
            tool_timeout_s=option_seconds(options, "tool_timeout_s", 15.0),
        )

    # -- not a Media Streams agent -----------------------------------------------------------
    async def connect(self, call: CallInfo) -> None:
        raise AgentError(
            "a twilio-speech agent talks through ConversationRelay or <Gather>, not a media stream",
            kind="agent_connect",
        )

    def send_audio(self, audio: bytes) -> None:
        return None

    async def receive(self) -> list[AgentEvent]:
        raise AgentError("no media session", kind="agent_disconnected")

    async def aclose(self) -> None:
        return None
