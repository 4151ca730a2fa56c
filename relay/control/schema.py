"""The control plane's tables, one schema for SQLite and PostgreSQL (SQLAlchemy Core).

Migrations (``relay/control/migrations``) create and evolve these tables; this module is
the schema the code reads and writes. Times are epoch milliseconds (``BigInteger``) so the
two engines agree without timezone handling. Structured parts of a call record (transcript,
barge-ins, status callbacks, ...) are JSON: they are read and written whole, never queried.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("name", sa.String(200), nullable=False, server_default=""),
    #: the first characters of the key, shown again so a user can tell keys apart
    sa.Column("prefix", sa.String(40), nullable=False),
    #: SHA-256 of the whole key (keys are 256-bit random: a slow hash adds nothing)
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("revoked_at", sa.BigInteger, nullable=True),
    sa.Column("last_used_at", sa.BigInteger, nullable=True),
)

twilio_accounts = sa.Table(
    "twilio_accounts",
    metadata,
    sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id"), primary_key=True),
    #: unique: a webhook's AccountSid names exactly one tenant (its token checks the signature)
    sa.Column("account_sid", sa.String(34), nullable=False, unique=True),
    #: Fernet token of the auth token (relay/control/secrets.py); never stored in clear
    sa.Column("auth_token_enc", sa.Text, nullable=False),
    sa.Column("auth_token_tail", sa.String(8), nullable=False),
    sa.Column("region", sa.String(20), nullable=True),
    sa.Column("edge", sa.String(20), nullable=True),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
)

numbers = sa.Table(
    "numbers",
    metadata,
    sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id"), primary_key=True),
    sa.Column("number", sa.String(16), primary_key=True),
    sa.Column("agent_id", sa.String(200), nullable=True),
    #: last sync outcome for this number (updated / skipped / failed) and why
    sa.Column("sync_outcome", sa.String(20), nullable=False, server_default=""),
    sa.Column("sync_detail", sa.Text, nullable=False, server_default=""),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
)

agents = sa.Table(
    "agents",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("type", sa.String(40), nullable=False),
    #: the agent's options without its secrets (JSON)
    sa.Column("options", sa.JSON, nullable=False),
    #: Fernet token of a JSON object holding the secret options (api keys)
    sa.Column("secrets_enc", sa.Text, nullable=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("tenant_id", "name", name="uq_agents_tenant_name"),
)

calls = sa.Table(
    "calls",
    metadata,
    sa.Column("call_sid", sa.String(64), primary_key=True),
    sa.Column("tenant_id", sa.String(40), nullable=False),
    sa.Column("account_sid", sa.String(34), nullable=False, server_default=""),
    sa.Column("direction", sa.String(20), nullable=False, server_default="inbound"),
    sa.Column("from_number", sa.String(64), nullable=False, server_default=""),
    sa.Column("to_number", sa.String(64), nullable=False, server_default=""),
    sa.Column("from_country", sa.String(8), nullable=False, server_default=""),
    sa.Column("agent", sa.String(200), nullable=False, server_default=""),
    #: incoming -> active -> completed, or rejected
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("reject_reason", sa.String(60), nullable=False, server_default=""),
    sa.Column("end_reason", sa.String(60), nullable=False, server_default=""),
    sa.Column("stream_sid", sa.String(64), nullable=False, server_default=""),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("started_at", sa.BigInteger, nullable=True),
    sa.Column("ended_at", sa.BigInteger, nullable=True),
    sa.Column("duration_ms", sa.BigInteger, nullable=True),
    sa.Column("first_agent_audio_ms", sa.Float, nullable=True),
    #: transcript, barge_ins, dtmf, tool_calls, stats
    sa.Column("details", sa.JSON, nullable=False),
    #: ordered by SequenceNumber
    sa.Column("status_callbacks", sa.JSON, nullable=False),
    sa.Index("ix_calls_tenant_created", "tenant_id", "created_at", "call_sid"),
    sa.Index("ix_calls_created", "created_at"),
)

#: one webhook signing secret per tenant (relay/control/signing.py): post-call and prep
#: webhooks carry ``X-Relay-Signature`` made with it
webhook_secrets = sa.Table(
    "webhook_secrets",
    metadata,
    sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id"), primary_key=True),
    #: Fernet token of the secret (relay/control/secretbox.py); never stored in clear
    sa.Column("secret_enc", sa.Text, nullable=False),
    sa.Column("secret_tail", sa.String(8), nullable=False),
    #: shown in full once (the first GET after it was made); masked afterwards
    sa.Column("revealed", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)
