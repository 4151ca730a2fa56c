"""Tenant isolation of /api/v1, route by route, on SQLite and on a real PostgreSQL.

:data:`ROUTES` lists every route of the API; :func:`test_the_table_lists_every_api_route`
compares it with the app's URL map, so a route added without an entry here fails. For
each route: no key, a garbage key, a key of the wrong kind (tenant key on an admin route,
admin key on a tenant route) and a revoked key are all refused with 401 before the body is
even read; tenant B's key on tenant A's ids answers exactly what an id that exists nowhere
answers (same status, same body: nothing tells B that A's id exists); B's own requests
never show anything of A's; and afterwards nothing of A's has changed.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson
import pytest
import trio
from conftest import ACCOUNT_SID, ADMIN_KEY, api_request, http_request
from fake_twilio_rest import fake_twilio_rest

from relay.control import signing
from relay.control.secretbox import SecretBox
from relay.http.app import create_app
from relay.state import RelayState

ENC_KEY = SecretBox.new_key()
A_NUMBER, B_NUMBER = "+14155550301", "+14155550302"
A_AGENT_SECRET = "sk-tenant-a-secret-7777aaaa"


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    #: the request body, from the World (None: no body)
    body: Any = None
    admin: bool = False

    def __str__(self) -> str:
        return f"{self.method} {self.template}"

    @property
    def ids(self) -> list[str]:
        return re.findall(r"{(\w+)}", self.template)

    def path(self, ids: dict[str, str]) -> str:
        return re.sub(r"{(\w+)}", lambda m: quote(ids[m.group(1)], safe=""), self.template)

    def payload(self, world: World) -> Any:
        return self.body(world) if callable(self.body) else self.body


def b_settings(w: World) -> dict[str, Any]:
    return {
        "account_sid": w.b_account.sid,
        "auth_token": w.b_account.auth_token,
        "phone_numbers": [B_NUMBER],
    }


def b_outbound_call(w: World) -> dict[str, Any]:
    return {"to": "+14155550999", "from": B_NUMBER, "agent": w.b_agent}


ROUTES = [
    Route("POST", "/api/v1/tenants", {"name": "newcomer"}, admin=True),
    Route("GET", "/api/v1/tenants", admin=True),
    Route("POST", "/api/v1/keys", {"name": "more"}),
    Route("GET", "/api/v1/keys"),
    Route("DELETE", "/api/v1/keys/{key_id}"),
    Route("PUT", "/api/v1/settings/twilio", b_settings),
    Route("GET", "/api/v1/settings/twilio"),
    Route("POST", "/api/v1/settings/twilio/verify"),
    Route("POST", "/api/v1/numbers/sync"),
    Route("GET", "/api/v1/numbers"),
    Route("PATCH", "/api/v1/numbers/{number}", {"agent": None}),
    Route("POST", "/api/v1/agents", {"name": "second", "type": "parrot"}),
    Route("GET", "/api/v1/agents"),
    Route("GET", "/api/v1/agents/{agent_id}"),
    Route("PATCH", "/api/v1/agents/{agent_id}", {"greeting": True}),
    Route("DELETE", "/api/v1/agents/{agent_id}"),
    Route("GET", "/api/v1/calls"),
    Route("GET", "/api/v1/calls/{call_sid}"),
    Route("POST", "/api/v1/calls", b_outbound_call),
    Route("DELETE", "/api/v1/calls/{call_sid}"),
    Route("POST", "/api/v1/calls/{call_sid}/hangup"),
    Route("POST", "/api/v1/calls/{call_sid}/transfer", {"to": "+14155550999"}),
    Route("GET", "/api/v1/calls/{call_sid}/recording"),
    Route("GET", "/api/v1/settings/webhook-secret"),
    Route("POST", "/api/v1/settings/webhook-secret"),
]

#: ids of the right shape that exist for nobody
NOWHERE = {
    "key_id": "key_0000000000000000",
    "agent_id": "ag_0000000000000000",
    "number": "+14155559999",
    "call_sid": "CA" + "0" * 32,
}


@dataclass
class World:
    """Two tenants with one of everything each; C's only key is revoked."""

    relay: Any
    tw: Any
    a_tenant: str = ""
    a_key: str = ""
    a_ids: dict[str, str] = field(default_factory=dict)
    a_account: Any = None
    b_key: str = ""
    b_agent: str = ""
    b_account: Any = None
    c_revoked_key: str = ""

    @property
    def store(self) -> Any:
        return self.relay.state.control.store

    def a_secrets(self) -> list[str]:
        """Everything of A's that B must never see."""
        return [
            self.a_tenant,
            self.a_key,
            self.a_account.sid,
            self.a_account.auth_token,
            A_AGENT_SECRET,
            *self.a_ids.values(),
        ]


