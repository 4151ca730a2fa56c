"""The echo agent: every caller frame comes straight back as agent audio.

Useful to measure the relay's own round trip (Twilio frame in -> same bytes out) with no
model in the loop. Also home of :class:`LocalEvents`, the event queue shared by the
in-process agents (echo, parrot).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import trio

from ..errors import ConfigError, ConnectionClosed
from .base import Agent, AgentAudio, AgentEvent, CallInfo

#: keys any agent section may carry that local agents simply ignore
GENERIC_OPTIONS = frozenset({"type", "name", "send_timeout", "connect_timeout"})


def check_options(agent: str, options: Mapping[str, Any], known: Iterable[str]) -> None:
    """Refuse unknown option keys: a typo in relay.toml should not silently do nothing."""
    unknown = set(options) - set(known) - GENERIC_OPTIONS
    if unknown:
        raise ConfigError(
            f"agents: unknown option(s) for {agent} agent: {', '.join(sorted(unknown))}"
        )


class LocalEvents:
    """Unbounded event queue of an in-process agent.

    ``get_batch`` implements the :meth:`Agent.receive` contract: wait for the next event,
    return it with everything else already pending (never an empty list), and raise
    :class:`ConnectionClosed` once the agent was closed. Unbounded is safe here: the
    producers are the engine's own calls, paced by real-time caller audio.
    """

    def __init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[AgentEvent](math.inf)
        self.closed = False

    def put(self, *events: AgentEvent) -> None:
        if self.closed:
            return
        for event in events:
            self._send.send_nowait(event)

    async def get_batch(self) -> list[AgentEvent]:
        if self.closed:
            raise ConnectionClosed(1000, "agent closed")
        try:
            batch = [await self._recv.receive()]
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ConnectionClosed(1000, "agent closed") from None
        while True:
            try:
                batch.append(self._recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return batch

    def close(self) -> None:
        """Wake a pending ``get_batch`` (it raises ConnectionClosed) and drop what is queued."""
        self.closed = True
        self._send.close()


class EchoAgent(Agent):
    """Returns each caller frame at once as ``AgentAudio`` (``response_id`` "echo")."""

    name: ClassVar[str] = "echo"
    RESPONSE_ID: ClassVar[str] = "echo"

    def __init__(self) -> None:
        self._events = LocalEvents()
        self.call: CallInfo | None = None
        self.frames_echoed = 0

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> EchoAgent:
        check_options(cls.name, options, ())
        return cls()

    async def connect(self, call: CallInfo) -> None:
        self.call = call

    def send_audio(self, audio: bytes) -> None:
        if audio:
            self.frames_echoed += 1
            self._events.put(AgentAudio(bytes(audio), self.RESPONSE_ID))

    async def receive(self) -> list[AgentEvent]:
        return await self._events.get_batch()

    async def aclose(self) -> None:
        self._events.close()
