"""relay.http.app over real HTTP: the voice webhook's TwiML, signature URL rules (query
strings, default ports, trusted proxies), status callbacks, health, metrics and call
records. Requests go through the relay's one listener like Twilio's would."""

from __future__ import annotations

import orjson
import pytest
import trio
from conftest import ACCOUNT_SID


def admin(e2e):
    return [("Authorization", f"Bearer {e2e.ADMIN_KEY}")]


# --- voice webhook ---------------------------------------------------------------------------
async def test_voice_twiml_is_exactly_a_connect_stream(start_relay, make_config, e2e):
    with trio.fail_after(5):
        relay_ = await start_relay(make_config())
        call_sid = e2e.sid("CA")
        response, twiml = await relay_.voice(call_sid, to="+15550003333", from_="+15550004444")
        assert response.status == 200
        assert response.headers["content-type"] == "text/xml; charset=utf-8"
        assert response.text.startswith('<?xml version="1.0" encoding="UTF-8"?><Response>')
        assert twiml is not None and twiml.verbs == ["Connect"]  # nothing after <Connect>
        connect = twiml.root.find("Connect")
        assert [child.tag for child in connect] == ["Stream"]
        stream = connect.find("Stream")
        base = f"127.0.0.1:{relay_.port}"
        assert stream.attrib == {
            "url": f"ws://{base}/twilio/stream",
            "statusCallback": f"http://{base}/twilio/status",
            "statusCallbackMethod": "POST",
        }
        params = [(p.get("name"), p.get("value")) for p in stream.findall("Parameter")]
        assert [name for name, _ in params] == ["token", "agent", "tenant"]
        assert twiml.parameters["agent"] == "parrot"
        token = twiml.parameters["token"]
        assert len(token) < 100  # Twilio caps <Parameter> name+value at ~500 characters
        assert relay_.state.tokens.verify(f"{call_sid}|default|parrot", token)
        assert not relay_.state.tokens.verify(f"{call_sid}|default|echo", token)

        record = relay_.records(call_sid)
        assert (record.status, record.agent, record.direction) == ("incoming", "parrot", "inbound")
        assert (record.from_number, record.to_number) == ("+15550004444", "+15550003333")
        assert relay_.metrics.webhooks["voice_ok"] == 1


async def test_voice_webhook_repeated_for_one_call_keeps_one_record(start_relay, make_config, e2e):
    with trio.fail_after(5):
        relay_ = await start_relay(make_config())
        call_sid = e2e.sid("CA")
        for _ in range(2):  # Twilio retries a webhook that timed out
            response, _ = await relay_.voice(call_sid)
            assert response.status == 200
        assert len(relay_.state.records) == 1


@pytest.mark.parametrize("call_sid", ["", "XX123", "CA" + "1" * 80])
async def test_voice_webhook_needs_a_valid_callsid(start_relay, make_config, e2e, call_sid):
    with trio.fail_after(5):
        relay_ = await start_relay(make_config())
        params = relay_.voice_params(call_sid, "+15550001111", "+15550002222")
        response = await relay_.post_form("/twilio/voice", params)
        assert response.status == 400
        assert relay_.metrics.errors["webhook_malformed"] == 1
        assert len(relay_.state.records) == 0


async def test_oversized_webhook_body_is_refused(start_relay, make_config, e2e):
    with trio.fail_after(5):
        relay_ = await start_relay(make_config())
        params = relay_.voice_params(e2e.sid("CA"), "+1555", "+1666", Pad="x" * 70_000)
        response = await relay_.post_form("/twilio/voice", params)
        assert response.status == 400
        assert relay_.metrics.webhooks["voice_malformed"] == 1
        assert relay_.metrics.errors["webhook_malformed"] == 1
        assert len(relay_.state.records) == 0


async def test_signature_covers_the_query_string(start_relay, make_config, e2e):
    """Twilio signs the full URL it requested, query string included."""
    with trio.fail_after(5):
        relay_ = await start_relay(make_config())
        params = relay_.voice_params(e2e.sid("CA"), "+15550001111", "+15550002222")
        path = "/twilio/voice?tenant=acme&x=1"
        ok = await relay_.post_form(path, params)
        assert ok.status == 200
        without_query = relay_.base_url + "/twilio/voice"
        bad = await relay_.post_form(path, params, signed_url=without_query)
        assert bad.status == 403


