"""HTTP routes (Quart-Trio, served by Hypercorn's Trio worker on the relay's one port).

* ``POST /twilio/voice``  Twilio's voice webhook: signed; answers TwiML that connects a
  bidirectional Media Stream to this relay with a signed, expiring per-call token.
* ``POST /twilio/status`` call and stream status callbacks: signed; recorded per call.
* ``GET /healthz``        liveness for load balancers (no secrets, no key needed).
* ``GET /metrics``        Prometheus text; ``Authorization: Bearer <security.admin_key>``.
* ``GET /calls[/<sid>]``  call records, newest first; admin key too.
"""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING, Any

from quart import Response, request
from quart_trio import QuartTrio
from twilio.twiml.voice_response import Connect, Stream, VoiceResponse

from ..protocol.signature import validate_signature

if TYPE_CHECKING:
    from ..state import RelayState

log = logging.getLogger("relay.http")

# Twilio's webhook bodies are a few hundred bytes; anything near this is not Twilio.
MAX_WEBHOOK_BYTES = 64 * 1024
TERMINAL_CALL_STATUSES = {"completed", "busy", "failed", "no-answer", "canceled"}


def _xml(body: str, status: int = 200) -> Response:
    return Response(body, status=status, content_type="text/xml; charset=utf-8")


def create_app(state: RelayState) -> QuartTrio:
    app = QuartTrio("relay")
    app.config["MAX_CONTENT_LENGTH"] = MAX_WEBHOOK_BYTES
    cfg = state.cfg
    metrics = state.metrics

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

    async def signed_form(route: str) -> dict[str, str] | Response:
        try:
            form = await request.form
        except Exception as exc:  # body too large, bad encoding
            metrics.webhooks[f"{route}_malformed"] += 1
            metrics.error("webhook_malformed")
            log.warning("%s webhook: unreadable body (%s)", route, exc.__class__.__name__)
            return Response("malformed request\n", status=400)
        params = {k: form.get(k, "") for k in form}
        signature = request.headers.get("X-Twilio-Signature")
        if not validate_signature(cfg.twilio.auth_token, signed_url(), params, signature):
            metrics.webhooks[f"{route}_bad_signature"] += 1
            metrics.error("bad_signature")
            log.warning(
                "%s webhook refused: %s X-Twilio-Signature (CallSid %s)",
                route,
                "missing" if not signature else "invalid",
                params.get("CallSid", "?")[:40],
            )
            return Response("invalid Twilio signature\n", status=403)
        return params

    @app.post("/twilio/voice")
    async def voice() -> Any:
        params = await signed_form("voice")
        if isinstance(params, Response):
            return params
        call_sid = params.get("CallSid", "")
        if not call_sid.startswith("CA") or len(call_sid) > 64:
            metrics.webhooks["voice_malformed"] += 1
            metrics.error("webhook_malformed")
            log.warning("voice webhook without a valid CallSid")
            return Response("missing CallSid\n", status=400)
        to_number = params.get("To", "")
        agent = cfg.agent_for(to_number)
        record = state.records.create(
            call_sid,
            from_number=params.get("From", ""),
            to_number=to_number,
            direction=params.get("Direction", "inbound"),
            agent=agent,
        )
        response = VoiceResponse()
        if metrics.active_calls >= cfg.server.max_calls:
            # <Reject> must be the first verb; the caller hears busy and is not billed.
            metrics.webhooks["voice_rejected_busy"] += 1
            metrics.calls_rejected["concurrent_limit"] += 1
            record.status = "rejected"
            record.end_reason = "concurrent limit"
            log.warning("call %s rejected: %d active calls", call_sid, metrics.active_calls)
            response.reject(reason="busy")
            return _xml(str(response))
        token = state.tokens.issue(f"{call_sid}|{agent}")
        connect = Connect()
        stream = Stream(
            url=cfg.stream_url,
            status_callback=f"{cfg.public_url}/twilio/status",
            status_callback_method="POST",
        )
        stream.parameter(name="token", value=token)
        stream.parameter(name="agent", value=agent)
        connect.append(stream)
        response.append(connect)
        metrics.webhooks["voice_ok"] += 1
        log.info(
            "call %s from %s to %s -> agent %s", call_sid, record.from_number, to_number, agent
        )
        return _xml(str(response))

    @app.post("/twilio/status")
    async def status() -> Any:
        params = await signed_form("status")
        if isinstance(params, Response):
            return params
        call_sid = params.get("CallSid", "")
        if not call_sid:
            metrics.webhooks["status_malformed"] += 1
            return Response("missing CallSid\n", status=400)
        record = state.records.ensure(call_sid)
        keep = (
            "CallStatus",
            "CallDuration",
            "SequenceNumber",
            "StreamSid",
            "StreamEvent",
            "StreamError",
            "Timestamp",
        )
        entry = {k: params[k] for k in keep if k in params}
        record.status_callbacks.append(entry)
        # Callbacks may arrive out of order: keep them ordered by SequenceNumber.
        record.status_callbacks.sort(key=lambda e: int(e.get("SequenceNumber", "0") or 0))
        call_status = params.get("CallStatus", "")
        if call_status in TERMINAL_CALL_STATUSES and record.status == "incoming":
            record.status = "completed"
            record.end_reason = record.end_reason or call_status
        if params.get("StreamEvent") == "stream-error":
            metrics.error("stream_error")
            log.warning("call %s: Twilio stream error: %s", call_sid, params.get("StreamError", ""))
        metrics.webhooks["status_ok"] += 1
        return Response("", status=204)

    @app.get("/healthz")
    async def healthz() -> Any:
        return {"status": "ok", "active_calls": metrics.active_calls}

    def authorized() -> Response | None:
        key = cfg.security.admin_key
        if not key:
            return Response("admin API disabled: set security.admin_key\n", status=403)
        supplied = request.headers.get("Authorization", "")
        if not hmac.compare_digest(supplied.encode(), f"Bearer {key}".encode()):
            metrics.error("admin_auth")
            return Response(
                "admin key required\n", status=401, headers={"WWW-Authenticate": "Bearer"}
            )
        return None

    @app.get("/metrics")
    async def metrics_route() -> Any:
        denied = authorized()
        if denied is not None:
            return denied
        return Response(metrics.render(), content_type="text/plain; version=0.0.4")

    @app.get("/calls")
    async def calls() -> Any:
        denied = authorized()
        if denied is not None:
            return denied
        # Paging input is the client's to get right: a 400, never a 500 (int() raising) or
        # a silently wrong page (a negative limit would slice from the end).
        try:
            limit = int(request.args.get("limit", "50"))
            offset = int(request.args.get("offset", "0"))
        except ValueError:
            return Response("limit and offset must be integers\n", status=400)
        if limit < 0 or offset < 0:
            return Response("limit and offset must be >= 0\n", status=400)
        limit = min(limit, 500)
        return {"calls": [r.to_json() for r in state.records.newest(limit, offset)]}

    @app.get("/calls/<call_sid>")
    async def call_detail(call_sid: str) -> Any:
        denied = authorized()
        if denied is not None:
            return denied
        record = state.records.get(call_sid)
        if record is None:
            return Response("no such call\n", status=404)
        return record.to_json()

    return app
