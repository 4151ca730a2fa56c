"""The /api/v1 control-plane API over real HTTP, route by route: happy paths and bad input.

Every test runs on SQLite and on a real PostgreSQL (the ``store_url`` fixture); Twilio's
REST API is tests/fake_twilio_rest.py on loopback. A refused request must write nothing:
each refusal is followed by a read that shows the state it found.
"""

from __future__ import annotations

import logging
import socket
from typing import Any
from urllib.parse import quote

import orjson
import sqlalchemy as sa
import trio
from conftest import ADMIN_KEY, api_request
from fake_twilio_rest import fake_twilio_rest

from relay.control import schema
from relay.control.secretbox import SecretBox
from relay.control.store import encode_cursor

ENC_KEY = SecretBox.new_key()
#: numbers of the tenant's fake Twilio account, one per sync outcome
N_OK, N_APP, N_TRUNK, N_MISSING, N_FAIL = (f"+1415555010{i}" for i in range(1, 6))
GOOD_SID = "AC" + "0123456789abcdef" * 2
GOOD_TOKEN = "tok-9e8d7c6b5a4f3e2d1c0b"
OPENAI_SECRET = "sk-test-openai-secret-9f8e7d6c5b4a"


# --- helpers --------------------------------------------------------------------------------
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start(start_relay: Any, make_config: Any, store_url: str, **sections: Any) -> Any:
    security = {"encryption_key": ENC_KEY, **sections.pop("security", {})}
    return await start_relay(make_config(store={"url": store_url}, security=security, **sections))


class Client:
    """``api_request`` plus every answer it saw, to prove a secret never comes back."""

    def __init__(self, relay_: Any) -> None:
        self.relay = relay_
        self.bodies: list[bytes] = []

    async def __call__(
        self, method: str, path: str, key: str | None, body: Any = None, raw: bytes | None = None
    ) -> tuple[int, Any]:
        status, parsed = await api_request(self.relay, method, path, key, body, raw)
        self.bodies.append(orjson.dumps(parsed))
        return status, parsed

    def saw(self, secret: str) -> bool:
        return any(secret.encode() in b for b in self.bodies)


async def new_tenant(api: Client, name: str = "acme") -> tuple[str, str, str]:
    """(tenant id, its first API key, that key's id)."""
    status, body = await api("POST", "/api/v1/tenants", ADMIN_KEY, {"name": name})
    assert status == 201, body
    return body["tenant"]["id"], body["api_key"]["key"], body["api_key"]["id"]


def err(body: Any) -> tuple[str, str | None]:
    """(code, field) of the one error shape."""
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]["code"], body["error"].get("field")


def store_of(relay_: Any) -> Any:
    return relay_.state.control.store


def fake_numbers(tw: Any, account: Any) -> dict[str, dict[str, Any]]:
    """The fake account's IncomingPhoneNumbers by E.164."""
    return {n["phone_number"]: n for n in account.numbers.values()}


def add_outcome_numbers(tw: Any, account: Any) -> None:
    """One number per sync outcome (N_MISSING is not on the account at all)."""
    tw.add_number(N_OK, account)
    tw.add_number(N_APP, account, voice_application_sid="AP" + "a" * 32)
    tw.add_number(N_TRUNK, account, trunk_sid="TK" + "b" * 32)
    tw.add_number(N_FAIL, account)
    tw.fail_number(N_FAIL, 400, 21502, "Invalid callback url")


# --- tenants and keys -----------------------------------------------------------------------
async def test_tenants_are_created_with_the_admin_key_only(start_relay, make_config, store_url):
    with trio.fail_after(20):
        relay_ = await start(start_relay, make_config, store_url)
        api = Client(relay_)
        for key in (None, "wrong-admin-key", "rk_" + "x" * 43):
            status, body = await api("POST", "/api/v1/tenants", key, {"name": "acme"})
            assert status == 401 and err(body) == ("unauthorized", None)
            status, body = await api("GET", "/api/v1/tenants", key)
            assert status == 401 and err(body) == ("unauthorized", None)

        status, body = await api("POST", "/api/v1/tenants", ADMIN_KEY, {"name": "acme"})
        assert status == 201, body
        tenant, first = body["tenant"], body["api_key"]
        assert tenant["name"] == "acme" and tenant["id"].startswith("tn_")
        assert first["key"].startswith("rk_") and first["prefix"] == first["key"][:10]
        assert first["revoked_at"] is None
        key = first["key"]
        # a tenant key is not the admin key
        status, body = await api("POST", "/api/v1/tenants", key, {"name": "evil"})
        assert status == 401 and err(body) == ("unauthorized", None)

        bad: list[tuple[Any, str, str | None]] = [
            ({}, "missing_field", "name"),
            ({"name": ""}, "missing_field", "name"),
            ({"name": None}, "missing_field", "name"),
            ({"name": "   "}, "invalid_field", "name"),
            ({"name": "a\x00b"}, "invalid_field", "name"),
            ({"name": "x" * 201}, "invalid_field", "name"),
            ({"name": 5}, "invalid_type", "name"),
            ({"name": ["acme"]}, "invalid_type", "name"),
            ({"name": "x", "plan": "gold"}, "unknown_field", "plan"),
        ]
        for payload, code, field in bad:
            status, body = await api("POST", "/api/v1/tenants", ADMIN_KEY, payload)
            assert (status, err(body)) == (400, (code, field)), payload
        for raw in (b'{"name": ', b'[{"name": "x"}]', b'"acme"', b"null", b"\xff\xfe{}"):
            status, body = await api("POST", "/api/v1/tenants", ADMIN_KEY, raw=raw)
            assert (status, err(body)[0]) == (400, "invalid_json"), raw
        huge = b'{"name": "' + b"x" * 70_000 + b'"}'
        status, body = await api("POST", "/api/v1/tenants", ADMIN_KEY, raw=huge)
        assert status == 413 and err(body)[0] == "request_entity_too_large"

        status, body = await api("GET", "/api/v1/tenants", ADMIN_KEY)
        assert status == 200
        assert [t["name"] for t in body["tenants"]] == ["default (relay.toml)", "acme"]

        # the key was shown once: from now on only its prefix
        seen = len(api.bodies)
        status, body = await api("GET", "/api/v1/keys", key)
        assert status == 200
        assert [k["id"] for k in body["keys"]] == [first["id"]]
        assert "key" not in body["keys"][0] and body["keys"][0]["prefix"] == key[:10]
        assert not any(key.encode() in b for b in api.bodies[seen:])
        # and the database holds its hash only
        with store_of(relay_).connect() as c:
            rows = [dict(r._mapping) for r in c.execute(sa.select(schema.api_keys))]
        assert rows and all(key not in str(r) for r in rows)


