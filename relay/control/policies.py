"""Per-agent call policies: options every agent accepts, whatever its adapter.

A policy option sits in the agent's own table (``[agents.NAME]`` or the body of
``/api/v1/agents``) next to the adapter's options. :data:`POLICY_OPTIONS` names them; the
agent registry strips them before the adapter sees its options and checks them here, so
``validate_agent`` (the one validation path of both surfaces) refuses a bad value with the
option's name in the message, and no adapter has to know about them.

=========================  ================================================================
``allowed_callers``        E.164 numbers allowed to call (empty: everyone); others are
                           answered ``<Reject reason="busy"/>`` before any agent session
                           opens, recorded as rejected with reason ``not_allowed``
``max_concurrent_calls``   calls this agent serves at once on this machine, across the
                           workers of ``relay serve --workers N`` (0: no limit);
                           beyond it ``<Reject reason="busy"/>``, reason ``concurrent_limit``
``max_call_seconds``       the call's length cap (default 600; ``calls.max_duration_s``
                           stays the process-wide cap); end reason ``max duration``
``fallback_message``       what the caller hears at the cap: Twilio ``<Say>`` runs it after
                           the stream closes (``<Connect action>``), then hangs up
``fallback_voice``         the ``<Say>`` voice (e.g. ``Polly.Joanna-Neural``); default
                           Twilio's
``transfer_to``            E.164 numbers the call may be handed to (``transfer_call`` tool,
                           ``POST /api/v1/calls/{sid}/transfer``)
``hold``, ``hold_*``       what the caller hears while the agent connects (relay/media/hold.py)
call features              ``warm_start``, ``prep_webhook``, ``prep_timeout_ms``, ``record``,
                           ``post_call_webhook``, ``allow_private_urls`` (features.py)
=========================  ================================================================

Runtime state lives in :class:`CallPolicies` (one per process, ``RelayState.policies``):
which admitted call holds a slot of which agent, and the per-call plan the voice webhook
made (the policy, outbound overrides) for the media stream to pick up.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..media.hold import HoldSpec, parse_hold
from .features import FEATURE_OPTIONS, CallFeatures
from .phone import normalize_e164
from .shared_slots import SharedSlots

__all__ = [
    "DEFAULT_MAX_CALL_SECONDS",
    "POLICY_OPTIONS",
    "CallPlan",
    "CallPolicies",
    "CallPolicy",
    "adapter_options",
]

DEFAULT_MAX_CALL_SECONDS = 600.0
#: at most this many entries in an allowlist or a transfer list (a config, not a database)
MAX_NUMBERS = 1000
MAX_MESSAGE_CHARS = 3000  # Twilio's <Say> limit with Polly voices
MAX_CALL_SECONDS = 86400.0  # Twilio's TimeLimit bound

POLICY_OPTIONS = frozenset(
    {
        "allowed_callers",
        "max_concurrent_calls",
        "max_call_seconds",
        "fallback_message",
        "fallback_voice",
        "transfer_to",
        "hold",
        "hold_text",
        "hold_voice",
        "hold_audio",
        "hold_music",
        *FEATURE_OPTIONS,  # warm start, prep, recording, post-call webhook (features.py)
    }
)


def adapter_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` without the policy options (what the adapter's ``from_config`` gets)."""
    return {k: v for k, v in options.items() if k not in POLICY_OPTIONS}


def _numbers(value: Any, key: str, where: str) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):  # an environment override: comma-separated
        items: list[Any] = [v for v in (s.strip() for s in value.split(",")) if v]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ConfigError(f"{where}.{key}: a list of E.164 numbers")
    if len(items) > MAX_NUMBERS:
        raise ConfigError(f"{where}.{key}: at most {MAX_NUMBERS} numbers")
    out: list[str] = []
    for item in items:
        number = normalize_e164(item) if isinstance(item, str) else None
        if number is None:
            raise ConfigError(
                f"{where}.{key}: {str(item)[:20]!r} is not a phone number in E.164 form "
                "(+ country code, digits)"
            )
        if number not in out:
            out.append(number)
    return tuple(out)


def _number(value: Any, key: str, where: str, lo: float, hi: float, *, integer: bool) -> float:
    if isinstance(value, bool):
        value = "?"  # true/false are not numbers here
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not (lo <= number <= hi) or (integer and number != int(number)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where}.{key}: {kind} from {lo:g} to {hi:g}, got {value!r}")
    return number


