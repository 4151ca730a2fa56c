"""``python -m bench wsstack``: server CPU per WebSocket message pair, stack by stack.

Why: the relay's capacity is decided by the per-message path (see
``shared/reference/baselines.md``: ~200 message operations per call-second), so the
choice of WebSocket stack matters more than the DSP. This benchmark measures, on this
machine and in one run, what one "receive a ~390-byte Twilio-like media text frame from a
masked client, send it back" costs each server stack:

    relay-reactor       relay.media.websocket.WebSocket + relay.media.reactor.Reactor
                        (the media path)
    relay-tasks         the same WebSocket, one Trio task per socket awaiting receive()
                        (the relay with media.reactor = false)
    trio-websocket      trio_websocket.serve_websocket, get_message / send_message
    hypercorn-quart     a Quart-Trio websocket route on Hypercorn's trio worker (the stack
                        that serves the relay's webhooks)
    websockets-asyncio  the ``websockets`` asyncio server (what FastAPI sample relays use)

Each run is a fresh echo server process pinned to the "server core" and this process
(an epoll client loop from ``bench.netio``) pinned to the "load core". N connections send
one message every 20 ms each (Twilio's media pace), phase-spread like real calls. After a
short warm-up, a window measures the server's user+system CPU from ``/proc/<pid>/stat``,
the echoes completed, and the echo round trip seen by the client. CPU per pair = server CPU
/ echoes completed in the window. Runs repeat round-robin across stacks, so slow drift on
a shared machine spreads over every stack instead of biasing one; the median is reported.

A run is INVALID (as in ``python -m bench load``) when the client loop used more than 85 %
of its core or its send timers ran late (p99 > 5 ms): then part of the latency is ours.
A run is "saturated" when the server used more than 90 % of its core or fell behind the
offered load; its CPU per pair is then a throughput-limited figure and its RTT is queueing.

The relay stacks apply ``relay.gcpolicy.tune_gc()`` as ``relay serve`` does; the other
stacks run as shipped. Plaintext loopback only.

    python -m bench wsstack            # full: N in {100, 300}, 3 repeats, 5 s windows
    python -m bench wsstack --quick    # N = 100, 1 repeat, 3 s windows (< 2 min)
    python -m bench wsstack --stacks relay-reactor,websockets-asyncio --n 200 --json out.json
"""

from __future__ import annotations

import argparse
import binascii
import gc
import importlib.util
import os
import select
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import trio

from bench.harness import (
    REPO,
    Progress,
    _core_busy,
    _interference,
    _pin,
    _tail,
    cpu_plan,
    wait_quiet,
)
from bench.netio import OP_TEXT, Reactor, Ticker, WsClient, monotonic_ns, unmask
from bench.report import save_json
from bench.stats import NS_PER_MS, loadgen_validity, percentile
from relay.config import MediaConfig
from relay.errors import ConnectionClosed
from relay.media.reactor import Reactor as MediaReactor
from relay.media.websocket import WebSocket, parse_head, read_http_head, server_handshake_response

RESULTS = Path(__file__).resolve().parent / "results"
STACKS = (
    "relay-reactor",
    "relay-tasks",
    "trio-websocket",
    "hypercorn-quart",
    "websockets-asyncio",
)
REFERENCE = "relay-reactor"
WS_PATH = "/ws"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# A server past this share of its core (or behind the offered load) is the bottleneck.
SATURATED_PCT = 90.0
MIN_ECHO_RATIO = 0.97


@dataclass(frozen=True)
class Plan:
    ns: tuple[int, ...]
    repeats: int
    warmup_s: float
    window_s: float
    rate_hz: float = 50.0  # messages per second per connection (Twilio's 20 ms frames)
    quiet_wait_s: float = 3.0  # max wait for idle cores before each run
    connect_timeout_s: float = 30.0


QUICK = Plan(ns=(100,), repeats=1, warmup_s=0.5, window_s=3.0, quiet_wait_s=1.0)
FULL = Plan(ns=(100, 300), repeats=3, warmup_s=1.0, window_s=5.0)


# -- echo servers (child process: python -m bench.wsstack --serve STACK) ------------------