async def test_keys_are_issued_listed_and_revoked_at_once(start_relay, make_config, store_url):
    with trio.fail_after(20):
        relay_ = await start(start_relay, make_config, store_url)
        api = Client(relay_)
        _tenant, first, first_id = await new_tenant(api)
        status, body = await api("POST", "/api/v1/keys", first, {"name": "ci"})
        assert status == 201, body
        second, second_id = body["key"], body["id"]
        assert body["name"] == "ci" and second.startswith("rk_") and second != first
        status, body = await api("POST", "/api/v1/keys", first)  # no body: no name
        assert status == 201 and body["name"] == ""
        third_id = body["id"]

        for payload, code, field in (
            ({"name": 5}, "invalid_type", "name"),
            ({"name": "x" * 201}, "invalid_field", "name"),
            ({"label": "x"}, "unknown_field", "label"),
        ):
            status, body = await api("POST", "/api/v1/keys", first, payload)
            assert (status, err(body)) == (400, (code, field)), payload
        status, body = await api("POST", "/api/v1/keys", first, raw=b"[]")
        assert (status, err(body)[0]) == (400, "invalid_json")

        seen = len(api.bodies)
        status, body = await api("GET", "/api/v1/keys", second)
        assert status == 200
        assert [k["id"] for k in body["keys"]] == [first_id, second_id, third_id]
        assert all("key" not in k for k in body["keys"])
        assert not any(s.encode() in b for b in api.bodies[seen:] for s in (first, second))

        status, body = await api("DELETE", f"/api/v1/keys/{first_id}", second)
        assert (status, body) == (204, None)
        status, body = await api("GET", "/api/v1/keys", first)  # revoked: refused at once
        assert status == 401 and err(body) == ("unauthorized", None)
        status, again = await api("DELETE", f"/api/v1/keys/{first_id}", second)
        assert status == 404 and err(again) == ("not_found", None)
        status, missing = await api("DELETE", "/api/v1/keys/key_0000000000000000", second)
        assert (status, missing) == (404, again)
        status, body = await api("GET", "/api/v1/keys", second)
        revoked = {k["id"]: k["revoked_at"] for k in body["keys"]}
        assert revoked[first_id] is not None and revoked[second_id] is None
        # a key may revoke itself; it stops working with that request
        status, _ = await api("DELETE", f"/api/v1/keys/{second_id}", second)
        assert status == 204
        status, _ = await api("GET", "/api/v1/keys", second)
        assert status == 401


# --- Twilio settings --------------------------------------------------------------------------
BAD_SETTINGS: list[tuple[dict[str, Any], str, str]] = [
    ({"account_sid": "AC123", "auth_token": GOOD_TOKEN}, "invalid_field", "account_sid"),
    ({"account_sid": "AC" + "g" * 32, "auth_token": GOOD_TOKEN}, "invalid_field", "account_sid"),
    ({"account_sid": "XX" + "0" * 32, "auth_token": GOOD_TOKEN}, "invalid_field", "account_sid"),
    ({"account_sid": GOOD_SID + "0", "auth_token": GOOD_TOKEN}, "invalid_field", "account_sid"),
    ({"auth_token": GOOD_TOKEN}, "missing_field", "account_sid"),
    ({"account_sid": GOOD_SID}, "missing_field", "auth_token"),
    ({"account_sid": GOOD_SID, "auth_token": ""}, "missing_field", "auth_token"),
    ({"account_sid": GOOD_SID, "auth_token": "has a space in it"}, "invalid_field", "auth_token"),
    ({"account_sid": GOOD_SID, "auth_token": "line\nbreak-token"}, "invalid_field", "auth_token"),
    ({"account_sid": GOOD_SID, "auth_token": "tökenwithumlaut1"}, "invalid_field", "auth_token"),
    ({"account_sid": GOOD_SID, "auth_token": "short"}, "invalid_field", "auth_token"),
    ({"account_sid": GOOD_SID, "auth_token": "x" * 129}, "invalid_field", "auth_token"),
    ({"account_sid": 7, "auth_token": GOOD_TOKEN}, "invalid_type", "account_sid"),
    ({"account_sid": GOOD_SID, "auth_token": True}, "invalid_type", "auth_token"),
    ({"account_sid": GOOD_SID, "auth_token": GOOD_TOKEN, "region": 1}, "invalid_type", "region"),
    ({"account_sid": GOOD_SID, "auth_token": GOOD_TOKEN, "edge": ["x"]}, "invalid_type", "edge"),
    (
        {"account_sid": GOOD_SID, "auth_token": GOOD_TOKEN, "region": "xx1"},
        "invalid_field",
        "region",
    ),
    ({"account_sid": GOOD_SID, "auth_token": GOOD_TOKEN, "edge": "mars"}, "invalid_field", "edge"),
    ({"account_sid": GOOD_SID, "auth_token": GOOD_TOKEN, "fax": True}, "unknown_field", "fax"),
    *(
        (
            {"account_sid": GOOD_SID, "auth_token": GOOD_TOKEN, "phone_numbers": numbers},
            code,
            "phone_numbers",
        )
        for numbers, code in (
            (["4155551234"], "invalid_field"),  # national, no +
            (["+0123"], "invalid_field"),  # country code cannot start with 0
            (["+1234567890123456"], "invalid_field"),  # 16 digits
            (["+1 415 555 1234"], "invalid_field"),  # E.164 has no separators
            (["+1415555123a"], "invalid_field"),
            (["+"], "invalid_field"),
            ([N_OK, 14155550100], "invalid_field"),
            ([None], "invalid_field"),
            ([N_OK] * 1001, "invalid_field"),
            (N_OK, "invalid_type"),  # a string, not a list
            ({"n": N_OK}, "invalid_type"),
        )
    ),
]


