"""Outbound calls: relay asks Twilio to place a call that an agent answers once picked up.

Placing (``POST /api/v1/calls``, ``relay call``): the request is checked first (``to``
E.164, ``from`` one of the tenant's numbers, the agent exists, a greeting override the
agent accepts, a cap, machine detection), then Twilio's REST API creates the call with

* ``Url = {public_url}/twilio/voice?ctx=…``: the outbound context (tenant, agent,
  greeting override, cap) as a signed, expiring token in the query string. Twilio signs
  the full URL, query included, so the voice webhook checks both Twilio's signature and
  relay's own HMAC (``security.token_secret``: set it when ``relay call`` or several
  processes place calls, as for stream tokens);
* ``StatusCallback = {public_url}/twilio/status`` with the events ``initiated ringing
  answered completed``; ``TimeLimit`` = cap + :data:`TIME_LIMIT_MARGIN_S` as Twilio's own
  backstop (relay ends the call at the cap itself, leaving time for the fallback
  message); ``MachineDetection`` when asked (``AnsweredBy`` lands in the record).

The record exists from creation (``direction`` ``outbound-api``, status ``initiated``) and
the status callbacks drive it (:func:`on_status`): ``ringing``, ``in-progress``, then the
stream makes it ``active``; ``busy``, ``no-answer``, ``failed``, ``canceled`` end it with
that reason and end any agent session opened for it. A live call is hung up with
``update_call(Status=completed)`` (:func:`hang_up`); Twilio answering 404/20404 means it
had already ended. Every REST outcome is kept in the record's ``events``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from ..agents.registry import validate_agent
from ..config import Config
from ..errors import ConfigError, RelayError
from ..records import CallRecord
from . import tenancy
from .directory import Directory
from .phone import is_e164, normalize_e164
from .policies import MAX_CALL_SECONDS, CallPolicy
from .store import Store
from .twilio_rest import TwilioRestError

if TYPE_CHECKING:
    from ..state import RelayState

log = logging.getLogger("relay.control.outbound")

__all__ = [
    "CONTEXT_PARAM",
    "OutboundContext",
    "OutboundError",
    "OutboundRequest",
    "hang_up",
    "on_status",
    "place",
    "prepare",
]

CONTEXT_PARAM = "ctx"
#: Twilio's TimeLimit = relay's cap + this: room for the fallback message, never the cap
TIME_LIMIT_MARGIN_S = 30
#: how long the signed context stays valid: queued + ringing (Timeout <= 600 s) + margin
CONTEXT_TTL_S = 900
STATUS_EVENTS = ["initiated", "ringing", "answered", "completed"]
PRE_STREAM = ("incoming", "initiated", "ringing", "in-progress")
FAILED_STATUSES = ("busy", "no-answer", "failed", "canceled")
MACHINE_DETECTION = {True: "Enable", "Enable": "Enable", "DetectMessageEnd": "DetectMessageEnd"}
MAX_GREETING_CHARS = 2000


class OutboundError(RelayError):
    """A request to place, hang up or transfer refused; ``field`` names the bad input."""

    kind = "outbound"

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str = "",
        twilio_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.twilio_code = twilio_code


# --- the signed context -------------------------------------------------------------------
@dataclass(frozen=True)
class OutboundContext:
    tenant_id: str
    agent: str
    greeting: str | bool | None = None
    max_call_seconds: float | None = None

    def overrides(self) -> dict[str, Any]:
        return {} if self.greeting is None else {"greeting": self.greeting}


def _mac(secret: bytes, payload: str) -> str:
    digest = hmac.new(secret, b"outbound-v1|" + payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:24]).decode().rstrip("=")


def sign_context(secret: bytes, ctx: OutboundContext, now: float | None = None) -> str:
    body = {"t": ctx.tenant_id, "a": ctx.agent, "x": int((now or time.time()) + CONTEXT_TTL_S)}
    if ctx.greeting is not None:
        body["g"] = ctx.greeting
    if ctx.max_call_seconds is not None:
        body["m"] = ctx.max_call_seconds
    payload = base64.urlsafe_b64encode(orjson.dumps(body)).decode().rstrip("=")
    return f"{payload}.{_mac(secret, payload)}"


def verify_context(secret: bytes, token: str, now: float | None = None) -> OutboundContext | None:
    """The context of a token relay signed and that has not expired; None otherwise."""
    payload, _, mac = token.partition(".")
    if not payload or not mac or len(token) > 4096:
        return None
    if not hmac.compare_digest(mac, _mac(secret, payload)):
        return None
    try:
        body = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        return None
    if not isinstance(body, dict) or body.get("x", 0) < (now or time.time()):
        return None
    return OutboundContext(
        str(body.get("t", "")), str(body.get("a", "")), body.get("g"), body.get("m")
    )


# --- placing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutboundRequest:
    tenant_id: str
    to: str
    from_: str
    agent: str
    greeting: str | bool | None
    max_call_seconds: float
    machine_detection: str | None
    account: tenancy.TenantTwilio


async def prepare(
    cfg: Config, store: Store | None, directory: Directory, tenant_id: str, body: Mapping[str, Any]
) -> OutboundRequest:
    """Check a request to place a call; :class:`OutboundError` names the first bad field.
    Nothing is sent to Twilio here."""
    for name in ("to", "from", "agent"):
        if not isinstance(body.get(name), str) or not body.get(name):
            raise OutboundError(400, "missing_field", f"{name} is required", name)
    to = normalize_e164(body["to"])
    if to is None or not is_e164(to):
        raise OutboundError(400, "invalid_field", "to: not an E.164 phone number", "to")
    from_ = normalize_e164(body["from"]) or ""
    try:
        account = await tenancy.tenant_twilio(cfg, store, tenant_id)
    except tenancy.NotConfigured as exc:
        raise OutboundError(409, "not_configured", str(exc)) from None
    if from_ not in account.numbers:
        raise OutboundError(
            400, "invalid_field", "from: not one of this tenant's Twilio numbers", "from"
        )
    route = await directory.agent(tenant_id, body["agent"])
    if route is None:
        raise OutboundError(400, "invalid_field", f"no agent {body['agent']!r}", "agent")
    greeting = body.get("greeting")
    if greeting is not None:
        if not isinstance(greeting, str | bool) or (
            isinstance(greeting, str) and len(greeting) > MAX_GREETING_CHARS
        ):
            raise OutboundError(
                400, "invalid_field", f"greeting: text of at most {MAX_GREETING_CHARS}", "greeting"
            )
        try:  # the adapter decides what a greeting may be (text, or the parrot's chime)
            validate_agent({**route.options, "greeting": greeting}, where="call")
        except ConfigError as exc:
            raise OutboundError(400, "invalid_field", str(exc), "greeting") from None
    policy = CallPolicy.lenient(route.options)
    max_s = body.get("max_call_seconds")
    if max_s is None:
        max_s = policy.max_call_seconds
    elif (
        isinstance(max_s, bool)
        or not isinstance(max_s, int | float)
        or not 1 <= max_s <= MAX_CALL_SECONDS
    ):
        raise OutboundError(
            400,
            "invalid_field",
            f"max_call_seconds: a number from 1 to {MAX_CALL_SECONDS:g}",
            "max_call_seconds",
        )
    amd = body.get("machine_detection")
    if amd in (None, False):
        machine_detection = None
    elif amd in MACHINE_DETECTION:
        machine_detection = MACHINE_DETECTION[amd]
    else:
        raise OutboundError(
            400,
            "invalid_field",
            'machine_detection: true, "Enable" or "DetectMessageEnd"',
            "machine_detection",
        )
    return OutboundRequest(
        tenant_id,
        to,
        from_,
        route.agent,
        greeting,
        float(max_s),
        machine_detection,
        account,
    )


def twilio_params(cfg: Config, req: OutboundRequest) -> dict[str, str | list[str]]:
    ctx = OutboundContext(req.tenant_id, req.agent, req.greeting, req.max_call_seconds)
    token = sign_context(cfg.token_secret_bytes(), ctx)
    params: dict[str, str | list[str]] = {
        "To": req.to,
        "From": req.from_,
        "Url": f"{cfg.public_url}/twilio/voice?{CONTEXT_PARAM}={token}",
        "Method": "POST",
        "StatusCallback": f"{cfg.public_url}/twilio/status",
        "StatusCallbackMethod": "POST",
        "StatusCallbackEvent": list(STATUS_EVENTS),
        "TimeLimit": str(min(86400, math.ceil(req.max_call_seconds) + TIME_LIMIT_MARGIN_S)),
    }
    if req.machine_detection:
        params["MachineDetection"] = req.machine_detection
    return params


def _twilio_failure(exc: TwilioRestError, what: str) -> OutboundError:
    code = f" (Twilio {exc.code})" if exc.code else ""
    return OutboundError(
        502 if exc.kind not in ("twilio_rejected",) else 400,
        exc.kind,
        f"Twilio refused to {what}{code}: {exc.message}",
        twilio_code=exc.code,
    )


def _event(action: str, result: str, **extra: Any) -> dict[str, Any]:
    return {"t": round(time.time(), 3), "action": action, "result": result, **extra}


async def place(cfg: Config, req: OutboundRequest) -> CallRecord:
    """Create the call through Twilio; the record as of creation (not yet registered)."""
    async with req.account.client(cfg) as rest:
        try:
            call = await rest.create_call(twilio_params(cfg, req))
        except TwilioRestError as exc:
            log.warning("outbound call to %s not placed: %s", req.to, exc)
            raise _twilio_failure(exc, "place the call") from None
    sid = str(call.get("sid", ""))
    if not sid.startswith("CA"):
        raise OutboundError(502, "twilio_bad_response", "Twilio answered without a CallSid")
    record = CallRecord(
        sid,
        tenant_id=req.tenant_id,
        account_sid=req.account.account_sid,
        from_number=req.from_,
        to_number=req.to,
        direction="outbound-api",
        agent=req.agent,
        status="initiated",
    )
    record.events.append(_event("place", "ok", twilio_status=call.get("status", "")))
    log.info("outbound call %s to %s placed (agent %s)", sid, req.to, req.agent)
    return record


def register(state: RelayState, placed: CallRecord) -> CallRecord:
    """Make the placed call's record the process's (a webhook may have created it first)."""
    record = state.records.create(placed.call_sid, tenant_id=placed.tenant_id)
    for name in ("account_sid", "from_number", "to_number", "direction", "agent"):
        setattr(record, name, getattr(placed, name))
    if record.status == "incoming":
        record.status = placed.status
    record.events[:0] = placed.events
    if state.control.history is not None:
        state.control.history.save(record, record.tenant_id)
    return record


# --- the live call ------------------------------------------------------------------------
def live_call(state: RelayState, call_sid: str) -> Any:
    """The running :class:`relay.media.call.Call` of ``call_sid`` in this process, or None."""
    return next((c for c in state.calls if c.call_sid == call_sid), None)


async def hang_up(state: RelayState, tenant_id: str, call_sid: str) -> dict[str, Any]:
    """End a live call through Twilio (``Status=completed``)."""
    cfg = state.cfg
    record = await _owned_record(state, tenant_id, call_sid)
    try:
        account = await tenancy.tenant_twilio(cfg, state.control.store, tenant_id)
    except tenancy.NotConfigured as exc:
        raise OutboundError(409, "not_configured", str(exc)) from None
    live = live_call(state, call_sid)
    reason = "hung up via api"
    if live is not None and not live.end_reason:
        live.end_reason = reason  # Twilio stops the stream before its answer reaches us
    async with account.client(cfg) as rest:
        try:
            answer = await rest.update_call(call_sid, Status="completed")
        except TwilioRestError as exc:
            if live is not None and live.end_reason == reason:
                live.end_reason = ""
            ended = exc.kind == "twilio_not_found"
            result = "already_ended" if ended else "failed"
            failure = {"twilio_code": exc.code, "message": exc.message[:200]}
            _note(state, record, _event("hangup", result, **failure))
            if ended:
                raise OutboundError(
                    409,
                    "already_ended",
                    f"Twilio says the call already ended ({exc.code or 404})",
                    twilio_code=exc.code,
                ) from None
            raise _twilio_failure(exc, "hang up the call") from None
    _note(state, record, _event("hangup", "ok", twilio_status=answer.get("status", "")))
    return {"call_sid": call_sid, "twilio_status": answer.get("status", ""), "result": "hung_up"}


async def _owned_record(state: RelayState, tenant_id: str, call_sid: str) -> CallRecord | None:
    """The in-memory record if this process has it; 404 unless the tenant owns the call."""
    record = state.records.get(call_sid)
    if record is not None and record.tenant_id == tenant_id:
        return record
    store = state.control.store
    if store is None or await store.run(store.get_call, tenant_id, call_sid) is None:
        raise OutboundError(404, "not_found", "no such call")
    return None


def _note(state: RelayState, record: CallRecord | None, event: dict[str, Any]) -> None:
    if record is None:
        return
    record.events.append(event)
    if state.control.history is not None:
        state.control.history.save(record, record.tenant_id)


# --- status callbacks ---------------------------------------------------------------------
def on_status(state: RelayState, record: CallRecord, params: Mapping[str, str]) -> None:
    """Drive an outbound call's record from a status callback (in-memory + history)."""
    if not record.direction.startswith("outbound"):
        return
    status = params.get("CallStatus", "")
    if params.get("AnsweredBy"):
        record.answered_by = params["AnsweredBy"][:40]
    if status in PRE_STREAM and record.status in PRE_STREAM:
        record.status = status
    elif status in FAILED_STATUSES or status == "completed":
        live = live_call(state, record.call_sid)
        if live is not None and status in FAILED_STATUSES:
            live._end(status)  # its agent session closes with the call
        if record.status in PRE_STREAM:  # never got a stream: the callback ends it
            record.status = "completed"
            record.end_reason = record.end_reason or status
            record.ended_at = time.time()
    if state.control.history is not None:
        state.control.history.save(record, record.tenant_id)


# --- the voice webhook ----------------------------------------------------------------------
def webhook_context(
    state: RelayState, args: Mapping[str, str], record: CallRecord, params: Mapping[str, str]
) -> tuple[OutboundContext | None, bool]:
    """(context, ok) of a voice webhook: (None, True) for a call relay did not place;
    ok False for a context that does not verify, has expired or names another tenant."""
    token = args.get(CONTEXT_PARAM)
    if token is None:
        return None, True
    ctx = verify_context(state.cfg.token_secret_bytes(), token)
    if ctx is None or ctx.tenant_id != record.tenant_id:
        log.warning("call %s: outbound context invalid or expired", record.call_sid)
        return None, False
    record.direction = params.get("Direction", "outbound-api")[:20] or "outbound-api"
    record.answered_by = params.get("AnsweredBy", "")[:40] or record.answered_by
    return ctx, True


def ctx_plan(ctx: OutboundContext | None) -> dict[str, Any]:
    """Keyword arguments of :meth:`CallPolicies.screen` for an outbound call's webhook."""
    if ctx is None:
        return {}
    return {
        "outbound": True,
        "overrides": ctx.overrides(),
        "max_call_seconds": ctx.max_call_seconds,
    }
