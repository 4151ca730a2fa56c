"""``python -m bench load --agents ...``: the bench's vendor fakes against the real relay.

Every agent protocol runs one short session (N=2, 2 s window) through a real ``relay
serve`` subprocess (records in memory) with its fake from ``bench/fake_vendors.py``:
calls come up, both legs are measured with nothing lost, barge-in reaches Twilio as
``clear``, the relay closes every agent session after hang-up, and the per-adapter table
has its rows. Nothing here asserts speed.
"""

from __future__ import annotations

import tomllib
from types import SimpleNamespace
from urllib.parse import urlsplit

import orjson
import pytest

from bench import report
from bench.fake_vendors import PROTOCOLS, VendorAgent
from bench.harness import (
    TARGETS,
    SuiteOptions,
    Timings,
    _relay_command,
    agent_variant,
    plan,
    run_suite,
)
from bench.netio import Reactor, WsClient, frame, monotonic_ns
from bench.stats import LEVEL_COUNT, LEVEL_VALUES, Leg, LevelTracker, Window
from relay import config as relay_config

SHORT = Timings(settle_s=0.3, window_s=2.0, barge_s=0.5, drain_s=2.0, release_s=1.0)
N = 2


@pytest.fixture(scope="module")
def suite() -> dict:
    if TARGETS["relay-memory"].available():
        pytest.skip(TARGETS["relay-memory"].available())
    opts = SuiteOptions(
        targets=("relay-memory",),
        audios=("pcmu",),
        agents=PROTOCOLS,
        ns=(N,),
        timings=SHORT,
        pin=False,
        quiet_wait_s=0.0,
    )
    return run_suite(opts)


def _run_of(suite: dict, agent: str) -> dict:
    runs = [r for r in suite["runs"] if r["agent_type"] == agent]
    assert len(runs) == 1, [r["target"] for r in suite["runs"]]
    return runs[0]


@pytest.mark.parametrize("agent", PROTOCOLS)
def test_each_vendor_fake_streams_through_the_relay(suite, agent):
    r = _run_of(suite, agent)
    assert not r.get("error"), (r.get("error"), r.get("target_log_tail"))
    assert r["target"] == ("relay-memory" if agent == "openai" else f"relay-memory[{agent}]")
    assert r["audio"] == ("pcm16k" if agent == "gemini" else "pcmu")
    assert r["established"] == N and r["failed_calls"] == 0 and r["dropped_calls"] == 0
    for leg in ("uplink", "downlink"):
        assert r[leg]["count"] > 0 and r[leg]["frames_checked"] > 0, leg
        assert r[leg]["lost"] == 0 and r[leg]["duplicated"] == 0, (leg, r[leg])
        assert r[leg]["unknown"] == 0, (leg, r[leg])
    a = r["agent"]
    assert a["sessions"] == N and a["unclaimed_sessions"] == 0
    assert a["unauthorized_sessions"] == 0 and a["bad_messages"] == 0
    assert a["misrouted_frames"] == 0 and a["unknown_frames"] == 0
    assert a.get("bad_rate_chunks", 0) == 0
    assert a["sessions_open_after"] == 0  # the relay closed its agent sockets
    assert r["twilio_side"]["protocol_errors"] == 0
    assert r["bargein_to_clear"]["count"] == N and r["bargein_to_clear"]["missing"] == 0
    assert r["start_to_first_audio"]["count"] == N
    assert r["relay"]["cpu_us_per_call_s"] is not None


def test_agent_table_has_a_row_per_adapter_and_the_gemini_line(suite):
    rows = report.agent_medians(suite)
    assert [(r["agent"], r["audio"]) for r in rows] == [
        ("openai", "pcmu"),
        ("assemblyai", "pcmu"),
        ("deepgram", "pcmu"),
        ("elevenlabs", "pcmu"),
        ("gemini", "pcm16k"),
    ]
    assert all(r["n"] == N and r["rounds"] == 1 for r in rows)
    assert rows[0]["cpu_vs_openai_pcmu"] == 1.0
    assert all(r["cpu_vs_openai_pcmu"] is not None for r in rows)
    text = report.text_report(suite)
    assert "CPU per call-second and p99 per agent adapter" in text
    for agent in PROTOCOLS:
        assert f"relay-memory  {agent}" in text
    assert "Gemini (resampled both ways)" in text and "(reported, not asserted)" in text


