"""The load benchmark's measuring code, checked against a relay of known behaviour.

A tiny relay (bench.peers.null_relay, run in-process on the same epoll loop as the
generator and the fake agent) forwards both legs after a fixed, known delay; the measured
latencies must come out at that delay. It can also transcode (sample-count matching) and
drop frames (loss accounting). Only loopback is used and nothing asserts absolute speed.
"""

from __future__ import annotations

import binascii
import itertools
import time

import pytest

from bench import genfast
from bench.fake_agent import FakeAgent
from bench.harness import (
    Timings,
    capacity_search,
    capacity_steps,
    interleaved_capacity,
    run_session,
    verdict,
)
from bench.loadgen import LoadGenerator, parse_twiml
from bench.netio import Reactor
from bench.peers.null_relay import DelayRelay
from bench.stats import (
    LEVEL_CODES,
    LEVEL_COUNT,
    LEVEL_VALUES,
    Leg,
    LevelTracker,
    Window,
    b64_decoded_len,
    level_of_value,
    linear_to_ulaw,
    loadgen_validity,
    make_header,
    percentile,
    scan_headers,
    summarize_ns,
)

# timing measurements: run alone, after the parallel part of the suite (.ci/run)
pytestmark = pytest.mark.serial


TOKEN = "test-auth-token"
FAST = Timings(settle_s=0.2, window_s=1.2, barge_s=0.3, drain_s=1.5, ramp_timeout_s=10)


def _engine(kind: str):
    """``python``: the pure-Python generator (the reference); ``compiled``: bench._genfast."""
    if kind == "python":
        return None
    engine, why = genfast.load()
    if engine is None:
        pytest.skip(f"compiled load-generator fast path unavailable: {why}")
    return engine


# Every end-to-end measurement runs on both generator engines, with kernel arrival stamps
# (what the bench uses) and with read-time stamps.
ENGINES = [
    pytest.param("compiled", True, id="compiled-kstamp"),
    pytest.param("python", True, id="python-kstamp"),
    pytest.param("python", False, id="python-readtime"),
]


def _run(
    n: int,
    delay_ms: float,
    transcode: bool = False,
    drop_every: int = 0,
    engine: str = "compiled",
    stamp_rx: bool = True,
):
    reactor = Reactor(stamp_rx=stamp_rx, engine=_engine(engine))
    try:
        agent = FakeAgent(reactor, audio="pcm24k" if transcode else "pcmu")
        relay = DelayRelay(reactor, agent.url, delay_ms, transcode, drop_every, auth_token=TOKEN)
        gen = LoadGenerator(reactor, relay.base, TOKEN, passthrough=not transcode)
        agent.claim_fn = gen.claim_session
        agent.calls = gen.calls
        result = run_session(reactor, gen, agent, n, FAST)
        assert relay.bad_signatures == 0
        return result, agent
    finally:
        reactor.close()


@pytest.mark.parametrize(("engine", "stamp_rx"), ENGINES)
def test_injected_delay_is_measured_on_both_legs_passthrough(engine, stamp_rx):
    result, agent = _run(n=4, delay_ms=30, engine=engine, stamp_rx=stamp_rx)
    assert result["established"] == 4 and result["failed_calls"] == 0
    for leg in ("uplink", "downlink"):
        r = result[leg]
        assert r["count"] > (150 if leg == "uplink" else 30)  # 50 vs 10 frames per s
        assert abs(r["p50_ms"] - 30) < 5, (leg, r)
        assert r["lost"] == 0 and r["duplicated"] == 0 and r["reordered"] == 0
    assert result["twilio_side"]["misrouted_frames"] == 0
    assert agent.stats()["misrouted_frames"] == 0
    # start -> first audio: the 30 ms delay plus agent connect + session.update, which are
    # one-off events (4 samples) whose cost swings with machine load: bound it loosely.
    assert 29 <= result["start_to_first_audio"]["p50_ms"] < 30 + 250
    # barge-in -> clear: just the injected delay
    assert result["bargein_to_clear"]["count"] == 4
    assert abs(result["bargein_to_clear"]["p50_ms"] - 30) < 5
    assert result["twilio_side"]["calls_still_open"] == 0
    assert agent.sessions_open == 0
    assert result["twilio_side"]["marks_echoed"] > 0