def _text(value: Any, key: str, where: str, limit: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit:
        raise ConfigError(f"{where}.{key}: text of at most {limit} characters")
    if any(ord(c) < 0x20 and c not in "\t\n" for c in value):
        raise ConfigError(f"{where}.{key}: control characters are not allowed")
    return value.strip()


@dataclass(frozen=True)
class CallPolicy:
    allowed_callers: tuple[str, ...] = ()
    max_concurrent_calls: int = 0
    max_call_seconds: float = DEFAULT_MAX_CALL_SECONDS
    fallback_message: str = ""
    fallback_voice: str = ""
    transfer_to: tuple[str, ...] = ()
    hold: HoldSpec = field(default_factory=HoldSpec)
    features: CallFeatures = field(default_factory=CallFeatures)

    @classmethod
    def from_options(
        cls, options: Mapping[str, Any], *, where: str = "agent", check_files: bool = True
    ) -> CallPolicy:
        """The policy of an agent's options; ConfigError names the option (``where.key``).
        ``check_files``: decode local hold files (when saved; not for each call)."""
        o = options
        return cls(
            allowed_callers=_numbers(o.get("allowed_callers"), "allowed_callers", where),
            max_concurrent_calls=int(
                _number(
                    o.get("max_concurrent_calls", 0),
                    "max_concurrent_calls",
                    where,
                    0,
                    1_000_000,
                    integer=True,
                )
            ),
            max_call_seconds=_number(
                o.get("max_call_seconds", DEFAULT_MAX_CALL_SECONDS),
                "max_call_seconds",
                where,
                1,
                MAX_CALL_SECONDS,
                integer=False,
            ),
            fallback_message=_text(
                o.get("fallback_message"), "fallback_message", where, MAX_MESSAGE_CHARS
            ),
            fallback_voice=_text(o.get("fallback_voice"), "fallback_voice", where, 100),
            transfer_to=_numbers(o.get("transfer_to"), "transfer_to", where),
            hold=parse_hold(o, where, check_files=check_files),
            features=CallFeatures.from_options(o, where=where),
        )

    @classmethod
    def lenient(cls, options: Mapping[str, Any]) -> CallPolicy:
        """For a call: options were validated when saved; a bad one now means defaults."""
        try:
            return cls.from_options(options, check_files=False)
        except ConfigError:
            return cls()

    def allows_caller(self, number: str) -> bool:
        if not self.allowed_callers:
            return True
        normalized = normalize_e164(number)
        return normalized is not None and normalized in self.allowed_callers


@dataclass
class CallPlan:
    """What the voice webhook decided for one call, handed to its media stream."""

    call_sid: str
    tenant_id: str
    agent: str
    policy: CallPolicy
    #: options that replace the agent's for this call (an outbound call's greeting)
    overrides: dict[str, Any] = field(default_factory=dict)
    #: the cap of this call (the policy's, or an outbound call's own)
    max_call_seconds: float = DEFAULT_MAX_CALL_SECONDS
    direction: str = "inbound"
    created: float = field(default_factory=time.monotonic)


class CallPolicies:
    """Process-wide policy state: per-agent slots and the webhooks' per-call plans.

    A call takes a slot of its agent at the voice webhook (so two webhooks racing for the
    last slot cannot both win) and gives it back when its stream ends, when a terminal
    status callback says it never got one, or at the latest ``pending_ttl_s`` after the
    webhook if no stream ever started (its stream token has expired by then anyway).
    """

    def __init__(self, pending_ttl_s: float = 300.0, shared: SharedSlots | None = None) -> None:
        self.pending_ttl_s = pending_ttl_s
        #: the other workers' counts (relay serve --workers N): limits hold across them
        self.shared = shared
        self._shared_held: set[str] = set()
        self._slots: dict[str, tuple[str, str]] = {}  # call_sid -> (tenant, agent)
        self._active: dict[tuple[str, str], int] = {}
        self._pending: dict[str, float] = {}  # call_sid -> admitted at (no stream yet)
        self.plans: dict[str, CallPlan] = {}
        #: call_sid -> (message, voice) for the <Connect action> of a call ended at its cap
        self.after_stream: dict[str, tuple[str, str]] = {}

    # -- slots --------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Calls answered whose streams have not started yet."""
        return len(self._pending)

    def active(self, tenant_id: str, agent: str) -> int:
        return self._active.get((tenant_id, agent), 0)

    def admit(self, call_sid: str, tenant_id: str, agent: str, limit: int) -> bool:
        """Take a slot of the agent for ``call_sid``; False when ``limit`` (>0) is reached."""
        self._expire()
        if call_sid in self._slots:  # a webhook retried: it already holds its slot
            return True
        key = (tenant_id, agent)
        if limit and self._active.get(key, 0) >= limit:
            return False
        if limit and self.shared is not None:
            if not self.shared.admit(key, limit):
                return False
            self._shared_held.add(call_sid)
        self._slots[call_sid] = key
        self._active[key] = self._active.get(key, 0) + 1
        self._pending[call_sid] = time.monotonic()
        return True

    def started(self, call_sid: str) -> None:
        """The call's stream started: its slot is held until :meth:`release`."""
        self._pending.pop(call_sid, None)

    def release(self, call_sid: str) -> None:
        """Give the call's slot back (idempotent) and forget its plan."""
        self._pending.pop(call_sid, None)
        self.plans.pop(call_sid, None)
        key = self._slots.pop(call_sid, None)
        if key is None:
            return
        if call_sid in self._shared_held and self.shared is not None:
            self._shared_held.discard(call_sid)
            self.shared.release(key)
        left = self._active.get(key, 0) - 1
        if left > 0:
            self._active[key] = left
        else:
            self._active.pop(key, None)

    def _expire(self) -> None:
        if not self._pending:
            return
        cutoff = time.monotonic() - self.pending_ttl_s
        for sid in [s for s, t in self._pending.items() if t < cutoff]:
            self.release(sid)

    def awaiting_stream(self) -> int:
        """Calls answered by the voice webhook whose stream has not started yet (nor ended
        by a terminal status callback, nor expired): a drain waits for them."""
        self._expire()
        return len(self._pending)

    def release_pending(self, call_sid: str) -> None:
        """A terminal status callback: free the slot of a call whose stream never started."""
        if call_sid in self._pending:
            self.release(call_sid)

    # -- plans --------------------------------------------------------------------------
    def screen(
        self,
        call_sid: str,
        tenant_id: str,
        agent: str,
        options: Mapping[str, Any],
        from_number: str,
        *,
        outbound: bool = False,
        overrides: Mapping[str, Any] | None = None,
        max_call_seconds: float | None = None,
    ) -> tuple[CallPlan | None, str]:
        """The voice webhook's decision: (plan, "") to answer, (None, reason) to reject.

        Reasons: ``not_allowed`` (caller not in ``allowed_callers``; outbound calls are
        placed by the tenant itself and skip it), ``concurrent_limit``.
        """
        policy = CallPolicy.lenient(options)
        if not outbound and not policy.allows_caller(from_number):
            return None, "not_allowed"
        if not self.admit(call_sid, tenant_id, agent, policy.max_concurrent_calls):
            return None, "concurrent_limit"
        plan = CallPlan(
            call_sid,
            tenant_id,
            agent,
            policy,
            overrides=dict(overrides or {}),
            max_call_seconds=max_call_seconds or policy.max_call_seconds,
            direction="outbound-api" if outbound else "inbound",
        )
        self.plans[call_sid] = plan
        return plan, ""

    def plan(self, call_sid: str) -> CallPlan | None:
        return self.plans.get(call_sid)

    def plan_for_stream(self, call_sid: str, options: Mapping[str, Any]) -> CallPlan:
        """The plan the webhook made (or, when another process answered it, the agent's)."""
        self.started(call_sid)
        plan = self.plans.get(call_sid)
        if plan is None:
            policy = CallPolicy.lenient(options)
            plan = CallPlan(call_sid, "", "", policy, max_call_seconds=policy.max_call_seconds)
        return plan

    # -- the end of a capped call ---------------------------------------------------------
    def ended_at_cap(self, call_sid: str) -> None:
        """The call reached its cap: its ``<Connect action>`` will say the fallback."""
        plan = self.plans.get(call_sid)
        if plan is None or not plan.policy.fallback_message:
            return
        if len(self.after_stream) >= 10_000:
            self.after_stream.pop(next(iter(self.after_stream)))
        self.after_stream[call_sid] = (plan.policy.fallback_message, plan.policy.fallback_voice)
