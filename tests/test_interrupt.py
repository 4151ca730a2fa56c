"""relay.interrupt.run: Ctrl-C cancels a one-shot command's run and surfaces as one
KeyboardInterrupt after it, never inside library code (where it could be swallowed)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
import trio

from relay import interrupt


@pytest.fixture
def default_sigint() -> Iterator[None]:
    """Python's own Ctrl-C handler for the test (pytest or the shell may have another)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def test_the_value_and_the_errors_come_out_as_from_trio_run(default_sigint: None) -> None:
    async def answer(x: int) -> int:
        await trio.sleep(0)
        return x * 2

    async def fail() -> None:
        await trio.sleep(0)
        raise ValueError("bad --callee")

    assert interrupt.run(answer, 21) == 42
    with pytest.raises(ValueError, match="bad --callee"):  # not wrapped in a group
        interrupt.run(fail)


def test_ctrl_c_cancels_the_run_then_raises_keyboard_interrupt(default_sigint: None) -> None:
    seen: list[str] = []

    async def command() -> str:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            await trio.sleep(5)
            seen.append("not cancelled")
            return "finished"
        except trio.Cancelled:
            seen.append("cancelled")
            raise
        finally:
            seen.append("cleaned up")

    with pytest.raises(KeyboardInterrupt):
        interrupt.run(command)
    assert seen == ["cancelled", "cleaned up"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_second_ctrl_c_while_unwinding_is_not_held_back(default_sigint: None) -> None:
    async def command() -> None:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            await trio.sleep(5)
        finally:
            with trio.CancelScope(shield=True):
                os.kill(os.getpid(), signal.SIGINT)  # the cleanup is stuck: Ctrl-C again
                await trio.sleep(5)

    with pytest.raises(KeyboardInterrupt):
        interrupt.run(command)


def test_ctrl_c_stays_ignored_when_the_command_started_with_it_ignored() -> None:
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:

        async def command() -> str:
            os.kill(os.getpid(), signal.SIGINT)
            await trio.sleep(0.05)
            return "ran to its end"

        assert interrupt.run(command) == "ran to its end"
    finally:
        signal.signal(signal.SIGINT, old)
