"""``/api/v1`` routes of the call features: the tenant's webhook signing secret and call
recordings.

* ``GET  /api/v1/settings/webhook-secret``: the secret that signs this tenant's post-call
  and prep webhooks (relay/control/signing.py), in full the first time it is read, masked
  (``…abcd``) afterwards; made on the way if the tenant has none yet.
* ``POST /api/v1/settings/webhook-secret``: a new secret (the old one stops signing at
  once), shown in this answer only.
* ``GET  /api/v1/calls/{sid}/recording``: the call's WAV (relay/media/recording.py), to the
  tenant that owns the call only; 404 for anyone else, for a call without a recording, and
  for one still being written (``409 recording_in_progress`` to its owner).

Registered by ``relay/http/api.py`` with its ``endpoint`` decorator (same authentication,
same JSON error shape).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from quart import Quart, Response

from ..control import signing

if TYPE_CHECKING:
    from ..state import RelayState


def register(app: Quart, state: RelayState, endpoint: Callable[..., Any]) -> None:
    from .api import ApiError, _json  # api.py imports this module

    def store() -> Any:
        if state.control.store is None:
            raise ApiError(503, "no_store", "this relay runs without a store ([store] url)")
        return state.control.store

    def secret_json(view: signing.SecretView) -> dict[str, Any]:
        return {
            "secret": view.secret,
            "shown_in_full": view.revealed_now,
            "created_at": view.created_at,
            "header": signing.SIGNATURE_HEADER,
            "scheme": 't=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>',
        }

    @app.get("/api/v1/settings/webhook-secret")
    @endpoint()
    async def get_webhook_secret(tenant: str) -> Any:
        db = store()
        return _json(secret_json(await db.run(signing.reveal, db, tenant)))

    @app.get("/api/v1/calls/<call_sid>/recording")
    @endpoint()
    async def get_recording(tenant: str, call_sid: str) -> Any:
        record = state.records.get(call_sid)
        if record is not None and record.tenant_id != tenant:
            record = None  # another tenant's call: exactly like a missing one
        if record is None:
            db = state.control.store
            if db is None or await db.run(db.get_call, tenant, call_sid) is None:
                raise ApiError(404, "not_found", "no such call")
        elif record.recording.get("status") == "recording":
            raise ApiError(409, "recording_in_progress", "the call is still being recorded")
        path = state.recordings.path_for(tenant, call_sid)
        size = await trio.to_thread.run_sync(_size, path) if path is not None else None
        if path is None or size is None:
            raise ApiError(404, "not_found", "this call has no recording")
        return Response(
            _chunks(path),
            status=200,
            headers={
                "Content-Type": "audio/wav",
                "Content-Length": str(size),
                "Content-Disposition": f'attachment; filename="{call_sid}.wav"',
            },
        )

    @app.post("/api/v1/settings/webhook-secret")
    @endpoint()
    async def rotate_webhook_secret(tenant: str) -> Any:
        db = store()
        view = await db.run(signing.rotate, db, tenant)
        signing.forget()
        return _json(secret_json(view), 201)


def _size(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


async def _chunks(path: Path, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    """The file in pieces, each read in a worker thread (an hour is ~115 MB)."""
    fh = await trio.to_thread.run_sync(open, path, "rb")
    try:
        while chunk := await trio.to_thread.run_sync(fh.read, size):
            yield chunk
    finally:
        fh.close()
