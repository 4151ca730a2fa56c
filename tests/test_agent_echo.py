"""The echo agent returns caller frames unchanged, at once."""

from __future__ import annotations

import base64

import pytest
import trio
import trio.testing

from relay.agents.base import AgentAudio, CallInfo
from relay.agents.echo import EchoAgent
from relay.agents.registry import create_agent
from relay.errors import ConfigError, ConnectionClosed

CALL = CallInfo(call_sid="CA" + "1" * 32, stream_sid="MZ" + "1" * 32)


async def test_echoes_each_frame_in_one_batch() -> None:
    agent = EchoAgent.from_config({})
    await agent.connect(CALL)
    agent.send_audio(b"\x01" * 160)
    agent.send_audio_b64(base64.b64encode(b"\x02" * 160).decode())
    agent.send_audio(b"")  # nothing to echo
    with trio.fail_after(1):
        batch = await agent.receive()
    assert batch == [AgentAudio(b"\x01" * 160, "echo"), AgentAudio(b"\x02" * 160, "echo")]
    assert agent.frames_echoed == 2 and agent.call == CALL


async def test_receive_waits_then_raises_after_close() -> None:
    agent = EchoAgent()
    await agent.connect(CALL)
    got: list[object] = []
    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                got.extend(await agent.receive())
                with pytest.raises(ConnectionClosed):
                    await agent.receive()

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            agent.send_audio(b"\x03" * 160)
            await trio.testing.wait_all_tasks_blocked()
            await agent.aclose()
    assert got == [AgentAudio(b"\x03" * 160, "echo")]


def test_config() -> None:
    assert isinstance(create_agent({"type": "echo"}), EchoAgent)
    with pytest.raises(ConfigError, match="unknown option"):
        EchoAgent.from_config({"greeting": True})
