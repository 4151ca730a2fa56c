"""relay.netguard: a tenant's agent connects only to public addresses, checked at every
connection and connected to the address checked (no DNS rebinding between a save-time
check and the call); the deployer's relay.toml agents may point anywhere.

The resolver is the one thing replaced (``netguard.resolve``): a name answers a public
address, then 127.0.0.1, as a rebinding DNS server would. Everything else is real: the
API's save-time check, the voice webhook, the media stream, the agent's connect.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import pytest
import trio
from conftest import OTHER_TOKEN, api_request
from fake_http import http_server
from fake_llm import Reply, fake_llm
from fake_stt_tts import KEY, FakeDeepgramListen, serve

from relay import netguard
from relay.agents.text.llm import ChatCompletionsBrain, LLMError, LLMOptions
from relay.media import websocket
from relay.metrics import Metrics
from relay.tools import HttpToolSpec, ToolRegistry

PUBLIC = "93.184.216.34"
TENANT_SID = "AC" + "7" * 32
TENANT_NUMBER = "+14155550777"


class Rebinding:
    """``netguard.resolve`` for names under ``.example.test``: whatever ``answer`` holds
    now; other names resolve for real."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
        self.answer = answer
        self.asked: list[str] = []
        real = netguard.resolve

        async def resolve(host: str, port: int) -> list[str]:
            if host.endswith(".example.test"):
                self.asked.append(host)
                return [self.answer]
            return await real(host, port)

        monkeypatch.setattr(netguard, "resolve", resolve)


