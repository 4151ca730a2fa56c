"""Admission control: refuse a call at the voice webhook before quality degrades.

A relay that takes every call degrades every call once its core is saturated: media
messages queue behind each other, both legs' latency grows, and the calls already up
suffer for the ones that came last. Refusing at the webhook (``<Reject reason="busy"/>``:
Twilio plays a busy signal, the caller can retry or the number's fallback URL takes over)
costs one caller a retry instead of costing everyone their audio.

Each worker samples its own headroom off the media path (:meth:`Headroom.run`):

* **CPU**: this process's CPU time over the last second; divided by the active calls it
  gives what a call costs here now, so the projection for one more call (plus the ones
  answered whose streams have not started yet) needs no calibration per machine or agent;
* **loop lag**: how late a 50 ms timer fires: the latency every media message on the loop
  sees on top of its own work, whatever the cause (our CPU, a neighbour on the core, GC);
* **descriptors**: three per call (Twilio's socket, the agent's, a webhook), so a call is
  refused while there is still room to refuse it, not by ``accept`` failing with EMFILE.

:meth:`Headroom.refusal` answers the webhook from those numbers: a constant-time check.
"""

from __future__ import annotations

import logging
import resource
import time
from collections import deque
from collections.abc import Callable

import trio

from ..config import ServerConfig
from ..metrics import Histogram

log = logging.getLogger("relay.media.headroom")

__all__ = ["FDS_PER_CALL", "FD_RESERVE", "Headroom", "fd_soft_limit", "raise_fd_limit"]

#: descriptors a call holds: Twilio's media socket, the agent's socket, and a webhook's
#: connection while it is answered
FDS_PER_CALL = 3
#: descriptors kept back for the store, logs, listeners, the handoff sockets
FD_RESERVE = 64

TICK_S = 0.05
#: loop-lag samples kept: the last two seconds
LAG_WINDOW = 40
#: CPU is measured over this window
CPU_WINDOW_S = 1.0
#: loop lag histogram bounds, seconds
LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
#: below this many calls the per-call CPU estimate is mostly fixed overhead: no CPU refusals
MIN_CALLS_FOR_CPU = 10


def raise_fd_limit() -> int:
    """Raise the soft descriptor limit to the hard one; returns the calls it allows.

    systemd's default soft limit is 1,024 (~300 calls at three descriptors each); past it
    ``accept`` fails with EMFILE and callers time out instead of being refused. The hard
    limit (often 524,288) is ours to take."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, hard, exc)
    return max(0, (soft - FD_RESERVE) // FDS_PER_CALL)


def fd_soft_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Headroom:
    """This worker's load, sampled by :meth:`run`; :meth:`refusal` decides."""

    def __init__(self, cfg: ServerConfig, active: Callable[[], int] = lambda: 0) -> None:
        self.active = active
        self.enabled = cfg.admission
        self.max_cpu = cfg.admission_max_cpu
        self.max_lag_ms = cfg.admission_max_lag_ms
        self.cpu = 0.0  # fraction of one core, last window
        self.calls = 0.0  # active calls, averaged over the same window
        self.lags_ms: deque[float] = deque(maxlen=LAG_WINDOW)
        #: every lag sample since start, for dashboards (the deque above decides)
        self.lag_hist = Histogram(LAG_BUCKETS, window=1)
        #: refusals by the rule that made them (descriptors, cpu, loop_lag)
        self.refused: dict[str, int] = {"descriptors": 0, "cpu": 0, "loop_lag": 0}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        calls, ticks = 0, 0
        while True:
            due = trio.current_time() + TICK_S
            await trio.sleep_until(due)
            lag_s = max(0.0, trio.current_time() - due)
            self.lags_ms.append(lag_s * 1000.0)
            self.lag_hist.observe(lag_s)
            calls += self.active()
            ticks += 1
            wall = time.perf_counter()
            if wall - wall0 >= CPU_WINDOW_S:
                cpu = time.process_time()
                # CPU and calls over the same second: while calls ramp up, the CPU of the
                # window divided by the calls of *now* would underestimate a call's cost
                self.cpu = (cpu - cpu0) / (wall - wall0)
                self.calls = calls / ticks
                wall0, cpu0 = wall, cpu
                calls, ticks = 0, 0

    def lag_ms(self) -> float:
        """The 75th percentile of the last two seconds' lags: a loop that is behind most of
        the time, not one GC pause or one scheduler hiccup of a shared core."""
        if len(self.lags_ms) < 4:
            return 0.0
        ordered = sorted(self.lags_ms)
        return ordered[(len(ordered) * 3) // 4]

    def refusal(self, active: int, pending: int) -> str:
        """Why one more call must be refused now ("" = admit). ``pending``: calls answered
        whose streams have not started (they will cost as much as the active ones)."""
        if not self.enabled:
            return ""
        coming = active + pending + 1
        fd_limit = fd_soft_limit()
        if coming * FDS_PER_CALL + FD_RESERVE > fd_limit:
            self.refused["descriptors"] += 1
            return f"descriptors: {coming} calls need {coming * FDS_PER_CALL} of {fd_limit}"
        if active >= MIN_CALLS_FOR_CPU and self.calls >= MIN_CALLS_FOR_CPU:
            projected = self.cpu / self.calls * coming
            if projected > self.max_cpu:
                self.refused["cpu"] += 1
                return (
                    f"cpu: {self.cpu:.0%} at {active} calls, {projected:.0%} projected "
                    f"with {pending + 1} more (limit {self.max_cpu:.0%})"
                )
        lag = self.lag_ms()
        if lag > self.max_lag_ms:
            self.refused["loop_lag"] += 1
            return f"loop lag {lag:.1f} ms (limit {self.max_lag_ms:g} ms)"
        return ""

    def render(self) -> list[str]:
        """Prometheus lines for relay/metrics.py: what the next refusal decision sees."""
        per_call = self.cpu / self.calls if self.calls else 0.0
        return [
            "# HELP relay_headroom_cpu_ratio This worker's CPU over the last second, in cores.",
            "# TYPE relay_headroom_cpu_ratio gauge",
            f"relay_headroom_cpu_ratio {self.cpu:.4f}",
            "# HELP relay_headroom_cpu_per_call_ratio Last second's CPU per active call, in cores.",
            "# TYPE relay_headroom_cpu_per_call_ratio gauge",
            f"relay_headroom_cpu_per_call_ratio {per_call:.6f}",
            "# HELP relay_headroom_loop_lag_seconds The loop lag admission control compares.",
            "# TYPE relay_headroom_loop_lag_seconds gauge",
            f"relay_headroom_loop_lag_seconds {self.lag_ms() / 1000.0:.5f}",
            "# HELP relay_loop_lag_seconds How late a 50 ms timer fires on this worker's loop.",
            "# TYPE relay_loop_lag_seconds histogram",
            *self.lag_hist.render("relay_loop_lag_seconds"),
            "# HELP relay_admission_refusals_total Calls refused as overloaded, by rule.",
            "# TYPE relay_admission_refusals_total counter",
            *(f'relay_admission_refusals_total{{rule="{r}"}} {n}' for r, n in self.refused.items()),
        ]
