"""CPU per wake of the agent connections' watchdogs: each on its own, or on the ping grid.

Every agent connection runs :func:`relay.agents.liveness.watch`, which wakes about once a
second to ping. A wake of its own costs the whole process a pass of Trio's run loop (the
expired deadline, a cancel scope, a task step and an ``epoll_wait`` sleep and wake-up);
on the shared ping grid (``liveness.PING_GRID_S``) the watchers due in the same 100 ms
wake in one pass. This runs ``--watchers`` real ``watch()`` loops over stand-in sockets
that answer each ping at once, started at random offsets, for ``--seconds`` per round,
with the grid off (0) and on, in rotating order; CPU from ``getrusage``, medians over
``--rounds``.

Run: ``python -m bench.watchwake`` (~60 s); writes ``bench/results/watchwake.json``.
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
from pathlib import Path

import trio

from bench.report import save_json
from relay.agents import liveness
from relay.agents.liveness import LivenessOptions

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "watchwake.json"


class _Peer:
    """What watch() reads of a WebSocket, for a peer that answers every ping at once."""

    def __init__(self) -> None:
        now = trio.current_time()
        self.closed = None
        self.last_received = now
        self.last_pong = now
        self.send_backlog_since = None
        self.messages_out = 0
        self.pings = 0

    def send_ping_nowait(self) -> None:
        self.pings += 1
        self.last_received = self.last_pong = trio.current_time()


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _round(
    watchers: int, seconds: float, grid_s: float, seed: int, warmup: float
) -> dict[str, float]:
    liveness.PING_GRID_S = grid_s
    rng = random.Random(seed)
    peers = [_Peer() for _ in range(watchers)]
    opts = LivenessOptions()

    async def one(peer: _Peer, delay: float) -> None:
        await trio.sleep(delay)
        await liveness.watch(peer, opts)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(one, peer, rng.random())
        await trio.sleep(warmup)  # all started and in their rhythm
        pings0 = sum(p.pings for p in peers)
        cpu0 = _cpu()
        await trio.sleep(seconds)
        cpu = _cpu() - cpu0
        pings = sum(p.pings for p in peers) - pings0
        nursery.cancel_scope.cancel()
    return {
        "cpu_pct_of_core": 100.0 * cpu / seconds,
        "wakes": pings,
        "cpu_us_per_wake": 1e6 * cpu / max(pings, 1),
    }


async def measure(
    watchers: list[int], seconds: float, rounds: int, warmup: float = 2.0
) -> dict[str, dict]:
    grids = {"own": 0.0, "grid": liveness.PING_GRID_S}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        str(n): {g: [] for g in grids} for n in watchers
    }
    saved = liveness.PING_GRID_S
    try:
        for r in range(rounds):
            order = list(grids) if r % 2 == 0 else list(reversed(grids))
            for n in watchers:
                for g in order:
                    runs[str(n)][g].append(await _round(n, seconds, grids[g], r, warmup))
    finally:
        liveness.PING_GRID_S = saved
    out: dict[str, dict] = {}
    for n, by_grid in runs.items():
        out[n] = {}
        for g, rs in by_grid.items():
            out[n][g] = {
                "grid_s": grids[g],
                "cpu_us_per_wake_median": statistics.median(x["cpu_us_per_wake"] for x in rs),
                "cpu_pct_of_core_median": statistics.median(x["cpu_pct_of_core"] for x in rs),
                "rounds": rs,
            }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.watchwake", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--watchers", default="100,400", help="comma list of watcher counts")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args(argv)
    watchers = [int(x) for x in args.watchers.split(",") if x]
    result = trio.run(measure, watchers, args.seconds, args.rounds, args.warmup)
    print(f"{'watchers':>8}  {'wakes on':>12}  {'µs CPU/wake':>11}  {'% of a core':>11}")
    for n, by_grid in result.items():
        for g, row in by_grid.items():
            label = "own wakes" if g == "own" else f"{row['grid_s'] * 1000:.0f} ms grid"
            print(
                f"{n:>8}  {label:>12}  {row['cpu_us_per_wake_median']:>11.1f}"
                f"  {row['cpu_pct_of_core_median']:>11.2f}"
            )
    save_json(
        args.json,
        {"watchers": watchers, "seconds": args.seconds, "rounds": args.rounds, "result": result},
    )
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
