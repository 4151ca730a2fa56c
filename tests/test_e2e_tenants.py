"""The multi-tenant flow of the README, end to end, on SQLite and on a real PostgreSQL.

Admin creates a tenant -> the tenant saves its Twilio settings (Twilio's REST API is
tests/fake_twilio_rest.py: the numbers get pointed at the relay) -> creates an agent ->
maps its number to it -> Twilio calls: the webhooks and the stream upgrade are signed with
the *tenant's* auth token and AccountSid -> the call runs on the tenant's agent -> its
history is in the API, for that tenant only, and survives a restart of the relay.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import trio
from conftest import ACCOUNT_SID, ADMIN_KEY, api_request
from fake_twilio_rest import fake_twilio_rest

from relay.control.secretbox import SecretBox
from relay.http.server import RelayServer
from relay.sim import speech

ENC_KEY = SecretBox.new_key()
NUMBER = "+14155550401"
CALLER = "+493012345678"


def config(make_config: Any, store_url: str, tw: Any) -> Any:
    return make_config(
        store={"url": store_url},
        security={"encryption_key": ENC_KEY},
        twilio={"api_base_url": tw.url},
    )


def tone_ulaw(ms: int, hz: float = 440.0) -> bytes:
    t = np.arange(8 * ms) / 8000.0
    return speech.mulaw_encode((8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16))


async def onboard(relay_: Any, tw: Any, account: Any) -> tuple[str, str, str]:
    """The README's steps up to a configured number: (tenant id, API key, agent id)."""
    status, body = await api_request(relay_, "POST", "/api/v1/tenants", ADMIN_KEY, {"name": "acme"})
    assert status == 201, body
    tenant, key = body["tenant"]["id"], body["api_key"]["key"]
    settings = {
        "account_sid": account.sid,
        "auth_token": account.auth_token,
        "phone_numbers": [NUMBER],
    }
    status, body = await api_request(relay_, "PUT", "/api/v1/settings/twilio", key, settings)
    assert status == 200, body
    assert body["numbers"]["ok"] is True
    assert [(r["number"], r["outcome"]) for r in body["numbers"]["results"]] == [
        (NUMBER, "updated")
    ]
    number = account.number_by_e164(NUMBER)
    assert number["voice_url"] == f"{relay_.base_url}/twilio/voice"
    assert number["status_callback"] == f"{relay_.base_url}/twilio/status"
    agent = {"name": "greeter", "type": "parrot", "greeting": True}
    status, body = await api_request(relay_, "POST", "/api/v1/agents", key, agent)
    assert status == 201, body
    agent_id = body["id"]
    status, body = await api_request(
        relay_, "PATCH", "/api/v1/numbers/%2B14155550401", key, {"agent": agent_id}
    )
    assert status == 200 and body["agent"] == agent_id
    return tenant, key, agent_id


def status_params(call_sid: str, account_sid: str, seq: int, call_status: str) -> dict[str, str]:
    return {
        "CallSid": call_sid,
        "AccountSid": account_sid,
        "CallStatus": call_status,
        "SequenceNumber": str(seq),
        "Timestamp": f"Mon, 01 Jan 2024 00:00:0{seq} +0000",
    }


