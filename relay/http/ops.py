"""Operations endpoints: ``/healthz`` (open), ``/metrics`` and ``/calls`` (admin key).

``/calls`` shows this process's in-memory records (live calls included, newest first);
the persistent, per-tenant history is ``/api/v1/calls``.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

import trio
from quart import Quart, Response, request

if TYPE_CHECKING:
    from ..state import RelayState


def admin_denied(state: RelayState) -> Response | None:
    """None when the request carries the admin key; else the 401/403 to answer."""
    key = state.cfg.security.admin_key
    if not key:
        return Response("admin API disabled: set security.admin_key\n", status=403)
    supplied = request.headers.get("Authorization", "")
    if not hmac.compare_digest(supplied.encode(), f"Bearer {key}".encode()):
        state.metrics.error("admin_auth")
        return Response("admin key required\n", status=401, headers={"WWW-Authenticate": "Bearer"})
    return None


def _trio_tasks() -> str:
    """``relay_trio_tasks``: tasks alive in this process's Trio run (a leak check for
    long runs such as ``python -m bench soak``); empty outside a Trio run."""
    try:
        living = trio.lowlevel.current_statistics().tasks_living
    except RuntimeError:
        return ""
    return (
        "# HELP relay_trio_tasks Tasks alive in the Trio run.\n"
        f"# TYPE relay_trio_tasks gauge\nrelay_trio_tasks {living}\n"
    )


def register(app: Quart, state: RelayState) -> None:
    metrics = state.metrics

    @app.get("/healthz")
    async def healthz() -> Any:
        if state.draining:  # SIGTERM (relay/http/drain.py): send new calls elsewhere
            return {"status": "draining", "active_calls": metrics.active_calls}, 503
        return {"status": "ok", "active_calls": metrics.active_calls}

    @app.get("/metrics")
    async def metrics_route() -> Any:
        denied = admin_denied(state)
        if denied is not None:
            return denied
        return Response(metrics.render() + _trio_tasks(), content_type="text/plain; version=0.0.4")

    @app.get("/calls")
    async def calls() -> Any:
        denied = admin_denied(state)
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
        denied = admin_denied(state)
        if denied is not None:
            return denied
        record = state.records.get(call_sid)
        if record is None:
            return Response("no such call\n", status=404)
        return record.to_json()
