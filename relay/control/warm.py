"""Warm start: the agent session opens while relay answers the voice webhook.

Without it, a call's agent connects when Twilio's ``start`` arrives on the media stream:
the caller waits for the vendor's handshake, session setup and the first greeting audio
after the stream is up. With ``warm_start`` (relay/control/features.py) the voice webhook
starts that work in the background (:meth:`WarmStarts.begin`): while Twilio reads the
TwiML and opens the stream, the session is configured and its greeting is being
generated. The stream's ``start`` then claims the session (:meth:`WarmStarts.claim`,
keyed by CallSid) and the call goes on exactly as if it had connected it itself: the
greeting audio already buffered goes out at once.

Bounds. The registry holds at most ``server.max_calls`` sessions; beyond it a call starts
cold. A session no stream claims (the stream went to another process, the caller hung up
while ringing, the upgrade was refused) is closed ``calls.warm_start_ttl_s`` after the
webhook (default 15 s; a ``<Say>`` hold prelude lengthens it by its estimated duration,
never past the stream token's TTL), or at once when a terminal status callback says the
call ended. Every outcome is counted: ``relay_warm_starts_total{outcome=...}`` with
``started``, ``claimed``, ``expired``, ``discarded`` (terminal status), ``failed``
(connect failed and nobody claimed it), ``skipped`` (registry full).

A claimed session's connect may still be running; the call waits for it under its own
``media.agent_connect_timeout_s`` with hold audio playing, as a cold connect would, and
a connect failure reaches the call as the same error (same end reason) as a cold one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from .. import netguard
from ..agents.base import Agent, CallInfo
from ..agents.registry import create_agent
from ..errors import AgentError, ConfigError
from ..metrics import Metrics
from . import prep
from .store import DEFAULT_TENANT

if TYPE_CHECKING:
    from ..records import CallRecord
    from ..state import RelayState
    from .policies import CallPlan

log = logging.getLogger("relay.control.warm")

__all__ = ["WarmSession", "WarmStarts", "open_agent"]

#: a <Say> hold prelude speaks about this many characters per second (Polly, Twilio's
#: default voices: ~150 words a minute)
SAY_CHARS_PER_S = 12.0
CLOSE_BOUND_S = 2.0


@dataclass(eq=False)
class WarmSession:
    call_sid: str
    tenant_id: str
    agent_name: str
    agent: Agent | None = None
    error: BaseException | None = None
    claimed: bool = False
    connected: trio.Event = field(default_factory=trio.Event)
    finished: trio.Event = field(default_factory=trio.Event)
    _claim: trio.Event = field(default_factory=trio.Event)
    _scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    async def wait(self) -> Agent:
        """The connected agent; the connect's error if it failed."""
        await self.connected.wait()
        if self.error is not None:
            raise self.error
        assert self.agent is not None
        return self.agent

    def cancel(self) -> None:
        self._scope.cancel()


class WarmStarts:
    """The process's warm sessions, by CallSid (one per process, ``RelayState.warm``)."""

    def __init__(self, metrics: Metrics, *, limit: int = 1000, ttl_s: float = 15.0) -> None:
        self.metrics = metrics
        self.limit = limit
        self.ttl_s = ttl_s
        self._entries: dict[str, WarmSession] = {}
        self._nursery: trio.Nursery | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, call_sid: object) -> bool:
        return call_sid in self._entries

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the sessions' connect tasks (started in the server's lifespan nursery)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    # -- the webhook's side ---------------------------------------------------------------
    def begin(
        self,
        state: RelayState,
        *,
        plan: CallPlan,
        options: Mapping[str, Any],
        record: CallRecord,
        info: CallInfo,
        ttl_s: float | None = None,
    ) -> bool:
        """Start opening the agent session of an answered call; False when it starts cold
        (no runner, registry full, a session for this CallSid exists already)."""
        if self._nursery is None or info.call_sid in self._entries:
            return False
        if len(self._entries) >= self.limit:
            self.metrics.warm_starts["skipped"] += 1
            return False
        entry = WarmSession(info.call_sid, plan.tenant_id, plan.agent)
        ttl = self.ttl_s if ttl_s is None else ttl_s
        entry._scope.deadline = trio.current_time() + ttl
        self._entries[info.call_sid] = entry
        self.metrics.warm_starts["started"] += 1
        self._nursery.start_soon(self._run, state, entry, plan, dict(options), record, info)
        return True

    async def _run(
        self,
        state: RelayState,
        entry: WarmSession,
        plan: CallPlan,
        options: dict[str, Any],
        record: CallRecord,
        info: CallInfo,
    ) -> None:
        try:
            with entry._scope, netguard.guarding(net_guard(state, record)):
                try:
                    merged = await prep.agent_options(state, plan, options, record)
                    entry.agent = _create(state, record, merged)
                    await entry.agent.connect(info)
                except Exception as exc:  # RelayError, OSError, TooSlowError, ConfigError
                    entry.error = exc
                entry.connected.set()
                await entry._claim.wait()  # the stream's start, or the deadline
        finally:
            entry.connected.set()
            if self._entries.get(entry.call_sid) is entry:
                del self._entries[entry.call_sid]
            if not entry.claimed:
                outcome = "failed" if entry.error is not None else "expired"
                if entry._scope.cancel_called and entry._scope.deadline == math.inf:
                    outcome = "discarded"
                self.metrics.warm_starts[outcome] += 1
                log.info("call %s: warm agent session %s, closed", entry.call_sid, outcome)
                await _close(entry.agent, entry.call_sid)
            entry.finished.set()

    def discard(self, call_sid: str, tenant_id: str) -> None:
        """The call ended before its stream (terminal status callback): close its session."""
        entry = self._entries.get(call_sid)
        if entry is not None and entry.tenant_id == tenant_id and not entry.claimed:
            del self._entries[call_sid]
            entry._scope.deadline = math.inf  # marks "discarded" rather than "expired"
            entry._scope.cancel()

    # -- the stream's side ------------------------------------------------------------------
    def claim(self, call_sid: str, tenant_id: str, agent: str) -> WarmSession | None:
        """Hand the warm session of ``call_sid`` to its stream (None: connect cold)."""
        entry = self._entries.pop(call_sid, None)
        if entry is None:
            return None
        if entry.tenant_id != tenant_id or entry.agent_name != agent:
            # The stream token already binds CallSid, tenant and agent: this cannot match a
            # verified stream; never hand a session across anyway.
            entry._scope.cancel()
            return None
        entry.claimed = True
        entry._scope.deadline = math.inf  # the call's own connect bound applies now
        entry._claim.set()
        self.metrics.warm_starts["claimed"] += 1
        return entry


