"""Admission control (relay/media/headroom.py): the refusal rules, the sampler, and a
refused call through the voice webhook."""

from __future__ import annotations

import resource
from typing import Any

import trio
import trio.testing

from relay.config import ServerConfig
from relay.media import headroom
from relay.media.headroom import Headroom


def make(**kw: Any) -> Headroom:
    return Headroom(ServerConfig(**kw))


def test_admits_with_room() -> None:
    h = make()
    h.cpu, h.calls = 0.30, 100
    h.lags_ms.extend([0.2, 0.4, 0.3])
    assert h.refusal(active=100, pending=0) == ""


def test_cpu_projection_counts_calls_answered_but_not_started() -> None:
    h = make(admission_max_cpu=0.8)
    h.cpu, h.calls = 0.70, 100  # 100 calls at 0.7 % each
    assert h.refusal(active=100, pending=0) == ""  # 101 -> 70.7 %
    reason = h.refusal(active=100, pending=20)  # 121 -> 84.7 %
    assert reason.startswith("cpu: 70% at 100 calls, 85% projected with 21 more")


def test_cpu_per_call_uses_the_calls_of_the_measured_window() -> None:
    h = make(admission_max_cpu=0.8)
    h.cpu, h.calls = 0.40, 50  # measured while 50 calls were up: 0.8 % each
    assert h.refusal(active=99, pending=0) == ""  # 100 -> 80 %
    assert h.refusal(active=100, pending=0).startswith("cpu: 40% at 100 calls, 81% projected")


def test_few_calls_never_refused_on_cpu() -> None:
    h = make(admission_max_cpu=0.5)
    h.cpu, h.calls = 0.45, 5  # fixed overhead dominates at 5 calls: no per-call estimate from it
    assert h.refusal(active=5, pending=10) == ""


def test_loop_lag_ignores_pauses_but_not_a_trend() -> None:
    h = make(admission_max_lag_ms=10)
    h.lags_ms.extend([0.5] * 30 + [80.0] * 5)  # a few GC pauses, scheduler hiccups
    assert h.refusal(active=1, pending=0) == ""
    h.lags_ms.extend([25.0] * 20)  # behind most of the last two seconds
    assert h.refusal(active=1, pending=0) == "loop lag 25.0 ms (limit 10 ms)"


def test_descriptors_refused_before_they_run_out() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        h = make()
        room = (256 - headroom.FD_RESERVE) // headroom.FDS_PER_CALL  # 64
        assert h.refusal(active=room - 1, pending=0) == ""
        assert h.refusal(active=room - 1, pending=1).startswith("descriptors: 65 calls")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_disabled_admits_everything() -> None:
    h = make(admission=False)
    h.cpu = 5.0
    h.lags_ms.extend([100.0] * 40)
    assert h.refusal(active=10_000, pending=10_000) == ""


async def test_sampler_measures_loop_lag() -> None:
    h = make()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(h.run)
            await trio.sleep(0.3)
            assert len(h.lags_ms) >= 3 and h.lag_ms() < 50
            # block the loop for 130 ms: the next 50 ms tick falls due somewhere inside
            # the block, so it fires 80-130 ms late
            import time

            time.sleep(0.13)
            await trio.sleep(0.12)
            assert max(h.lags_ms) >= 50
            assert h.lag_hist.count == len(h.lags_ms)
            assert 'relay_loop_lag_seconds_bucket{le="0.05"}' in "\n".join(h.render())
            nursery.cancel_scope.cancel()


async def test_overloaded_worker_rejects_at_the_webhook(start_relay: Any, make_config: Any) -> None:
    relay_ = await start_relay(make_config())
    with trio.fail_after(15):
        relay_.state.headroom.lags_ms.extend([40.0] * 40)  # a loop that is seconds behind
        relay_.state.headroom.max_lag_ms = 10.0
        _response, twiml = await relay_.voice("CA" + "7" * 32)
        assert twiml is not None and twiml.verbs == ["Reject"]
        assert twiml.root[0].get("reason") == "busy"
        record = relay_.records("CA" + "7" * 32)
        assert (record.status, record.reject_reason) == ("rejected", "overloaded")
        assert relay_.metrics.calls_rejected["overloaded"] == 1
        assert relay_.metrics.webhooks["voice_rejected_overloaded"] == 1
        assert relay_.metrics.calls_total == 0 and not relay_.state.policies.plans
        # the lag passes: the next call is answered and streamed
        relay_.state.headroom.lags_ms.clear()
        fake = await relay_.dial("CA" + "8" * 32)
        await relay_.wait_record(fake.call_sid, "active")
        await fake.hang_up()
        await relay_.wait_record(fake.call_sid, "completed")


def test_refusals_counted_by_rule_and_rendered() -> None:
    h = make(admission_max_cpu=0.5, admission_max_lag_ms=10)
    h.cpu, h.calls = 0.60, 100
    assert h.refusal(active=100, pending=0).startswith("cpu:")
    h.cpu = 0.10
    h.lags_ms.extend([30.0] * 40)
    assert h.refusal(active=100, pending=0).startswith("loop lag")
    assert h.refused == {"descriptors": 0, "cpu": 1, "loop_lag": 1}
    text = "\n".join(h.render())
    assert 'relay_admission_refusals_total{rule="cpu"} 1' in text
    assert 'relay_admission_refusals_total{rule="loop_lag"} 1' in text
    assert "relay_headroom_cpu_ratio 0.1000" in text
    assert "relay_headroom_cpu_per_call_ratio 0.001000" in text
    assert "relay_headroom_loop_lag_seconds 0.03000" in text