def _announce(port: int) -> None:
    """Tell the parent which port we listen on, then send stdout to stderr (the log).

    Nobody reads the stdout pipe after this line; a stray print must not fill it and
    block the server mid-run.
    """
    sys.stdout.write(f"ready {port}\n")
    sys.stdout.flush()
    os.dup2(2, 1)


async def _relay_serve(use_reactor: bool) -> None:
    from relay.gcpolicy import tune_gc

    tune_gc()  # what `relay serve` does at startup (relay/cli.py)
    async with trio.open_nursery() as nursery:
        reactor = None
        if use_reactor:
            reactor = MediaReactor()
            await nursery.start(reactor.run, MediaConfig().reactor_coalesce_ms / 1000.0)
        handler = partial(_relay_connection, reactor)
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        _announce(listeners[0].socket.getsockname()[1])


async def _relay_connection(reactor, stream) -> None:
    """The relay's media-path shape: our handshake, WebSocket, a flusher, an echo loop."""
    head, rest = await read_http_head(stream)
    _first, headers = parse_head(head)
    await stream.send_all(server_handshake_response(headers["sec-websocket-key"]))
    ws = WebSocket(stream, client_side=False, leftover=rest)
    done = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_relay_flusher, ws, done)
            if reactor is not None and ws.raw_socket is not None:
                nursery.start_soon(_echo_by_reactor, reactor, ws, done)
            else:
                nursery.start_soon(_echo_by_task, ws, done)
            await done.wait()
            nursery.cancel_scope.cancel()
    finally:
        await ws.aclose()


async def _relay_flusher(ws, done) -> None:
    # As in relay.media.call: drains what the kernel did not take at once (rare on loopback).
    try:
        await ws.run_flusher()
    except ConnectionClosed:
        done.set()


async def _echo_by_reactor(reactor, ws, done) -> None:
    """Synchronous echo from the reactor's wake-up: no task switch per message."""
    raw = ws.raw_socket

    def readable() -> None:
        try:
            for msg in ws.read_nowait():
                ws.send_text_nowait(msg)  # the client sends text only
        except ConnectionClosed:
            # Unregister at once: a closed socket stays readable and would spin the loop.
            reactor.unregister(raw, readable)
            done.set()

    reactor.register(raw, readable)
    try:
        readable()  # bytes that arrived with the upgrade
        await trio.sleep_forever()
    finally:
        reactor.unregister(raw, readable)


async def _echo_by_task(ws, done) -> None:
    try:
        while True:
            for msg in await ws.receive():
                ws.send_text_nowait(msg)
    except ConnectionClosed:
        done.set()


# The optional stacks are imported inside their server functions: a missing one must only
# skip its own runs.
async def _trio_websocket_serve() -> None:
    from trio_websocket import ConnectionClosed as Closed
    from trio_websocket import serve_websocket

    async def echo(request) -> None:
        ws = await request.accept()
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except Closed:
            pass

    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_websocket, echo, "127.0.0.1", 0, None))
        _announce(server.port)


async def _quart_serve() -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve
    from quart import websocket
    from quart_trio import QuartTrio

    app = QuartTrio("wsstack")

    @app.websocket(WS_PATH)
    async def echo() -> None:
        while True:
            await websocket.send(await websocket.receive())

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None  # as relay/server.py configures Hypercorn
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config))
        _announce(int(binds[0].rsplit(":", 1)[1]))


async def _websockets_serve() -> None:
    import asyncio

    from websockets.asyncio.server import serve

    async def echo(ws) -> None:
        async for msg in ws:
            await ws.send(msg)

    async with serve(echo, "127.0.0.1", 0) as server:
        _announce(server.sockets[0].getsockname()[1])
        await asyncio.Future()  # serve until killed


def serve_stack(stack: str) -> None:
    """Run one echo server until the process is killed."""
    if stack == "websockets-asyncio":
        import asyncio

        asyncio.run(_websockets_serve())
        return
    servers = {
        "relay-reactor": partial(_relay_serve, True),
        "relay-tasks": partial(_relay_serve, False),
        "trio-websocket": _trio_websocket_serve,
        "hypercorn-quart": _quart_serve,
    }
    trio.run(servers[stack])


_NEEDS = {
    "relay-reactor": (),
    "relay-tasks": (),
    "trio-websocket": ("trio_websocket",),
    "hypercorn-quart": ("hypercorn", "quart_trio"),
    "websockets-asyncio": ("websockets",),
}


