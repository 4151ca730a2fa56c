"""What the media reactor may read of the Trio run loop it runs in.

Why: between passes the reactor waits for its pass clock (``passtimer``). Waiting through
Trio (``wait_readable`` on the timer, the run loop's ``epoll_wait``, a reschedule and a task
step) cost 65 µs of CPU per pass on this machine kind; served as below, 37 µs, of which
~22 µs is the kernel's sleep and wake-up (``python -m bench.wakeup``). At ~650 ticks a
second the difference is ~2 % of a core: 7–8 % of the relay's CPU at 50–100 calls in
interleaved runs (``bench/published/idle-clock/``). So while its pass clock runs, the
reactor serves ticks from Trio's own idle point: an instrument's ``before_io_wait`` hook,
which Trio calls once per run-loop iteration when every runnable task has run. There,
with nothing runnable, it blocks on the timer *and* on Trio's epoll descriptor, so any I/O
Trio waits for (sockets, ``run_sync_soon`` from worker threads, signals: all of them land
on that epoll) ends the wait at once and Trio carries on.

Trio has no public way to see its run queue without also walking every registered
descriptor (``current_statistics``), nor to name its epoll descriptor, so :meth:`TrioLoop.
current` reads four private attributes, once per reactor run. Where they are missing
(another Trio version, another I/O backend, a test's mock clock) it returns ``None`` and
the reactor waits through Trio as before; ``tests/test_runloop.py`` fails if that happens
with the Trio this project installs. It also takes the system clock's offset, so the
reactor's compiled pass (``codec.ReactorCore``) reads Trio's time as ``offset +
perf_counter()`` in C, as ``SystemClock.current_time`` computes it.
"""

from __future__ import annotations

import select
from collections.abc import Callable, Sized
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TrioLoop:
    #: Trio's run queue: tasks scheduled for the next batch (empty when nothing is runnable)
    runq: Sized
    #: tasks in ``wait_all_tasks_blocked``: while any wait, the loop's idle point is theirs
    idle_waiters: Sized
    #: Trio's epoll descriptor: readable when any I/O Trio waits for is ready
    epoll_fd: int
    #: makes Trio's next I/O wait return at once (its wake-up socket)
    force_wakeup: Callable[[], None]
    #: Trio's time is this plus ``time.perf_counter()`` (``SystemClock.current_time``)
    clock_offset: float

    @classmethod
    def current(cls) -> TrioLoop | None:
        """The running loop's view, or None where this Trio is not the one it knows."""
        try:
            from trio._core._run import GLOBAL_RUN_CONTEXT, SystemClock

            runner = GLOBAL_RUN_CONTEXT.runner
            io = runner.io_manager
            epoll = io._epoll
            clock = runner.clock
            system_clock, offset = False, 0.0
            if isinstance(clock, SystemClock) and type(clock) is SystemClock:
                system_clock, offset = True, float(clock.offset)
            view = cls(
                runner.runq, runner.waiting_for_idle, epoll.fileno(), io.force_wakeup, offset
            )
        except (ImportError, AttributeError, RuntimeError):
            return None
        if not isinstance(epoll, select.epoll) or not system_clock:
            return None
        return view
