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
from collections.abc import Callable

import trio

from .passtimer import PassTimer

log = logging.getLogger("relay.media.reactor")

Handler = Callable[[], None]

_EVENTS = getattr(select, "EPOLLIN", 1) | getattr(select, "EPOLLRDHUP", 0x2000)

#: below this, a timer costs more than the wait it would buy (a Trio sleep costs ~100 µs
#: of CPU on this machine kind, most of it the kernel's timer and wake-up)
_MIN_SLEEP_S = 0.0001


class Reactor:
    def __init__(self, *, kernel_timer: bool = True) -> None:
        """``kernel_timer``: pace coalesced passes with a ``timerfd`` (``passtimer``) where
        the platform has one; ``False`` sleeps with Trio (what a mock clock can drive)."""
        self._epoll = select.epoll()
        self._kernel_timer = kernel_timer
        self._handlers: dict[int, Handler] = {}
        self.wakeups = 0
        self.dispatched = 0
        self.handler_errors = 0
        self.timer_ticks = 0

    @staticmethod
    def available() -> bool:
        return hasattr(select, "epoll")

    def register(self, sock: socket.socket, handler: Handler) -> None:
        fd = sock.fileno()
        self._epoll.register(fd, _EVENTS)
        self._handlers[fd] = handler

    def unregister(self, sock: socket.socket, handler: Handler) -> None:
        fd = sock.fileno()
        # Only our own registration: never someone else's that reuses the number.
        if fd < 0 or self._handlers.get(fd) is not handler:
            return
        del self._handlers[fd]
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass

    def __len__(self) -> int:
        return len(self._handlers)

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
        timer = PassTimer.create() if self._kernel_timer and coalesce_s > 0 else None
        task_status.started()
        rate = 0.0  # messages per second, smoothed
        last = trio.current_time()
        try:
            while True:
                ready = epoll.poll(0)
                if not ready:
                    if timer is not None:
                        timer.disarm()  # idle: the next message is served when it comes
                    await trio.lowlevel.wait_readable(epfd)
                    continue
                self.wakeups += 1
                started = trio.current_time()
                self._dispatch(ready)
                now = trio.current_time()
                elapsed = max(now - last, 1e-4)
                last = now
                rate += 0.2 * (len(ready) / elapsed - rate)
                if coalesce_s > 0 and rate * coalesce_s >= 2.0:
                    # Passes start at most every coalesce_s: a pass that took longer
                    # than that has let readiness pile up already, and sleeping the
                    # whole window after it only adds dead time to every message's wait
                    # (at 400 calls a pass served ~136 sockets every 5.5 ms that way).
                    if timer is not None:
                        # Periodic: the next pass starts on the next tick, at once (after
                        # a checkpoint) if this pass overran it.
                        timer.arm(coalesce_s)
                        await timer.wait()
                        self.timer_ticks = timer.ticks
                        continue
                    rest = coalesce_s - (now - started)
                    if rest > _MIN_SLEEP_S:
                        await trio.sleep(rest)
                    else:
                        await trio.lowlevel.checkpoint()  # let the other tasks run
                else:
                    if timer is not None:
                        timer.disarm()
                    await trio.lowlevel.wait_readable(epfd)
        finally:
            if timer is not None:
                timer.close()
            epoll.close()

    def _dispatch(self, ready: list[tuple[int, int]]) -> None:
        handlers = self._handlers
        for fd, _events in ready:
            handler = handlers.get(fd)
            if handler is None:
                continue
            self.dispatched += 1
            try:
                handler()
            except Exception:
                # A bug, not peer input (handlers turn that into call events). Drop the
                # socket so a still-readable fd cannot spin the loop.
                self.handler_errors += 1
                log.exception("media handler for fd %d failed; socket dropped", fd)
                handlers.pop(fd, None)
                try:
                    self._epoll.unregister(fd)
                except (OSError, ValueError):
                    pass
