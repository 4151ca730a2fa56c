"""``relay demo``, continued: one outbound call and one caller not on an allowlist.

After the inbound calls, a second relay on a loopback port (parrot agents, a throwaway
store) shows two call policies end to end, offline:

* an **outbound call**: ``POST /api/v1/calls`` -> relay asks the Twilio REST API
  (``relay.sim.rest``, a minimal local one) to place it -> "Twilio" sends the status
  callbacks and, once the callee answers, the signed voice webhook and the media stream
  (the simulator plays the callee) -> the agent speaks first;
* a **rejected caller**: a number whose agent has ``allowed_callers`` is called from a
  number not on the list -> ``<Reject reason="busy"/>`` before any agent session, recorded
  as rejected with reason ``not_allowed``.
"""

from __future__ import annotations

import hashlib
import secrets
import tempfile
from pathlib import Path
from typing import Any

import trio

from .. import interrupt
from ..config import Config
from ..control.store import DEFAULT_TENANT
from ..http.server import RelayServer
from . import rest, simulator

OUR_NUMBER = "+15550100000"  # the deployer's Twilio number (outbound calls come from it)
VIP_NUMBER = "+15550100099"  # answered by an agent that takes known callers only
CALLEE = "+14155550123"
KNOWN_CALLER = "+14155551234"
STRANGER = "+14155550000"


def policy_config(store_dir: Path) -> Config:
    cfg = Config()
    cfg.server.host, cfg.server.port = "127.0.0.1", 0
    # The simulated Twilio side and the agents run on this relay's own event loop, so its
    # loop lag is theirs too: admission control would refuse the demo's own calls.
    cfg.server.admission = False
    cfg.twilio.auth_token = secrets.token_hex(16)
    cfg.twilio.account_sid = "AC" + hashlib.sha256(cfg.twilio.auth_token.encode()).hexdigest()[:32]
    cfg.security.admin_key = secrets.token_hex(16)
    cfg.store.url = f"sqlite:///{store_dir}/relay.db"
    cfg.agents = {
        "desk": {"type": "parrot", "greeting": True},
        "vip": {"type": "parrot", "greeting": True, "allowed_callers": [KNOWN_CALLER]},
    }
    cfg.numbers = {OUR_NUMBER: "desk", VIP_NUMBER: "vip"}
    cfg.calls.default_agent = "desk"
    cfg.validate()
    return cfg


async def run_policy_demo() -> list[str]:
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    lines = ["", "call policies: an outbound call and a caller not on an allowlist"]
    with tempfile.TemporaryDirectory() as store_dir:
        cfg = policy_config(Path(store_dir))
        twilio = rest.RestSim(cfg.twilio.account_sid, cfg.twilio.auth_token)
        async with trio.open_nursery() as nursery:
            await nursery.start(twilio.serve)
            cfg.twilio.api_base_url = twilio.url
            server = RelayServer(cfg)
            await nursery.start(server.serve)
            base = cfg.public_url
            store = server.state.control.store
            assert store is not None
            _key, key = store.create_key(DEFAULT_TENANT, "demo")

            # 1. outbound: the API, the REST call, the callee answering
            body = {"to": CALLEE, "from": OUR_NUMBER, "agent": "desk"}
            async with httpx.AsyncClient(timeout=10.0) as client:
                answer = await client.post(
                    f"{base}/api/v1/calls", json=body, headers={"Authorization": f"Bearer {key}"}
                )
            placed: dict[str, Any] = answer.json()
            lines.append(f"\noutbound  POST /api/v1/calls {body} -> {answer.status_code}")
            if answer.status_code == 201:
                with trio.move_on_after(30):
                    await twilio.calls[-1].done.wait()
                with trio.move_on_after(3):  # the relay closes the call's record
                    while server.state.metrics.active_calls:
                        await trio.sleep(0.05)
                lines += _outbound_lines(server, twilio.calls[-1], placed["call_sid"])
            else:
                lines.append(f"  refused: {placed}")

            # 2. a caller the agent does not take
            streams_before = server.state.metrics.calls_total
            result = await simulator.place_call(
                base,
                cfg.twilio.auth_token,
                account_sid=cfg.twilio.account_sid,
                to=VIP_NUMBER,
                from_=STRANGER,
                duration_s=2.0,
                status_callback=None,
            )
            record = server.state.records.get(result.call_sid)
            lines.append(
                f"\nrejected  {STRANGER} -> {VIP_NUMBER} (agent vip, allowed_callers "
                f"[{KNOWN_CALLER}])  {result.call_sid}"
            )
            lines.append(f"  Twilio got: {result.rejected or result.outcome}")
            if record is not None:
                lines.append(
                    f"  relay: {record.status}, reason {record.reject_reason}; agent sessions "
                    f"opened: {server.state.metrics.calls_total - streams_before}"
                )
            nursery.cancel_scope.cancel()
    return lines


def _outbound_lines(server: RelayServer, call: rest.PlacedCall, sid: str) -> list[str]:
    lines = [f"  {sid}  {OUR_NUMBER} -> {CALLEE} (agent desk)"]
    lines.append(f"  Twilio REST: created, then {' -> '.join(call.statuses)}")
    result = call.result
    if result is not None:
        first = result.first_agent_audio_s
        lines.append(
            "  the callee answered; the agent spoke first: its greeting "
            + (f"{first * 1000:.0f} ms after the stream started" if first else "(not heard)")
            + f", {result.heard_ms:.0f} ms heard"
        )
    record = server.state.records.get(sid)
    if record is not None:
        statuses = [c["CallStatus"] for c in record.status_callbacks if c.get("CallStatus")]
        lines.append(
            f"  relay: {record.direction}, {record.status} ({record.end_reason}); "
            f"status callbacks {' '.join(statuses)}"
        )
    return lines


def ok(lines: list[str]) -> bool:
    text = "\n".join(lines)
    return "the agent spoke first" in text and "reason not_allowed" in text


def main(out_dir: Path | None = None) -> int:
    """Run the policy part of the demo; 0 when both calls went as expected."""
    lines = interrupt.run(run_policy_demo)
    print("\n".join(lines))
    good = ok(lines)
    print(
        "\nOK: the outbound call was answered by its agent and the stranger was rejected"
        if good
        else "\nFAILED: the policy demo did not go as expected"
    )
    return 0 if good else 1
