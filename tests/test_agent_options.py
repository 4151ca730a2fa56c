"""relay.agents.options and the registry's ``env_fallback``: a vendor API key comes from the
relay's environment only for the deployer's own (relay.toml) agents, never for an agent
stored through the API; plus the shared option and wire helpers."""

from __future__ import annotations

from typing import Any

import pytest

from relay.agents import options as agent_options
from relay.agents.gemini_protocol import GeminiOptions
from relay.agents.liveness import DEFAULT_RECONNECT_TIMEOUT_S
from relay.agents.registry import create_agent, validate_agent
from relay.agents.wire import join_prompt, tool_arguments, with_query
from relay.errors import ConfigError, RemoteProtocolError

#: every adapter that reads a key from the environment: (type, variable, extra options)
ENV_KEYED = [
    ("openai", "OPENAI_API_KEY", {}),
    ("assemblyai", "ASSEMBLYAI_API_KEY", {}),
    ("deepgram", "DEEPGRAM_API_KEY", {}),
    ("gemini", "GEMINI_API_KEY", {}),
]
DEPLOYER_KEY = "deployer-key-0000000000wxyz"


@pytest.fixture
def deployer_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for _, env_var, _ in ENV_KEYED:
        monkeypatch.setenv(env_var, DEPLOYER_KEY)
    monkeypatch.setenv("ELEVENLABS_API_KEY", DEPLOYER_KEY)


def key_of(agent: Any) -> str:
    return str(agent.options.api_key)


@pytest.mark.usefixtures("deployer_keys")
@pytest.mark.parametrize(("kind", "env_var", "extra"), ENV_KEYED)
def test_relay_toml_agents_fall_back_to_the_environment(
    kind: str, env_var: str, extra: dict[str, Any]
) -> None:
    assert key_of(create_agent({"type": kind, **extra})) == DEPLOYER_KEY
    assert key_of(validate_agent({"type": kind, **extra}, where="agents.x")) == DEPLOYER_KEY


@pytest.mark.usefixtures("deployer_keys")
@pytest.mark.parametrize(("kind", "env_var", "extra"), ENV_KEYED)
def test_stored_agents_never_use_the_deployers_key(
    kind: str, env_var: str, extra: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError) as info:
        create_agent({"type": kind, **extra}, env_fallback=False)
    assert "agents.*.api_key: required" in str(info.value) and env_var in str(info.value)
    with pytest.raises(ConfigError) as info:
        validate_agent({"type": kind, **extra}, where="agents.t1", env_fallback=False)
    assert str(info.value).startswith("agents.t1.api_key: required")
    # the agent's own key is fine
    own = create_agent({"type": kind, "api_key": "tenant-key-0001", **extra}, env_fallback=False)
    assert key_of(own) == "tenant-key-0001"


@pytest.mark.usefixtures("deployer_keys")
def test_elevenlabs_stored_agent_is_public_rather_than_on_the_deployers_key() -> None:
    """ElevenLabs needs no key for a public agent: without one of its own, a stored agent
    connects keyless instead of borrowing ELEVENLABS_API_KEY."""
    table = {"type": "elevenlabs", "agent_id": "agent_0123456789"}
    assert key_of(create_agent(table)) == DEPLOYER_KEY
    assert key_of(create_agent(table, env_fallback=False)) == ""


@pytest.mark.usefixtures("deployer_keys")
def test_the_env_fallback_option_marks_stored_agents() -> None:
    """Options passed on alone (a route's) carry the mark; it only ever takes the fallback
    away, and the adapter never sees it."""
    with pytest.raises(ConfigError, match="api_key"):
        create_agent({"type": "openai", "env_fallback": False})
    with pytest.raises(ConfigError, match="api_key"):
        create_agent({"type": "openai", "env_fallback": "false"})
    with pytest.raises(ConfigError, match="api_key"):
        create_agent({"type": "openai", "env_fallback": True}, env_fallback=False)
    agent = create_agent({"type": "assemblyai", "env_fallback": True})  # strict keys: accepted
    assert key_of(agent) == DEPLOYER_KEY
    with pytest.raises(ConfigError, match="env_fallback"):
        create_agent({"type": "openai", "env_fallback": "maybe"})


