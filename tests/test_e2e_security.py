"""Security end to end: signatures on every Twilio entry point, per-call stream tokens,
the admin key, secrets kept out of logs, and hostile input that may end only its own call.

Why it matters: an unauthenticated stream endpoint lets anyone run agent sessions on the
deployer's API keys (toll fraud), and one bad peer must never take other calls down."""

from __future__ import annotations

import logging
import time

import pytest
import trio
from conftest import ACCOUNT_SID
from fake_openai import fake_openai_server

from relay.protocol.signature import compute_signature


def openai_config(make_config, e2e, oai, **kw):
    return make_config(agents={"gpt": e2e.openai_agent(oai, **kw)}, default_agent="gpt")


# --- voice webhook --------------------------------------------------------------------------
BAD_WEBHOOK_SIGNATURES = {
    "unsigned": {"sign": False},
    "wrong auth token": {"auth_token": "not-the-auth-token-0000000000"},
    "other url": {"signed_url": "https://attacker.example/twilio/voice"},
    "garbage": {"signature": "c2lnbmF0dXJl"},
    "empty": {"signature": ""},
}


@pytest.mark.parametrize("how", list(BAD_WEBHOOK_SIGNATURES))
async def test_voice_webhook_refuses_bad_signatures(start_relay, make_config, e2e, how):
    with trio.fail_after(5):
        relay_ = await start_relay(make_config())
        call_sid = e2e.sid("CA")
        response, twiml = await relay_.voice(call_sid, **BAD_WEBHOOK_SIGNATURES[how])
        assert response.status == 403
        assert twiml is None and b"token" not in response.body
        assert relay_.state.records.get(call_sid) is None
        assert relay_.metrics.errors["bad_signature"] == 1
        assert relay_.metrics.webhooks["voice_bad_signature"] == 1
        assert relay_.metrics.webhooks["voice_ok"] == 0


async def test_voice_webhook_refuses_tampered_parameters(start_relay, make_config, e2e):
    """A valid signature for other form values (say, another To number) does not verify."""
    with trio.fail_after(5):
        relay_ = await start_relay(make_config())
        signed = relay_.voice_params(e2e.sid("CA"), "+15550001111", "+15550001234")
        sent = dict(signed, To="+15559999999")
        url = relay_.base_url + "/twilio/voice"
        signature = compute_signature(e2e.AUTH_TOKEN, url, signed)
        response = await relay_.post_form("/twilio/voice", sent, signature=signature)
        assert response.status == 403
        assert relay_.metrics.errors["bad_signature"] == 1
        # the same signature with the values it was made for is fine
        response = await relay_.post_form("/twilio/voice", signed, signature=signature)
        assert response.status == 200


# --- stream upgrade and token ----------------------------------------------------------------
async def test_stream_upgrade_refuses_bad_signatures(start_relay, make_config, e2e):
    """Unsigned or badly signed upgrades get HTTP 403 before any upgrade, and no agent."""
    with trio.fail_after(10):
        async with fake_openai_server() as oai:
            relay_ = await start_relay(openai_config(make_config, e2e, oai))
            other_url = relay_.base_url + "/twilio/voice"  # a real signature, wrong URL
            cases = [
                None,
                "",
                compute_signature(e2e.OTHER_TOKEN, relay_.cfg.stream_url),
                compute_signature(e2e.AUTH_TOKEN, other_url),
                compute_signature(e2e.AUTH_TOKEN, relay_.cfg.stream_url + "?x=1"),
            ]
            for i, signature in enumerate(cases, start=1):
                with pytest.raises(e2e.UpgradeRefused) as refused:
                    await relay_.open_stream(signature=signature)
                assert refused.value.status == 403
                assert b"x-twilio-signature" in refused.value.body
                assert relay_.metrics.errors["bad_signature"] == i
            await trio.sleep(0.1)
            assert not oai.sessions and not relay_.state.calls
            assert relay_.metrics.calls_total == 0


