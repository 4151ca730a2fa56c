"""Twilio's webhooks: ``POST /twilio/voice`` and ``POST /twilio/status``.

Every request is checked with the auth token of the account that owns the call: the
``AccountSid`` form field names it (Twilio docs, "Webhooks security": the signature is
HMAC-SHA1 with *that account's* token), ``relay.control.directory`` finds its token. An
AccountSid no tenant owns is refused with 403, exactly like a bad signature, so the answer
tells a prober nothing.

The voice webhook answers TwiML that connects a bidirectional Media Stream to
``/twilio/stream/{AccountSid}`` (so the upgrade, which carries no form fields, can be
checked with the same account's token) with a signed, expiring per-call token naming the
tenant and the agent.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from quart import Quart, Response, request
from twilio.twiml.voice_response import Connect, Stream, VoiceResponse

from ..control import outbound, postcall, warm
from ..control.directory import Account
from ..control.outbound import ctx_plan
from ..control.policies import CallPlan
from ..control.store import DEFAULT_TENANT, sequence_number
from ..media.hold import add_prelude
from ..protocol.signature import validate_signature
from . import twilio_speech_hooks

if TYPE_CHECKING:
    from ..state import RelayState

log = logging.getLogger("relay.http.twilio")

TERMINAL_CALL_STATUSES = {"completed", "busy", "failed", "no-answer", "canceled"}
STATUS_FIELDS = (
    "CallStatus",
    "CallDuration",
    "SequenceNumber",
    "StreamSid",
    "StreamEvent",
    "StreamError",
    "Timestamp",
    "AnsweredBy",
)


def _xml(body: str, status: int = 200) -> Response:
    return Response(body, status=status, content_type="text/xml; charset=utf-8")


def stream_path_for(account: Account) -> str:
    """Default-tenant streams keep the original path; tenants' carry their AccountSid."""
    if account.tenant_id == DEFAULT_TENANT:
        return "/twilio/stream"
    return f"/twilio/stream/{account.account_sid}"


