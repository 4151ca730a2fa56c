"""Helpers of the adapters' tests. :func:`running` drives an agent adapter the way the call
engine does: its :meth:`~relay.agents.base.Agent.run` task and a reader of
:meth:`receive` in the background, events collected. :func:`keep_talking` is the caller's
line in the end-to-end tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import trio

from relay.agents.base import Agent, AgentAudio, AgentEvent
from relay.errors import AgentError, ConnectionClosed

__all__ = ["Collector", "has", "keep_talking", "random_ulaw", "running"]


def random_ulaw(ms: int, seed: int) -> bytes:
    """``ms`` of random μ-law 8 kHz (byte-identical passthrough is easy to check)."""
    return np.random.default_rng(seed).integers(0, 256, 8 * ms, dtype=np.uint8).tobytes()


async def keep_talking(fake: Any, ms: int = 20_000) -> None:
    """The caller's line streams audio in real time until the call ends (Twilio does)."""
    try:
        await fake.send_media(random_ulaw(ms, seed=99), realtime=True)
    except ConnectionClosed:
        pass


class Collector:
    """Runs the agent's background task and a reader, like the engine does."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.events: list[AgentEvent] = []
        self.error: BaseException | None = None
        self.run_error: BaseException | None = None
        self._changed = trio.Event()

    async def read(self) -> None:
        try:
            while True:
                self.events += await self.agent.receive()
                self._changed.set()
                self._changed = trio.Event()
        except (ConnectionClosed, AgentError) as exc:
            self.error = exc
            self._changed.set()

    async def run(self) -> None:
        try:
            await self.agent.run()
        except (ConnectionClosed, AgentError) as exc:
            self.run_error = exc
            self._changed.set()

    async def wait_for(
        self, predicate: Callable[[list[AgentEvent]], bool], timeout: float = 5.0
    ) -> None:
        with trio.fail_after(timeout):
            while not predicate(self.events):
                if self.error is not None:
                    raise AssertionError(f"reader ended: {self.error!r}")
                await self._changed.wait()

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def audio(self, rid: str | None = None) -> bytes:
        return b"".join(e.audio for e in self.of(AgentAudio) if rid is None or e.response_id == rid)


@asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Collector]:
    collector = Collector(agent)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collector.run)
        nursery.start_soon(collector.read)
        try:
            yield collector
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await agent.aclose()


def has(kind: type, n: int = 1) -> Callable[[list[AgentEvent]], bool]:
    return lambda events: sum(isinstance(e, kind) for e in events) >= n
