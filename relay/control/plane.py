"""Open the control plane a relay process runs with: store, secrets, directory, history.

``[store] url = "memory"`` runs without a database (records live in this process only, no
tenants API): the configuration of the relay before the control plane existed, kept for
benchmarks and throwaway runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from ..config import Config
from ..errors import ConfigError
from ..metrics import Metrics
from .directory import Directory
from .history import HistoryWriter
from .secretbox import SecretBox, load_or_create_key_file
from .store import DEFAULT_TENANT, Store, engine_url

log = logging.getLogger("relay.control")

MEMORY = "memory"


@dataclass
class ControlPlane:
    store: Store | None
    directory: Directory
    history: HistoryWriter | None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def secret_box(cfg: Config) -> SecretBox:
    """The configured encryption key(s), or the key file beside an SQLite database."""
    if cfg.security.encryption_key:
        return SecretBox.from_setting(cfg.security.encryption_key)
    url = engine_url(cfg.store.url)
    if url.get_backend_name() != "sqlite":
        raise ConfigError(
            "security.encryption_key is required with a PostgreSQL store (every process "
            "must hold the same key): set RELAY_SECURITY_ENCRYPTION_KEY to the output of "
            "`relay db new-key`"
        )
    if not url.database or url.database == ":memory:":
        return SecretBox.from_setting(SecretBox.new_key())  # dies with the database
    key_file = Path(url.database).expanduser().resolve().parent / "secret.key"
    return SecretBox.from_setting(load_or_create_key_file(key_file))


def open_store(cfg: Config, *, migrate: bool = True) -> Store:
    store = Store(cfg.store.url, secret_box(cfg))
    try:
        if migrate:
            revision = store.upgrade()
            log.info("store %s at schema revision %s", store.describe(), revision)
        store.ensure_tenant(DEFAULT_TENANT, "default (relay.toml)")
    except sa.exc.SQLAlchemyError as exc:
        store.close()
        raise ConfigError(
            f"store {store.describe()} unusable: {exc.__class__.__name__}: {exc}"
        ) from None
    return store


def open_control_plane(cfg: Config, metrics: Metrics) -> ControlPlane:
    if cfg.store.url.strip().lower() == MEMORY:
        return ControlPlane(store=None, directory=Directory(cfg, None), history=None)
    store = open_store(cfg)
    history = HistoryWriter(store, metrics, retention_days=cfg.store.retention_days)
    return ControlPlane(store=store, directory=Directory(cfg, store), history=history)
