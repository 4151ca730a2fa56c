"""End to end, issue 11 for OpenAI Realtime: with ``reconnect = true`` a lost agent
connection (dropped, or found dead by the liveness watchdog) is replaced by a new Realtime
session seeded with the conversation so far, and the call goes on; without it, or when no
session comes back within ``reconnect_timeout_s``, the call ends with "agent
disconnected". A real relay on loopback, the fake Twilio (conftest) and
tests/fake_openai.py as the agent."""

from __future__ import annotations

from functools import partial

import pytest
import trio
from agent_harness import keep_talking
from fake_openai import fake_openai_server

GREETING = "Welcome to Acme."
LONG_REPLY = "Let me check the calendar for tonight and tomorrow evening, one moment please."


async def gpt_relay(start_relay, make_config, e2e, oai, *, media=None, **agent_extra):
    cfg = make_config(
        agents={"gpt": e2e.openai_agent(oai, **agent_extra)},
        default_agent="gpt",
        media=media or {},
    )
    return await start_relay(cfg)


@pytest.mark.parametrize("how", ["drop", "stall", "vanish"])
async def test_lost_openai_agent_continues_in_a_seeded_session(
    start_relay, make_config, e2e, nursery, how
):
    """Greeting, a caller turn, a reply the caller interrupts; then the agent connection
    is lost (TCP dropped; or the peer stops reading, found by the default liveness
    settings). Within 5 s a new session has the same configuration and the conversation so
    far as text items (the interrupted reply cut to what the caller heard), no second
    greeting; caller audio reaches it and its replies reach the caller."""
    with trio.fail_after(30):
        async with fake_openai_server(response_ms=300, response_transcript=GREETING) as oai:
            relay_ = await gpt_relay(
                start_relay,
                make_config,
                e2e,
                oai,
                greeting=GREETING,
                instructions="Be brief.",
                transcription_model="gpt-4o-transcribe",
                tools=["get_time"],
                reconnect=True,
            )
            fake = await relay_.dial()
            first = await e2e.agent_session(oai)
            await fake.wait_for(lambda f: f.played_ms >= 300)  # the greeting was heard
            user = await first.speech_started()  # nothing playing: not a barge-in
            await first.speech_stopped(user)
            await first.caller_transcript("Book a table for two.", user)
            # generated faster than real time; the caller interrupts it
            nursery.start_soon(
                partial(first.send_response, 3000, transcript=LONG_REPLY, pace_s=0.05)
            )
            await fake.wait_for(lambda f: f.played_ms >= 300 + 500)
            await first.speech_started()
            await first.wait_for(lambda s: len(s.truncates) == 1)
            nursery.start_soon(keep_talking, fake)
            await first.wait_for(lambda s: s.appends >= 10)
            if how == "drop":
                await first.abort()
            elif how == "stall":
                first.stall()
            else:
                first.vanish()
            with trio.fail_after(5):  # dead within 3 s, a new session within 2 s more
                second = await e2e.agent_session(oai, 1)
                await second.wait_for(lambda s: len(s.items_created) >= 3)
            (heard_text,) = [t for r, t in second.items_seeded[2:] if r == "assistant"]
            assert second.items_seeded == [
                ("assistant", GREETING),
                ("user", "Book a table for two."),
                ("assistant", heard_text),
            ]
            # cut to what was heard: a shorter start of the reply, whole words
            assert heard_text.endswith("…") and LONG_REPLY.startswith(heard_text[:-1])
            assert len(heard_text) < len(LONG_REPLY)
            assert not second.item_errors
            # no second greeting: no response.create, no greeting prompt
            assert not second.response_creates
            update, original = second.session_updates[0], first.session_updates[0]
            assert update["instructions"].startswith("Be brief.\n\n")
            assert "Do not greet the caller again" in update["instructions"]
            for key in ("audio", "tools", "tool_choice", "type", "model"):
                assert update[key] == original[key]
            await second.wait_for(lambda s: s.appends >= 10)  # caller audio flows again
            heard = len(fake.audio)
            await second.send_response(300, transcript="At what time?")
            await fake.wait_for(lambda f: len(f.audio) >= heard + 300 * 8)
            assert fake.closed is None and len(oai.sessions) == 2
            await fake.hang_up()
            await relay_.wait_idle()
            record = relay_.records(fake.call_sid)
            assert record.end_reason == "caller hung up"
            assert not relay_.metrics.errors
            assert relay_.metrics.agent_reconnects == {"OpenAIRealtimeAgent": 1}
            assert 'relay_agent_reconnects_total{adapter="OpenAIRealtimeAgent"} 1' in (
                relay_.metrics.render()
            )
            assert {"role": "agent", "text": "At what time?"}.items() <= record.transcript[
                -1
            ].items()


@pytest.mark.parametrize("reactor", [True, False], ids=["reactor", "task-per-socket"])
async def test_dropped_openai_agent_without_reconnect_ends_the_call(
    start_relay, make_config, e2e, nursery, reactor
):
    with trio.fail_after(15):
        async with fake_openai_server() as oai:
            relay_ = await gpt_relay(start_relay, make_config, e2e, oai, media={"reactor": reactor})
            fake = await relay_.dial()
            session = await e2e.agent_session(oai)
            nursery.start_soon(keep_talking, fake)
            await session.wait_for(lambda s: s.appends >= 5)
            await session.abort()
            closed = await fake.wait_closed(5)
            assert closed.code == 1000
            await relay_.wait_idle()
            assert relay_.records(fake.call_sid).end_reason == "agent disconnected"
            assert relay_.metrics.errors["agent_disconnected"] == 1
            assert sum(relay_.metrics.errors.values()) == 1
            assert len(oai.sessions) == 1  # no new session was tried


async def test_openai_recovery_that_fails_ends_the_call(start_relay, make_config, e2e, nursery):
    """reconnect is on but no new session can be had (the handshake is refused): the call
    ends with "agent disconnected" once ``reconnect_timeout_s`` has passed, counted once."""
    with trio.fail_after(15):
        async with fake_openai_server() as oai:
            relay_ = await gpt_relay(
                start_relay, make_config, e2e, oai, reconnect=True, reconnect_timeout_s=1
            )
            fake = await relay_.dial()
            session = await e2e.agent_session(oai)
            nursery.start_soon(keep_talking, fake)
            await session.wait_for(lambda s: s.appends >= 5)
            oai.options.reject_status = 503
            await session.abort()
            await fake.wait_closed(5)
            await relay_.wait_idle()
            assert relay_.records(fake.call_sid).end_reason == "agent disconnected"
            assert relay_.metrics.errors["agent_disconnected"] == 1
            assert sum(relay_.metrics.errors.values()) == 1
            assert oai.rejected and all(r["status"] == 503 for r in oai.rejected)
