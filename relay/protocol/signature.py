"""Twilio request signatures and the per-call stream token.

Signature rule (Twilio docs, "Webhooks security"): HMAC-SHA1 keyed with the account Auth
Token over the full URL Twilio requested followed by every POST parameter ``name + value``
sorted by name, base64-encoded, sent as ``X-Twilio-Signature``. The Media Streams upgrade
carries the same header (lowercase on the wire) computed over the ``wss://`` URL, no params.

The stream token is our own defence in depth: an HMAC-SHA256 over ``call_sid|expiry`` put
in ``<Parameter name="token">`` and checked against ``start.customParameters`` so a stream
can only be opened for the call whose webhook we answered, and only for a short time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit


def compute_signature(auth_token: str, url: str, params: Mapping[str, str] | None = None) -> str:
    """Twilio's X-Twilio-Signature for ``url`` and form ``params``."""
    data = url
    if params:
        for name in sorted(params):
            data += name + str(params[name])
    mac = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode("ascii")


def _url_variants(url: str) -> Iterable[str]:
    """The URL as given, plus with/without the scheme's default port.

    twilio-python's RequestValidator does the same: proxies and Twilio disagree on whether
    ``:443`` is part of the URL that was signed.
    """
    yield url
    parts = urlsplit(url)
    default = {"https": 443, "wss": 443, "http": 80, "ws": 80}.get(parts.scheme)
    if default is None:
        return
    if parts.port is None:
        host = parts.hostname or ""
        yield urlunsplit(parts._replace(netloc=f"{host}:{default}"))
    elif parts.port == default:
        yield urlunsplit(parts._replace(netloc=parts.hostname or ""))


def validate_signature(
    auth_token: str, url: str, params: Mapping[str, str] | None, signature: str | None
) -> bool:
    """Constant-time check of ``signature`` for ``url`` + ``params``."""
    if not signature or not auth_token:
        return False
    for candidate in _url_variants(url):
        expected = compute_signature(auth_token, candidate, params)
        if hmac.compare_digest(expected, signature):
            return True
    return False


class StreamTokens:
    """Issue and verify short-lived per-call tokens (``<Parameter name="token">``)."""

    def __init__(self, secret: bytes, ttl_s: float = 300.0) -> None:
        if len(secret) < 16:
            raise ValueError("stream token secret must be at least 16 bytes")
        self._secret = secret
        self.ttl_s = ttl_s

    def _mac(self, call_sid: str, expiry: int) -> str:
        msg = f"{call_sid}|{expiry}".encode()
        digest = hmac.new(self._secret, msg, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:18]).decode("ascii")

    def issue(self, call_sid: str, now: float | None = None) -> str:
        expiry = int((time.time() if now is None else now) + self.ttl_s)
        return f"{expiry}.{self._mac(call_sid, expiry)}"

    def verify(self, call_sid: str, token: str | None, now: float | None = None) -> bool:
        if not token or not call_sid:
            return False
        expiry_text, sep, mac = token.partition(".")
        if not sep or not expiry_text.isdigit():
            return False
        expiry = int(expiry_text)
        if expiry < (time.time() if now is None else now):
            return False
        return hmac.compare_digest(mac, self._mac(call_sid, expiry))
