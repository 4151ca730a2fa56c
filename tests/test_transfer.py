"""Transfer to a human (relay/control/transfer.py): the API route and the built-in
``transfer_call`` tool redirect the live call through Twilio's REST API to ``<Dial>`` a
target from the agent's ``transfer_to`` list, with the Twilio number as caller ID; the agent
session closes and the call ends ``transferred``. End to end over loopback: the fake Twilio
REST API places the call and ends its stream when the redirect lands, like Twilio."""

from __future__ import annotations

from typing import Any

import orjson
import trio
from conftest import ACCOUNT_SID, AUTH_TOKEN, api_request
from fake_openai import fake_openai_server
from fake_twilio_rest import Callee, fake_twilio_rest

from relay.control.store import DEFAULT_TENANT
from relay.control.transfer import dial_twiml, twilio_number
from relay.records import CallRecord

OUR_NUMBER = "+15550009999"
CALLEE = "+14155550123"
HUMAN = "+14155550188"


async def setup(start_relay: Any, make_config: Any, fake: Any, agents: dict) -> tuple[Any, str]:
    account = fake.add_account(ACCOUNT_SID, AUTH_TOKEN)
    fake.add_number(OUR_NUMBER, account)
    cfg = make_config(
        agents=agents,
        numbers={OUR_NUMBER: "parrot"},
        twilio={"api_base_url": fake.url, "rest_timeout_s": 5.0},
    )
    relay_ = await start_relay(cfg)
    _key, plain = relay_.state.control.store.create_key(DEFAULT_TENANT, "test")
    return relay_, plain


async def place(relay_: Any, key: str, agent: str) -> str:
    status, body = await api_request(
        relay_, "POST", "/api/v1/calls", key, {"to": CALLEE, "from": OUR_NUMBER, "agent": agent}
    )
    assert status == 201, body
    return str(body["call_sid"])


def test_dial_twiml_uses_the_twilio_number_as_caller_id() -> None:
    assert dial_twiml(HUMAN, OUR_NUMBER) == (
        '<?xml version="1.0" encoding="UTF-8"?><Response>'
        f'<Dial callerId="{OUR_NUMBER}"><Number>{HUMAN}</Number></Dial></Response>'
    )
    inbound = CallRecord("CA1", from_number=CALLEE, to_number=OUR_NUMBER)
    outbound = CallRecord("CA2", from_number=OUR_NUMBER, to_number=CALLEE, direction="outbound-api")
    assert twilio_number(inbound) == twilio_number(outbound) == OUR_NUMBER


async def test_transfer_through_the_api(start_relay, make_config):
    agents = {"desk": {"type": "parrot", "greeting": True, "transfer_to": [HUMAN]}}
    async with fake_twilio_rest() as fake:
        relay_, key = await setup(start_relay, make_config, fake, agents)
        callee = fake.answer_calls(Callee(duration_s=None))
        with trio.fail_after(30):
            sid = await place(relay_, key, "desk")
            await relay_.wait_record(sid, "active")
            path = f"/api/v1/calls/{sid}/transfer"
            status, answer = await api_request(relay_, "POST", path, key, {"to": "+14155550999"})
            assert status == 400 and answer["error"]["field"] == "to", answer
            assert HUMAN in answer["error"]["message"]
            status, answer = await api_request(relay_, "POST", path, key, {})
            assert status == 400 and answer["error"]["field"] == "to"
            assert fake.call(sid)["_updates"] == []  # nothing sent to Twilio
            status, answer = await api_request(relay_, "POST", path, key, {"to": "415-555-0188"})
            assert status == 200, answer
            assert (answer["to"], answer["result"]) == (HUMAN, "transferred")
            call = await fake.wait_done(sid)
            record = await relay_.wait_record(sid, "completed")
            # the call is over for relay: a second transfer is refused by Twilio (21220)
            status, again = await api_request(relay_, "POST", path, key, {"to": HUMAN})
        assert (call["_dialed"], call["_dial_caller_id"]) == (HUMAN, OUR_NUMBER)
        assert "<Dial" in call["_updates"][0]["Twiml"][0]
        assert record.end_reason == "transferred"
        assert callee.results[sid].hung_up_by == "twilio"
        assert status == 409 and again["error"]["code"] == "not_in_progress", again
        assert [(e["action"], e["result"]) for e in record.events] == [
            ("place", "ok"),
            ("transfer", "ok"),
            ("transfer", "failed"),
        ]
        status, answer = await api_request(
            relay_, "POST", "/api/v1/calls/CA" + "0" * 32 + "/transfer", key, {"to": HUMAN}
        )
        assert status == 404


async def test_the_agent_transfers_with_the_builtin_tool(start_relay, make_config, e2e):
    async with fake_twilio_rest() as fake, fake_openai_server() as oai:
        agents = {"concierge": e2e.openai_agent(oai, tools=["transfer_call"], transfer_to=[HUMAN])}
        relay_, key = await setup(start_relay, make_config, fake, agents)
        fake.answer_calls(Callee(duration_s=None))
        with trio.fail_after(30):
            sid = await place(relay_, key, "concierge")
            session = await e2e.agent_session(oai)
            assert [t["name"] for t in session.config["tools"]] == ["transfer_call"]
            await relay_.wait_record(sid, "active")
            await session.send_function_call("transfer_call", {"to": "+14155550999"})
            await session.wait_for(lambda s: bool(s.tool_outputs))
            refused = orjson.loads(session.tool_outputs[0]["output"])
            assert "transfer_to" in refused["error"]
            await session.send_function_call("transfer_call", {"to": HUMAN})
            call = await fake.wait_done(sid)
            record = await relay_.wait_record(sid, "completed")
            await session.wait_closed()  # the agent session was closed
        assert call["_dialed"] == HUMAN and record.end_reason == "transferred"
        assert record.events[-1] == {**record.events[-1], "action": "transfer", "via": "tool"}
        assert [t["name"] for t in record.tool_calls] == ["transfer_call", "transfer_call"]
