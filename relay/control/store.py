"""The control-plane store: SQLAlchemy Core over SQLite (embedded default) or PostgreSQL.

One schema (``relay.control.schema``), two engines, no dialect forks: every statement here
is portable SQLAlchemy Core (upserts are "update, else insert" in one transaction).
Migrations are Alembic's, run on ``relay serve`` start and by ``relay db upgrade``.

Trio and the database: the drivers (``sqlite3``, ``psycopg``) block, so every method here is
synchronous and callers run it in a worker thread through :meth:`Store.run`, bounded by a
capacity limiter (one thread for SQLite, whose writers serialise anyway; a few for
PostgreSQL). The media path never calls the store at all: call records reach it through
``relay.control.history.HistoryWriter``'s queue.

URLs: ``sqlite:///relative/path.db``, ``sqlite:////abs/path.db``, ``sqlite://`` (in memory,
tests), ``postgresql://user:pass@host/db`` (driven by psycopg 3).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
import sqlalchemy as sa
import trio
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from ..errors import ConfigError, RelayError
from . import schema as t
from .secretbox import SecretBox, tail

log = logging.getLogger("relay.control.store")

T = TypeVar("T")

DEFAULT_TENANT = "default"
KEY_PREFIX = "rk_"


class StoreError(RelayError):
    """The database failed (unreachable, locked too long, constraint broken by a race)."""

    kind = "store"


class Conflict(RelayError):
    """The write contradicts existing data (a name or an account already in use)."""

    kind = "conflict"

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field


def now_ms() -> int:
    return int(time.time() * 1000)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# -- rows ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    created_at: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "created_at": self.created_at}


@dataclass(frozen=True)
class ApiKey:
    id: str
    tenant_id: str
    name: str
    prefix: str
    created_at: int
    revoked_at: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
        }


@dataclass(frozen=True)
class TwilioAccount:
    tenant_id: str
    account_sid: str
    auth_token_enc: str
    auth_token_tail: str
    region: str | None
    edge: str | None
    updated_at: int


@dataclass(frozen=True)
class NumberRow:
    number: str
    agent_id: str | None
    sync_outcome: str
    sync_detail: str
    updated_at: int

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "agent": self.agent_id,
            "sync": {"outcome": self.sync_outcome, "detail": self.sync_detail}
            if self.sync_outcome
            else None,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class AgentRow:
    id: str
    tenant_id: str
    name: str
    type: str
    options: dict[str, Any]
    secrets_enc: str | None
    created_at: int
    updated_at: int


@dataclass
class CallPage:
    calls: list[dict[str, Any]] = field(default_factory=list)
    next_cursor: str | None = None


# -- engine -------------------------------------------------------------------------------
def engine_url(url: str) -> sa.URL:
    """Parse ``url``; PostgreSQL goes through psycopg 3, SQLite files get their folder."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise ConfigError(f"store.url {url!r} is not a database URL") from None
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return parsed
    raise ConfigError(f"store.url: unsupported database {backend!r} (use sqlite or postgresql)")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers never block the writer; busy_timeout: a second process waits for the
    # lock instead of failing at once; foreign keys are off by default in SQLite.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def create_engine(url: str) -> Engine:
    parsed = engine_url(url)
    if parsed.get_backend_name() == "sqlite":
        memory = not parsed.database or parsed.database == ":memory:"
        engine = sa.create_engine(
            parsed,
            connect_args={"check_same_thread": False},
            # one shared connection keeps an in-memory database alive across threads
            poolclass=StaticPool if memory else None,
        )
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(
        parsed, pool_pre_ping=True, pool_size=4, max_overflow=4, connect_args={"connect_timeout": 5}
    )


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