@pytest.mark.usefixtures("deployer_keys")
def test_the_flag_does_not_outlive_the_call() -> None:
    with pytest.raises(ConfigError):
        create_agent({"type": "gemini"}, env_fallback=False)
    assert agent_options.env_fallback_allowed()
    assert key_of(create_agent({"type": "gemini"})) == DEPLOYER_KEY


def test_recovery_budget_is_the_same_everywhere() -> None:
    """The sans-IO Gemini options cannot import the Trio-side default: kept equal here."""
    assert GeminiOptions().reconnect_timeout_s == DEFAULT_RECONNECT_TIMEOUT_S
    gemini = create_agent({"type": "gemini", "api_key": "k"})
    assert gemini.options.reconnect_timeout_s == DEFAULT_RECONNECT_TIMEOUT_S  # type: ignore[attr-defined]
    aai = create_agent({"type": "assemblyai", "api_key": "k"})
    assert aai.reconnect_timeout_s == DEFAULT_RECONNECT_TIMEOUT_S  # type: ignore[attr-defined]


def test_api_key_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOME_VENDOR_KEY", " from-env \n")
    api_key = agent_options.api_key
    assert api_key({"api_key": " own\n"}, "SOME_VENDOR_KEY", "x") == "own"
    assert api_key({}, "SOME_VENDOR_KEY", "x") == "from-env"
    assert api_key({"llm_api_key": "k"}, "SOME_VENDOR_KEY", "x", key="llm_api_key") == "k"
    with agent_options.env_fallback(False):
        assert api_key({}, "SOME_VENDOR_KEY", "x", required=False) == ""
        with pytest.raises(ConfigError, match=r"agents\.\*\.llm_api_key: required"):
            api_key({}, "SOME_VENDOR_KEY", "x", key="llm_api_key")
    monkeypatch.delenv("SOME_VENDOR_KEY")
    with pytest.raises(ConfigError, match="RELAY_AGENTS_<NAME>_API_KEY or SOME_VENDOR_KEY"):
        api_key({}, "SOME_VENDOR_KEY", "x")


@pytest.mark.parametrize(
    ("fn", "value", "key"),
    [
        (agent_options.as_bool, "maybe", "flag"),
        (agent_options.as_number, "ten", "n"),
        (agent_options.as_seconds, 0, "t"),
        (agent_options.as_seconds, float("nan"), "t"),
        (agent_options.as_table, "[1", "tbl"),
        (agent_options.as_table, [1], "tbl"),
    ],
)
def test_value_errors_name_the_key(fn: Any, value: Any, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"agents\.\*\.{key}:"):
        fn(key, value)


def test_values() -> None:
    assert agent_options.as_bool("b", "Off") is False and agent_options.as_bool("b", 1) is True
    assert agent_options.as_table("t", '{"a": 1}') == {"a": 1}
    assert agent_options.as_table("t", "") is None
    assert agent_options.option_int({"n": "3"}, "n", 0) == 3
    assert agent_options.option_seconds({}, "s", 2.5) == 2.5
    with pytest.raises(ConfigError, match="unknown option for a deepgram agent"):
        agent_options.check_option_keys("deepgram", {"name": "x", "voise": 1}, {"voice"})


def test_wire_helpers() -> None:
    assert with_query("wss://h/p", "model", "a b") == "wss://h/p?model=a%20b"
    assert with_query("wss://h/p?x=1#f", "model", "m") == "wss://h/p?x=1&model=m#f"
    assert with_query("wss://h/p?model=keep", "model", "m") == "wss://h/p?model=keep"
    assert join_prompt("Be brief.", "") == "Be brief."
    assert join_prompt("", "So far") == "So far"
    assert join_prompt("Be brief.", "So far") == "Be brief.\n\nSo far"
    assert tool_arguments(None, "t") == "{}"
    assert tool_arguments({"a": 1}, "t") == '{"a":1}'
    with pytest.raises(RemoteProtocolError, match="must be an object"):
        tool_arguments([1], "t")
