"""Signing relay's webhooks to deployers (post-call, prep) with a per-tenant secret.

Header (Stripe's scheme, so existing verification code fits)::

    X-Relay-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>

The receiver recomputes the HMAC over the timestamp, a dot and the raw body bytes, compares
in constant time, and refuses timestamps older than a few minutes (replays).
:func:`verify` is that check. Each attempt of a delivery is signed anew (fresh ``t``).

Secrets: one per tenant, ``whsec_`` + 43 URL-safe characters, encrypted at rest with the
store's key (relay/control/secretbox.py, rotated by ``relay db rotate-key``). Made on first
need (the first webhook, or ``GET /api/v1/settings/webhook-secret``); the API shows it in
full once, then masked (``…abcd``); ``POST /api/v1/settings/webhook-secret`` makes a new one
(shown once, in that answer). Without a store (``store.url = "memory"``) the secret is
``[security] webhook_secret``; unset, webhooks go unsigned (logged once).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlalchemy as sa

from . import schema as t
from .secretbox import masked, tail
from .store import Store, now_ms

if TYPE_CHECKING:
    from ..state import RelayState

log = logging.getLogger("relay.control.signing")

__all__ = [
    "SIGNATURE_HEADER",
    "SecretView",
    "headers_for",
    "sign",
    "tenant_secret",
    "verify",
]

SIGNATURE_HEADER = "X-Relay-Signature"
PREFIX = "whsec_"
CACHE_TTL_S = 5.0
#: what :func:`verify` accepts by default: five minutes either way
TOLERANCE_S = 300

#: per store (a process has one; tests have many): tenant -> (expires, secret)
_cache: weakref.WeakKeyDictionary[Store, dict[str, tuple[float, str]]] = weakref.WeakKeyDictionary()
_warned_unsigned = False


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``X-Relay-Signature`` value for ``body`` at ``timestamp`` (default: now)."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


def verify(
    secret: str,
    header: str,
    body: bytes,
    *,
    tolerance_s: int = TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """Check an ``X-Relay-Signature`` header the way a receiver should."""
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        fields.setdefault(key, []).append(value)
    try:
        ts = int(fields.get("t", [""])[0])
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    expected = sign(secret, body, ts).split("v1=", 1)[1]
    return any(hmac.compare_digest(expected, v) for v in fields.get("v1", []))


# --- storage (synchronous: run through Store.run) ------------------------------------------
@dataclass(frozen=True)
class SecretView:
    """What the API shows: the secret in full once, else masked."""

    secret: str
    revealed_now: bool
    created_at: int


def _row(store: Store, tenant_id: str) -> sa.Row | None:
    with store.connect() as c:
        return c.execute(
            sa.select(t.webhook_secrets).where(t.webhook_secrets.c.tenant_id == tenant_id)
        ).first()


def _insert(store: Store, tenant_id: str, secret: str, *, revealed: bool) -> int:
    created = now_ms()
    values = {
        "secret_enc": store.box.encrypt(secret),
        "secret_tail": tail(secret),
        "revealed": revealed,
        "created_at": created,
    }
    with store._tx() as c:
        updated = c.execute(
            t.webhook_secrets.update()
            .where(t.webhook_secrets.c.tenant_id == tenant_id)
            .values(**values)
        )
        if not updated.rowcount:
            c.execute(t.webhook_secrets.insert().values(tenant_id=tenant_id, **values))
    return created


def get_or_create(store: Store, tenant_id: str) -> str:
    """The tenant's secret, made (not yet revealed) when it has none."""
    row = _row(store, tenant_id)
    if row is not None:
        return store.box.decrypt(row.secret_enc)
    secret = new_secret()
    try:
        _insert(store, tenant_id, secret, revealed=False)
    except sa.exc.IntegrityError:  # another process made one meanwhile
        row = _row(store, tenant_id)
        assert row is not None
        return store.box.decrypt(row.secret_enc)
    return secret


def reveal(store: Store, tenant_id: str) -> SecretView:
    """``GET``: the secret in full if it was never shown (made on the way if missing)."""
    secret = get_or_create(store, tenant_id)
    row = _row(store, tenant_id)
    assert row is not None
    if row.revealed:
        return SecretView(masked(row.secret_tail), False, row.created_at)
    with store._tx() as c:
        shown = c.execute(
            t.webhook_secrets.update()
            .where(
                t.webhook_secrets.c.tenant_id == tenant_id, t.webhook_secrets.c.revealed.is_(False)
            )
            .values(revealed=True)
        )
    if not shown.rowcount:  # a concurrent GET showed it first
        return SecretView(masked(row.secret_tail), False, row.created_at)
    return SecretView(secret, True, row.created_at)


def rotate(store: Store, tenant_id: str) -> SecretView:
    """``POST``: a new secret, shown in this answer only; the old one stops signing."""
    secret = new_secret()
    created = _insert(store, tenant_id, secret, revealed=True)
    return SecretView(secret, True, created)


def reencrypt_all(store: Store) -> int:
    """Re-encrypt every stored webhook secret with the store's first key (key rotation)."""
    count = 0
    with store._tx() as c:
        for row in c.execute(
            sa.select(t.webhook_secrets.c.tenant_id, t.webhook_secrets.c.secret_enc)
        ).all():
            c.execute(
                t.webhook_secrets.update()
                .where(t.webhook_secrets.c.tenant_id == row.tenant_id)
                .values(secret_enc=store.box.rotate(row.secret_enc))
            )
            count += 1
    return count


def forget() -> None:
    """Drop cached secrets (after this process rotated one)."""
    _cache.clear()


# --- async helpers ---------------------------------------------------------------------------
async def tenant_secret(state: RelayState, tenant_id: str) -> str | None:
    """The tenant's signing secret (cached a few seconds), None when there is none."""
    store = state.control.store
    if store is None:
        return state.cfg.security.webhook_secret or None
    cache = _cache.setdefault(store, {})
    hit = cache.get(tenant_id)
    if hit is not None and hit[0] > time.monotonic():
        return hit[1]
    secret = await store.run(get_or_create, store, tenant_id)
    if len(cache) > 10_000:
        cache.clear()
    cache[tenant_id] = (time.monotonic() + CACHE_TTL_S, secret)
    return secret


async def headers_for(
    state: RelayState, tenant_id: str, body: bytes, *, timeout_s: float = 2.0
) -> dict[str, str]:
    """``{X-Relay-Signature: ...}`` for ``body``, or {} when no secret can be had in time
    (a store that does not answer never holds a call back: the request goes unsigned)."""
    global _warned_unsigned
    import trio

    secret: str | None = None
    with trio.move_on_after(timeout_s):
        try:
            secret = await tenant_secret(state, tenant_id)
        except Exception as exc:  # the store failed: deliver unsigned rather than not at all
            log.error("webhook secret of tenant %s unavailable: %s", tenant_id, exc)
    if secret is None:
        if not _warned_unsigned:
            _warned_unsigned = True
            log.warning(
                "webhooks of tenant %s go unsigned (no store and no security.webhook_secret)",
                tenant_id,
            )
        return {}
    return {SIGNATURE_HEADER: sign(secret, body)}
