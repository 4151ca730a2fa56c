"""Alembic environment: relay runs migrations in-process with a connection it opened.

``relay.control.store.upgrade`` passes the connection in ``config.attributes``; there is no
alembic.ini, so the deployer never maintains a second configuration file.
"""

from __future__ import annotations

from alembic import context

from relay.control.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reachable through the alembic CLI
    raise RuntimeError("run migrations with `relay db upgrade`, which supplies the connection")

context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite cannot ALTER most things in place: batch mode copies the table when needed
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
