"""Caller context before the bridge: the agent's ``prep_webhook``.

While the agent connects, relay POSTs what it knows about the caller to the deployer's URL
(a CRM lookup, say)::

    POST {prep_webhook}
    Content-Type: application/json
    X-Relay-Event: call.prep
    X-Relay-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>   (as the post-call webhook)

    {"event": "call.prep", "call_sid": "CA…", "tenant": "default", "agent": "front_desk",
     "caller": "+14155551234", "country": "US", "called": "+14155550100",
     "direction": "inbound"}

The answer's text is appended to the agent's ``instructions`` for this call (a blank
line between them) and kept in the record as ``caller_profile``. The answer may be plain
text, or JSON: an object's ``instructions`` (or ``profile``) string, or a JSON string;
other JSON is taken as text. At most :data:`MAX_PROFILE_CHARS` characters are kept.

The call never waits longer than ``prep_timeout_ms`` for it: a slow, failing, refused or
empty answer means the call goes on with the agent's own instructions, and the record's
``prep`` says why (``outcome``: ``ok``, ``timeout``, ``error``, ``http_error``,
``refused``, ``empty``, ``not_applied``; ``ms``; ``status``; ``detail``).

With warm start (warm.py) this runs at the voice webhook, before the agent connects, so
its latency is hidden behind Twilio's stream setup too; cold, it runs at the stream's
``start`` while hold audio plays. Adapters take the instructions at connect (session
configuration), which is why the lookup comes first and is bounded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from . import outgoing, signing
from .features import INSTRUCTION_TYPES

if TYPE_CHECKING:
    from ..records import CallRecord
    from ..state import RelayState
    from .policies import CallPlan

log = logging.getLogger("relay.control.prep")

__all__ = ["MAX_PROFILE_CHARS", "agent_options", "profile_text"]

MAX_PROFILE_CHARS = 4000
EVENT = "call.prep"


def profile_text(body: bytes, content_type: str) -> str:
    """The caller context in an answer (see the module docstring), cleaned and bounded."""
    text = body.decode("utf-8", "replace")
    if "json" in content_type or text.lstrip().startswith(("{", '"')):
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            found = value.get("instructions", value.get("profile"))
            text = found if isinstance(found, str) else text
        elif isinstance(value, str):
            text = value
    cleaned = "".join(c for c in text if c in "\n\t" or ord(c) >= 0x20)
    return cleaned.strip()[:MAX_PROFILE_CHARS]


async def agent_options(
    state: RelayState, plan: CallPlan, options: Mapping[str, Any], record: CallRecord
) -> dict[str, Any]:
    """The options this call's agent is created with: the agent's, the call's overrides
    (an outbound greeting), and the prep webhook's caller context in ``instructions``."""
    merged = {**options, **plan.overrides}
    features = plan.policy.features
    if not features.prep_webhook:
        return merged
    profile = await _lookup(state, plan, record, str(merged.get("type", "")))
    if not profile:
        return merged
    if str(merged.get("type", "")) not in INSTRUCTION_TYPES:
        record.prep["outcome"] = "not_applied"
        record.prep["detail"] = f"a {merged.get('type')} agent takes no instructions"
        return merged
    base = str(merged.get("instructions") or "").rstrip()
    merged["instructions"] = f"{base}\n\n{profile}" if base else profile
    return merged


async def _lookup(state: RelayState, plan: CallPlan, record: CallRecord, kind: str) -> str:
    cfg = state.cfg
    features = plan.policy.features
    tenant = record.tenant_id
    agent = record.agent or plan.agent
    payload = {
        "event": EVENT,
        "call_sid": record.call_sid,
        "tenant": tenant,
        "agent": agent,
        "caller": record.from_number,
        "country": record.from_country,
        "called": record.to_number,
        "direction": record.direction,
    }
    body = orjson.dumps(payload)
    timeout_s = features.prep_timeout_ms / 1000.0
    headers = {"Content-Type": "application/json", "X-Relay-Event": EVENT}
    headers.update(await signing.headers_for(state, tenant, body, timeout_s=timeout_s / 2))
    answer = await outgoing.post(
        features.prep_webhook,
        body,
        headers,
        timeout_s=timeout_s,
        allow_private=outgoing.private_allowed(cfg, tenant, agent, features),
    )
    result: dict[str, Any] = {"outcome": answer.kind, "ms": answer.ms}
    if answer.status is not None:
        result["status"] = answer.status
    profile = ""
    if answer.kind == "ok" and not answer.success:
        result["outcome"] = "http_error"
        result["detail"] = f"HTTP {answer.status}"
    elif answer.success:
        profile = profile_text(answer.body, answer.content_type)
        if not profile:
            result["outcome"] = "empty"
    else:
        result["detail"] = answer.detail
    record.prep = result
    record.caller_profile = profile
    if result["outcome"] != "ok":
        state.metrics.error(f"prep_{result['outcome']}")
        log.warning(
            "call %s: prep webhook %s: %s (the call goes on without caller context)",
            record.call_sid,
            outgoing.display_url(features.prep_webhook),
            result.get("detail") or result["outcome"],
        )
    return profile