def unavailable(stack: str) -> str | None:
    """Why ``stack`` cannot run here (a module is missing), or None."""
    if stack not in _NEEDS:
        return f"unknown stack (known: {', '.join(STACKS)})"
    for mod in _NEEDS[stack]:
        if importlib.util.find_spec(mod) is None:
            return f"{mod} not importable"
    return None


# -- the client side ---------------------------------------------------------------------

_PAYLOAD = binascii.b2a_base64(bytes(range(160)), newline=False)  # 160 μ-law bytes, 20 ms
_MASKED16 = struct.Struct(">BBH").pack


def media_message(stream_sid: bytes, seq: int) -> bytes:
    """A Twilio ``media`` event like the ones the relay receives (~390 bytes)."""
    return (
        b'{"event":"media","sequenceNumber":"%d","streamSid":"%s","media":{"track":"inbound",'
        b'"chunk":"%d","timestamp":"%d","payload":"%s"}}'
        % (seq, stream_sid, seq, seq * 20, _PAYLOAD)
    )


class EchoClient(WsClient):
    """One connection: a masked media frame per tick, every echo checked and timed."""

    def __init__(self, driver: Driver, port: int) -> None:
        super().__init__(driver.reactor, "127.0.0.1", port, WS_PATH, {})
        self.driver = driver
        self.sid = b"MZ" + os.urandom(16).hex().encode()
        # A real (non-zero) masking key, so every server runs its XOR; one key per
        # connection costs the servers exactly what per-frame keys would.
        self.key = os.urandom(3) + b"\x01"
        self.seq = 0
        self.inflight: deque[tuple[int, bytes]] = deque()

    def on_upgraded(self, now: int) -> None:
        self.driver.upgraded += 1

    def on_upgrade_failed(self, status_line: str) -> None:
        self.driver.fail(f"upgrade refused: {status_line}")

    def on_connect_failed(self, exc: OSError) -> None:
        self.driver.fail(f"connect failed: {exc}")

    def tick(self, now: int) -> None:
        self.seq += 1
        msg = media_message(self.sid, self.seq)
        drv = self.driver
        self.inflight.append((monotonic_ns(), msg))
        if drv.recording:
            drv.sent += 1
        self.send(
            _MASKED16(0x80 | OP_TEXT, 0x80 | 126, len(msg)) + self.key + unmask(msg, self.key)
        )

    def on_message(self, opcode: int, payload: bytes, now: int) -> None:
        drv = self.driver
        if not self.inflight:
            drv.unexpected += 1
            return
        t_sent, msg = self.inflight.popleft()
        if opcode != OP_TEXT or payload != msg:
            drv.mismatched += 1
        if drv.recording:
            drv.echoed += 1
            drv.rtts.append(now - t_sent)

    def on_closed(self) -> None:
        if not self.driver.stopping:
            self.driver.fail("server closed a connection")