def register(app: Quart, state: RelayState) -> None:
    cfg = state.cfg
    metrics = state.metrics
    directory = state.control.directory
    history = state.control.history
    # relay serve --workers N: the URLs of a call's later requests end with the answering
    # worker's tag, so they reach the process holding its plan (relay/http/handoff.py)
    tag = f"/{state.worker.tag}" if state.worker.tag else ""

    def signed_url() -> str:
        # Validate against the URL Twilio called: the configured public URL (or, behind a
        # trusted proxy, X-Forwarded-Proto/Host first values), never the internal one.
        base = cfg.public_url
        if cfg.server.trust_forwarded:
            proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip()
            host = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()
            if proto and host:
                base = f"{proto}://{host}"
        query = request.query_string.decode("latin-1")
        return base + request.path + (f"?{query}" if query else "")

    async def signed_form(route: str) -> tuple[dict[str, str], Account] | Response:
        try:
            form = await request.form
        except Exception as exc:  # body too large, bad encoding
            metrics.webhooks[f"{route}_malformed"] += 1
            metrics.error("webhook_malformed")
            log.warning("%s webhook: unreadable body (%s)", route, exc.__class__.__name__)
            return Response("malformed request\n", status=400)
        params = {k: form.get(k, "") for k in form}
        signature = request.headers.get("X-Twilio-Signature")
        account_sid = params.get("AccountSid", "")
        account = await directory.account(account_sid) if len(account_sid) <= 64 else None
        if account is None or not validate_signature(
            account.auth_token, signed_url(), params, signature
        ):
            metrics.webhooks[f"{route}_bad_signature"] += 1
            metrics.error("bad_signature" if account is not None else "unknown_account")
            log.warning(
                "%s webhook refused: %s (CallSid %s)",
                route,
                "unknown AccountSid"
                if account is None
                else f"{'missing' if not signature else 'invalid'} X-Twilio-Signature",
                params.get("CallSid", "?")[:40],
            )
            return Response("invalid Twilio signature\n", status=403)
        return params, account

    def reject(record: Any, tenant_id: str, code: str, reason: str, twiml_reason: str) -> Response:
        # <Reject> must be the first verb; the caller hears busy/rejected and is not billed.
        metrics.calls_rejected[code] += 1
        record.status = "rejected"
        record.reject_reason = code
        record.end_reason = reason
        record.ended_at = time.time()
        if history is not None:
            history.save(record, tenant_id)
        state.postcall.submit_rejected(record)  # post_call_webhook, with the reason
        response = VoiceResponse()
        response.reject(reason=twiml_reason)
        return _xml(str(response))

    def after_stream_action(plan: CallPlan) -> dict[str, str]:
        if not plan.policy.fallback_message:
            return {}
        return {"action": f"{cfg.public_url}/twilio/stream-ended{tag}", "method": "POST"}

    @app.post("/twilio/stream-ended")
    @app.post("/twilio/stream-ended/<worker>")
    async def stream_ended(worker: str = "") -> Any:
        # <Connect action>: the stream ended. At the cap, Twilio says the fallback message
        # (its own text-to-speech), then hangs up; any other end simply hangs up.
        checked = await signed_form("stream_ended")
        if isinstance(checked, Response):
            return checked
        params, account = checked
        call_sid = params.get("CallSid", "")
        response = VoiceResponse()
        fallback = state.policies.after_stream.pop(call_sid, None)
        record = state.records.get(call_sid)
        if fallback is not None and record is not None and record.tenant_id == account.tenant_id:
            message, voice = fallback
            response.say(message, **({"voice": voice} if voice else {}))
            record.fallback_message_played = True
            if history is not None:
                history.save(record, account.tenant_id)
        response.hangup()
        metrics.webhooks["stream_ended_ok"] += 1
        return _xml(str(response))

    @app.post("/twilio/voice")
    async def voice() -> Any:
        checked = await signed_form("voice")
        if isinstance(checked, Response):
            return checked
        params, account = checked
        call_sid = params.get("CallSid", "")
        if not call_sid.startswith("CA") or len(call_sid) > 64:
            metrics.webhooks["voice_malformed"] += 1
            metrics.error("webhook_malformed")
            log.warning("voice webhook without a valid CallSid")
            return Response("missing CallSid\n", status=400)
        tenant_id = account.tenant_id
        to_number = params.get("To", "")
        record = state.records.create(
            call_sid,
            tenant_id=tenant_id,
            account_sid=account.account_sid,
            from_number=params.get("From", ""),
            from_country=params.get("FromCountry", "")[:8],
            to_number=to_number,
            direction=params.get("Direction", "inbound")[:20],
        )
        if state.draining:  # SIGTERM: this process takes no new calls (relay/http/drain.py)
            metrics.webhooks["voice_rejected_draining"] += 1
            log.info("call %s rejected: draining", call_sid)
            return reject(record, tenant_id, "draining", "draining", "busy")
        overloaded = state.headroom.refusal(metrics.active_calls, state.policies.pending)
        if overloaded:  # before quality degrades for the calls already up (headroom.py)
            metrics.webhooks["voice_rejected_overloaded"] += 1
            log.warning("call %s rejected: overloaded (%s)", call_sid, overloaded)
            return reject(record, tenant_id, "overloaded", "overloaded", "busy")
        if metrics.active_calls >= cfg.server.max_calls:
            metrics.webhooks["voice_rejected_busy"] += 1
            log.warning("call %s rejected: %d active calls", call_sid, metrics.active_calls)
            return reject(record, tenant_id, "concurrent_limit", "concurrent limit", "busy")
        # An outbound call relay placed carries its signed context (relay/control/outbound.py)
        ctx, ctx_ok = outbound.webhook_context(state, request.args, record, params)
        if not ctx_ok:
            return reject(record, tenant_id, "invalid_context", "invalid context", "rejected")
        if ctx is not None:
            route = await directory.agent(tenant_id, ctx.agent)
        else:
            route = await directory.route(tenant_id, to_number)
        if route is None:
            metrics.webhooks["voice_rejected_no_agent"] += 1
            log.warning("call %s to %s rejected: tenant has no agent", call_sid, to_number)
            return reject(record, tenant_id, "no_agent", "no agent", "rejected")
        record.agent = route.agent
        # Per-agent policies (relay/control/policies.py): allowlist, concurrency, cap.
        plan, denied = state.policies.screen(
            call_sid, tenant_id, route.agent, route.options, record.from_number, **ctx_plan(ctx)
        )
        if plan is None:
            metrics.webhooks[f"voice_rejected_{denied}"] += 1
            log.warning("call %s from %s rejected: %s", call_sid, record.from_number, denied)
            return reject(record, tenant_id, denied, denied.replace("_", " "), "busy")
        if history is not None:
            history.save(record, tenant_id)
        token = state.tokens.issue(f"{call_sid}|{tenant_id}|{route.agent}")
        if route.options.get("type") == "twilio-speech":  # Twilio's own speech: no stream
            return twilio_speech_hooks.answer_call(state, account, record, route, plan, token)
        stream = Stream(
            url=cfg.stream_url.removesuffix("/twilio/stream") + stream_path_for(account) + tag,
            status_callback=f"{cfg.public_url}/twilio/status{tag}",
            status_callback_method="POST",
        )
        stream.parameter(name="token", value=token)
        stream.parameter(name="agent", value=route.agent)
        stream.parameter(name="tenant", value=tenant_id)
        # warm start (relay/control/warm.py): the agent session opens now, in the background
        params = {"token": token, "agent": route.agent, "tenant": tenant_id}
        warm.begin_for_webhook(state, plan, route.options, record, params)
        # With a fallback message, Twilio asks what to do once the stream ends (say it
        # when the call ended at its cap, else hang up).
        connect = Connect(**after_stream_action(plan))
        connect.append(stream)
        response = VoiceResponse()
        add_prelude(response, plan.policy.hold)  # hold = text: <Say> before the stream
        response.append(connect)
        metrics.webhooks["voice_ok"] += 1
        log.info(
            "call %s from %s to %s -> agent %s (tenant %s)",
            call_sid,
            record.from_number,
            to_number,
            route.agent,
            tenant_id,
        )
        return _xml(str(response))

    @app.post("/twilio/status")
    @app.post("/twilio/status/<worker>")
    async def status(worker: str = "") -> Any:
        checked = await signed_form("status")
        if isinstance(checked, Response):
            return checked
        params, account = checked
        call_sid = params.get("CallSid", "")
        if not call_sid.startswith("CA") or len(call_sid) > 64:
            metrics.webhooks["status_malformed"] += 1
            return Response("missing CallSid\n", status=400)
        entry = {k: params[k][:200] for k in STATUS_FIELDS if k in params}
        call_status = params.get("CallStatus", "")
        terminal = call_status if call_status in TERMINAL_CALL_STATUSES else None
        record = state.records.get(call_sid)
        if record is None:  # e.g. an outbound call placed by another process (relay call)
            record = state.records.create(
                call_sid,
                tenant_id=account.tenant_id,
                direction=params.get("Direction", "inbound")[:20],
                from_number=params.get("From", "")[:40],
                to_number=params.get("To", "")[:40],
            )
        if terminal:  # a call that never got its stream gives its agent slot back
            state.policies.release_pending(call_sid)
            state.warm.discard(call_sid, account.tenant_id)  # and its warm agent session
        if record.tenant_id == account.tenant_id:  # never another tenant's record
            record.status_callbacks.append(entry)
            # Callbacks may arrive out of order: keep them ordered by SequenceNumber.
            record.status_callbacks.sort(key=sequence_number)
            outbound.on_status(state, record, params)
            if terminal and record.stats.get("mode") == "gather":  # no socket saw it end
                twilio_speech_hooks.call_ended(state, record, terminal)
            if terminal and record.status == "incoming":
                record.status = "completed"
                record.end_reason = record.end_reason or terminal
            if terminal and record.started_at is None and record.direction.startswith("outbound"):
                await postcall.call_ended(state, record, None)  # busy, no-answer, ...
        if history is not None:
            history.status_callback(call_sid, account.tenant_id, entry, terminal)
        if params.get("StreamEvent") == "stream-error":
            metrics.error("stream_error")
            log.warning("call %s: Twilio stream error: %s", call_sid, params.get("StreamError", ""))
        metrics.webhooks["status_ok"] += 1
        return Response("", status=204)