# -- no relay needed ----------------------------------------------------------------------


def test_plan_makes_one_variant_per_agent_and_gemini_runs_pcm16k():
    opts = SuiteOptions(targets=("relay", "fastapi"), audios=("pcmu", "pcm24k"), agents=PROTOCOLS)
    pairs, skipped = plan(opts)
    got = [(t.name, a) for t, a in pairs]
    assert got == [
        ("relay", "pcmu"),
        ("relay[assemblyai]", "pcmu"),
        ("relay[deepgram]", "pcmu"),
        ("relay[elevenlabs]", "pcmu"),
        ("relay[gemini]", "pcm16k"),
        ("relay", "pcm24k"),
    ] + ([("fastapi", "pcmu")] if TARGETS["fastapi"].available() is None else [])
    assert sum("μ-law only" in s for s in skipped) == 3  # no pcm24k for the μ-law fakes
    only = plan(SuiteOptions(targets=("fastapi",), agents=("gemini",)))
    # the FastAPI peer speaks only OpenAI Realtime (or is not installed at all)
    assert only[0] == [] and ("OpenAI Realtime" in only[1][0] or "not importable" in only[1][0])
    assert "unknown agent" in plan(SuiteOptions(targets=("relay",), agents=("nope",)))[1][0]


@pytest.mark.parametrize("agent", PROTOCOLS)
def test_relay_toml_names_the_agent_and_relay_accepts_it(tmp_path, agent):
    target = agent_variant(TARGETS["relay-memory"], agent)
    audio = target.audios[0]
    cmd = target.command(8123, "ws://127.0.0.1:9/agent", audio, tmp_path)
    path = tmp_path / "relay.toml"
    assert str(path) in cmd
    table = tomllib.loads(path.read_text())["agents"]["bench"]
    assert table["type"] == agent and table["url"] == "ws://127.0.0.1:9/agent"
    assert table["warm_start"] is False  # sessions must open at `start` (see _agent_table)
    assert {"elevenlabs": "agent_id", "gemini": "model", "openai": "audio"}.get(
        agent, "api_key"
    ) in table
    cfg = relay_config.load(path, env={"RELAY_TWILIO_AUTH_TOKEN": "x" * 20})
    cfg.validate()  # the relay builds this agent from the table


def test_plain_relay_command_is_unchanged_for_openai(tmp_path):
    _relay_command(8123, "ws://127.0.0.1:9/v1/realtime", "pcm24k", tmp_path, store="memory")
    table = tomllib.loads((tmp_path / "relay.toml").read_text())["agents"]["bench"]
    assert table["type"] == "openai" and table["audio"] == "pcm24k" and table["api"] == "ga"


def test_agent_report_ratios_and_gemini_check_from_synthetic_runs():
    def run(agent: str, audio: str, cpu: float, noisy: bool = False, valid: bool = True) -> dict:
        leg = {"p99_ms": 1.0, "lost": 0}
        return {
            "target": "relay-memory" if agent == "openai" else f"relay-memory[{agent}]",
            "base_target": "relay-memory",
            "agent_type": agent,
            "audio": audio,
            "n": 100,
            "failed_calls": 0,
            "dropped_calls": 0,
            "uplink": leg,
            "downlink": leg,
            "bargein_to_clear": {"p50_ms": 0.5},
            "loadgen": {"valid": valid, "cpu_pct_of_core": 30.0},
            "interference": {"noisy": noisy},
            "relay": {"cpu_us_per_call_s": cpu},
        }

    suite = {
        "runs": [
            run("openai", "pcmu", 1000),
            run("openai", "pcmu", 1200),
            run("openai", "pcmu", 1100),
            run("gemini", "pcm16k", 1500, noisy=True, valid=False),
            run("gemini", "pcm16k", 1400),
            run("gemini", "pcm16k", 1430),
        ]
    }
    rows = report.agent_medians(suite)
    gem = next(r for r in rows if r["agent"] == "gemini")
    assert gem["cpu_us_per_call_s"] == 1430 and gem["cpu_vs_openai_pcmu"] == 1.3
    assert gem["rounds"] == 3 and gem["noisy"] == 1
    checks = report.gemini_checks(rows)
    assert checks == [
        {
            "target": "relay-memory",
            "n": 100,
            "ratio": 1.3,
            "met": True,
            "disturbed_runs": 1,
            "rounds": 3,
        }
    ]
    text = report.agent_table(suite)
    assert "[ meets] Gemini" in text and "1 of 3 rounds disturbed" in text
    suite["runs"][4]["relay"]["cpu_us_per_call_s"] = 1600
    suite["runs"][5]["relay"]["cpu_us_per_call_s"] = 1600
    assert "[MISSES] Gemini" in report.agent_table(suite)
    assert report.agent_table({"runs": suite["runs"][:3]}) == ""  # OpenAI only: no table


