"""relay.agents.liveness: the watchdog of agent connections, on in-memory streams and a
virtual clock (MockClock autojump: timed logic without waiting, deterministic).

Every watchdog test runs twice (the ``checks`` fixture): with the watchdog sleeping to its
own deadlines (no reactor), and with its checks served by a media reactor's passes
(``relay.media.sweep``), here a task that passes every 1.5 ms like a loaded reactor."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import trio
import trio.testing

from relay.agents.liveness import (
    DEFAULT_DEAD_AFTER_S,
    DEFAULT_RECONNECT_TIMEOUT_S,
    LivenessOptions,
    conversation_context,
    is_recoverable,
    reconnect_options,
    run_connection,
    seeded_instructions,
    watch,
)
from relay.errors import AgentError, ConfigError, ConnectionClosed
from relay.media.sweep import BACKSTOP_S, Sweep
from relay.media.websocket import SendTimedOut, WebSocket


@pytest.fixture
def clock(autojump_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    return autojump_clock


PASS_PERIOD_S = 0.0015


@pytest.fixture(params=["sleeps", "passes"])
async def checks(request: pytest.FixtureRequest, nursery: trio.Nursery) -> Any:
    """None (the watchdog sleeps to its deadlines), or the Sweep a pass task serves."""
    if request.param == "sleeps":
        yield None
        return
    sweep = Sweep()
    assert sweep.install()

    async def passes() -> None:
        while True:
            await trio.sleep(PASS_PERIOD_S)
            sweep.run_due(trio.current_time())

    nursery.start_soon(passes)
    yield sweep
    sweep.uninstall()


def pair(*, lockstep: bool = False, send_timeout: float = 100.0) -> tuple[WebSocket, WebSocket]:
    """(relay side = client, peer side = server) over an in-memory stream pair."""
    a, b = trio.testing.lockstep_stream_pair() if lockstep else trio.testing.memory_stream_pair()
    relay = WebSocket(a, client_side=True, send_timeout=send_timeout)
    peer = WebSocket(b, client_side=False, send_timeout=send_timeout)
    return relay, peer


async def read_forever(ws: WebSocket, sink: list[Any] | None = None) -> None:
    """The engine's agent reader: consuming bytes is what stamps last_received."""
    try:
        while True:
            batch = await ws.receive()
            if sink is not None:
                sink += batch
    except ConnectionClosed:
        pass


async def serve_peer(
    peer: WebSocket, read_until: float = float("inf"), sink: list[Any] | None = None
) -> None:
    """A peer that reads (so it answers pings) and flushes what it owes, until read_until."""

    async def flush() -> None:
        try:
            await peer.run_flusher()
        except ConnectionClosed:
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flush)
        with trio.move_on_at(read_until):
            await read_forever(peer, sink)
        nursery.cancel_scope.cancel()


async def watched(
    relay: WebSocket, opts: LivenessOptions, **kw: Any
) -> tuple[BaseException, float]:
    """Run watch() + the relay's flusher and reader; returns (the error, virtual time)."""
    t0 = trio.current_time()
    result: list[tuple[BaseException, float]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_forever, relay)
        try:
            await run_connection(relay, opts, **kw)
        except (AgentError, ConnectionClosed) as exc:
            result.append((exc, trio.current_time() - t0))
        nursery.cancel_scope.cancel()
    assert result, "run_connection returned"
    return result[0]


