"""relay.media.runloop: the reactor's read-only view of Trio's run loop. It must work with
the Trio this project installs (else the pass clock silently costs twice the CPU), and
refuse a loop it cannot serve from (a mock clock)."""

from __future__ import annotations

import os
import select
import socket

import pytest
import trio
import trio.testing

from relay.media.runloop import TrioLoop

pytestmark = pytest.mark.skipif(not hasattr(select, "epoll"), reason="epoll is Linux-only")


async def test_probes_the_installed_trio() -> None:
    loop = TrioLoop.current()
    assert loop is not None, "Trio's run loop internals moved: update relay/media/runloop.py"
    os.fstat(loop.epoll_fd)  # a live descriptor
    assert len(loop.idle_waiters) == 0


async def test_run_queue_shows_a_runnable_task() -> None:
    loop = TrioLoop.current()
    assert loop is not None
    event = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(event.wait)
        await trio.testing.wait_all_tasks_blocked()
        assert len(loop.runq) == 0
        event.set()  # the waiter is runnable now, and we have not yielded yet
        assert len(loop.runq) == 1


async def test_epoll_fd_turns_readable_when_trio_has_io_ready() -> None:
    loop = TrioLoop.current()
    assert loop is not None
    probe = select.epoll()
    probe.register(loop.epoll_fd, select.EPOLLIN)
    a, b = socket.socketpair()
    with a, b:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.lowlevel.wait_readable, a)
            await trio.testing.wait_all_tasks_blocked()
            assert probe.poll(0) == []
            b.send(b"x")  # no checkpoint: Trio has not looked yet
            assert probe.poll(0) != []  # a socket Trio waits on is ready
    probe.close()


async def test_force_wakeup_ends_trios_next_wait() -> None:
    loop = TrioLoop.current()
    assert loop is not None
    probe = select.epoll()
    probe.register(loop.epoll_fd, select.EPOLLIN)
    loop.force_wakeup()
    assert probe.poll(0) != []
    probe.close()
    await trio.lowlevel.checkpoint()


def test_a_mock_clock_is_not_served() -> None:
    async def main() -> TrioLoop | None:
        return TrioLoop.current()

    assert trio.run(main, clock=trio.testing.MockClock()) is None


def test_outside_a_run_there_is_no_loop() -> None:
    assert TrioLoop.current() is None
