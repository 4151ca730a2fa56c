"""A throwaway PostgreSQL server for the tests: a real ``postgres``, never a mock.

``initdb`` + ``pg_ctl`` in a temporary directory, listening on an ephemeral loopback port,
trust authentication for a test user, fsync off (the data dies with the test session).
PostgreSQL refuses to run as root, so under root the cluster is owned by and run as the
``postgres`` system user the Debian package creates. ``.ci/run`` installs the package when
it is missing; without it the tests that need it fail with one clear sentence, they never
skip.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    pass


def _bindir() -> Path:
    found = shutil.which("pg_config")
    if found:
        out = subprocess.run([found, "--bindir"], capture_output=True, text=True, check=False)
        candidate = Path(out.stdout.strip())
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(candidate, "pg_ctl")):
            return Path(candidate)
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install the Debian package "
        "`postgresql` (bash .ci/run does this) to run the PostgreSQL tests"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server; yield its SQLAlchemy URL; stop it and delete its files."""
    bindir = _bindir()
    root = Path(tempfile.mkdtemp(prefix="relay-pg-"))
    data = root / "data"
    port = _free_port()
    run_as: list[str] = []
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable("running as root and no `postgres` user exists") from None
        os.chown(root, pw.pw_uid, pw.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]

    def run(*args: str) -> None:
        proc = subprocess.run([*run_as, *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise PostgresUnavailable(f"{args[0]} failed: {proc.stderr.strip() or proc.stdout}")

    try:
        run(
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "relay",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        # The port was free when _free_port looked; another process (a test binding an
        # ephemeral port, a parallel worker's server) may take it before the postmaster
        # binds. Its log then says so: start again on another port.
        for attempt in range(_START_ATTEMPTS):
            port = port if attempt == 0 else _free_port()
            (root / "log").unlink(missing_ok=True)  # this attempt's reasons only
            try:
                _start(run, bindir, data, root, port)
                break
            except PostgresUnavailable as exc:
                log = _log_tail(root / "log")
                if "Address already in use" not in log or attempt + 1 == _START_ATTEMPTS:
                    raise PostgresUnavailable(f"{exc}\n{log}") from None
        deadline = time.monotonic() + 20
        while True:  # pg_ctl -w waits for readiness; be sure the TCP port answers too
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise PostgresUnavailable("postgres did not accept connections") from None
                time.sleep(0.05)
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "relay", "relay")
        yield f"postgresql://relay@127.0.0.1:{port}/relay"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True,
                check=False,
            )
        shutil.rmtree(root, ignore_errors=True)


#: starts tried before giving up when the chosen port was taken meanwhile
_START_ATTEMPTS = 5


def _start(run: Callable[..., None], bindir: Path, data: Path, root: Path, port: int) -> None:
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
    options += " -c synchronous_commit=off -c full_page_writes=off"
    run(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-o",
        options,
        "-l",
        str(root / "log"),
        "-w",
        "start",
    )


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def reset_database(url: str) -> None:
    """Drop every table so a test starts from an empty schema (cheaper than a new server)."""
    import sqlalchemy as sa

    from relay.control.store import engine_url

    engine = sa.create_engine(engine_url(url))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP SCHEMA public CASCADE"))
            conn.execute(sa.text("CREATE SCHEMA public"))
    finally:
        engine.dispose()
