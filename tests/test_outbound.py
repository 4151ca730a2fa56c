"""Outbound calls end to end: ``POST /api/v1/calls`` (and ``relay call``) -> Twilio's REST
API (tests/fake_twilio_rest.py) -> the fake places the call back at relay like Twilio does
(signed voice webhook at the call's Url, signed stream upgrade, media every 20 ms with mark
echoes, status callbacks with SequenceNumber) -> the agent answers and speaks first.
Hang-ups and failures go through the same REST API; every outcome lands in the record."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import trio
from conftest import ACCOUNT_SID, AUTH_TOKEN, TOKEN_SECRET, api_request
from fake_twilio_rest import Callee, fake_twilio_rest

from relay.control.outbound import OutboundContext, sign_context, verify_context
from relay.control.store import DEFAULT_TENANT

OUR_NUMBER = "+15550009999"
CALLEE = "+14155550123"
GOODBYE = "We have to end the call now, goodbye"
AGENTS = {
    "sales": {"type": "parrot", "greeting": True},
    "short": {
        "type": "parrot",
        "greeting": True,
        "max_call_seconds": 60,
        "fallback_message": GOODBYE,
    },
}


async def setup(start_relay: Any, make_config: Any, fake: Any, **sections: Any) -> tuple[Any, str]:
    """A relay whose default tenant owns OUR_NUMBER on the fake's account; its API key."""
    account = fake.add_account(ACCOUNT_SID, AUTH_TOKEN)
    fake.add_number(OUR_NUMBER, account)
    cfg = make_config(
        agents=AGENTS,
        numbers={OUR_NUMBER: "sales"},
        twilio={"api_base_url": fake.url, "rest_timeout_s": 5.0},
        **sections,
    )
    relay_ = await start_relay(cfg)
    store = relay_.state.control.store
    _key, plain = store.create_key(DEFAULT_TENANT, "test")
    return relay_, plain


async def place(relay_: Any, key: str, **body: Any) -> tuple[int, Any]:
    return await api_request(
        relay_, "POST", "/api/v1/calls", key, {"to": CALLEE, "from": OUR_NUMBER, **body}
    )


def statuses(record: Any) -> list[str]:
    return [e["CallStatus"] for e in record.status_callbacks if "CallStatus" in e]


# --- the signed context -----------------------------------------------------------------------
def test_context_is_signed_and_expires() -> None:
    secret = b"k" * 32
    ctx = OutboundContext("tn_1", "sales", "Hello there", 90.0)
    token = sign_context(secret, ctx, now=1000.0)
    assert verify_context(secret, token, now=1000.0) == ctx
    assert verify_context(secret, token, now=1000.0 + 901) is None  # expired
    assert verify_context(b"x" * 32, token, now=1000.0) is None  # another relay's
    payload, mac = token.split(".")
    assert verify_context(secret, payload[:-2] + "AA." + mac, now=1000.0) is None
    assert verify_context(secret, "garbage", now=1000.0) is None


# --- placing ----------------------------------------------------------------------------------
async def test_outbound_call_is_answered_and_the_agent_speaks_first(start_relay, make_config):
    async with fake_twilio_rest() as fake:
        relay_, key = await setup(start_relay, make_config, fake)
        callee = fake.answer_calls(Callee(duration_s=3.0))
        with trio.fail_after(30):
            status, body = await place(relay_, key, agent="sales")
            assert status == 201, body
            sid = body["call_sid"]
            assert (body["direction"], body["status"], body["agent"]) == (
                "outbound-api",
                "initiated",
                "sales",
            )
            call = await fake.wait_done(sid)
            await relay_.wait_record(sid, "completed")
        params = {k: v for k, v in call["_params"].items()}
        assert params["StatusCallbackEvent"] == ["initiated", "ringing", "answered", "completed"]
        assert params["StatusCallback"] == [f"{relay_.base_url}/twilio/status"]
        assert params["TimeLimit"] == ["630"]  # the agent's default cap + 30 s backstop
        assert "MachineDetection" not in params
        url = urlsplit(params["Url"][0])
        assert url.path == "/twilio/voice" and "ctx" in parse_qs(url.query)
        result = callee.results[sid]
        assert result.ok and result.hung_up_by == "caller", result.outcome
        assert result.first_agent_audio_s is not None and result.heard_ms > 300  # the chime
        record = relay_.records(sid)
        assert record.direction == "outbound-api"
        assert (record.from_number, record.to_number) == (OUR_NUMBER, CALLEE)
        assert (record.status, record.end_reason) == ("completed", "caller hung up")
        assert record.transcript[0]["text"] == "[greeting]"  # the agent spoke first
        await relay_.wait_until(lambda: "completed" in statuses(record))
        assert statuses(record) == ["initiated", "ringing", "in-progress", "completed"]
        assert record.events[0]["action"] == "place" and record.events[0]["result"] == "ok"
        await relay_.state.control.history.flush()
        status, stored = await api_request(relay_, "GET", f"/api/v1/calls/{sid}", key)
        assert status == 200
        assert (stored["direction"], stored["status"], stored["end_reason"]) == (
            "outbound-api",
            "completed",
            "caller hung up",
        )
        assert [c["CallStatus"] for c in stored["status_callbacks"] if "CallStatus" in c] == [
            "initiated",
            "ringing",
            "in-progress",
            "completed",
        ]
        assert relay_.state.policies.active("default", "sales") == 0