async def test_twilio_settings_bad_input_writes_nothing(start_relay, make_config, store_url):
    with trio.fail_after(20):
        async with fake_twilio_rest() as tw:
            relay_ = await start(
                start_relay, make_config, store_url, twilio={"api_base_url": tw.url}
            )
            api = Client(relay_)
            _tenant, key, _ = await new_tenant(api)
            for payload, code, field in BAD_SETTINGS:
                status, body = await api("PUT", "/api/v1/settings/twilio", key, payload)
                assert (status, err(body)) == (400, (code, field)), payload
            for raw in (b'{"account_sid": ', b"[]", b'"AC"', b"42", b"null"):
                status, body = await api("PUT", "/api/v1/settings/twilio", key, raw=raw)
                assert (status, err(body)[0]) == (400, "invalid_json"), raw
            huge = orjson.dumps(
                {"account_sid": GOOD_SID, "auth_token": GOOD_TOKEN, "pad": "x" * 70_000}
            )
            status, body = await api("PUT", "/api/v1/settings/twilio", key, raw=huge)
            assert status == 413 and err(body)[0] == "request_entity_too_large"

            status, body = await api("GET", "/api/v1/settings/twilio", key)
            assert status == 404 and err(body) == ("not_configured", None)
            status, body = await api("GET", "/api/v1/numbers", key)
            assert (status, body) == (200, {"numbers": []})
            assert tw.requests == []  # Twilio was never asked anything
            assert not api.saw(GOOD_TOKEN)


