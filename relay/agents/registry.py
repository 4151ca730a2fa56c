"""Agent ``type`` -> factory. The one place that knows every adapter by name.

``env_fallback``: the deployer's own agents (``[agents.NAME]`` in relay.toml) may take their
vendor API key from the relay's environment (``OPENAI_API_KEY``, ``GEMINI_API_KEY``, ...);
agents stored through the API (a tenant's) must not: create and validate those with
``env_fallback=False``. The flag reaches the adapter's one key lookup,
:func:`relay.agents.options.api_key`, through a context variable held only while the
adapter's ``from_config`` runs. Code that passes an agent on as its options alone (a route's
options) can mark them instead: an option ``env_fallback = false`` has the same effect. The
option can only take the fallback away: ``env_fallback = true`` in an agent's options never
turns it on where the caller said False.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from ..control.policies import CallPolicy, adapter_options
from ..errors import ConfigError
from .base import Agent
from .options import as_bool
from .options import env_fallback as env_fallback_scope

#: The option that marks an agent's options as a stored (tenant's) agent's (see above).
ENV_FALLBACK_OPTION = "env_fallback"

# type name -> "module:Class"; imported lazily so an unused adapter costs nothing.
ADAPTERS = {
    "openai": "relay.agents.openai:OpenAIRealtimeAgent",
    "parrot": "relay.agents.parrot:ParrotAgent",
    "echo": "relay.agents.echo:EchoAgent",
    "assemblyai": "relay.agents.assemblyai:AssemblyAIAgent",
    "deepgram": "relay.agents.deepgram:DeepgramAgent",
    "elevenlabs": "relay.agents.elevenlabs:ElevenLabsAgent",
    "gemini": "relay.agents.gemini:GeminiLiveAgent",
    "cascaded": "relay.agents.text.factory:CascadedPipelineAgent",
    "local": "relay.agents.text.factory:LocalVoiceAgent",
    "twilio-speech": "relay.agents.twilio_speech.config:TwilioSpeechAgent",
}


def create_agent(options: Mapping[str, Any], *, env_fallback: bool = True) -> Agent:
    """A new (unconnected) agent from its options. ``env_fallback`` False: the adapter may
    not read its API key from the relay's environment (agents stored through the API)."""
    kind = str(options.get("type", ""))
    target = ADAPTERS.get(kind)
    if target is None:
        raise ConfigError(f"unknown agent type {kind!r} (known: {', '.join(sorted(ADAPTERS))})")
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    marked = options.get(ENV_FALLBACK_OPTION)
    if marked is not None and not as_bool(ENV_FALLBACK_OPTION, marked):
        env_fallback = False
    # Policy options (relay.control.policies) are every agent's: the adapter never sees them.
    skip = ("type", ENV_FALLBACK_OPTION)
    opts = {k: v for k, v in adapter_options(options).items() if k not in skip}
    with env_fallback_scope(env_fallback):
        agent: Agent = cls.from_config(opts)
    return agent


def validate_agent(
    options: Mapping[str, Any], *, where: str = "agent", env_fallback: bool = True
) -> Agent:
    """Check an agent's options exactly as a call would use them (construct, don't connect).

    The one validation path for ``[agents.NAME]`` tables and ``/api/v1/agents`` bodies; the
    ConfigError names the offending key. ``env_fallback``: as for :func:`create_agent`
    (False for agents stored through the API: a missing ``api_key`` is then an error).
    """
    if not isinstance(options.get("type"), str) or not options.get("type"):
        raise ConfigError(
            f"{where}.type: required, one of {', '.join(sorted(ADAPTERS))}", kind="config"
        )
    CallPolicy.from_options(options, where=where)
    try:
        return create_agent(options, env_fallback=env_fallback)
    except ConfigError as exc:
        message = str(exc)
        if message.startswith("agents.*."):
            message = where + message[len("agents") :].replace(".*", "", 1)
        raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
