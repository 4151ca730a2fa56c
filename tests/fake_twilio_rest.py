"""A local fake of Twilio's REST API 2010-04-01 (the parts the relay uses), on Trio + h11.

It refuses what Twilio refuses, with Twilio's error shape
``{"code", "message", "more_info", "status"}`` (https://www.twilio.com/docs/usage/twilios-response)
and the codes of Twilio's error dictionary (https://www.twilio.com/docs/api/errors):

* every ``/2010-04-01`` route needs HTTP Basic auth (Account SID : Auth Token); missing or
  wrong -> 401/20003 "Authenticate" with ``WWW-Authenticate``. Another account's
  credentials -> 401/20003 too (20003 lists "using subaccount credentials to access master
  account"), except an owner's credentials on its subaccount, which Twilio allows. A
  ``closed`` account's credentials -> 401/20003; a ``suspended`` account can still fetch
  its Account resource (to see why) and gets 403/20403 everywhere else;
* ``GET  /Accounts/{AC}.json``: the Account (with ``auth_token``, as Twilio returns it);
* ``GET  /Accounts/{AC}/IncomingPhoneNumbers.json``: Twilio's paging envelope;
  ``PhoneNumber`` matches partial numbers (``*`` = any digit), as documented;
  ``PageSize`` 1-1000 (default :attr:`FakeTwilioRest.default_page_size`, Twilio's is 50);
* ``POST /Accounts/{AC}/IncomingPhoneNumbers/{PN}.json``: form body only (anything else
  -> 400/400); ``VoiceUrl``/``StatusCallback``/``VoiceFallbackUrl`` absolute http(s) or
  empty (-> 400/21502), ``*Method`` GET or POST (-> 400/21209); ``VoiceApplicationSid``
  and ``TrunkSid`` clear each other (documented); unknown PN -> 404/20404;
* ``POST /Accounts/{AC}/Calls.json``: ``To`` required (21201) and E.164 or
  ``client:``/``sip:`` (21211); ``From`` required (21213), E.164 (21212) and one of the
  account's numbers (21210); exactly one of ``Url``/``Twiml``/``ApplicationSid`` (none ->
  21205, several -> 21200); ``Url`` absolute http(s) (21205); ``Twiml`` at most 4000
  characters (32018); ``Method``/``StatusCallbackMethod`` GET/POST (21209);
  ``StatusCallback`` a URL (21609); ``StatusCallbackEvent`` (repeated) in initiated,
  ringing, answered, completed; ``Timeout`` integer 1-600, ``TimeLimit`` integer 1-86400,
  ``MachineDetection`` Enable/DetectMessageEnd, ``AsyncAmd``/``Record`` true/false (all
  21200, the Calls resource's generic code). Answers 201 with a ``queued`` Call;
* ``POST /Accounts/{AC}/Calls/{CA}.json``: ``Status`` completed|canceled, ``Url``,
  ``Twiml``. Unknown CA -> 404/20404. Hang-up of a call that already ended -> 404/20404
  (what the relay's reference notes say Twilio answers); redirect of an ended call ->
  400/21220 "Call is not in-progress. Cannot redirect." (Twilio's answer, seen in the
  wild). ``canceled`` only affects queued/ringing calls, as documented.

Placing calls back (:meth:`FakeTwilioRest.answer_calls` with a :class:`Callee`): a created
call with a ``Url`` is then run like Twilio runs it: status callbacks ``initiated``,
``ringing``, ``in-progress``, ``completed`` (or ``busy``/``no-answer``/``failed``) signed
with the account's token, carrying ``SequenceNumber`` and filtered by
``StatusCallbackEvent``; on answer the signed voice webhook at ``Url`` (query string
included), ``AnsweredBy`` when ``MachineDetection`` was asked, and the media stream the
TwiML names, played by ``relay.sim.simulator`` (signed upgrade, 20 ms media, mark echoes,
``<Connect action>`` followed). A REST ``Status=completed`` or a ``Twiml``/``Url`` redirect
ends the stream (``stop``, close) like Twilio; a redirect's ``<Dial>`` target is kept in
``_dialed``. :meth:`FakeTwilioRest.wait_done` waits for a placed call's end.

Failure injection per route (:data:`ROUTES`): :meth:`FakeTwilioRest.fail_next`,
:meth:`~FakeTwilioRest.stall` (read the request, never answer), :meth:`~FakeTwilioRest.garbage`
(200 with an HTML body), :meth:`~FakeTwilioRest.fail_number` (updates of one number).
Injected failures apply before authentication, as an outage or a proxy would. Every
request is recorded (:attr:`FakeTwilioRest.requests`), refused or not.

In a test: ``async with fake_twilio_rest() as tw:`` (``tw.url``, ``tw.account``). As a
process, for CLI tests: ``python -m tests.fake_twilio_rest --port 0 --accounts a.json``
(from the repository root; or ``python tests/fake_twilio_rest.py ...`` from anywhere)
prints ``{"url": ...}`` on its first stdout line and serves until SIGTERM/SIGINT; without
``--accounts`` it has the default account. ``GET /_fake/requests`` and ``GET /_fake/state``
(no auth, outside Twilio's namespace) show what happened. JSON only: a path without
``.json`` (the 2010 API's XML form) is answered 404/20404.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import math
import re
import secrets
import signal
import sys
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from email.utils import formatdate
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import h11
import orjson
import trio

DEFAULT_ACCOUNT_SID = "AC5ef8732a3c49700934481addd5ce1659"
DEFAULT_AUTH_TOKEN = "7c1e94b2d0a35f68e2b4c9d01f7a6e35"
V = "/2010-04-01"
ROUTES = (
    "account",
    "numbers.list",
    "numbers.fetch",
    "numbers.update",
    "calls.create",
    "calls.fetch",
    "calls.update",
)
_A = r"/2010-04-01/Accounts/(?P<account>[^/]+)"
# (route, method, path pattern); a known path with another method -> 405/20004.
_PATTERNS = [
    ("account", "GET", re.compile(_A + r"\.json")),
    ("numbers.list", "GET", re.compile(_A + r"/IncomingPhoneNumbers\.json")),
    ("numbers.fetch", "GET", re.compile(_A + r"/IncomingPhoneNumbers/(?P<sid>[^/]+)\.json")),
    ("numbers.update", "POST", re.compile(_A + r"/IncomingPhoneNumbers/(?P<sid>[^/]+)\.json")),
    ("calls.create", "POST", re.compile(_A + r"/Calls\.json")),
    ("calls.fetch", "GET", re.compile(_A + r"/Calls/(?P<sid>[^/]+)\.json")),
    ("calls.update", "POST", re.compile(_A + r"/Calls/(?P<sid>[^/]+)\.json")),
]
_E164 = re.compile(r"\+[1-9][0-9]{1,14}")  # Twilio's own pattern
_ENDED = ("completed", "canceled", "failed", "busy", "no-answer")
_EVENTS = ("initiated", "ringing", "answered", "completed")
MAX_BODY = 1024 * 1024
MAX_TWIML = 4000


def new_sid(prefix: str) -> str:
    """A Twilio-shaped SID: two letters and 32 hex digits."""
    return prefix + secrets.token_hex(16)


def _now() -> str:
    return formatdate(usegmt=False).replace("-0000", "+0000")  # RFC 2822, as Twilio


class Refusal(Exception):
    """An error answer in Twilio's shape."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> dict[str, Any]:
        more = f"https://www.twilio.com/docs/errors/{self.code}"
        return {
            "code": self.code,
            "message": self.message,
            "more_info": more,
            "status": self.status,
        }


