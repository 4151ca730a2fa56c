"""Every core: ``relay serve --workers N`` runs one relay process per core on one port.

The parent (:func:`supervise`) runs no calls. It raises the descriptor limit, runs the
schema migrations once, reserves the port, makes sure every worker signs and verifies
stream tokens with the same secret, then starts N workers (``relay serve`` with
``RELAY_WORKER_INDEX``/``RELAY_WORKERS``/``RELAY_RUN_DIR`` set). Each worker binds its own
listening socket with ``SO_REUSEPORT`` (Linux spreads new connections over them by a hash
of the 4-tuple, see socket(7)), so no process accepts for the others and a busy worker does
not slow the rest. SIGTERM/SIGINT go to every worker (each drains, relay/http/drain.py);
a worker that dies otherwise is restarted (at most :data:`MAX_RESTARTS` a minute).

A call's webhook and its stream are separate connections and may land on different
workers. Everything a worker needs to serve a stream it did not answer is shared (the
token secret, the store), and the call's in-process plan (warm agent session, hold, the
per-call options) is reached by handing the connection to the worker that answered
(relay/http/handoff.py). Per-agent call limits count across workers
(relay/control/shared_slots.py); ``server.max_calls`` and admission control are per worker.

A fleet of machines behind a load balancer works the same way: point every machine at one
PostgreSQL store and give them the same ``security.token_secret``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import trio

from ..control.cluster import ENV_COUNT, ENV_INDEX, ENV_RUN_DIR, ENV_SUPERVISOR
from ..errors import EXIT_INTERRUPTED, ConfigError
from ..media.headroom import raise_fd_limit

log = logging.getLogger("relay.http.workers")

__all__ = [
    "MAX_RESTARTS",
    "follow_supervisor",
    "open_listeners",
    "resolve_workers",
    "supervise",
]

#: restarts of crashed workers allowed per minute before the parent gives up
MAX_RESTARTS = 5


def resolve_workers(value: str | int | None) -> int:
    """``auto`` (the default): one per core this process may run on."""
    if value is None or value == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"--workers: expected a number or auto, got {value!r}") from None
    if not 1 <= n <= 256:
        raise ConfigError(f"--workers: {n} is out of range (1..256)")
    return n


def _reuseport_socket(host: str, port: int, family: socket.AddressFamily) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    return sock


async def open_listeners(host: str, port: int, reuse_port: bool) -> list[trio.SocketListener]:
    """Trio's listeners, or (workers) one ``SO_REUSEPORT`` socket per address."""
    if not reuse_port:
        return await trio.open_tcp_listeners(port, host=host)
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    listeners: list[trio.SocketListener] = []
    seen: set[tuple[int, str]] = set()
    for family, _type, _proto, _name, addr in infos:
        if (family, str(addr[0])) in seen:
            continue
        seen.add((family, str(addr[0])))
        raw = _reuseport_socket(str(addr[0]), port, family)
        raw.listen(4096)  # the kernel caps it at net.core.somaxconn
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(raw)))
    return listeners


# -- the parent ------------------------------------------------------------------------------


def _reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Bind (not listen) a SO_REUSEPORT socket: it keeps the port ours between worker
    restarts and turns port 0 into a real port every worker can share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = _reuseport_socket(host, port, family)
    return sock, sock.getsockname()[1]


def supervise(argv: list[str], cfg_host: str, cfg_port: int, workers: int) -> int:
    """Run ``workers`` relay processes (``argv`` is each one's ``relay serve`` command line,
    without the port) until SIGTERM/SIGINT; returns the exit status."""
    calls = raise_fd_limit()
    reserved, port = _reserve_port(cfg_host, cfg_port)
    run_dir = tempfile.mkdtemp(
        prefix="relay-workers-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
    )
    env = dict(os.environ)
    env[ENV_COUNT] = str(workers)
    env[ENV_SUPERVISOR] = str(os.getpid())
    env[ENV_RUN_DIR] = run_dir
    if not env.get("RELAY_SECURITY_TOKEN_SECRET"):
        # Stream tokens are signed by the worker that answers the webhook and verified by
        # the one the stream lands on: one secret for all (a fleet sets its own).
        env.setdefault("RELAY_SECURITY_TOKEN_SECRET", secrets.token_urlsafe(32))
    procs: dict[int, subprocess.Popen[bytes]] = {}
    restarts: deque[float] = deque()
    stops: list[int] = []  # the stop signals received, in order
    told: dict[int, int] = {}  # worker pid -> how many of them it has been sent

    def start(index: int) -> None:
        child_env = dict(env)
        child_env[ENV_INDEX] = str(index)
        # Its own process group: Ctrl-C in a terminal signals the foreground group, and each
        # worker should get one signal (forwarded below), not two racing ones.
        procs[index] = subprocess.Popen(
            [*argv, "--port", str(port)], env=child_env, process_group=0
        )

    def on_signal(signum: int, _frame: object) -> None:
        # Only recorded here: the loop below forwards it, so a worker starting at that very
        # moment is told too, and each worker is told each signal once.
        stops.append(signum)

    def tell_workers() -> None:
        for proc in procs.values():
            sent = told.get(proc.pid, 0)
            if sent == len(stops) or proc.poll() is not None:
                continue
            told[proc.pid] = len(stops)
            for signum in stops[sent:]:
                # SIGHUP (the terminal closed) reaches only this group: drain as on SIGTERM.
                # A second signal stops a draining worker without waiting (relay/http/drain.py).
                proc.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    old = {s: signal.signal(s, on_signal) for s in stop_signals}
    # Announced once a signal is handled: from here Ctrl-C stops the workers cleanly.
    log.info(
        "relay: %d workers on port %d (descriptor limit allows ~%d calls per worker)",
        workers,
        port,
        calls,
    )
    status = 0
    try:
        for i in range(workers):
            if stops:
                break
            start(i)
        while procs:
            if stops:
                tell_workers()
            time.sleep(0.05 if stops else 0.2)
            for index, proc in list(procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                del procs[index]
                if stops:
                    # Stopped as told: drained (0), killed by the signal (< 0), or
                    # interrupted while still starting (EXIT_INTERRUPTED).
                    if code > 0 and code != EXIT_INTERRUPTED:
                        status = status or code
                    continue
                log.error("worker %d exited with status %s", index, code)
                _forget_worker(run_dir, index)  # its calls died with it
                now = time.monotonic()
                while restarts and restarts[0] < now - 60:
                    restarts.popleft()
                if len(restarts) >= MAX_RESTARTS:
                    log.error(
                        "workers keep dying (%d restarts in a minute): stopping", MAX_RESTARTS
                    )
                    stops.append(signal.SIGTERM)  # the loop tells the others
                    status = 1
                    continue
                restarts.append(now)
                start(index)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        reserved.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    log.info("relay: stopped (status %d)", status)
    return status


#: prctl(2) option: the signal this process gets when its parent dies (Linux)
_PR_SET_PDEATHSIG = 1


def follow_supervisor() -> bool:
    """In a worker: be sent SIGTERM (drain, then exit) when the supervisor dies.

    Workers run in their own process group, so nothing else stops them if the supervisor
    is killed (SIGKILL, the OOM killer): they would keep the port and serve on alone,
    unsupervised. Linux only; returns whether it is armed."""
    expected = os.environ.get(ENV_SUPERVISOR)
    if not expected or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != int(expected):  # it died before prctl: nobody would tell us
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def _forget_worker(run_dir: str, index: int) -> None:
    for name in (f"w{index}.slots", f"w{index}.sock"):
        try:
            (Path(run_dir) / name).unlink()
        except FileNotFoundError:
            pass
