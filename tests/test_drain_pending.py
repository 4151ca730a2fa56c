"""Graceful drain and calls answered just before SIGTERM (relay/http/drain.py): their TwiML
is on its way to Twilio, their media stream not connected yet. The drain waits for them
(bounded by its timeout) and lets their streams in, while new webhooks are refused."""

from __future__ import annotations

from typing import Any

import trio
from conftest import ACCOUNT_SID

from relay.http.drain import drain


async def start_drain(relay_: Any, timeout_s: float) -> dict[str, int]:
    counts: dict[str, int] = {}

    async def run() -> None:
        counts.update(await drain(relay_.server, timeout_s=timeout_s))

    relay_.nursery.start_soon(run)
    await relay_.wait_until(lambda: relay_.state.draining)
    return counts


async def test_a_call_answered_before_the_drain_gets_its_stream(start_relay, make_config, e2e):
    relay_ = await start_relay(make_config())
    with trio.fail_after(15):
        answered = e2e.sid("CA")
        response, twiml = await relay_.voice(answered)
        assert response.status == 200 and twiml is not None and twiml.stream_url
        assert relay_.state.policies.awaiting_stream() == 1
        counts = await start_drain(relay_, timeout_s=10.0)
        # new webhooks are refused meanwhile
        _response, refused = await relay_.voice(e2e.sid("CA"))
        assert refused is not None and refused.verbs == ["Reject"]
        await trio.sleep(0.3)  # several rounds of the drain's loop: it is still waiting
        assert not counts
        # Twilio opens the answered call's stream now: let in, the call runs
        fake = await relay_.connect(answered, twiml)
        await relay_.wait_record(answered, "active")
        assert relay_.state.policies.awaiting_stream() == 0
        await fake.send_media(b"\xff" * 1600)
        await fake.hang_up()
        await relay_.wait_until(lambda: bool(counts))
    assert counts == {"finished": 1, "ended": 0}
    assert relay_.records(answered).end_reason == "caller hung up"


async def test_the_wait_for_a_stream_is_bounded(start_relay, make_config, e2e):
    """A stream that never comes holds the drain no longer than its timeout; a terminal
    status callback (the caller hung up while Twilio read the TwiML) ends the wait."""
    relay_ = await start_relay(make_config())
    with trio.fail_after(15):
        _response, twiml = await relay_.voice(e2e.sid("CA"))
        assert twiml is not None and twiml.stream_url
        counts = await start_drain(relay_, timeout_s=0.5)
        await relay_.wait_until(lambda: bool(counts), timeout=10)
    assert counts == {"finished": 0, "ended": 0}

    relay2 = await start_relay(make_config())
    with trio.fail_after(15):
        call_sid = e2e.sid("CA")
        _response, twiml = await relay2.voice(call_sid)
        assert twiml is not None and twiml.stream_url
        counts = await start_drain(relay2, timeout_s=60.0)
        status = {
            "CallSid": call_sid,
            "AccountSid": ACCOUNT_SID,
            "CallStatus": "completed",
            "SequenceNumber": "1",
        }
        answer = await relay2.post_form("/twilio/status", status)
        assert answer.status == 204
        await relay2.wait_until(lambda: bool(counts), timeout=10)  # not the 60 s bound
    assert counts == {"finished": 0, "ended": 0}