def test_arrival_rate_paces_the_webhooks():
    # 6 callers at 20 a second: the last webhook cannot leave before 5 intervals (250 ms)
    reactor = Reactor(stamp_rx=True, engine=_engine("python"))
    try:
        agent = FakeAgent(reactor, audio="pcmu")
        relay = DelayRelay(reactor, agent.url, 0, False, 0, auth_token=TOKEN)
        gen = LoadGenerator(reactor, relay.base, TOKEN, arrival_rate=20.0)
        agent.claim_fn = gen.claim_session
        agent.calls = gen.calls
        sent: list[int] = []
        pump = gen._pump_webhooks

        def counting_pump() -> None:
            before = len(gen._webhooks_todo)
            pump()
            sent.extend([time.monotonic_ns()] * (before - len(gen._webhooks_todo)))

        gen._pump_webhooks = counting_pump  # type: ignore[method-assign]
        result = run_session(reactor, gen, agent, 6, FAST)
        assert result["established"] == 6 and result["failed_calls"] == 0
        assert len(sent) == 6
        gaps = [b - a for a, b in itertools.pairwise(sent)]
        assert min(gaps) >= 45_000_000, gaps  # 50 ms apart, timer slack aside
    finally:
        reactor.close()


@pytest.mark.parametrize(("engine", "stamp_rx"), ENGINES)
def test_injected_delay_is_measured_by_level_codes_when_transcoding(engine, stamp_rx):
    result, agent = _run(n=3, delay_ms=30, transcode=True, engine=engine, stamp_rx=stamp_rx)
    for leg in ("uplink", "downlink"):
        r = result[leg]
        assert r["count"] > (100 if leg == "uplink" else 20)
        assert abs(r["p50_ms"] - 30) < 5, (leg, r)
        assert r["lost"] == 0 and r["duplicated"] == 0 and r["reordered"] == 0
    if engine == "compiled":  # the PCM appends took the compiled reader, not a fallback
        assert agent.compiled_pcm_appends > 0.9 * agent.appends > 0
    else:
        assert agent.compiled_pcm_appends == 0


@pytest.mark.parametrize("engine", ["compiled", "python"])
def test_dropped_uplink_frames_are_counted_lost(engine):
    result, _ = _run(n=2, delay_ms=5, drop_every=10, engine=engine)
    up = result["uplink"]
    expected = up["frames_checked"] / 10
    assert abs(up["lost"] - expected) <= 3, up
    assert result["downlink"]["lost"] == 0


@pytest.mark.parametrize("engine", ["compiled", "python"])
def test_zero_delay_relay_is_measured_near_zero_with_nothing_lost(engine):
    # delay 0 is the calibration configuration: with the compiled engine the null relay
    # forwards the uplink in C (NullTwilioReader); nothing may be lost or misrouted.
    result, agent = _run(n=4, delay_ms=0, engine=engine)
    for leg in ("uplink", "downlink"):
        r = result[leg]
        assert r["count"] > (150 if leg == "uplink" else 30)
        assert r["p50_ms"] < 5, (leg, r)
        assert r["lost"] == 0 and r["duplicated"] == 0 and r["reordered"] == 0
    assert result["twilio_side"]["protocol_errors"] == 0
    assert result["twilio_side"]["marks_echoed"] > 0
    assert agent.stats()["misrouted_frames"] == 0 and agent.stats()["bad_messages"] == 0


def test_percentile_nearest_rank():
    vals = list(range(1, 101))
    assert percentile(vals, 50) == 50
    assert percentile(vals, 99) == 99
    assert percentile(vals, 99.9) == 100
    assert percentile(vals, 100) == 100
    assert percentile([7], 99) == 7
    assert percentile([], 50) is None
    s = summarize_ns([1_000_000] * 999 + [50_000_000])
    assert s["p50_ms"] == 1.0 and s["p99_ms"] == 1.0 and s["p999_ms"] == 1.0
    assert s["max_ms"] == 50.0


def test_leg_detects_loss_duplicates_and_reordering():
    w = Window()
    w.start, w.end = 0, 10**12
    sink: list[int] = []
    leg = Leg(w, sink)
    for i in range(10):
        leg.sent(i * 1000)
    for seq in (0, 1, 3, 2, 2, 5, 6, 7, 8, 9):  # 4 lost, 2 late (reordered) and duplicated
        leg.received(seq, seq * 1000 + 500)
    assert leg.lost(0, 10**12) == 1
    assert leg.dups == 1
    assert leg.reorders == 1
    assert len(sink) == 9 and set(sink) == {500}
    leg.received(42, 0)
    assert leg.bogus == 1