async def test_https_public_url(start_relay, make_config, e2e):
    """Behind TLS termination: signatures are checked against the public https URL (with
    or without :443, as twilio-python does) and TwiML points at wss://."""
    with trio.fail_after(5):
        relay_ = await start_relay(make_config(server={"public_url": "https://relay.example.com/"}))
        params = relay_.voice_params(e2e.sid("CA"), "+15550001111", "+15550002222")
        for url in (
            "https://relay.example.com/twilio/voice",
            "https://relay.example.com:443/twilio/voice",
        ):
            response = await relay_.post_form("/twilio/voice", params, signed_url=url)
            assert response.status == 200, url
        twiml = e2e.Twiml.parse(response.text)
        assert twiml.stream_url == "wss://relay.example.com/twilio/stream"
        assert twiml.status_callback == "https://relay.example.com/twilio/status"
        # the internal URL is not what Twilio signed
        internal = f"http://127.0.0.1:{relay_.port}/twilio/voice"
        response = await relay_.post_form("/twilio/voice", params, signed_url=internal)
        assert response.status == 403


async def test_forwarded_headers_only_when_trusted(start_relay, make_config, e2e):
    forwarded = [
        ("X-Forwarded-Proto", "https, http"),
        ("X-Forwarded-Host", "edge.example.net, proxy.internal"),
    ]
    edge_url = "https://edge.example.net/twilio/voice"  # first values of each header
    with trio.fail_after(5):
        trusted = await start_relay(
            make_config(server={"public_url": "https://relay.example.com", "trust_forwarded": True})
        )
        params = trusted.voice_params(e2e.sid("CA"), "+15550001111", "+15550002222")
        response = await trusted.post_form(
            "/twilio/voice", params, signed_url=edge_url, headers=forwarded
        )
        assert response.status == 200

        untrusted = await start_relay(
            make_config(server={"public_url": "https://relay.example.com"})
        )
        # without trust_forwarded a client cannot choose the URL the signature is checked on
        response = await untrusted.post_form(
            "/twilio/voice", params, signed_url=edge_url, headers=forwarded
        )
        assert response.status == 403
        response = await untrusted.post_form(
            "/twilio/voice",
            params,
            signed_url="https://relay.example.com/twilio/voice",
            headers=forwarded,
        )
        assert response.status == 200


async def test_wrong_methods_and_paths(start_relay, make_config, e2e):
    with trio.fail_after(5):
        relay_ = await start_relay(make_config())
        assert (await relay_.get("/twilio/voice")).status == 405
        assert (await relay_.get("/twilio/status")).status == 405
        assert (await relay_.get("/nope")).status == 404
        assert (await e2e.http_request(relay_.port, "POST", "/healthz")).status == 405


# --- status callbacks ----------------------------------------------------------------------------
def status_params(call_sid: str, **extra: str) -> dict[str, str]:
    return {"CallSid": call_sid, "AccountSid": ACCOUNT_SID, **extra}


async def test_status_callbacks_are_recorded_in_sequence_order(start_relay, make_config, e2e):
    with trio.fail_after(5):
        relay_ = await start_relay(make_config())
        call_sid = e2e.sid("CA")
        await relay_.voice(call_sid)
        # callbacks may arrive out of order; only the documented keys are kept
        for seq, status in (("2", "completed"), ("0", "ringing"), ("1", "in-progress")):
            params = status_params(
                call_sid, CallStatus=status, SequenceNumber=seq, From="+15550001234"
            )
            if status == "completed":
                params["CallDuration"] = "12"
            response = await relay_.post_form("/twilio/status", params)
            assert response.status == 204
        record = relay_.records(call_sid)
        assert record.status_callbacks == [
            {"CallStatus": "ringing", "SequenceNumber": "0"},
            {"CallStatus": "in-progress", "SequenceNumber": "1"},
            {"CallStatus": "completed", "CallDuration": "12", "SequenceNumber": "2"},
        ]
        # a call that never opened its stream is finished by its terminal status
        assert (record.status, record.end_reason) == ("completed", "completed")
        assert relay_.metrics.webhooks["status_ok"] == 3


async def test_terminal_status_does_not_override_a_live_call(start_relay, make_config, e2e):
    """The media stream owns an active call's lifecycle: a 'completed' callback that
    overtakes the stream's own end does not rewrite the record."""
    with trio.fail_after(5):
        relay_ = await start_relay(make_config())
        fake = await relay_.dial()
        await relay_.wait_record(fake.call_sid, "active")
        params = status_params(fake.call_sid, CallStatus="completed", SequenceNumber="3")
        assert (await relay_.post_form("/twilio/status", params)).status == 204
        assert relay_.records(fake.call_sid).status == "active"
        await fake.hang_up()
        record = await relay_.wait_record(fake.call_sid, "completed")
        assert record.end_reason == "caller hung up"