# --- options ------------------------------------------------------------------------------
def test_options_defaults_and_from_config() -> None:
    """Defaults meet the 5 s budget: dead within 3 s, recovered within 2 s more."""
    opts = LivenessOptions()
    assert (opts.ping_interval_s, opts.dead_after_s, opts.idle_keepalive_s) == (1.0, 3.0, None)
    assert DEFAULT_DEAD_AFTER_S + DEFAULT_RECONNECT_TIMEOUT_S <= 5.0
    assert reconnect_options({}) == (False, DEFAULT_RECONNECT_TIMEOUT_S)
    assert reconnect_options({"reconnect": "yes", "reconnect_timeout_s": "4"}) == (True, 4.0)
    parsed = LivenessOptions.from_config({"ping_interval_s": "0.5", "dead_after_s": 3, "x": 1})
    assert (parsed.ping_interval_s, parsed.dead_after_s) == (0.5, 3.0)
    assert LivenessOptions.from_config({}) == LivenessOptions()
    assert parsed.with_keepalive(8.0).idle_keepalive_s == 8.0


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"ping_interval_s": 0}, "ping_interval_s"),
        ({"ping_interval_s": "soon"}, "ping_interval_s"),
        ({"dead_after_s": -1}, "dead_after_s"),
        ({"dead_after_s": float("inf")}, "dead_after_s"),
        ({"dead_after_s": [5]}, "dead_after_s"),
        # an idle, healthy peer would be declared dead between two pings
        ({"ping_interval_s": 3}, "dead_after_s"),
        ({"ping_interval_s": 2, "dead_after_s": 1.5}, "dead_after_s"),
    ],
)
def test_options_errors_name_the_key(options: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        LivenessOptions.from_config(options)
    assert f"agents.*.{key}" in str(info.value)


# --- the watchdog ------------------------------------------------------------------------------
async def test_healthy_idle_peer_stays_alive(
    clock: trio.testing.MockClock, checks: Sweep | None
) -> None:
    """Nobody speaks for a minute: pings and pongs alone keep the connection alive."""
    relay, peer = pair()
    with trio.move_on_after(60) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_peer, peer)
            nursery.start_soon(read_forever, relay)
            await run_connection(relay, LivenessOptions())
    assert scope.cancelled_caught
    assert relay.last_pong > 55  # pongs kept coming


async def test_healthy_peer_costs_one_wake_per_ping(
    clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each wake is a task step (a cancel scope, a deadline) of every call: a healthy
    connection wakes the watchdog once per ping interval, not twice (the ping's own due
    time once came out as the next wake)."""
    from relay.agents import liveness

    wakes: list[float] = []
    real_sleep_until = trio.sleep_until

    async def counting_sleep_until(deadline: float) -> None:
        wakes.append(deadline)
        await real_sleep_until(deadline)

    monkeypatch.setattr(liveness.trio, "sleep_until", counting_sleep_until)
    relay, peer = pair()
    with trio.move_on_after(10.5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_peer, peer)
            nursery.start_soon(read_forever, relay)
            await run_connection(relay, LivenessOptions(ping_interval_s=1.0))
    assert wakes == pytest.approx([float(t) for t in range(1, 12)], abs=0.01)


class StepCounter(trio.abc.Instrument):
    """Task steps of one task (a wake of the watchdog is a step of its task)."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


async def test_passes_serve_the_checks_while_the_task_stays_parked(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """With a reactor's sweep, each check (and its ping) runs inline in a pass: the
    watching task does not wake once in ten seconds of a healthy connection."""
    sweep = Sweep()
    assert sweep.install()
    try:

        async def passes() -> None:
            while True:
                await trio.sleep(PASS_PERIOD_S)
                sweep.run_due(trio.current_time())

        nursery.start_soon(passes)
        relay, peer = pair()
        nursery.start_soon(serve_peer, peer)
        nursery.start_soon(read_forever, relay)
        counter = StepCounter(trio.lowlevel.current_task())
        with trio.move_on_after(10.5):
            await trio.sleep(0)  # past the first check's own step
            trio.lowlevel.add_instrument(counter)
            try:
                await run_connection(relay, LivenessOptions(ping_interval_s=1.0))
            finally:
                trio.lowlevel.remove_instrument(counter)
        # one step into the nursery (the flusher starts), one for the final cancellation;
        # sleeping to its own deadlines it wakes once per ping (test above)
        assert counter.steps <= 2
        assert sweep.served == pytest.approx(10, abs=1)
        assert relay.last_pong > 9.9  # every ping went out and was answered
        assert len(sweep) <= 2  # no pile of stale entries
    finally:
        sweep.uninstall()


async def test_without_passes_the_backstop_checks(clock: trio.testing.MockClock) -> None:
    """A sweep that no pass serves (no media flowing): the watchdog checks itself,
    BACKSTOP_S after each due time; a silent peer is still found dead."""
    sweep = Sweep()
    assert sweep.install()
    try:
        relay, peer = pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_peer, peer, trio.current_time() + 2.5)
            exc, elapsed = await watched(relay, LivenessOptions())
            nursery.cancel_scope.cancel()
        assert isinstance(exc, AgentError) and "nothing received" in str(exc)
        # pings at 1 + d, 2 + 2d (each due time served d late); the last pong, for the
        # ping at 2 + 2d, came at once: dead dead_after_s later, plus d
        assert elapsed == pytest.approx(5.0 + 3 * BACKSTOP_S, abs=0.005)
        assert sweep.served == 0
    finally:
        sweep.uninstall()


async def test_silent_peer_is_dead_within_dead_after(
    clock: trio.testing.MockClock, checks: Sweep | None
) -> None:
    """The peer vanishes (no FIN, nothing more sent or read): noticed dead_after_s after
    the last thing it sent, not a ping interval later."""
    relay, peer = pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_peer, peer, trio.current_time() + 2.5)  # answers, then gone
        exc, elapsed = await watched(relay, LivenessOptions())
        nursery.cancel_scope.cancel()
    assert isinstance(exc, AgentError) and exc.kind == "agent_disconnected"
    assert "nothing received" in str(exc)
    # the last pong came for the ping at 2 s: dead exactly 3 s later
    assert relay.last_pong == pytest.approx(2.0, abs=0.01)
    assert elapsed == pytest.approx(5.0, abs=0.01)