def _token_cases(relay_, call_sid, twiml, e2e):
    good = twiml.parameters["token"]
    tokens = relay_.state.tokens
    expired = tokens.issue(f"{call_sid}|default|gpt", now=time.time() - tokens.ttl_s - 5)
    other_call = tokens.issue(f"{e2e.sid('CA')}|default|gpt")
    other_tenant = tokens.issue(f"{call_sid}|tn_other|gpt")
    base = {"agent": "gpt", "tenant": "default"}
    return {
        "missing": base,
        "garbage": {**base, "token": "12345.abcdef"},
        "forged": {**base, "token": good.split(".")[0] + ".AAAAAAAAAAAAAAAAAAAAAAAA"},
        "expired": {**base, "token": expired},
        "other CallSid": {**base, "token": other_call},
        # the token binds the agent too: a caller cannot pick a pricier agent
        "other agent": {**base, "agent": "parrot", "token": good},
        # and the tenant: a valid token of another tenant is refused on this account's stream
        "other tenant": {"agent": "gpt", "tenant": "tn_other", "token": other_tenant},
    }


@pytest.mark.parametrize(
    "case",
    ["missing", "garbage", "forged", "expired", "other CallSid", "other agent", "other tenant"],
)
async def test_stream_token_is_checked_before_any_agent_session(
    start_relay, make_config, e2e, case
):
    with trio.fail_after(10):
        async with fake_openai_server() as oai:
            # cold start: a warm session opens at the (signed) webhook, see test_warm_start.py
            relay_ = await start_relay(openai_config(make_config, e2e, oai, warm_start=False))
            call_sid = e2e.sid("CA")
            response, twiml = await relay_.voice(call_sid)
            assert response.status == 200 and twiml is not None
            params = _token_cases(relay_, call_sid, twiml, e2e)[case]
            fake = await relay_.connect(call_sid, twiml, custom_parameters=params)
            closed = await fake.wait_closed()
            assert closed.code == 1008
            await relay_.wait_idle()
            await trio.sleep(0.1)
            assert not oai.sessions  # no agent session was ever opened
            assert relay_.metrics.errors["stream_token"] == 1
            assert relay_.metrics.calls_total == 0
            assert relay_.records(call_sid).status == "incoming"  # never became active


async def test_valid_token_works_once_for_its_call(start_relay, make_config, e2e):
    """Control for the test above: the real parameters open the call."""
    with trio.fail_after(10):
        async with fake_openai_server() as oai:
            relay_ = await start_relay(openai_config(make_config, e2e, oai))
            fake = await relay_.dial()
            await e2e.agent_session(oai)
            await relay_.wait_record(fake.call_sid, "active")
            await fake.hang_up()
            await relay_.wait_idle()
            assert not relay_.metrics.errors


# --- admin API and status callbacks ----------------------------------------------------------
async def test_metrics_requires_the_admin_key(start_relay, make_config, e2e):
    with trio.fail_after(5):
        relay_ = await start_relay(make_config())
        for headers in (
            [],
            [("Authorization", "Bearer wrong-key")],
            [("Authorization", e2e.ADMIN_KEY)],  # no scheme
            [("Authorization", f"Basic {e2e.ADMIN_KEY}")],
            [("Authorization", f"Bearer {e2e.ADMIN_KEY}x")],
        ):
            response = await relay_.get("/metrics", headers)
            assert response.status == 401, headers
            assert response.headers["www-authenticate"] == "Bearer"
            assert b"relay_" not in response.body
        assert relay_.metrics.errors["admin_auth"] == 5
        response = await relay_.get("/metrics", [("Authorization", f"Bearer {e2e.ADMIN_KEY}")])
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert "# TYPE relay_active_calls gauge\nrelay_active_calls 0\n" in response.text
        assert 'relay_errors_total{kind="admin_auth"} 5' in response.text


async def test_admin_api_disabled_without_a_key(start_relay, make_config, e2e):
    with trio.fail_after(5):
        relay_ = await start_relay(make_config(admin_key=""))
        for path in ("/metrics", "/calls"):
            assert (await relay_.get(path)).status == 403
            # an empty key must not be guessable as a bare "Bearer"
            assert (await relay_.get(path, [("Authorization", "Bearer")])).status == 403


