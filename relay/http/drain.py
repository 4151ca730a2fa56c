"""Graceful drain: what ``relay serve`` does on SIGTERM (a deploy, a scale-down).

1. Stop taking calls: new voice webhooks are answered ``<Reject reason="busy"/>``, recorded
   as rejected with reason ``draining``; ``POST /api/v1/calls`` answers 503 ``draining``;
   ``/healthz`` answers 503 ``{"status": "draining"}`` so a load balancer moves on. The
   port stays open: streams of calls already answered, status callbacks and the
   ``<Connect action>`` requests of ending calls still need it.
2. Let the active calls finish, for at most ``server.drain_timeout_s``. Calls the voice
   webhook answered just before (their TwiML is on its way, their stream not connected
   yet) count as active: their streams are let in and those calls run like the others,
   within the same bound (``CallPolicies.awaiting_stream``).
3. End the rest: each call's stream is closed with end reason ``drained``; an agent with
   a ``fallback_message`` has it said by Twilio (the same ``<Connect action>`` path as at
   the ``max_call_seconds`` cap), so nobody is cut off mid-sentence without a word. Relay
   waits (bounded) for those ``<Connect action>`` requests and for post-call webhooks in
   flight.
4. Stop: recordings and call history are flushed, the process exits 0.

A second SIGTERM during the drain stops at once (SIGINT, Ctrl-C, stops at once anyway).
"""

from __future__ import annotations

import logging
import signal

import trio

from ..config import Config
from .server import RelayServer

log = logging.getLogger("relay.http.drain")

__all__ = ["END_REASON", "drain", "serve_until_signalled"]

END_REASON = "drained"
#: after ending the last calls: how long to wait for Twilio's <Connect action> requests
ACTION_WAIT_S = 10.0
#: ... and for post-call webhooks in flight
POSTCALL_WAIT_S = 5.0


async def drain(server: RelayServer, timeout_s: float | None = None) -> dict[str, int]:
    """Stop taking calls, wait for the active ones (bounded), end the rest. Returns counts:
    ``finished`` (ended on their own) and ``ended`` (ended by the drain)."""
    state = server.state
    timeout = server.cfg.server.drain_timeout_s if timeout_s is None else timeout_s
    state.draining = True
    pending = state.policies.awaiting_stream()
    # calls whose stream has started, now and (calls_total) from now on: the drain's count
    started = sum(1 for c in state.calls if c.record is not None) + len(state.speech_sessions)
    calls_total = state.metrics.calls_total
    log.info(
        "draining: no new calls; %d active, %d answered awaiting their stream, waiting up to %g s",
        len(state.calls),
        pending,
        timeout,
    )
    with trio.move_on_after(timeout):
        while state.calls or state.speech_sessions or state.policies.awaiting_stream():
            await trio.sleep(0.05)  # streams of answered calls still come in
    ended: list[str] = []

    def end_the_rest() -> None:
        for call in [c for c in state.calls if not c._finished]:
            if call.plan is not None:
                state.policies.ended_at_cap(call.call_sid)  # -> fallback_message, if any
            call._end(END_REASON)
            ended.append(call.call_sid)
        for session in list(state.speech_sessions):
            # ConversationRelay: ``end`` -> Twilio asks the <Connect action> (goodbye, hang up)
            if session.end_now(END_REASON):
                ended.append(session.call_sid)

    end_the_rest()
    if ended:
        log.info("draining: ended %d call(s) still active after %g s", len(ended), timeout)
    with trio.move_on_after(ACTION_WAIT_S):
        while (
            state.calls
            or state.speech_sessions
            or any(sid in state.policies.after_stream for sid in ended)
        ):
            end_the_rest()  # a stream that arrived past the bound ends at once too
            await trio.sleep(0.05)
    with trio.move_on_after(POSTCALL_WAIT_S):
        while state.postcall.pending:
            await trio.sleep(0.05)
    started += state.metrics.calls_total - calls_total
    counts = {"finished": max(0, started - len(ended)), "ended": len(ended)}
    log.info("drained: %(finished)d call(s) finished, %(ended)d ended", counts)
    return counts


async def serve_until_signalled(cfg: Config) -> None:
    """``relay serve``: run the relay; on SIGTERM drain it, then return (exit status 0)."""
    server = RelayServer(cfg)
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            async for _ in signals:
                log.info("SIGTERM: draining")
                break
            async with trio.open_nursery() as draining:

                async def second_signal() -> None:
                    async for _ in signals:
                        log.warning("second signal: stopping without waiting")
                        draining.cancel_scope.cancel()
                        return

                draining.start_soon(second_signal)
                await drain(server)
                draining.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