async def test_peer_that_sends_but_stopped_reading(
    clock: trio.testing.MockClock, checks: Sweep | None
) -> None:
    """The peer keeps talking (audio) but no longer reads: its pongs stop although data
    still arrives; noticed dead_after_s after the last ping it read (not a ping interval
    later, so a stalled peer is noticed as fast as a silent one)."""
    relay, peer = pair()

    async def talk() -> None:
        while True:
            await peer.send_text("audio")
            await trio.sleep(0.2)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_peer, peer, trio.current_time() + 4.5)  # reads until 4.5 s
        nursery.start_soon(talk)
        exc, elapsed = await watched(relay, LivenessOptions(dead_after_s=3.0))
        nursery.cancel_scope.cancel()
    assert isinstance(exc, AgentError) and exc.kind == "agent_disconnected"
    assert "ping unanswered" in str(exc)
    assert elapsed == pytest.approx(4.0 + 3.0, abs=0.01)  # the last ping it read: at 4 s


async def test_peer_without_pong_support_is_judged_by_data(
    clock: trio.testing.MockClock,
    checks: Sweep | None,
) -> None:
    """A peer that never answered a ping (no pong support) but keeps sending is alive."""
    relay, peer = pair()

    async def talk() -> None:
        while True:
            await peer.send_text("audio")
            await trio.sleep(1.0)

    with trio.move_on_after(30) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(talk)  # never reads: never pongs
            nursery.start_soon(read_forever, relay)
            await run_connection(relay, LivenessOptions())
    assert scope.cancelled_caught