async def test_status_callback_requires_a_signature(start_relay, make_config, e2e):
    with trio.fail_after(5):
        relay_ = await start_relay(make_config())
        call_sid = e2e.sid("CA")
        params = {
            "CallSid": call_sid,
            "AccountSid": ACCOUNT_SID,
            "StreamSid": e2e.sid("MZ"),
            "StreamEvent": "stream-started",
            "Timestamp": "2025-01-01T00:00:00Z",
        }
        unsigned = await relay_.post_form("/twilio/status", params, sign=False)
        assert unsigned.status == 403
        forged = await relay_.post_form("/twilio/status", params, auth_token=e2e.OTHER_TOKEN)
        assert forged.status == 403
        assert relay_.state.records.get(call_sid) is None
        assert relay_.metrics.errors["bad_signature"] == 2
        signed = await relay_.post_form("/twilio/status", params)
        assert signed.status == 204
        record = relay_.records(call_sid)
        assert record.status_callbacks == [
            {k: params[k] for k in ("StreamSid", "StreamEvent", "Timestamp")}
        ]


# --- secrets in logs ---------------------------------------------------------------------------
async def test_secrets_never_appear_in_logs(start_relay, make_config, e2e, caplog):
    """A whole openai call (greeting, audio both ways, barge-in, hang-up), a refused agent
    handshake and refused requests of every kind: no secret is ever logged."""
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(15):
        async with fake_openai_server(response_ms=300) as oai:
            cfg = make_config(
                agents={
                    "gpt": e2e.openai_agent(oai, greeting="Hello!"),
                    "badkey": dict(e2e.openai_agent(oai), api_key="sk-wrong-key-for-this-test-987"),
                },
                numbers={"+15550007777": "badkey"},
                default_agent="gpt",
            )
            relay_ = await start_relay(cfg)
            fake = await relay_.dial()
            session = await e2e.agent_session(oai)
            await fake.wait_for(lambda f: f.audio_ms >= 300)
            await fake.send_media(b"\x7f" * 1600)
            await session.wait_for(lambda s: len(s.audio_in) >= 1600)
            await session.send_response(400)
            await fake.wait_for(lambda f: f.played_ms >= 500)
            await session.speech_started()
            await fake.wait_for(lambda f: len(f.clears) == 1)
            stream_token = fake.parameters["token"]
            await fake.hang_up()

            refused = await relay_.dial(to="+15550007777")  # agent handshake gets a 401
            await refused.wait_closed()
            await relay_.voice(e2e.sid("CA"), sign=False)
            await relay_.voice(e2e.sid("CA"), auth_token=e2e.OTHER_TOKEN)
            with pytest.raises(e2e.UpgradeRefused):
                await relay_.open_stream(signature="bad")
            await relay_.get("/metrics", [("Authorization", "Bearer nope")])
            await relay_.wait_idle()

    records = [r for r in caplog.records if r.name.startswith(("relay", "hypercorn"))]
    assert any("agent connect failed" in r.getMessage() for r in records)  # logs were captured
    text = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    secrets = {
        "api key": oai.api_key,
        "wrong api key": "sk-wrong-key-for-this-test-987",
        "auth token": e2e.AUTH_TOKEN,
        "admin key": e2e.ADMIN_KEY,
        "token secret": e2e.TOKEN_SECRET,
        "stream token": stream_token,
    }
    for what, secret in secrets.items():
        assert secret not in text, f"{what} logged"
        assert secret not in caplog.text, f"{what} logged"


# --- malformed input ---------------------------------------------------------------------------
HUGE = 70 * 1024  # > media.max_message_bytes (64 KiB)

MALFORMED = {
    # name: (expected close code, expected errors kind)
    "binary frame": (1008, "twilio_binary"),
    "malformed JSON": (1008, "twilio_json"),
    "oversized message": (1009, "twilio_closed"),
    "wrong streamSid": (1008, "twilio_stream_sid"),
    "unknown event": (1008, "twilio_event"),
    "second start": (1008, "twilio_order"),
    "invalid UTF-8": (1007, "twilio_closed"),
}