async def test_twilio_settings_configure_numbers_and_never_show_the_token(
    start_relay, make_config, store_url, caplog
):
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(30):
        async with fake_twilio_rest() as tw:
            account = tw.add_account(friendly_name="acme on twilio")
            add_outcome_numbers(tw, account)
            relay_ = await start(
                start_relay, make_config, store_url, twilio={"api_base_url": tw.url}
            )
            api = Client(relay_)
            _tenant, key, _ = await new_tenant(api)
            token = account.auth_token
            listed = [N_OK, N_APP, N_TRUNK, N_MISSING, N_FAIL]
            payload = {"account_sid": account.sid, "auth_token": token, "phone_numbers": listed}
            status, body = await api("PUT", "/api/v1/settings/twilio", key, payload)
            assert status == 200, body
            report = body["numbers"]
            assert report["error"] == "" and report["ok"] is False  # one number failed
            outcomes = {r["number"]: r for r in report["results"]}
            assert list(outcomes) == listed
            assert outcomes[N_OK]["outcome"] == "updated"
            assert outcomes[N_APP]["outcome"] == "skipped"
            assert "TwiML App" in outcomes[N_APP]["reason"]
            assert outcomes[N_TRUNK]["outcome"] == "skipped"
            assert "SIP trunk" in outcomes[N_TRUNK]["reason"]
            assert outcomes[N_MISSING]["outcome"] == "skipped"
            assert outcomes[N_MISSING]["reason"] == "not on this account"
            assert outcomes[N_FAIL]["outcome"] == "failed" and outcomes[N_FAIL]["code"] == 21502
            assert "Invalid callback url" in outcomes[N_FAIL]["reason"]
            assert (report["updated"], report["skipped"], report["failed"]) == (1, 3, 1)

            # the fake's numbers now call the relay (POST), and only N_OK was touched
            public = relay_.base_url
            numbers = fake_numbers(tw, account)
            assert numbers[N_OK]["voice_url"] == f"{public}/twilio/voice"
            assert numbers[N_OK]["voice_method"] == "POST"
            assert numbers[N_OK]["status_callback"] == f"{public}/twilio/status"
            assert numbers[N_OK]["status_callback_method"] == "POST"
            for untouched in (N_APP, N_TRUNK, N_FAIL):
                assert numbers[untouched]["voice_url"] == ""
            # every request to Twilio was authenticated as the tenant's account
            assert {r.user for r in tw.requests} == {account.sid}

            settings = body["settings"]
            assert settings["account_sid"] == account.sid
            assert settings["auth_token"] == "…" + token[-4:]
            assert settings["phone_numbers"] == sorted(listed)
            status, got = await api("GET", "/api/v1/settings/twilio", key)
            assert status == 200 and got == settings
            status, body = await api("GET", "/api/v1/numbers", key)
            assert status == 200
            by_number = {n["number"]: n for n in body["numbers"]}
            assert by_number[N_OK]["sync"]["outcome"] == "updated"
            assert by_number[N_FAIL]["sync"]["outcome"] == "failed"
            assert by_number[N_MISSING]["sync"] == {
                "outcome": "skipped",
                "detail": "not on this account",
            }
            assert all(n["agent"] is None for n in body["numbers"])

            # a refused PUT changes nothing that was saved
            bad = {**payload, "phone_numbers": ["4155551234"]}
            status, _ = await api("PUT", "/api/v1/settings/twilio", key, bad)
            assert status == 400
            status, again = await api("GET", "/api/v1/settings/twilio", key)
            assert again == settings

            status, body = await api("POST", "/api/v1/settings/twilio/verify", key)
            assert status == 200 and body["ok"] is True, body
            assert body["account"] == {
                "sid": account.sid,
                "friendly_name": "acme on twilio",
                "status": "active",
            }

            # the token is rotated in the Twilio console: verify says so, with Twilio's code
            new_token = tw.rotate_token(account)
            status, body = await api("POST", "/api/v1/settings/twilio/verify", key)
            assert status == 200 and body["ok"] is False
            assert body["error"]["code"] == 20003 and body["error"]["status"] == 401
            assert body["error"]["kind"] == "twilio_auth"
            # a sync with the old token fails as a whole, writing nothing
            writes = len(tw.writes)
            status, body = await api("POST", "/api/v1/numbers/sync", key)
            assert status == 200 and body["numbers"]["error"] and body["numbers"]["results"] == []
            assert len(tw.writes) == writes

            # re-PUT with the new token fixes everything (the failing number recovered too)
            tw.clear_failures()
            status, body = await api(
                "PUT", "/api/v1/settings/twilio", key, {**payload, "auth_token": new_token}
            )
            assert status == 200, body
            outcomes = {r["number"]: r for r in body["numbers"]["results"]}
            assert outcomes[N_OK] == {**outcomes[N_OK], "outcome": "updated"}
            assert outcomes[N_OK]["reason"] == "already configured"
            assert outcomes[N_FAIL]["outcome"] == "updated"
            assert body["settings"]["auth_token"] == "…" + new_token[-4:]
            status, body = await api("POST", "/api/v1/settings/twilio/verify", key)
            assert body["ok"] is True

            # idempotent: a re-sync writes nothing for numbers already configured
            writes = len(tw.writes)
            status, body = await api("POST", "/api/v1/numbers/sync", key)
            assert status == 200, body
            report = body["numbers"]
            assert report["error"] == "" and report["ok"] is True
            assert {r["number"]: r["outcome"] for r in report["results"]} == {
                N_OK: "updated",
                N_APP: "skipped",
                N_TRUNK: "skipped",
                N_MISSING: "skipped",
                N_FAIL: "updated",
            }
            assert all(
                r["reason"] == "already configured"
                for r in report["results"]
                if r["outcome"] == "updated"
            )
            assert len(tw.writes) == writes

            # the token never left the relay: not in an answer, not in a log line
            for secret in (token, new_token):
                assert not api.saw(secret)
                assert secret not in caplog.text
                assert all(secret not in str(r.args) for r in caplog.records)
            # at rest it is encrypted
            with store_of(relay_).connect() as c:
                rows = [dict(r._mapping) for r in c.execute(sa.select(schema.twilio_accounts))]
            assert len(rows) == 1 and new_token not in str(rows[0]) and token not in str(rows[0])


async def test_twilio_unreachable_saves_settings_and_reports_the_error(
    start_relay, make_config, store_url
):
    with trio.fail_after(20):
        dead = f"http://127.0.0.1:{closed_port()}"
        relay_ = await start(start_relay, make_config, store_url, twilio={"api_base_url": dead})
        api = Client(relay_)
        _tenant, key, _ = await new_tenant(api)
        # Twilio's SIDs are lower-case hex: an upper-case spelling is saved as Twilio's
        upper = "AC" + GOOD_SID[2:].upper()
        payload = {"account_sid": upper, "auth_token": GOOD_TOKEN, "phone_numbers": [N_OK]}
        status, body = await api("PUT", "/api/v1/settings/twilio", key, payload)
        assert status == 200, body
        assert body["settings"]["account_sid"] == GOOD_SID
        report = body["numbers"]
        assert report["ok"] is False and report["results"] == []
        assert "unreachable" in report["error"]
        status, body = await api("GET", "/api/v1/settings/twilio", key)
        assert status == 200 and body["account_sid"] == GOOD_SID
        assert body["phone_numbers"] == [N_OK]
        # nothing half-written: the number has no sync outcome
        status, body = await api("GET", "/api/v1/numbers", key)
        assert body["numbers"] == [
            {
                "number": N_OK,
                "agent": None,
                "sync": None,
                "updated_at": body["numbers"][0]["updated_at"],
            }
        ]
        status, body = await api("POST", "/api/v1/settings/twilio/verify", key)
        assert status == 200 and body["ok"] is False
        assert body["error"]["kind"] == "twilio_unreachable"
        assert not api.saw(GOOD_TOKEN)


