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