async def test_send_backlog_that_never_drains(
    clock: trio.testing.MockClock, checks: Sweep | None
) -> None:
    """Our writes wait because the peer stopped reading (TCP window shut), although it
    still sends: dead once the backlog is dead_after_s old."""
    relay, peer = pair(lockstep=True)  # send_all blocks until the peer reads

    async def talk() -> None:
        while True:
            await peer.send_text("still here")
            await trio.sleep(0.5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(talk)

        async def write_later() -> None:
            await trio.sleep(1.0)
            relay.send_text_nowait("caller audio")  # nobody will take it

        nursery.start_soon(write_later)
        exc, elapsed = await watched(relay, LivenessOptions())
        nursery.cancel_scope.cancel()
    assert isinstance(exc, AgentError) and "not taken" in str(exc)
    assert elapsed == pytest.approx(1.0 + 3.0, abs=0.01)  # the first ping waits from 1 s


async def test_idle_keepalive(clock: trio.testing.MockClock, checks: Sweep | None) -> None:
    """on_idle runs after idle_keepalive_s without sending, and not while audio flows."""
    relay, peer = pair()
    got: list[Any] = []
    calls: list[float] = []

    def keepalive() -> None:
        calls.append(trio.current_time())
        relay.send_text_nowait('{"type":"KeepAlive"}')

    async def audio_until(t: float) -> None:
        while trio.current_time() < t:
            relay.send_bytes_nowait(b"\xff" * 160)
            await trio.sleep(0.02)

    opts = LivenessOptions(idle_keepalive_s=8.0)
    with trio.move_on_after(40):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_peer, peer, float("inf"), got)
            nursery.start_soon(read_forever, relay)
            nursery.start_soon(audio_until, 10.0)
            await run_connection(relay, opts, on_idle=keepalive)
    assert calls, "no keepalive while idle"
    assert got.count('{"type":"KeepAlive"}') == len(calls)
    assert all(t > 10.0 + 7.9 for t in calls)  # none while audio flowed
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert all(7.9 <= g <= 8.1 for g in gaps)
    assert 10.0 + 8.0 <= calls[0] <= 10.0 + 8.0 + 2.1  # within one ping interval of due


async def test_closed_socket_raises_its_close(
    clock: trio.testing.MockClock, checks: Sweep | None
) -> None:
    relay, peer = pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_peer, peer)

        async def close_soon() -> None:
            await trio.sleep(1.5)  # between two pings (a ping racing the close fails to send)
            await peer.aclose(1001, "going away")

        nursery.start_soon(close_soon)
        exc, _ = await watched(relay, LivenessOptions())
        nursery.cancel_scope.cancel()
    assert isinstance(exc, ConnectionClosed) and exc.code == 1001


async def test_watch_alone_never_returns(
    clock: trio.testing.MockClock, checks: Sweep | None
) -> None:
    relay, _peer = pair()
    with pytest.raises(AgentError):
        await watch(relay, LivenessOptions(ping_interval_s=1.0, dead_after_s=2.5))
    assert trio.current_time() == pytest.approx(2.5, abs=0.01)


async def test_run_connection_raises_the_flusher_error_unwrapped(
    clock: trio.testing.MockClock,
    checks: Sweep | None,
) -> None:
    relay, _peer = pair(lockstep=True, send_timeout=0.5)
    relay.send_text_nowait("nobody reads this")
    with pytest.raises(SendTimedOut):
        await run_connection(relay, LivenessOptions())


def test_is_recoverable() -> None:
    assert is_recoverable(AgentError("dead", kind="agent_disconnected"))
    assert not is_recoverable(AgentError("bad key", kind="agent_connect"))
    assert is_recoverable(SendTimedOut(1006, "stuck"))
    assert is_recoverable(ConnectionClosed(1006, "tcp drop"))
    assert is_recoverable(ConnectionClosed(1011, "server error"))
    assert not is_recoverable(ConnectionClosed(1000, "bye"))
    assert not is_recoverable(ConnectionClosed(4001, "unauthorized"))


def test_conversation_context() -> None:
    history = [("caller", "Hi, I need a taxi."), ("agent", "Where to?"), ("caller", "  ")]
    text = conversation_context(history)
    assert text.endswith("Caller: Hi, I need a taxi.\nAgent: Where to?")
    assert "Do not greet" in text
    assert conversation_context([]) == ""
    assert seeded_instructions("Be brief.", []) == "Be brief."
    seeded = seeded_instructions("Be brief.", history)
    assert seeded.startswith("Be brief.\n\n") and "Agent: Where to?" in seeded
    long = [("caller", f"turn {i} " + "x" * 100) for i in range(200)]
    clipped = conversation_context(long, max_chars=1000)
    assert "turn 199" in clipped and "turn 0 " not in clipped and len(clipped) < 1400
