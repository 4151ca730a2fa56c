"""relay.media.reactor: one epoll set serving every media socket.

Timing is checked on trio's MockClock: handlers "take" time by jumping the clock, so the
coalescing rule (a pass starts at most every window; no sleep after a pass that took
longer) is observed exactly, without real time.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable, Iterator

import pytest
import trio
import trio.testing

from relay.media.reactor import Reactor

pytestmark = pytest.mark.skipif(not Reactor.available(), reason="epoll is Linux-only")


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made: list[tuple[socket.socket, socket.socket]] = []
    for _ in range(10):
        a, b = socket.socketpair()
        a.setblocking(False)
        made.append((a, b))
    yield made
    for a, b in made:
        a.close()
        b.close()


async def test_serves_each_readable_socket_once_per_message(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    reactor = Reactor()
    got: list[tuple[int, bytes]] = []

    def reader(i: int, sock: socket.socket) -> Callable[[], None]:
        def handler() -> None:
            got.append((i, sock.recv(100)))

        return handler

    for i, (a, _b) in enumerate(pairs):
        reactor.register(a, reader(i, a))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run)
            for i, (_a, b) in enumerate(pairs):
                b.send(b"m%d" % i)
            while len(got) < len(pairs):
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
    assert sorted(got) == [(i, b"m%d" % i) for i in range(len(pairs))]
    assert reactor.dispatched == len(pairs)
    assert reactor.handler_errors == 0


async def test_unregister_removes_only_its_own_registration(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    reactor = Reactor()
    a, _b = pairs[0]

    def mine() -> None: ...

    def other() -> None: ...

    reactor.register(a, mine)
    reactor.unregister(a, other)  # a stale owner of the same descriptor number: no effect
    assert len(reactor) == 1
    reactor.unregister(a, mine)
    assert len(reactor) == 0


async def test_replace_swaps_only_its_own_registration(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    """A call hands its Twilio socket to the pump's handler (relay.media.call): the next
    event goes to the new handler, and only the registration's owner may swap it."""
    reactor = Reactor()
    a, b = pairs[0]
    got: list[str] = []

    def layered() -> None:
        got.append("layered")
        a.recv(100)

    def pumped() -> None:
        got.append("pumped")
        a.recv(100)

    def stranger() -> None: ...

    reactor.register(a, layered)
    assert not reactor.replace(a, stranger, pumped)  # not the current handler: no change
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run)
            b.send(b"1")
            while len(got) < 1:
                await trio.sleep(0.001)
            assert reactor.replace(a, layered, pumped)
            b.send(b"2")
            while len(got) < 2:
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
    assert got == ["layered", "pumped"]
    reactor.unregister(a, layered)  # the old owner no longer holds it
    assert len(reactor) == 1
    reactor.unregister(a, pumped)
    assert len(reactor) == 0


async def test_a_failing_handler_drops_its_socket_only(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    reactor = Reactor()
    (bad, bad_peer), (good, good_peer) = pairs[0], pairs[1]
    served: list[bytes] = []

    def broken() -> None:
        raise RuntimeError("bug")

    reactor.register(bad, broken)
    reactor.register(good, lambda: served.append(good.recv(100)))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run)
            bad_peer.send(b"x")
            good_peer.send(b"y")
            while not served or not reactor.handler_errors:
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
    assert served == [b"y"]
    assert reactor.handler_errors == 1
    assert len(reactor) == 1  # the failing socket is no longer watched