async def build_world(relay_: Any, tw: Any) -> World:
    w = World(relay_, tw)
    store = w.store
    w.a_account, w.b_account = tw.add_account(), tw.add_account()
    tw.add_number(A_NUMBER, w.a_account)
    tw.add_number(B_NUMBER, w.b_account)
    for name, account, number in (("a", w.a_account, A_NUMBER), ("b", w.b_account, B_NUMBER)):
        tenant, _key, plain = await store.run(store.create_tenant, name)
        second, _ = await store.run(store.create_key, tenant.id, "second")
        await store.run(
            lambda t=tenant.id, a=account, n=number: store.put_twilio(
                t, account_sid=a.sid, auth_token=a.auth_token, region=None, edge=None, numbers=[n]
            )
        )
        agent = await store.run(
            store.create_agent,
            tenant.id,
            "front",
            "openai",
            {"voice": "marin"},
            {"api_key": A_AGENT_SECRET if name == "a" else "sk-tenant-b-secret-0000"},
        )
        await store.run(store.set_number_agent, tenant.id, number, agent.id)
        call_sid = f"CA{name * 32}"
        await store.run(
            store.save_call,
            {
                "call_sid": call_sid,
                "tenant_id": tenant.id,
                "status": "completed",
                "from_number": "+14155550000",
                "to_number": number,
                "agent": agent.id,
            },
        )
        await store.run(
            store.add_status_callback, call_sid, tenant.id, {"SequenceNumber": "0"}, None
        )
        if name == "a":
            w.a_tenant, w.a_key = tenant.id, plain
            w.a_ids = {
                "key_id": second.id,
                "agent_id": agent.id,
                "number": number,
                "call_sid": call_sid,
            }
        else:
            w.b_key, w.b_agent = plain, agent.id
    c, c_first, c_plain = await store.run(store.create_tenant, "c")
    await store.run(store.revoke_key, c.id, c_first.id)
    w.c_revoked_key = c_plain
    return w


async def snapshot(w: World) -> dict[str, Any]:
    """A's state as A sees it through the API, plus what only the store and Twilio know."""
    out: dict[str, Any] = {}
    ids = w.a_ids
    for path in (
        "/api/v1/keys",
        "/api/v1/settings/twilio",
        "/api/v1/numbers",
        "/api/v1/agents",
        f"/api/v1/agents/{ids['agent_id']}",
        "/api/v1/calls",
        f"/api/v1/calls/{ids['call_sid']}",
    ):
        out[path] = await api_request(w.relay, "GET", path, w.a_key)
        assert out[path][0] == 200, (path, out[path])
    store = w.store
    account = await store.run(store.get_twilio, w.a_tenant)
    agent = await store.run(store.get_agent, w.a_tenant, ids["agent_id"])
    out["token"] = store.auth_token(account)
    out["webhook_secret"] = await store.run(signing.get_or_create, store, w.a_tenant)
    out["agent_secrets"] = store.agent_secrets(agent)
    # writes made with A's credentials (a credentials check by B is a read, and refused)
    out["twilio_requests"] = len(
        [r for r in w.tw.requests if r.user == w.a_account.sid and r.method != "GET"]
    )
    out["fake_numbers"] = orjson.dumps(w.a_account.numbers)
    return out


async def raw(relay_: Any, method: str, path: str, headers: list[tuple[str, str]], body: bytes):
    if body:
        headers = [*headers, ("Content-Type", "application/json")]
    response = await http_request(relay_.port, method, path, headers=headers, body=body)
    return response.status, orjson.loads(response.body) if response.body else None


# --- the table is complete ------------------------------------------------------------------
def test_the_table_lists_every_api_route(make_config):
    state = RelayState(make_config(store={"url": "memory"}))
    app = create_app(state)
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/"):
            template = re.sub(r"<(?:[^:>]+:)?(\w+)>", r"{\1}", rule.rule)
            served |= {(m, template) for m in rule.methods - {"HEAD", "OPTIONS"}}
    listed = {(r.method, r.template) for r in ROUTES}
    assert len(listed) == len(ROUTES)
    assert served == listed, f"untested: {served - listed}; gone: {listed - served}"


