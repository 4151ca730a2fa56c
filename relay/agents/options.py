"""Agent options: ``[agents.NAME]`` values (TOML, JSON bodies of ``/api/v1/agents``, or
``RELAY_AGENTS_<NAME>_<KEY>`` environment overrides, which arrive as text) -> Python values.
Every error is a :class:`~relay.errors.ConfigError` naming the key (``agents.*.<key>: …``;
``validate_agent`` puts the agent's real name in place of ``*``). No I/O, no Trio.

API keys: :func:`api_key` is the one place an adapter reads a vendor key from the process
environment (``OPENAI_API_KEY``, ``GEMINI_API_KEY``, ...). That fallback is for the
deployer's own agents (relay.toml) only: an agent stored through the API belongs to a
tenant, who must neither run calls on the deployer's key nor receive it at a ``url`` of its
choosing. :func:`relay.agents.registry.create_agent` builds such agents with
``env_fallback=False``, which reaches :func:`api_key` through a context variable set around
the adapter's ``from_config`` (see :func:`env_fallback`): every adapter, present or future,
gets the rule by calling this one function, and no ``from_config`` signature has to carry
it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import orjson

from ..errors import ConfigError
from ..tools import ToolRegistry, resolve_tools

__all__ = [
    "GENERIC_KEYS",
    "api_key",
    "as_bool",
    "as_number",
    "as_seconds",
    "as_table",
    "check_option_keys",
    "env_fallback",
    "env_fallback_allowed",
    "option_bool",
    "option_int",
    "option_seconds",
    "option_str",
    "option_table",
    "tool_options",
    "warn_unknown_keys",
]

#: Keys any agent table may carry whatever its adapter (``name``; the older
#: ``send_timeout``/``connect_timeout`` spellings that relay.agents.echo reads).
GENERIC_KEYS = frozenset({"type", "name", "send_timeout", "connect_timeout"})

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")

_ENV_FALLBACK: ContextVar[bool] = ContextVar("relay_agents_env_fallback", default=True)


# --- API keys -------------------------------------------------------------------------------
@contextmanager
def env_fallback(allowed: bool) -> Iterator[None]:
    """Within the block, :func:`api_key` may (True) or may not (False) fall back to the
    environment. Set by the registry around one synchronous ``from_config`` call; the
    previous value is restored on exit, so it never leaks into other agents or tasks."""
    token = _ENV_FALLBACK.set(allowed)
    try:
        yield
    finally:
        _ENV_FALLBACK.reset(token)


def env_fallback_allowed() -> bool:
    return _ENV_FALLBACK.get()


def api_key(
    options: Mapping[str, Any],
    env_var: str,
    vendor: str,
    *,
    key: str = "api_key",
    required: bool = True,
) -> str:
    """The agent's ``key`` option, else (when :func:`env_fallback` allows it: relay.toml
    agents) the environment variable ``env_var``. Stripped: a key pasted with a trailing
    newline would break the handshake header. ``required`` False returns "" when neither is
    set (ElevenLabs public agents need no key)."""
    value = str(options.get(key) or "").strip()
    if value:
        return value
    allowed = _ENV_FALLBACK.get()
    if allowed:
        value = os.environ.get(env_var, "").strip()
    if value or not required:
        return value
    if allowed:
        raise ConfigError(
            f"agents.*.{key}: empty for a {vendor} agent (set agents.<name>.{key}, "
            f"RELAY_AGENTS_<NAME>_{key.upper()} or {env_var})"
        )
    raise ConfigError(
        f"agents.*.{key}: required for a {vendor} agent that is not defined in relay.toml "
        f"(the {env_var} fallback is for relay.toml agents only)"
    )


# --- values ---------------------------------------------------------------------------------
def as_bool(key: str, value: Any) -> bool:
    """A TOML boolean, an integer, or text such as "true"/"off" (environment overrides)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    raise ConfigError(f"agents.*.{key}: expected a boolean, got {value!r}")


def as_number(key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"agents.*.{key}: expected a number, got {value!r}") from None


def as_seconds(key: str, value: Any) -> float:
    """A positive, finite number of seconds."""
    number = as_number(key, value)
    if not (number > 0 and math.isfinite(number)):
        raise ConfigError(f"agents.*.{key}: must be a positive number of seconds, got {value!r}")
    return number


def as_table(key: str, value: Any) -> Mapping[str, Any] | None:
    """A table (None when unset); environment overrides arrive as JSON text."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise ConfigError(f"agents.*.{key}: not valid JSON: {value!r}") from None
    if not isinstance(value, Mapping):
        raise ConfigError(f"agents.*.{key}: expected a table/object, got {value!r}")
    return value


# --- options by key, with defaults ----------------------------------------------------------
def option_str(options: Mapping[str, Any], key: str, default: str = "") -> str:
    value = options.get(key)
    if value is None or value == "":
        return default
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ConfigError(f"agents.*.{key}: expected a string, got {value!r}")
    return str(value)


def option_seconds(options: Mapping[str, Any], key: str, default: float) -> float:
    value = options.get(key)
    return default if value is None or value == "" else as_seconds(key, value)


def option_bool(options: Mapping[str, Any], key: str, default: bool) -> bool:
    value = options.get(key)
    return default if value is None else as_bool(key, value)


def option_int(options: Mapping[str, Any], key: str, default: int) -> int:
    """A non-negative integer."""
    value = options.get(key)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"agents.*.{key}: expected an integer, got {value!r}") from None
    if number < 0:
        raise ConfigError(f"agents.*.{key}: must not be negative, got {value!r}")
    return number


def option_table(options: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    return as_table(key, options.get(key))


def tool_options(options: Mapping[str, Any]) -> tuple[list[dict[str, Any]], ToolRegistry | None]:
    """``tools`` (names, HTTP tool tables, schemas: :func:`relay.tools.resolve_tools`) and
    the optional ``tool_registry`` (Python callers only) -> (schemas, registry)."""
    registry = options.get("tool_registry")
    if registry is not None and not isinstance(registry, ToolRegistry):
        raise ConfigError("agents.*.tool_registry: must be a relay.tools.ToolRegistry")
    schemas, registry = resolve_tools(options.get("tools"), registry)
    return [dict(s) for s in schemas], registry


# --- unknown keys ---------------------------------------------------------------------------
def check_option_keys(vendor: str, options: Mapping[str, Any], known: Iterable[str]) -> None:
    """Refuse unknown keys: a typo in relay.toml should not silently do nothing."""
    unknown = sorted(set(options) - set(known) - GENERIC_KEYS)
    if unknown:
        raise ConfigError(f"agents.*.{unknown[0]}: unknown option for a {vendor} agent")


def warn_unknown_keys(
    vendor: str, options: Mapping[str, Any], known: Iterable[str], log: logging.Logger
) -> None:
    """Log unknown keys and go on (the adapters that predate :func:`check_option_keys`)."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        log.warning("%s agent: ignoring unknown config keys %s", vendor, ", ".join(unknown))
