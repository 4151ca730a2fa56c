"""relay.control.numbers.sync_numbers against the fake Twilio REST API on loopback."""

from __future__ import annotations

import socket
from typing import Any

import trio
from fake_twilio_rest import FakeTwilioRest, fake_twilio_rest

from relay.control.numbers import (
    NumberResult,
    SyncReport,
    desired_config,
    plan_number,
    sync_numbers,
)
from relay.control.twilio_rest import TwilioRest

VOICE_URL = "https://relay.example.com/twilio/voice"
STATUS_URL = "https://relay.example.com/twilio/status"
A, B, C = "+14155550101", "+14155550102", "+14155550103"
CONFIGURED = {
    "voice_url": VOICE_URL,
    "voice_method": "POST",
    "status_callback": STATUS_URL,
    "status_callback_method": "POST",
}


def client(tw: FakeTwilioRest, **kw: Any) -> TwilioRest:
    return TwilioRest(tw.account.sid, tw.account.auth_token, base_url=tw.url, **kw)


async def sync(rest: TwilioRest, numbers: list[str]) -> SyncReport:
    return await sync_numbers(rest, numbers, voice_url=VOICE_URL, status_url=STATUS_URL)


def by_number(report: SyncReport) -> dict[str, NumberResult]:
    return {r.number: r for r in report.results}


async def test_updates_an_unconfigured_number() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw, client(tw) as rest:
            pn = tw.add_number(A, voice_url="https://old.example.com/voice", voice_method="GET")
            report = await sync(rest, [A])
    assert report.ok and not report.error
    [result] = report.results
    assert (result.number, result.outcome, result.sid) == (A, "updated", pn["sid"])
    assert result.reason == "set VoiceUrl, VoiceMethod, StatusCallback"
    for key, value in CONFIGURED.items():
        assert pn[key] == value
    [write] = tw.writes
    assert {k: v[0] for k, v in write.form.items()} == desired_config(VOICE_URL, STATUS_URL)


async def test_already_configured_writes_nothing() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw, client(tw) as rest:
            tw.add_number(A, **CONFIGURED)
            report = await sync(rest, [A])
    assert report.results[0].outcome == "updated"
    assert report.results[0].reason == "already configured"
    assert tw.writes == []


async def test_second_run_is_idempotent() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw, client(tw) as rest:
            for n in (A, B, C):
                tw.add_number(n)
            first = await sync(rest, [A, B, C])
            writes = len(tw.writes)
            second = await sync(rest, [A, B, C])
    assert writes == 3
    assert len(tw.writes) == 3  # nothing more written
    assert [r.reason for r in second.results] == ["already configured"] * 3
    assert first.ok and second.ok


async def test_skips_numbers_routed_elsewhere_or_missing() -> None:
    app, trunk = "AP" + "a" * 32, "TK" + "b" * 32
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw, client(tw) as rest:
            tw.add_number(A, voice_application_sid=app)
            tw.add_number(B, trunk_sid=trunk)
            tw.add_number("+141555501031")  # a partial match of C must not count as C
            tw.add_number("+14155550104", capabilities={"voice": False, "sms": True})
            report = await sync(rest, [A, B, C, "+14155550104"])
    results = by_number(report)
    assert results[A].outcome == "skipped"
    assert results[A].reason == f"routed to TwiML App {app}; VoiceUrl cannot override it"
    assert results[B].outcome == "skipped"
    assert results[B].reason == f"routed to SIP trunk {trunk}"
    assert (results[C].outcome, results[C].reason) == ("skipped", "not on this account")
    assert results["+14155550104"].reason == "number cannot receive voice calls"
    assert report.ok  # skips are not failures
    assert tw.writes == []


async def test_failures_are_per_number() -> None:
    """A 500, a stall and a garbage answer each fail one number; the others are still
    configured."""
    numbers = [f"+1415555020{i}" for i in range(6)]
    with trio.fail_after(20):
        async with fake_twilio_rest() as tw, client(tw, timeout_s=0.5) as rest:
            for n in numbers:
                tw.add_number(n)
            tw.fail_next("numbers.update", 500)  # numbers[0]'s update
            report = await sync(rest, numbers[:2])
            tw.stall("numbers.list")  # numbers[2]'s lookup
            tw.garbage("numbers.update")  # numbers[3]'s update (numbers[2] never gets there)
            rest_report = await sync(rest, numbers[2:])
    first, second = by_number(report), by_number(rest_report)
    assert (first[numbers[0]].outcome, first[numbers[0]].code) == ("failed", 20500)
    assert first[numbers[0]].reason == "Twilio 500 (code 20500): Internal Server Error"
    assert first[numbers[1]].outcome == "updated"
    # numbers[2]: the list stalled -> timeout
    assert second[numbers[2]].outcome == "failed"
    assert "did not answer" in second[numbers[2]].reason
    # numbers[3]: garbage answer to its update
    assert second[numbers[3]].outcome == "failed"
    assert "not a JSON object" in second[numbers[3]].reason
    assert [second[n].outcome for n in numbers[4:]] == ["updated", "updated"]
    assert not report.ok and not rest_report.ok
    assert rest_report.to_json()["failed"] == 2


