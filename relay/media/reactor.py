"""One readiness multiplexer for every media socket in the process.

Why: a call moves ~130 WebSocket messages per second, each arriving on its own 20 ms beat.
With one Trio task parked per socket, every message costs a task wake-up (trio's epoll
bookkeeping, a scheduler pass, a coroutine resume): measured here at roughly two thirds of
the relay's CPU per message. The reactor parks *one* task on an epoll set holding all media
sockets; each wake-up then serves every socket that became readable meanwhile, and the
handlers run synchronously (parse, forward with a non-blocking write) with no task switch.
Under load one wake-up serves dozens of messages, which is what lifts calls per core.

Structured concurrency is unchanged: each call still owns its task tree; its reader tasks
register their socket here and wait for the socket's end, and they unregister in
``finally`` before the call closes the socket, so a recycled file descriptor can never
reach a handler of a finished call. Handlers must not raise; an exception is logged and
counted, and only that socket's call is affected.
"""

from __future__ import annotations

import logging
import select
import socket
import time
from collections.abc import Callable

import trio

from . import codec
from .passtimer import PassTimer
from .runloop import TrioLoop
from .sweep import Sweep

log = logging.getLogger("relay.media.reactor")

Handler = Callable[[], None]

_EVENTS = getattr(select, "EPOLLIN", 1) | getattr(select, "EPOLLRDHUP", 0x2000)

#: below this, a timer costs more than the wait it would buy (a Trio sleep costs ~100 µs
#: of CPU on this machine kind, most of it the kernel's timer and wake-up)
_MIN_SLEEP_S = 0.0001