class Driver:
    """N echo clients on one epoll loop; counts are for the measured window only."""

    def __init__(self, port: int, n: int) -> None:
        self.reactor = Reactor()
        self.upgraded = 0
        self.failures: list[str] = []
        self.recording = False
        self.stopping = False
        self.sent = 0
        self.echoed = 0
        self.mismatched = 0
        self.unexpected = 0
        self.rtts: list[int] = []
        self.clients = [EchoClient(self, port) for _ in range(n)]

    def fail(self, reason: str) -> None:
        if len(self.failures) < 10:
            self.failures.append(reason)

    def connect(self, timeout_s: float) -> None:
        for c in self.clients:
            c.start()
        n = len(self.clients)
        end = monotonic_ns() + int(timeout_s * 1e9)
        self.reactor.run(until_ns=end, stop=lambda: self.upgraded + len(self.failures) >= n)
        if self.upgraded < n:
            raise RuntimeError(f"{self.upgraded}/{n} connections upgraded: {self.failures[:3]}")

    def start_ticking(self, rate_hz: float) -> Ticker:
        slots = min(20, len(self.clients))
        ticker = Ticker(self.reactor, int(1e9 / rate_hz), slots)
        for i, c in enumerate(self.clients):
            # Spread connections over the phase slots (Twilio's calls are not aligned).
            ticker.join(c, ticker.base + (i % slots) * ticker.step)
        return ticker

    def close(self) -> None:
        self.stopping = True
        self.reactor.close()


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (all its threads) from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # Fields after the parenthesised command name (which may contain spaces); utime and
    # stime are fields 14 and 15 of the whole line.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def measure(driver: Driver, pid: int, plan: Plan, cores: tuple) -> dict:
    """Warm up, then one measured window; returns the raw window figures."""
    reactor = driver.reactor
    ticker = driver.start_ticking(plan.rate_hz)
    reactor.run(until_ns=monotonic_ns() + int(plan.warmup_s * 1e9))
    # No cyclic GC in the window: a collection pauses the loop for milliseconds, which
    # would show up as server latency. Per-message garbage is acyclic.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        cpu0, busy0, self0 = proc_cpu_s(pid), _core_busy(), time.process_time_ns()
        t0 = monotonic_ns()
        driver.recording = ticker.record = True
        reactor.run(until_ns=t0 + int(plan.window_s * 1e9))
        driver.recording = ticker.record = False
        window_s = (monotonic_ns() - t0) / 1e9
        cpu1, busy1, self1 = proc_cpu_s(pid), _core_busy(), time.process_time_ns()
    finally:
        gc.enable()
        gc.unfreeze()
    ticker.stop()
    self_cpu_s = (self1 - self0) / 1e9
    return {
        "window_s": window_s,
        "server_cpu_s": cpu1 - cpu0,
        "driver_cpu_s": self_cpu_s,
        "lateness": sorted(ticker.lateness),
        "interference": _interference(busy0, busy1, cores, window_s, cpu1 - cpu0, self_cpu_s),
    }


def summarize(driver: Driver, raw: dict, n: int) -> dict:
    """Per-run figures: CPU per pair, % core, RTT, echo accounting, validity."""
    window_s = raw["window_s"]
    cpu_s = raw["server_cpu_s"]
    rtts = sorted(driver.rtts)
    late_p99 = percentile(raw["lateness"], 99)
    driver_pct = 100 * raw["driver_cpu_s"] / window_s
    valid, reasons = loadgen_validity(
        driver_pct, None if late_p99 is None else late_p99 / NS_PER_MS
    )
    server_pct = 100 * cpu_s / window_s
    echo_ratio = driver.echoed / driver.sent if driver.sent else 0.0
    return {
        "n": n,
        "window_s": round(window_s, 3),
        "sent": driver.sent,
        "echoed": driver.echoed,
        "echo_ratio": round(echo_ratio, 4),
        "mismatched": driver.mismatched,
        "unexpected": driver.unexpected,
        "server_cpu_s": round(cpu_s, 3),
        "cpu_us_per_pair": round(cpu_s * 1e6 / driver.echoed, 2) if driver.echoed else None,
        "server_pct_of_core": round(server_pct, 1),
        "rtt_p50_ms": _ms(percentile(rtts, 50)),
        "rtt_p99_ms": _ms(percentile(rtts, 99)),
        "rtt_max_ms": _ms(rtts[-1] if rtts else None),
        "saturated": server_pct > SATURATED_PCT or echo_ratio < MIN_ECHO_RATIO,
        "driver": {
            "cpu_pct_of_core": round(driver_pct, 1),
            "timer_late_p99_ms": _ms(late_p99),
            "valid": valid,
            "invalid_reasons": reasons,
        },
        "interference": raw["interference"],
    }


def _ms(ns: float | None) -> float | None:
    return None if ns is None else round(ns / NS_PER_MS, 3)


# -- one run: a fresh server process -----------------------------------------------------


def start_server(stack: str, cpu: int | None, log_path: Path, timeout_s: float = 30.0):
    """Spawn the echo server for ``stack``; returns (process, port) once it listens."""
    env = os.environ | {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.wsstack", "--serve", stack],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            preexec_fn=_pin(cpu),
        )
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline().decode() if ready else ""
    if not line.startswith("ready "):
        _stop(proc)
        raise RuntimeError(f"{stack} server did not start: {_tail(log_path)}")
    return proc, int(line.split()[1])


def _stop(proc: subprocess.Popen) -> None:
    # Shutdown is not measured: kill outright rather than wait for five graceful paths.
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


