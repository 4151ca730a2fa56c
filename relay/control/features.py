"""Per-agent call features: warm start, caller context (prep), recording, post-call webhook.

Options of an agent like the policies of ``relay/control/policies.py`` (same tables, same
one validation path, never seen by the adapter); :class:`CallFeatures` is the parsed form,
kept on :class:`~relay.control.policies.CallPolicy` as ``features``.

=======================  ==================================================================
``warm_start``           open the agent session while answering the voice webhook
                         (relay/control/warm.py); default true for the agent types reached
                         over the network (:data:`WARM_TYPES`), false for the others (the
                         in-process ``parrot``, ``echo``, ``local``: nothing to connect)
``prep_webhook``         URL POSTed ``{caller, country, agent, call_sid, tenant, ...}``
                         while the agent connects; the text it answers is appended to the
                         agent's instructions for this call (relay/control/prep.py)
``prep_timeout_ms``      how long the call waits for it (default 1000, at most 10000)
``record``               stereo WAV of the call, caller left, agent right
                         (relay/media/recording.py)
``post_call_webhook``    URL POSTed the call record and transcript, signed, when the call
                         ends (relay/control/postcall.py)
``allow_private_urls``   let ``prep_webhook`` / ``post_call_webhook`` reach private,
                         loopback or link-local addresses (honoured for relay.toml agents;
                         ``[security] allow_private_urls`` allows them for every agent)
=======================  ==================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigError

__all__ = ["FEATURE_OPTIONS", "INSTRUCTION_TYPES", "WARM_TYPES", "CallFeatures"]

FEATURE_OPTIONS = frozenset(
    {
        "warm_start",
        "prep_webhook",
        "prep_timeout_ms",
        "record",
        "post_call_webhook",
        "allow_private_urls",
    }
)
#: agent types whose session is a vendor connection (handshake, setup, time to first audio):
#: warm start hides that; in-process agents (parrot, echo, local) connect in no time
WARM_TYPES = frozenset({"openai", "gemini", "elevenlabs", "deepgram", "assemblyai", "cascaded"})
#: agent types whose ``instructions`` option is the model's system prompt (prep appends)
INSTRUCTION_TYPES = frozenset(
    {"openai", "gemini", "elevenlabs", "deepgram", "assemblyai", "cascaded", "local"}
)
DEFAULT_PREP_TIMEOUT_MS = 1000
MAX_PREP_TIMEOUT_MS = 10_000
MAX_URL_CHARS = 2000


def _bool(value: Any, key: str, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):  # an environment override
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
    raise ConfigError(f"{where}.{key}: true or false, got {value!r}")


def _url(value: Any, key: str, where: str) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or len(value) > MAX_URL_CHARS:
        raise ConfigError(f"{where}.{key}: an http(s) URL of at most {MAX_URL_CHARS} characters")
    value = value.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}.{key}: an http(s)://host/... URL, got {value[:80]!r}")
    if any(c in value for c in "\r\n\0 "):
        raise ConfigError(f"{where}.{key}: spaces and line breaks are not allowed in a URL")
    return value


@dataclass(frozen=True)
class CallFeatures:
    #: None: the type's default (see :meth:`warm`)
    warm_start: bool | None = None
    prep_webhook: str = ""
    prep_timeout_ms: int = DEFAULT_PREP_TIMEOUT_MS
    record: bool = False
    post_call_webhook: str = ""
    allow_private_urls: bool = False

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, where: str = "agent") -> CallFeatures:
        """ConfigError names the option (``where.key``)."""
        o = options
        warm = o.get("warm_start")
        timeout = o.get("prep_timeout_ms", DEFAULT_PREP_TIMEOUT_MS)
        if isinstance(timeout, str):
            timeout = timeout.strip()
            timeout = int(timeout) if timeout.isdigit() else timeout
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or timeout != int(timeout)
            or not 1 <= timeout <= MAX_PREP_TIMEOUT_MS
        ):
            raise ConfigError(
                f"{where}.prep_timeout_ms: an integer from 1 to {MAX_PREP_TIMEOUT_MS}, "
                f"got {timeout!r}"
            )
        return cls(
            warm_start=None if warm is None else _bool(warm, "warm_start", where),
            prep_webhook=_url(o.get("prep_webhook"), "prep_webhook", where),
            prep_timeout_ms=int(timeout),
            record=_bool(o.get("record", False), "record", where),
            post_call_webhook=_url(o.get("post_call_webhook"), "post_call_webhook", where),
            allow_private_urls=_bool(
                o.get("allow_private_urls", False), "allow_private_urls", where
            ),
        )

    def warm(self, agent_type: str) -> bool:
        """Whether calls of an agent of ``agent_type`` start warm."""
        if self.warm_start is not None:
            return self.warm_start
        return agent_type in WARM_TYPES
