"""``relay simulate --outbound`` (relay/sim/rest.py): the simulator plays Twilio's REST API
and the callee of calls relay places: answered by a human or a machine (``AnsweredBy`` when
machine detection was asked), busy, no answer. Against the real relay over loopback:
``POST /api/v1/calls`` -> the REST call -> status callbacks -> webhook + media stream."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from conftest import ACCOUNT_SID, AUTH_TOKEN, api_request

from relay.control.store import DEFAULT_TENANT
from relay.sim import rest

OUR_NUMBER = "+15550100000"
CALLEE = "+14155550123"


async def relay_with(start_relay: Any, make_config: Any, sim: rest.RestSim) -> tuple[Any, str]:
    cfg = make_config(
        agents={"desk": {"type": "parrot", "greeting": True}},
        default_agent="desk",
        numbers={OUR_NUMBER: "desk"},
        twilio={"api_base_url": sim.url},
    )
    relay_ = await start_relay(cfg)
    _key, key = relay_.state.control.store.create_key(DEFAULT_TENANT, "sim")
    return relay_, key


async def place(relay_: Any, key: str, **extra: Any) -> str:
    body = {"to": CALLEE, "from": OUR_NUMBER, "agent": "desk", **extra}
    status, answer = await api_request(relay_, "POST", "/api/v1/calls", key, body)
    assert status == 201, answer
    return str(answer["call_sid"])


async def test_scripted_callees_answer_or_not(start_relay, make_config, nursery) -> None:
    sim = rest.RestSim(
        ACCOUNT_SID,
        AUTH_TOKEN,
        callee_seconds=1.5,
        callee=("human", "machine", "busy", "no-answer"),
    )
    await nursery.start(sim.serve)
    relay_, key = await relay_with(start_relay, make_config, sim)
    records: dict[str, Any] = {}
    with trio.fail_after(40):
        for outcome in ("human", "machine", "busy", "no-answer"):
            sid = await place(relay_, key, machine_detection="Enable")
            placed = sim.calls[-1]
            assert placed.sid == sid and placed.outcome == outcome
            await placed.done.wait()
            records[outcome] = await relay_.wait_record(sid, "completed", timeout=10)
    human, machine, busy, no_answer = sim.calls
    for answered in (human, machine):
        assert answered.statuses == ["initiated", "ringing", "in-progress", "completed"]
        assert answered.result.first_agent_audio_s is not None  # the agent spoke first
        assert answered.result.heard_ms > 0
    assert records["human"].answered_by == "human"
    assert records["machine"].answered_by == "machine_start"
    for record in (records["human"], records["machine"]):
        assert record.direction == "outbound-api" and record.started_at is not None
    for unanswered, status in ((busy, "busy"), (no_answer, "no-answer")):
        assert unanswered.statuses == ["initiated", "ringing", status]
        assert unanswered.result is None  # no webhook, no stream
        record = records[status]
        assert record.end_reason == status and record.started_at is None
    assert relay_.metrics.calls_total == 2  # only the answered calls had a stream


async def test_serve_callees_reports_each_call(start_relay, make_config, nursery) -> None:
    """What ``relay simulate --outbound --callee busy --calls 1`` runs."""
    lines: list[str] = []
    ready = trio.Event()
    sims: list[rest.RestSim] = []
    real_init = rest.RestSim.__post_init__

    def spy(self: rest.RestSim) -> None:
        real_init(self)
        sims.append(self)

    async def serve() -> None:
        await rest.serve_callees(ACCOUNT_SID, AUTH_TOKEN, callee=("busy",), calls=1, report=report)

    def report(line: str) -> None:
        lines.append(line)
        ready.set()

    with pytest.MonkeyPatch.context() as mp, trio.fail_after(20):
        mp.setattr(rest.RestSim, "__post_init__", spy)
        async with trio.open_nursery() as inner:
            inner.start_soon(serve)
            await ready.wait()
            relay_, key = await relay_with(start_relay, make_config, sims[0])
            sid = await place(relay_, key)
    assert lines[0].startswith(f"Twilio REST simulator at {sims[0].url}")
    assert lines[1].startswith(sid) and "busy: initiated -> ringing -> busy" in lines[1]
    with pytest.raises(ValueError, match="callee outcomes"):
        rest.RestSim(ACCOUNT_SID, AUTH_TOKEN, callee=("voicemail",))