def run_one(stack: str, n: int, plan: Plan, cores: tuple = (None, None)) -> dict:
    """One fresh server, N connections, one measured window. Never raises."""
    result: dict = {"stack": stack, "n": n}
    tmp = Path(tempfile.mkdtemp(prefix=f"wsstack-{stack}-"))
    log_path = tmp / "server.log"
    proc = driver = None
    try:
        proc, port = start_server(stack, cores[0], log_path)
        driver = Driver(port, n)
        driver.connect(plan.connect_timeout_s)
        raw = measure(driver, proc.pid, plan, cores)
        result |= summarize(driver, raw, n)
        if driver.failures:
            result["error"] = "; ".join(driver.failures[:3])
    except Exception as exc:  # a broken stack is a result, not a crash of the suite
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-2000:]
    finally:
        if proc is not None:
            _stop(proc)  # before closing the clients: no server-side close work or logs
        if driver is not None:
            driver.close()
        if "error" in result:
            result["server_log_tail"] = _tail(log_path, 600)
        log_path.unlink(missing_ok=True)
        tmp.rmdir()
    return result


# -- the suite ---------------------------------------------------------------------------


def run_suite(stacks: tuple[str, ...], plan: Plan, pin: bool, progress: Progress) -> dict:
    cores = cpu_plan() if pin else (None, None)
    if cores[1] is not None:
        os.sched_setaffinity(0, {cores[1]})
    skipped = {s: why for s in stacks if (why := unavailable(s))}
    todo = [s for s in stacks if s not in skipped]
    t0 = time.monotonic()
    runs: list[dict] = []
    # Round-robin (repeat, N, stack): drift on a shared machine hits every stack alike.
    for rep in range(plan.repeats):
        for n in plan.ns:
            for stack in todo:
                progress.prefix = f"[rep {rep + 1}/{plan.repeats}] {stack} N={n}:"
                progress.update("waiting for idle cores", force=True)
                busy = wait_quiet(cores, plan.quiet_wait_s)
                progress.update("running", force=True)
                r = run_one(stack, n, plan, cores) | {"repeat": rep, "busy_before_pct": busy}
                runs.append(r)
                progress.update(_run_line(r), force=True)
    progress.done()
    return {
        "benchmark": "wsstack",
        "plan": asdict(plan),
        "message_bytes": len(media_message(b"MZ" + b"0" * 32, 1000)),
        "cores": {"server": cores[0], "driver": cores[1], "online": os.cpu_count()},
        "skipped": skipped,
        "runs": runs,
        "summary": aggregate(runs, todo, plan.ns),
        "elapsed_s": round(time.monotonic() - t0, 1),
    }


def status(r: dict) -> str:
    if r.get("error"):
        return "ERROR"
    if r["mismatched"] or r["unexpected"]:
        return "BAD-ECHO"
    if not r["driver"]["valid"]:
        return "INVALID"
    return "saturated" if r["saturated"] else "ok"


def _run_line(r: dict) -> str:
    if r.get("error"):
        return f"ERROR {r['error'][:120]}"
    return (
        f"{r['cpu_us_per_pair']} µs/pair, server {r['server_pct_of_core']}% core, "
        f"RTT p50 {r['rtt_p50_ms']} p99 {r['rtt_p99_ms']} ms, "
        f"driver {r['driver']['cpu_pct_of_core']}% [{status(r)}]"
    )


def _median(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 3) if vals else None


def aggregate(runs: list[dict], stacks: list[str], ns: tuple[int, ...]) -> list[dict]:
    """Median over the usable repeats of each (stack, N), with the ratio to the reference.

    Usable = measured and trustworthy (not ERROR / BAD-ECHO / INVALID); saturated runs
    count but are flagged, since "falls over at this N" is itself the finding.
    """
    rows = []
    for n in ns:
        for stack in stacks:
            mine = [r for r in runs if r["stack"] == stack and r["n"] == n]
            good = [r for r in mine if status(r) in ("ok", "saturated")]
            row = {"stack": stack, "n": n, "runs": len(mine), "usable": len(good)}
            for key in ("cpu_us_per_pair", "server_pct_of_core", "rtt_p50_ms", "rtt_p99_ms"):
                row[key] = _median([r[key] for r in good])
            row["status"] = _row_status(mine, good)
            rows.append(row)
    _add_ratios(rows)
    return rows


