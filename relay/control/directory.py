"""Who owns a call: the Twilio account behind a webhook, and the agent that answers a number.

Tenants live in the store; what ``relay.toml`` defines (``[twilio]``, ``[agents.*]``,
``[numbers]``, ``calls.default_agent``) is the *default* tenant's, so a single-tenant
deployment keeps working with no store setup at all.

Webhook signatures are checked with the auth token of the account that owns the call
(``AccountSid`` in the webhook): a stored account's token, else the configured
``[twilio]`` account. If ``[twilio] account_sid`` is unset, the configured token serves any
AccountSid no tenant claims (single-tenant deployments from before tenants existed); with
it set, an AccountSid nobody owns is refused like a bad signature.

Lookups are cached for a few seconds: a webhook costs no database round trip in the
common case, and a rotated token or a new number mapping takes effect within the TTL.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from ..config import Config
from ..errors import RelayError
from .store import DEFAULT_TENANT, AgentRow, Store

log = logging.getLogger("relay.control.directory")

CACHE_TTL_S = 5.0

#: Agent types whose adapter reads the vendor API key from the relay's environment
#: (OPENAI_API_KEY, GEMINI_API_KEY, ELEVENLABS_API_KEY) when the option is missing. That
#: fallback is for relay.toml agents only: a stored (tenant's) agent of these types must
#: carry its own ``api_key``, or its calls would run on the deployer's key, and a tenant
#: choosing the agent's ``url`` would be sent that key.
ENV_KEYED_TYPES = frozenset({"openai", "gemini", "elevenlabs", "assemblyai", "deepgram"})


@dataclass(frozen=True)
class Account:
    tenant_id: str
    account_sid: str
    auth_token: str


@dataclass(frozen=True)
class Route:
    """The agent that answers a call: ``agent`` is a stored agent id or a relay.toml name."""

    agent: str
    options: dict[str, Any]


def agent_options(store: Store, row: AgentRow) -> dict[str, Any]:
    """A stored agent's full options (secrets decrypted), as an [agents.NAME] table."""
    options = dict(row.options)
    options.update(store.agent_secrets(row))
    options["type"] = row.type
    return options


class Directory:
    def __init__(self, cfg: Config, store: Store | None) -> None:
        self.cfg = cfg
        self.store = store
        self._cache: dict[tuple[str, str], tuple[float, Any]] = {}

    def _cached(self, key: tuple[str, str]) -> tuple[bool, Any]:
        hit = self._cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return True, hit[1]
        return False, None

    def _remember(self, key: tuple[str, str], value: Any) -> Any:
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = (time.monotonic() + CACHE_TTL_S, value)
        return value

    def forget(self) -> None:
        """Drop cached lookups (after this process changed settings)."""
        self._cache.clear()

    # -- accounts ---------------------------------------------------------------------------
    def _configured(self) -> Account | None:
        token = self.cfg.twilio.auth_token
        if not token:
            return None
        return Account(DEFAULT_TENANT, self.cfg.twilio.account_sid, token)

    async def account(self, account_sid: str) -> Account | None:
        """The account whose token validates a webhook carrying ``account_sid``."""
        configured = self._configured()
        if (
            configured is not None
            and configured.account_sid
            and account_sid == configured.account_sid
        ):
            return configured
        found, value = self._cached(("account", account_sid))
        if not found:
            value = self._remember(("account", account_sid), await self._stored(account_sid))
        if value is not None:
            return value  # type: ignore[no-any-return]
        if configured is not None and not configured.account_sid:
            return Account(DEFAULT_TENANT, account_sid, configured.auth_token)
        return None

    async def _stored(self, account_sid: str) -> Account | None:
        store = self.store
        if store is None or not account_sid:
            return None
        row = await store.run(store.account_by_sid, account_sid)
        if row is None:
            return None
        return Account(row.tenant_id, row.account_sid, store.auth_token(row))

    async def stream_account(self, hint: str) -> Account | None:
        """The account for a stream upgrade on ``/twilio/stream/{hint}`` ('' = configured)."""
        if not hint:
            return self._configured()
        return await self.account(hint)

    # -- agents -------------------------------------------------------------------------------
    async def route(self, tenant_id: str, to_number: str) -> Route | None:
        """The agent for a call to ``to_number``; None when the tenant has none to offer."""
        store = self.store
        agent_id: str | None = None
        if store is not None:
            found, agent_id = self._cached(("number", f"{tenant_id}|{to_number}"))
            if not found:
                agent_id = self._remember(
                    ("number", f"{tenant_id}|{to_number}"),
                    await store.run(store.agent_for_number, tenant_id, to_number),
                )
        if agent_id:
            route = await self.agent(tenant_id, agent_id)
            if route is not None:
                return route
        if tenant_id == DEFAULT_TENANT:
            name = self.cfg.agent_for(to_number)
            return await self.agent(tenant_id, name)
        if store is None:
            return None
        rows = await store.run(store.list_agents, tenant_id)
        if not rows:
            return None
        return await self.agent(tenant_id, rows[0].id)  # the same checks as a mapped agent

    async def agent(self, tenant_id: str, agent: str) -> Route | None:
        """Options of a tenant's agent by id (or, for the default tenant, relay.toml name)."""
        if tenant_id == DEFAULT_TENANT and agent in self.cfg.agents:
            return Route(agent, dict(self.cfg.agents[agent]))
        store = self.store
        if store is None or not agent:
            return None
        found, value = self._cached(("agent", f"{tenant_id}|{agent}"))
        if found:
            return value  # type: ignore[no-any-return]
        try:
            row = await store.run(store.get_agent, tenant_id, agent)
            # a stored (tenant's) agent never falls back to the deployer's environment keys
            route = (
                Route(row.id, {**agent_options(store, row), "env_fallback": False})
                if row is not None
                else None
            )
            if route is not None and route.options["type"] in ENV_KEYED_TYPES:
                if not str(route.options.get("api_key") or "").strip():
                    log.error("agent %s of tenant %s has no api_key: refused", agent, tenant_id)
                    route = None
        except RelayError as exc:
            log.error("agent %s of tenant %s unusable: %s", agent, tenant_id, exc)
            route = None
        return self._remember(("agent", f"{tenant_id}|{agent}"), route)  # type: ignore[no-any-return]