@dataclass
class FakeAccount:
    sid: str
    auth_token: str
    friendly_name: str = "relay test account"
    status: str = "active"  # active | suspended | closed
    owner_account_sid: str | None = None  # a subaccount's owner may use its own credentials
    numbers: dict[str, dict[str, Any]] = field(default_factory=dict)  # PN sid -> resource
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)  # CA sid -> resource
    date_created: str = field(default_factory=_now)

    def resource(self) -> dict[str, Any]:
        uri = f"{V}/Accounts/{self.sid}"
        # fmt: off
        return {
            "sid": self.sid, "friendly_name": self.friendly_name, "status": self.status,
            "auth_token": self.auth_token, "owner_account_sid": self.owner_account_sid or self.sid,
            "type": "Full", "date_created": self.date_created, "date_updated": self.date_created,
            "uri": f"{uri}.json",
            "subresource_uris": {"calls": f"{uri}/Calls.json",
                                 "incoming_phone_numbers": f"{uri}/IncomingPhoneNumbers.json"},
        }
        # fmt: on

    def number_by_e164(self, e164: str) -> dict[str, Any] | None:
        return next((n for n in self.numbers.values() if n["phone_number"] == e164), None)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    route: str | None
    user: str | None  # the Basic-auth user (an Account SID), None without credentials
    content_type: str
    user_agent: str
    query: dict[str, list[str]]
    form: dict[str, list[str]]

    def value(self, name: str) -> str | None:
        """First form (or query) value of ``name``."""
        values = self.form.get(name) or self.query.get(name)
        return values[0] if values else None


