"""Requests relay makes to deployers' URLs (prep webhook, post-call webhook), made safe.

The URL's host is resolved first; unless private targets are allowed, every address must
be public (``relay.netguard``, the check HTTP tools use: private,
loopback, link-local, CGNAT, reserved, multicast and their IPv6 embeddings are refused),
and the request then goes to the address just checked (``Host`` and TLS SNI keep the
name), so a DNS answer cannot change between the check and the connection. Redirects are
not followed, the response is read up to a bound, and the whole exchange is bounded in
time. Nothing here raises for the target's fault: :class:`Answer` says what happened.

Private targets are allowed by ``[security] allow_private_urls`` (every agent), or by the
agent option ``allow_private_urls`` on an agent of relay.toml: a tenant's stored agent
cannot point relay at the deployer's internal network on its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import trio

from .. import netguard
from ..errors import RelayError
from .store import DEFAULT_TENANT

if TYPE_CHECKING:
    from ..config import Config
    from .features import CallFeatures

log = logging.getLogger("relay.control.outgoing")

__all__ = ["Answer", "display_url", "post", "private_allowed"]

USER_AGENT = "relay/0.1"
MAX_RESPONSE_BYTES = 64 * 1024


@dataclass
class Answer:
    """The outcome of one request. ``kind``: ``ok`` (an HTTP answer, any status),
    ``refused`` (a non-public address), ``timeout``, ``error`` (DNS, connection, TLS)."""

    kind: str
    status: int | None = None
    body: bytes = b""
    content_type: str = ""
    detail: str = ""
    ms: float = 0.0

    @property
    def success(self) -> bool:
        return self.kind == "ok" and self.status is not None and 200 <= self.status < 300

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def display_url(url: str) -> str:
    """scheme://host[:port]/path: a query string or userinfo may carry a secret."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}" + (
        "?…" if parts.query else ""
    )


def private_allowed(cfg: Config, tenant_id: str, agent: str, features: CallFeatures) -> bool:
    """Whether this agent's webhooks may reach private, loopback or link-local addresses."""
    if cfg.security.allow_private_urls:
        return True
    return features.allow_private_urls and tenant_id == DEFAULT_TENANT and agent in cfg.agents


async def post(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    timeout_s: float,
    allow_private: bool,
    max_bytes: int = MAX_RESPONSE_BYTES,
) -> Answer:
    """POST ``body`` to ``url`` (see the module docstring); never raises for the target."""
    started = time.perf_counter()
    answer = Answer("timeout", detail=f"no answer within {timeout_s * 1000:.0f} ms")
    with trio.move_on_after(timeout_s):
        answer = await _post(url, body, dict(headers), timeout_s, allow_private, max_bytes)
    answer.ms = round((time.perf_counter() - started) * 1000.0, 1)
    return answer


async def _post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    timeout_s: float,
    allow_private: bool,
    max_bytes: int,
) -> Answer:
    import httpx

    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:
        return Answer("error", detail="not an http(s) URL")
    try:
        # relay.netguard: resolved once, checked, and the request goes to that address
        target, headers, extensions = await netguard.http_target(
            url, headers, what=f"request to {display_url(url)}", refuse_private=not allow_private
        )
    except netguard.AddressRefused:
        return Answer(
            "refused",
            detail=f"{host} resolves to a private, loopback or link-local address "
            "(allow_private_urls)",
        )
    except RelayError as exc:  # the name does not resolve
        return Answer("error", detail=f"cannot resolve {host}: {exc}"[:300])
    headers.setdefault("User-Agent", USER_AGENT)
    data = bytearray()
    try:
        async with (
            httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, trust_env=False) as client,
            client.stream(
                "POST", target, content=body, headers=headers, extensions=extensions
            ) as response,
        ):
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) >= max_bytes:
                    break
            status = response.status_code
            content_type = response.headers.get("content-type", "")
    except httpx.TimeoutException:
        return Answer("timeout", detail=f"no answer within {timeout_s * 1000:.0f} ms")
    except (httpx.HTTPError, OSError) as exc:
        return Answer("error", detail=f"{type(exc).__name__}: {exc}"[:300])
    return Answer("ok", status=status, body=bytes(data[:max_bytes]), content_type=content_type)