# --- every route ---------------------------------------------------------------------------
@pytest.mark.parametrize("route", ROUTES, ids=str)
async def test_route_refuses_strangers_and_other_tenants(
    route, start_relay, make_config, store_url
):
    with trio.fail_after(30):
        async with fake_twilio_rest() as tw:
            cfg = make_config(
                store={"url": store_url},
                security={"encryption_key": ENC_KEY},
                twilio={"api_base_url": tw.url},
            )
            relay_ = await start_relay(cfg)
            w = await build_world(relay_, tw)
            before = await snapshot(w)
            a_path = route.path(w.a_ids)
            body = orjson.dumps(route.payload(w)) if route.body is not None else b""

            # strangers: refused before anything else, the body is not even read
            wrong_kind = w.a_key if route.admin else ADMIN_KEY
            attempts = [
                [],
                [("Authorization", "Bearer rk_" + "x" * 43)],
                [("Authorization", "Bearer not-a-key")],
                [("Authorization", "Bearer")],
                [("Authorization", "rk_" + w.a_key)],
                [("Authorization", "Basic " + base64.b64encode(f"{w.a_key}:".encode()).decode())],
                [("Authorization", f"Bearer {wrong_kind}")],
                [("Authorization", f"Bearer {w.c_revoked_key}")],
            ]
            answers = []
            for headers in attempts:
                for payload in (body, b'{"broken'):
                    status, answer = await raw(relay_, route.method, a_path, headers, payload)
                    assert status == 401, (headers, payload, answer)
                    answers.append(answer)
            assert answers[0]["error"]["code"] == "unauthorized"
            assert all(a == answers[0] for a in answers), "401 answers differ"

            if route.admin:
                # the admin's view is global; what matters is that no tenant key gets here
                status, _ = await api_request(
                    relay_, route.method, a_path, ADMIN_KEY, route.payload(w)
                )
                assert status in (200, 201)
            elif route.ids:
                # B on A's ids answers exactly like ids that exist nowhere
                payload = route.payload(w)
                theirs = await api_request(relay_, route.method, a_path, w.b_key, payload)
                nobodys = await api_request(
                    relay_, route.method, route.path(NOWHERE), w.b_key, payload
                )
                assert theirs[0] == 404, theirs
                assert theirs == nobodys
            else:
                status, answer = await api_request(
                    relay_, route.method, a_path, w.b_key, route.payload(w)
                )
                assert status in (200, 201), answer
                text = orjson.dumps(answer).decode()
                leaked = [s for s in w.a_secrets() if s in text]
                assert not leaked, f"B saw A's {leaked}"

            assert await snapshot(w) == before  # nothing of A's changed


async def test_other_tenants_cannot_point_their_objects_at_a_tenants_ids(
    start_relay, make_config, store_url
):
    """Ids inside bodies: B can neither map its number to A's agent nor claim A's Twilio
    account; A's data stays as it was."""
    with trio.fail_after(30):
        async with fake_twilio_rest() as tw:
            cfg = make_config(
                store={"url": store_url},
                security={"encryption_key": ENC_KEY},
                twilio={"api_base_url": tw.url},
            )
            relay_ = await start_relay(cfg)
            w = await build_world(relay_, tw)
            before = await snapshot(w)
            path = f"/api/v1/numbers/{quote(B_NUMBER, safe='')}"
            a_agent = w.a_ids["agent_id"]
            status, theirs = await api_request(relay_, "PATCH", path, w.b_key, {"agent": a_agent})
            status2, nobodys = await api_request(
                relay_, "PATCH", path, w.b_key, {"agent": NOWHERE["agent_id"]}
            )
            assert status == status2 == 400
            assert theirs["error"]["field"] == "agent"
            assert (
                orjson.loads(
                    orjson.dumps(theirs).replace(a_agent.encode(), NOWHERE["agent_id"].encode())
                )
                == nobodys
            )
            # A's account SID is A's: B cannot take it over (nor the webhooks it signs), in
            # any spelling. Without A's token Twilio refuses the credentials, so B does not
            # even learn that the SID is in use here; with it (B holds the account too) the
            # answer is the conflict. relay.toml's account is the default tenant's.
            answers = []
            for sid in (w.a_account.sid, "AC" + w.a_account.sid[2:].upper()):
                status, answer = await api_request(
                    relay_,
                    "PUT",
                    "/api/v1/settings/twilio",
                    w.b_key,
                    {"account_sid": sid, "auth_token": "b-guesses-a-token-000000"},
                )
                assert status == 400 and answer["error"]["field"] == "auth_token", answer
                answers.append(answer)
            assert answers[0] == answers[1]
            for sid, token in (
                (w.a_account.sid, w.a_account.auth_token),
                ("AC" + w.a_account.sid[2:].upper(), w.a_account.auth_token),
                (ACCOUNT_SID, "b-guesses-a-token-000000"),
            ):
                status, answer = await api_request(
                    relay_,
                    "PUT",
                    "/api/v1/settings/twilio",
                    w.b_key,
                    {"account_sid": sid, "auth_token": token},
                )
                assert status == 409 and answer["error"]["field"] == "account_sid", answer
                answers.append(answer)
            assert answers[2] == answers[3] == answers[4]
            assert w.a_account.auth_token not in orjson.dumps(answers).decode()
            status, answer = await api_request(relay_, "GET", "/api/v1/settings/twilio", w.b_key)
            assert answer["account_sid"] == w.b_account.sid
            assert await snapshot(w) == before