def loopback_is_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the check pass for 127.0.0.1, so a local server stands in for a public one."""
    real = netguard.is_public_address
    monkeypatch.setattr(netguard, "is_public_address", lambda a: a == "127.0.0.1" or real(a))


def guard(metrics: Metrics | None = None) -> netguard.Guard:
    return netguard.Guard(True, metrics, "test agent")


# --- the helper ---------------------------------------------------------------------------
async def test_vet_follows_the_guard_in_force(monkeypatch: pytest.MonkeyPatch) -> None:
    dns = Rebinding(monkeypatch, PUBLIC)
    metrics = Metrics()
    assert await netguard.vet("api.example.test", 443, what="x") is None  # no guard: by name
    with netguard.guarding(guard(metrics)):
        assert await netguard.vet("api.example.test", 443, what="x") == PUBLIC
        dns.answer = "127.0.0.1"
        with pytest.raises(netguard.AddressRefused, match=r"api\.example\.test resolves to a priv"):
            await netguard.vet("api.example.test", 443, what="x")
        dns.answer = "169.254.169.254"
        with pytest.raises(netguard.AddressRefused):
            await netguard.vet("api.example.test", 443, what="x")
        # an explicit policy wins over the guard (HTTP tools, webhooks)
        assert await netguard.vet("api.example.test", 443, what="x", refuse_private=False) is None
    assert metrics.errors["private_address"] == 2
    with netguard.guarding(netguard.Guard(False)):
        assert await netguard.vet("api.example.test", 443, what="x") is None


async def test_websocket_connects_to_the_vetted_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """The name does not resolve for real: the connection can only have gone to the
    address the check resolved; the Host header keeps the name."""
    Rebinding(monkeypatch, "127.0.0.1")
    loopback_is_public(monkeypatch)
    with trio.fail_after(10):
        async with serve(FakeDeepgramListen()) as dg:
            url = f"ws://stt.example.test:{dg.port}/v1/listen?encoding=mulaw&sample_rate=8000"
            with netguard.guarding(guard()):
                ws = await websocket.connect(url, [("Authorization", f"Token {KEY}")])
            await dg.wait_for(lambda: len(dg.peers) == 1)
            assert dg.peers[0].headers["host"] == f"stt.example.test:{dg.port}"
            await ws.aclose()


async def test_websocket_refused_for_a_rebound_name(monkeypatch: pytest.MonkeyPatch) -> None:
    Rebinding(monkeypatch, "127.0.0.1")
    with trio.fail_after(10):
        async with serve(FakeDeepgramListen()) as dg:
            url = f"ws://stt.example.test:{dg.port}/v1/listen"
            with netguard.guarding(guard()), pytest.raises(netguard.AddressRefused):
                await websocket.connect(url, [("Authorization", f"Token {KEY}")])
            assert not dg.peers and not dg.rejected


async def test_chat_model_checked_at_every_request(monkeypatch: pytest.MonkeyPatch) -> None:
    dns = Rebinding(monkeypatch, "127.0.0.1")
    loopback_is_public(monkeypatch)
    messages = [{"role": "user", "content": "hi"}]
    with trio.fail_after(10):
        async with fake_llm(lambda body: Reply("Hello there.")) as llm:
            options = LLMOptions(
                url=f"http://llm.example.test:{llm.port}/v1", model="m", api_key=llm.api_key
            )
            brain = ChatCompletionsBrain(options)
            try:
                with netguard.guarding(guard()):
                    turn = await brain.stream(messages, [], lambda delta: None)
                    assert turn.text == "Hello there."  # went to the vetted 127.0.0.1
                    monkeypatch.undo()  # the check is real again: 127.0.0.1 is not public
                    Rebinding(monkeypatch, "127.0.0.1")
                    with pytest.raises(LLMError, match="private"):
                        await brain.stream(messages, [], lambda delta: None)
            finally:
                await brain.aclose()
            assert len(llm.requests) == 1
    assert dns.asked == ["llm.example.test"]


async def test_http_tool_refused_when_its_name_rebinds(monkeypatch: pytest.MonkeyPatch) -> None:
    Rebinding(monkeypatch, "127.0.0.1")
    with trio.fail_after(10):
        async with http_server(lambda req: (200, b"should not be reached")) as server:
            reg = ToolRegistry()
            reg.register_http(
                HttpToolSpec(name="lookup", url=f"http://crm.example.test:{server.port}/x")
            )
            answer = json.loads(await reg.call("lookup", "{}"))
            assert "refused" in answer["error"] and "crm.example.test" in answer["error"]
            assert not server.requests


# --- end to end: a tenant's stored agent ----------------------------------------------------
async def counting_listener(nursery: trio.Nursery) -> tuple[int, list[Any]]:
    """A TCP port that counts connections (nothing may reach it)."""
    seen: list[Any] = []

    async def handler(stream: trio.SocketStream) -> None:
        seen.append(stream)
        await trio.aclose_forcefully(stream)

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1], seen


async def tenant_agent(relay_: Any, url: str) -> str:
    """A tenant with a Twilio account and number, and an openai agent saved through the API
    (the save-time check runs); returns the agent id."""
    store = relay_.state.control.store
    tenant, _key, key = store.create_tenant("acme")
    store.put_twilio(
        tenant.id,
        account_sid=TENANT_SID,
        auth_token=OTHER_TOKEN,
        region=None,
        edge=None,
        numbers=[TENANT_NUMBER],
    )
    body = {"name": "desk", "type": "openai", "api_key": "sk-tenant-0001", "url": url}
    status, created = await api_request(relay_, "POST", "/api/v1/agents", key, body)
    assert status == 201, created
    assert store.set_number_agent(tenant.id, TENANT_NUMBER, created["id"])
    return str(created["id"])


async def tenant_call(relay_: Any, e2e: Any) -> Any:
    call_sid = e2e.sid("CA")
    response, twiml = await relay_.voice(
        call_sid, to=TENANT_NUMBER, account_sid=TENANT_SID, auth_token=OTHER_TOKEN
    )
    assert response.status == 200 and twiml is not None, response.text
    assert twiml.stream_url is not None, twiml.xml
    return await relay_.connect(call_sid, twiml, auth_token=OTHER_TOKEN)


async def test_stored_agent_refused_when_its_host_rebinds_to_loopback(
    start_relay, make_config, e2e, nursery, monkeypatch, caplog
):
    dns = Rebinding(monkeypatch, PUBLIC)
    relay_ = await start_relay(make_config())
    with trio.fail_after(20):
        port, reached = await counting_listener(nursery)
        await tenant_agent(relay_, f"ws://agent.example.test:{port}/v1/realtime")
        assert dns.asked == ["agent.example.test"]  # checked when saved: public then
        dns.answer = "127.0.0.1"  # ... and loopback by the time the call comes
        fake = await tenant_call(relay_, e2e)
        record = await relay_.wait_record(fake.call_sid, "completed", timeout=10)
    assert record.end_reason == "agent connect failed"
    assert not reached  # not one TCP connection to the rebound address
    assert relay_.metrics.errors["private_address"] == 1
    refusals = [r for r in caplog.records if r.name == "relay.netguard"]
    assert len(refusals) == 1 and "agent.example.test" in refusals[0].getMessage()
    assert "127.0.0.1" in refusals[0].getMessage()


async def test_allow_private_urls_lets_a_stored_agent_reach_loopback(
    start_relay, make_config, e2e, nursery
):
    """``[security] allow_private_urls`` lifts the check at connect as it does when saved;
    the guard is off and the agent connects (nothing listens: connect failed, not refused)."""
    relay_ = await start_relay(make_config(security={"allow_private_urls": True}))
    with trio.fail_after(20):
        port, reached = await counting_listener(nursery)
        await tenant_agent(relay_, f"ws://127.0.0.1:{port}/v1/realtime")
        fake = await tenant_call(relay_, e2e)
        await relay_.wait_record(fake.call_sid, "completed", timeout=10)
    assert len(reached) >= 1  # the agent did connect
    assert relay_.metrics.errors["private_address"] == 0
