"""Config -> agent for ``type = "cascaded"`` and ``type = "local"`` (see README, "Text
agents on the phone"). Unknown keys are refused with their name, as for every adapter."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, ClassVar

from ...errors import ConfigError
from ..options import api_key, option_bool, option_int, option_seconds, option_str, option_table
from .agent import CascadedAgent, tool_options
from .llm import Brain, ChatCompletionsBrain, LLMOptions
from .speech import SpeechToText, TextToSpeech

__all__ = ["CascadedPipelineAgent", "LocalVoiceAgent", "llm_brain_factory"]

_COMMON_KEYS = frozenset(
    {
        "type",
        "name",
        "instructions",
        "greeting",
        "tools",
        "tool_registry",
        "end_call",
        "apology",
        "goodbye_on_failure",
        "max_llm_failures",
        "tool_timeout_s",
        "connect_timeout_s",
        "barge_in_on",
        "max_tool_rounds",
        "llm_url",
        "llm_model",
        "llm_api_key",
        "llm_temperature",
        "llm_max_tokens",
        "llm_timeout_s",
        "llm_connect_timeout_s",
        "llm_extra",
        "send_timeout",
        "connect_timeout",
    }
)


def _check(kind: str, options: Mapping[str, Any], known: frozenset[str]) -> None:
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"agents.*.{unknown[0]}: unknown option for a {kind} agent")


def _float(options: Mapping[str, Any], key: str, default: float) -> float:
    value = options.get(key)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"agents.*.{key}: expected a number, got {value!r}") from None


def llm_brain_factory(options: Mapping[str, Any], *, required: bool) -> Callable[[], Brain] | None:
    url = option_str(options, "llm_url")
    if not url:
        if required:
            raise ConfigError("agents.*.llm_url: required (the chat endpoint's base URL)")
        return None
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"agents.*.llm_url: must be http(s)://..., got {url!r}")
    model = option_str(options, "llm_model")
    if not model:
        raise ConfigError("agents.*.llm_model: required with llm_url")
    key = api_key(options, "LLM_API_KEY", "chat model", key="llm_api_key", required=False)
    temperature = options.get("llm_temperature")
    max_tokens = options.get("llm_max_tokens")
    opts = LLMOptions(
        url=url,
        model=model,
        api_key=key.strip(),
        temperature=None if temperature in (None, "") else _float(options, "llm_temperature", 0.7),
        max_tokens=None if max_tokens in (None, "") else option_int(options, "llm_max_tokens", 0),
        connect_timeout_s=option_seconds(options, "llm_connect_timeout_s", 3.0),
        idle_timeout_s=option_seconds(options, "llm_timeout_s", 4.0),
        extra_body=dict(option_table(options, "llm_extra") or {}),
    )
    return partial(ChatCompletionsBrain, opts)


def _common(options: Mapping[str, Any]) -> dict[str, Any]:
    tools, registry = tool_options(options)
    kwargs: dict[str, Any] = {
        "instructions": option_str(options, "instructions"),
        "tools": tools,
        "tool_registry": registry,
        "end_call": option_bool(options, "end_call", True),
        "max_llm_failures": max(1, option_int(options, "max_llm_failures", 2)),
        "tool_timeout_s": option_seconds(options, "tool_timeout_s", 15.0),
        "connect_timeout_s": option_seconds(options, "connect_timeout_s", 10.0),
        "barge_in_on": option_str(options, "barge_in_on", "speech"),
        "max_tool_rounds": option_int(options, "max_tool_rounds", 4),
    }
    for key in ("apology", "goodbye_on_failure"):
        if options.get(key):
            kwargs[key] = option_str(options, key)
    return kwargs


# --- type = "cascaded" ------------------------------------------------------------------------
class CascadedPipelineAgent(CascadedAgent):
    """``type = "cascaded"``: the STT, TTS and chat model named in the config."""

    name: ClassVar[str] = "cascaded"

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> CascadedPipelineAgent:
        from .vendors import STT, TTS

        stt_name = option_str(options, "stt")
        tts_name = option_str(options, "tts")
        if stt_name not in STT:
            raise ConfigError(f"agents.*.stt: one of {', '.join(sorted(STT))}, got {stt_name!r}")
        if tts_name not in TTS:
            raise ConfigError(f"agents.*.tts: one of {', '.join(sorted(TTS))}, got {tts_name!r}")
        stt_factory, stt_keys = STT[stt_name](options)
        tts_factory, tts_keys = TTS[tts_name](options)
        _check("cascaded", options, _COMMON_KEYS | {"stt", "tts"} | stt_keys | tts_keys)
        brain = llm_brain_factory(options, required=True)
        assert brain is not None
        return cls(
            stt=stt_factory,
            tts=tts_factory,
            brain=brain,
            greeting=option_str(options, "greeting"),
            **_common(options),
        )


# --- type = "local" -----------------------------------------------------------------------------
LOCAL_STT_KEYS = frozenset(
    {
        "recognizer_processes",
        "lm_weight",
        "vad_threshold_dbfs",
        "vad_start_ms",
        "vad_end_ms",
        "max_utterance_s",
        "corpus_extra",
    }
)
LOCAL_TTS_KEYS = frozenset({"voice", "rate_wpm", "pitch"})
_LOCAL_KEYS = (
    _COMMON_KEYS
    | LOCAL_STT_KEYS
    | LOCAL_TTS_KEYS
    | {"business", "timezone", "transfer_number", "hours"}
)


def local_stt_factory(options: Mapping[str, Any], corpus: str) -> Callable[[], SpeechToText]:
    from .local_speech import SphinxSTT

    extra = option_str(options, "corpus_extra")
    return partial(
        SphinxSTT,
        corpus + ("\n" + extra if extra else ""),
        lw=_float(options, "lm_weight", 10.0),
        processes=option_int(options, "recognizer_processes", 0),
        vad_threshold_dbfs=_float(options, "vad_threshold_dbfs", -45.0),
        vad_start_ms=_float(options, "vad_start_ms", 100.0),
        vad_end_ms=_float(options, "vad_end_ms", 500.0),
        max_utterance_s=_float(options, "max_utterance_s", 12.0),
    )


def local_tts_factory(options: Mapping[str, Any]) -> Callable[[], TextToSpeech]:
    from .local_speech import EspeakTTS

    return partial(
        EspeakTTS,
        voice=option_str(options, "voice", "en-us+f3"),
        rate_wpm=option_int(options, "rate_wpm", 165),
        pitch=option_int(options, "pitch", 50),
    )


def _hours(options: Mapping[str, Any]) -> Any:
    from .receptionist import DAYS, Hours

    table = option_table(options, "hours")
    if table is None:
        return Hours()
    days: dict[str, tuple[str, str]] = {}
    for day, span in table.items():
        day_l = str(day).lower()
        if day_l not in DAYS:
            raise ConfigError(f"agents.*.hours.{day}: not a weekday name")
        if str(span).lower() == "closed":
            continue
        start, _sep, end = str(span).partition("-")
        try:
            for hhmm in (start, end):
                hour, minute = (int(x) for x in hhmm.strip().split(":"))
                if not (0 <= hour < 24 and 0 <= minute < 60):
                    raise ValueError
        except ValueError:
            raise ConfigError(f'agents.*.hours.{day}: expected "HH:MM-HH:MM" or "closed"') from None
        days[day_l] = (start.strip(), end.strip())
    return Hours(days)


class LocalVoiceAgent(CascadedAgent):
    """``type = "local"``: PocketSphinx + eSpeak NG, the receptionist brain (or the chat
    model at ``llm_url``). No key, no network."""

    name: ClassVar[str] = "local"

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> LocalVoiceAgent:
        from .receptionist import CORPUS, ReceptionistBrain

        _check("local", options, _LOCAL_KEYS)
        brain_factory = llm_brain_factory(options, required=False)
        business = option_str(options, "business", "Relay Bakery")
        receptionist = partial(
            ReceptionistBrain,
            business=business,
            hours=_hours(options),
            timezone=option_str(options, "timezone", "UTC"),
            transfer_number=option_str(options, "transfer_number"),
        )
        greeting = option_str(options, "greeting")
        if brain_factory is None:
            brain_factory = receptionist
            greeting = greeting or receptionist().greeting()
        common = _common(
            options if "tools" in options else {**options, "tools": ["get_time", "transfer_call"]}
        )
        return cls(
            stt=local_stt_factory(options, CORPUS),
            tts=local_tts_factory(options),
            brain=brain_factory,
            greeting=greeting,
            **common,
        )