@dataclass
class _Injection:
    kind: str  # fail | stall | garbage
    times: int | None  # None: every request from now on
    status: int = 500
    code: int = 20500
    message: str = "Internal Server Error"


class FakeTwilioRest:
    """The fake's state and request handling; see the module docstring."""

    def __init__(self) -> None:
        self.accounts: dict[str, FakeAccount] = {}
        self.requests: list[RecordedRequest] = []
        self.default_page_size = 50
        self.port = 0
        self._injections: dict[str, list[_Injection]] = {}
        self._failing_numbers: dict[str, Refusal] = {}
        #: set by serve(): where placed calls run
        self.nursery: trio.Nursery | None = None
        self.callback_errors: list[str] = []
        self._callee: Callee | None = None
        self._callees: list[Callee] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def account(self) -> FakeAccount:
        """The first account (the default one made by :func:`fake_twilio_rest`)."""
        return next(iter(self.accounts.values()))

    # --- state ------------------------------------------------------------------------
    def add_account(
        self, sid: str | None = None, auth_token: str | None = None, **kw: Any
    ) -> FakeAccount:
        acct = FakeAccount(sid or new_sid("AC"), auth_token or secrets.token_hex(16), **kw)
        self.accounts[acct.sid] = acct
        return acct

    def add_number(
        self, phone_number: str, account: FakeAccount | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Add an IncomingPhoneNumber, with the fields Twilio returns (overridable: e.g.
        ``voice_application_sid="AP…"``, ``trunk_sid="TK…"``, ``voice_url=...``)."""
        acct = account or self.account
        sid = fields.pop("sid", None) or new_sid("PN")
        uri = f"{V}/Accounts/{acct.sid}/IncomingPhoneNumbers/{sid}.json"
        now = _now()
        # fmt: off
        resource: dict[str, Any] = {
            "sid": sid, "account_sid": acct.sid, "phone_number": phone_number,
            "friendly_name": phone_number, "api_version": "2010-04-01", "beta": False,
            "capabilities": {"voice": True, "sms": True, "mms": True, "fax": False},
            "voice_url": "", "voice_method": "POST", "voice_fallback_url": "",
            "voice_fallback_method": "POST", "voice_caller_id_lookup": False,
            "voice_application_sid": "",  # Twilio sends "" here ...
            "trunk_sid": None,  # ... and null here: clients must treat both as unset
            "voice_receive_mode": "voice", "status_callback": "", "status_callback_method": "POST",
            "sms_url": "", "sms_method": "POST", "sms_application_sid": "", "origin": "twilio",
            "status": "in-use", "emergency_status": "Inactive", "address_requirements": "none",
            "date_created": now, "date_updated": now, "uri": uri,
        }
        # fmt: on
        resource.update(fields)
        acct.numbers[sid] = resource
        return resource

    def rotate_token(self, account: FakeAccount | None = None) -> str:
        """Replace the account's Auth Token (the old one stops working at once)."""
        acct = account or self.account
        acct.auth_token = secrets.token_hex(16)
        return acct.auth_token

    def set_call_status(self, call_sid: str, status: str) -> None:
        for acct in self.accounts.values():
            if call_sid in acct.calls:
                acct.calls[call_sid]["status"] = status
                return
        raise KeyError(call_sid)

    @property
    def created_calls(self) -> list[dict[str, Any]]:
        """Every Call created, in order (the resource; ``_params`` holds the form)."""
        calls = [c for a in self.accounts.values() for c in a.calls.values()]
        return sorted(calls, key=lambda c: c["_seq"])

    @property
    def writes(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == "POST"]

    # --- placing calls back ---------------------------------------------------------------
    def answer_calls(self, callee: Callee | None = None, *, once: bool = False) -> Callee:
        """Place every created call (with a ``Url``) back at its Url like Twilio would;
        ``once``: only the next call (queued before the default)."""
        callee = callee or Callee()
        if once:
            self._callees.append(callee)
        else:
            self._callee = callee
        return callee

    def _next_callee(self) -> Callee | None:
        return self._callees.pop(0) if self._callees else self._callee

    def call(self, sid: str) -> dict[str, Any]:
        for acct in self.accounts.values():
            if sid in acct.calls:
                return acct.calls[sid]
        raise KeyError(sid)

    async def wait_done(self, sid: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the placed call ``sid`` has ended (its last callback sent)."""
        call = self.call(sid)
        with trio.fail_after(timeout):
            await call["_done"].wait()
        return call

    # --- failure injection ----------------------------------------------------------------
    def _inject(self, route: str, injection: _Injection) -> None:
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; known: {ROUTES}")
        self._injections.setdefault(route, []).append(injection)

    def fail_next(
        self,
        route: str,
        status: int = 500,
        *,
        code: int | None = None,
        message: str | None = None,
        times: int | None = 1,
    ) -> None:
        """Answer the next ``times`` requests on ``route`` with an error (before auth)."""
        msg = message or ("Internal Server Error" if status >= 500 else "Bad Request")
        self._inject(route, _Injection("fail", times, status, code or 20000 + status, msg))

    def stall(self, route: str, *, times: int | None = 1) -> None:
        """Read the next requests on ``route`` and never answer (client timeouts)."""
        self._inject(route, _Injection("stall", times))

    def garbage(self, route: str, *, times: int | None = 1) -> None:
        """Answer the next requests on ``route`` 200 with an HTML page, not JSON."""
        self._inject(route, _Injection("garbage", times))

    def fail_number(
        self, e164: str, status: int = 400, code: int = 21502, message: str = "Invalid callback url"
    ) -> None:
        """Refuse every update of the number ``e164`` (until :meth:`clear_failures`)."""
        self._failing_numbers[e164] = Refusal(status, code, message)

    def clear_failures(self) -> None:
        self._injections.clear()
        self._failing_numbers.clear()

    def _take_injection(self, route: str) -> _Injection | None:
        queue = self._injections.get(route)
        if not queue:
            return None
        inj = queue[0]
        if inj.times is not None:
            inj.times -= 1
            if inj.times <= 0:
                queue.pop(0)
        return inj

    # --- request handling -----------------------------------------------------------------
    async def handle(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(target)
        path, query = parts.path, parse_qs(parts.query, keep_blank_values=True)
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        form = (
            parse_qs(body.decode("latin-1"), keep_blank_values=True)
            if ctype == "application/x-www-form-urlencoded"
            else {}
        )
        user, password = _basic_auth(headers.get("authorization", ""))
        route, match, known_path = None, None, False
        for name, verb, pattern in _PATTERNS:
            m = pattern.fullmatch(path)
            if m:
                known_path = True
                if verb == method:
                    route, match = name, m
                    break
        if path.startswith("/_fake/"):
            return self._debug(path)
        self.requests.append(
            RecordedRequest(
                method, path, route, user, ctype, headers.get("user-agent", ""), query, form
            )
        )
        try:
            if match is None:
                if known_path:
                    raise Refusal(405, 20004, "Method not allowed")
                raise Refusal(404, 20404, f"The requested resource {path} was not found")
            assert route is not None
            inj = self._take_injection(route)
            if inj is not None and inj.kind == "stall":
                await trio.sleep_forever()
            if inj is not None and inj.kind == "garbage":
                page = b"<html><body><h1>Service Unavailable</h1></body></html>"
                return 200, {"content-type": "text/html"}, page
            if inj is not None:
                raise Refusal(inj.status, inj.code, inj.message)
            acct = self._authorize(match["account"], user, password, route)
            if method == "POST" and ctype != "application/x-www-form-urlencoded":
                raise Refusal(400, 400, "Request body must be application/x-www-form-urlencoded")
            handler = getattr(self, "_" + route.replace(".", "_"))
            status, doc = handler(acct, match, query, form)
        except Refusal as r:
            hdrs = {"content-type": "application/json"}
            if r.status == 401:
                hdrs["www-authenticate"] = 'Basic realm="Twilio API"'
            return r.status, hdrs, orjson.dumps(r.body())
        return status, {"content-type": "application/json"}, orjson.dumps(doc)

    def _authorize(
        self, path_sid: str, user: str | None, password: str | None, route: str
    ) -> FakeAccount:
        """Basic auth as Twilio does it (https://www.twilio.com/docs/errors/20003)."""
        denied = Refusal(401, 20003, "Authenticate")
        caller = self.accounts.get(user or "")
        if (
            caller is None
            or password is None
            or not secrets.compare_digest(password.encode(), caller.auth_token.encode())
        ):
            raise denied
        if caller.status == "closed":
            raise denied
        target = self.accounts.get(path_sid)
        if target is None or (target is not caller and target.owner_account_sid != caller.sid):
            raise denied
        if caller.status != "active" and route != "account":
            raise Refusal(403, 20403, "Account is not active")  # errors/20403
        return target

    def _debug(self, path: str) -> tuple[int, dict[str, str], bytes]:
        hdrs = {"content-type": "application/json"}
        if path == "/_fake/requests":
            return 200, hdrs, orjson.dumps([asdict(r) for r in self.requests])
        if path == "/_fake/state":
            return 200, hdrs, orjson.dumps({s: asdict(a) for s, a in self.accounts.items()})
        return 404, hdrs, b"{}"

    # --- routes -----------------------------------------------------------------------
    def _account(self, acct: FakeAccount, m: re.Match[str], q: Any, f: Any) -> tuple[int, Any]:
        return 200, acct.resource()

    def _numbers_list(
        self, acct: FakeAccount, m: re.Match[str], q: dict[str, list[str]], f: Any
    ) -> tuple[int, Any]:
        size = _int(q, "PageSize", 1, 1000, code=20001) or self.default_page_size
        page = _int(q, "Page", 0, 10**6, code=20001) or 0
        items = list(acct.numbers.values())
        if "PhoneNumber" in q:  # partial match, '*' = any digit (documented filter)
            pat = re.escape(q["PhoneNumber"][0]).replace(r"\*", "[0-9]")
            items = [n for n in items if re.search(pat, n["phone_number"])]
        base = f"{V}/Accounts/{acct.sid}/IncomingPhoneNumbers.json"
        keep = {k: v[0] for k, v in q.items() if k not in ("Page", "PageSize", "PageToken")}

        def uri(p: int) -> str:
            return base + "?" + urlencode({**keep, "PageSize": size, "Page": p})

        chunk = items[page * size : (page + 1) * size]
        more = (page + 1) * size < len(items)
        next_uri = uri(page + 1) + f"&PageToken=PA{chunk[-1]['sid'][2:]}" if more else None
        # fmt: off
        return 200, {
            "incoming_phone_numbers": chunk, "page": page, "page_size": size,
            "start": page * size, "end": page * size + max(len(chunk) - 1, 0),
            "uri": uri(page), "first_page_uri": uri(0), "next_page_uri": next_uri,
            "previous_page_uri": uri(page - 1) if page else None,
        }
        # fmt: on

    def _number(self, acct: FakeAccount, m: re.Match[str]) -> dict[str, Any]:
        number = acct.numbers.get(m["sid"])
        if number is None:
            raise Refusal(404, 20404, f"The requested resource {m.group(0)} was not found")
        return number

    def _numbers_fetch(
        self, acct: FakeAccount, m: re.Match[str], q: Any, f: Any
    ) -> tuple[int, Any]:
        return 200, self._number(acct, m)

    def _numbers_update(
        self, acct: FakeAccount, m: re.Match[str], q: Any, f: dict[str, list[str]]
    ) -> tuple[int, Any]:
        number = self._number(acct, m)
        if number["phone_number"] in self._failing_numbers:
            raise self._failing_numbers[number["phone_number"]]
        form = {k: v[-1] for k, v in f.items()}
        for name in ("VoiceUrl", "VoiceFallbackUrl", "StatusCallback", "SmsUrl"):
            if form.get(name) and not _http_url(form[name]):
                raise Refusal(400, 21502, f"{name} is not valid: {form[name]}")
        for name in ("VoiceMethod", "VoiceFallbackMethod", "StatusCallbackMethod", "SmsMethod"):
            if name in form and form[name].upper() not in ("GET", "POST"):
                raise Refusal(400, 21209, f"{name} must be GET or POST")
        if form.get("VoiceApplicationSid"):  # "setting one deletes the other"
            number["trunk_sid"] = None
        if form.get("TrunkSid"):
            number["voice_application_sid"] = ""
        # fmt: off
        names = {"FriendlyName": "friendly_name", "VoiceUrl": "voice_url",
                 "VoiceMethod": "voice_method", "VoiceFallbackUrl": "voice_fallback_url",
                 "VoiceFallbackMethod": "voice_fallback_method", "SmsUrl": "sms_url",
                 "StatusCallback": "status_callback", "SmsMethod": "sms_method",
                 "StatusCallbackMethod": "status_callback_method",
                 "VoiceApplicationSid": "voice_application_sid", "TrunkSid": "trunk_sid"}
        # fmt: on
        for param, key in names.items():  # unknown parameters are ignored (warning 20001)
            if param in form:
                value = form[param]
                number[key] = value.upper() if param.endswith("Method") else value
        number["date_updated"] = _now()
        return 200, number

    def _calls_create(
        self, acct: FakeAccount, m: re.Match[str], q: Any, f: dict[str, list[str]]
    ) -> tuple[int, Any]:
        form = {k: v[-1] for k, v in f.items()}
        to, from_ = form.get("To", ""), form.get("From", "")
        if not to:
            raise Refusal(400, 21201, "No 'To' number is specified")
        if not from_:
            raise Refusal(400, 21213, "No 'From' number is specified")
        if not (_E164.fullmatch(to) or to.startswith(("client:", "sip:"))):
            raise Refusal(400, 21211, f"Invalid 'To' Phone Number: {to}")
        if not _E164.fullmatch(from_):
            raise Refusal(400, 21212, f"Invalid 'From' Phone Number: {from_}")
        caller_id = acct.number_by_e164(from_)
        if caller_id is None:
            msg = (
                f"The source phone number provided, {from_}, is not yet verified for your "
                "account. You may only make calls from phone numbers that you've verified or "
                "purchased from Twilio."
            )
            raise Refusal(400, 21210, msg)
        given = [k for k in ("Url", "Twiml", "ApplicationSid") if form.get(k)]
        if not given:
            raise Refusal(400, 21205, "Either a 'Url', 'Twiml' or 'ApplicationSid' is required")
        if len(given) > 1:
            raise Refusal(400, 21200, f"Only one of {', '.join(given)} may be given")
        _check_instructions(form)
        if form.get("StatusCallback") and not _http_url(form["StatusCallback"]):
            raise Refusal(400, 21609, f"Invalid 'StatusCallback': {form['StatusCallback']}")
        for event in f.get("StatusCallbackEvent", []):
            for word in event.split():  # Twilio also takes them space-separated
                if word not in _EVENTS:
                    raise Refusal(400, 21200, f"Invalid StatusCallbackEvent: {word}")
        _int({k: [v] for k, v in form.items()}, "Timeout", 1, 600, code=21200)
        _int({k: [v] for k, v in form.items()}, "TimeLimit", 1, 86400, code=21200)
        _choice(form, "MachineDetection", ("Enable", "DetectMessageEnd"))
        for flag in ("AsyncAmd", "Record"):
            _choice(form, flag, ("true", "false"))
        sid, now = new_sid("CA"), _now()
        # fmt: off
        call = {
            "sid": sid, "account_sid": acct.sid, "to": to, "to_formatted": to, "from": from_,
            "from_formatted": from_, "phone_number_sid": caller_id["sid"],
            "status": "queued", "direction": "outbound-api", "api_version": "2010-04-01",
            "date_created": now, "date_updated": now, "start_time": None, "end_time": None,
            "duration": None, "price": None, "price_unit": "USD", "answered_by": None,
            "parent_call_sid": None, "forwarded_from": None, "caller_name": None,
            "group_sid": None, "queue_time": "0", "trunk_sid": None,
            "uri": f"{V}/Accounts/{acct.sid}/Calls/{sid}.json",
        }
        # fmt: on
        acct.calls[sid] = call
        # Underscored keys are the fake's bookkeeping; they are stripped from answers.
        call.update(_seq=next(_SEQ), _params=f, _updates=[], _end=trio.Event(), _done=trio.Event())
        callee = self._next_callee()
        if callee is not None and form.get("Url") and self.nursery is not None:
            self.nursery.start_soon(_place_back, self, acct, call, form, callee)
        else:
            call["_done"].set()
        return 201, _public(call)

    def _call(self, acct: FakeAccount, m: re.Match[str]) -> dict[str, Any]:
        call = acct.calls.get(m["sid"])
        if call is None:
            raise Refusal(404, 20404, f"The requested resource {m.group(0)} was not found")
        return call

    def _calls_fetch(self, acct: FakeAccount, m: re.Match[str], q: Any, f: Any) -> tuple[int, Any]:
        return 200, _public(self._call(acct, m))

    def _calls_update(
        self, acct: FakeAccount, m: re.Match[str], q: Any, f: dict[str, list[str]]
    ) -> tuple[int, Any]:
        call = self._call(acct, m)
        form = {k: v[-1] for k, v in f.items()}
        status = form.get("Status")
        if status is not None and status not in ("completed", "canceled"):
            raise Refusal(400, 21200, f"Invalid Status: {status}")
        _check_instructions(form)
        if call["status"] in _ENDED:
            if status is not None:
                raise Refusal(404, 20404, f"The requested resource {m.group(0)} was not found")
            raise Refusal(400, 21220, "Call is not in-progress. Cannot redirect.")
        call["_updates"].append(f)
        if status == "completed" or (status == "canceled" and call["status"] != "in-progress"):
            call["status"] = "completed" if call["status"] == "in-progress" else "canceled"
            call["end_time"] = _now()
            call["_end"].set()
        elif form.get("Twiml") or form.get("Url"):
            call["_redirects"] = [*call.get("_redirects", []), form.get("Twiml") or form["Url"]]
            call["_end"].set()  # the stream gets `stop`; the new TwiML runs
        call["date_updated"] = _now()
        return 200, _public(call)


_SEQ = itertools.count()


def _public(call: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in call.items() if not k.startswith("_")}


def _basic_auth(header: str) -> tuple[str | None, str | None]:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None, None
    return (user, password) if sep else (None, None)


def _http_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _int(q: dict[str, list[str]], name: str, lo: int, hi: int, *, code: int) -> int | None:
    """An integer parameter within [lo, hi] (None when absent); Twilio refuses others."""
    if name not in q:
        return None
    raw = q[name][0]
    if not re.fullmatch(r"[0-9]{1,9}", raw) or not lo <= int(raw) <= hi:
        raise Refusal(400, code, f"{name} must be an integer between {lo} and {hi}")
    return int(raw)


def _choice(form: dict[str, str], name: str, allowed: tuple[str, ...]) -> None:
    if name in form and form[name] not in allowed:
        raise Refusal(400, 21200, f"{name} must be one of {', '.join(allowed)}")


def _check_instructions(form: dict[str, str]) -> None:
    """Url / Twiml / Method checks shared by create and update (Call resource docs)."""
    if "Url" in form and not _http_url(form["Url"]):
        raise Refusal(400, 21205, f"Url is not a valid URL: {form['Url']}")
    if len(form.get("Twiml", "")) > MAX_TWIML:  # errors/32018
        raise Refusal(400, 32018, "Twiml size exceeded maximum allowed value of 4000 characters")
    for name in ("Method", "FallbackMethod", "StatusCallbackMethod"):
        if name in form and form[name].upper() not in ("GET", "POST"):
            raise Refusal(400, 21209, f"Invalid {name}: {form[name]}")


# --- HTTP/1.1 server (h11), keep-alive included since httpx pools connections ---------------
async def _serve_connection(fake: FakeTwilioRest, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    try:
        while True:
            request, body = None, bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data and request is None:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_BODY:
                        return
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:  # ConnectionClosed, PAUSED
                    return
            assert request is not None
            headers = {k.decode().lower(): v.decode("latin-1") for k, v in request.headers}
            status, hdrs, payload = await fake.handle(
                request.method.decode(), request.target.decode("latin-1"), headers, bytes(body)
            )
            hdrs = {**hdrs, "content-length": str(len(payload)), "twilio-request-id": new_sid("RQ")}
            out = [(k.encode(), v.encode()) for k, v in hdrs.items()]
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=out)))
            await stream.send_all(conn.send(h11.Data(data=payload)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await stream.aclose()


async def serve(
    fake: FakeTwilioRest,
    port: int = 0,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``fake`` on 127.0.0.1:``port`` (0 = ephemeral); reports the port to ``start``."""
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    fake.port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        fake.nursery = nursery
        task_status.started(fake.port)
        await trio.serve_listeners(
            partial(_serve_connection, fake), listeners, handler_nursery=nursery
        )


# --- the callee: Twilio placing a created call -----------------------------------------------
@dataclass
class Callee:
    """How the called party behaves when the fake places a created call.

    ``outcome``: ``answer`` (the voice webhook at the call's Url, then the media stream the
    TwiML names, played by relay's own Twilio simulator: connected/start/media every 20 ms,
    marks echoed as played), or ``busy`` / ``no-answer`` / ``failed`` (no webhook, a
    terminal status callback). ``answered_by`` is sent as ``AnsweredBy`` when the call was
    created with ``MachineDetection`` (default ``human``). The callee hangs up after
    ``duration_s`` of stream (None: stays until relay or a REST update ends the call).
    """

    outcome: str = "answer"
    answered_by: str = "human"
    duration_s: float | None = 10.0
    ring_s: float = 0.05
    audio: bytes | None = None
    #: every placed call's simulator result, by CallSid
    results: dict[str, Any] = field(default_factory=dict)


async def _status_callback(
    fake: FakeTwilioRest,
    acct: FakeAccount,
    call: dict[str, Any],
    form: dict[str, str],
    events: list[str],
    status: str,
    seq: int,
    **extra: str,
) -> None:
    from relay.sim import simulator

    event = {"queued": "initiated", "in-progress": "answered"}.get(status, status)
    if event in ("busy", "no-answer", "failed", "canceled"):
        event = "completed"
    url = form.get("StatusCallback")
    if not url or (events and event not in events):
        return
    params = {
        "CallSid": call["sid"], "AccountSid": acct.sid, "From": call["from"], "To": call["to"],
        "Direction": "outbound-api", "ApiVersion": "2010-04-01", "CallStatus": status,
        "SequenceNumber": str(seq), "CallbackSource": "call-progress-events",
        "Timestamp": _now(), **extra,
    }  # fmt: skip
    try:
        await simulator.http_post_form(url, params, auth_token=acct.auth_token, timeout=5.0)
    except (OSError, trio.TooSlowError, h11.ProtocolError) as exc:
        fake.callback_errors.append(f"{status}: {exc!r}")


async def _place_back(
    fake: FakeTwilioRest,
    acct: FakeAccount,
    call: dict[str, Any],
    form: dict[str, str],
    callee: Callee,
) -> None:
    from relay.sim import simulator

    events = [w for e in call["_params"].get("StatusCallbackEvent", []) for w in e.split()]
    seq = 0

    async def status(value: str, **extra: str) -> None:
        nonlocal seq
        await _status_callback(fake, acct, call, form, events, value, seq, **extra)
        seq += 1

    try:
        for value in ("initiated", "ringing"):
            call["status"] = value
            await status(value)
            if value == "ringing":
                with trio.move_on_after(callee.ring_s):
                    await call["_end"].wait()
            if call["status"] == "canceled":  # hung up through the API while ringing
                await status("canceled", CallDuration="0")
                return
        if callee.outcome != "answer":
            call["status"] = callee.outcome
            await status(callee.outcome, CallDuration="0")
            return
        call["status"] = "in-progress"
        call["start_time"] = _now()
        extra: dict[str, str] = {}
        if form.get("MachineDetection"):
            extra["AnsweredBy"] = callee.answered_by
            call["answered_by"] = callee.answered_by
        await status("in-progress", **extra)
        url = form["Url"]
        parts = urlsplit(url)
        limit = float(form.get("TimeLimit") or 14400)
        result = await simulator.place_call(
            f"{parts.scheme}://{parts.netloc}",
            acct.auth_token,
            audio=callee.audio,
            to=call["to"],
            from_=call["from"],
            call_sid=call["sid"],
            account_sid=acct.sid,
            duration_s=callee.duration_s,
            max_duration_s=limit,
            status_callback=None,
            webhook_url=url,
            direction="outbound-api",
            extra_params=extra,
            end_event=call["_end"],
        )
        callee.results[call["sid"]] = result
        call["_result"] = result
        for twiml in call.get("_redirects", []):  # e.g. a transfer: <Dial> the target
            try:
                dial = ET.fromstring(twiml).find("Dial")
            except ET.ParseError:
                dial = None
            if dial is not None:
                number = dial.find("Number")
                target = number.text if number is not None else dial.text
                call["_dialed"] = (target or "").strip()
                call["_dial_caller_id"] = dial.get("callerId")
        if call["status"] == "in-progress":
            call["status"] = "completed"
            call["end_time"] = _now()
        await status("completed", CallDuration=str(math.ceil(result.duration_s)))
    finally:
        call["_done"].set()


@asynccontextmanager
async def fake_twilio_rest(*, with_default_account: bool = True) -> AsyncIterator[FakeTwilioRest]:
    """Run the fake on an ephemeral loopback port for the ``async with`` body; by default
    with one account (:data:`DEFAULT_ACCOUNT_SID` / :data:`DEFAULT_AUTH_TOKEN`)."""
    fake = FakeTwilioRest()
    if with_default_account:
        fake.add_account(DEFAULT_ACCOUNT_SID, DEFAULT_AUTH_TOKEN)
    body_error: Exception | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, fake)
        try:
            yield fake
        except Exception as exc:  # re-raised outside the nursery: no ExceptionGroup
            body_error = exc
        finally:
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error


def load_accounts(fake: FakeTwilioRest, doc: dict[str, Any]) -> None:
    """``{AC sid: {auth_token, friendly_name?, status?, owner_account_sid?, numbers:
    {PN sid: {phone_number, ...fields}} or [{phone_number, ...}]}}``."""
    for sid, spec in doc.items():
        spec = dict(spec)
        numbers = spec.pop("numbers", {})
        acct = fake.add_account(sid, spec.pop("auth_token"), **spec)
        items = numbers.items() if isinstance(numbers, dict) else ((None, n) for n in numbers)
        for pn_sid, fields in items:
            fields = dict(fields)
            fake.add_number(fields.pop("phone_number"), acct, sid=pn_sid, **fields)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake Twilio REST API for tests")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--accounts", help="JSON file of accounts (see load_accounts)")
    args = parser.parse_args(argv)
    fake = FakeTwilioRest()
    if args.accounts:
        with open(args.accounts, encoding="utf-8") as fh:
            load_accounts(fake, json.load(fh))
    else:
        fake.add_account(DEFAULT_ACCOUNT_SID, DEFAULT_AUTH_TOKEN)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve, fake, args.port)
            print(json.dumps({"url": f"http://127.0.0.1:{port}"}), flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(run)
    sys.exit(0)


if __name__ == "__main__":
    main()