async def test_a_stalled_number_update_fails_that_number_only(start_relay, make_config, store_url):
    with trio.fail_after(20):
        async with fake_twilio_rest() as tw:
            account = tw.add_account()
            first, second = "+14155550201", "+14155550202"
            tw.add_number(first, account)
            tw.add_number(second, account)
            relay_ = await start(
                start_relay,
                make_config,
                store_url,
                twilio={"api_base_url": tw.url, "rest_timeout_s": 1.0},
            )
            api = Client(relay_)
            _tenant, key, _ = await new_tenant(api)
            tw.stall("numbers.update", times=1)  # the first update is never answered
            payload = {
                "account_sid": account.sid,
                "auth_token": account.auth_token,
                "phone_numbers": [first, second],
            }
            t0 = trio.current_time()
            status, body = await api("PUT", "/api/v1/settings/twilio", key, payload)
            assert status == 200, body
            assert trio.current_time() - t0 < 5
            results = {r["number"]: r for r in body["numbers"]["results"]}
            assert results[first]["outcome"] == "failed"
            assert "did not answer" in results[first]["reason"]
            assert results[second]["outcome"] == "updated"
            numbers = fake_numbers(tw, account)
            assert numbers[second]["voice_url"] == f"{relay_.base_url}/twilio/voice"
            # the next sync finishes the job
            status, body = await api("POST", "/api/v1/numbers/sync", key)
            assert body["numbers"]["ok"] is True
            assert numbers[first]["voice_url"] == f"{relay_.base_url}/twilio/voice"


# --- numbers ------------------------------------------------------------------------------------
async def test_numbers_list_sync_and_map_to_agents(start_relay, make_config, store_url):
    with trio.fail_after(20):
        async with fake_twilio_rest() as tw:
            account = tw.add_account()
            tw.add_number(N_OK, account)
            tw.add_number(N_APP, account)
            relay_ = await start(
                start_relay, make_config, store_url, twilio={"api_base_url": tw.url}
            )
            api = Client(relay_)
            _tenant, key, _ = await new_tenant(api)
            # nothing saved yet: nothing to sync, nothing to map
            status, body = await api("POST", "/api/v1/numbers/sync", key)
            assert status == 409 and err(body) == ("not_configured", None)
            status, body = await api("POST", "/api/v1/settings/twilio/verify", key)
            assert status == 404 and err(body) == ("not_configured", None)
            payload = {
                "account_sid": account.sid,
                "auth_token": account.auth_token,
                "phone_numbers": [N_OK, N_APP],
            }
            status, _ = await api("PUT", "/api/v1/settings/twilio", key, payload)
            assert status == 200
            status, body = await api("POST", "/api/v1/numbers/sync", key, {})
            assert status == 200 and body["numbers"]["ok"] is True
            status, body = await api("POST", "/api/v1/numbers/sync", key, {"force": True})
            assert (status, err(body)) == (400, ("unknown_field", "force"))

            status, body = await api(
                "POST", "/api/v1/agents", key, {"name": "front", "type": "parrot"}
            )
            assert status == 201
            agent_id = body["id"]

            encoded = quote(N_OK, safe="")
            assert encoded.startswith("%2B")
            status, body = await api(
                "PATCH", f"/api/v1/numbers/{encoded}", key, {"agent": agent_id}
            )
            assert status == 200, body
            assert (body["number"], body["agent"]) == (N_OK, agent_id)
            status, body = await api("PATCH", f"/api/v1/numbers/{N_APP}", key, {"agent": agent_id})
            assert status == 200 and (body["number"], body["agent"]) == (N_APP, agent_id)
            status, body = await api("PATCH", f"/api/v1/numbers/{N_APP}", key, {"agent": None})
            assert status == 200 and body["agent"] is None

            def mapping(body: Any) -> dict[str, Any]:
                return {n["number"]: n["agent"] for n in body["numbers"]}

            status, body = await api("GET", "/api/v1/numbers", key)
            assert status == 200 and mapping(body) == {N_OK: agent_id, N_APP: None}

            refusals = [
                (f"/api/v1/numbers/{encoded}", {"agent": "ag_0000000000000000"}, 400, "agent"),
                (f"/api/v1/numbers/{encoded}", {"agent": "parrot"}, 400, "agent"),  # relay.toml's
                (f"/api/v1/numbers/{encoded}", {"agent": 5}, 400, "agent"),
                (f"/api/v1/numbers/{encoded}", {}, 400, "agent"),
                (f"/api/v1/numbers/{encoded}", {"agent": None, "x": 1}, 400, "x"),
                ("/api/v1/numbers/%2B14155559999", {"agent": agent_id}, 404, None),
                ("/api/v1/numbers/+14155559999", {"agent": None}, 404, None),
                ("/api/v1/numbers/4155551234", {"agent": agent_id}, 400, "number"),
                ("/api/v1/numbers/%2B0123", {"agent": agent_id}, 400, "number"),
                ("/api/v1/numbers/%2B1234567890123456", {"agent": None}, 400, "number"),
                ("/api/v1/numbers/%2B1%20415%20555", {"agent": None}, 400, "number"),
            ]
            for path, payload, code, field in refusals:
                status, body = await api("PATCH", path, key, payload)
                assert status == code and err(body)[1] == field, (path, payload, body)
            status, body = await api("GET", "/api/v1/numbers", key)
            assert mapping(body) == {N_OK: agent_id, N_APP: None}  # nothing changed

            # deleting the agent unmaps its numbers
            status, _ = await api("DELETE", f"/api/v1/agents/{agent_id}", key)
            assert status == 204
            status, body = await api("GET", "/api/v1/numbers", key)
            assert mapping(body) == {N_OK: None, N_APP: None}


