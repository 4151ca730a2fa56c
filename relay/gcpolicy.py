"""How a long-running relay process uses CPython's cyclic garbage collector.

Two opposite costs meet here:

* **CPU.** Each media message allocates a few short-lived containers; with CPython's default
  thresholds (700, 10, 10) that ran the collector hundreds of times a second, and perf showed
  ~35 % of the relay's CPU in ``gc_collect_main`` on a 150-call run. Those per-message
  objects die by reference counting, so :func:`tune_gc` raises the thresholds far enough
  that automatic collections are rare, and freezes what startup left alive (modules, the
  app) out of the collector's sight for good.
* **Memory.** An ended call did leave reference cycles behind, and with thresholds that
  high they waited for a collection that almost never came: a 5-minute soak at 160 calls
  grew by ~200 objects per ended call, RSS by ~27 KB, and a forced ``gc.collect()`` freed a
  quarter of the heap at once (by then pymalloc's arenas are fragmented and RSS does not
  come back). Their strongly connected components, found in the garbage of a soak, were:
  the agent protocol core and its dict of bound-method handlers; the call and the bound
  method in its reactor registration; Hypercorn's ``TCPServer`` and its protocol, whose
  ``send`` is the server's bound method; Werkzeug's recursive routing closure. Everything
  else of a call (its sockets, WebSockets, turns, task tree) hung off the first two.

The fix is at both ends. The cycles relay itself made are gone (protocol cores keep their
handlers unbound, a call drops its reactor registration at the end, a closed socket raises
a fresh exception rather than the one it keeps, the webhook server's protocol is dropped
when its connection ends), so an ended call is freed by reference counting. What others
still leave (a routing closure per webhook request) is short-lived, and :class:`GcSweeper`
collects the young generations every ``server.gc_young_s`` (0.25 s): a walk of only what was
allocated since and still lives, so such garbage is freed before it is promoted. The walk
is mostly the calls' current waits (each wait's coroutine and cancel scope), so its
length grows with the interval: at 270 calls on one core a 1 s clock paused the loop
2.7–3.5 ms per sweep on average (1–3 of 15 sweeps over 5 ms), 0.25 s 0.8–1.0 ms, for
~15 % more in total (``bench/published/gc-young/``, ``relay_gc_pause_seconds`` in each
run's metrics). Near saturation the length of a stall, not the sum, is what reaches the
tail latency, hence 0.25 s; an hour's soak at 224 calls with it held memory flat (RSS
+1.68 MiB, ``bench/published/soak-224-gc-young-0.25s.json``).
A full collection, which walks every live call's objects (tens of ms at a few hundred
calls, hence never on a short clock), runs every ``server.gc_full_s`` (10 min) for whatever
cycles a rarer path still makes. Pauses are measured (``relay_gc_pause_seconds``) so the
cost is visible next to the frame latency it competes with.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import math
import os
import sys
import time
from collections.abc import Callable

import trio

from .metrics import Histogram

log = logging.getLogger("relay.gc")

#: a full collection's pause, in seconds: a few ms at hundreds of calls
PAUSE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or None elsewhere (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def tune_gc() -> None:
    """Process-wide collector settings for ``relay serve`` (see the module docstring)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    # The store's worker threads (relay/control/store.py) run Python code too; when one
    # holds the GIL, the Trio loop waits up to the switch interval (5 ms by default) for
    # it. 1 ms keeps a burst of call-history writes from showing in the media latency.
    sys.setswitchinterval(0.001)
    if os.environ.get("RELAY_GC_LOG"):
        started: list[float] = []

        def _log(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                started[:] = [time.perf_counter()]
            elif started:
                pause = (time.perf_counter() - started[0]) * 1000
                with open(os.environ["RELAY_GC_LOG"], "a") as fh:
                    fh.write(f"gen{info['generation']} {pause:.2f} ms {info['collected']}\n")

        gc.callbacks.append(_log)


class GcSweeper:
    """Young collections every ``young_s`` seconds and a full one every ``full_s`` (0 = never;
    CPython's automatic collector with :func:`tune_gc`'s thresholds is then the only one)."""

    def __init__(self, young_s: float, full_s: float) -> None:
        self.young_s = young_s
        self.full_s = full_s
        #: per generation collected (1 = young, 2 = full): sweeps, objects freed, pauses
        self.sweeps = {1: 0, 2: 0}
        self.collected = {1: 0, 2: 0}
        self.pauses = {1: Histogram(PAUSE_BUCKETS, window=1_000), 2: Histogram(PAUSE_BUCKETS)}
        # After a full collection, hand glibc's free heap pages back: a soak's remaining RSS
        # creep (with the object count flat) was free space inside malloc's heap, left by
        # the mix of message sizes (agent audio chunks, socket reads) that calls allocate.
        self._trim = _malloc_trim()

    @staticmethod
    def freeze_startup() -> None:
        """Once the server is up (the store migrated, the app built, its imports done):
        everything alive now lives as long as the process, so take it out of every future
        collection's walk as :func:`tune_gc` did for the imports before it."""
        gc.collect()
        gc.freeze()

    def sweep(self, generation: int) -> int:
        """Collect ``generation`` (1 or 2) and the younger ones now; returns objects freed."""
        t0 = time.perf_counter()
        freed = gc.collect(generation)
        if generation == 2 and self._trim is not None:
            self._trim()
        pause = time.perf_counter() - t0
        self.pauses[generation].observe(pause)
        if generation == 2:
            log.debug("full collection: %d objects freed in %.1f ms", freed, pause * 1e3)
        self.sweeps[generation] += 1
        self.collected[generation] += freed
        return freed

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if self.full_s > 0:
            # The sweeper owns full collections: CPython's own would start whenever a
            # quarter of the old generation is new, i.e. every minute or so under call
            # churn, each pausing every call for the whole walk.
            t0, t1, _ = gc.get_threshold()
            gc.set_threshold(t0, t1, 1_000_000)
        young, full = self.young_s, self.full_s
        if young <= 0 and full <= 0:
            return
        now = trio.current_time()
        next_young = now + young if young > 0 else math.inf
        next_full = now + full if full > 0 else math.inf
        while True:
            await trio.sleep_until(min(next_young, next_full))
            now = trio.current_time()
            if now >= next_full:
                self.sweep(2)
                next_full = now + full
                if young > 0:
                    next_young = now + young
            elif now >= next_young:
                self.sweep(1)
                next_young = now + young

    def render(self) -> list[str]:
        """Prometheus lines for relay/metrics.py."""
        lines = [
            "# HELP relay_gc_sweeps_total Garbage collections run by the sweeper, by generation.",
            "# TYPE relay_gc_sweeps_total counter",
            *(f'relay_gc_sweeps_total{{generation="{g}"}} {n}' for g, n in self.sweeps.items()),
            "# HELP relay_gc_collected_total Unreachable objects the sweeper freed.",
            "# TYPE relay_gc_collected_total counter",
            *(
                f'relay_gc_collected_total{{generation="{g}"}} {n}'
                for g, n in self.collected.items()
            ),
            "# HELP relay_gc_pause_seconds The sweeper's collection pauses.",
            "# TYPE relay_gc_pause_seconds histogram",
        ]
        for g, hist in self.pauses.items():
            lines += hist.render("relay_gc_pause_seconds", f'generation="{g}"')
        return lines