async def _send_malformed(fake, what: str, e2e) -> None:
    if what == "binary frame":
        await fake.send_binary(b"\x00\x01\x02 not json")
    elif what == "malformed JSON":
        await fake.send_raw('{"event": "media", "streamSid": ')
    elif what == "oversized message":
        message = fake.media_message(b"\xff" * 160)
        message["media"]["payload"] = "A" * HUGE
        await fake.send(message)
    elif what == "wrong streamSid":
        await fake.send(fake.media_message(b"\xff" * 160, stream_sid=e2e.sid("MZ")))
    elif what == "unknown event":
        await fake.send({"event": "bogus", "streamSid": fake.stream_sid})
    elif what == "second start":
        await fake.send_start()
    elif what == "invalid UTF-8":
        await fake.send_frame(e2e.OP_TEXT, b'{"event": "\xff\xfe"}')


@pytest.mark.parametrize("what", list(MALFORMED))
async def test_malformed_input_closes_only_its_own_call(
    start_relay, make_config, e2e, caplog, nursery, what
):
    """Two calls on the echo agent; one peer misbehaves: its call closes with the RFC /
    policy code, one warning line, one error counted; the other call keeps its audio."""
    code, kind = MALFORMED[what]
    caplog.set_level(logging.INFO)
    with trio.fail_after(10):
        relay_ = await start_relay(make_config(default_agent="echo"))
        good = await relay_.dial()
        bad = await relay_.dial()
        await relay_.wait_until(lambda: relay_.metrics.active_calls == 2)

        async def keep_talking() -> None:
            try:
                await good.send_media(bytes(range(1, 161)) * 150, realtime=True)  # 3 s
            except Exception:  # the assertions below say what went wrong
                return

        nursery.start_soon(keep_talking)
        await good.wait_for(lambda f: f.audio_ms >= 200)  # audio flows on the good call
        await bad.send_media(b"\xff" * 320)
        try:
            await _send_malformed(bad, what, e2e)
        except Exception:  # the relay may close before we finish writing
            pass
        closed = await bad.wait_closed()
        assert closed.code == code
        heard_at_close = good.audio_ms
        await good.wait_for(lambda f: f.audio_ms >= heard_at_close + 300, timeout=3)
        assert good.closed is None and relay_.metrics.active_calls == 1

        assert relay_.metrics.errors[kind] == 1
        assert sum(relay_.metrics.errors.values()) == 1
        await relay_.wait_until(lambda: relay_.metrics.active_calls == 1)
        record = relay_.records(bad.call_sid)
        assert record.status == "completed" and record.end_reason
        warnings = [
            r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("relay")
        ]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert bad.call_sid in warnings[0].getMessage()
        await good.hang_up()
        await relay_.wait_idle()


async def test_malformed_first_message_is_refused_without_an_agent(start_relay, make_config, e2e):
    with trio.fail_after(10):
        async with fake_openai_server() as oai:
            relay_ = await start_relay(openai_config(make_config, e2e, oai, warm_start=False))
            fake = await relay_.dial(start=False)
            await fake.send_connected()
            await fake.send_raw("this is not JSON")
            closed = await fake.wait_closed()
            assert closed.code == 1008
            await relay_.wait_idle()
            assert not oai.sessions
            assert relay_.metrics.errors["twilio_json"] == 1
            assert relay_.metrics.calls_total == 0


async def test_oversized_request_head_is_dropped(start_relay, make_config):
    with trio.fail_after(5):
        relay_ = await start_relay(make_config())
        stream = await trio.open_tcp_stream("127.0.0.1", relay_.port)
        head = b"GET /twilio/stream HTTP/1.1\r\nX-Pad: " + b"a" * 40_000
        try:
            await stream.send_all(head)
            data = await stream.receive_some(1000)
        except trio.BrokenResourceError:
            data = b""
        assert b"101" not in data
        await stream.aclose()
        assert (await relay_.get("/healthz")).status == 200  # and the server is fine
