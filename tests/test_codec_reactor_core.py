"""ReactorCore and timer_expirations: the media reactor's pass and its clock's read.

The compiled relay.media._codec versions must do what their references in
relay.media.codec_ref do, on a real epoll set and real sockets: call the handler of every
ready descriptor in the order polled (looked up at its turn), count, drop a handler that
raises and report it while the exception is current, run the sweep's due timers with the
pass's time, and smooth the arrival rate that decides whether passes coalesce.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

from relay.media import _codec, codec_ref
from relay.media.passtimer import PassTimer

IMPLS = [pytest.param(_codec, id="compiled"), pytest.param(codec_ref, id="ref")]


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Rig:
    """A ReactorCore over an epoll set of socket pairs, with a settable clock, a heap of
    sweep entries and a record of everything it called."""

    def __init__(self, impl: ModuleType, pairs: int = 3) -> None:
        self.epoll = select.epoll()
        self.clock = Clock()
        self.heap: list[tuple[float, int, object]] = []
        self.log: list[Any] = []
        self.pairs = [socket.socketpair() for _ in range(pairs)]
        self.core = impl.ReactorCore(
            self.epoll, self.clock, self._on_error, self.heap, self._run_due
        )

    def _on_error(self, fd: int) -> None:
        self.log.append(("error", fd, repr(sys.exc_info()[1])))

    def _run_due(self, now: float) -> None:
        self.log.append(("due", now))
        self.heap.clear()

    def register(self, i: int, handler: Callable[[], object]) -> int:
        fd = self.pairs[i][0].fileno()
        self.epoll.register(fd, select.EPOLLIN)
        self.core.set_handler(fd, handler)
        return fd

    def reader(self, i: int) -> Callable[[], None]:
        sock = self.pairs[i][0]

        def read() -> None:
            self.log.append(("read", i, sock.recv(100)))

        return read

    def poke(self, i: int, data: bytes = b"x") -> None:
        self.pairs[i][1].send(data)

    def close(self) -> None:
        for a, b in self.pairs:
            a.close()
            b.close()
        self.epoll.close()


@pytest.fixture(params=IMPLS)
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    r = Rig(request.param)
    yield r
    r.close()


def test_every_ready_handler_runs_once_a_pass(rig: Rig) -> None:
    for i in range(3):
        rig.register(i, rig.reader(i))
    assert len(rig.core) == 3
    rig.poke(0, b"a")
    rig.poke(2, b"c")
    assert rig.core.poll() == 2
    rig.core.serve(0.0015)
    assert sorted(rig.log) == [("read", 0, b"a"), ("read", 2, b"c")]
    assert (rig.core.wakeups, rig.core.dispatched, rig.core.handler_errors) == (1, 2, 0)
    assert rig.core.poll() == 0  # all read


def test_a_handler_dropped_by_an_earlier_one_is_skipped(rig: Rig) -> None:
    fds: list[int] = []

    def first() -> None:
        rig.pairs[0][0].recv(100)
        rig.pairs[1][0].recv(100)
        rig.log.append("first")
        for fd in fds:
            if rig.core.handler(fd) is not None and fd != fds[0]:
                rig.core.drop(fd)  # the other call ended meanwhile

    def second() -> None:
        rig.log.append("second")

    fds.append(rig.register(0, first))
    fds.append(rig.register(1, second))
    rig.poke(0)
    rig.poke(1)
    assert rig.core.poll() == 2
    rig.core.serve(0.0)
    # epoll reports in its own order: either the first dropped the second first, or the
    # second ran before the first; never the second after its drop
    assert rig.log in (["first"], ["second", "first"])
    assert len(rig.core) == 1


def test_a_failing_handler_is_dropped_and_reported_while_its_exception_is_current(
    rig: Rig,
) -> None:
    def boom() -> None:
        raise RuntimeError("bug")

    fd = rig.register(0, boom)
    rig.register(1, rig.reader(1))
    rig.poke(0)
    rig.poke(1)
    rig.core.poll()
    rig.core.serve(0.0)
    assert ("error", fd, "RuntimeError('bug')") in rig.log
    assert ("read", 1, b"x") in rig.log  # the other socket was still served
    assert rig.core.handler(fd) is None and len(rig.core) == 1
    assert rig.core.handler_errors == 1 and rig.core.dispatched == 2


def test_handlers_are_set_replaced_and_dropped_per_descriptor(rig: Rig) -> None:
    a, b = rig.reader(0), rig.reader(1)
    fd = rig.register(0, a)
    assert rig.core.handler(fd) is a
    rig.core.set_handler(fd, b)  # replaced: still one
    assert rig.core.handler(fd) is b and len(rig.core) == 1
    rig.core.drop(fd)
    rig.core.drop(fd)  # twice: nothing
    assert rig.core.handler(fd) is None and len(rig.core) == 0
    assert rig.core.handler(10_000) is None and rig.core.handler(-1) is None
    with pytest.raises(ValueError):
        rig.core.set_handler(-1, a)
    with pytest.raises(TypeError):
        rig.core.set_handler(fd, None)


def test_due_sweep_timers_run_with_the_pass_time(rig: Rig) -> None:
    rig.heap.append((100.5, 0, object()))
    rig.clock.now = 100.4
    rig.core.serve(0.0)
    assert rig.log == []  # not due yet
    rig.clock.now = 100.5
    rig.core.serve(0.0)
    assert rig.log == [("due", 100.5)]


@pytest.mark.parametrize("impl", IMPLS)
def test_the_rate_decides_whether_passes_coalesce(impl: ModuleType) -> None:
    """Smoothed arrivals per second: two or more a window keep the clock running, and a
    run of empty passes stops it; the same numbers from both implementations."""
    rig = Rig(impl, pairs=4)
    try:
        for i in range(4):
            rig.register(i, rig.reader(i))
        verdicts, rates = [], []
        rig.core.last = rig.clock.now
        for step in range(12):
            rig.clock.now += 0.0015
            if step < 6:
                for i in range(4):
                    rig.poke(i)
            rig.core.poll()
            verdicts.append(rig.core.serve(0.0015))
            rates.append(rig.core.rate)
        assert rig.core.serve(0.0) is False  # coalescing off: never
    finally:
        rig.close()
    expected, rate = [], 0.0
    for step in range(12):
        rate += 0.2 * ((4 if step < 6 else 0) / 0.0015 - rate)
        expected.append(rate)
    assert rates == pytest.approx(expected, rel=1e-9)
    assert verdicts == [r * 0.0015 >= 2.0 for r in expected]
    assert verdicts[:3] == [False] * 3 and verdicts[3:6] == [True] * 3  # ramps up
    assert verdicts[-1] is False  # a run of empty passes stops the clock


@pytest.mark.parametrize("impl", IMPLS)
def test_the_clock_offset_reads_trios_system_time(impl: ModuleType) -> None:
    rig = Rig(impl)
    try:
        rig.core.use_clock_offset(12_345.0)
        before = 12_345.0 + time.perf_counter()
        rig.core.serve(0.0)
        after = 12_345.0 + time.perf_counter()
    finally:
        rig.close()
    assert before <= rig.core.last <= after


@pytest.mark.parametrize("impl", IMPLS)
def test_poll_takes_every_ready_descriptor_past_the_first_buffer(impl: ModuleType) -> None:
    """More ready sockets than the initial event buffer holds: one poll takes them all."""
    rig = Rig(impl, pairs=100)
    try:
        for i in range(100):
            rig.register(i, rig.reader(i))
            rig.poke(i)
        assert rig.core.poll() == 100
        rig.core.serve(0.0)
        assert rig.core.dispatched == 100
    finally:
        rig.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_timer_expirations_counts_ticks_and_never_waits(impl: ModuleType) -> None:
    timer = PassTimer.create()
    assert timer is not None
    try:
        assert impl.timer_expirations(timer.fileno()) == 0  # disarmed: nothing, at once
        timer.arm(0.001)
        time.sleep(0.0055)
        n = impl.timer_expirations(timer.fileno())
        assert n >= 5  # at least 5.5 ms passed: five ticks at least, none lost
        assert impl.timer_expirations(timer.fileno()) == 0  # read: reset
    finally:
        timer.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_timer_expirations_of_a_closed_descriptor_raise(impl: ModuleType) -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError):
        impl.timer_expirations(r)
