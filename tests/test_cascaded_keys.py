"""The cascaded agent's vendor keys (``stt_api_key``, ``tts_api_key``, ``llm_api_key``) follow
relay.agents.options.api_key: a relay.toml agent may fall back to the deployer's
environment (DEEPGRAM_API_KEY, ...), a tenant's stored agent never does. End to end against
the local vendor fakes, which refuse a wrong key like the real services."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from conftest import OTHER_TOKEN
from fake_llm import Reply
from fake_stt_tts import KEY
from test_e2e_cascaded import call, rig, script

from relay.agents.options import env_fallback
from relay.agents.registry import create_agent, validate_agent
from relay.agents.text import vendors
from relay.errors import AgentError, ConfigError

TENANT_SID = "AC" + "6" * 32
TENANT_NUMBER = "+14155550666"
ENV_KEYS = ("DEEPGRAM_API_KEY", "ASSEMBLYAI_API_KEY", "ELEVENLABS_API_KEY", "OPENAI_API_KEY")


def keyless(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in ("stt_api_key", "tts_api_key")}


@pytest.fixture
def deployer_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The deployer's environment holds the key the fakes accept."""
    for name in ENV_KEYS:
        monkeypatch.setenv(name, KEY)


def greeting(body: dict[str, Any]) -> Reply:
    return Reply(text="Fine, thanks.")


@pytest.mark.usefixtures("deployer_keys")
def test_stored_cascaded_agent_without_keys_is_refused() -> None:
    options = {
        "type": "cascaded",
        "stt": "deepgram",
        "tts": "elevenlabs",
        "stt_url": "wss://stt.example.com/v1/listen",
        "tts_url": "wss://tts.example.com/v1/text-to-speech/{voice}/stream-input",
        "llm_url": "https://llm.example.com/v1",
        "llm_model": "m",
    }
    with pytest.raises(ConfigError, match=r"stt_api_key: required .*DEEPGRAM_API_KEY"):
        create_agent(options, env_fallback=False)
    with pytest.raises(ConfigError, match=r"^agents\.t1\.stt_api_key: required"):
        validate_agent(options, where="agents.t1", env_fallback=False)
    with pytest.raises(ConfigError, match=r"tts_api_key: required .*ELEVENLABS_API_KEY"):
        create_agent({**options, "stt_api_key": "own"}, env_fallback=False)
    # relay.toml's agent takes the deployer's keys, also in the per-call instances built
    # later (outside the registry's scope)
    agent: Any = create_agent(options)
    assert dict(agent._stt_factory().headers)["Authorization"] == f"Token {KEY}"


def test_per_call_instances_keep_the_agents_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The STT/TTS of each call is built when the call connects: the stored agent's rule
    travels with it, and a key gone missing by then is an AgentError of that call."""
    options = {"stt_api_key": "own-key", "stt_url": "wss://stt.example.com/v1/listen"}
    with env_fallback(False):
        make, _keys = vendors.STT["deepgram"](options)
    monkeypatch.setenv("DEEPGRAM_API_KEY", "deployer-key")
    assert dict(make().headers)["Authorization"] == "Token own-key"
    built = make.args  # (class, options, rule): the options the call will use
    built[1].pop("stt_api_key")
    with pytest.raises(AgentError, match="stt_api_key: required") as info:
        make()
    assert info.value.kind == "agent_config"


@pytest.mark.usefixtures("deployer_keys")
async def test_relay_toml_cascaded_agent_falls_back_to_the_environment(
    make_config: Any, start_relay: Any
) -> None:
    async with rig("deepgram", "deepgram", greeting, []) as r:
        _result, record = await call(
            make_config, start_relay, keyless(r.options), script(("silence", 2.0))
        )
        assert r.stt.peers and r.tts.peers  # connected on the deployer's key
        assert not r.stt.rejected and not r.tts.rejected
    assert record.transcript[0]["role"] == "agent"  # the greeting, first
    assert record.transcript[0]["text"] == "Hello, how can I help?"


@pytest.mark.usefixtures("deployer_keys")
async def test_stored_cascaded_agent_never_uses_the_deployers_key(
    make_config: Any, start_relay: Any, e2e: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A tenant's agent written without keys (as an old row or a direct store write would
    be): its call fails with a clear error, and no vendor ever sees the deployer's key."""
    async with rig("deepgram", "deepgram", greeting, []) as r:
        # loopback fakes: lift the private-address check, so only the key rule is at work
        relay_ = await start_relay(make_config(security={"allow_private_urls": True}))
        store = relay_.state.control.store
        tenant, _key, _plain = store.create_tenant("acme")
        store.put_twilio(
            tenant.id,
            account_sid=TENANT_SID,
            auth_token=OTHER_TOKEN,
            region=None,
            edge=None,
            numbers=[TENANT_NUMBER],
        )
        options = {k: v for k, v in keyless(r.options).items() if k != "type"}
        row = store.create_agent(tenant.id, "desk", "cascaded", options, {})
        assert store.set_number_agent(tenant.id, TENANT_NUMBER, row.id)
        with trio.fail_after(15):
            call_sid = e2e.sid("CA")
            response, twiml = await relay_.voice(
                call_sid, to=TENANT_NUMBER, account_sid=TENANT_SID, auth_token=OTHER_TOKEN
            )
            assert response.status == 200 and twiml is not None and twiml.stream_url
            await relay_.connect(call_sid, twiml, auth_token=OTHER_TOKEN)
            record = await relay_.wait_record(call_sid, "completed", timeout=10)
        assert not r.stt.peers and not r.stt.rejected
        assert not r.tts.peers and not r.tts.rejected
        assert not r.llm.requests
    assert record.end_reason == "agent connect failed"
    assert relay_.metrics.errors["agent_connect"] == 1
    failure = [m for m in caplog.messages if "agent connect failed" in m]
    assert len(failure) == 1
    assert "stt_api_key: required" in failure[0] and "relay.toml agents only" in failure[0]
