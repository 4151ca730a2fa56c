"""relay.media.passtimer: the reactor's periodic kernel timer (real time, bounded by
fail_after; only counts are asserted, never durations)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio

from relay.media.passtimer import PassTimer


@pytest.fixture
def timer() -> Iterator[PassTimer]:
    made = PassTimer.create()
    if made is None:
        pytest.skip("timerfd is Linux-only")
    yield made
    made.close()


async def test_ticks_while_armed(timer: PassTimer) -> None:
    timer.arm(0.001)
    with trio.fail_after(5):
        for _ in range(5):
            await timer.wait()
    assert timer.ticks >= 5


async def test_a_disarmed_timer_never_ticks(timer: PassTimer) -> None:
    timer.arm(0.001)
    timer.disarm()
    assert timer.period_s == 0
    with trio.move_on_after(0.05) as scope:
        await timer.wait()
    assert scope.cancelled_caught
    assert timer.ticks == 0


async def test_overrun_ticks_are_counted_and_wait_returns_at_once(timer: PassTimer) -> None:
    timer.arm(0.001)
    await trio.sleep(0.02)  # several periods pass unwaited
    with trio.fail_after(5):
        await timer.wait()
    assert timer.ticks > 1  # one wait collects every expiration since the last


def test_rejects_a_non_positive_period(timer: PassTimer) -> None:
    with pytest.raises(ValueError):
        timer.arm(0)