def _from_file(state: RelayState, record: CallRecord) -> bool:
    """The call's agent is the deployer's own (relay.toml), not a tenant's stored one."""
    return record.tenant_id == DEFAULT_TENANT and record.agent in state.cfg.agents


def _create(state: RelayState, record: CallRecord, options: Mapping[str, Any]) -> Agent:
    """The call's agent; only relay.toml's agents may take their vendor key from the
    relay's environment (relay/agents/registry.py, ``env_fallback``). A stored agent whose
    options no longer hold (no key of its own, say) fails the call as an AgentError."""
    try:
        return create_agent(options, env_fallback=_from_file(state, record))
    except ConfigError as exc:
        raise AgentError(f"agent {record.agent}: {exc}", kind="agent_config") from None


def net_guard(state: RelayState, record: CallRecord) -> netguard.Guard:
    """The connection policy of the call's agent (relay/netguard.py), the save-time one of
    relay/http/api.py: a tenant's stored agent reaches public addresses only, checked at
    every connection, unless ``[security] allow_private_urls``; relay.toml's agents may
    point anywhere (a local model server, a test double)."""
    refuse = not _from_file(state, record) and not state.cfg.security.allow_private_urls
    who = f"call {record.call_sid}, agent {record.agent} of tenant {record.tenant_id}"
    return netguard.Guard(refuse, state.metrics, who)


async def _close(agent: Agent | None, call_sid: str) -> None:
    if agent is None:
        return
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_BOUND_S):
        try:
            await agent.aclose()
        except Exception as exc:  # adapters must not raise here; be safe anyway
            log.warning("call %s: warm agent close raised %r", call_sid, exc)


def ttl_for(state: RelayState, plan: CallPlan) -> float:
    """How long a warm session waits for its stream: the configured bound, plus the
    estimated length of a ``<Say>`` hold prelude, never past the stream token's TTL."""
    ttl = state.cfg.calls.warm_start_ttl_s
    hold = plan.policy.hold
    if hold.says:
        ttl += len(hold.text) / SAY_CHARS_PER_S
    return min(ttl, state.cfg.security.token_ttl_s)


def begin_for_webhook(
    state: RelayState,
    plan: CallPlan,
    options: Mapping[str, Any],
    record: CallRecord,
    stream_parameters: Mapping[str, str],
) -> bool:
    """The voice webhook's hook: start the call's agent session now if its agent says so."""
    if not plan.policy.features.warm(str(options.get("type", ""))):
        return False
    info = CallInfo(
        call_sid=plan.call_sid,
        stream_sid="",  # not known before the stream starts; no adapter uses it to connect
        from_number=record.from_number,
        to_number=record.to_number,
        custom_parameters=dict(stream_parameters),
    )
    return state.warm.begin(
        state,
        plan=plan,
        options=options,
        record=record,
        info=info,
        ttl_s=ttl_for(state, plan),
    )


async def open_agent(call: Any, options: Mapping[str, Any], info: CallInfo) -> None:
    """Set ``call.agent`` to a connected agent: the warm session the webhook opened for
    this call, else a new one (prep webhook first, when configured). Raises what a
    connect raises; ``call.agent`` is set as soon as an agent exists, so the call closes
    it whatever happens."""
    state: RelayState = call.state
    plan: CallPlan = call.plan
    # the stream's agent: bound to CallSid and tenant by the verified stream token
    entry = state.warm.claim(call.call_sid, call.tenant_id, call.record.agent)
    if entry is not None:
        call.record.warm_start = True
        try:
            call.agent = await entry.wait()
        except BaseException:
            entry.cancel()
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_BOUND_S):
                await entry.finished.wait()
            call.agent = entry.agent
            raise
        return
    merged = await prep.agent_options(state, plan, options, call.record)
    call.agent = _create(state, call.record, merged)
    await call.agent.connect(info)
