"""Caller context before the bridge (relay/control/prep.py): the ``prep_webhook`` lookup,
end to end over loopback with a local HTTP server as the deployer's CRM and the fake
OpenAI Realtime server as the agent (its session configuration shows the instructions)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
from conftest import api_request
from fake_http import http_server, json_reply
from fake_openai import fake_openai_server

from relay.agents.registry import validate_agent
from relay.control import signing
from relay.control.features import CallFeatures
from relay.control.outgoing import private_allowed
from relay.control.prep import MAX_PROFILE_CHARS, profile_text
from relay.control.store import DEFAULT_TENANT
from relay.errors import ConfigError

BASE = "You are the front desk of Example Dental."
PROFILE = "The caller is Ada Lovelace, a patient since 2019; her next cleaning is due."
CALLER = "+14155551234"


def gpt(e2e: Any, oai: Any, url: str, **extra: Any) -> dict[str, Any]:
    # the CRM runs on loopback in these tests: private targets allowed explicitly
    extra.setdefault("allow_private_urls", True)
    return e2e.openai_agent(oai, instructions=BASE, prep_webhook=url, **extra)


async def call(relay_: Any, e2e: Any) -> Any:
    call_sid = e2e.sid("CA")
    _response, twiml = await relay_.voice(call_sid, from_=CALLER, extra={"FromCountry": "US"})
    assert twiml is not None and twiml.verbs == ["Connect"]
    return await relay_.connect(call_sid, twiml)


# --- options and parsing ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("prep_webhook", "ftp://crm.example.com/lookup"),
        ("prep_webhook", "crm.example.com/lookup"),
        ("prep_webhook", 42),
        ("prep_timeout_ms", 0),
        ("prep_timeout_ms", 20_000),
        ("prep_timeout_ms", "soon"),
        ("prep_timeout_ms", 1.5),
        ("allow_private_urls", "maybe"),
    ],
)
def test_bad_prep_options_are_refused_naming_the_option(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"agents\.desk\.{key}: "):
        validate_agent({"type": "parrot", key: value}, where="agents.desk")


def test_prep_options_parse() -> None:
    features = CallFeatures.from_options(
        {"prep_webhook": " https://crm.example.com/lookup ", "prep_timeout_ms": "800"}
    )
    assert features.prep_webhook == "https://crm.example.com/lookup"
    assert features.prep_timeout_ms == 800
    assert CallFeatures().prep_timeout_ms == 1000


def test_profile_text_takes_text_or_json() -> None:
    assert profile_text(b"  VIP caller\n", "text/plain") == "VIP caller"
    assert profile_text(b'{"instructions": "VIP"}', "application/json") == "VIP"
    assert profile_text(b'{"profile": "VIP", "id": 7}', "application/json") == "VIP"
    assert profile_text(b'"VIP"', "application/json") == "VIP"
    assert profile_text(b'{"name": "Ada"}', "application/json") == '{"name": "Ada"}'
    assert profile_text(b"bell\x07 and\ttab", "text/plain") == "bell and\ttab"
    assert len(profile_text(b"x" * 10_000, "text/plain")) == MAX_PROFILE_CHARS


def test_private_targets_are_allowed_only_explicitly(make_config) -> None:
    cfg = make_config(agents={"desk": {"type": "parrot", "allow_private_urls": True}})
    allowing = CallFeatures(allow_private_urls=True)
    assert private_allowed(cfg, DEFAULT_TENANT, "desk", allowing)
    assert not private_allowed(cfg, DEFAULT_TENANT, "desk", CallFeatures())
    # a tenant's stored agent cannot open the deployer's network by itself
    assert not private_allowed(cfg, "tn_other", "ag_1234", allowing)
    cfg.security.allow_private_urls = True
    assert private_allowed(cfg, "tn_other", "ag_1234", CallFeatures())


# --- calls ------------------------------------------------------------------------------------
@pytest.mark.parametrize("warm", [True, False])
async def test_caller_context_reaches_the_agent_and_the_record(start_relay, make_config, e2e, warm):
    async with http_server(lambda req: json_reply({"instructions": PROFILE})) as crm:
        async with fake_openai_server() as oai:
            agent = gpt(e2e, oai, crm.url("/lookup"), warm_start=warm)
            relay_ = await start_relay(make_config(agents={"gpt": agent}, default_agent="gpt"))
            store = relay_.state.control.store
            with trio.fail_after(15):
                fake = await call(relay_, e2e)
                session = await e2e.agent_session(oai)
                assert session.config["instructions"] == f"{BASE}\n\n{PROFILE}"
                await fake.hang_up()
                record = await relay_.wait_record(fake.call_sid, "completed")
                await relay_.state.control.history.flush()
    assert record.warm_start is warm
    assert record.caller_profile == PROFILE
    assert record.prep["outcome"] == "ok" and record.prep["status"] == 200
    [request] = crm.requests
    assert request.path == "/lookup" and request.method == "POST"
    assert request.json == {
        "event": "call.prep",
        "call_sid": fake.call_sid,
        "tenant": DEFAULT_TENANT,
        "agent": "gpt",
        "caller": CALLER,
        "country": "US",
        "called": "+15550009999",
        "direction": "inbound",
    }
    # signed with the tenant's webhook secret, like the post-call webhook
    secret = signing.get_or_create(store, DEFAULT_TENANT)
    assert signing.verify(secret, request.headers["x-relay-signature"], request.body)
    stored = store.get_call(DEFAULT_TENANT, fake.call_sid)
    assert stored["caller_profile"] == PROFILE and stored["prep"]["outcome"] == "ok"


@pytest.mark.parametrize("warm", [True, False])
async def test_slow_prep_never_holds_the_call_past_its_timeout(start_relay, make_config, e2e, warm):
    async def slow(req: Any) -> tuple[int, bytes]:
        await trio.sleep(30)
        return json_reply({"instructions": PROFILE})

    async with http_server(slow) as crm:
        async with fake_openai_server(response_ms=300) as oai:
            agent = gpt(
                e2e,
                oai,
                crm.url("/lookup"),
                warm_start=warm,
                prep_timeout_ms=300,
                greeting="Hello!",
            )
            relay_ = await start_relay(make_config(agents={"gpt": agent}, default_agent="gpt"))
            with trio.fail_after(15):
                fake = await call(relay_, e2e)
                session = await e2e.agent_session(oai)
                # configured without the context, and the CRM never got to answer
                assert session.config["instructions"] == BASE
                assert crm.answered == 0
                await fake.wait_for(lambda f: f.audio_ms >= 300)  # the greeting plays
                await crm.wait_for(lambda s: s.disconnects == 1)  # relay gave up on it
                await fake.hang_up()
                record = await relay_.wait_record(fake.call_sid, "completed")
    assert record.end_reason == "caller hung up" and record.caller_profile == ""
    assert record.prep["outcome"] == "timeout" and "300 ms" in record.prep["detail"]
    assert relay_.metrics.errors["prep_timeout"] == 1


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [((500, b"boom"), "http_error"), ((200, b"   "), "empty"), ((404, b""), "http_error")],
)
async def test_failing_prep_is_recorded_and_the_call_goes_on(
    start_relay, make_config, e2e, reply, outcome
):
    async with http_server(lambda req: reply) as crm:
        async with fake_openai_server() as oai:
            agent = gpt(e2e, oai, crm.url("/lookup"))
            relay_ = await start_relay(make_config(agents={"gpt": agent}, default_agent="gpt"))
            with trio.fail_after(15):
                fake = await call(relay_, e2e)
                session = await e2e.agent_session(oai)
                assert session.config["instructions"] == BASE
                await fake.hang_up()
                record = await relay_.wait_record(fake.call_sid, "completed")
    assert record.prep["outcome"] == outcome and record.caller_profile == ""
    assert record.end_reason == "caller hung up"


async def test_private_prep_target_is_refused_unless_allowed(start_relay, make_config, e2e):
    async with http_server(lambda req: json_reply({"instructions": PROFILE})) as crm:
        async with fake_openai_server() as oai:
            agent = gpt(e2e, oai, crm.url("/lookup"), allow_private_urls=False)
            relay_ = await start_relay(make_config(agents={"gpt": agent}, default_agent="gpt"))
            with trio.fail_after(15):
                fake = await call(relay_, e2e)
                session = await e2e.agent_session(oai)
                assert session.config["instructions"] == BASE
                await fake.hang_up()
                record = await relay_.wait_record(fake.call_sid, "completed")
            assert (
                record.prep["outcome"] == "refused"
                and "allow_private_urls" in record.prep["detail"]
            )
            assert not crm.requests  # nothing was sent to the loopback address
            # [security] allow_private_urls opens it for every agent
            cfg = make_config(
                agents={"gpt": agent}, default_agent="gpt", security={"allow_private_urls": True}
            )
            relay2 = await start_relay(cfg)
            with trio.fail_after(15):
                fake = await call(relay2, e2e)
                await fake.hang_up()
                record = await relay2.wait_record(fake.call_sid, "completed")
            assert record.prep["outcome"] == "ok" and len(crm.requests) == 1


async def test_agents_without_instructions_keep_the_profile_in_the_record(start_relay, make_config):
    async with http_server(
        lambda req: (200, b"VIP caller", [("Content-Type", "text/plain")])
    ) as crm:
        cfg = make_config(
            agents={
                "desk": {
                    "type": "parrot",
                    "prep_webhook": crm.url("/lookup"),
                    "allow_private_urls": True,
                }
            },
            default_agent="desk",
        )
        relay_ = await start_relay(cfg)
        with trio.fail_after(10):
            fake = await relay_.dial()
            await fake.hang_up()
            record = await relay_.wait_record(fake.call_sid, "completed")
    assert record.caller_profile == "VIP caller" and record.prep["outcome"] == "not_applied"


async def test_webhook_secret_is_shown_once_then_masked(start_relay, make_config):
    relay_ = await start_relay(make_config())
    _key, plain = relay_.state.control.store.create_key(DEFAULT_TENANT, "test")
    status, first = await api_request(relay_, "GET", "/api/v1/settings/webhook-secret", plain)
    assert status == 200 and first["shown_in_full"] and first["secret"].startswith("whsec_")
    assert first["header"] == "X-Relay-Signature"
    status, again = await api_request(relay_, "GET", "/api/v1/settings/webhook-secret", plain)
    assert status == 200 and not again["shown_in_full"]
    assert again["secret"] == "…" + first["secret"][-4:]
    status, rotated = await api_request(relay_, "POST", "/api/v1/settings/webhook-secret", plain)
    assert status == 201 and rotated["shown_in_full"] and rotated["secret"] != first["secret"]
    store = relay_.state.control.store
    assert signing.get_or_create(store, DEFAULT_TENANT) == rotated["secret"]
    status, _ = await api_request(relay_, "GET", "/api/v1/settings/webhook-secret", None)
    assert status == 401
    body = orjson.dumps({"a": 1})
    header = signing.sign(rotated["secret"], body, timestamp=1_700_000_000)
    assert signing.verify(rotated["secret"], header, body, now=1_700_000_010)
    assert not signing.verify(rotated["secret"], header, body + b" ", now=1_700_000_010)
    assert not signing.verify(rotated["secret"], header, body, now=1_700_000_000 + 3600)
    assert not signing.verify(first["secret"], header, body, now=1_700_000_010)