def test_level_tracker_anchors_a_late_first_second_on_the_right_frame():
    """A target that holds a call's first audio for more than 64 frames (its agent was slow
    to connect) and then forwards all of it: the first anchor must not be 64 frames ahead
    (seen at N=100 on a busy machine: every later frame "bogus" or lost)."""
    w = Window()
    w.start, w.end = 0, 10**12
    leg = Leg(w, [])
    for i in range(100):  # 2 s of audio sent before the first sample arrives
        leg.sent(i)
    tracker = LevelTracker(leg, 320, 160)
    stream = [0] * 20  # a resampler transient
    for k in range(100):
        stream += [LEVEL_VALUES[k % LEVEL_COUNT]] * 320
    for at in range(0, len(stream), 1000):
        tracker.feed(stream[at : at + 1000], False, 10**6)
    assert leg.bogus == 0 and leg.dups == 0
    assert leg.lost(0, 99) == 0


class _Client(WsClient):
    """A bare agent-side client (what relay's adapter would be) for the fakes alone."""

    def __init__(self, reactor: Reactor, agent, first: dict) -> None:
        parts = urlsplit(agent.url)
        super().__init__(
            reactor, parts.hostname, parts.port, parts.path + "?key=k", {"authorization": "x"}
        )
        self.first = first
        self.messages: list[dict] = []
        self.start()

    def on_upgraded(self, now: int) -> None:
        self.send(frame(orjson.dumps(self.first), masked=True))

    def on_message(self, opcode: int, payload: bytes, now: int) -> None:
        self.messages.append(orjson.loads(payload))


@pytest.mark.parametrize("agent_type", ["gemini", "assemblyai"])
def test_a_resumed_session_keeps_its_call(agent_type):
    """A reconnect that resumes a session (Gemini handle, AssemblyAI session.resume) goes on
    with the same call instead of being paired with the next call being set up."""
    reactor = Reactor()
    try:
        w = Window()
        claims: list = []
        call = SimpleNamespace(idx=0, up=Leg(w, []), down=Leg(w, []), agent=None, t_barge=0, k=0)

        def claim(session):
            claims.append(session)
            call.agent = session
            return call

        agent = VendorAgent(reactor, agent_type, claim=claim, calls=[call], response_deltas=2)
        setup = {"setup": {}} if agent_type == "gemini" else {"type": "session.update"}
        one = _Client(reactor, agent, setup)
        reactor.run(until_ns=monotonic_ns() + 450_000_000)
        if agent_type == "gemini":
            handles = [
                m["sessionResumptionUpdate"]["newHandle"]
                for m in one.messages
                if "sessionResumptionUpdate" in m
            ]
            resume = {"setup": {"sessionResumption": {"handle": handles[-1]}}}
        else:
            sid = one.messages[0]["session_id"]
            resume = {"type": "session.resume", "session_id": sid}
        sent_before = len(call.down.send_times)
        two = _Client(reactor, agent, resume)
        reactor.run(until_ns=monotonic_ns() + 350_000_000)
        assert len(claims) == 1 and agent.resumed == 1 and agent.unclaimed == 0
        first, second = agent.sessions
        assert call.agent is second and first.paused and second.call is call
        assert len(call.down.send_times) > sent_before  # the audio goes on, numbered on
        assert second.delta_seq == len(call.down.send_times)
        assert two.messages and one.messages
        second.barge_in()
        assert call.t_barge
    finally:
        reactor.close()
