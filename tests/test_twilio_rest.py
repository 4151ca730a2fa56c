"""relay.control.twilio_rest against tests/fake_twilio_rest.py on loopback (real HTTP)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from fake_twilio_rest import (
    DEFAULT_ACCOUNT_SID,
    DEFAULT_AUTH_TOKEN,
    FakeTwilioRest,
    fake_twilio_rest,
)

from relay import __version__
from relay.control.twilio_rest import (
    DEFAULT_BASE_URL,
    TwilioRest,
    TwilioRestError,
    base_url_for,
)

ROOT = Path(__file__).resolve().parent.parent
VOICE_URL = "https://relay.example.com/twilio/voice"
STATUS_URL = "https://relay.example.com/twilio/status"
CALLEE = "+14155559876"


def client(tw: FakeTwilioRest, **kw: Any) -> TwilioRest:
    acct = tw.account
    return TwilioRest(acct.sid, acct.auth_token, base_url=tw.url, **kw)


async def refused(coro: Any) -> TwilioRestError:
    with pytest.raises(TwilioRestError) as info:
        await coro
    return info.value


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- base URL ------------------------------------------------------------------------------
def test_base_url_default_and_override() -> None:
    assert base_url_for(None, None) == DEFAULT_BASE_URL == "https://api.twilio.com"
    assert base_url_for("", "") == DEFAULT_BASE_URL
    assert base_url_for("ie1", "dublin", "http://127.0.0.1:9/") == "http://127.0.0.1:9"
    with pytest.raises(ValueError):
        base_url_for(None, None, "api.twilio.com")  # not absolute


def test_base_url_regions_and_edges() -> None:
    assert base_url_for("ie1", "dublin") == "https://api.dublin.ie1.twilio.com"
    assert base_url_for("au1", "sydney") == "https://api.sydney.au1.twilio.com"
    assert base_url_for(None, "tokyo") == "https://api.tokyo.us1.twilio.com"
    assert base_url_for("us1", "sao-paulo") == "https://api.sao-paulo.us1.twilio.com"
    assert base_url_for(" IE1 ", "Dublin") == "https://api.dublin.ie1.twilio.com"
    # A region alone gets its co-located edge (region-only hosts are being retired).
    assert base_url_for("ie1", None) == "https://api.dublin.ie1.twilio.com"
    assert base_url_for("au1", None) == "https://api.sydney.au1.twilio.com"


@pytest.mark.parametrize(("region", "edge"), [("eu1", None), ("us2", "ashburn"), (None, "paris")])
def test_base_url_unknown_region_or_edge(region: str | None, edge: str | None) -> None:
    with pytest.raises(ValueError, match="unknown Twilio"):
        base_url_for(region, edge)


# --- construction ---------------------------------------------------------------------------
async def test_repr_masks_token_and_credentials_required() -> None:
    rest = TwilioRest(DEFAULT_ACCOUNT_SID, DEFAULT_AUTH_TOKEN)
    try:
        assert DEFAULT_AUTH_TOKEN not in repr(rest)
        assert DEFAULT_ACCOUNT_SID in repr(rest)
        assert "6e35" in repr(rest)  # the mask keeps a recognisable tail
    finally:
        await rest.aclose()
    with pytest.raises(ValueError):
        TwilioRest("", DEFAULT_AUTH_TOKEN)
    with pytest.raises(ValueError):
        TwilioRest(DEFAULT_ACCOUNT_SID, "")


# --- account --------------------------------------------------------------------------------
async def test_fetch_account_ok() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw, client(tw) as rest:
            account = await rest.fetch_account()
    assert account["sid"] == DEFAULT_ACCOUNT_SID
    assert account["status"] == "active"
    assert "auth_token" not in account  # Twilio sends it; the client drops it
    [req] = tw.requests
    assert req.route == "account" and req.method == "GET"
    assert req.user == DEFAULT_ACCOUNT_SID
    assert req.user_agent == f"relay/{__version__}"


async def test_fetch_account_wrong_token_is_auth_error() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw:
            bad_token = "0" * 32
            async with TwilioRest(tw.account.sid, bad_token, base_url=tw.url) as rest:
                err = await refused(rest.fetch_account())
    assert err.kind == "twilio_auth"
    assert (err.status, err.code) == (401, 20003)
    assert str(err) == "Twilio 401 (code 20003): Authenticate"
    assert err.more_info == "https://www.twilio.com/docs/errors/20003"
    assert bad_token not in str(err)


async def test_unknown_account_sid_is_auth_error() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw:
            other = "AC" + "1" * 32
            async with TwilioRest(other, DEFAULT_AUTH_TOKEN, base_url=tw.url) as rest:
                err = await refused(rest.fetch_account())
    assert (err.kind, err.code) == ("twilio_auth", 20003)


async def test_other_accounts_credentials_refused_but_owner_allowed() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw:
            owner = tw.account
            sub = tw.add_account(owner_account_sid=owner.sid)
            stranger = tw.add_account()
            # the owner's credentials work on its subaccount's URLs ...
            as_owner = httpx.BasicAuth(owner.sid, owner.auth_token)
            async with httpx.AsyncClient(base_url=tw.url, auth=as_owner) as http:
                ok = await http.get(f"/2010-04-01/Accounts/{sub.sid}.json")
                assert ok.status_code == 200 and ok.json()["sid"] == sub.sid
                assert ok.json()["auth_token"] == sub.auth_token  # as Twilio does
                # ... but not on a stranger's, nor a subaccount's on its owner's.
                denied = await http.get(f"/2010-04-01/Accounts/{stranger.sid}.json")
                assert denied.status_code == 401 and denied.json()["code"] == 20003
            as_sub = httpx.BasicAuth(sub.sid, sub.auth_token)
            async with httpx.AsyncClient(base_url=tw.url, auth=as_sub) as http:
                denied = await http.get(f"/2010-04-01/Accounts/{owner.sid}.json")
                assert denied.status_code == 401


async def test_suspended_account_can_fetch_itself_only() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw:
            tw.account.status = "suspended"
            async with client(tw) as rest:
                assert (await rest.fetch_account())["status"] == "suspended"
                err = await refused(rest.list_numbers())
    assert (err.kind, err.status, err.code) == ("twilio_rejected", 403, 20403)


async def test_unreachable() -> None:
    port = closed_port()
    with trio.fail_after(10):
        async with TwilioRest(
            DEFAULT_ACCOUNT_SID, DEFAULT_AUTH_TOKEN, base_url=f"http://127.0.0.1:{port}"
        ) as rest:
            err = await refused(rest.fetch_account())
    assert err.kind == "twilio_unreachable"
    assert err.status is None
    assert f"127.0.0.1:{port}" in str(err)


async def test_timeout_when_twilio_stalls() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw, client(tw, timeout_s=0.3) as rest:
            tw.stall("account")
            started = trio.current_time()
            err = await refused(rest.fetch_account())
            elapsed = trio.current_time() - started
            # the stall was one-shot: the same client works again afterwards
            assert (await rest.fetch_account())["sid"] == tw.account.sid
    assert err.kind == "twilio_timeout"
    assert "within 0.3s" in str(err)
    assert 0.25 < elapsed < 3


async def test_garbage_is_bad_response() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw, client(tw) as rest:
            tw.garbage("account")
            err = await refused(rest.fetch_account())
    assert err.kind == "twilio_bad_response"
    assert err.status == 200
    assert "not a JSON object" in str(err)


async def test_server_error() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw, client(tw) as rest:
            tw.fail_next("account", 503, message="Service Unavailable")
            err = await refused(rest.fetch_account())
    assert (err.kind, err.status, err.code) == ("twilio_server", 503, 20503)
    assert str(err) == "Twilio 503 (code 20503): Service Unavailable"


# --- numbers --------------------------------------------------------------------------------
async def test_list_numbers_follows_paging() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw, client(tw) as rest:
            made = [tw.add_number(f"+1415555010{i}")["sid"] for i in range(7)]
            tw.default_page_size = 3
            numbers = await rest.list_numbers()
            assert [n["sid"] for n in numbers] == made
            assert len(tw.requests) == 3  # pages of 3, 3, 1
            assert all(r.route == "numbers.list" for r in tw.requests)
            del tw.requests[:]
            numbers = await rest.list_numbers(page_size=2)
            assert [n["sid"] for n in numbers] == made
            assert [r.value("PageSize") for r in tw.requests] == ["2"] * 4


async def test_list_numbers_filter_matches_partially_like_twilio() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw, client(tw) as rest:
            tw.add_number("+14155550100")
            tw.add_number("+141555501001")
            tw.add_number("+14155550199")
            found = await rest.list_numbers("+14155550100")
    assert {n["phone_number"] for n in found} == {"+14155550100", "+141555501001"}
    assert tw.requests[0].value("PhoneNumber") == "+14155550100"


async def test_list_numbers_refuses_paging_to_another_host() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw, client(tw) as rest:
            evil = {
                "incoming_phone_numbers": [],
                "next_page_uri": "https://evil.example/2010-04-01/Accounts/AC1/x.json",
            }
            tw._numbers_list = lambda *a: (200, evil)  # type: ignore[method-assign]
            err = await refused(rest.list_numbers())
            assert len(tw.requests) == 1  # the credentials never went anywhere else
    assert err.kind == "twilio_bad_response"
    assert "another host" in str(err)


async def test_update_number_ok_and_404() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw, client(tw) as rest:
            pn = tw.add_number("+14155550101")
            updated = await rest.update_number(
                pn["sid"], VoiceUrl=VOICE_URL, VoiceMethod="POST", StatusCallback=STATUS_URL
            )
            assert updated["voice_url"] == VOICE_URL
            assert updated["status_callback"] == STATUS_URL
            assert tw.account.numbers[pn["sid"]]["voice_url"] == VOICE_URL
            [write] = tw.writes
            assert write.content_type == "application/x-www-form-urlencoded"
            assert write.form["VoiceUrl"] == [VOICE_URL]
            err = await refused(rest.update_number("PN" + "0" * 32, VoiceUrl=VOICE_URL))
    assert (err.kind, err.status, err.code) == ("twilio_not_found", 404, 20404)


async def test_update_number_invalid_url_rejected() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw, client(tw) as rest:
            pn = tw.add_number("+14155550101")
            err = await refused(rest.update_number(pn["sid"], VoiceUrl="relay.example.com/v"))
            err2 = await refused(rest.update_number(pn["sid"], VoiceMethod="PUT"))
            assert tw.account.numbers[pn["sid"]]["voice_url"] == ""
    assert (err.kind, err.code) == ("twilio_rejected", 21502)
    assert (err2.kind, err2.code) == ("twilio_rejected", 21209)


async def test_fake_refuses_json_bodies() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw:
            pn = tw.add_number("+14155550101")
            auth = httpx.BasicAuth(tw.account.sid, tw.account.auth_token)
            async with httpx.AsyncClient(base_url=tw.url, auth=auth) as http:
                path = f"/2010-04-01/Accounts/{tw.account.sid}/IncomingPhoneNumbers/{pn['sid']}"
                answer = await http.post(path + ".json", json={"VoiceUrl": VOICE_URL})
    assert answer.status_code == 400
    assert set(answer.json()) == {"code", "message", "more_info", "status"}
    assert pn["voice_url"] == ""


# --- calls ----------------------------------------------------------------------------------
async def test_create_call_ok_with_repeated_events() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw, client(tw) as rest:
            tw.add_number("+14155550101")
            call = await rest.create_call(
                {
                    "To": CALLEE,
                    "From": "+14155550101",
                    "Url": VOICE_URL,
                    "StatusCallback": STATUS_URL,
                    "StatusCallbackEvent": ["initiated", "ringing", "answered", "completed"],
                    "TimeLimit": "600",
                    "MachineDetection": "Enable",
                }
            )
    assert call["sid"].startswith("CA") and len(call["sid"]) == 34
    assert (call["status"], call["direction"]) == ("queued", "outbound-api")
    assert (call["to"], call["from"]) == (CALLEE, "+14155550101")
    [created] = tw.created_calls
    assert created["_params"]["StatusCallbackEvent"] == [
        "initiated",
        "ringing",
        "answered",
        "completed",
    ]


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"From": "+14155550101", "Url": VOICE_URL}, 21201),  # no To
        ({"To": CALLEE, "Url": VOICE_URL}, 21213),  # no From
        ({"To": "415-555-9876", "From": "+14155550101", "Url": VOICE_URL}, 21211),
        ({"To": CALLEE, "From": "+14155550999", "Url": VOICE_URL}, 21210),  # not ours
        ({"To": CALLEE, "From": "+14155550101"}, 21205),  # no instructions
        ({"To": CALLEE, "From": "+14155550101", "Url": VOICE_URL, "Twiml": "<Response/>"}, 21200),
        ({"To": CALLEE, "From": "+14155550101", "Url": "/relative"}, 21205),
        (
            {"To": CALLEE, "From": "+14155550101", "Twiml": "<Response>" + "x" * 4000},
            32018,
        ),  # Twiml longer than 4000 characters
        ({"To": CALLEE, "From": "+14155550101", "Url": VOICE_URL, "TimeLimit": "1h"}, 21200),
        ({"To": CALLEE, "From": "+14155550101", "Url": VOICE_URL, "Method": "PUT"}, 21209),
        (
            {"To": CALLEE, "From": "+14155550101", "Url": VOICE_URL, "StatusCallbackEvent": "x"},
            21200,
        ),
    ],
)
async def test_create_call_refusals(params: dict[str, str], code: int) -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw, client(tw) as rest:
            tw.add_number("+14155550101")
            err = await refused(rest.create_call(params))
    assert (err.kind, err.status, err.code) == ("twilio_rejected", 400, code)
    assert tw.created_calls == []


async def test_create_call_twiml_at_limit_accepted() -> None:
    head, tail = "<Response><Say>", "</Say></Response>"
    twiml = head + "a" * (4000 - len(head) - len(tail)) + tail
    assert len(twiml) == 4000
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw, client(tw) as rest:
            tw.add_number("+14155550101")
            call = await rest.create_call({"To": CALLEE, "From": "+14155550101", "Twiml": twiml})
    assert call["status"] == "queued"


async def test_create_call_params_must_be_strings() -> None:
    async with TwilioRest(DEFAULT_ACCOUNT_SID, DEFAULT_AUTH_TOKEN) as rest:
        with pytest.raises(TypeError, match="TimeLimit"):
            await rest.create_call({"To": CALLEE, "TimeLimit": 60})  # type: ignore[dict-item]


async def test_update_call_hang_up_then_404() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw, client(tw) as rest:
            tw.add_number("+14155550101")
            call = await rest.create_call({"To": CALLEE, "From": "+14155550101", "Url": VOICE_URL})
            tw.set_call_status(call["sid"], "in-progress")
            redirected = await rest.update_call(call["sid"], Twiml="<Response><Hangup/></Response>")
            assert redirected["status"] == "in-progress"
            ended = await rest.update_call(call["sid"], Status="completed")
            assert ended["status"] == "completed"
            again = await refused(rest.update_call(call["sid"], Status="completed"))
            redirect = await refused(rest.update_call(call["sid"], Url=VOICE_URL))
            unknown = await refused(rest.update_call("CA" + "0" * 32, Status="completed"))
    assert (again.kind, again.status, again.code) == ("twilio_not_found", 404, 20404)
    assert (redirect.kind, redirect.code) == ("twilio_rejected", 21220)
    assert (unknown.kind, unknown.code) == ("twilio_not_found", 20404)


async def test_cancel_only_affects_calls_not_yet_answered() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw, client(tw) as rest:
            tw.add_number("+14155550101")
            params = {"To": CALLEE, "From": "+14155550101", "Url": VOICE_URL}
            queued = await rest.create_call(params)
            assert (await rest.update_call(queued["sid"], Status="canceled"))[
                "status"
            ] == "canceled"
            live = await rest.create_call(params)
            tw.set_call_status(live["sid"], "in-progress")
            still = await rest.update_call(live["sid"], Status="canceled")
    assert still["status"] == "in-progress"


# --- the fake as a process (for CLI tests) -----------------------------------------------------
async def test_fake_runs_as_a_subprocess(tmp_path: Path) -> None:
    sid, token = "AC" + "2" * 32, "subprocess-token-0123456789abcdef"
    accounts = {sid: {"auth_token": token, "numbers": [{"phone_number": "+14155550101"}]}}
    (tmp_path / "accounts.json").write_text(json.dumps(accounts))
    cmd = [sys.executable, "-m", "tests.fake_twilio_rest", "--port", "0"]
    cmd += ["--accounts", str(tmp_path / "accounts.json")]
    proc = await trio.lowlevel.open_process(cmd, cwd=ROOT, stdout=subprocess.PIPE)
    try:
        with trio.fail_after(20):
            assert proc.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(1024)
                assert chunk, "fake exited before printing its URL"
                line += chunk
            url = json.loads(line)["url"]
            async with TwilioRest(sid, token, base_url=url) as rest:
                [pn] = await rest.list_numbers("+14155550101")
                await rest.update_number(pn["sid"], VoiceUrl=VOICE_URL)
            async with httpx.AsyncClient(base_url=url) as http:
                state = (await http.get("/_fake/state")).json()
                log = (await http.get("/_fake/requests")).json()
    finally:
        proc.terminate()
        with trio.move_on_after(10):
            await proc.wait()
    assert state[sid]["numbers"][pn["sid"]]["voice_url"] == VOICE_URL
    assert [r["route"] for r in log] == ["numbers.list", "numbers.update"]
    assert proc.returncode == 0
