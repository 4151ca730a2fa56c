"""Per-agent call policies (relay/control/policies.py): allowlist, concurrency, call cap with
a fallback message. Options are checked by the one validation path of ``[agents.NAME]`` and
``/api/v1/agents``; calls run end to end over loopback (signed webhooks, a real stream, the
built-in Twilio simulator following ``<Connect action>`` like Twilio does)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio
from conftest import ACCOUNT_SID, ADMIN_KEY, AUTH_TOKEN, api_request

from relay.agents.registry import create_agent, validate_agent
from relay.config import load
from relay.control.policies import CallPolicies, CallPolicy
from relay.errors import ConfigError
from relay.sim import simulator

ALLOWED = "+14155551234"
STRANGER = "+14155550000"
GOODBYE = "We have to end the call now, goodbye"


# --- options --------------------------------------------------------------------------------
def test_policy_options_parse_and_normalise() -> None:
    policy = CallPolicy.from_options(
        {
            "allowed_callers": ["4155551234", "+1 (415) 555-1234", "+442079460018"],
            "max_concurrent_calls": "3",  # environment overrides arrive as text
            "max_call_seconds": 90,
            "fallback_message": f"  {GOODBYE}  ",
            "transfer_to": "+14155550100, 415-555-0101",
        }
    )
    assert policy.allowed_callers == ("+14155551234", "+442079460018")
    assert policy.max_concurrent_calls == 3
    assert policy.max_call_seconds == 90.0
    assert policy.fallback_message == GOODBYE
    assert policy.transfer_to == ("+14155550100", "+14155550101")
    assert policy.allows_caller("4155551234") and policy.allows_caller("+14155551234")
    assert not policy.allows_caller(STRANGER) and not policy.allows_caller("anonymous")
    assert CallPolicy().allows_caller("anonymous")  # empty list: everyone
    assert CallPolicy().max_call_seconds == 600.0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("allowed_callers", ["+1415555123x"]),
        ("allowed_callers", "020 7946 0018"),  # national format: ambiguous
        ("allowed_callers", 4155551234),
        ("max_concurrent_calls", -1),
        ("max_concurrent_calls", 1.5),
        ("max_concurrent_calls", True),
        ("max_call_seconds", 0),
        ("max_call_seconds", "forever"),
        ("max_call_seconds", 100_000),
        ("fallback_message", 42),
        ("fallback_message", "x" * 3001),
        ("fallback_message", "bye\x00"),
        ("transfer_to", ["sip:help@example.com"]),
    ],
)
def test_bad_policy_options_are_refused_naming_the_option(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"agents\.front\.{key}: "):
        validate_agent({"type": "parrot", key: value}, where="agents.front")


def test_every_adapter_accepts_policy_options_and_never_sees_them() -> None:
    options = {"allowed_callers": [ALLOWED], "max_call_seconds": 30, "fallback_message": "bye"}
    for kind in ("parrot", "echo"):
        agent = validate_agent({"type": kind, **options})
        assert agent is not None
        assert create_agent({"type": kind, **options}) is not None
    # the adapter's own check of unknown options still runs
    with pytest.raises(ConfigError, match="max_call_secs"):
        validate_agent({"type": "parrot", "max_call_secs": 30})


def test_relay_toml_and_environment_carry_policies(tmp_path: Any) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        '[twilio]\nauth_token = "t"\n[agents.parrot]\ntype = "parrot"\n'
        f'allowed_callers = ["{ALLOWED}"]\nmax_call_seconds = 45\n'
    )
    cfg = load(path, env={"RELAY_AGENTS_PARROT_MAX_CONCURRENT_CALLS": "2"})
    cfg.validate()
    policy = CallPolicy.from_options(cfg.agents["parrot"])
    assert (policy.allowed_callers, policy.max_call_seconds, policy.max_concurrent_calls) == (
        (ALLOWED,),
        45.0,
        2,
    )
    path.write_text('[twilio]\nauth_token = "t"\n[agents.parrot]\ntype = "parrot"\n')
    cfg = load(path, env={"RELAY_AGENTS_PARROT_MAX_CALL_SECONDS": "soon"})
    with pytest.raises(ConfigError, match=r"agents\.parrot\.max_call_seconds"):
        cfg.validate()


def test_slots_are_per_agent_released_once_and_expire_without_a_stream() -> None:
    slots = CallPolicies(pending_ttl_s=60.0)
    assert slots.admit("CA1", "t", "a", 2) and slots.admit("CA2", "t", "a", 2)
    assert not slots.admit("CA3", "t", "a", 2)
    assert slots.admit("CA3", "t", "b", 2)  # another agent has its own slots
    assert slots.admit("CA3", "t", "b", 2)  # a retried webhook keeps its slot
    assert slots.active("t", "b") == 1
    slots.started("CA1")
    slots.release_pending("CA1")  # it has a stream: only its end releases it
    assert slots.active("t", "a") == 2
    slots.release("CA1")
    slots.release("CA1")
    assert slots.active("t", "a") == 1
    slots.release_pending("CA2")  # terminal status, no stream ever
    assert slots.active("t", "a") == 0
    quick = CallPolicies(pending_ttl_s=0.0)
    assert quick.admit("CA1", "t", "a", 1)
    time.sleep(0.001)
    assert quick.admit("CA2", "t", "a", 1)  # CA1 never got a stream: its slot expired


# --- the API validates exactly like relay.toml -----------------------------------------------
async def test_api_agents_take_policy_options_with_the_same_checks(start_relay, make_config):
    relay_ = await start_relay(make_config())
    status, body = await api_request(relay_, "POST", "/api/v1/tenants", ADMIN_KEY, {"name": "p"})
    assert status == 201
    key = body["api_key"]["key"]
    good = {
        "name": "front desk",
        "type": "parrot",
        "allowed_callers": ["4155551234"],
        "max_concurrent_calls": 2,
        "max_call_seconds": 120,
        "fallback_message": GOODBYE,
    }
    status, created = await api_request(relay_, "POST", "/api/v1/agents", key, good)
    assert status == 201, created
    assert created["options"]["max_call_seconds"] == 120
    bad_cases = [
        ({**good, "name": "b1", "allowed_callers": ["nope"]}, "allowed_callers"),
        ({**good, "name": "b2", "max_call_seconds": -5}, "max_call_seconds"),
        ({**good, "name": "b3", "max_concurrent_calls": "many"}, "max_concurrent_calls"),
        ({**good, "name": "b4", "fallback_message": ["bye"]}, "fallback_message"),
    ]
    for body_, field in bad_cases:
        status, answer = await api_request(relay_, "POST", "/api/v1/agents", key, body_)
        assert status == 400, answer
        assert answer["error"]["field"] == field, answer
        assert field in answer["error"]["message"]
    status, patched = await api_request(
        relay_, "PATCH", f"/api/v1/agents/{created['id']}", key, {"max_call_seconds": 0}
    )
    assert status == 400 and patched["error"]["field"] == "max_call_seconds"
    status, listing = await api_request(relay_, "GET", "/api/v1/agents", key)
    assert [a["name"] for a in listing["agents"]] == ["front desk"]  # nothing else written
    status, patched = await api_request(
        relay_, "PATCH", f"/api/v1/agents/{created['id']}", key, {"allowed_callers": None}
    )
    assert status == 200 and "allowed_callers" not in patched["options"]


# --- calls ------------------------------------------------------------------------------------
async def test_allowlist_rejects_strangers_before_any_agent_session(start_relay, make_config):
    cfg = make_config(
        agents={"desk": {"type": "parrot", "allowed_callers": [ALLOWED]}}, default_agent="desk"
    )
    relay_ = await start_relay(cfg)
    with trio.fail_after(10):
        response, twiml = await relay_.voice("CA" + "1" * 32, from_=STRANGER)
        assert response.status == 200 and twiml is not None
        assert twiml.verbs == ["Reject"] and twiml.root[0].get("reason") == "busy"
        record = relay_.records("CA" + "1" * 32)
        assert (record.status, record.reject_reason, record.end_reason) == (
            "rejected",
            "not_allowed",
            "not allowed",
        )
        assert relay_.metrics.calls_rejected["not_allowed"] == 1
        assert relay_.metrics.calls_total == 0 and not relay_.state.policies.plans
        # the same number without its +1 is the allowed caller: answered, then streamed
        fake = await relay_.dial("CA" + "2" * 32, from_="4155551234")
        await relay_.wait_record(fake.call_sid, "active")
        await fake.hang_up()
        record = await relay_.wait_record(fake.call_sid, "completed")
        assert record.end_reason == "caller hung up"
        await relay_.state.control.history.flush()
        stored = relay_.state.control.store.get_call(None, "CA" + "1" * 32)
        assert (stored["status"], stored["reject_reason"]) == ("rejected", "not_allowed")


async def test_concurrency_limit_per_agent(start_relay, make_config):
    cfg = make_config(
        agents={"desk": {"type": "parrot", "max_concurrent_calls": 1}},
        numbers={"+15550009999": "desk"},
    )
    relay_ = await start_relay(cfg)
    with trio.fail_after(15):
        first = await relay_.dial(to="+15550009999")
        await relay_.wait_record(first.call_sid, "active")
        _response, twiml = await relay_.voice("CA" + "3" * 32, to="+15550009999")
        assert twiml is not None and twiml.verbs == ["Reject"]
        assert relay_.records("CA" + "3" * 32).reject_reason == "concurrent_limit"
        # another agent (the default parrot) is not limited by desk's slots
        other = await relay_.dial(to="+15550001111")
        await relay_.wait_record(other.call_sid, "active")
        await first.hang_up()
        await relay_.wait_record(first.call_sid, "completed")
        assert relay_.state.policies.active("default", "desk") == 0
        # a webhook whose stream never comes holds the slot until a terminal status
        _response, twiml = await relay_.voice("CA" + "4" * 32, to="+15550009999")
        assert twiml is not None and twiml.verbs == ["Connect"]
        _response, twiml = await relay_.voice("CA" + "5" * 32, to="+15550009999")
        assert twiml is not None and twiml.verbs == ["Reject"]
        status = relay_.voice_params("CA" + "4" * 32, "+15550009999", "+15550001234")
        status["CallStatus"] = "no-answer"
        assert (await relay_.post_form("/twilio/status", status)).status == 204
        _response, twiml = await relay_.voice("CA" + "6" * 32, to="+15550009999")
        assert twiml is not None and twiml.verbs == ["Connect"]
        await other.hang_up()


async def test_max_call_seconds_says_the_fallback_message_then_hangs_up(start_relay, make_config):
    cfg = make_config(
        agents={
            "desk": {
                "type": "parrot",
                "greeting": True,
                "max_call_seconds": 1.5,
                "fallback_message": GOODBYE,
                "fallback_voice": "Polly.Joanna-Neural",
            }
        },
        default_agent="desk",
    )
    relay_ = await start_relay(cfg)
    with trio.fail_after(20):
        result = await simulator.place_call(
            relay_.base_url, AUTH_TOKEN, account_sid=ACCOUNT_SID, duration_s=10.0
        )
    assert result.hung_up_by == "relay", result.outcome
    assert '<Connect action="' in result.twiml
    assert result.said == [GOODBYE]
    assert 'voice="Polly.Joanna-Neural"' in result.after_twiml
    assert result.after_twiml.rstrip().endswith("<Hangup /></Response>")
    assert result.heard_ms > 0  # the greeting played before the cap
    record = relay_.records(result.call_sid)
    assert (record.status, record.end_reason) == ("completed", "max duration")
    assert record.fallback_message_played
    assert relay_.state.policies.active("default", "desk") == 0
    await relay_.state.control.history.flush()
    stored = relay_.state.control.store.get_call(None, result.call_sid)
    assert stored["end_reason"] == "max duration" and stored["fallback_message_played"]


async def test_calls_ended_otherwise_just_hang_up_after_the_stream(start_relay, make_config):
    cfg = make_config(
        agents={"desk": {"type": "parrot", "hangup_digit": "#", "fallback_message": GOODBYE}},
        default_agent="desk",
    )
    relay_ = await start_relay(cfg)
    with trio.fail_after(20):
        result = await simulator.place_call(
            relay_.base_url,
            AUTH_TOKEN,
            account_sid=ACCOUNT_SID,
            duration_s=6.0,
            dtmf=[(0.5, "#")],
        )
    assert result.hung_up_by == "relay", result.outcome
    assert result.said == [] and "<Hangup" in result.after_twiml
    assert relay_.records(result.call_sid).end_reason == "caller pressed #"
    assert not relay_.records(result.call_sid).fallback_message_played


async def test_stream_ended_webhook_is_signed(start_relay, make_config, e2e):
    relay_ = await start_relay(make_config())
    params = relay_.voice_params("CA" + "7" * 32, "+15550009999", "+15550001234")
    response = await relay_.post_form("/twilio/stream-ended", params, auth_token=e2e.OTHER_TOKEN)
    assert response.status == 403
    response = await relay_.post_form("/twilio/stream-ended", params)
    assert response.status == 200 and "<Hangup" in response.text and "<Say" not in response.text
