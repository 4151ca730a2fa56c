"""``/api/v1/calls`` actions on live calls: place an outbound call, hang up, transfer.

Registered by ``relay/http/api.py`` with its ``endpoint`` decorator (same authentication,
same one JSON error shape). The work is in ``relay/control/outbound.py``; this module maps
its :class:`~relay.control.outbound.OutboundError` to answers: 400 naming the field, 404 for
a call the tenant does not own, 409 for a call that already ended or a tenant without
Twilio settings, 502 with Twilio's code when Twilio refused or failed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from quart import Quart

from ..control import outbound, transfer

if TYPE_CHECKING:
    from ..state import RelayState


def register(app: Quart, state: RelayState, endpoint: Callable[..., Any]) -> None:
    from .api import ApiError, _json, json_body  # api.py imports this module

    def refused(exc: outbound.OutboundError) -> ApiError:
        message = exc.message
        if exc.twilio_code and str(exc.twilio_code) not in message:
            message += f" (Twilio {exc.twilio_code})"
        return ApiError(exc.status, exc.code, message, exc.field)

    async def guarded(work: Awaitable[Any]) -> Any:
        try:
            return await work
        except outbound.OutboundError as exc:
            raise refused(exc) from None

    @app.post("/api/v1/calls")
    @endpoint()
    async def place_call(tenant: str) -> Any:
        if state.draining:  # SIGTERM (relay/http/drain.py)
            raise ApiError(503, "draining", "this relay is shutting down: place the call elsewhere")
        body = await json_body(
            {
                "to": str,
                "from": str,
                "agent": str,
                "greeting": (str, bool),
                "max_call_seconds": (int, float),
                "machine_detection": (bool, str),
            },
            ("to", "from", "agent"),
        )
        control = state.control
        req = await guarded(
            outbound.prepare(state.cfg, control.store, control.directory, tenant, body)
        )
        record = outbound.register(state, await guarded(outbound.place(state.cfg, req)))
        return _json(
            {
                "call_sid": record.call_sid,
                "direction": record.direction,
                "from": record.from_number,
                "to": record.to_number,
                "agent": record.agent,
                "status": record.status,
                "max_call_seconds": req.max_call_seconds,
                "machine_detection": req.machine_detection,
            },
            201,
        )

    async def hang_up(tenant: str, call_sid: str) -> Any:
        return _json(await guarded(outbound.hang_up(state, tenant, call_sid)))

    @app.post("/api/v1/calls/<call_sid>/transfer")
    @endpoint()
    async def transfer_call(tenant: str, call_sid: str) -> Any:
        body = await json_body({"to": str}, ("to",))
        return _json(await guarded(transfer.transfer(state, tenant, call_sid, body["to"])))

    app.delete("/api/v1/calls/<call_sid>")(endpoint()(hang_up))
    app.post("/api/v1/calls/<call_sid>/hangup")(endpoint()(_renamed(hang_up, "hang_up_post")))


def _renamed(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """The same view under another endpoint name (Quart names routes by function)."""

    async def view(*args: Any, **kwargs: Any) -> Any:
        return await fn(*args, **kwargs)

    view.__name__ = view.__qualname__ = name
    return view
