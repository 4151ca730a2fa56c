"""Numbers configure themselves: point each Twilio number's voice webhook at the relay.

For every number the relay should answer, :func:`sync_numbers` makes the number's
IncomingPhoneNumber resource say ``VoiceUrl=<relay voice webhook>`` and
``StatusCallback=<relay status callback>``, both with method POST (the relay validates the
``X-Twilio-Signature`` of POSTed form bodies). It is safe to run at every start:

* it first fetches the Account resource, so wrong credentials, a wrong region (regions
  have separate Auth Tokens) or an unreachable API fail the whole run with one message
  and nothing written;
* a number already configured is reported ``updated`` / "already configured" without a
  write, so a second run writes nothing (idempotent);
* numbers it must not or cannot touch are ``skipped`` with the reason: not on this
  account, no voice capability, or routed to a SIP trunk or a TwiML App. Twilio ignores
  ``VoiceUrl`` on such numbers ("If a trunk_sid is present, we ignore all of the voice URLs
  and voice applications"; the same for ``voice_application_sid``:
  https://www.twilio.com/docs/phone-numbers/api/incomingphonenumber-resource), so writing
  it would report success while calls kept going elsewhere. Re-routing them is the
  owner's decision, not ours;
* any failure for one number (refusal, 5xx, timeout, garbage) is reported for that number
  and the others are still processed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from .phone import normalize_e164
from .twilio_rest import TwilioRest, TwilioRestError

__all__ = ["NumberResult", "SyncReport", "desired_config", "plan_number", "sync_numbers"]

UPDATED = "updated"
SKIPPED = "skipped"
FAILED = "failed"


@dataclass(frozen=True)
class NumberResult:
    """What happened to one number. ``outcome`` is ``updated`` (configured now, or
    already), ``skipped`` (left alone on purpose; ``reason`` says why) or ``failed``
    (``reason`` is Twilio's message, ``code`` its error code when it gave one)."""

    number: str
    outcome: str
    reason: str = ""
    code: int | None = None
    sid: str = ""


@dataclass(frozen=True)
class SyncReport:
    """The result of one run. ``error`` set means the whole run failed before touching any
    number (bad SID or token, wrong region, inactive account, Twilio unreachable); then
    ``results`` is empty."""

    results: tuple[NumberResult, ...] = ()
    error: str = ""

    @property
    def ok(self) -> bool:
        """True when the run worked and no number failed (skips are not failures)."""
        return not self.error and all(r.outcome != FAILED for r in self.results)

    def count(self, outcome: str) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "error": self.error,
            "updated": self.count(UPDATED),
            "skipped": self.count(SKIPPED),
            "failed": self.count(FAILED),
            "results": [asdict(r) for r in self.results],
        }


def desired_config(voice_url: str, status_url: str) -> dict[str, str]:
    """The IncomingPhoneNumber parameters (Twilio's names) the relay needs."""
    return {
        "VoiceUrl": voice_url,
        "VoiceMethod": "POST",
        "StatusCallback": status_url,
        "StatusCallbackMethod": "POST",
    }


#: Twilio parameter name -> field of the IncomingPhoneNumber JSON.
_FIELDS = {
    "VoiceUrl": "voice_url",
    "VoiceMethod": "voice_method",
    "StatusCallback": "status_callback",
    "StatusCallbackMethod": "status_callback_method",
}


def _differs(resource: dict[str, Any], param: str, want: str) -> bool:
    have = resource.get(_FIELDS[param]) or ""
    if param.endswith("Method"):
        return str(have).upper() != want
    return have != want


def plan_number(resource: dict[str, Any], desired: dict[str, str]) -> NumberResult | list[str]:
    """Decide, without I/O, what to do with one number's resource: a final
    :class:`NumberResult` (skip, or already configured), or the list of parameters that
    must be written. Trunk and TwiML App fields may be ``null`` or ``""`` when unset."""
    number = str(resource.get("phone_number") or "")
    sid = str(resource.get("sid") or "")
    capabilities = resource.get("capabilities")
    if isinstance(capabilities, dict) and capabilities.get("voice") is False:
        return NumberResult(number, SKIPPED, "number cannot receive voice calls", sid=sid)
    if resource.get("trunk_sid"):
        reason = f"routed to SIP trunk {resource['trunk_sid']}"
        return NumberResult(number, SKIPPED, reason, sid=sid)
    if resource.get("voice_application_sid"):
        app = resource["voice_application_sid"]
        reason = f"routed to TwiML App {app}; VoiceUrl cannot override it"
        return NumberResult(number, SKIPPED, reason, sid=sid)
    changes = [p for p, want in desired.items() if _differs(resource, p, want)]
    if not changes:
        return NumberResult(number, UPDATED, "already configured", sid=sid)
    return changes


def _absolute_http_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


async def sync_numbers(
    rest: TwilioRest, numbers: Sequence[str], *, voice_url: str, status_url: str
) -> SyncReport:
    """Configure ``numbers`` (E.164; common spellings are normalized) to call the relay
    at ``voice_url`` and report call progress to ``status_url``. Never raises for Twilio
    failures: they are in the report."""
    for name, url in (("voice_url", voice_url), ("status_url", status_url)):
        if not _absolute_http_url(url):
            return SyncReport(error=f"{name} must be an absolute http(s) URL, got {url!r}")
    try:
        account = await rest.fetch_account()
    except TwilioRestError as exc:
        hint = (
            " (check the Account SID, Auth Token and region)" if exc.kind == "twilio_auth" else ""
        )
        return SyncReport(error=f"cannot use Twilio account {rest.account_sid}: {exc}{hint}")
    status = account.get("status")
    if status != "active":
        return SyncReport(error=f"Twilio account {rest.account_sid} is {status or 'not active'}")

    desired = desired_config(voice_url, status_url)
    results: list[NumberResult] = []
    seen: set[str] = set()
    for raw in numbers:
        number = normalize_e164(raw)
        if number is None:
            results.append(NumberResult(raw, FAILED, "not a phone number in E.164 form"))
            continue
        if number in seen:
            continue
        seen.add(number)
        results.append(await _sync_one(rest, number, desired))
    return SyncReport(results=tuple(results))


async def _sync_one(rest: TwilioRest, number: str, desired: dict[str, str]) -> NumberResult:
    sid = ""
    try:
        # PhoneNumber also matches partial numbers: keep the exact match only.
        found = [r for r in await rest.list_numbers(number) if r.get("phone_number") == number]
        if not found:
            return NumberResult(number, SKIPPED, "not on this account")
        resource = found[0]
        sid = str(resource.get("sid") or "")
        plan = plan_number(resource, desired)
        if isinstance(plan, NumberResult):
            return plan
        updated = await rest.update_number(sid, **desired)
    except TwilioRestError as exc:
        return NumberResult(number, FAILED, exc.message, code=exc.code, sid=sid)
    not_applied = [p for p, want in desired.items() if _differs(updated, p, want)]
    if not_applied:
        return NumberResult(
            number, FAILED, f"Twilio did not apply {', '.join(not_applied)}", sid=sid
        )
    return NumberResult(number, UPDATED, "set " + ", ".join(plan), sid=sid)