async def test_machine_detection_and_per_call_overrides(start_relay, make_config):
    async with fake_twilio_rest() as fake:
        relay_, key = await setup(start_relay, make_config, fake)
        callee = fake.answer_calls(Callee(duration_s=None, answered_by="machine_end_beep"))
        with trio.fail_after(30):
            status, body = await place(
                relay_, key, agent="short", machine_detection=True, max_call_seconds=1.5
            )
            assert status == 201, body
            sid = body["call_sid"]
            await fake.wait_done(sid)
            record = await relay_.wait_record(sid, "completed")
        params = fake.call(sid)["_params"]
        assert params["MachineDetection"] == ["Enable"] and params["TimeLimit"] == ["32"]
        assert record.answered_by == "machine_end_beep"
        assert record.end_reason == "max duration"  # the call's own cap, not the agent's 60 s
        assert callee.results[sid].said == [GOODBYE] and record.fallback_message_played
        await relay_.state.control.history.flush()
        _status, stored = await api_request(relay_, "GET", f"/api/v1/calls/{sid}", key)
        assert stored["answered_by"] == "machine_end_beep"


@pytest.mark.parametrize("outcome", ["busy", "no-answer", "failed"])
async def test_unanswered_calls_end_with_twilio_reason(start_relay, make_config, outcome):
    async with fake_twilio_rest() as fake:
        relay_, key = await setup(start_relay, make_config, fake)
        fake.answer_calls(Callee(outcome=outcome))
        with trio.fail_after(20):
            status, body = await place(relay_, key, agent="sales")
            assert status == 201, body
            sid = body["call_sid"]
            await fake.wait_done(sid)
            record = await relay_.wait_record(sid, "completed")
        assert record.end_reason == outcome and record.stream_sid == ""
        assert statuses(record) == ["initiated", "ringing", outcome]
        assert relay_.metrics.calls_total == 0  # no stream, no agent session
        await relay_.state.control.history.flush()
        _status, stored = await api_request(relay_, "GET", f"/api/v1/calls/{sid}", key)
        assert (stored["status"], stored["end_reason"]) == ("completed", outcome)


async def test_hang_up_a_live_call_through_the_api(start_relay, make_config):
    async with fake_twilio_rest() as fake:
        relay_, key = await setup(start_relay, make_config, fake)
        callee = fake.answer_calls(Callee(duration_s=None))
        with trio.fail_after(30):
            status, body = await place(relay_, key, agent="sales")
            sid = body["call_sid"]
            await relay_.wait_record(sid, "active")
            status, answer = await api_request(relay_, "DELETE", f"/api/v1/calls/{sid}", key)
            assert status == 200, answer
            assert answer["result"] == "hung_up"
            await fake.wait_done(sid)
            record = await relay_.wait_record(sid, "completed")
            assert record.end_reason == "hung up via api"
            assert callee.results[sid].hung_up_by == "twilio"
            assert fake.call(sid)["_updates"][0]["Status"] == ["completed"]
            # again: Twilio answers 404/20404, reported as already ended
            status, answer = await api_request(relay_, "POST", f"/api/v1/calls/{sid}/hangup", key)
            assert status == 409, answer
            assert answer["error"]["code"] == "already_ended"
            assert "20404" in answer["error"]["message"]
        assert [(e["action"], e["result"]) for e in record.events] == [
            ("place", "ok"),
            ("hangup", "ok"),
            ("hangup", "already_ended"),
        ]
        status, answer = await api_request(relay_, "DELETE", "/api/v1/calls/CA" + "0" * 32, key)
        assert status == 404


async def test_hang_up_while_ringing_cancels(start_relay, make_config):
    async with fake_twilio_rest() as fake:
        relay_, key = await setup(start_relay, make_config, fake)
        fake.answer_calls(Callee(ring_s=20.0))
        with trio.fail_after(20):
            status, body = await place(relay_, key, agent="sales")
            sid = body["call_sid"]
            await relay_.wait_until(lambda: relay_.records(sid).status == "ringing")
            status, answer = await api_request(relay_, "DELETE", f"/api/v1/calls/{sid}", key)
            assert status == 200 and answer["twilio_status"] == "canceled"
            await fake.wait_done(sid)
            record = await relay_.wait_record(sid, "completed")
        assert record.end_reason == "canceled" and relay_.metrics.calls_total == 0