class Store:
    """Synchronous data access (run it through :meth:`run` from Trio code)."""

    def __init__(self, url: str, box: SecretBox) -> None:
        self.url = url
        self.engine = create_engine(url)
        self.box = box
        self.dialect = self.engine.dialect.name
        self.limiter = trio.CapacityLimiter(1 if self.dialect == "sqlite" else 4)
        # An in-memory SQLite database is one connection shared by every thread
        # (StaticPool). Two threads inside a transaction at once interleave on it, and the
        # pool's rollback-on-return of one undoes the other's uncommitted insert (seen as a
        # just-created API key that "does not exist"). One user at a time; files and
        # PostgreSQL have a connection per thread and need no lock.
        memory = self.dialect == "sqlite" and self.engine.url.database in (None, "", ":memory:")
        self._serial: AbstractContextManager[Any] = threading.RLock() if memory else nullcontext()

    def describe(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking store method in a worker thread (cancellable while it waits)."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        with self._serial, self.engine.connect() as c:
            yield c

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self._serial, self.engine.begin() as c:
            yield c

    def _tx(self) -> Any:
        return self.transaction()

    # -- migrations -------------------------------------------------------------------------
    def upgrade(self) -> str:
        """Bring the schema to the newest revision; returns it."""
        from alembic import command
        from alembic.config import Config as AlembicConfig
        from alembic.runtime.migration import MigrationContext

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        try:
            with self.transaction() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
            with self.connect() as conn:
                revision = MigrationContext.configure(conn).get_current_revision()
        except SQLAlchemyError as exc:
            raise StoreError(
                f"database {self.describe()}: {exc.__class__.__name__}: {exc}"
            ) from exc
        return revision or ""

    # -- tenants and keys ---------------------------------------------------------------------
    def ensure_tenant(self, tenant_id: str, name: str) -> None:
        with self._tx() as c:
            if c.execute(sa.select(t.tenants.c.id).where(t.tenants.c.id == tenant_id)).first():
                return
            try:
                c.execute(t.tenants.insert().values(id=tenant_id, name=name, created_at=now_ms()))
            except IntegrityError:  # another process created it meanwhile
                pass

    def create_tenant(self, name: str) -> tuple[Tenant, ApiKey, str]:
        tenant = Tenant(id=new_id("tn"), name=name, created_at=now_ms())
        with self._tx() as c:
            c.execute(t.tenants.insert().values(**tenant.__dict__))
            key, plain = self._insert_key(c, tenant.id, "first key")
        return tenant, key, plain

    def get_tenant(self, tenant_id: str) -> Tenant | None:
        with self.connect() as c:
            row = c.execute(sa.select(t.tenants).where(t.tenants.c.id == tenant_id)).first()
        return Tenant(**row._mapping) if row else None

    def list_tenants(self) -> list[Tenant]:
        with self.connect() as c:
            rows = c.execute(sa.select(t.tenants).order_by(t.tenants.c.created_at)).all()
        return [Tenant(**r._mapping) for r in rows]

    def _insert_key(self, c: Connection, tenant_id: str, name: str) -> tuple[ApiKey, str]:
        plain = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(
            id=new_id("key"),
            tenant_id=tenant_id,
            name=name,
            prefix=plain[:10],
            created_at=now_ms(),
        )
        c.execute(t.api_keys.insert().values(**key.__dict__, key_hash=hash_key(plain)))
        return key, plain

    def create_key(self, tenant_id: str, name: str = "") -> tuple[ApiKey, str]:
        with self._tx() as c:
            return self._insert_key(c, tenant_id, name)

    def list_keys(self, tenant_id: str) -> list[ApiKey]:
        cols = [t.api_keys.c[n] for n in ApiKey.__dataclass_fields__]
        with self.connect() as c:
            rows = c.execute(
                sa.select(*cols)
                .where(t.api_keys.c.tenant_id == tenant_id)
                .order_by(t.api_keys.c.created_at)
            ).all()
        return [ApiKey(**r._mapping) for r in rows]

    def revoke_key(self, tenant_id: str, key_id: str) -> bool:
        with self._tx() as c:
            result = c.execute(
                t.api_keys.update()
                .where(
                    t.api_keys.c.id == key_id,
                    t.api_keys.c.tenant_id == tenant_id,
                    t.api_keys.c.revoked_at.is_(None),
                )
                .values(revoked_at=now_ms())
            )
        return bool(result.rowcount)

    def tenant_for_key(self, plain: str) -> str | None:
        if not plain.startswith(KEY_PREFIX) or len(plain) > 200:
            return None
        with self.connect() as c:
            row = c.execute(
                sa.select(t.api_keys.c.tenant_id).where(
                    t.api_keys.c.key_hash == hash_key(plain), t.api_keys.c.revoked_at.is_(None)
                )
            ).first()
        return str(row[0]) if row else None

    # -- Twilio accounts and numbers ------------------------------------------------------------
    def put_twilio(
        self,
        tenant_id: str,
        *,
        account_sid: str,
        auth_token: str,
        region: str | None,
        edge: str | None,
        numbers: Sequence[str],
    ) -> None:
        """Save the tenant's Twilio account and its number list in one transaction.

        Numbers that stay keep their agent mapping; numbers no longer listed are removed.
        """
        ts = now_ms()
        values = {
            "account_sid": account_sid,
            "auth_token_enc": self.box.encrypt(auth_token),
            "auth_token_tail": tail(auth_token),
            "region": region,
            "edge": edge,
            "updated_at": ts,
        }
        try:
            with self._tx() as c:
                owner = c.execute(
                    sa.select(t.twilio_accounts.c.tenant_id).where(
                        t.twilio_accounts.c.account_sid == account_sid
                    )
                ).first()
                if owner is not None and owner[0] != tenant_id:
                    raise Conflict(
                        "this account_sid is already configured for another tenant",
                        field="account_sid",
                    )
                updated = c.execute(
                    t.twilio_accounts.update()
                    .where(t.twilio_accounts.c.tenant_id == tenant_id)
                    .values(**values)
                )
                if not updated.rowcount:
                    c.execute(t.twilio_accounts.insert().values(tenant_id=tenant_id, **values))
                existing = {
                    r[0]
                    for r in c.execute(
                        sa.select(t.numbers.c.number).where(t.numbers.c.tenant_id == tenant_id)
                    )
                }
                wanted = list(dict.fromkeys(numbers))
                gone = existing - set(wanted)
                if gone:
                    c.execute(
                        t.numbers.delete().where(
                            t.numbers.c.tenant_id == tenant_id, t.numbers.c.number.in_(gone)
                        )
                    )
                for number in wanted:
                    if number not in existing:
                        c.execute(
                            t.numbers.insert().values(
                                tenant_id=tenant_id, number=number, agent_id=None, updated_at=ts
                            )
                        )
        except IntegrityError:
            raise Conflict(
                "this account_sid is already configured for another tenant", field="account_sid"
            ) from None

    def get_twilio(self, tenant_id: str) -> TwilioAccount | None:
        with self.connect() as c:
            row = c.execute(
                sa.select(t.twilio_accounts).where(t.twilio_accounts.c.tenant_id == tenant_id)
            ).first()
        return TwilioAccount(**row._mapping) if row else None

    def account_by_sid(self, account_sid: str) -> TwilioAccount | None:
        with self.connect() as c:
            row = c.execute(
                sa.select(t.twilio_accounts).where(t.twilio_accounts.c.account_sid == account_sid)
            ).first()
        return TwilioAccount(**row._mapping) if row else None

    def auth_token(self, account: TwilioAccount) -> str:
        return self.box.decrypt(account.auth_token_enc)

    def list_numbers(self, tenant_id: str) -> list[NumberRow]:
        with self.connect() as c:
            rows = c.execute(
                sa.select(
                    t.numbers.c.number,
                    t.numbers.c.agent_id,
                    t.numbers.c.sync_outcome,
                    t.numbers.c.sync_detail,
                    t.numbers.c.updated_at,
                )
                .where(t.numbers.c.tenant_id == tenant_id)
                .order_by(t.numbers.c.number)
            ).all()
        return [NumberRow(**r._mapping) for r in rows]

    def set_number_agent(self, tenant_id: str, number: str, agent_id: str | None) -> bool:
        with self._tx() as c:
            result = c.execute(
                t.numbers.update()
                .where(t.numbers.c.tenant_id == tenant_id, t.numbers.c.number == number)
                .values(agent_id=agent_id, updated_at=now_ms())
            )
        return bool(result.rowcount)

    def record_sync(self, tenant_id: str, outcomes: Iterable[tuple[str, str, str]]) -> None:
        """Remember each number's last sync (number, outcome, detail)."""
        with self._tx() as c:
            for number, outcome, detail in outcomes:
                c.execute(
                    t.numbers.update()
                    .where(t.numbers.c.tenant_id == tenant_id, t.numbers.c.number == number)
                    .values(sync_outcome=outcome, sync_detail=detail[:500])
                )

    def agent_for_number(self, tenant_id: str, number: str) -> str | None:
        with self.connect() as c:
            row = c.execute(
                sa.select(t.numbers.c.agent_id).where(
                    t.numbers.c.tenant_id == tenant_id, t.numbers.c.number == number
                )
            ).first()
        return row[0] if row else None

    # -- agents ---------------------------------------------------------------------------
    def _agent_values(self, options: Mapping[str, Any], secret: Mapping[str, Any]) -> dict:
        return {
            "options": dict(options),
            "secrets_enc": self.box.encrypt(_dumps(dict(secret))) if secret else None,
        }

    def create_agent(
        self,
        tenant_id: str,
        name: str,
        kind: str,
        options: Mapping[str, Any],
        secret: Mapping[str, Any],
    ) -> AgentRow:
        ts = now_ms()
        row = {
            "id": new_id("ag"),
            "tenant_id": tenant_id,
            "name": name,
            "type": kind,
            "created_at": ts,
            "updated_at": ts,
            **self._agent_values(options, secret),
        }
        try:
            with self._tx() as c:
                if self._agent_name_taken(c, tenant_id, name, None):
                    raise Conflict(f"an agent named {name!r} exists already", field="name")
                c.execute(t.agents.insert().values(**row))
        except IntegrityError:
            raise Conflict(f"an agent named {name!r} exists already", field="name") from None
        return AgentRow(**row)

    def _agent_name_taken(
        self, c: Connection, tenant_id: str, name: str, except_id: str | None
    ) -> bool:
        query = sa.select(t.agents.c.id).where(
            t.agents.c.tenant_id == tenant_id, t.agents.c.name == name
        )
        if except_id is not None:
            query = query.where(t.agents.c.id != except_id)
        return c.execute(query).first() is not None

    def list_agents(self, tenant_id: str) -> list[AgentRow]:
        with self.connect() as c:
            rows = c.execute(
                sa.select(t.agents)
                .where(t.agents.c.tenant_id == tenant_id)
                .order_by(t.agents.c.created_at, t.agents.c.id)
            ).all()
        return [AgentRow(**r._mapping) for r in rows]

    def get_agent(self, tenant_id: str, agent_id: str) -> AgentRow | None:
        with self.connect() as c:
            row = c.execute(
                sa.select(t.agents).where(
                    t.agents.c.tenant_id == tenant_id, t.agents.c.id == agent_id
                )
            ).first()
        return AgentRow(**row._mapping) if row else None

    def update_agent(
        self,
        tenant_id: str,
        agent_id: str,
        name: str,
        kind: str,
        options: Mapping[str, Any],
        secret: Mapping[str, Any],
    ) -> AgentRow | None:
        values = {"name": name, "type": kind, "updated_at": now_ms()}
        values.update(self._agent_values(options, secret))
        try:
            with self._tx() as c:
                if self._agent_name_taken(c, tenant_id, name, agent_id):
                    raise Conflict(f"an agent named {name!r} exists already", field="name")
                result = c.execute(
                    t.agents.update()
                    .where(t.agents.c.tenant_id == tenant_id, t.agents.c.id == agent_id)
                    .values(**values)
                )
        except IntegrityError:
            raise Conflict(f"an agent named {name!r} exists already", field="name") from None
        return self.get_agent(tenant_id, agent_id) if result.rowcount else None

    def delete_agent(self, tenant_id: str, agent_id: str) -> bool:
        with self._tx() as c:
            result = c.execute(
                t.agents.delete().where(
                    t.agents.c.tenant_id == tenant_id, t.agents.c.id == agent_id
                )
            )
            if result.rowcount:  # numbers answered by it fall back to the default
                c.execute(
                    t.numbers.update()
                    .where(t.numbers.c.tenant_id == tenant_id, t.numbers.c.agent_id == agent_id)
                    .values(agent_id=None, updated_at=now_ms())
                )
        return bool(result.rowcount)

    def agent_secrets(self, row: AgentRow) -> dict[str, Any]:
        if not row.secrets_enc:
            return {}
        value = orjson.loads(self.box.decrypt(row.secrets_enc))
        return value if isinstance(value, dict) else {}

    # -- call history ---------------------------------------------------------------------
    _CALL_COLUMNS = frozenset(c.name for c in t.calls.columns)

    def save_call(self, values: Mapping[str, Any]) -> None:
        """Insert or update one call row; only the columns given are written."""
        self.save_calls([values])

    def save_calls(self, batch: Sequence[Mapping[str, Any]]) -> None:
        """Upsert several call rows in one transaction (the history writer's batches)."""
        with self._tx() as c:
            for values in batch:
                self._upsert_call(c, values)

    def _upsert_call(self, c: Connection, values: Mapping[str, Any]) -> None:
        values = {k: v for k, v in values.items() if k in self._CALL_COLUMNS}
        sid = values["call_sid"]
        update = {k: v for k, v in values.items() if k != "call_sid"}
        if update:
            result = c.execute(t.calls.update().where(t.calls.c.call_sid == sid).values(update))
            if result.rowcount:
                return
        row = {
            "tenant_id": DEFAULT_TENANT,
            "status": "incoming",
            "created_at": now_ms(),
            "details": {},
            "status_callbacks": [],
            **values,
        }
        try:
            with c.begin_nested():
                c.execute(t.calls.insert().values(row))
        except IntegrityError:  # inserted by another process meanwhile: update it
            c.execute(t.calls.update().where(t.calls.c.call_sid == sid).values(update))

    def add_status_callback(
        self, call_sid: str, tenant_id: str, entry: Mapping[str, str], terminal: str | None
    ) -> None:
        """Append a status callback (kept ordered by SequenceNumber); a terminal call status
        completes a call that never got a stream (caller hung up while ringing)."""
        with self._tx() as c:
            row = c.execute(
                sa.select(
                    t.calls.c.status_callbacks,
                    t.calls.c.status,
                    t.calls.c.end_reason,
                    t.calls.c.tenant_id,
                )
                .where(t.calls.c.call_sid == call_sid)
                .with_for_update()
            ).first()
            if row is not None and row.tenant_id != tenant_id:
                # signed by another tenant's account: never let it touch this record
                log.warning("status callback for %s from another tenant ignored", call_sid)
                return
            if row is None:
                c.execute(
                    t.calls.insert().values(
                        call_sid=call_sid,
                        tenant_id=tenant_id,
                        status="completed" if terminal else "incoming",
                        end_reason=terminal or "",
                        created_at=now_ms(),
                        details={},
                        status_callbacks=[dict(entry)],
                    )
                )
                return
            callbacks = list(row.status_callbacks or [])
            callbacks.append(dict(entry))
            callbacks.sort(key=sequence_number)
            values: dict[str, Any] = {"status_callbacks": callbacks}
            if terminal and row.status == "incoming":
                values["status"] = "completed"
                values["end_reason"] = row.end_reason or terminal
            c.execute(t.calls.update().where(t.calls.c.call_sid == call_sid).values(values))

    def list_calls(self, tenant_id: str | None, limit: int, cursor: str | None) -> CallPage:
        query = sa.select(t.calls)
        if tenant_id is not None:
            query = query.where(t.calls.c.tenant_id == tenant_id)
        if cursor:
            created, sid = decode_cursor(cursor)
            query = query.where(
                sa.or_(
                    t.calls.c.created_at < created,
                    sa.and_(t.calls.c.created_at == created, t.calls.c.call_sid < sid),
                )
            )
        query = query.order_by(t.calls.c.created_at.desc(), t.calls.c.call_sid.desc())
        with self.connect() as c:
            rows = c.execute(query.limit(limit + 1)).all()
        page = CallPage(calls=[call_json(dict(r._mapping)) for r in rows[:limit]])
        if len(rows) > limit:
            last = rows[limit - 1]
            page.next_cursor = encode_cursor(last.created_at, last.call_sid)
        return page

    def get_call(self, tenant_id: str | None, call_sid: str) -> dict[str, Any] | None:
        query = sa.select(t.calls).where(t.calls.c.call_sid == call_sid)
        if tenant_id is not None:
            query = query.where(t.calls.c.tenant_id == tenant_id)
        with self.connect() as c:
            row = c.execute(query).first()
        return call_json(dict(row._mapping)) if row else None

    def prune_calls(self, older_than_ms: int) -> int:
        with self._tx() as c:
            result = c.execute(t.calls.delete().where(t.calls.c.created_at < older_than_ms))
        return int(result.rowcount or 0)

    # -- key rotation ---------------------------------------------------------------------
    def rotate_secrets(self) -> int:
        """Re-encrypt every stored secret with the first configured key."""
        count = 0
        with self._tx() as c:
            for row in c.execute(
                sa.select(t.twilio_accounts.c.tenant_id, t.twilio_accounts.c.auth_token_enc)
            ).all():
                c.execute(
                    t.twilio_accounts.update()
                    .where(t.twilio_accounts.c.tenant_id == row.tenant_id)
                    .values(auth_token_enc=self.box.rotate(row.auth_token_enc))
                )
                count += 1
            for row in c.execute(
                sa.select(t.agents.c.id, t.agents.c.secrets_enc).where(
                    t.agents.c.secrets_enc.is_not(None)
                )
            ).all():
                c.execute(
                    t.agents.update()
                    .where(t.agents.c.id == row.id)
                    .values(secrets_enc=self.box.rotate(row.secrets_enc))
                )
                count += 1
        from .signing import reencrypt_all  # the tenants' webhook signing secrets

        return count + reencrypt_all(self)


def sequence_number(entry: Mapping[str, Any]) -> int:
    try:
        return int(entry.get("SequenceNumber", 0) or 0)
    except (TypeError, ValueError):
        return 0


def encode_cursor(created_at: int, call_sid: str) -> str:
    raw = f"{created_at}|{call_sid}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """Raises ValueError for a cursor this store did not make."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, sid = raw.split("|", 1)
        value = int(created)
        # a BigInteger column: anything outside it would fail in the driver (500), not here
        if not 0 <= value < 2**63 or not 0 < len(sid) <= 64:
            raise ValueError(cursor)
        return value, sid
    except (ValueError, UnicodeDecodeError):
        raise ValueError("cursor is not one this API returned") from None


def call_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """A call row as the API shows it (details flattened in)."""
    details = dict(row.get("details") or {})
    return {
        "call_sid": row["call_sid"],
        "direction": row["direction"],
        "from": row["from_number"],
        "to": row["to_number"],
        "from_country": row["from_country"],
        "agent": row["agent"],
        "status": row["status"],
        "reject_reason": row["reject_reason"],
        "end_reason": row["end_reason"],
        "stream_sid": row["stream_sid"],
        "created_at": row["created_at"],
        "started_at": row["started_at"],
        "ended_at": row["ended_at"],
        "duration_ms": row["duration_ms"],
        "first_agent_audio_ms": row["first_agent_audio_ms"],
        "transcript": details.get("transcript", []),
        "barge_ins": details.get("barge_ins", []),
        "dtmf": details.get("dtmf", []),
        "tool_calls": details.get("tool_calls", []),
        "stats": details.get("stats", {}),
        "answered_by": details.get("answered_by", ""),
        "fallback_message_played": details.get("fallback_message_played", False),
        "events": details.get("events", []),
        "warm_start": details.get("warm_start", False),
        "caller_profile": details.get("caller_profile", ""),
        "prep": details.get("prep", {}),
        "recording": details.get("recording", {}),
        "post_call_webhook": details.get("post_call_webhook", {}),
        "status_callbacks": list(row.get("status_callbacks") or []),
    }