def _pass_starts(
    pass_s: float, window_s: float, pairs: list[tuple[socket.socket, socket.socket]]
) -> list[float]:
    """Mock-clock start times of 40 passes over 10 always-readable sockets whose handlers
    together take ``pass_s``."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    starts: list[float] = []

    async def main() -> None:
        reactor = Reactor(kernel_timer=False)  # a kernel timer runs on real time
        for i, (a, b) in enumerate(pairs):
            b.send(b"stays unread: the socket stays readable")

            def handler(first: bool = i == 0) -> None:
                if first:
                    starts.append(trio.current_time())
                clock.jump(pass_s / len(pairs))

            reactor.register(a, handler)
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run, window_s)
            while len(starts) < 40:
                await trio.sleep(window_s / 4)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)
    return starts


@pytest.mark.parametrize(
    ("pass_s", "gap_s"),
    [
        (0.002, 0.005),  # a 2 ms pass: the loop sleeps out the rest of the 5 ms window
        (0.008, 0.008),  # an 8 ms pass: no sleep, readiness has piled up for a window already
    ],
)
def test_passes_start_at_most_one_window_apart(
    pairs: list[tuple[socket.socket, socket.socket]], pass_s: float, gap_s: float
) -> None:
    starts = _pass_starts(pass_s, 0.005, pairs)
    gaps = [b - a for a, b in itertools.pairwise(starts[20:])]
    assert all(gap == pytest.approx(gap_s, abs=1e-6) for gap in gaps)


def test_kernel_timer_paces_passes_by_its_ticks(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    """With the timerfd pass clock, sockets that stay readable are served once per tick,
    never in a busy loop: passes never outnumber the timer's expirations (plus the first
    pass, which arms it)."""
    seen: dict[str, int] = {}

    async def main() -> None:
        reactor = Reactor()
        for a, b in pairs:
            b.send(b"stays unread: the socket stays readable")
            reactor.register(a, lambda: None)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(reactor.run, 0.002)
                while reactor.wakeups < 50:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        seen["wakeups"] = reactor.wakeups
        seen["ticks"] = reactor.timer_ticks

    trio.run(main)
    assert seen["ticks"] >= seen["wakeups"] - 1 > 0


async def _serve_steady(
    reactor: Reactor, pairs: list[tuple[socket.socket, socket.socket]], rounds: int = 40
) -> bytes:
    """A steady stream over every pair (the reactor coalesces); every byte the handlers
    read once it has all arrived."""
    got: list[bytes] = []
    for a, _b in pairs:
        reactor.register(a, lambda a=a: got.append(a.recv(100)))  # type: ignore[misc]
    expected = rounds * len(pairs) * 3
    await _send_rounds(reactor, pairs, rounds, 0.001, lambda: sum(map(len, got)) >= expected)
    return b"".join(got)


async def _send_rounds(
    reactor: Reactor,
    pairs: list[tuple[socket.socket, socket.socket]],
    rounds: int,
    gap_s: float,
    done: Callable[[], bool] = lambda: True,
) -> None:
    """Run the reactor (2 ms clock) while a 3-byte message goes over every pair each
    ``gap_s``, until ``done()`` after the last round."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run, 0.002)
            for round_ in range(rounds):
                for _a, b in pairs:
                    b.send(b"r%02d" % round_)
                await trio.sleep(gap_s)
            while not done():
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()


