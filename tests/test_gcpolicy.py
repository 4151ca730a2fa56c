"""relay/gcpolicy.py: the sweeper's clock, and the reference cycles relay no longer makes.

The cycle tests run with the cyclic collector off: an object that is still alive after its
last reference went away is held by a cycle, which in ``relay serve`` would wait for a rare
full collection (the memory growth a soak found)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio
import trio.testing

from relay.agents.assemblyai_protocol import AssemblyAIOptions, AssemblyAIProtocol
from relay.agents.deepgram_protocol import DeepgramOptions, DeepgramProtocol
from relay.agents.elevenlabs_protocol import ElevenLabsOptions, ElevenLabsProtocol
from relay.agents.gemini_protocol import GeminiOptions, GeminiProtocol
from relay.agents.openai_protocol import OpenAIOptions, OpenAIRealtimeProtocol
from relay.errors import ConnectionClosed
from relay.gcpolicy import GcSweeper
from relay.media.websocket import WebSocket
from relay.metrics import Metrics


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.set_threshold(*threshold)


def freed_by_refcount(make: Callable[[], Any]) -> bool:
    obj = make()
    ref = weakref.ref(obj)
    del obj
    return ref() is None


PROTOCOLS: dict[str, Callable[[], Any]] = {
    "openai": lambda: OpenAIRealtimeProtocol(OpenAIOptions(api_key="sk-test-0123456789abcd")),
    "assemblyai": lambda: AssemblyAIProtocol(AssemblyAIOptions(api_key="aai-test-key")),
    "deepgram": lambda: DeepgramProtocol(DeepgramOptions(api_key="dg-test-key")),
    "elevenlabs": lambda: ElevenLabsProtocol(
        ElevenLabsOptions(agent_id="agent_unit", api_key="xi-test-key")
    ),
    "gemini": lambda: GeminiProtocol(GeminiOptions(api_key="AIza-unit-test-key")),
}


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_protocol_cores_are_freed_by_reference_counting(name: str, no_cyclic_gc: None) -> None:
    assert freed_by_refcount(PROTOCOLS[name])


async def test_a_closed_websocket_raising_is_freed_by_reference_counting(
    no_cyclic_gc: None,
) -> None:
    """Raising the kept close reason would tie it, its traceback's frames and the socket
    into a cycle; the socket raises a fresh copy instead."""

    def make() -> WebSocket:
        a, _ = trio.testing.memory_stream_pair()
        ws = WebSocket(a, client_side=False, send_timeout=1)
        ws.closed = ConnectionClosed(1006, "gone")
        for _ in range(2):
            with pytest.raises(ConnectionClosed) as info:
                ws.write_nowait(b"x")
            assert info.value is not ws.closed
            assert (info.value.code, info.value.reason) == (1006, "gone")
            del info
        return ws

    assert freed_by_refcount(make)


def test_copy_keeps_the_subclass_code_and_reason() -> None:
    from relay.media.websocket import SendTimedOut

    exc = SendTimedOut(1006, "peer not reading")
    copy = exc.copy()
    assert type(copy) is SendTimedOut and (copy.code, copy.reason) == (1006, "peer not reading")


async def test_sweeper_collects_young_on_its_clock_and_full_rarely(autojump_clock: Any) -> None:
    threshold = gc.get_threshold()
    sweeper = GcSweeper(young_s=1.0, full_s=10.0)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sweeper.run)
            # the sweeper owns full collections: CPython's automatic one is pushed away
            assert gc.get_threshold()[2] == 1_000_000
            await trio.sleep(25.5)
            nursery.cancel_scope.cancel()
    finally:
        gc.set_threshold(*threshold)
    # full at 10 and 20 s; young every second except where a full one ran
    assert sweeper.sweeps[2] == 2
    assert sweeper.sweeps[1] == 23
    assert sweeper.pauses[1].count == 23 and sweeper.pauses[2].count == 2


async def test_sweeper_frees_cycles_and_reports_them() -> None:
    threshold = gc.get_threshold()
    gc.disable()
    try:
        sweeper = GcSweeper(young_s=1.0, full_s=0)

        class Node:
            pass

        for _ in range(100):
            a, b = Node(), Node()
            a.other, b.other = b, a  # type: ignore[attr-defined]
        del a, b
        assert sweeper.sweep(1) >= 200
        sweeper.sweep(2)  # whatever older garbage the test process has
    finally:
        gc.enable()
        gc.set_threshold(*threshold)
    metrics = Metrics()
    metrics.sections.append(sweeper.render)
    text = metrics.render()
    assert 'relay_gc_sweeps_total{generation="1"} 1' in text
    assert 'relay_gc_sweeps_total{generation="2"} 1' in text
    collected = next(
        line
        for line in text.splitlines()
        if line.startswith('relay_gc_collected_total{generation="1"}')
    )
    assert int(collected.split()[-1]) >= 200
    assert 'relay_gc_pause_seconds_count{generation="2"} 1' in text


async def test_sweeper_off_leaves_the_thresholds_alone() -> None:
    threshold = gc.get_threshold()
    sweeper = GcSweeper(young_s=0, full_s=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(sweeper.run)
    assert gc.get_threshold() == threshold
    assert sweeper.sweeps == {1: 0, 2: 0}
