"""Deadlines served by the media reactor's passes instead of task wake-ups.

Why: every agent connection has a watchdog (``relay.agents.liveness``) that pings once a
ping interval (1 s) and checks a few timestamps. As a Trio task that sleeps to each
deadline, a check costs a task step (a cancel scope, a deadline, a coroutine resume, the
run loop's own iteration between two reactor passes): measured in place at 400 calls,
410 watchdog steps a second of ~50 µs each, plus ~130 µs of run-loop work per iteration
they cause between passes (``bench/published/sweep/``). Under load the reactor passes
every 1.5 ms anyway; a check that is due runs there, inline, for a few µs.

A :class:`Sweep` is a heap of one-shot timers whose callbacks run synchronously at the
end of a pass (``Reactor._pass``), at most one pass late. It never wakes anyone by
itself: a caller that must not depend on passes (none may come: no media flowing, no
reactor) keeps its own backstop deadline (``liveness.watch`` waits with one
``BACKSTOP_S`` after each due time) and moves it forward whenever a pass served it.

Callbacks must not raise; an exception is logged, counted, and only that timer is lost.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable

import trio

log = logging.getLogger("relay.media.sweep")

#: How late a timer's owner serves it itself when no pass did: longer than the gap
#: between two passes whenever one call is up (Twilio sends a media message every 20 ms
#: per call, and each message makes a pass), short next to any liveness deadline.
BACKSTOP_S = 0.025


class SweepTimer:
    """One reusable one-shot timer: ``set(when)`` (re)arms it, ``cancel()`` disarms it."""

    __slots__ = ("_callback", "_sweep", "due")

    def __init__(self, sweep: Sweep, callback: Callable[[float], None]) -> None:
        self._sweep = sweep
        self._callback = callback
        self.due: float | None = None  # None: not armed

    def set(self, when: float) -> None:
        """Run the callback (with the pass's time) at the first pass at or after ``when``;
        replaces any earlier setting."""
        self.due = when
        sweep = self._sweep
        heapq.heappush(sweep._heap, (when, next(sweep._seq), self))

    def cancel(self) -> None:
        self.due = None


class Sweep:
    """The timers served by one reactor's passes (see the module docstring)."""

    #: the sweep of the reactor running in this Trio run (the first one, with two)
    _current: trio.lowlevel.RunVar[Sweep | None] = trio.lowlevel.RunVar("relay_sweep", default=None)

    def __init__(self) -> None:
        # (due, sequence, timer); a re-armed or cancelled timer leaves its old entry
        # behind, dropped when it comes up (at most one check interval later)
        self._heap: list[tuple[float, int, SweepTimer]] = []
        self._seq = itertools.count()
        self.served = 0  # callbacks run
        self.errors = 0  # callbacks that raised

    @classmethod
    def current(cls) -> Sweep | None:
        """The sweep served by this run's reactor, or None (no reactor running)."""
        try:
            return cls._current.get()
        except RuntimeError:  # outside a Trio run
            return None

    def install(self) -> bool:
        """Become this run's sweep unless another reactor's already is."""
        if Sweep._current.get() is not None:
            return False
        Sweep._current.set(self)
        return True

    def uninstall(self) -> None:
        if Sweep._current.get() is self:
            Sweep._current.set(None)

    def timer(self, callback: Callable[[float], None]) -> SweepTimer:
        return SweepTimer(self, callback)

    def __len__(self) -> int:
        return len(self._heap)

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def run_due(self, now: float) -> None:
        """Run every timer due at ``now`` (the reactor calls this at the end of a pass)."""
        heap = self._heap
        # Timers set from these callbacks wait for the next pass, even when due now: a
        # check that re-arms itself for `now` must not spin this one.
        first_new = next(self._seq)
        while heap and heap[0][0] <= now and heap[0][1] < first_new:
            when, _seq, timer = heapq.heappop(heap)
            if timer.due != when:
                continue  # re-armed since, or cancelled
            timer.due = None
            self.served += 1
            try:
                timer._callback(now)
            except Exception:
                self.errors += 1
                log.exception("sweep timer callback failed; that timer is dropped")
