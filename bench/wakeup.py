"""Wake-up cost of the media reactor's pass clock: CPU per wait, Trio sleep vs timerfd.

The reactor sleeps between passes up to a thousand times a second, so what one
sleep-and-wake costs is a fixed part of the relay's CPU at every load. Candidates, each
timed in rotating order for ``--waits`` waits per round (CPU from getrusage, wall from
perf_counter; medians over rounds):

* ``trio.sleep``: what the reactor used first (a cancel scope and deadline per sleep; the
  run loop's epoll_wait timeout is rounded up to whole milliseconds by Python)
* ``timerfd`` (relay.media.passtimer.PassTimer): a periodic kernel timer waited on with
  ``wait_readable``, what the reactor uses now
* ``epoll_wait`` alone (``select.epoll().poll(period)`` outside Trio): the kernel's part,
  a floor no Trio code can go under
* the reactor itself (``relay.media.reactor.Reactor``, four always-readable sockets, no-op
  handlers), its ticks waited for through Trio (``idle_clock=False``) or served from Trio's
  idle point (``relay.media.runloop``, the default): CPU per pass, what the relay pays

Run: ``python -m bench.wakeup`` (~90 s); writes ``bench/results/wakeup.json``.
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import trio

from bench.report import save_json
from relay.media.passtimer import PassTimer
from relay.media.reactor import Reactor

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "wakeup.json"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _trio_sleep(period: float, waits: int) -> None:
    for _ in range(waits):
        await trio.sleep(period)


async def _timerfd(period: float, waits: int) -> None:
    timer = PassTimer.create()
    if timer is None:
        raise RuntimeError("no timerfd on this platform")
    try:
        timer.arm(period)
        for _ in range(waits):
            await timer.wait()
    finally:
        timer.close()


async def _epoll(period: float, waits: int) -> None:
    ep = select.epoll()
    try:
        for _ in range(waits):
            ep.poll(period)  # blocks the loop: a floor for comparison, not an option
    finally:
        ep.close()


async def _reactor(idle_clock: bool, period: float, waits: int) -> None:
    # Four sockets that stay readable: enough per pass for the reactor to coalesce (at one
    # per pass it would serve each message on its own wake-up instead).
    pairs = [socket.socketpair() for _ in range(4)]
    reactor = Reactor(idle_clock=idle_clock)
    done = trio.Event()

    def handler() -> None:
        if reactor.wakeups >= waits:
            done.set()

    try:
        for a, b in pairs:
            b.send(b"stays unread")
            reactor.register(a, handler)
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run, period)
            await done.wait()
            nursery.cancel_scope.cancel()
    finally:
        for a, b in pairs:
            a.close()
            b.close()


CANDIDATES: dict[str, Callable[[float, int], Awaitable[None]]] = {
    "timerfd (PassTimer)": _timerfd,
    "trio.sleep": _trio_sleep,
    "epoll_wait alone": _epoll,
    "reactor, through Trio": partial(_reactor, False),
    "reactor, idle point": partial(_reactor, True),
}


async def measure(periods: list[float], waits: int, rounds: int) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    names = list(CANDIDATES)
    for period in periods:
        cpu: dict[str, list[float]] = {n: [] for n in names}
        wall: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                c0, t0 = _cpu(), time.perf_counter()
                await CANDIDATES[name](period, waits)
                cpu[name].append((_cpu() - c0) / waits * 1e6)
                wall[name].append((time.perf_counter() - t0) / waits * 1e6)
        out[f"{period * 1000:g} ms"] = {
            name: {
                "cpu_us_per_wait": round(statistics.median(cpu[name]), 1),
                "wall_us_per_wait": round(statistics.median(wall[name]), 1),
                "cpu_rounds": [round(x, 1) for x in cpu[name]],
            }
            for name in names
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.wakeup", description=__doc__.splitlines()[0])
    ap.add_argument("--waits", type=int, default=1000, help="waits per candidate per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--periods-ms", default="0.5,1,1.5", help="comma list")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args(argv)
    periods = [float(x) / 1000 for x in args.periods_ms.split(",")]
    started = time.time()
    table = trio.run(measure, periods, args.waits, args.rounds)
    print(f"{'period':<8} {'wait':<24} {'µs CPU / wait':>14} {'µs wall / wait':>15}")
    for period, row in table.items():
        for name, v in row.items():
            cpu, wall = v["cpu_us_per_wait"], v["wall_us_per_wait"]
            print(f"{period:<8} {name:<24} {cpu:14.1f} {wall:15.1f}")
            period = ""
    result = {
        "python": sys.version.split()[0],
        "trio": trio.__version__,
        "waits_per_round": args.waits,
        "rounds": args.rounds,
        "unit": "µs of process CPU (user+sys) and wall time per wait, median over rounds",
        "periods": table,
        "seconds": round(time.time() - started, 1),
    }
    save_json(args.json, result)
    print(f"\nwrote {args.json} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    raise SystemExit(main())