async def test_refused_update_reports_twilio_code() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw, client(tw) as rest:
            tw.add_number(A)
            tw.add_number(B)
            tw.fail_number(A, 400, 21502, "Invalid callback url")
            report = await sync(rest, [A, B])
    results = by_number(report)
    assert (results[A].outcome, results[A].code) == ("failed", 21502)
    assert results[A].reason == "Twilio 400 (code 21502): Invalid callback url"
    assert results[A].sid  # which resource refused
    assert results[B].outcome == "updated"


async def test_update_not_applied_is_a_failure() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw, client(tw) as rest:
            tw.add_number(A)
            # a server that answers 200 but changes nothing
            tw._numbers_update = lambda acct, m, q, f: (200, acct.numbers[m["sid"]])  # type: ignore[method-assign]
            report = await sync(rest, [A])
    [result] = report.results
    assert result.outcome == "failed"
    assert result.reason.startswith("Twilio did not apply VoiceUrl")


async def test_bad_token_fails_whole_run_and_writes_nothing() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw:
            tw.add_number(A)
            async with TwilioRest(tw.account.sid, "f" * 32, base_url=tw.url) as rest:
                report = await sync(rest, [A])
    assert report.results == ()
    assert "401" in report.error and "20003" in report.error
    assert report.error.endswith("(check the Account SID, Auth Token and region)")
    assert "f" * 32 not in report.error
    assert not report.ok and report.to_json()["error"] == report.error
    assert [r.route for r in tw.requests] == ["account"]


async def test_bad_sid_fails_whole_run() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw:
            tw.add_number(A)
            wrong = "AC" + "9" * 32
            async with TwilioRest(wrong, tw.account.auth_token, base_url=tw.url) as rest:
                report = await sync(rest, [A])
    assert report.results == ()
    assert wrong in report.error and "Authenticate" in report.error
    assert tw.writes == []


async def test_unreachable_fails_whole_run() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with trio.fail_after(10):
        url = f"http://127.0.0.1:{port}"
        async with TwilioRest("AC" + "1" * 32, "t" * 32, base_url=url) as rest:
            report = await sync(rest, [A])
    assert report.results == ()
    assert "unreachable" in report.error


async def test_inactive_account_fails_whole_run() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw, client(tw) as rest:
            tw.add_number(A)
            tw.account.status = "suspended"
            report = await sync(rest, [A])
    assert report.results == ()
    assert report.error.endswith("is suspended")
    assert tw.writes == []


async def test_invalid_urls_fail_before_any_request() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw, client(tw) as rest:
            report = await sync_numbers(rest, [A], voice_url="/twilio/voice", status_url=STATUS_URL)
    assert "voice_url" in report.error
    assert tw.requests == []


async def test_token_rotation() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw:
            tw.add_number(A)
            async with client(tw) as old:
                assert (await sync(old, [A])).ok
                new_token = tw.rotate_token()
                tw.account.numbers[next(iter(tw.account.numbers))]["voice_url"] = ""
                stale = await sync(old, [A])
            async with TwilioRest(tw.account.sid, new_token, base_url=tw.url) as new:
                fixed = await sync(new, [A])
    assert stale.results == () and "Authenticate" in stale.error
    assert fixed.ok and fixed.results[0].reason == "set VoiceUrl"


async def test_numbers_are_normalized_and_deduplicated() -> None:
    with trio.fail_after(10):
        async with fake_twilio_rest() as tw, client(tw) as rest:
            tw.add_number(A)
            report = await sync(rest, ["(415) 555-0101", A, "1-415-555-0101", "call me"])
    assert [(r.number, r.outcome) for r in report.results] == [
        (A, "updated"),
        ("call me", "failed"),
    ]
    assert report.results[1].reason == "not a phone number in E.164 form"
    assert len(tw.writes) == 1


def test_report_json() -> None:
    report = SyncReport(
        results=(
            NumberResult(A, "updated", "already configured", sid="PN1"),
            NumberResult(B, "skipped", "not on this account"),
            NumberResult(C, "failed", "Twilio 500: Internal Server Error", code=20500),
        )
    )
    doc = report.to_json()
    assert (doc["ok"], doc["error"]) == (False, "")
    assert (doc["updated"], doc["skipped"], doc["failed"]) == (1, 1, 1)
    assert doc["results"][2] == {
        "number": C,
        "outcome": "failed",
        "reason": "Twilio 500: Internal Server Error",
        "code": 20500,
        "sid": "",
    }
    assert SyncReport(error="x").to_json()["results"] == []


def test_plan_treats_null_and_empty_alike_and_methods_case_insensitively() -> None:
    desired = desired_config(VOICE_URL, STATUS_URL)
    base = {"sid": "PN1", "phone_number": A, **CONFIGURED}
    for unset in (None, ""):
        plan = plan_number({**base, "trunk_sid": unset, "voice_application_sid": unset}, desired)
        assert plan == NumberResult(A, "updated", "already configured", sid="PN1")
    assert isinstance(plan_number({**base, "voice_method": "post"}, desired), NumberResult)
    assert plan_number({**base, "status_callback": None}, desired) == ["StatusCallback"]
