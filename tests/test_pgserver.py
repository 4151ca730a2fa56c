"""tests/pgserver.py: the real PostgreSQL server the store tests start for themselves.

Its port is picked free, but another process may bind it before the postmaster does (CI
saw it once with four test workers): the server then starts again on another port."""

from __future__ import annotations

import socket

import pgserver
import pytest
import sqlalchemy as sa

from relay.control.store import engine_url


def test_a_port_taken_before_the_server_binds_it_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        free = pgserver._free_port
        ports = iter([busy])
        monkeypatch.setattr(pgserver, "_free_port", lambda: next(ports, None) or free())
        with pgserver.postgres_server() as url:
            assert f":{busy}/" not in url
            engine = sa.create_engine(engine_url(url))
            with engine.connect() as conn:
                assert conn.execute(sa.text("select 1")).scalar() == 1
            engine.dispose()