class Reactor:
    def __init__(self, *, kernel_timer: bool = True, idle_clock: bool = True) -> None:
        """``kernel_timer``: pace coalesced passes with a ``timerfd`` (``passtimer``) where
        the platform has one; ``False`` sleeps with Trio (what a mock clock can drive).
        ``idle_clock``: serve the timer's ticks from Trio's idle point (``runloop``) where
        the run loop can be probed; ``False`` waits for each tick through Trio."""
        self._epoll = select.epoll()
        self._kernel_timer = kernel_timer
        self._idle_clock = idle_clock
        #: timers served at the end of each pass (agent watchdogs; see ``sweep``)
        self.sweep = Sweep()
        #: the handler table and the pass itself (compiled: codec_ref.ReactorCore is the
        #: specification; the pass clock's fixed cost per pass is what it cuts)
        self._core = codec.ReactorCore(
            self._epoll,
            trio.current_time,
            self._handler_failed,
            self.sweep._heap,
            self.sweep.run_due,
        )
        self.timer_ticks = 0
        #: passes served from Trio's idle point (``_IdleClock``) rather than a task step
        self.idle_passes = 0

    @property
    def clock(self) -> Callable[[], float]:
        """``trio.current_time`` for the code the passes run: the same time, read in C
        while the reactor runs on Trio's system clock (``runloop``)."""
        return self._core.now

    @property
    def wakeups(self) -> int:
        return self._core.wakeups

    @property
    def dispatched(self) -> int:
        return self._core.dispatched

    @property
    def handler_errors(self) -> int:
        return self._core.handler_errors

    @staticmethod
    def available() -> bool:
        return hasattr(select, "epoll")

    def register(self, sock: socket.socket, handler: Handler) -> None:
        fd = sock.fileno()
        self._epoll.register(fd, _EVENTS)
        self._core.set_handler(fd, handler)

    def unregister(self, sock: socket.socket, handler: Handler) -> None:
        fd = sock.fileno()
        # Only our own registration: never someone else's that reuses the number.
        if fd < 0 or self._core.handler(fd) is not handler:
            return
        self._core.drop(fd)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass

    def replace(self, sock: socket.socket, old: Handler, new: Handler) -> bool:
        """Serve ``sock`` with ``new`` instead of ``old`` from the next event on; False (and
        nothing changed) unless ``old`` serves it now."""
        fd = sock.fileno()
        if fd < 0 or self._core.handler(fd) is not old:
            return False
        self._core.set_handler(fd, new)
        return True

    def __len__(self) -> int:
        return len(self._core)

    def _handler_failed(self, fd: int) -> None:
        # Called by the core inside its ``except``: a bug, not peer input (handlers turn
        # that into call events). The core dropped the handler; the descriptor leaves the
        # epoll set too, so a still-readable socket cannot spin the loop.
        log.exception("media handler for fd %d failed; socket dropped", fd)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass

    async def run(
        self,
        coalesce_s: float = 0.001,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve readiness until cancelled.

        ``coalesce_s``: when messages arrive faster than about two per window, passes start
        at most every ``coalesce_s`` (on the ticks of a periodic kernel timer, or sleeping
        out the rest of the window after a pass without one) instead of re-arming readiness
        after every message, so one wake-up serves many sockets. It adds at most
        ``coalesce_s`` of delay per hop and only under load; at low rates every message is
        served on its own wake-up.
        """
        epoll = self._epoll
        epfd = epoll.fileno()
        core = self._core
        timer = PassTimer.create() if self._kernel_timer and coalesce_s > 0 else None
        loop = TrioLoop.current()
        if loop is not None:
            core.use_clock_offset(loop.clock_offset)  # Trio's clock, read in C
        clock: _IdleClock | None = None
        if timer is not None and self._idle_clock:
            clock = _IdleClock.install(self, timer, loop)
        installed = self.sweep.install()
        task_status.started()
        core.rate = 0.0
        core.last = trio.current_time()
        try:
            while True:
                if not core.poll() and (timer is None or not timer.period_s):
                    await trio.lowlevel.wait_readable(epfd)  # idle: served when one comes
                    continue
                # A tick with nothing ready is an empty pass while the clock runs.
                # Arrivals come in bursts (each caller's frames on its own 20 ms beat, a
                # peer's sends bunched by its own wake-ups), so at ~50 calls one tick in
                # 20-40 finds a gap. Stopping the clock there and restarting it at the
                # next message cost two task steps, two timerfd_settime and a Trio
                # wait_readable; an empty pass only lowers the rate (ReactorCore.serve),
                # and the clock stops after about four empty ticks in a row.
                started = trio.current_time()
                if core.serve(coalesce_s):
                    # Passes start at most every coalesce_s: a pass that took longer
                    # than that has let readiness pile up already, and sleeping the
                    # whole window after it only adds dead time to every message's wait
                    # (at 400 calls a pass served ~136 sockets every 5.5 ms that way).
                    if timer is not None:
                        # Periodic: the next pass starts on the next tick, at once (after
                        # a checkpoint) if this pass overran it.
                        timer.arm(coalesce_s)
                        if clock is not None and not clock.failed:
                            # Ticks served from Trio's idle point until the rate drops.
                            await clock.serve(coalesce_s)
                        else:
                            await timer.wait()
                        self.timer_ticks = timer.ticks
                        continue
                    rest = coalesce_s - (trio.current_time() - started)
                    if rest > _MIN_SLEEP_S:
                        await trio.sleep(rest)
                    else:
                        await trio.lowlevel.checkpoint()  # let the other tasks run
                else:
                    if timer is not None:
                        timer.disarm()
                    await trio.lowlevel.wait_readable(epfd)
        finally:
            if installed:
                self.sweep.uninstall()
            if clock is not None:
                clock.close()
            if timer is not None:
                timer.close()
            epoll.close()


class _IdleClock(trio.abc.Instrument):
    """The reactor's pass clock, served from Trio's idle point (see ``runloop``).

    While ``serve`` runs, the reactor task is parked and this instrument's
    ``before_io_wait`` hook, which Trio calls once per run-loop iteration after every
    runnable task has run, serves the ticks: when Trio is about to wait for I/O it blocks
    on the timer and Trio's epoll together, running a pass on each tick, and returns as
    soon as Trio has work (I/O ready, a task made runnable by a pass, a deadline due).
    When Trio is busy (no wait ahead) it serves a tick that is already due without
    waiting. The task resumes when passes should stop coalescing, when there is nothing
    to serve, or when the hook fails (it then stays with Trio waits for good).

    Handlers run in the reactor task's context, exactly as from the task's own passes.
    """

    #: the clock serving from this Trio run's idle point: one per run, since a hook that
    #: blocks until its own tick would starve a second reactor's clock; a second reactor in
    #: the same run (two relays in one process) waits through Trio, and its ticks, on
    #: Trio's epoll, end the first one's blocking waits
    _active: trio.lowlevel.RunVar[_IdleClock | None] = trio.lowlevel.RunVar(
        "relay_idle_clock", default=None
    )

    @classmethod
    def install(
        cls, reactor: Reactor, timer: PassTimer, loop: TrioLoop | None
    ) -> _IdleClock | None:
        if loop is None:
            log.info("media reactor: pass clock waits through Trio (run loop not probed)")
            return None
        if cls._active.get() is not None:
            return None
        clock = cls(reactor, timer, loop)
        cls._active.set(clock)
        trio.lowlevel.add_instrument(clock)
        return clock

    def __init__(self, reactor: Reactor, timer: PassTimer, loop: TrioLoop) -> None:
        self._reactor = reactor
        self._timer = timer
        self._timer_fd = timer.fileno()
        self._loop = loop
        self._waits = select.epoll()
        self._waits.register(self._timer_fd, select.EPOLLIN)
        self._waits.register(loop.epoll_fd, select.EPOLLIN)
        self._task: trio.lowlevel.Task | None = None
        self._coalesce_s = 0.0
        self.failed = False

    async def serve(self, coalesce_s: float) -> None:
        """Park the reactor task while the hook serves the ticks."""
        self._task, self._coalesce_s = trio.lowlevel.current_task(), coalesce_s
        try:
            await trio.lowlevel.wait_task_rescheduled(self._abort)
        finally:
            self._task = None

    def _abort(self, _raise_cancel: object) -> trio.lowlevel.Abort:
        self._task = None  # cancelled: never reschedule it from the hook
        return trio.lowlevel.Abort.SUCCEEDED

    def _resume(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def before_io_wait(self, timeout: float) -> None:
        if self._task is None:
            return
        try:
            self._serve(timeout)
        except BaseException:
            # Trio drops an instrument that raises; never with the task parked: hand the
            # ticks back to it for good.
            self.failed = True
            log.exception("media pass clock failed at Trio's idle point; waits go through Trio")
            self._resume()
            self._loop.force_wakeup()
            raise

    def _serve(self, timeout: float) -> None:
        loop = self._loop
        if timeout <= 0 or loop.idle_waiters:
            # Trio has work (or a wait_all_tasks_blocked): only a tick already due.
            if self._timer.due():
                self._tick()
            return
        timer_fd, waits, runq = self._timer_fd, self._waits, loop.runq
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            events = waits.poll(left) if left > 0 else []
            if not events:
                loop.force_wakeup()  # a deadline is due; Trio would still wait `timeout`
                return
            io = False
            for fd, _ev in events:
                if fd == timer_fd:
                    self._timer.due()
                    self._tick()
                else:
                    io = True
            if io:
                return  # Trio's own wait returns at once with it
            if runq or self._task is None:
                loop.force_wakeup()  # a pass woke a task, or the reactor task resumes
                return

    def _tick(self) -> None:
        reactor = self._reactor
        core = reactor._core
        core.poll()
        task = self._task
        assert task is not None
        if not task.context.run(core.serve, self._coalesce_s):
            self._resume()  # too little to coalesce now: the task decides
            return
        reactor.idle_passes += 1
        reactor.timer_ticks = self._timer.ticks

    def close(self) -> None:
        self._task = None
        if _IdleClock._active.get() is self:
            _IdleClock._active.set(None)
        try:
            trio.lowlevel.remove_instrument(self)
        except KeyError:  # Trio dropped it already (a hook raised)
            pass
        self._waits.close()