def _level_stream(frames: range, per_frame: int, ulaw: bool) -> list[int]:
    out: list[int] = []
    for k in frames:
        i = k % LEVEL_COUNT
        out += [LEVEL_CODES[i] if ulaw else LEVEL_VALUES[i]] * per_frame
    return out


@pytest.mark.parametrize("ulaw", [False, True])
def test_level_tracker_identifies_frames_despite_drops_and_offsets(ulaw):
    w = Window()
    w.start, w.end = 0, 10**12
    leg = Leg(w, [])
    tracker = LevelTracker(leg, 480, 240)
    # The target dropped frames 0..4, then forwards 5..99 except 40..42, in odd chunks,
    # with a 37-sample resampler transient in front.
    frames = [*range(5, 40), *range(43, 100)]
    stream = [0xFF if ulaw else 0] * 37  # silence in front
    for k in frames:
        stream += _level_stream(range(k, k + 1), 480, ulaw)
    pos = 0
    for size in [700, 333, 1200, 50] * 100:
        chunk = stream[pos : pos + size]
        if not chunk:
            break
        # frames are sent (a little) before they arrive, as in a live run
        newest = frames[min(len(frames) - 1, max(0, (pos + size - 37) // 480))] + 3
        while len(leg.send_times) <= newest:
            leg.sent(len(leg.send_times))
        tracker.feed(chunk, ulaw, pos)
        pos += size
    assert leg.lost(0, 5) == 5
    assert leg.lost(5, 99) == 3  # 40, 41, 42
    assert leg.dups == 0 and leg.reorders == 0


def test_level_tracker_reports_duplicates_and_reordering():
    w = Window()
    w.start, w.end = 0, 10**12
    leg = Leg(w, [])
    for i in range(32):
        leg.sent(i)
    tracker = LevelTracker(leg, 480, 240)
    order = [*range(0, 10), 12, 10, 11, *range(13, 20), 18, 19, *range(20, 30)]
    stream: list[int] = []
    for k in order:
        stream += _level_stream(range(k, k + 1), 480, False)
    tracker.feed(stream, False, 0)
    assert leg.reorders >= 1
    assert leg.dups == 2  # 18 and 19 again
    assert leg.lost(1, 30) == 0  # frame 0 only anchors the stream


def test_level_codes_survive_ulaw_round_trip():
    for code, value in zip(LEVEL_CODES, LEVEL_VALUES, strict=True):
        assert linear_to_ulaw(value) == code
        assert level_of_value(value + 3) == level_of_value(value)


def test_scan_headers_across_message_boundaries():
    from bench.loadgen import FILLER

    data = b"".join(make_header(7, s) + FILLER[:151] for s in range(5))
    found, carry = scan_headers(data[:165])
    assert found == [(0, 7, 0)] and carry == data[160:165]
    found, carry = scan_headers(carry + data[165:])
    assert found == [(i * 160, 7, s) for i, s in enumerate(range(1, 5))] and carry == b""


def test_base64_length_and_twiml_parsing():
    for n in range(0, 20):
        assert b64_decoded_len(binascii.b2a_base64(b"x" * n, newline=False)) == n
    url, params = parse_twiml(
        '<?xml version="1.0"?><Response><Connect><Stream url="wss://h/twilio/stream">'
        '<Parameter name="token" value="abc"/></Stream></Connect></Response>'
    )
    assert url == "wss://h/twilio/stream" and params == {"token": "abc"}


def test_saturated_generator_marks_run_invalid():
    assert loadgen_validity(40.0, 1.0) == (True, [])
    ok, reasons = loadgen_validity(92.0, 1.0)
    assert not ok and "CPU" in reasons[0]
    ok, reasons = loadgen_validity(30.0, 12.0)
    assert not ok and "behind schedule" in reasons[0]
    run = {"loadgen": {"valid": False}, "failed_calls": 0, "dropped_calls": 0}
    assert verdict(run, 20.0) == "invalid"


def _fake_run(capacity: int, gen_limit: int = 10**9):
    def run(n: int) -> dict:
        ok = n <= capacity
        leg = {"count": 100, "lost": 0, "p99_ms": 3.0 if ok else 40.0}
        return {
            "n": n,
            "loadgen": {"valid": n <= gen_limit, "cpu_pct_of_core": 50 if n <= gen_limit else 95},
            "failed_calls": 0,
            "dropped_calls": 0,
            "uplink": leg,
            "downlink": leg,
        }

    return run


@pytest.mark.parametrize("capacity", [75, 330, 640])
def test_capacity_search_brackets_the_limit(capacity):
    found = capacity_search(_fake_run(capacity))
    assert found["calls"] <= capacity < found["first_failing"]
    assert found["first_failing"] - found["calls"] <= max(10, int(0.08 * found["calls"])) + 10
    assert found["bounded_by"] == "latency/loss"


def test_capacity_search_bisects_below_the_generator_limit():
    """A saturated generator bounds the search like a failing run: the capacity reported
    is the largest N it could still drive (a lower bound), not the last ladder step."""
    found = capacity_search(_fake_run(10**6, gen_limit=450))
    assert found["calls"] == 450 and found["bounded_by"].startswith("load generator")
    assert found["first_failing"] is None


def test_capacity_search_finds_a_limit_under_the_generator_limit():
    found = capacity_search(_fake_run(420, gen_limit=450))
    assert found["calls"] <= 420 < 450 and found["calls"] >= 400
    assert found["bounded_by"] == "latency/loss" and found["first_failing"] is not None


def test_interleaved_searches_take_turns_and_find_what_each_finds_alone():
    order: list[tuple[str, int]] = []

    def logged(name: str, capacity: int):
        run = _fake_run(capacity)

        def step(n: int) -> dict:
            order.append((name, n))
            return run(n)

        return step

    caps = {"relay/pcmu": 470, "relay/pcm24k": 380, "fastapi/pcmu": 140}
    found = interleaved_capacity(
        {name: (logged(name, cap), capacity_steps()) for name, cap in caps.items()}
    )
    assert list(found) == list(caps)  # results in the order given
    for name, cap in caps.items():
        assert found[name] == capacity_search(_fake_run(cap))
        assert found[name]["calls"] <= cap < found[name]["first_failing"]
    # Side by side: while all three searches run, each round runs each one once, and no
    # search ever runs twice in a row while another is still searching.
    assert [name for name, _n in order[:3]] == list(caps)
    assert {name for name, _n in order[3:6]} == set(caps)
    fastapi_done = max(i for i, (name, _n) in enumerate(order) if name == "fastapi/pcmu")
    for (a, _), (b, _) in itertools.pairwise(order[: fastapi_done + 1]):
        assert a != b


def test_full_suite_runs_every_targets_search_side_by_side():
    from bench.harness import SuiteOptions, _run_pairs, plan

    # relay alone: the peers need the bench extras, which the test environment lacks
    opts = SuiteOptions(mode="full", targets=("relay",), audios=("pcmu", "pcm24k"))
    pairs, _skipped = plan(opts)
    caps = {"relay/pcmu": 470, "relay/pcm24k": 380}
    order: list[str] = []

    def one(target, audio: str, n: int) -> dict:
        key = f"{target.name}/{audio}"
        order.append(key)
        return _fake_run(caps[key])(n)

    capacity: dict[str, dict] = {}
    _run_pairs(opts, pairs, one, capacity)
    assert sorted(capacity) == sorted(caps)
    for key, cap in caps.items():
        assert capacity[key]["calls"] <= cap < capacity[key]["first_failing"]
        assert all(isinstance(n, int) for n in capacity[key]["runs"])
    assert set(order[:2]) == set(caps)  # the first round runs every search once


def test_marker_tracker_delivers_when_all_but_the_allowance_arrived():
    from bench.loadgen import FILLER
    from bench.stats import MarkerTracker

    w = Window()
    w.start, w.end = 0, 10**12
    sink: list[int] = []
    leg = Leg(w, sink)
    for _ in range(3):
        leg.sent(0)
    tracker = MarkerTracker(800, 80, lambda call: leg if call == 3 else None, expected=3)
    stream = b"".join(make_header(3, j) + FILLER[:791] for j in range(3))

    def b64(data: bytes) -> bytes:
        return binascii.b2a_base64(data, newline=False)

    # A target that re-chunks 100 ms deltas into 160-byte messages, one per ms of "time".
    for t, pos in enumerate(range(0, len(stream), 160)):
        tracker.feed(b64(stream[pos : pos + 160]), t)
    # delta j is complete enough at byte j*800 + 720, i.e. in chunk 4 (+5 per delta)
    assert sink == [4, 9, 14]
    assert tracker.misrouted == 0
    # A foreign call's marker is cross-talk, not a delivery.
    tracker.feed(b64(make_header(9, 0) + FILLER[:791]), 100)
    assert tracker.misrouted == 1 and leg.dups == 0
