"""Post-call webhook (relay/control/postcall.py): the call record and transcript POSTed when
the call ends, signed with the tenant's secret, retried with exponential backoff, every
attempt in the record. The schedule is checked under Trio's MockClock; deliveries end to
end over loopback with a local HTTP server as the deployer's endpoint."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import trio
from conftest import ACCOUNT_SID, AUTH_TOKEN
from fake_http import http_server, json_reply
from fake_twilio_rest import Callee, fake_twilio_rest

from relay.agents.registry import validate_agent
from relay.config import Config
from relay.control import signing
from relay.control.features import CallFeatures
from relay.control.outgoing import Answer
from relay.control.postcall import PostCallSender
from relay.control.store import DEFAULT_TENANT
from relay.errors import ConfigError
from relay.metrics import Metrics
from relay.records import CallRecord

SECRET = "whsec_test-secret-for-the-unit-tests-000000"


# --- the retry schedule (MockClock) ------------------------------------------------------------
def sender_with(replies: list[Answer], attempts: int = 5, backoff: float = 2.0) -> Any:
    cfg = Config()
    cfg.calls.post_call_attempts = attempts
    cfg.calls.post_call_backoff_s = backoff
    cfg.security.webhook_secret = SECRET
    state = SimpleNamespace(
        cfg=cfg, metrics=Metrics(), control=SimpleNamespace(store=None, history=None)
    )
    calls: list[tuple[float, dict[str, str], bytes]] = []

    async def send(url: str, body: bytes, headers: dict[str, str], **kw: Any) -> Answer:
        calls.append((trio.current_time(), headers, body))
        return replies.pop(0) if replies else Answer("ok", status=200)

    return PostCallSender(state, send=send), calls  # type: ignore[arg-type]


def record() -> CallRecord:
    rec = CallRecord("CA" + "9" * 32, agent="desk", status="completed", end_reason="agent ended")
    rec.transcript.append({"role": "agent", "text": "Goodbye", "t": 3.2})
    rec.post_call_webhook = {"url": "https://hooks.example.com/calls", "attempts": []}
    return rec


async def test_retries_back_off_exponentially_until_delivered(autojump_clock) -> None:
    sender, calls = sender_with(
        [Answer("ok", status=503), Answer("timeout", detail="no answer"), Answer("ok", status=500)]
    )
    rec = record()
    start = trio.current_time()
    outcome = await sender.deliver(rec, "https://hooks.example.com/calls", CallFeatures(), "dlv_1")
    assert outcome == "delivered"
    assert [round(t - start, 6) for t, _h, _b in calls] == [0.0, 2.0, 6.0, 14.0]
    attempts = rec.post_call_webhook["attempts"]
    assert [a["outcome"] for a in attempts] == ["ok", "timeout", "ok", "delivered"]
    assert [a.get("status") for a in attempts] == [503, None, 500, 200]
    assert rec.post_call_webhook["outcome"] == "delivered"
    assert [h["X-Relay-Attempt"] for _t, h, _b in calls] == ["1", "2", "3", "4"]
    assert {h["X-Relay-Delivery"] for _t, h, _b in calls} == {"dlv_1"}
    for _t, headers, body in calls:  # each attempt signed anew, all with the secret
        assert signing.verify(SECRET, headers["X-Relay-Signature"], body)


async def test_attempts_are_bounded(autojump_clock) -> None:
    sender, calls = sender_with([Answer("error", detail="refused")] * 10, attempts=4, backoff=1.0)
    rec = record()
    start = trio.current_time()
    outcome = await sender.deliver(rec, "https://hooks.example.com/calls", CallFeatures(), "dlv_2")
    assert outcome == "failed" and len(calls) == 4
    assert [round(t - start, 6) for t, _h, _b in calls] == [0.0, 1.0, 3.0, 7.0]
    assert sender.state.metrics.errors["post_call_failed"] == 1


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        (Answer("ok", status=400), "failed"),
        (Answer("ok", status=410), "failed"),
        (Answer("refused", detail="loopback"), "refused"),
    ],
)
async def test_final_answers_are_not_retried(autojump_clock, reply, outcome) -> None:
    sender, calls = sender_with([reply])
    rec = record()
    assert await sender.deliver(rec, "https://h.example.com/", CallFeatures(), "d") == outcome
    assert len(calls) == 1 and rec.post_call_webhook["outcome"] == outcome


async def test_429_and_408_are_retried(autojump_clock) -> None:
    sender, calls = sender_with([Answer("ok", status=429), Answer("ok", status=408)])
    rec = record()
    assert await sender.deliver(rec, "https://h.example.com/", CallFeatures(), "d") == "delivered"
    assert len(calls) == 3


def test_option_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"agents\.x\.post_call_webhook: "):
        validate_agent(
            {"type": "parrot", "post_call_webhook": "hooks.example.com"}, where="agents.x"
        )


def test_each_tenant_has_its_own_secret(make_config, tmp_path) -> None:
    from relay.control.plane import open_store

    cfg = make_config()
    cfg.store.url = f"sqlite:///{tmp_path}/relay.db"
    store = open_store(cfg)
    try:
        tenant, _key, _plain = store.create_tenant("other")
        mine = signing.get_or_create(store, DEFAULT_TENANT)
        theirs = signing.get_or_create(store, tenant.id)
        assert mine != theirs and mine.startswith("whsec_")
        assert signing.get_or_create(store, DEFAULT_TENANT) == mine  # stable
        assert store.rotate_secrets() == 2  # key rotation re-encrypts them too
        assert signing.get_or_create(store, tenant.id) == theirs
    finally:
        store.close()


# --- end to end -----------------------------------------------------------------------------------
def desk(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "parrot",
        "greeting": True,
        "post_call_webhook": url,
        "allow_private_urls": True,  # the endpoint runs on loopback here
        **extra,
    }


async def test_call_record_and_transcript_are_delivered_signed(start_relay, make_config, tmp_path):
    replies = [(500, b"try again"), (200, b"ok")]
    async with http_server(lambda req: replies.pop(0) if replies else (200, b"")) as hook:
        cfg = make_config(
            agents={"desk": desk(hook.url("/calls"), record=True)},
            default_agent="desk",
            calls={"post_call_backoff_s": 0.05, "recordings_dir": str(tmp_path)},
        )
        relay_ = await start_relay(cfg)
        with trio.fail_after(15):
            fake = await relay_.dial()
            await fake.wait_for(lambda f: f.audio_ms > 300)  # the greeting chime
            await fake.hang_up()
            record = await relay_.wait_record(fake.call_sid, "completed")
            await hook.wait_for(lambda s: s.answered == 2)
            await relay_.wait_until(lambda: record.post_call_webhook["outcome"] == "delivered")
            await relay_.state.control.history.flush()
    first, second = hook.requests
    assert first.body == second.body  # one delivery, its attempts
    assert first.headers["x-relay-delivery"] == second.headers["x-relay-delivery"]
    assert (first.headers["x-relay-attempt"], second.headers["x-relay-attempt"]) == ("1", "2")
    assert first.headers["x-relay-event"] == "call.completed"
    secret = signing.get_or_create(relay_.state.control.store, DEFAULT_TENANT)
    for request in (first, second):
        assert signing.verify(secret, request.headers["x-relay-signature"], request.body)
    body = second.json
    assert body["event"] == "call.completed"
    call = body["call"]
    assert (call["call_sid"], call["agent"], call["end_reason"]) == (
        fake.call_sid,
        "desk",
        "caller hung up",
    )
    assert call["status"] == "completed" and call["duration_ms"] > 0
    assert call["recording"]["status"] == "complete"  # sent once the file was finished
    assert (
        body["transcript"] == call["transcript"] and body["transcript"][0]["text"] == "[greeting]"
    )
    attempts = record.post_call_webhook["attempts"]
    assert [(a["attempt"], a.get("status"), a["outcome"]) for a in attempts] == [
        (1, 500, "ok"),
        (2, 200, "delivered"),
    ]
    stored = relay_.state.control.store.get_call(DEFAULT_TENANT, fake.call_sid)
    assert stored["post_call_webhook"]["outcome"] == "delivered"
    assert len(stored["post_call_webhook"]["attempts"]) == 2


async def test_private_endpoint_is_refused_unless_allowed(start_relay, make_config):
    async with http_server(lambda req: json_reply({})) as hook:
        cfg = make_config(
            agents={"desk": desk(hook.url("/calls"), allow_private_urls=False)},
            default_agent="desk",
        )
        relay_ = await start_relay(cfg)
        with trio.fail_after(10):
            fake = await relay_.dial()
            await fake.hang_up()
            record = await relay_.wait_record(fake.call_sid, "completed")
            await relay_.wait_until(lambda: record.post_call_webhook.get("outcome") == "refused")
    assert not hook.requests
    [attempt] = record.post_call_webhook["attempts"]
    assert attempt["outcome"] == "refused" and "allow_private_urls" in attempt["detail"]


async def test_outbound_call_that_was_never_answered_is_reported(start_relay, make_config):
    async with http_server(lambda req: (204, b"")) as hook, fake_twilio_rest() as tw:
        account = tw.add_account(ACCOUNT_SID, AUTH_TOKEN)
        tw.add_number("+15550009999", account)
        cfg = make_config(
            agents={"desk": desk(hook.url("/calls"))},
            numbers={"+15550009999": "desk"},
            twilio={"api_base_url": tw.url},
        )
        relay_ = await start_relay(cfg)
        tw.answer_calls(Callee(outcome="busy"))
        _key, key = relay_.state.control.store.create_key(DEFAULT_TENANT, "t")
        from conftest import api_request

        with trio.fail_after(15):
            status, placed = await api_request(
                relay_,
                "POST",
                "/api/v1/calls",
                key,
                {"to": "+14155550123", "from": "+15550009999", "agent": "desk"},
            )
            assert status == 201, placed
            await hook.wait_for(lambda s: s.answered == 1)
    call = hook.requests[0].json["call"]
    assert (call["call_sid"], call["end_reason"], call["direction"]) == (
        placed["call_sid"],
        "busy",
        "outbound-api",
    )
