"""Load/latency/capacity runs: targets, one measured session, capacity search.

One run = one fresh target process (the relay or a peer) pinned to the "relay core", and
this process (load generator + fake agent on one epoll loop) pinned to the "load core".
The fake agent speaks OpenAI Realtime (bench.fake_agent); with ``--agents`` each relay
target also runs once per other adapter against that vendor's fake (bench.fake_vendors),
as target variants ``relay[assemblyai]``, ``relay[gemini]``, ...:

    ramp      calls come up one at a time (see bench.loadgen), media flows at once
    settle    a short pause so ramp transients are not measured
    window    steady state: per-frame latency on both legs, relay CPU and RSS,
              the generator's own CPU and timer lateness
    barge-in  the fake agent sends speech_started on every call (spread over 200 ms);
              time until Twilio ``clear`` reaches the generator
    hang-up   every call sends ``stop`` and closes; then fds / active calls / agent
              sessions still open are compared with the pre-run baseline

A fresh process per run keeps RSS-per-call and fd-leak figures honest: CPython rarely
returns memory, so a process reused for a second run would look cheaper per call.

Metrics (all times from CLOCK_MONOTONIC, shared by every process on the machine):

- uplink latency: generator sends a ``media`` frame -> fake agent receives the
  ``input_audio_buffer.append`` carrying it; downlink: fake agent sends a delta -> the
  generator has received all but its last 10 ms as Twilio ``media``. Per frame, frames
  sent inside the window only; p50/p99/p99.9/max. Frames are identified by markers
  (μ-law passthrough) or level codes (PCM), see ``bench.stats``.
- lost / duplicated / reordered: per leg, frames sent in the window (downlink: up to a
  grace before the barge-in, whose ``clear`` legitimately discards queued audio).
- start -> first audio: ``start`` sent -> first Twilio ``media`` received (the fake agent
  answers instantly after ``session.update``). barge-in -> clear: agent sends
  ``speech_started`` -> Twilio ``clear`` received.
- target CPU: user+system seconds of the target process tree over the window, as % of one
  core and µs per call-second; RSS per call = (RSS at window end - RSS before) / N;
  fds / threads / ``relay_active_calls`` after hang-up vs before; agent sessions the
  target left open after the callers hung up.
- generator validity: its own CPU (% of its core, system share) and the lateness of its
  20 ms / 100 ms timers; INVALID past 85% CPU or a 5 ms p99 lateness. ``interference``:
  CPU other processes used on the two pinned cores during the window (``noisy`` > 15%).
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable, Generator, Hashable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

from bench import genfast
from bench.fake_agent import FakeAgent
from bench.fake_vendors import AUDIOS as AGENT_AUDIOS
from bench.fake_vendors import FIXED_AUDIO, PROTOCOLS, make_agent
from bench.loadgen import LoadGenerator
from bench.netio import Reactor, monotonic_ns
from bench.stats import (
    MAX_LOADGEN_CPU_PCT,
    NS_PER_MS,
    cdf_points,
    leg_totals,
    loadgen_validity,
    percentile,
    summarize_ns,
)

REPO = Path(__file__).resolve().parent.parent
AUTH_TOKEN = "bench-auth-token-0123456789"
ADMIN_KEY = "bench-admin-key-0123456789"
AGENT_KEY = "sk-bench"


@dataclass
class Timings:
    settle_s: float = 0.5
    window_s: float = 3.0
    barge_s: float = 0.6
    drain_s: float = 2.0  # max wait for the target to close every call after hang-up
    release_s: float = 1.5  # max wait for fds to return to the baseline after that
    ramp_timeout_s: float = 60.0
    # Downlink frames sent in the window's last ``loss_grace_s`` may legitimately be
    # dropped by the barge-in ``clear`` that follows, so they are not counted as lost.
    loss_grace_s: float = 0.5
    # Callers arriving per second during the ramp; 0 = as fast as the generator's
    # concurrent webhooks allow (hundreds a second). Admission runs use a rate: a real
    # number sees callers arrive over seconds, not all in one.
    arrival_rate: float = 0.0


QUICK = Timings()
FULL = Timings(settle_s=2.0, window_s=15.0, ramp_timeout_s=180.0, drain_s=3.0, release_s=3.0)


class Progress:
    """One status line on stderr (rewritten in place on a terminal)."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.prefix = ""
        self._last = 0.0
        self._width = 0

    def update(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < (0.25 if self.tty else 5.0):
            return
        self._last = now
        line = f"{self.prefix} {text}".strip()
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


class ProcSampler:
    """CPU, RSS and fds of the target process (and its children)."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.proc = psutil.Process(pid)

    def _tree(self) -> list:
        procs = [self.proc]
        with contextlib.suppress(Exception):
            procs += self.proc.children(recursive=True)
        return procs

    def cpu_s(self) -> float:
        total = 0.0
        for p in self._tree():
            with contextlib.suppress(Exception):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def rss(self) -> int:
        return sum(_safe(lambda p=p: p.memory_info().rss, 0) for p in self._tree())

    def fds(self) -> int:
        return sum(_safe(lambda p=p: p.num_fds(), 0) for p in self._tree())

    def threads(self) -> int:
        return sum(_safe(lambda p=p: p.num_threads(), 0) for p in self._tree())


def _safe(fn: Callable, default):
    try:
        return fn()
    except Exception:
        return default


# -- one measured session ---------------------------------------------------------------


def _set_recording(gen: LoadGenerator, agent: FakeAgent, on: bool) -> None:
    for ticker in (gen.media_ticker, agent.ticker):
        ticker.record = on
        if on:
            ticker.lateness.clear()


def run_session(
    reactor: Reactor,
    gen: LoadGenerator,
    agent: FakeAgent,
    n: int,
    timings: Timings,
    sampler: ProcSampler | None = None,
    progress: Progress | None = None,
    cores: tuple[int | None, int | None] | None = None,
) -> dict:
    """Drive ``n`` calls through ramp, window, barge-in and hang-up; return raw results."""
    prog = progress.update if progress else (lambda *_a, **_k: None)
    t0 = monotonic_ns()
    gen.add_calls(n)
    ramp_end = t0 + int(timings.ramp_timeout_s * 1e9)
    while not gen.settled and monotonic_ns() < ramp_end:
        reactor.run(until_ns=min(ramp_end, monotonic_ns() + 250_000_000), stop=lambda: gen.settled)
        prog(f"ramp {gen.established}/{n} up, {gen.failed} failed")
    ramp_s = (monotonic_ns() - t0) / 1e9
    # No cyclic GC from here to the window's end: a full collection pauses the loop for
    # milliseconds, which would show up as relay latency. Per-message garbage is acyclic.
    gc.collect()
    gc.freeze()
    gc.disable()
    reactor.run(until_ns=monotonic_ns() + int(timings.settle_s * 1e9))

    # -- steady-state window -------------------------------------------------------
    # Sample first (reading /proc takes a few ms, during which the loop stands still),
    # then let that pause drain before frames start to count.
    cpu0 = sampler.cpu_s() if sampler else None
    busy0 = _core_busy()
    times0 = os.times()
    self0 = time.process_time_ns()
    t_sampled = monotonic_ns()
    reactor.run(until_ns=t_sampled + 50_000_000)
    w = gen.window
    w0 = monotonic_ns()
    w.start, w.end = w0, w0 + int(timings.window_s * 1e9)
    _set_recording(gen, agent, True)
    while monotonic_ns() < w.end:
        reactor.run(until_ns=min(w.end, monotonic_ns() + 250_000_000))
        done = (monotonic_ns() - w0) / 1e9
        prog(f"steady {done:4.1f}/{timings.window_s:.0f}s, {gen.open_calls} calls")
    _set_recording(gen, agent, False)
    w1 = w.end  # frames are accounted against the planned window, CPU against elapsed time
    elapsed_ns = monotonic_ns() - t_sampled
    self_cpu_ns = time.process_time_ns() - self0
    times1 = os.times()
    self_sys_s = times1.system - times0.system
    cpu1 = sampler.cpu_s() if sampler else None
    busy1 = _core_busy()
    rss_loaded = sampler.rss() if sampler else None
    gc.enable()
    gc.unfreeze()
    lateness = sorted(gen.media_ticker.lateness + agent.ticker.lateness)

    # -- barge-in on every call ------------------------------------------------------
    live = gen.live_calls()
    spread = int(0.2e9)
    for i, call in enumerate(live):
        reactor.call_at(w1 + spread * i // max(1, len(live)), call.agent.barge_in)
    prog("barge-in", force=True)
    reactor.run(until_ns=w1 + int(timings.barge_s * 1e9))

    # -- hang up ---------------------------------------------------------------------
    gen.stop_all(spread_s=0.2)
    t_stop = monotonic_ns()
    drain_end = t_stop + int(timings.drain_s * 1e9)
    reactor.run(until_ns=t_stop + int(0.25e9))
    reactor.run(until_ns=drain_end, stop=gen.all_closed)
    # Agent sessions the target keeps open after the caller hung up are a finding, not
    # something to wait for: give them a short grace, then count them.
    grace_end = min(drain_end, monotonic_ns() + int(0.5e9))
    reactor.run(until_ns=grace_end, stop=lambda: agent.sessions_open == 0)
    prog("hang-up done", force=True)

    window_s = elapsed_ns / 1e9
    relay = {"cpu_s": None if cpu0 is None else cpu1 - cpu0, "rss_loaded": rss_loaded}
    result = _collect(
        gen, agent, n, w0, w1, timings, window_s, ramp_s, self_cpu_ns, lateness, relay
    )
    # Kernel share of the generator's CPU: loopback sends run the receiver's TCP input
    # path in the sender's context, so syscalls, not Python, are most of its cost.
    result["loadgen"]["system_pct_of_core"] = round(100 * self_sys_s / window_s, 1)
    result["interference"] = _interference(
        busy0, busy1, cores, window_s, relay["cpu_s"], self_cpu_ns / 1e9
    )
    return result


def _core_busy() -> list[float] | None:
    """Busy seconds per CPU (all processes), to spot other work on our cores."""
    try:
        import psutil

        # Not irq/softirq: loopback TCP work that runs in softirq context (delayed ACKs,
        # timers, a segment processed while the core was idle) is our own traffic but is
        # charged to no process, so counting it would flag every busy run as noisy.
        return [t.user + t.nice + t.system for t in psutil.cpu_times(percpu=True)]
    except Exception:
        return None


# Other processes using more than this share of a pinned core make the run noisy: the
# relay or the generator was descheduled for part of the window.
NOISY_PCT = 15.0


def _interference(busy0, busy1, cores, window_s, relay_cpu_s, load_cpu_s) -> dict:
    """CPU used on the relay core and the load core by processes other than ours."""
    out: dict = {}
    if not busy0 or not busy1 or not cores or None in cores:
        return out
    relay_core, load_core = cores
    used = {
        "relay_core_other_pct": (busy1[relay_core] - busy0[relay_core]) - (relay_cpu_s or 0.0),
        "load_core_other_pct": (busy1[load_core] - busy0[load_core]) - load_cpu_s,
    }
    for key, sec in used.items():
        out[key] = round(max(0.0, 100 * sec / window_s), 1)
    out["noisy"] = any(v > NOISY_PCT for v in out.values())
    return out


def _collect(gen, agent, n, w0, w1, timings, window_s, ramp_s, self_cpu_ns, lateness, relay):
    calls = [c for c in gen.calls if c is not None]
    live = [c for c in calls if c.agent is not None]
    grace = int(timings.loss_grace_s * 1e9)
    up = summarize_ns(gen.up_lat) | leg_totals((c.up for c in live), w0, w1)
    # Audio still queued in the target when the barge-in clear arrives is legitimately
    # discarded, so the downlink loss check stops well before the window's end: at least
    # ``loss_grace_s``, more for a target that holds audio longer than that.
    down_p99 = percentile(sorted(gen.down_lat), 99) or 0
    grace = max(grace, int(down_p99 * 1.5) + 100 * NS_PER_MS)
    down = summarize_ns(gen.down_lat) | leg_totals((c.down for c in live), w0, w1 - grace)
    first_audio = [c.t_first_audio - c.t_start for c in live if c.t_first_audio and c.t_start]
    barge = [c.t_clear - c.t_barge for c in live if c.t_barge and c.t_clear]
    cpu_pct = 100.0 * self_cpu_ns / max(1.0, window_s * 1e9)
    late_p99 = percentile(lateness, 99)
    valid, reasons = loadgen_validity(cpu_pct, None if late_p99 is None else late_p99 / NS_PER_MS)
    return {
        "n": n,
        "established": gen.established,
        "failed_calls": gen.failed,
        "refused_calls": gen.refused,
        "dropped_calls": gen.dropped,
        "failures": gen.failures[:10],
        "ramp_s": round(ramp_s, 2),
        "window_s": round(window_s, 2),
        "uplink": up,
        "downlink": down,
        "start_to_first_audio": summarize_ns(first_audio),
        "bargein_to_clear": summarize_ns(barge)
        | {"missing": sum(1 for c in live if c.t_barge and not c.t_clear)},
        "twilio_side": {
            "protocol_errors": sum(c.proto_errors for c in calls),
            "misrouted_frames": sum(c.misrouted for c in calls),
            "marks_echoed": sum(c.marks_echoed for c in calls),
            "clears": sum(c.clears for c in calls),
            "media_messages": sum(c.media_msgs for c in calls),
            "calls_still_open": sum(1 for c in calls if not c.closed),
        },
        "agent": agent.stats(),
        "loadgen": {
            "cpu_pct_of_core": round(cpu_pct, 1),
            "cpu_us_per_call_s": round(cpu_pct * 1e4 / max(1, len(live)), 1),
            "timer_late_p50_ms": _ms(percentile(lateness, 50)),
            "timer_late_p99_ms": _ms(late_p99),
            "timer_late_max_ms": _ms(lateness[-1] if lateness else None),
            "valid": valid,
            "invalid_reasons": reasons,
        },
        "relay_raw": relay,
        "cdf": {"uplink": cdf_points(gen.up_lat), "downlink": cdf_points(gen.down_lat)},
    }


def _ms(v):
    return None if v is None else round(v / NS_PER_MS, 3)


# -- targets ----------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    label: str
    audios: tuple[str, ...]
    webhook_path: str
    health_path: str
    command: Callable[[int, str, str, Path], list[str]]
    available: Callable[[], str | None]  # None when runnable, else why not
    notes: str = ""
    env: dict[str, str] = field(default_factory=dict)
    #: the agent protocol behind the target (relay variants: see ``agent_variant``)
    agent: str = "openai"
    #: the target this one is a variant of ("" for the registered targets themselves)
    base: str = ""

    @property
    def base_name(self) -> str:
        return self.base or self.name


def _relay_available() -> str | None:
    if (
        not (REPO / "relay" / "http" / "server.py").exists()
        or not (REPO / "relay" / "cli.py").exists()
    ):
        return "relay serve does not exist yet (relay/http/server.py, relay/cli.py missing)"
    if not (REPO / "relay" / "agents" / "openai.py").exists():
        return "relay has no OpenAI agent adapter yet (relay/agents/openai.py)"
    return None


#: set by run_suite while a relay-pg run needs it (a throwaway server, bench/_pg())
PG_URL: list[str] = []


def _store_url(store: str, tmp: Path) -> str:
    """The control-plane store a relay target runs with: the shipped default (an SQLite file,
    here in the run's own temporary folder), PostgreSQL, or none (in-memory records)."""
    if store == "sqlite":
        return f"sqlite:///{tmp}/relay.db"
    if store == "postgresql":
        if not PG_URL:
            raise RuntimeError("relay-pg needs the suite's PostgreSQL server")
        return PG_URL[0]
    return "memory"


def _agent_table(agent: str, agent_url: str, audio: str) -> str:
    """The ``[agents.bench]`` table of relay.toml for one agent protocol (its fake's URL).

    ``warm_start = false``: the generator pairs each agent session with the call whose
    stream is being set up (one at a time, see bench.loadgen), which assumes the session
    opens at the stream's ``start``. Warm start (relay/control/warm.py, on by default) opens
    it at the voice webhook, and webhooks are pipelined, so sessions would be paired with
    the wrong calls (μ-law runs: misrouted and "lost" frames; level-coded runs: frames
    off by 64). Steady-state CPU and latency do not depend on it; ``python -m bench
    warmstart`` measures warm start itself."""
    common = (
        f'url = "{agent_url}"\napi_key = "{AGENT_KEY}"\ninstructions = "benchmark"\n'
        "warm_start = false\n"
    )
    if agent == "openai":
        extra = f'model = "gpt-realtime"\naudio = "{audio}"\napi = "ga"\n'
    elif agent == "elevenlabs":
        extra = 'agent_id = "bench-agent"\n'  # formats come from the agent (ulaw_8000)
    elif agent == "gemini":
        extra = 'model = "models/gemini-live-bench"\n'
    elif agent in ("assemblyai", "deepgram"):
        extra = ""  # μ-law 8 kHz both ways is what these adapters always ask for
    else:
        raise ValueError(f"unknown agent {agent!r}")
    return f'[agents.bench]\ntype = "{agent}"\n{common}{extra}'


def _relay_command(
    port: int,
    agent_url: str,
    audio: str,
    tmp: Path,
    store: str = "sqlite",
    agent: str = "openai",
    admission: bool = False,
) -> list[str]:
    cfg = tmp / "relay.toml"
    cfg.write_text(
        f"""[server]
host = "127.0.0.1"
port = {port}
public_url = "http://127.0.0.1:{port}"
max_calls = 100000
# capacity runs measure what happens past the limit; the relay-admission target turns it on
admission = {"true" if admission else "false"}

[store]
url = "{_store_url(store, tmp)}"

[security]
encryption_key = "{_BENCH_FERNET_KEY}"

[calls]
default_agent = "bench"

{_agent_table(agent, agent_url, audio)}"""
    )
    return [
        sys.executable,
        "-m",
        "relay",
        "--log-level",
        "warning",
        "serve",
        "--workers",
        "1",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--public-url",
        f"http://127.0.0.1:{port}",
        "--config",
        str(cfg),
    ]


def _module_available(mod: str, extra: str) -> Callable[[], str | None]:
    def check() -> str | None:
        import importlib.util

        for m in mod.split(","):
            if importlib.util.find_spec(m) is None:
                return f"{m} not importable ({extra})"
        return None

    return check


def _peer_command(module: str) -> Callable[[int, str, str, Path], list[str]]:
    def cmd(port: int, agent_url: str, audio: str, tmp: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            module,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--agent-url",
            agent_url,
            "--audio",
            audio,
        ]

    return cmd


# a fixed Fernet key (32 zero bytes): the bench's throwaway stores hold no real secret
_BENCH_FERNET_KEY = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


def _pg_available() -> str | None:
    why = _relay_available()
    if why:
        return why
    try:
        _pgserver()._bindir()
    except Exception as exc:
        return str(exc)
    return None


def _pgserver():  # tests/pgserver.py: a throwaway PostgreSQL (initdb + pg_ctl)
    import importlib.util

    spec = importlib.util.spec_from_file_location("relay_pgserver", REPO / "tests" / "pgserver.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TARGETS: dict[str, Target] = {
    "relay": Target(
        "relay",
        "relay (Trio)",
        ("pcmu", "pcm24k"),
        "/twilio/voice",
        "/healthz",
        _relay_command,
        _relay_available,
        notes="signed webhooks and stream upgrades are validated; call history in SQLite "
        "(the default store)",
    ),
    "relay-memory": Target(
        "relay-memory",
        "relay, records in memory",
        ("pcmu", "pcm24k"),
        "/twilio/voice",
        "/healthz",
        partial(_relay_command, store="memory"),
        _relay_available,
        notes="store.url = memory: call records only in the process (no database)",
    ),
    "relay-admission": Target(
        "relay-admission",
        "relay, admission control on",
        ("pcmu", "pcm24k"),
        "/twilio/voice",
        "/healthz",
        partial(_relay_command, admission=True),
        _relay_available,
        notes="relay's default: calls past the worker's headroom are refused at the webhook "
        "(<Reject reason=busy>); offer it more than its capacity",
    ),
    "relay-pg": Target(
        "relay-pg",
        "relay, PostgreSQL store",
        ("pcmu", "pcm24k"),
        "/twilio/voice",
        "/healthz",
        partial(_relay_command, store="postgresql"),
        _pg_available,
        notes="call history in a local PostgreSQL server started for the suite",
    ),
    "fastapi": Target(
        "fastapi",
        "FastAPI+websockets sample",
        ("pcmu",),
        "/incoming-call",
        "/",
        _peer_command("bench.peers.fastapi_relay"),
        _module_available("fastapi,uvicorn,websockets", "pip install fastapi uvicorn websockets"),
        notes="no signature validation (like the sample); μ-law passthrough only",
    ),
    "pipecat": Target(
        "pipecat",
        "Pipecat pipeline",
        ("pcm24k",),
        "/incoming-call",
        "/",
        _peer_command("bench.peers.pipecat_relay"),
        _module_available("pipecat,fastapi,uvicorn", "pip install pipecat-ai fastapi uvicorn"),
        notes="PCM pipeline: always transcodes μ-law 8k <-> PCM; OpenAI audio is PCM 24 kHz",
    ),
    "null": Target(
        "null",
        "null relay (calibration)",
        ("pcmu", "pcm24k"),
        "/twilio/voice",
        "/healthz",
        _peer_command("bench.peers.null_relay"),
        lambda: None,
        notes="bench's own minimal epoll relay: shows the generator's headroom, not a peer",
    ),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pin(cpu: int | None) -> Callable[[], None] | None:
    if cpu is None:
        return None

    def pin() -> None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {cpu})

    return pin


def cpu_plan() -> tuple[int | None, int | None]:
    """(relay core, load core): the first two CPUs this process may use."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return None, None
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


def _wait_ready(proc: subprocess.Popen, port: int, path: str, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    url = f"http://127.0.0.1:{port}{path}"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"target exited with {proc.returncode}: {_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as r:
                r.read()
            return
        except urllib.error.HTTPError:
            return  # it answers HTTP: good enough
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"target not ready on :{port} after {timeout_s:.0f}s: {_tail(log)}")


def _tail(log: Path, n: int = 600) -> str:
    try:
        return log.read_text(errors="replace")[-n:].strip()
    except OSError:
        return ""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=1.5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def relay_metrics(port: int) -> dict[str, float]:
    """Unlabelled relay_* samples from GET /metrics (admin bearer key)."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    out: dict[str, float] = {}
    try:
        with urllib.request.urlopen(req, timeout=2.0) as r:
            text = r.read().decode()
    except OSError:
        return out
    return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled relay_* samples of a Prometheus text exposition, admission control's
    refusals by rule (``relay_admission_refusals_total{rule="cpu"}``) and the collector's
    pauses by generation (``relay_gc_pause_seconds_*{generation="1",...}``: the loop
    stalls a run's tail latency competes with)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("relay_") and (
            "{" not in line
            or line.startswith("relay_admission_refusals_total{")
            or line.startswith("relay_gc_pause_seconds_")
        ):
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value.split()[0])
    return out


def spawn_target(
    target: Target,
    port: int,
    agent_url: str,
    audio: str,
    tmp: Path,
    log: Path,
    relay_cpu: int | None = None,
) -> subprocess.Popen:
    """Start ``target`` on ``port`` (output to ``log``), pinned to ``relay_cpu``; the caller
    waits for it (``_wait_ready``) and stops it (``_stop``). Also used by bench/soak.py."""
    env = (
        os.environ
        | {
            "RELAY_TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "RELAY_SECURITY_ADMIN_KEY": ADMIN_KEY,
            "OPENAI_API_KEY": AGENT_KEY,
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        | target.env
    )
    with open(log, "wb") as logf:
        return subprocess.Popen(
            target.command(port, agent_url, audio, tmp),
            cwd=REPO,
            env=env,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_pin(relay_cpu),
        )


def run_target(
    target: Target,
    audio: str,
    n: int,
    timings: Timings,
    progress: Progress | None = None,
    relay_cpu: int | None = None,
    ready_timeout_s: float = 60.0,
    load_cpu: int | None = None,
) -> dict:
    """One fresh target process, one measured session. Never raises for target errors."""
    result: dict = {"target": target.name, "label": target.label, "audio": audio, "n": n}
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{target.name}-"))
    result["agent_type"] = target.agent
    result["base_target"] = target.base_name
    engine, engine_desc = genfast.load()
    # Kernel arrival stamps (see bench.netio.recv_stamped); BENCH_RX_STAMPS=0 measures at
    # read time instead, which charges the generator's own queueing to the target.
    stamp_rx = os.environ.get("BENCH_RX_STAMPS", "1") != "0"
    # BENCH_GEN_WAIT=timers: the generator sleeps between its timers instead of waiting on
    # its sockets, so a target's sends do not pay to wake it (bench.netio.Reactor).
    waits = gen_waits()
    reactor = Reactor(stamp_rx=stamp_rx, engine=engine, wait_timers=waits == "timers")
    agent = make_agent(reactor, target.agent, audio)
    port = free_port()
    log = tmp / "target.log"
    proc = None
    phases = {"start": time.monotonic()}
    try:
        proc = spawn_target(target, port, agent.url, audio, tmp, log, relay_cpu)
        _wait_ready(proc, port, target.health_path, ready_timeout_s, log)
        phases["ready"] = time.monotonic()
        sampler = ProcSampler(proc.pid)
        cores = (relay_cpu, load_cpu)
        is_relay = target.name.startswith("relay")
        # Let lazily-started work (thread pools, first-request imports) settle first.
        time.sleep(0.3)
        base = {"rss": sampler.rss(), "fds": sampler.fds(), "threads": sampler.threads()}
        base_metrics = relay_metrics(port) if is_relay else {}
        gen = LoadGenerator(
            reactor,
            f"http://127.0.0.1:{port}",
            AUTH_TOKEN,
            webhook_path=target.webhook_path,
            passthrough=(audio == "pcmu"),
            arrival_rate=timings.arrival_rate,
        )
        agent.claim_fn = gen.claim_session
        agent.calls = gen.calls
        raw = run_session(reactor, gen, agent, n, timings, sampler, progress, cores)
        raw["loadgen"]["engine"] = engine_desc
        # bench._genfast.AgentReader parses OpenAI appends only; other vendors' fakes read
        # through bench.netio's Python path (more generator CPU, same relay work).
        raw["loadgen"]["agent_reader"] = (
            "compiled" if engine is not None and target.agent == "openai" else "pure Python"
        )
        raw["loadgen"]["rx_stamps"] = "kernel" if stamp_rx else "read time"
        raw["loadgen"]["waits_on"] = waits
        phases["session"] = time.monotonic()
        after = _settle_after(reactor, sampler, base["fds"], timings.release_s)
        after_metrics = relay_metrics(port) if is_relay else {}
        raw["agent"]["sessions_open_after"] = agent.sessions_open
        result |= raw
        result["relay"] = _relay_figures(raw, base, after, n, base_metrics, after_metrics)
        if proc.poll() is not None:
            result["error"] = f"target exited during the run ({proc.returncode}): {_tail(log)}"
    except Exception as exc:  # a broken target is a result, not a crash of the suite
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-3000:]
    finally:
        phases["released"] = time.monotonic()
        if proc is not None:
            _stop(proc)
        phases["stopped"] = time.monotonic()
        t0 = phases.pop("start")
        result["phase_end_s"] = {k: round(v - t0, 2) for k, v in phases.items()}
        result["target_log_tail"] = _tail(log, 400) if "error" in result else ""
        reactor.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def wait_quiet(cores: tuple[int | None, int | None], max_wait_s: float, limit_pct: float = 15.0):
    """Wait (bounded) until other processes leave our two cores mostly idle.

    The machine may be shared; a run started while something else is busy on the relay
    core or the load core measures that something else. Returns the busy % last seen.
    """
    if None in cores or max_wait_s <= 0:
        return None
    deadline = time.monotonic() + max_wait_s
    while True:
        b0 = _core_busy()
        time.sleep(0.3)
        b1 = _core_busy()
        if not b0 or not b1:
            return None
        busy = max(100 * (b1[c] - b0[c]) / 0.3 for c in cores)
        if busy < limit_pct or time.monotonic() >= deadline:
            return round(busy, 1)


def _settle_after(reactor: Reactor, sampler: ProcSampler, base_fds: int, max_s: float) -> dict:
    """Give the target up to ``max_s`` to release per-call resources, then sample."""
    end = monotonic_ns() + int(max_s * 1e9)
    fds = sampler.fds()
    while fds > base_fds and monotonic_ns() < end:
        reactor.run(until_ns=monotonic_ns() + 100_000_000)
        fds = sampler.fds()
    return {"rss": sampler.rss(), "fds": fds, "threads": sampler.threads()}


def _relay_figures(raw, base, after, n, base_metrics, after_metrics) -> dict:
    cpu_s = raw["relay_raw"]["cpu_s"]
    window_s = raw["window_s"]
    live = raw["established"] - raw["dropped_calls"]
    out = {
        "cpu_pct_of_core": None if cpu_s is None else round(100 * cpu_s / window_s, 1),
        "cpu_us_per_call_s": None
        if cpu_s is None or not live
        else round(cpu_s * 1e6 / (live * window_s), 1),
        "rss_base_mib": round(base["rss"] / 2**20, 1),
        "rss_loaded_mib": round(raw["relay_raw"]["rss_loaded"] / 2**20, 1),
        "rss_per_call_kib": round((raw["relay_raw"]["rss_loaded"] - base["rss"]) / 1024 / n, 1)
        if n
        else None,
        "fds_before": base["fds"],
        "fds_after": after["fds"],
        "fds_leaked": after["fds"] - base["fds"],
        "threads_before": base["threads"],
        "threads_after": after["threads"],
    }
    if base_metrics or after_metrics:
        out["metrics_before"] = base_metrics
        out["metrics_after"] = after_metrics
        out["active_calls_after"] = after_metrics.get("relay_active_calls")
    return out


# -- verdicts and capacity search --------------------------------------------------------


def verdict(result: dict, limit_ms: float) -> str:
    """'pass', 'fail' or 'invalid' (generator-limited or broken run)."""
    if result.get("error"):
        return "fail"
    if not result["loadgen"]["valid"]:
        return "invalid"
    if result["failed_calls"] or result["dropped_calls"]:
        return "fail"
    for leg in ("uplink", "downlink"):
        r = result[leg]
        if not r["count"] or r["lost"] or r["p99_ms"] is None or r["p99_ms"] >= limit_ms:
            return "fail"
    return "pass"


K = TypeVar("K", bound=Hashable)

LADDER = (50, 100, 200, 300, 400, 600, 800, 1000)


def capacity_steps(
    limit_ms: float = 20.0,
    ladder: tuple[int, ...] = LADDER,
    resolution: float = 0.08,
) -> Generator[int, dict, dict]:
    """Largest N whose run passes at ``limit_ms``: step up the ladder, then bisect.

    A generator, so that several searches can take turns (``interleaved_capacity``): it
    yields the N to run next, is sent that run's result, and returns the summary.

    Assumes monotonicity (more calls never improve latency). An INVALID run (the generator
    itself saturated, or a disturbed run) is an upper bound like a failing one: the search
    bisects below it to the largest N the generator can still drive, and when that bound
    is what stopped it the capacity is reported as a lower bound (``bounded_by`` says why,
    ``first_failing`` is None).
    """
    runs: list[dict] = []
    lo, hi, bound = 0, None, "ladder top"
    for n in ladder:
        r = yield n
        runs.append(r)
        v = verdict(r, limit_ms)
        if v == "pass":
            lo = n
            continue
        hi, bound = n, "latency/loss" if v == "fail" else _invalid_bound(r)
        break
    while hi is not None and hi - lo > max(10, int(lo * resolution)):
        mid = (lo + hi) // 2 // 10 * 10 or (lo + hi) // 2
        if mid in (lo, hi):
            break
        r = yield mid
        runs.append(r)
        v = verdict(r, limit_ms)
        if v == "pass":
            lo = mid
        else:
            hi, bound = mid, "latency/loss" if v == "fail" else _invalid_bound(r)
    at5 = max((r["n"] for r in runs if verdict(r, 5.0) == "pass"), default=0)
    return {
        "limit_ms": limit_ms,
        "calls": lo,
        "first_failing": hi if bound == "latency/loss" else None,
        "bounded_by": bound,
        "calls_at_p99_le_5ms_among_runs": at5,
        "runs": runs,
    }


def capacity_search(
    run: Callable[[int], dict],
    limit_ms: float = 20.0,
    ladder: tuple[int, ...] = LADDER,
    resolution: float = 0.08,
) -> dict:
    """One search on its own (see ``capacity_steps``)."""
    return interleaved_capacity({"": (run, capacity_steps(limit_ms, ladder, resolution))})[""]


def interleaved_capacity(
    searches: dict[K, tuple[Callable[[int], dict], Generator[int, dict, dict]]],
) -> dict[K, dict]:
    """Run several capacity searches side by side: one step of each per round, the order
    rotating from round to round. Run one after another, the searches of a full suite
    were minutes apart, and this VM's speed drifts by ±20 % over minutes, which moved
    the PCM / μ-law and relay / peer capacity ratios as much as any change did. Results
    come back in the order of ``searches``."""
    pending: dict[K, int] = {}
    for key, (_run, steps) in searches.items():
        pending[key] = next(steps)
    found: dict[K, dict] = {}
    round_no = 0
    while pending:
        keys = list(pending)
        shift = round_no % len(keys)
        for key in keys[shift:] + keys[:shift]:
            run, steps = searches[key]
            try:
                pending[key] = steps.send(run(pending[key]))
            except StopIteration as done:
                del pending[key]
                found[key] = done.value
        round_no += 1
    return {key: found[key] for key in searches}


def _invalid_bound(r: dict) -> str:
    """Why an INVALID run ended the search: a saturated generator, or a disturbed run."""
    if r["loadgen"].get("cpu_pct_of_core", 0) > MAX_LOADGEN_CPU_PCT:
        return "load generator (saturated)"
    return "invalid run (generator behind schedule; machine busy?)"


# -- the suite -----------------------------------------------------------------------------

QUICK_PLAN: dict[tuple[str, str], tuple[int, ...]] = {
    ("relay", "pcmu"): (50, 200),
    ("relay", "pcm24k"): (50, 200),
    ("relay-memory", "pcmu"): (50, 200),
    ("relay-memory", "pcm24k"): (50, 200),
    ("relay-pg", "pcmu"): (50, 200),
    ("relay-pg", "pcm24k"): (50, 200),
    ("fastapi", "pcmu"): (50, 200),
    ("pipecat", "pcm24k"): (50,),
}
FULL_LADDERS: dict[str, tuple[int, ...]] = {
    "pipecat": (10, 25, 50, 100, 150, 200, 300, 400),
}


def gen_waits() -> str:
    """What the generator waits on between timers: ``sockets`` (default) or ``timers``
    (``BENCH_GEN_WAIT``; see bench.netio.Reactor's ``wait_timers``)."""
    waits = os.environ.get("BENCH_GEN_WAIT", "sockets")
    if waits not in ("sockets", "timers"):
        raise SystemExit(f"BENCH_GEN_WAIT must be 'sockets' or 'timers', not {waits!r}")
    return waits


@dataclass
class SuiteOptions:
    mode: str = "quick"  # "quick" or "full"
    targets: tuple[str, ...] = ("relay", "fastapi", "pipecat")
    audios: tuple[str, ...] = ("pcmu", "pcm24k")
    ns: tuple[int, ...] | None = None  # override the plan's N values (quick) / ladder (full)
    timings: Timings | None = None
    pin: bool = True
    quiet_wait_s: float = 2.0
    limit_ms: float = 20.0
    # Re-run (once, after waiting for idle cores) a run that other processes disturbed:
    # on a shared machine one noisy run would otherwise end a capacity search early.
    retry_noisy: bool = False
    #: quick mode: run every (target, N) this many times, interleaved (medians reported)
    repeat: int = 1
    #: agent protocols behind the relay targets (``--agents``): each one is its own target
    #: variant, ``relay[gemini]`` etc. (OpenAI keeps the plain name); peers speak OpenAI only
    agents: tuple[str, ...] = ("openai",)


AGENTS = PROTOCOLS


def agent_variant(target: Target, agent: str) -> Target:
    """``target`` (a relay target) with the ``agent`` adapter behind it: its relay.toml
    names that agent type and the run puts that vendor's fake on the agent side."""
    if agent == "openai":
        return target
    if agent not in AGENT_AUDIOS:
        raise ValueError(f"unknown agent {agent!r} (known: {', '.join(AGENTS)})")
    fixed = FIXED_AUDIO.get(agent)
    audios = (fixed,) if fixed else tuple(a for a in AGENT_AUDIOS[agent] if a in target.audios)
    how = (
        "PCM16 16 kHz up / 24 kHz down, resampled both ways"
        if agent in FIXED_AUDIO
        else "μ-law passthrough both ways"
    )
    return replace(
        target,
        name=f"{target.name}[{agent}]",
        label=f"{target.label}, {agent} adapter",
        audios=audios,
        command=partial(target.command, agent=agent),
        notes=f"{target.notes}; {agent} adapter against bench/fake_vendors.py ({how})",
        agent=agent,
        base=target.name,
    )


def plan(opts: SuiteOptions) -> tuple[list[tuple[Target, str]], list[str]]:
    """(target, audio) pairs to run, and why any requested ones are skipped.

    With several ``agents``, every relay target runs once per agent protocol (agents
    vary fastest, so ``--repeat`` rounds interleave them). A vendor with one fixed audio
    mode (Gemini: ``pcm16k``) runs in it whatever ``audios`` asks for."""
    pairs: list[tuple[Target, str]] = []
    skipped: list[str] = []
    for agent in opts.agents:
        if agent not in AGENT_AUDIOS:
            skipped.append(f"{agent}: unknown agent (known: {', '.join(AGENTS)})")
    agents = [a for a in opts.agents if a in AGENT_AUDIOS] or ["openai"]
    for name in opts.targets:
        target = TARGETS.get(name)
        if target is None:
            skipped.append(f"{name}: unknown target (known: {', '.join(TARGETS)})")
            continue
        why = target.available()
        if why:
            skipped.append(f"{name}: skipped: {why}")
            continue
        if not name.startswith("relay"):
            if "openai" not in agents:
                skipped.append(f"{name}: skipped: speaks only the OpenAI Realtime protocol")
                continue
            for audio in opts.audios:
                if audio in target.audios:
                    pairs.append((target, audio))
            continue
        for audio in opts.audios:
            for agent in agents:
                variant = agent_variant(target, agent)
                if agent in FIXED_AUDIO:
                    # one mode only: run it once, with the first requested audio
                    if audio == opts.audios[0]:
                        pairs.append((variant, FIXED_AUDIO[agent]))
                elif audio in variant.audios:
                    pairs.append((variant, audio))
                elif audio in target.audios:
                    skipped.append(
                        f"{variant.name}/{audio}: skipped: the {agent} fake is μ-law only"
                    )
    return pairs, skipped


def run_suite(opts: SuiteOptions, progress: Progress | None = None) -> dict:
    """Run the plan; returns everything the report needs (JSON-serialisable)."""
    timings = opts.timings or (FULL if opts.mode == "full" else QUICK)
    relay_cpu, load_cpu = cpu_plan() if opts.pin else (None, None)
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})
    pairs, skipped = plan(opts)
    progress = progress or Progress()
    t0 = time.monotonic()
    runs: list[dict] = []
    capacity: dict[str, dict] = {}

    def one(target: Target, audio: str, n: int) -> dict:
        progress.prefix = f"[{len(runs) + 1}] {target.name} {audio} N={n}:"
        busy = wait_quiet((relay_cpu, load_cpu), opts.quiet_wait_s)
        r = run_target(target, audio, n, timings, progress, relay_cpu, load_cpu=load_cpu)
        r["busy_before_pct"] = busy
        if opts.retry_noisy and _disturbed(r):
            progress.update(
                "disturbed by other processes: waiting for idle cores, retrying", force=True
            )
            busy = wait_quiet((relay_cpu, load_cpu), max(30.0, opts.quiet_wait_s))
            first = {k: r.get(k) for k in ("interference", "loadgen")}
            r = run_target(target, audio, n, timings, progress, relay_cpu, load_cpu=load_cpu)
            r["busy_before_pct"] = busy
            r["first_attempt"] = first
        runs.append(r)
        progress.update(_run_line(r), force=True)
        return r

    pg = contextlib.ExitStack()
    if any(target.base_name == "relay-pg" for target, _ in pairs):
        PG_URL[:] = [pg.enter_context(_pgserver().postgres_server())]
    with pg:
        _run_pairs(opts, pairs, one, capacity)
    PG_URL.clear()
    progress.done()
    return {
        "mode": opts.mode,
        "timings": timings.__dict__,
        "cores": {"relay": relay_cpu, "load": load_cpu, "online": os.cpu_count()},
        "skipped": skipped,
        "targets": {
            t.name: {"label": t.label, "notes": t.notes}
            for t in [*TARGETS.values(), *(t for t, _ in pairs if t.base)]
        },
        "agents": list(opts.agents),
        "runs": runs,
        "capacity": capacity,
        "repeat": opts.repeat,
        "elapsed_s": round(time.monotonic() - t0, 1),
    }