# --- agents ---------------------------------------------------------------------------------------
async def test_agents_crud_validates_like_the_toml_and_keeps_secrets(
    start_relay, make_config, store_url, monkeypatch
):
    # the deployer's own OpenAI key: a tenant's agent must never fall back to it
    monkeypatch.setenv("OPENAI_API_KEY", "sk-deployer-key-must-not-be-used-1234")
    with trio.fail_after(20):
        relay_ = await start(start_relay, make_config, store_url)
        api = Client(relay_)
        _tenant, key, _ = await new_tenant(api)
        create = {
            "name": "front desk",
            "type": "openai",
            "api_key": OPENAI_SECRET,
            "voice": "marin",
            "audio": "pcmu",
            "instructions": "Be brief.",
            "greeting": "Hello!",
        }
        status, body = await api("POST", "/api/v1/agents", key, create)
        assert status == 201, body
        agent_id = body["id"]
        assert agent_id.startswith("ag_") and body["source"] == "api"
        assert (body["name"], body["type"]) == ("front desk", "openai")
        assert body["options"] == {
            "api_key": "…" + OPENAI_SECRET[-4:],
            "voice": "marin",
            "audio": "pcmu",
            "instructions": "Be brief.",
            "greeting": "Hello!",
        }
        # stored encrypted, decrypts to what was sent
        store = store_of(relay_)
        with store.connect() as c:
            rows = [dict(r._mapping) for r in c.execute(sa.select(schema.agents))]
        assert len(rows) == 1 and OPENAI_SECRET not in str(rows[0])
        assert store.agent_secrets(store.get_agent(_tenant, agent_id)) == {"api_key": OPENAI_SECRET}

        status, listed = await api("GET", "/api/v1/agents", key)
        assert status == 200 and listed == {"agents": [body]}
        status, got = await api("GET", f"/api/v1/agents/{agent_id}", key)
        assert status == 200 and got == body

        invalid: list[tuple[dict[str, Any], int, str, str | None]] = [
            ({**create, "name": "b", "audio": "bad"}, 400, "invalid_field", "audio"),
            ({"name": "p", "type": "parrot", "bogus": 1}, 400, "invalid_field", "bogus"),
            ({"name": "p", "type": "parrot", "greeting": "hi"}, 400, "invalid_field", "greeting"),
            (
                {"name": "p", "type": "parrot", "hangup_digit": "12"},
                400,
                "invalid_field",
                "hangup_digit",
            ),
            (
                {"name": "p", "type": "parrot", "max_utterance_s": "x"},
                400,
                "invalid_field",
                "max_utterance_s",
            ),
            ({"name": "p", "type": "nope"}, 400, "invalid_field", "type"),
            ({"name": "p"}, 400, "missing_field", "type"),
            ({"type": "parrot"}, 400, "missing_field", "name"),
            ({"name": 5, "type": "parrot"}, 400, "invalid_type", "name"),
            ({"name": "p", "type": 5}, 400, "invalid_type", "type"),
            ({"name": " ", "type": "parrot"}, 400, "invalid_field", "name"),
            # no api_key: the relay's environment must not lend the deployer's
            ({"name": "o", "type": "openai", "voice": "marin"}, 400, "invalid_field", "api_key"),
            ({"name": "o", "type": "openai", "api_key": ""}, 400, "invalid_field", "api_key"),
            ({**create}, 409, "conflict", "name"),  # the same name again
        ]
        for payload, code, ecode, field in invalid:
            status, body = await api("POST", "/api/v1/agents", key, payload)
            assert (status, err(body)) == (code, (ecode, field)), (payload, body)
        status, body = await api("POST", "/api/v1/agents", key, raw=b'{"name": "x", ')
        assert (status, err(body)[0]) == (400, "invalid_json")
        status, body = await api("GET", "/api/v1/agents", key)
        assert [a["id"] for a in body["agents"]] == [agent_id]  # nothing created

        # PATCH merges with what is stored and re-validates the whole
        status, body = await api("PATCH", f"/api/v1/agents/{agent_id}", key, {"voice": "cedar"})
        assert status == 200, body
        assert body["options"]["voice"] == "cedar" and body["options"]["greeting"] == "Hello!"
        assert body["options"]["api_key"] == "…" + OPENAI_SECRET[-4:]
        assert store.agent_secrets(store.get_agent(_tenant, agent_id)) == {"api_key": OPENAI_SECRET}
        before = body
        status, body = await api("POST", "/api/v1/agents", key, {"name": "echo", "type": "echo"})
        assert status == 201
        echo_id = body["id"]
        for payload, code, ecode, field in (
            ({"audio": "bad"}, 400, "invalid_field", "audio"),
            ({"type": "parrot"}, 400, "invalid_field", None),  # openai options on a parrot
            ({"api_key": None}, 400, "invalid_field", "api_key"),
            ({"name": ""}, 400, "invalid_field", "name"),
            ({"name": 3}, 400, "invalid_type", "name"),
            ({"name": "echo"}, 409, "conflict", "name"),
        ):
            status, body = await api("PATCH", f"/api/v1/agents/{agent_id}", key, payload)
            assert status == code and err(body)[0] == ecode, (payload, body)
            if field is not None:
                assert err(body)[1] == field, (payload, body)
        status, body = await api("GET", f"/api/v1/agents/{agent_id}", key)
        assert body["options"] == before["options"] and body["name"] == "front desk"

        status, body = await api(
            "PATCH",
            f"/api/v1/agents/{agent_id}",
            key,
            {"voice": None, "name": "reception", "api_key": "sk-rotated-key-00001111"},
        )
        assert status == 200, body
        assert "voice" not in body["options"] and body["name"] == "reception"
        assert body["options"]["api_key"] == "…1111"
        assert store.agent_secrets(store.get_agent(_tenant, agent_id)) == {
            "api_key": "sk-rotated-key-00001111"
        }
        status, body = await api("PATCH", "/api/v1/agents/ag_0000000000000000", key, {})
        assert status == 404 and err(body) == ("not_found", None)

        status, body = await api("DELETE", f"/api/v1/agents/{agent_id}", key)
        assert (status, body) == (204, None)
        status, body = await api("GET", f"/api/v1/agents/{agent_id}", key)
        assert status == 404 and err(body) == ("not_found", None)
        status, body = await api("DELETE", f"/api/v1/agents/{agent_id}", key)
        assert status == 404
        status, body = await api("GET", "/api/v1/agents", key)
        assert [a["id"] for a in body["agents"]] == [echo_id]
        for secret in (OPENAI_SECRET, "sk-rotated-key-00001111", "sk-deployer-key"):
            assert not api.saw(secret)


