"""A small async client for Twilio's REST API (version 2010-04-01), on httpx under Trio.

Why not twilio-python: its ``*_async`` methods run on aiohttp and need an asyncio loop,
which the relay (a Trio program) does not have; its sync client would cost a worker thread
per request (``trio.to_thread.run_sync``), and a thread blocked in a socket read cannot be
cancelled, so a hung Twilio request would outlive the cancel scope that gave up on it.
httpx runs natively on Trio (through httpcore's Trio backend): a request is an ordinary
Trio checkpoint, cancelled by the enclosing cancel scope like anything else, and it has
per-request timeouts. The relay needs five endpoints, so speaking the API directly is
less code than the adapter a thread-based client would need.

What the client does, each with the Twilio documentation it follows:

* HTTP Basic auth with the Account SID as user and the Auth Token as password
  (https://www.twilio.com/docs/usage/requests-to-twilio); form-encoded request bodies,
  repeated fields for list parameters such as ``StatusCallbackEvent``; the ``.json``
  suffix to get JSON rather than the 2010 API's default XML
  (https://www.twilio.com/docs/usage/twilios-response).
* Errors come back as ``{"code", "message", "more_info", "status"}``; every failure,
  including transport failures and answers that are not JSON objects, becomes one
  :class:`TwilioRestError` with a one-line message and a ``kind`` from a small vocabulary.
* Lists are paged: the client follows ``next_page_uri``, only ever to the same host and
  account (credentials are never sent anywhere else).
* Regions and edges: the host is ``api.{edge}.{region}.twilio.com``
  (https://www.twilio.com/docs/global-infrastructure/edge-locations); see
  :func:`base_url_for`.

Nothing is retried here: creating a call is not idempotent, and the callers know whether
a retry is safe. The Auth Token is never logged; ``repr`` masks it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import orjson
import trio

from .. import __version__
from ..config import mask
from ..errors import RelayError

__all__ = [
    "API_VERSION",
    "DEFAULT_BASE_URL",
    "EDGES",
    "REGIONS",
    "TwilioRest",
    "TwilioRestError",
    "base_url_for",
]

log = logging.getLogger("relay.control.twilio_rest")

API_VERSION = "2010-04-01"
DEFAULT_BASE_URL = "https://api.twilio.com"
#: Twilio Regions (where data is processed and stored); us1 is the default.
REGIONS = ("us1", "ie1", "au1")
#: Twilio Edge locations (where traffic enters Twilio's network).
EDGES = (
    "ashburn",
    "umatilla",
    "dublin",
    "frankfurt",
    "sydney",
    "tokyo",
    "singapore",
    "sao-paulo",
    "roaming",
)
#: The edge used when only a region is configured. Region-only hosts
#: (``api.ie1.twilio.com``) are being retired by Twilio (2026-04-28), so a region alone
#: gets the edge Twilio co-locates with it instead of the legacy host.
DEFAULT_EDGE = {"us1": "ashburn", "ie1": "dublin", "au1": "sydney"}

#: Twilio answers are a few kB; anything this large is not Twilio.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
#: Bound on ``next_page_uri`` hops, so a server that pages forever cannot loop us forever.
MAX_PAGES = 1000


def base_url_for(region: str | None, edge: str | None, override: str | None = None) -> str:
    """The REST API base URL for a region/edge pair (no trailing slash).

    ``override`` (e.g. a test server) wins. Otherwise an edge gives
    ``https://api.{edge}.{region}.twilio.com`` (region defaulting to ``us1``, as
    twilio-python does), a region alone gives its co-located edge (see
    :data:`DEFAULT_EDGE`), and neither gives :data:`DEFAULT_BASE_URL`. Raises
    :class:`ValueError` for a region or edge Twilio does not have, or an override that is
    not an absolute http(s) URL. Regions are isolated: the Auth Token of one region does not
    authenticate in another, so this must match where the account's resources live.
    """
    if override:
        parts = urlsplit(override)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"Twilio API URL must be an absolute http(s) URL, got {override!r}")
        return override.rstrip("/")
    region = (region or "").strip().lower()
    edge = (edge or "").strip().lower()
    if region and region not in REGIONS:
        raise ValueError(f"unknown Twilio region {region!r} (known: {', '.join(REGIONS)})")
    if edge and edge not in EDGES:
        raise ValueError(f"unknown Twilio edge {edge!r} (known: {', '.join(EDGES)})")
    if not region and not edge:
        return DEFAULT_BASE_URL
    region = region or "us1"
    edge = edge or DEFAULT_EDGE[region]
    return f"https://api.{edge}.{region}.twilio.com"


class TwilioRestError(RelayError):
    """A Twilio REST request failed. ``kind`` says how:

    ``twilio_auth``         401 or code 20003: wrong Account SID / Auth Token (or region)
    ``twilio_not_found``    404 (code 20404): no such resource, or a call already ended
    ``twilio_rejected``     any other 4xx: Twilio refused the parameters (code says why)
    ``twilio_server``       5xx: Twilio failed; the request may be retried later
    ``twilio_timeout``      no complete answer within ``timeout_s``
    ``twilio_unreachable``  could not connect, or the connection broke
    ``twilio_bad_response`` an answer that is not a JSON object (a proxy page, garbage)

    ``status`` is the HTTP status (None without an answer), ``code`` Twilio's error code
    (https://www.twilio.com/docs/api/errors), ``more_info`` its documentation URL.
    """

    kind = "twilio"

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        status: int | None = None,
        code: int | None = None,
        more_info: str | None = None,
    ) -> None:
        super().__init__(message, kind=kind)
        self.status = status
        self.code = code
        self.message = message
        self.more_info = more_info


def _kind_for(status: int, code: int | None) -> str:
    if status == 401 or code == 20003:
        return "twilio_auth"
    if status == 404:
        return "twilio_not_found"
    if 400 <= status < 500:
        return "twilio_rejected"
    if status >= 500:
        return "twilio_server"
    return "twilio_bad_response"  # 1xx/3xx: not something the 2010 API answers


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _form(params: Mapping[str, Any]) -> dict[str, str | list[str]]:
    """Check form parameters: strings, or lists of strings for repeated fields.

    Strict on purpose: ``True`` or ``30`` would be encoded by httpx as ``true``/``30``,
    which happens to be right, but ``None`` would become an empty value that clears the
    setting on Twilio's side, so the caller must spell out what it sends.
    """
    out: dict[str, str | list[str]] = {}
    for key, value in params.items():
        if isinstance(value, str):
            out[key] = value
        elif isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
            out[key] = list(value)
        else:
            raise TypeError(f"Twilio parameter {key} must be a string or list of strings")
    return out


class TwilioRest:
    """Twilio REST client for one account. Use as ``async with TwilioRest(...) as rest:``
    or call :meth:`aclose` when done (it owns a connection pool).

    ``timeout_s`` bounds each request as a whole (connect, send, and the complete answer),
    not just each socket operation, so a server that trickles bytes still times out.
    """

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        timeout_s: float = 10.0,
    ) -> None:
        if not account_sid or not auth_token:
            raise ValueError("Twilio account_sid and auth_token are both required")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.account_sid = account_sid
        self.base_url = base_url_for(None, None, base_url)
        self.timeout_s = timeout_s
        self._auth_token = auth_token
        self._prefix = f"/{API_VERSION}/Accounts/{quote(account_sid, safe='')}"
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            auth=httpx.BasicAuth(account_sid, auth_token),
            headers={"User-Agent": f"relay/{__version__}", "Accept": "application/json"},
            timeout=httpx.Timeout(timeout_s),
            # Twilio does not redirect API calls; following one would resend credentials.
            follow_redirects=False,
            # trust_env (default): HTTPS_PROXY / NO_PROXY / SSL_CERT_FILE work as operators
            # expect from any HTTP client.
        )

    def __repr__(self) -> str:
        return (
            f"TwilioRest(account_sid={self.account_sid!r}, "
            f"auth_token={mask(self._auth_token)!r}, base_url={self.base_url!r})"
        )

    async def __aenter__(self) -> TwilioRest:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    # --- resources ------------------------------------------------------------------------
    async def fetch_account(self) -> dict[str, Any]:
        """The Account resource (``status`` is active, suspended or closed); the cheapest
        way to check that the SID, token and region go together. Twilio includes the
        account's ``auth_token`` in this answer; it is dropped here, so it cannot end up in
        a log, a report or a store by accident.
        https://www.twilio.com/docs/iam/api/account#fetch-an-account-resource"""
        account = await self._request("GET", f"{self._prefix}.json")
        account.pop("auth_token", None)
        return account

    async def list_numbers(
        self, phone_number: str | None = None, *, page_size: int | None = None
    ) -> list[dict[str, Any]]:
        """IncomingPhoneNumber resources of the account, all pages.

        ``phone_number`` is Twilio's ``PhoneNumber`` filter, which also matches partial
        numbers, so callers wanting one number must compare ``phone_number`` exactly.
        ``page_size`` is sent as ``PageSize`` (Twilio's default is 50, maximum 1000).
        https://www.twilio.com/docs/phone-numbers/api/incomingphonenumber-resource
        """
        query: dict[str, str] = {}
        if phone_number is not None:
            query["PhoneNumber"] = phone_number
        if page_size is not None:
            query["PageSize"] = str(page_size)
        path = f"{self._prefix}/IncomingPhoneNumbers.json"
        numbers: list[dict[str, Any]] = []
        seen: set[str] = set()
        page = await self._request("GET", path, params=query)
        for _ in range(MAX_PAGES):
            items = page.get("incoming_phone_numbers")
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise TwilioRestError(
                    f"Twilio answered GET {path} without an incoming_phone_numbers list",
                    kind="twilio_bad_response",
                    status=200,
                )
            numbers.extend(items)
            next_uri = page.get("next_page_uri")
            if not next_uri:
                return numbers
            next_path = self._same_account_path(next_uri)
            if next_path in seen:
                raise TwilioRestError(
                    f"Twilio paging loops at {next_uri}", kind="twilio_bad_response", status=200
                )
            seen.add(next_path)
            page = await self._request("GET", next_path)
        raise TwilioRestError(
            f"Twilio paging of {path} exceeds {MAX_PAGES} pages",
            kind="twilio_bad_response",
            status=200,
        )

    async def update_number(self, number_sid: str, **params: str) -> dict[str, Any]:
        """Update an IncomingPhoneNumber (``PN…``); parameters in Twilio's names
        (``VoiceUrl``, ``VoiceMethod``, ``StatusCallback``, ``StatusCallbackMethod``).
        Returns the updated resource.
        https://www.twilio.com/docs/phone-numbers/api/incomingphonenumber-resource#update-an-incomingphonenumber-resource
        """
        path = f"{self._prefix}/IncomingPhoneNumbers/{quote(number_sid, safe='')}.json"
        return await self._request("POST", path, data=_form(params))

    async def create_call(self, params: Mapping[str, str | list[str]]) -> dict[str, Any]:
        """Start an outbound call (``To``, ``From``, and one of ``Url``/``Twiml``/
        ``ApplicationSid``; list values become repeated fields, e.g.
        ``StatusCallbackEvent``). Returns the Call resource (status ``queued``).
        https://www.twilio.com/docs/voice/api/call-resource#create-a-call-resource
        """
        return await self._request("POST", f"{self._prefix}/Calls.json", data=_form(params))

    async def update_call(self, call_sid: str, **params: str) -> dict[str, Any]:
        """Modify a live call: ``Status="completed"`` hangs up, ``Twiml=``/``Url=``
        redirects. A 404 (code 20404) on hang-up means the call already ended.
        https://www.twilio.com/docs/voice/api/call-resource#update-a-call-resource
        """
        path = f"{self._prefix}/Calls/{quote(call_sid, safe='')}.json"
        return await self._request("POST", path, data=_form(params))

    # --- transport ------------------------------------------------------------------------
    def _same_account_path(self, uri: str) -> str:
        """``next_page_uri`` as a path on our base URL, refusing any other host or account:
        the Basic credentials go wherever the request goes."""
        parts = urlsplit(uri)
        if parts.scheme or parts.netloc:
            base = urlsplit(self.base_url)
            if (parts.scheme, parts.netloc) != (base.scheme, base.netloc):
                raise TwilioRestError(
                    f"Twilio paging points to another host: {uri}",
                    kind="twilio_bad_response",
                    status=200,
                )
        if not parts.path.startswith(self._prefix + "/"):
            raise TwilioRestError(
                f"Twilio paging points outside the account: {uri}",
                kind="twilio_bad_response",
                status=200,
            )
        return parts.path + (f"?{parts.query}" if parts.query else "")

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        data: Mapping[str, str | list[str]] | None = None,
    ) -> dict[str, Any]:
        what = f"{method} {path}"
        status: int | None = None
        body = b""
        timed_out = False
        with trio.move_on_after(self.timeout_s) as scope:
            try:
                request = self._client.build_request(method, path, params=params, data=data)
                response = await self._client.send(request, stream=True)
                try:
                    status = response.status_code
                    body = await self._read_capped(response, what)
                finally:
                    await response.aclose()
            except httpx.TimeoutException:
                timed_out = True  # httpx's per-operation timeout; reported like the deadline
            except httpx.ConnectError as exc:
                reason = _one_line(str(exc)) or "connection refused"
                raise TwilioRestError(
                    f"Twilio unreachable at {self.base_url}: {reason}",
                    kind="twilio_unreachable",
                ) from exc
            except httpx.RemoteProtocolError as exc:
                raise TwilioRestError(
                    f"Twilio sent a broken HTTP answer to {what}: {_one_line(str(exc))}",
                    kind="twilio_bad_response",
                    status=status,
                ) from exc
            except httpx.TransportError as exc:
                reason = _one_line(str(exc)) or type(exc).__name__
                raise TwilioRestError(
                    f"connection to Twilio failed during {what}: {reason}",
                    kind="twilio_unreachable",
                    status=status,
                ) from exc
            except httpx.HTTPError as exc:  # e.g. a body that does not decode
                raise TwilioRestError(
                    f"Twilio answer to {what} is unusable: {_one_line(str(exc))}",
                    kind="twilio_bad_response",
                    status=status,
                ) from exc
        if timed_out or scope.cancelled_caught or status is None:
            raise TwilioRestError(
                f"Twilio did not answer {what} within {self.timeout_s:g}s",
                kind="twilio_timeout",
                status=status,
            )
        log.debug("twilio %s -> %d", what, status)
        return self._parse(status, body, what)

    @staticmethod
    async def _read_capped(response: httpx.Response, what: str) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise TwilioRestError(
                    f"Twilio answer to {what} exceeds {MAX_RESPONSE_BYTES} bytes",
                    kind="twilio_bad_response",
                    status=response.status_code,
                )
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _parse(status: int, body: bytes, what: str) -> dict[str, Any]:
        try:
            doc = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            doc = None
        if 200 <= status < 300:
            if not isinstance(doc, dict):
                raise TwilioRestError(
                    f"Twilio {status} to {what} is not a JSON object"
                    + (f": {_one_line(body.decode('utf-8', 'replace'), 80)}" if body else ""),
                    kind="twilio_bad_response",
                    status=status,
                )
            return doc
        # Twilio's error shape: {"code": 20404, "message": "...", "more_info": "...", ...}
        code: int | None = None
        message = ""
        more_info: str | None = None
        if isinstance(doc, dict):
            raw_code = doc.get("code")
            if isinstance(raw_code, int) and not isinstance(raw_code, bool):
                code = raw_code
            elif isinstance(raw_code, str) and raw_code.isdigit():
                code = int(raw_code)
            if isinstance(doc.get("message"), str):
                message = _one_line(doc["message"])
            if isinstance(doc.get("more_info"), str):
                more_info = doc["more_info"]
        if not message:
            try:
                message = HTTPStatus(status).phrase
            except ValueError:
                message = "error"
        head = f"Twilio {status}" + (f" (code {code})" if code is not None else "")
        raise TwilioRestError(
            f"{head}: {message}",
            kind=_kind_for(status, code),
            status=status,
            code=code,
            more_info=more_info,
        )