async def test_tenant_call_end_to_end_and_history_survives_a_restart(
    start_relay, make_config, store_url, e2e
):
    with trio.fail_after(30):
        async with fake_twilio_rest() as tw:
            account = tw.add_account(friendly_name="acme")
            tw.add_number(NUMBER, account)
            token = account.auth_token
            call_sid = e2e.sid("CA")
            async with trio.open_nursery() as relay_nursery:
                server = RelayServer(config(make_config, store_url, tw))
                await relay_nursery.start(server.serve)
                relay_ = e2e.Relay(server, relay_nursery)
                tenant, key, agent_id = await onboard(relay_, tw, account)

                # Twilio calls the number: signed with the tenant's token, for its account
                response, twiml = await relay_.voice(
                    call_sid,
                    to=NUMBER,
                    from_=CALLER,
                    account_sid=account.sid,
                    auth_token=token,
                    extra={"FromCountry": "DE"},
                )
                assert response.status == 200, response.text
                assert twiml is not None and twiml.verbs == ["Connect"]
                assert twiml.stream_url == f"{relay_.cfg.stream_url}/{account.sid}"
                assert twiml.parameters["agent"] == agent_id
                assert twiml.parameters["tenant"] == tenant
                assert twiml.status_callback == f"{relay_.base_url}/twilio/status"

                # out-of-order call status callbacks, signed by the tenant's account
                for seq, call_status in ((1, "in-progress"), (0, "ringing")):
                    sent = await relay_.post_form(
                        "/twilio/status",
                        status_params(call_sid, account.sid, seq, call_status),
                        auth_token=token,
                    )
                    assert sent.status == 204

                fake = await relay_.connect(call_sid, twiml, auth_token=token)
                record = await relay_.wait_record(call_sid, "active")
                assert record.tenant_id == tenant and record.agent == agent_id
                # the tenant's parrot greets (relay.toml's parrot would not)
                greeting = speech.mulaw_encode(speech.greeting_chime())
                await fake.wait_for(lambda f: len(f.audio) >= len(greeting), timeout=5)
                assert fake.audio[: len(greeting)] == greeting
                frames_before = relay_.metrics.frames_in
                await fake.send_media(tone_ulaw(200))
                await relay_.wait_until(lambda: relay_.metrics.frames_in >= frames_before + 10)
                await fake.hang_up()
                await relay_.wait_idle()
                sent = await relay_.post_form(
                    "/twilio/status",
                    status_params(call_sid, account.sid, 2, "completed"),
                    auth_token=token,
                )
                assert sent.status == 204
                assert await relay_.state.control.history.flush()

                status, body = await api_request(relay_, "GET", "/api/v1/calls", key)
                assert status == 200 and [c["call_sid"] for c in body["calls"]] == [call_sid]
                call = body["calls"][0]
                assert call["status"] == "completed"
                assert (call["from"], call["to"], call["from_country"]) == (CALLER, NUMBER, "DE")
                assert call["direction"] == "inbound"
                assert call["agent"] == agent_id
                assert call["end_reason"] == "caller hung up"
                assert call["stream_sid"] == fake.stream_sid
                assert call["duration_ms"] is not None and call["duration_ms"] > 0
                assert call["started_at"] <= call["ended_at"]
                assert {"role": "agent", "text": "[greeting]"} in [
                    {k: t[k] for k in ("role", "text")} for t in call["transcript"]
                ]
                assert call["stats"]["messages_from_twilio"] >= 12
                assert [
                    (c["SequenceNumber"], c["CallStatus"]) for c in call["status_callbacks"]
                ] == [("0", "ringing"), ("1", "in-progress"), ("2", "completed")]
                status, detail = await api_request(relay_, "GET", f"/api/v1/calls/{call_sid}", key)
                assert status == 200 and detail == call

                # nobody else sees it: neither the default tenant nor another one
                store = relay_.state.control.store
                _k, default_key = await store.run(store.create_key, "default")
                status, body = await api_request(
                    relay_, "POST", "/api/v1/tenants", ADMIN_KEY, {"name": "other"}
                )
                other_key = body["api_key"]["key"]
                for stranger in (default_key, other_key):
                    status, body = await api_request(relay_, "GET", "/api/v1/calls", stranger)
                    assert status == 200 and body["calls"] == []
                    status, body = await api_request(
                        relay_, "GET", f"/api/v1/calls/{call_sid}", stranger
                    )
                    assert status == 404
                relay_nursery.cancel_scope.cancel()  # the relay stops

            # a new relay process on the same database: the history is still there
            relay2 = await start_relay(config(make_config, store_url, tw))
            status, again = await api_request(relay2, "GET", f"/api/v1/calls/{call_sid}", key)
            assert status == 200 and again == call
            status, body = await api_request(relay2, "GET", "/api/v1/calls", key)
            assert [c["call_sid"] for c in body["calls"]] == [call_sid]
            # and so is the tenant's Twilio account: its token still validates a webhook
            response, twiml = await relay2.voice(
                to=NUMBER, from_=CALLER, account_sid=account.sid, auth_token=token
            )
            assert response.status == 200 and twiml is not None
            assert twiml.parameters["agent"] == agent_id