def _row_status(mine: list[dict], good: list[dict]) -> str:
    if not good:
        return status(mine[0]) if mine else "not run"
    saturated = sum(1 for r in good if r["saturated"])
    text = f"saturated {saturated}/{len(good)}" if saturated else "ok"
    if len(good) < len(mine):
        text += f", {len(mine) - len(good)} run(s) dropped"
    noisy = sum(1 for r in good if r["interference"].get("noisy"))
    if noisy:
        # Other processes used our cores: server CPU is still its own, but caches and
        # RTT suffer, so the figure deserves less trust.
        text += f", noisy {noisy}/{len(good)}"
    return text


def _add_ratios(rows: list[dict]) -> None:
    ref = {r["n"]: r["cpu_us_per_pair"] for r in rows if r["stack"] == REFERENCE}
    for r in rows:
        base = ref.get(r["n"])
        mine = r["cpu_us_per_pair"]
        r["ratio_to_reference"] = round(mine / base, 2) if base and mine else None


def text_report(suite: dict) -> str:
    head = (
        f"{'stack':<20}{'N':>5}{'µs/pair':>10}{'% core':>8}{'RTT p50':>9}{'RTT p99':>9}"
        f"{'x ' + REFERENCE:>18}  status"
    )
    lines = [
        "Server CPU per WebSocket message pair (receive ~390-byte text + send it back), "
        f"{suite['plan']['rate_hz']:.0f} msg/s per connection, median of "
        f"{suite['plan']['repeats']} repeat(s), RTT in ms",
        head,
        "-" * len(head),
    ]
    for r in suite["summary"]:
        lines.append(
            f"{r['stack']:<20}{r['n']:>5}{_fmt(r['cpu_us_per_pair']):>10}"
            f"{_fmt(r['server_pct_of_core']):>8}{_fmt(r['rtt_p50_ms'], 2):>9}"
            f"{_fmt(r['rtt_p99_ms'], 2):>9}{_fmt(r['ratio_to_reference'], 2):>18}  "
            f"{r['status']}"
        )
    for stack, why in suite["skipped"].items():
        lines.append(f"{stack}: skipped ({why})")
    invalid = [r for r in suite["runs"] if status(r) == "INVALID"]
    for r in invalid:
        lines.append(
            f"INVALID {r['stack']} N={r['n']}: {'; '.join(r['driver']['invalid_reasons'])}"
        )
    lines.append(f"elapsed {suite['elapsed_s']} s; cores {suite['cores']}")
    return "\n".join(lines)


def _fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


# -- command line ------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench wsstack", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="N=100, 1 repeat, 3 s windows")
    p.add_argument("--json", type=Path, default=RESULTS / "wsstack.json", help="results file")
    p.add_argument("--stacks", default=",".join(STACKS), help="comma list (default: all)")
    p.add_argument("--n", help="comma list of connection counts")
    p.add_argument("--repeats", type=int)
    p.add_argument("--window", type=float, help="measured seconds per run")
    p.add_argument("--warmup", type=float, help="warm-up seconds per run")
    p.add_argument("--quiet-wait", type=float, help="max seconds to wait for idle cores")
    p.add_argument("--no-pin", action="store_true", help="do not pin to CPUs")
    p.add_argument("--serve", metavar="STACK", help=argparse.SUPPRESS)  # the child process
    return p


def _plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    overrides = {
        "ns": tuple(int(x) for x in args.n.split(",")) if args.n else None,
        "repeats": args.repeats,
        "window_s": args.window,
        "warmup_s": args.warmup,
        "quiet_wait_s": args.quiet_wait,
    }
    return replace(plan, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.serve:
        serve_stack(args.serve)
        return 0
    stacks = tuple(s.strip() for s in args.stacks.split(",") if s.strip())
    suite = run_suite(stacks, _plan(args), not args.no_pin, Progress())
    suite["mode"] = "quick" if args.quick else "full"
    print(text_report(suite))
    save_json(args.json, suite, indent=1)
    print(f"\nJSON: {args.json}")
    bad = [r for r in suite["runs"] if status(r) in ("ERROR", "BAD-ECHO")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
