"""Post-call webhook (``post_call_webhook``): the call record and transcript, POSTed when the
call ends, signed, retried with exponential backoff, every attempt kept in the record.

::

    POST {post_call_webhook}
    Content-Type: application/json
    X-Relay-Event: call.completed
    X-Relay-Delivery: <id, the same for every attempt of one call: deduplicate on it>
    X-Relay-Attempt: <1, 2, ...>
    X-Relay-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>

    {"event": "call.completed", "delivery_id": "…", "call": {<the record, as
     GET /api/v1/calls/{sid} shows it>}, "transcript": [...]}

The secret is the tenant's (relay/control/signing.py); each attempt is signed anew.

Sent for every call that had a media stream (whatever ended it), for outbound calls
that ended without one (``busy``, ``no-answer``, ``failed``, ``canceled``), and for calls
refused at the voice webhook (``status`` ``rejected``, ``reject_reason`` such as
``not_allowed``, ``concurrent_limit``, ``draining``, ``overloaded``, and ``end_reason``).
A call that records is sent once its file is finished (at most :data:`RECORDING_WAIT_S`),
so the record carries the recording's final size.

Delivery: an answer 2xx is delivered. Timeouts (:data:`ATTEMPT_TIMEOUT_S` each),
connection failures, 408, 429 and 5xx are retried, ``calls.post_call_backoff_s`` after the
first attempt, doubling each time, for at most ``calls.post_call_attempts`` attempts in
all (default 5: 2, 4, 8, 16 s apart). Other 4xx answers and refused (private) targets are
final. The record's ``post_call_webhook`` holds ``url`` (query string masked),
``delivery_id``, ``outcome`` (``pending``, ``delivered``, ``failed``, ``refused``,
``dropped``) and ``attempts``: ``[{attempt, at, outcome, status, ms, detail}]``; the
history is saved after each. Deliveries live in this process: those still pending when it
exits are abandoned (the record says ``pending``).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
import trio

from . import outgoing, signing
from .features import CallFeatures
from .history import record_values
from .store import call_json

if TYPE_CHECKING:
    from ..records import CallRecord
    from ..state import RelayState

log = logging.getLogger("relay.control.postcall")

__all__ = ["PostCallSender", "build_body", "retryable"]

EVENT = "call.completed"
ATTEMPT_TIMEOUT_S = 10.0
RECORDING_WAIT_S = 5.0
MAX_ATTEMPTS = 10
#: deliveries in progress at once, all calls together; beyond, a delivery is dropped
MAX_PENDING = 2000

Send = Callable[..., Awaitable[outgoing.Answer]]


def retryable(answer: outgoing.Answer) -> bool:
    if answer.kind in ("timeout", "error"):
        return True
    status = answer.status or 0
    return answer.kind == "ok" and (status >= 500 or status in (408, 429))


def build_body(record: CallRecord, delivery_id: str) -> bytes:
    values = record_values(record, record.tenant_id)
    values["status_callbacks"] = list(record.status_callbacks)
    call = call_json(values)
    call.pop("post_call_webhook", None)  # its own delivery state: not part of the call
    return orjson.dumps(
        {
            "event": EVENT,
            "delivery_id": delivery_id,
            "call": call,
            "transcript": list(record.transcript),
        }
    )


class PostCallSender:
    """The process's post-call deliveries (``RelayState.postcall``)."""

    def __init__(self, state: RelayState, *, send: Send = outgoing.post) -> None:
        self.state = state
        self.send = send
        self._nursery: trio.Nursery | None = None
        self._seen: dict[str, None] = {}  # CallSids already submitted (ordered set, bounded)
        self.pending = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def submit(self, record: CallRecord, features: CallFeatures) -> bool:
        """The call of ``record`` ended: deliver it if its agent has a webhook (once)."""
        url = features.post_call_webhook
        if not url or record.call_sid in self._seen:
            return False
        self._seen[record.call_sid] = None
        if len(self._seen) > 10_000:
            del self._seen[next(iter(self._seen))]
        delivery_id = "dlv_" + secrets.token_hex(12)
        record.post_call_webhook = {
            "url": outgoing.display_url(url),
            "delivery_id": delivery_id,
            "outcome": "pending",
            "attempts": [],
        }
        if self._nursery is None or self.pending >= MAX_PENDING:
            record.post_call_webhook["outcome"] = "dropped"
            self.state.metrics.error("post_call_backlog")
            log.error("call %s: post-call webhook dropped (sender busy)", record.call_sid)
            self._save(record)
            return False
        self.pending += 1
        self._nursery.start_soon(self._deliver, record, url, features, delivery_id)
        return True

    def submit_rejected(self, record: CallRecord) -> bool:
        """A call refused at the voice webhook (``<Reject>``: ``allowed_callers``, a limit,
        draining, overload): deliver it too, its ``status`` ``rejected`` with the
        ``reject_reason`` and ``end_reason``. Its agent's options are looked up here, off
        the webhook's path (a refusal may come before the agent is known)."""
        if self._nursery is None or record.call_sid in self._seen:
            return False
        if self.pending >= MAX_PENDING:
            self.state.metrics.error("post_call_backlog")
            return False
        self.pending += 1
        self._nursery.start_soon(self._rejected, record)
        return True

    async def _rejected(self, record: CallRecord) -> None:
        from ..errors import RelayError
        from .policies import CallPolicy

        directory = self.state.control.directory
        try:
            if record.agent:
                route = await directory.agent(record.tenant_id, record.agent)
            elif record.direction.startswith("outbound"):
                return  # placed by another process: its To is the callee, not our number
            else:
                route = await directory.route(record.tenant_id, record.to_number)
        except RelayError as exc:
            log.warning("call %s: rejected call not reported: %s", record.call_sid, exc)
            return
        finally:
            self.pending -= 1
        if route is not None:
            record.agent = record.agent or route.agent  # the agent that would have answered
            self.submit(record, CallPolicy.lenient(route.options).features)

    def _save(self, record: CallRecord) -> None:
        history = self.state.control.history
        if history is not None:
            history.save(record, record.tenant_id)

    async def _deliver(
        self, record: CallRecord, url: str, features: CallFeatures, delivery_id: str
    ) -> None:
        try:
            with trio.move_on_after(RECORDING_WAIT_S):
                while record.recording.get("status") == "recording":
                    await trio.sleep(0.05)
            await self.deliver(record, url, features, delivery_id)
        finally:
            self.pending -= 1

    async def deliver(
        self, record: CallRecord, url: str, features: CallFeatures, delivery_id: str
    ) -> str:
        """Every attempt of one delivery; returns the final outcome."""
        cfg = self.state.cfg
        body = build_body(record, delivery_id)
        state = record.post_call_webhook
        attempts = max(1, min(MAX_ATTEMPTS, int(cfg.calls.post_call_attempts)))
        delay = max(0.0, float(cfg.calls.post_call_backoff_s))
        allow_private = outgoing.private_allowed(cfg, record.tenant_id, record.agent, features)
        outcome = "failed"
        for attempt in range(1, attempts + 1):
            headers = {
                "Content-Type": "application/json",
                "X-Relay-Event": EVENT,
                "X-Relay-Delivery": delivery_id,
                "X-Relay-Attempt": str(attempt),
            }
            headers.update(await signing.headers_for(self.state, record.tenant_id, body))
            answer = await self.send(
                url, body, headers, timeout_s=ATTEMPT_TIMEOUT_S, allow_private=allow_private
            )
            entry: dict[str, Any] = {
                "attempt": attempt,
                "at": round(time.time(), 3),
                "outcome": "delivered" if answer.success else answer.kind,
                "ms": answer.ms,
            }
            if answer.status is not None:
                entry["status"] = answer.status
            if answer.detail:
                entry["detail"] = answer.detail[:200]
            state["attempts"].append(entry)
            if answer.success:
                outcome = "delivered"
            elif answer.kind == "refused":
                outcome = "refused"
            elif attempt < attempts and retryable(answer):
                state["next_attempt_in_s"] = delay
                self._save(record)
                await trio.sleep(delay)
                delay *= 2
                continue
            break
        state.pop("next_attempt_in_s", None)
        state["outcome"] = outcome
        self._save(record)
        if outcome != "delivered":
            self.state.metrics.error(f"post_call_{outcome}")
            log.warning(
                "call %s: post-call webhook %s %s after %d attempt(s)",
                record.call_sid,
                outgoing.display_url(url),
                outcome,
                len(state["attempts"]),
            )
        return outcome


async def call_ended(state: RelayState, record: CallRecord, features: CallFeatures | None) -> None:
    """Hook: a call ended; ``features`` of its agent when known (else looked up)."""
    if features is None:
        from .policies import CallPolicy

        route = await state.control.directory.agent(record.tenant_id, record.agent)
        if route is None:
            return
        features = CallPolicy.lenient(route.options).features
    state.postcall.submit(record, features)