async def test_stream_error_callback_is_counted(start_relay, make_config, e2e):
    with trio.fail_after(5):
        relay_ = await start_relay(make_config())
        call_sid = e2e.sid("CA")
        params = status_params(
            call_sid,
            StreamSid=e2e.sid("MZ"),
            StreamEvent="stream-error",
            StreamError="31920 handshake error",
        )
        assert (await relay_.post_form("/twilio/status", params)).status == 204
        assert relay_.metrics.errors["stream_error"] == 1
        assert relay_.records(call_sid).status_callbacks[0]["StreamError"] == (
            "31920 handshake error"
        )


async def test_status_callback_without_callsid(start_relay, make_config):
    with trio.fail_after(5):
        relay_ = await start_relay(make_config())
        response = await relay_.post_form(
            "/twilio/status", {"CallStatus": "completed", "AccountSid": ACCOUNT_SID}
        )
        assert response.status == 400
        assert relay_.metrics.webhooks["status_malformed"] == 1


# --- health, metrics, call records ---------------------------------------------------------
async def test_healthz_needs_no_key_and_shows_no_secrets(start_relay, make_config, e2e):
    with trio.fail_after(5):
        relay_ = await start_relay(make_config())
        response = await relay_.get("/healthz")
        assert response.status == 200
        assert orjson.loads(response.body) == {"status": "ok", "active_calls": 0}
        for secret in (e2e.AUTH_TOKEN, e2e.ADMIN_KEY, e2e.TOKEN_SECRET):
            assert secret.encode() not in response.body


async def test_metrics_reflect_calls(start_relay, make_config, e2e):
    with trio.fail_after(5):
        relay_ = await start_relay(make_config(default_agent="echo"))
        fake = await relay_.dial()
        await fake.send_media(bytes(range(1, 161)) * 10)
        await fake.wait_for(lambda f: f.audio_ms >= 100)
        text = (await relay_.get("/metrics", admin(e2e))).text
        assert "relay_active_calls 1\n" in text
        assert "relay_calls_total 1\n" in text
        assert 'relay_frames_total{direction="twilio_to_agent"} 10\n' in text
        assert 'relay_webhooks_total{outcome="voice_ok"} 1\n' in text
        await fake.hang_up()
        await relay_.wait_idle()
        text = (await relay_.get("/metrics", admin(e2e))).text
        assert "relay_active_calls 0\n" in text


async def test_call_records_api(start_relay, make_config, e2e):
    with trio.fail_after(5):
        relay_ = await start_relay(make_config())
        sids = [e2e.sid("CA") for _ in range(3)]
        for sid in sids:
            await relay_.voice(sid)
        assert (await relay_.get("/calls")).status == 401
        assert (await relay_.get(f"/calls/{sids[0]}")).status == 401

        listing = orjson.loads((await relay_.get("/calls", admin(e2e))).body)
        assert [c["call_sid"] for c in listing["calls"]] == sids[::-1]  # newest first
        page = orjson.loads((await relay_.get("/calls?limit=1&offset=1", admin(e2e))).body)
        assert [c["call_sid"] for c in page["calls"]] == [sids[1]]

        detail = await relay_.get(f"/calls/{sids[0]}", admin(e2e))
        assert detail.status == 200
        data = orjson.loads(detail.body)
        assert (data["call_sid"], data["status"], data["agent"]) == (sids[0], "incoming", "parrot")
        assert data["duration_s"] is None
        assert (await relay_.get("/calls/CAunknown", admin(e2e))).status == 404


@pytest.mark.parametrize("query", ["?limit=abc", "?offset=x", "?limit=", "?limit=-5"])
async def test_call_records_bad_paging_is_a_client_error(start_relay, make_config, e2e, query):
    """Bad paging input is the client's error (400), never a 500 or a silently wrong page."""
    with trio.fail_after(5):
        relay_ = await start_relay(make_config())
        for _ in range(6):
            await relay_.voice(e2e.sid("CA"))
        response = await relay_.get("/calls" + query, admin(e2e))
        assert response.status == 400, (response.status, response.text[:200])


async def test_calls_limit_is_capped(start_relay, make_config, e2e):
    with trio.fail_after(5):
        relay_ = await start_relay(make_config(calls={"records_kept": 600}))
        for _ in range(501):
            relay_.state.records.create(e2e.sid("CA"))  # no need for 501 real webhooks
        data = orjson.loads((await relay_.get("/calls?limit=100000", admin(e2e))).body)
        assert len(data["calls"]) == 500
