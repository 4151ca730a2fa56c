"""relay.media.sweep: one-shot timers served at the end of the reactor's passes."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import pytest
import trio

from relay.media.reactor import Reactor
from relay.media.sweep import Sweep


def test_runs_due_timers_in_time_order_with_the_pass_time() -> None:
    sweep = Sweep()
    got: list[tuple[str, float]] = []

    def record(name: str) -> Callable[[float], None]:
        return lambda now: got.append((name, now))

    for name, when in (("c", 3.0), ("a", 1.0), ("b", 2.0), ("late", 9.0)):
        sweep.timer(record(name)).set(when)
    sweep.run_due(0.5)
    assert got == []
    sweep.run_due(3.2)
    assert got == [("a", 3.2), ("b", 3.2), ("c", 3.2)]
    assert sweep.served == 3
    assert sweep.next_due() == 9.0


def test_a_timer_runs_once_per_setting() -> None:
    sweep = Sweep()
    runs: list[float] = []
    timer = sweep.timer(runs.append)
    timer.set(1.0)
    sweep.run_due(1.0)
    sweep.run_due(2.0)
    assert runs == [1.0]
    assert timer.due is None


def test_rearming_replaces_the_earlier_setting() -> None:
    sweep = Sweep()
    runs: list[float] = []
    timer = sweep.timer(runs.append)
    timer.set(1.0)
    timer.set(5.0)  # later: the entry at 1.0 is stale
    sweep.run_due(2.0)
    assert runs == []
    timer.set(1.5)  # earlier again
    sweep.run_due(2.0)
    assert runs == [2.0]
    sweep.run_due(6.0)
    assert runs == [2.0]  # the entry at 5.0 was replaced too
    assert len(sweep) == 0  # stale entries are dropped as they come up


def test_cancel() -> None:
    sweep = Sweep()
    runs: list[float] = []
    timer = sweep.timer(runs.append)
    timer.set(1.0)
    timer.cancel()
    sweep.run_due(2.0)
    assert runs == [] and sweep.served == 0


def test_a_callback_may_rearm_its_timer_without_looping() -> None:
    """A periodic check re-arms from its callback; a due time not after the pass's own
    time waits for the next pass instead of spinning this one."""
    sweep = Sweep()
    runs: list[float] = []

    def again(now: float) -> None:
        runs.append(now)
        timer.set(now + 1.0)

    timer = sweep.timer(again)
    timer.set(0.0)
    sweep.run_due(0.0)
    sweep.run_due(0.5)
    sweep.run_due(1.0)
    assert runs == [0.0, 1.0]

    def now_again(now: float) -> None:
        runs.append(now)
        spin.set(now)  # due at once: the next pass runs it

    other = Sweep()
    spin = other.timer(now_again)
    spin.set(3.0)
    other.run_due(3.0)
    assert runs.count(3.0) == 1
    other.run_due(3.0)
    assert runs.count(3.0) == 2


def test_a_failing_callback_is_logged_counted_and_alone(caplog: pytest.LogCaptureFixture) -> None:
    sweep = Sweep()
    runs: list[str] = []

    def boom(now: float) -> None:
        raise RuntimeError("bug")

    sweep.timer(boom).set(1.0)
    sweep.timer(lambda now: runs.append("ok")).set(1.0)
    with caplog.at_level(logging.ERROR, logger="relay.media.sweep"):
        sweep.run_due(1.0)
    assert runs == ["ok"]
    assert sweep.errors == 1 and sweep.served == 2
    assert len([r for r in caplog.records if "sweep timer callback failed" in r.message]) == 1


def test_current_is_per_run() -> None:
    assert Sweep.current() is None  # outside a Trio run

    async def main() -> None:
        assert Sweep.current() is None
        first, second = Sweep(), Sweep()
        assert first.install()
        assert not second.install()  # one per run: the first reactor's
        assert Sweep.current() is first
        second.uninstall()  # not installed: no effect
        assert Sweep.current() is first
        first.uninstall()
        assert Sweep.current() is None

    trio.run(main)


@pytest.mark.skipif(not Reactor.available(), reason="epoll is Linux-only")
async def test_the_reactors_passes_serve_its_sweep() -> None:
    """A running reactor installs its sweep and serves the due timers at the end of a
    pass, after the handlers; once it stops, the run has no sweep."""
    reactor = Reactor()
    a, b = socket.socketpair()
    a.setblocking(False)
    order: list[str] = []
    reactor.register(a, lambda: order.append(f"read {a.recv(10)!r}"))
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(reactor.run)
                assert Sweep.current() is reactor.sweep
                reactor.sweep.timer(lambda now: order.append("timer")).set(trio.current_time())
                b.send(b"m")
                while len(order) < 2:
                    await trio.sleep(0.001)
                nursery.cancel_scope.cancel()
        assert order == ["read b'm'", "timer"]
        assert Sweep.current() is None
    finally:
        reactor.unregister(a, reactor._core.handler(a.fileno()))
        a.close()
        b.close()
