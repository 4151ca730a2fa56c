"""bench.wsstack's plumbing: every server stack echoes correctly and yields a CPU figure.

Two connections for half a second per stack; nothing asserts speed (the machine may be
shared). The message rate is raised above Twilio's 50/s only so that the server's CPU in
the short window spans several clock ticks of /proc/<pid>/stat (10 ms each).
"""

from __future__ import annotations

import pytest

from bench.wsstack import (
    STACKS,
    Plan,
    aggregate,
    media_message,
    run_one,
    status,
    unavailable,
)

TINY = Plan(ns=(2,), repeats=1, warmup_s=0.2, window_s=0.5, rate_hz=1000.0, connect_timeout_s=15.0)


@pytest.mark.parametrize("stack", STACKS)
def test_stack_echoes_every_message_and_costs_cpu(stack):
    why = unavailable(stack)
    if why:
        pytest.skip(why)
    r = run_one(stack, 2, TINY)
    assert "error" not in r, (r.get("error"), r.get("server_log_tail"))
    assert r["sent"] > 0 and r["echoed"] > 0
    assert r["mismatched"] == 0 and r["unexpected"] == 0
    assert r["cpu_us_per_pair"] > 0
    assert status(r) in ("ok", "saturated", "INVALID")  # INVALID: a busy test machine


def test_media_message_is_twilio_sized():
    msg = media_message(b"MZ" + b"0" * 32, 1000)
    assert 370 <= len(msg) <= 400
    assert msg.startswith(b'{"event":"media"')


def _run(stack, cpu_us, saturated=False):
    return {
        "stack": stack,
        "n": 100,
        "cpu_us_per_pair": cpu_us,
        "server_pct_of_core": 10.0,
        "rtt_p50_ms": 0.2,
        "rtt_p99_ms": 1.0,
        "mismatched": 0,
        "unexpected": 0,
        "saturated": saturated,
        "driver": {"valid": True},
        "interference": {},
    }


def test_aggregate_takes_medians_and_ratios_to_the_reactor():
    runs = [_run("relay-reactor", v) for v in (20.0, 22.0, 40.0)]
    runs += [_run("trio-websocket", v) for v in (60.0, 66.0, 70.0)]
    runs.append(_run("hypercorn-quart", 130.0, saturated=True))
    rows = {
        r["stack"]: r
        for r in aggregate(runs, ["relay-reactor", "trio-websocket", "hypercorn-quart"], (100,))
    }
    assert rows["relay-reactor"]["cpu_us_per_pair"] == 22.0
    assert rows["trio-websocket"]["ratio_to_reference"] == 3.0
    assert rows["hypercorn-quart"]["status"] == "saturated 1/1"
