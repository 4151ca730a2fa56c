"""relay.media.passtimer: the reactor's periodic kernel timer (real time, bounded by
fail_after; only counts are asserted, never durations)."""

from __future__ import annotations

import pytest
import trio

from relay.media.passtimer import PassTimer

timer_or_skip = PassTimer.create()
pytestmark = pytest.mark.skipif(timer_or_skip is None, reason="timerfd is Linux-only")
if timer_or_skip is not None:
    timer_or_skip.close()


def _timer() -> PassTimer:
    timer = PassTimer.create()
    assert timer is not None
    return timer


async def test_ticks_while_armed() -> None:
    timer = _timer()
    try:
        timer.arm(0.001)
        with trio.fail_after(5):
            for _ in range(5):
                await timer.wait()
        assert timer.ticks >= 5
    finally:
        timer.close()


async def test_a_disarmed_timer_never_ticks() -> None:
    timer = _timer()
    try:
        timer.arm(0.001)
        timer.disarm()
        assert timer.period_s == 0
        with trio.move_on_after(0.05) as scope:
            await timer.wait()
        assert scope.cancelled_caught
        assert timer.ticks == 0
    finally:
        timer.close()


async def test_overrun_ticks_are_counted_and_wait_returns_at_once() -> None:
    timer = _timer()
    try:
        timer.arm(0.001)
        trio_sleep_done = trio.current_time() + 0.02
        await trio.sleep_until(trio_sleep_done)  # several periods pass unwaited
        with trio.fail_after(5):
            await timer.wait()
        assert timer.ticks > 1  # one wait collects every expiration since the last
    finally:
        timer.close()


def test_rejects_a_non_positive_period() -> None:
    timer = _timer()
    try:
        with pytest.raises(ValueError):
            timer.arm(0)
    finally:
        timer.close()
