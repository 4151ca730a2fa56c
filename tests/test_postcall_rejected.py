"""Post-call webhook for calls refused at the voice webhook (relay/control/postcall.py,
``submit_rejected``): the caller not on ``allowed_callers``, a call refused while draining
(the agent is not known yet at that point: it is looked up afterwards). The deployer's
endpoint is a local HTTP server; deliveries are signed like any other."""

from __future__ import annotations

from typing import Any

import trio
from fake_http import http_server

from relay.control import signing
from relay.control.store import DEFAULT_TENANT

ALLOWED = "+14155551234"
STRANGER = "+14155550000"


def desk(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "parrot",
        "post_call_webhook": url,
        "allow_private_urls": True,  # the endpoint runs on loopback here
        **extra,
    }


async def test_a_caller_not_on_the_allowlist_is_reported_with_the_reason(
    start_relay, make_config, e2e
):
    async with http_server(lambda req: (204, b"")) as hook:
        cfg = make_config(
            agents={"desk": desk(hook.url("/calls"), allowed_callers=[ALLOWED])},
            default_agent="desk",
        )
        relay_ = await start_relay(cfg)
        with trio.fail_after(10):
            call_sid = e2e.sid("CA")
            _response, twiml = await relay_.voice(call_sid, from_=STRANGER)
            assert twiml is not None and twiml.verbs == ["Reject"]
            await hook.wait_for(lambda s: len(s.requests) == 1)
            record = relay_.records(call_sid)
            await relay_.wait_until(lambda: record.post_call_webhook.get("outcome") == "delivered")
            # a status callback for the same call later does not send it twice
            assert not relay_.state.postcall.submit_rejected(record)
    [request] = hook.requests
    secret = signing.get_or_create(relay_.state.control.store, DEFAULT_TENANT)
    assert signing.verify(secret, request.headers["x-relay-signature"], request.body)
    call = request.json["call"]
    assert (call["call_sid"], call["agent"], call["status"]) == (call_sid, "desk", "rejected")
    assert (call["reject_reason"], call["end_reason"]) == ("not_allowed", "not allowed")
    assert call["from"] == STRANGER
    assert relay_.metrics.calls_total == 0  # no agent session, no stream


async def test_a_call_refused_while_draining_is_reported(start_relay, make_config, e2e):
    async with http_server(lambda req: (204, b"")) as hook:
        cfg = make_config(agents={"desk": desk(hook.url("/calls"))}, default_agent="desk")
        relay_ = await start_relay(cfg)
        relay_.state.draining = True
        with trio.fail_after(10):
            call_sid = e2e.sid("CA")
            _response, twiml = await relay_.voice(call_sid)
            assert twiml is not None and twiml.verbs == ["Reject"]
            await hook.wait_for(lambda s: len(s.requests) == 1)
    call = hook.requests[0].json["call"]
    assert (call["call_sid"], call["agent"], call["status"]) == (call_sid, "desk", "rejected")
    assert (call["reject_reason"], call["end_reason"]) == ("draining", "draining")


async def test_no_webhook_no_request(start_relay, make_config, e2e):
    """An agent without ``post_call_webhook``: nothing is sent, nothing is left pending."""
    cfg = make_config(agents={"desk": {"type": "parrot", "allowed_callers": [ALLOWED]}})
    cfg.calls.default_agent = "desk"
    relay_ = await start_relay(cfg)
    with trio.fail_after(10):
        call_sid = e2e.sid("CA")
        await relay_.voice(call_sid, from_=STRANGER)
        await relay_.wait_until(lambda: relay_.state.postcall.pending == 0)
    assert relay_.records(call_sid).post_call_webhook == {}