async def test_bad_requests_place_nothing(start_relay, make_config):
    async with fake_twilio_rest() as fake:
        relay_, key = await setup(start_relay, make_config, fake)
        fake.answer_calls()
        cases = [
            ({"agent": "sales", "to": "555-0123"}, "to"),
            ({"agent": "sales", "to": ""}, "to"),
            ({"agent": "sales", "from": "+15550000000"}, "from"),
            ({"agent": "nobody"}, "agent"),
            ({"agent": "sales", "greeting": "Hi!"}, "greeting"),  # the parrot's is a chime
            ({"agent": "sales", "max_call_seconds": 0}, "max_call_seconds"),
            ({"agent": "sales", "max_call_seconds": True}, "max_call_seconds"),
            ({"agent": "sales", "machine_detection": "yes"}, "machine_detection"),
            ({"agent": "sales", "record": True}, "record"),
            ({"agent": 7}, "agent"),
        ]
        with trio.fail_after(20):
            for body, field in cases:
                status, answer = await place(relay_, key, **body)
                assert status == 400, (body, answer)
                assert answer["error"]["field"] == field, (body, answer)
            status, answer = await api_request(relay_, "POST", "/api/v1/calls", None, {})
            assert status == 401
            # Twilio refuses: its code is reported, nothing is recorded as placed
            fake.fail_next("calls.create", 400, code=21215, message="Geo permission")
            status, answer = await place(relay_, key, agent="sales")
            assert status == 400 and "21215" in answer["error"]["message"], answer
            fake.fail_next("calls.create", 503)
            status, answer = await place(relay_, key, agent="sales")
            assert status == 502 and answer["error"]["code"] == "twilio_server", answer
        assert fake.created_calls == []
        assert len(relay_.state.records) == 0


async def test_forged_or_foreign_outbound_context_is_rejected(start_relay, make_config):
    relay_ = await start_relay(make_config())
    with trio.fail_after(10):
        token = sign_context(b"another relay's secret!!", OutboundContext("default", "parrot"))
        path = f"/twilio/voice?ctx={token}"
        params = relay_.voice_params("CA" + "8" * 32, CALLEE, OUR_NUMBER, Direction="outbound-api")
        response = await relay_.post_form(path, params)
        assert response.status == 200 and "<Reject" in response.text
        assert relay_.records("CA" + "8" * 32).reject_reason == "invalid_context"
        token = sign_context(TOKEN_SECRET.encode(), OutboundContext("tn_other", "parrot"))
        params["CallSid"] = "CA" + "9" * 32
        response = await relay_.post_form(f"/twilio/voice?ctx={token}", params)
        assert "<Reject" in response.text  # signed for another tenant


async def test_relay_call_cli_places_through_the_running_relay(start_relay, make_config, tmp_path):
    db = tmp_path / "relay.db"
    async with fake_twilio_rest() as fake:
        relay_, _key = await setup(start_relay, make_config, fake, store={"url": f"sqlite:///{db}"})
        callee = fake.answer_calls(Callee(duration_s=2.0))
        config = tmp_path / "relay.toml"
        agents = "\n".join(
            f"[agents.{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in opts.items())
            for name, opts in {"parrot": {"type": "parrot"}, **AGENTS}.items()
        )
        config.write_text(
            f'[server]\npublic_url = "{relay_.base_url}"\n'
            f'[twilio]\naccount_sid = "{ACCOUNT_SID}"\nauth_token = "{AUTH_TOKEN}"\n'
            f'api_base_url = "{fake.url}"\n'
            f'[security]\ntoken_secret = "{TOKEN_SECRET}"\n'
            f'[store]\nurl = "sqlite:///{db}"\n[numbers]\n"{OUR_NUMBER}" = "sales"\n{agents}'
        )
        cmd = [sys.executable, "-m", "relay.cli", "call", CALLEE, "--from", OUR_NUMBER]
        with trio.fail_after(60):
            done = await trio.run_process(
                [*cmd, "--agent", "sales", "--config", str(config)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                cwd=Path(__file__).parent.parent,
            )
            assert done.returncode == 0, done.stderr.decode()
            sid = done.stdout.decode().split()[1]
            await fake.wait_done(sid)
            record = await relay_.wait_record(sid, "completed")
            bad = await trio.run_process(
                [*cmd, "--agent", "nobody", "--config", str(config)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert record.direction == "outbound-api" and record.agent == "sales"
        assert callee.results[sid].heard_ms > 0
        assert bad.returncode == 1 and b"(agent)" in bad.stderr
        assert len(fake.created_calls) == 1