async def test_tenant_webhooks_and_streams_need_the_tenants_own_token(
    start_relay, make_config, store_url, e2e
):
    with trio.fail_after(30):
        async with fake_twilio_rest() as tw:
            account = tw.add_account()
            tw.add_number(NUMBER, account)
            relay_ = await start_relay(config(make_config, store_url, tw))
            tenant, key, agent_id = await onboard(relay_, tw, account)
            token = account.auth_token

            # the default (relay.toml) token does not sign for the tenant's account
            response, _ = await relay_.voice(
                to=NUMBER, account_sid=account.sid, auth_token=e2e.AUTH_TOKEN
            )
            assert response.status == 403
            bad_signature = response.body
            # an AccountSid nobody owns: refused exactly like a bad signature
            stranger = "AC" + "e" * 32
            for signer in (e2e.AUTH_TOKEN, token, e2e.OTHER_TOKEN):
                response, _ = await relay_.voice(to=NUMBER, account_sid=stranger, auth_token=signer)
                assert (response.status, response.body) == (403, bad_signature)
            response = await relay_.post_form(
                "/twilio/status",
                status_params(e2e.sid("CA"), stranger, 0, "completed"),
                auth_token=token,
            )
            assert (response.status, response.body) == (403, bad_signature)
            assert len(relay_.state.records) == 0  # no record for any refused webhook

            call_sid = e2e.sid("CA")
            response, twiml = await relay_.voice(
                call_sid, to=NUMBER, account_sid=account.sid, auth_token=token
            )
            assert response.status == 200 and twiml is not None
            # the tenant's stream URL signed with any other token: refused at the upgrade
            for signer in (e2e.AUTH_TOKEN, e2e.OTHER_TOKEN):
                try:
                    await relay_.connect(call_sid, twiml, auth_token=signer)
                except e2e.UpgradeRefused as exc:
                    assert exc.status == 403
                else:
                    raise AssertionError(f"stream upgrade signed with {signer!r} accepted")
            # a stream path naming an account nobody owns
            try:
                await relay_.open_stream(
                    path=f"/twilio/stream/{stranger}",
                    signature=e2e.Relay.stream_signature(relay_, e2e.AUTH_TOKEN),
                )
            except e2e.UpgradeRefused as exc:
                assert exc.status == 403
            else:
                raise AssertionError("stream upgrade for an unknown account accepted")
            # the tenant's TwiML on the default stream path (signed by the default account):
            # the upgrade passes, but the per-call token names another tenant: no agent runs
            moved = dataclasses.replace(twiml, stream_url=relay_.cfg.stream_url)
            fake = await relay_.connect(call_sid, moved, auth_token=e2e.AUTH_TOKEN)
            closed = await fake.wait_closed()
            assert closed.code == 1008
            assert relay_.metrics.errors["stream_token"] == 1
            assert relay_.metrics.calls_total == 0

            # the default account cannot write into the tenant's call record either
            response = await relay_.post_form(
                "/twilio/status",
                status_params(call_sid, ACCOUNT_SID, 5, "failed"),
            )
            assert response.status == 204
            # the real stream, with the tenant's token, runs the tenant's agent
            fake = await relay_.connect(call_sid, twiml, auth_token=token)
            record = await relay_.wait_record(call_sid, "active")
            assert (record.tenant_id, record.agent) == (tenant, agent_id)
            assert record.status_callbacks == []
            await fake.hang_up()
            await relay_.wait_idle()
            assert await relay_.state.control.history.flush()
            status, call = await api_request(relay_, "GET", f"/api/v1/calls/{call_sid}", key)
            assert status == 200
            assert call["status_callbacks"] == [] and call["status"] == "completed"
            assert call["end_reason"] == "caller hung up"


async def test_a_stored_agent_never_borrows_the_deployers_vendor_key(
    start_relay, make_config, store_url, e2e, monkeypatch
):
    """An openai agent stored without its own api_key (written around the API: a script,
    an older relay) would fall back to the relay's OPENAI_API_KEY, and send it to whatever
    ``url`` the tenant chose. The relay never routes a call to such an agent."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-deployer-key-0000aaaa")
    with trio.fail_after(30):
        async with fake_twilio_rest() as tw:
            account = tw.add_account()
            tw.add_number(NUMBER, account)
            relay_ = await start_relay(config(make_config, store_url, tw))
            tenant, key, parrot_id = await onboard(relay_, tw, account)
            store = relay_.state.control.store
            leaky = await store.run(
                store.create_agent, tenant, "leaky", "openai", {"url": "ws://127.0.0.1:9/"}, {}
            )
            path = "/api/v1/numbers/%2B14155550401"
            status, body = await api_request(relay_, "PATCH", path, key, {"agent": leaky.id})
            assert status == 400 and body["error"]["field"] == "agent"
            await store.run(store.set_number_agent, tenant, NUMBER, leaky.id)
            relay_.state.control.directory.forget()

            def voice() -> Any:
                return relay_.voice(
                    to=NUMBER, account_sid=account.sid, auth_token=account.auth_token
                )

            # the mapped agent is refused: the tenant's usable agent answers instead
            response, twiml = await voice()
            assert response.status == 200 and twiml is not None
            assert twiml.parameters["agent"] == parrot_id
            # with no usable agent left the call is rejected, not run on the deployer's key
            status, _ = await api_request(relay_, "DELETE", f"/api/v1/agents/{parrot_id}", key)
            assert status == 204
            response, twiml = await voice()
            assert response.status == 200 and twiml is not None
            assert twiml.verbs == ["Reject"]
