"""Transfer to a human: redirect a live call to ``<Dial>`` one of the agent's targets.

Two ways in, one path: the built-in tool ``transfer_call`` (the agent asks; announce it with
``tools = ["transfer_call"]``) and ``POST /api/v1/calls/{sid}/transfer {"to"}``. The target
must be in the agent's ``transfer_to`` list (compared as E.164). relay then

1. marks the call's end reason ``transferred`` (Twilio stops the stream as soon as the
   redirect lands, before its REST answer reaches relay),
2. updates the call through the REST API with
   ``Twiml=<Response><Dial callerId="{the Twilio number}">{target}</Dial></Response>``
   (the Twilio number: ``To`` of an inbound call, ``From`` of an outbound one),
3. closes the agent session (the call's nursery ends; the record says ``transferred``).

From the tool, relay first lets the agent's last words play (the downlink buffer drains
to its last mark, at most :data:`DRAIN_BOUND_S`). A Twilio error is reported with its code
and kept in the record's ``events``; the call then goes on with its agent.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson
import trio
from twilio.twiml.voice_response import Dial, VoiceResponse

from ..records import CallRecord
from . import tenancy
from .outbound import OutboundError, _event, _note, _owned_record, _twilio_failure, live_call
from .phone import normalize_e164
from .policies import CallPolicy
from .twilio_rest import TwilioRestError

if TYPE_CHECKING:
    from ..state import RelayState

log = logging.getLogger("relay.control.transfer")

TOOL_NAME = "transfer_call"
TOOL_DESCRIPTION = (
    "Transfer the caller to a human at one of the allowed numbers. Say goodbye first: "
    "the call leaves you once the transfer starts."
)
TOOL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "to": {"type": "string", "description": "the E.164 number to transfer to"},
    },
    "required": ["to"],
}
#: how long the tool waits for the agent's last words to play before redirecting
DRAIN_BOUND_S = 5.0
END_REASON = "transferred"


def tool_placeholder(args: dict[str, Any]) -> str:
    """The registry entry of ``transfer_call`` (schema for the model); a call runs the real
    one (:func:`run_tool`), so this only answers outside of a call."""
    return orjson.dumps({"error": "transfer_call works only during a call"}).decode()


def dial_twiml(target: str, caller_id: str) -> str:
    response = VoiceResponse()
    dial = Dial(caller_id=caller_id) if caller_id else Dial()
    dial.number(target)
    response.append(dial)
    return str(response)


def twilio_number(record: CallRecord) -> str:
    """The relay's side of the call: the number called (inbound) or calling (outbound)."""
    return record.from_number if record.direction.startswith("outbound") else record.to_number


async def _policy(state: RelayState, record: CallRecord) -> CallPolicy:
    live = live_call(state, record.call_sid)
    if live is not None and live.plan is not None:
        return live.plan.policy  # type: ignore[no-any-return]
    route = await state.control.directory.agent(record.tenant_id, record.agent)
    return CallPolicy.lenient(route.options) if route is not None else CallPolicy()


async def transfer(
    state: RelayState, tenant_id: str, call_sid: str, to: Any, *, via: str = "api"
) -> dict[str, Any]:
    """Redirect the live call ``call_sid`` to ``<Dial>to</Dial>``; OutboundError otherwise."""
    record = await _owned_record(state, tenant_id, call_sid)
    if record is None:
        raise OutboundError(409, "not_live", "the call is not live in this relay")
    target = normalize_e164(to) if isinstance(to, str) else None
    policy = await _policy(state, record)
    if target is None or target not in policy.transfer_to:
        allowed = ", ".join(policy.transfer_to) or "none"
        raise OutboundError(
            400,
            "invalid_field",
            f"to: not one of the agent's transfer_to numbers ({allowed})",
            "to",
        )
    try:
        account = await tenancy.tenant_twilio(state.cfg, state.control.store, tenant_id)
    except tenancy.NotConfigured as exc:
        raise OutboundError(409, "not_configured", str(exc)) from None
    live = live_call(state, call_sid)
    if live is not None and not live.end_reason:
        live.end_reason = END_REASON
    twiml = dial_twiml(target, twilio_number(record))
    async with account.client(state.cfg) as rest:
        try:
            answer = await rest.update_call(call_sid, Twiml=twiml)
        except TwilioRestError as exc:
            if live is not None and live.end_reason == END_REASON:
                live.end_reason = ""
            failure = {"twilio_code": exc.code, "message": exc.message[:200]}
            _note(state, record, _event("transfer", "failed", to=target, via=via, **failure))
            if exc.code == 21220 or exc.kind == "twilio_not_found":
                raise OutboundError(
                    409, "not_in_progress", f"Twilio: {exc.message}", twilio_code=exc.code
                ) from None
            raise _twilio_failure(exc, "transfer the call") from None
    _note(state, record, _event("transfer", "ok", to=target, via=via))
    log.info("call %s transferred to %s (%s)", call_sid, target, via)
    if live is not None:
        live._end(END_REASON)  # closes the agent session with the call
    return {
        "call_sid": call_sid,
        "to": target,
        "result": END_REASON,
        "twilio_status": answer.get("status", ""),
    }


async def run_tool(call: Any, arguments: str) -> str:
    """``transfer_call`` as the agent calls it from inside a call (``call``: the Call)."""
    try:
        args = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        args = None
    if not isinstance(args, dict):
        return orjson.dumps({"error": "arguments must be a JSON object"}).decode()
    with trio.move_on_after(DRAIN_BOUND_S):  # let the agent's goodbye play first
        while not call.downlink.idle:
            await trio.sleep(0.02)
    try:
        result = await transfer(
            call.state, call.tenant_id, call.call_sid, args.get("to"), via="tool"
        )
    except OutboundError as exc:
        return orjson.dumps({"error": exc.message}).decode()
    return orjson.dumps({"transferred": True, "to": result["to"]}).decode()