async def test_default_tenant_sees_file_agents_and_cannot_change_them(
    start_relay, make_config, store_url
):
    with trio.fail_after(20):
        relay_ = await start(
            start_relay,
            make_config,
            store_url,
            agents={"gpt": {"type": "openai", "api_key": "sk-file-secret-abcd1234"}},
        )
        api = Client(relay_)
        store = store_of(relay_)
        _key, default_key = await store.run(store.create_key, "default")
        status, body = await api("GET", "/api/v1/agents", default_key)
        assert status == 200
        by_id = {a["id"]: a for a in body["agents"]}
        assert set(by_id) == {"parrot", "echo", "gpt"}
        assert all(a["source"] == "relay.toml" for a in body["agents"])
        assert by_id["parrot"]["type"] == "parrot" and by_id["parrot"]["options"] == {
            "greeting": False
        }
        assert by_id["gpt"]["options"]["api_key"].startswith("…")
        assert not api.saw("sk-file-secret-abcd1234")
        status, body = await api("GET", "/api/v1/agents/echo", default_key)
        assert status == 200 and body["source"] == "relay.toml"
        for method, payload in (("PATCH", {"greeting": True}), ("DELETE", None)):
            status, body = await api(method, "/api/v1/agents/parrot", default_key, payload)
            assert status == 409 and err(body)[0] == "configured_in_file"
        status, body = await api(
            "PUT",
            "/api/v1/settings/twilio",
            default_key,
            {"account_sid": GOOD_SID, "auth_token": GOOD_TOKEN},
        )
        assert status == 409 and err(body)[0] == "configured_in_file"
        # stored agents live beside the file's
        status, body = await api(
            "POST", "/api/v1/agents", default_key, {"name": "parrot", "type": "parrot"}
        )
        assert status == 201 and body["source"] == "api"
        status, body = await api("GET", "/api/v1/agents", default_key)
        assert [a["source"] for a in body["agents"]] == ["relay.toml"] * 3 + ["api"]
        # another tenant sees none of the file's agents
        _tenant, key, _ = await new_tenant(api)
        status, body = await api("GET", "/api/v1/agents", key)
        assert body == {"agents": []}
        for method in ("GET", "PATCH", "DELETE"):
            status, body = await api(
                method, "/api/v1/agents/parrot", key, {} if method == "PATCH" else None
            )
            assert status == 404 and err(body) == ("not_found", None)


# --- call history -----------------------------------------------------------------------------
async def test_calls_are_paged_newest_first_and_shown_in_full(start_relay, make_config, store_url):
    with trio.fail_after(20):
        relay_ = await start(start_relay, make_config, store_url)
        api = Client(relay_)
        store = store_of(relay_)
        tenant, key, _ = await new_tenant(api)
        other, other_key, _ = await new_tenant(api, "other")
        for i in range(5):
            await store.run(
                store.save_call,
                {
                    "call_sid": f"CA{i:032d}",
                    "tenant_id": tenant,
                    "status": "completed",
                    "from_number": "+14155550100",
                    "to_number": N_OK,
                    "from_country": "US",
                    "agent": "ag_x",
                    "end_reason": "caller hung up",
                    "created_at": 1_700_000_000_000 + i // 2,  # pairs share a millisecond
                    "started_at": 1_700_000_000_100,
                    "ended_at": 1_700_000_002_100,
                    "duration_ms": 2000,
                    "details": {"transcript": [{"role": "agent", "text": f"hello {i}"}]},
                },
            )
        theirs = "CA" + "f" * 32
        await store.run(
            store.save_call,
            {"call_sid": theirs, "tenant_id": other, "status": "completed", "created_at": 1},
        )
        status, body = await api("GET", "/api/v1/calls", key)
        assert status == 200 and body["next_cursor"] is None
        newest_first = [f"CA{i:032d}" for i in (4, 3, 2, 1, 0)]
        assert [c["call_sid"] for c in body["calls"]] == newest_first

        seen, cursor, pages = [], None, 0
        while True:
            query = "limit=2" + (f"&cursor={cursor}" if cursor else "")
            status, body = await api("GET", f"/api/v1/calls?{query}", key)
            assert status == 200 and len(body["calls"]) <= 2
            seen += [c["call_sid"] for c in body["calls"]]
            pages += 1
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert seen == newest_first and pages == 3
        for limit in ("1", "200"):
            status, body = await api("GET", f"/api/v1/calls?limit={limit}", key)
            assert status == 200 and len(body["calls"]) == min(int(limit), 5)

        for query, field in (
            ("limit=0", "limit"),
            ("limit=201", "limit"),
            ("limit=-1", "limit"),
            ("limit=x", "limit"),
            ("limit=", "limit"),
            ("limit=1.5", "limit"),
            ("cursor=!!", "cursor"),
            ("cursor=bm90LWEtY3Vyc29y", "cursor"),  # base64 of "not-a-cursor"
            (f"cursor={encode_cursor(10**30, 'CA1')}", "cursor"),  # beyond any timestamp
            (f"cursor={encode_cursor(-(10**30), 'CA1')}", "cursor"),
        ):
            status, body = await api("GET", f"/api/v1/calls?{query}", key)
            assert (status, err(body)) == (400, ("invalid_field", field)), (query, body)

        status, call = await api("GET", f"/api/v1/calls/CA{3:032d}", key)
        assert status == 200
        assert {
            k: call[k]
            for k in (
                "call_sid",
                "status",
                "from",
                "to",
                "from_country",
                "agent",
                "end_reason",
                "duration_ms",
                "transcript",
            )
        } == {
            "call_sid": f"CA{3:032d}",
            "status": "completed",
            "from": "+14155550100",
            "to": N_OK,
            "from_country": "US",
            "agent": "ag_x",
            "end_reason": "caller hung up",
            "duration_ms": 2000,
            "transcript": [{"role": "agent", "text": "hello 3"}],
        }
        status, missing = await api("GET", "/api/v1/calls/CA" + "0" * 31 + "9", key)
        assert status == 404 and err(missing) == ("not_found", None)
        status, body = await api("GET", f"/api/v1/calls/{theirs}", key)
        assert (status, body) == (404, missing)  # another tenant's: like a call that never was
        status, body = await api("GET", "/api/v1/calls", other_key)
        assert [c["call_sid"] for c in body["calls"]] == [theirs]


