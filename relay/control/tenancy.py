"""Tenant-level operations shared by the ``/api/v1`` API and the ``relay`` CLI.

The default tenant's Twilio account and numbers come from ``relay.toml`` (``[twilio]``
``account_sid`` + ``auth_token``, the E.164 keys of ``[numbers]``); every other tenant's
from the store.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config
from ..errors import RelayError
from . import twilio_rest
from .numbers import SyncReport, sync_numbers
from .phone import is_e164
from .store import DEFAULT_TENANT, Store


class NotConfigured(RelayError):
    """The tenant has no Twilio account to act with."""

    kind = "not_configured"


@dataclass(frozen=True)
class TenantTwilio:
    account_sid: str
    auth_token: str
    region: str | None
    edge: str | None
    numbers: list[str]

    def client(self, cfg: Config) -> twilio_rest.TwilioRest:
        base = twilio_rest.base_url_for(self.region, self.edge, cfg.twilio.api_base_url or None)
        return twilio_rest.TwilioRest(
            self.account_sid, self.auth_token, base_url=base, timeout_s=cfg.twilio.rest_timeout_s
        )


async def tenant_twilio(cfg: Config, store: Store | None, tenant_id: str) -> TenantTwilio:
    if tenant_id == DEFAULT_TENANT:
        if not (cfg.twilio.account_sid and cfg.twilio.auth_token):
            raise NotConfigured(
                "the default tenant's Twilio account is [twilio] account_sid + auth_token "
                "in relay.toml (or RELAY_TWILIO_*)"
            )
        return TenantTwilio(
            cfg.twilio.account_sid,
            cfg.twilio.auth_token,
            cfg.twilio.region or None,
            cfg.twilio.edge or None,
            [n for n in cfg.numbers if is_e164(n)],
        )
    if store is None:
        raise NotConfigured("no store configured")
    account = await store.run(store.get_twilio, tenant_id)
    if account is None:
        raise NotConfigured("no Twilio settings saved for this tenant")
    rows = await store.run(store.list_numbers, tenant_id)
    return TenantTwilio(
        account.account_sid,
        store.auth_token(account),
        account.region,
        account.edge,
        [r.number for r in rows],
    )


async def sync_tenant_numbers(cfg: Config, store: Store | None, tenant_id: str) -> SyncReport:
    """Point every number of the tenant at this relay; remember each outcome."""
    account = await tenant_twilio(cfg, store, tenant_id)
    async with account.client(cfg) as rest:
        report = await sync_numbers(
            rest,
            account.numbers,
            voice_url=f"{cfg.public_url}/twilio/voice",
            status_url=f"{cfg.public_url}/twilio/status",
        )
    if store is not None and not report.error and tenant_id != DEFAULT_TENANT:
        await store.run(
            store.record_sync, tenant_id, [(r.number, r.outcome, r.reason) for r in report.results]
        )
    return report
