"""``relay demo``'s policy part (relay/sim/policy_demo.py): an outbound call placed through
``POST /api/v1/calls`` and the minimal local Twilio REST API (relay/sim/rest.py), and a
caller rejected by ``allowed_callers``, all offline."""

from __future__ import annotations

import trio

from relay.sim import policy_demo


async def test_policy_demo_places_an_outbound_call_and_rejects_a_stranger() -> None:
    with trio.fail_after(60):
        lines = await policy_demo.run_policy_demo()
    text = "\n".join(lines)
    assert policy_demo.ok(lines), text
    assert "-> 201" in text
    assert "initiated -> ringing -> in-progress -> completed" in text
    assert "relay: outbound-api, completed (caller hung up)" in text
    assert "Twilio got: reject (busy)" in text
    assert "relay: rejected, reason not_allowed; agent sessions opened: 0" in text
