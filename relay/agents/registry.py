"""Agent ``type`` -> factory. The one place that knows every adapter by name."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from .base import Agent

# type name -> "module:Class"; imported lazily so an unused adapter costs nothing.
ADAPTERS = {
    "openai": "relay.agents.openai:OpenAIRealtimeAgent",
    "parrot": "relay.agents.parrot:ParrotAgent",
    "echo": "relay.agents.echo:EchoAgent",
    "elevenlabs": "relay.agents.elevenlabs:ElevenLabsAgent",
    "gemini": "relay.agents.gemini:GeminiLiveAgent",
}


def create_agent(options: Mapping[str, Any]) -> Agent:
    kind = str(options.get("type", ""))
    target = ADAPTERS.get(kind)
    if target is None:
        raise ConfigError(f"unknown agent type {kind!r} (known: {', '.join(sorted(ADAPTERS))})")
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    opts = {k: v for k, v in options.items() if k != "type"}
    agent: Agent = cls.from_config(opts)
    return agent


def validate_agent(options: Mapping[str, Any], *, where: str = "agent") -> Agent:
    """Check an agent's options exactly as a call would use them (construct, don't connect).

    The one validation path for ``[agents.NAME]`` tables and ``/api/v1/agents`` bodies; the
    ConfigError names the offending key.
    """
    if not isinstance(options.get("type"), str) or not options.get("type"):
        raise ConfigError(
            f"{where}.type: required, one of {', '.join(sorted(ADAPTERS))}", kind="config"
        )
    try:
        return create_agent(options)
    except ConfigError as exc:
        message = str(exc)
        if message.startswith("agents.*."):
            message = where + message[len("agents") :].replace(".*", "", 1)
        raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
