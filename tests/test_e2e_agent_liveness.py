"""End to end, engine side of issue 11 with the OpenAI fake (tests/fake_openai.py): a dead
agent connection ends the call with "agent disconnected" (counted once), caller speech with
nothing playing is not a barge-in, and HTTP tools run for the OpenAI adapter too, in the
call's nursery (cancelled when the call ends)."""

from __future__ import annotations

import json

import pytest
import trio
from agent_harness import keep_talking
from fake_http import Request, http_server, json_reply
from fake_openai import fake_openai_server


async def gpt_relay(start_relay, make_config, e2e, oai, **agent_extra):
    cfg = make_config(agents={"gpt": e2e.openai_agent(oai, **agent_extra)}, default_agent="gpt")
    return await start_relay(cfg)


@pytest.mark.parametrize("reactor", [True, False], ids=["reactor", "task-per-socket"])
async def test_stalled_openai_agent_ends_the_call_within_5_s(
    start_relay, make_config, e2e, nursery, reactor
):
    """The agent stops reading (its pongs stop; it sends nothing): with the default
    liveness settings (1 s pings, dead after 3 s) the call ends within 5 s, end reason
    "agent disconnected", counted once as agent_disconnected."""
    with trio.fail_after(15):
        async with fake_openai_server() as oai:
            cfg = make_config(
                agents={"gpt": e2e.openai_agent(oai)},
                default_agent="gpt",
                media={"reactor": reactor},
            )
            relay_ = await start_relay(cfg)
            fake = await relay_.dial()
            session = await e2e.agent_session(oai)
            nursery.start_soon(keep_talking, fake)
            await session.wait_for(lambda s: s.appends >= 10)
            t0 = trio.current_time()
            session.stall()
            closed = await fake.wait_closed(8)
            elapsed = trio.current_time() - t0
            assert closed.code == 1000
            assert elapsed < 4.5, f"noticed after {elapsed:.1f} s"  # 3 s + closing, loosely
            await relay_.wait_idle()
            record = relay_.records(fake.call_sid)
            assert record.end_reason == "agent disconnected"
            assert relay_.metrics.errors["agent_disconnected"] == 1
            assert sum(relay_.metrics.errors.values()) == 1  # one failure, counted once


async def test_fast_liveness_settings_are_honoured(start_relay, make_config, e2e, nursery):
    """Pings every 0.1 s, dead after 0.5 s; with media flowing, the watchdog's checks run
    in the media reactor's passes (relay.media.sweep), not as wake-ups of its task."""
    with trio.fail_after(10):
        async with fake_openai_server() as oai:
            relay_ = await gpt_relay(
                start_relay, make_config, e2e, oai, ping_interval_s=0.1, dead_after_s=0.5
            )
            fake = await relay_.dial()
            session = await e2e.agent_session(oai)
            nursery.start_soon(keep_talking, fake)
            sweep = relay_.state.reactor.sweep
            served = sweep.served
            await trio.sleep(1.0)  # pings are answered: alive
            assert fake.closed is None
            assert sweep.served - served >= 5, "checks not served by the reactor's passes"
            assert sweep.errors == 0
            assert f"relay_reactor_timers_total {sweep.served}" in relay_.metrics.render()
            t0 = trio.current_time()
            session.stall()
            await fake.wait_closed(3)
            assert trio.current_time() - t0 < 1.5
            await relay_.wait_idle()
            assert relay_.records(fake.call_sid).end_reason == "agent disconnected"


async def test_speech_while_an_answer_plays_is_still_a_barge_in(start_relay, make_config, e2e):
    """The other side of "nothing playing": with audio at Twilio the clear goes out and the
    barge-in is counted and recorded."""
    with trio.fail_after(10):
        async with fake_openai_server() as oai:
            relay_ = await gpt_relay(start_relay, make_config, e2e, oai)
            fake = await relay_.dial()
            session = await e2e.agent_session(oai)
            await session.speech_started()  # nothing played yet: not a barge-in
            await session.send_response(2000)
            await fake.wait_for(lambda f: f.played_ms >= 300)
            await session.speech_started()
            await fake.wait_for(lambda f: len(f.clears) == 1)
            assert relay_.metrics.barge_ins == 1
            (barge,) = relay_.records(fake.call_sid).barge_ins
            assert barge["response_id"] is not None and barge["heard_ms"] >= 300
            await fake.hang_up()
            await relay_.wait_idle()


async def test_openai_http_tool_round_trip_and_cancellation(start_relay, make_config, e2e, nursery):
    """An HTTP tool in the agent's config runs through the engine (the agent's registry),
    and an in-flight one is cancelled when the call ends."""
    hang = trio.Event()

    async def respond(req: Request) -> tuple[int, bytes]:
        if req.json.get("order") == "slow":
            hang.set()
            await trio.sleep_forever()
        return json_reply({"order": req.json["order"], "status": "shipped"})

    with trio.fail_after(15):
        async with http_server(respond) as api, fake_openai_server(response_ms=100) as oai:
            tool = {
                "name": "lookup_order",
                "description": "Find an order.",
                "url": api.url("/orders"),
                "parameters": {"type": "object", "properties": {"order": {"type": "string"}}},
                "timeout_s": 30,
                "allow_private": True,
                "headers": {"Authorization": "Bearer SECRET-TOKEN"},
            }
            relay_ = await gpt_relay(start_relay, make_config, e2e, oai, tools=["get_time", tool])
            fake = await relay_.dial()
            session = await e2e.agent_session(oai)
            assert [t["name"] for t in session.config["tools"]] == ["get_time", "lookup_order"]
            call_id = await session.send_function_call("lookup_order", {"order": "A-17"})
            await session.wait_for(lambda s: len(s.tool_outputs) == 1)
            (out,) = session.tool_outputs
            assert out["call_id"] == call_id
            assert json.loads(out["output"]) == {"order": "A-17", "status": "shipped"}
            assert api.requests[0].headers["authorization"] == "Bearer SECRET-TOKEN"
            await session.send_function_call("get_time", {})  # a Python tool, same path
            await session.wait_for(lambda s: len(s.tool_outputs) == 2)
            assert "iso" in json.loads(session.tool_outputs[1]["output"])
            # a slow call in flight when the caller hangs up is cancelled with the call
            await session.send_function_call("lookup_order", {"order": "slow"})
            with trio.fail_after(3):
                await hang.wait()
            await fake.hang_up()
            await relay_.wait_idle()
            await api.wait_for(lambda s: s.disconnects == 1, timeout=3)
            record = relay_.records(fake.call_sid)
            assert [c["name"] for c in record.tool_calls] == ["lookup_order", "get_time"]