async def test_kernel_timer_still_serves_every_message(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    assert (await _serve_steady(Reactor(), pairs, rounds=20)).count(b"r") == 20 * len(pairs)


async def test_ticks_are_served_from_trios_idle_point(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    reactor = Reactor()
    assert (await _serve_steady(reactor, pairs)).count(b"r") == 40 * len(pairs)
    assert reactor.idle_passes > 0  # the hook, not the task, served passes
    assert reactor.handler_errors == 0


async def test_idle_clock_off_waits_through_trio(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    reactor = Reactor(idle_clock=False)
    assert (await _serve_steady(reactor, pairs)).count(b"r") == 40 * len(pairs)
    assert reactor.idle_passes == 0


async def test_trio_keeps_running_while_the_idle_clock_serves(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    """Sockets that stay readable keep the clock on; meanwhile deadlines fire, a socket
    Trio itself waits on is served, and a worker thread's result comes back."""
    reactor = Reactor()
    for a, b in pairs:
        b.send(b"stays unread: the socket stays readable")
        reactor.register(a, lambda: None)
    x, y = trio.socket.socketpair()
    with x, y, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run, 0.002)
            while reactor.idle_passes < 20:
                await trio.sleep(0.001)  # deadlines: each sleep ends while the hook serves
            nursery.start_soon(y.send, b"ping")
            assert await x.recv(10) == b"ping"
            assert await trio.to_thread.run_sync(lambda: 42) == 42
            before = reactor.idle_passes
            while reactor.idle_passes < before + 20:
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()


async def test_handlers_run_in_the_reactor_tasks_context(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: set[str] = set()
    reactor = Reactor()
    for a, b in pairs:
        b.send(b"stays unread")
        reactor.register(a, lambda: seen.add(var.get()))

    async def run_reactor(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        var.set("reactor")
        await reactor.run(0.002, task_status=task_status)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_reactor)
            while reactor.idle_passes < 10:
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
    assert seen == {"reactor"}


async def test_a_failing_idle_clock_hands_ticks_back_to_the_task(
    pairs: list[tuple[socket.socket, socket.socket]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from relay.media import reactor as reactor_mod

    def broken(self: object) -> None:
        raise RuntimeError("bug in the hook")

    monkeypatch.setattr(reactor_mod._IdleClock, "_tick", broken)
    reactor = Reactor()
    assert (await _serve_steady(reactor, pairs)).count(b"r") == 40 * len(pairs)  # none lost
    assert reactor.idle_passes == 0
    assert any("pass clock failed" in r.getMessage() for r in caplog.records)


async def test_two_reactors_in_one_run_both_serve(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    """Two reactors in one Trio run (two relays in one process, as some tests start):
    one serves its ticks from the idle point, the other waits through Trio, and neither
    starves the other while the rest of the run is idle."""
    reactors = [Reactor(), Reactor()]
    for i, (a, b) in enumerate(pairs):
        b.send(b"stays unread: the socket stays readable")
        reactors[i % 2].register(a, lambda: None)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for reactor in reactors:
                await nursery.start(reactor.run, 0.002)
            await trio.sleep(0.1)
            before = [r.wakeups for r in reactors]
            await trio.sleep(0.5)  # nothing else runs: ~250 ticks each
            after = [r.wakeups for r in reactors]
            nursery.cancel_scope.cancel()
    assert all(b - a > 100 for a, b in zip(before, after, strict=True)), (before, after)
    assert sum(r.idle_passes > 0 for r in reactors) == 1


def test_an_empty_tick_lowers_the_rate_instead_of_stopping_the_clock() -> None:
    """Arrivals come in bursts, so a tick can find nothing while messages still come at
    thousands a second: that empty pass only lowers the smoothed rate, and the clock
    stops once a few empty ticks in a row bring it under two messages a window."""
    window = 0.0015
    verdicts: list[bool] = []

    async def main() -> None:
        reactor = Reactor(kernel_timer=False)
        core = reactor._core
        core.rate = 3000.0  # ~50 calls: 4.5 sockets a window
        core.last = trio.current_time()
        for _ in range(8):
            await trio.sleep(window)
            assert core.poll() == 0
            verdicts.append(core.serve(window))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert verdicts[:3] == [True, True, True]  # one, two, three gaps: still coalescing
    assert verdicts[3:] == [False] * 5  # a lasting quiet: the clock stops


async def test_the_clock_stops_soon_after_the_traffic(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    """Empty passes end within a few ticks of the last message: an idle relay does not
    keep ticking."""
    reactor = Reactor()
    for a, _b in pairs:
        reactor.register(a, lambda a=a: a.recv(100))  # type: ignore[misc]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run, 0.002)
            for round_ in range(40):
                for _a, b in pairs:
                    b.send(b"r%02d" % round_)
                await trio.sleep(0.001)
            assert reactor.idle_passes > 0  # the clock ran
            await trio.sleep(0.05)
            quiet = reactor.wakeups
            await trio.sleep(0.1)
            assert reactor.wakeups == quiet
            nursery.cancel_scope.cancel()


async def test_gaps_between_bursts_keep_the_clock_running(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    """Bursts every 5 ms with a 2 ms clock: one or two ticks between bursts find nothing,
    and the clock runs on through them (stopping and restarting it at every burst costs
    two task steps and two timer settings each time)."""
    reactor = Reactor()
    for a, _b in pairs:
        reactor.register(a, lambda a=a: a.recv(100))  # type: ignore[misc]
    bursts = 60
    await _send_rounds(reactor, pairs, bursts, 0.005)
    task_passes = reactor.wakeups - reactor.idle_passes
    assert task_passes < bursts // 4, (task_passes, reactor.wakeups)


async def test_the_reactors_clock_reads_trios_time() -> None:
    """Reactor.clock is trio.current_time, read in C once the reactor runs on Trio's
    system clock: the calls' handlers and Trio's deadlines see one time."""
    reactor = Reactor()
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run, 0.0015)
        for _ in range(3):
            before = trio.current_time()
            now = reactor.clock()
            after = trio.current_time()
            assert before <= now <= after
            await trio.sleep(0.001)
        nursery.cancel_scope.cancel()


def test_the_reactors_clock_follows_a_mock_clock() -> None:
    seen: list[tuple[float, float]] = []

    async def main() -> None:
        reactor = Reactor(kernel_timer=False)
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run, 0.0015)
            await trio.sleep(12.5)
            seen.append((reactor.clock(), trio.current_time()))
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert seen == [(seen[0][1], seen[0][1])] and seen[0][1] >= 12.5