def _run_pairs(
    opts: SuiteOptions,
    pairs: list[tuple[Target, str]],
    one: Callable[[Target, str, int], dict],
    capacity: dict[str, dict],
) -> None:
    if opts.mode != "full" and opts.repeat > 1:
        # Side by side: every round runs each target once per N, the order rotating from
        # round to round, so slow drifts of a shared machine hit every target alike.
        for round_no in range(opts.repeat):
            shift = round_no % len(pairs)
            for target, audio in pairs[shift:] + pairs[:shift]:
                for n in opts.ns or QUICK_PLAN.get((target.base_name, audio), (50, 200)):
                    one(target, audio, n)
        return
    if opts.mode == "full":
        searches = {
            f"{target.name}/{audio}": (
                lambda n, t=target, a=audio: one(t, a, n),
                capacity_steps(
                    opts.limit_ms, opts.ns or FULL_LADDERS.get(target.base_name, LADDER)
                ),
            )
            for target, audio in pairs
        }
        for key, found in interleaved_capacity(searches).items():
            found["runs"] = [r["n"] for r in found["runs"]]  # the runs are kept in `runs`
            capacity[key] = found
        return
    for target, audio in pairs:
        for n in opts.ns or QUICK_PLAN.get((target.base_name, audio), (50, 200)):
            one(target, audio, n)


def _disturbed(r: dict) -> bool:
    """Noisy (other processes on our cores), or late without being saturated."""
    if r.get("error"):
        return False
    gen = r["loadgen"]
    late_only = not gen["valid"] and gen["cpu_pct_of_core"] <= MAX_LOADGEN_CPU_PCT
    return bool(r.get("interference", {}).get("noisy")) or late_only


def _run_line(r: dict) -> str:
    if r.get("error"):
        return f"ERROR {r['error'][:100]}"
    up, down = r["uplink"], r["downlink"]
    return (
        f"up p99 {up['p99_ms']} ms, down p99 {down['p99_ms']} ms, "
        f"relay {r['relay']['cpu_pct_of_core']}% core"
    )