async def test_unknown_routes_and_methods_answer_json(start_relay, make_config, store_url):
    with trio.fail_after(20):
        relay_ = await start(start_relay, make_config, store_url)
        api = Client(relay_)
        _tenant, key, _ = await new_tenant(api)
        status, body = await api("GET", "/api/v1/nothing-here", key)
        assert status == 404 and err(body)[0] == "not_found"
        status, body = await api("DELETE", "/api/v1/tenants", ADMIN_KEY)
        assert status == 405 and err(body)[0] == "method_not_allowed"
        status, body = await api("PUT", "/api/v1/agents", key, {})
        assert status == 405 and err(body)[0] == "method_not_allowed"


async def test_api_without_a_store_says_so(start_relay, make_config):
    with trio.fail_after(10):
        relay_ = await start_relay(make_config(store={"url": "memory"}))
        status, body = await api_request(relay_, "GET", "/api/v1/agents", "rk_" + "x" * 43)
        assert status == 503 and err(body)[0] == "no_store"
        status, body = await api_request(
            relay_, "POST", "/api/v1/tenants", ADMIN_KEY, {"name": "x"}
        )
        assert status == 503 and err(body)[0] == "no_store"


async def test_credentials_twilio_refuses_are_not_saved(start_relay, make_config, store_url):
    with trio.fail_after(20):
        async with fake_twilio_rest() as tw:
            account = tw.add_account()
            relay_ = await start(
                start_relay, make_config, store_url, twilio={"api_base_url": tw.url}
            )
            api = Client(relay_)
            _tenant, key, _ = await new_tenant(api)
            wrong = "0" * 32
            payload = {"account_sid": account.sid, "auth_token": wrong, "phone_numbers": []}
            status, body = await api("PUT", "/api/v1/settings/twilio", key, payload)
            assert status == 400 and err(body) == ("invalid_credentials", "auth_token"), body
            assert "20003" in body["error"]["message"]
            status, _ = await api("GET", "/api/v1/settings/twilio", key)
            assert status == 404  # nothing saved: nobody claims an account without its token
            assert not [r for r in tw.requests if r.method != "GET"]
            assert not api.saw(wrong)


async def test_tenant_tools_cannot_reach_private_addresses_and_hide_their_headers(
    start_relay, make_config, store_url
):
    with trio.fail_after(20):
        relay_ = await start(start_relay, make_config, store_url)
        api = Client(relay_)
        _tenant, key, _ = await new_tenant(api)
        tool = {
            "name": "lookup",
            "description": "look up an order",
            "url": "https://crm.example.com/lookup",
            "parameters": {"type": "object", "properties": {}},
            "headers": {"Authorization": "Bearer crm-secret-token-1234"},
        }
        base = {"name": "desk", "type": "parrot"}
        status, body = await api(
            "POST", "/api/v1/agents", key, {**base, "tools": [{**tool, "allow_private": True}]}
        )
        assert status == 400 and err(body) == ("invalid_field", "tools"), body
        status, body = await api(
            "POST", "/api/v1/agents", key, {**base, "allow_private_urls": True}
        )
        assert status == 400 and err(body) == ("invalid_field", "allow_private_urls"), body
        status, body = await api("GET", "/api/v1/agents", key)
        assert body["agents"] == []  # nothing written
        openai = {"name": "desk", "type": "openai", "api_key": "sk-test-key-0000"}
        status, body = await api("POST", "/api/v1/agents", key, {**openai, "tools": [tool]})
        assert status == 201, body
        shown = body["options"]["tools"][0]["headers"]["Authorization"]
        assert shown == "…1234" and not api.saw("crm-secret-token-1234")
        store = store_of(relay_)
        row = await store.run(store.get_agent, _tenant, body["id"])
        assert "crm-secret-token-1234" not in orjson.dumps(row.options).decode()
        assert store.agent_secrets(row)["tools"][0]["headers"]["Authorization"].endswith("1234")


async def test_tenant_agent_endpoints_cannot_point_at_private_addresses(
    start_relay, make_config, store_url
):
    with trio.fail_after(20):
        relay_ = await start(start_relay, make_config, store_url)
        api = Client(relay_)
        _tenant, key, _ = await new_tenant(api)
        base = {"name": "desk", "type": "openai", "api_key": "sk-test-key-0000"}
        for field, url in (
            ("url", "ws://127.0.0.1:9/v1/realtime"),
            ("url", "wss://169.254.169.254/latest"),
            ("url", "ws://localhost:8080/"),
        ):
            status, body = await api("POST", "/api/v1/agents", key, {**base, field: url})
            assert status == 400 and err(body) == ("invalid_field", field), body
        status, body = await api("GET", "/api/v1/agents", key)
        assert body["agents"] == []  # nothing written
