"""``python -m bench soak``: hold ~N calls up for a long time and watch for leaks.

    python -m bench soak --minutes 60                      # 80 % of the published capacity
    python -m bench soak --minutes 60 --fraction 0.8 --capacity 200
    python -m bench soak --minutes 1 --calls 20            # a quick check
    python -m bench soak --minutes 60 --calls 160 --target relay-pg

One fresh relay process (started like ``bench load`` does it: bench.harness.spawn_target,
pinned to the relay core), the load generator and the fake agent in this process on the
load core. ~N calls are kept up for the whole run: each lasts a random 20-120 s, and a new
one is started as soon as one ends, so calls start and end throughout (never one cohort).
Both legs carry audio: μ-law passthrough, 20 ms frames up, 100 ms agent deltas down, every
frame marked (see bench.stats), so latency and loss are measured per frame.

Every ``--window`` seconds (10) one sample: relay RSS (``/proc/PID/status`` VmRSS), CPU %
of one core (``/proc/PID/stat`` utime+stime), open descriptors (``/proc/PID/fd``), threads,
``relay_active_calls`` and ``relay_trio_tasks`` (``GET /metrics``, fetched without blocking
the generator), per-frame latency p50/p99/max of each leg for frames received in the
window, the generator's own CPU and timer lateness. Frames sent / received / lost are
counted by the window a frame was *sent* in, once its call has ended (a frame still in
flight is not lost); frames sent in the last ``LOSS_GRACE_S`` before a call's hang-up are
not checked (the hang-up legitimately cuts them off), nor uplink frames sent before the
call's agent session existed (counted apart as ``pre_session``).

At the end no new calls are started, the running ones end on their own, and after
``--settle`` seconds (10) the relay is sampled again: descriptors, tasks, threads and
active calls are compared with the baseline taken before the first call; RSS growth is
the loaded RSS at the end of the run minus the loaded RSS at the reference window: the
first after one minute (half the run when it is shorter than two minutes) by which as many
calls have ended as the relay keeps records of in memory (``calls.records_kept``, 1,000:
a bounded cache of ~20 KB per record that fills during the first minutes of a churning
run and is not a leak). The growth from the first minute is reported too.

Results: a table on stdout, ``bench/results/soak.json`` (every window and the summary)
and ``bench/results/soak.png`` (RSS, CPU and p99 over time; needs matplotlib).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import gc
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from bench import genfast
from bench.fake_vendors import make_agent
from bench.harness import (
    ADMIN_KEY,
    AUTH_TOKEN,
    PG_URL,
    TARGETS,
    Progress,
    _pgserver,
    _set_recording,
    _stop,
    _tail,
    _wait_ready,
    cpu_plan,
    free_port,
    parse_metrics,
    relay_metrics,
    spawn_target,
)
from bench.loadgen import LoadGenerator, TwilioCall
from bench.netio import HttpRequest, Reactor, monotonic_ns
from bench.report import save_json
from bench.stats import NS_PER_MS, percentile

RESULTS = Path(__file__).resolve().parent / "results"
PUBLISHED = Path(__file__).resolve().parent / "published" / "load-full.json"
SOAK_TARGETS = ("relay", "relay-memory", "relay-pg")
LEGS = ("uplink", "downlink")
#: the frame marker's call id is 16 bits (bench.stats.HEADER): calls per run are capped
MAX_CALL_IDS = 65_535
#: frames sent this close to a call's hang-up are not checked for loss
LOSS_GRACE_S = 1.0
#: a call's frames are accounted this long after its stream closed (stragglers)
ACCOUNT_DELAY_S = 1.0
#: issue 10's figure for a one-hour soak
RSS_GROWTH_LIMIT_MIB = 5.0
#: the relay keeps the records of its last calls in memory (calls.records_kept; the bench's
#: relay config keeps the default): RSS is compared once that cache is full
RECORDS_KEPT = 1000
MIB = 2**20


# -- /proc readers (pure parsers + a process-tree sampler) ---------------------------------


def parse_status(text: str) -> dict[str, int]:
    """``rss`` (bytes, from VmRSS) and ``threads`` of a ``/proc/PID/status`` text."""
    out = {"rss": 0, "threads": 0}
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            out["rss"] = int(line.split()[1]) * 1024  # the kernel reports kB
        elif line.startswith("Threads:"):
            out["threads"] = int(line.split()[1])
    return out


def parse_cpu_ticks(text: str) -> int:
    """utime + stime (clock ticks) of a ``/proc/PID/stat`` line.

    Fields are counted after the last ``)``: the command name may contain spaces and
    parentheses. utime and stime are fields 14 and 15, i.e. the 12th and 13th after it.
    """
    fields = text.rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


class ProcTree:
    """RSS, CPU seconds, descriptors and threads of a process and its descendants."""

    def __init__(self, pid: int, proc_root: str = "/proc") -> None:
        self.pid = pid
        self.root = proc_root
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def pids(self) -> list[int]:
        out = [self.pid]
        i = 0
        while i < len(out):
            pid = out[i]
            i += 1
            with contextlib.suppress(OSError):
                for tid in os.listdir(f"{self.root}/{pid}/task"):
                    with contextlib.suppress(OSError):
                        with open(f"{self.root}/{pid}/task/{tid}/children") as f:
                            out += [int(x) for x in f.read().split()]
        return out

    def sample(self) -> dict:
        rss = threads = fds = ticks = 0
        for pid in self.pids():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"{self.root}/{pid}/status") as f:
                    st = parse_status(f.read())
                with open(f"{self.root}/{pid}/stat") as f:
                    ticks += parse_cpu_ticks(f.read())
                fds += len(os.listdir(f"{self.root}/{pid}/fd"))
                rss += st["rss"]
                threads += st["threads"]
        return {"rss": rss, "cpu_s": ticks / self.tick, "fds": fds, "threads": threads}


# -- pure statistics ---------------------------------------------------------------------


def latency_stats(samples_ns: Sequence[int]) -> dict:
    """count, p50, p99 and max (ms) of one window's latency samples."""
    vals = sorted(samples_ns)
    out: dict = {"count": len(vals)}
    for key, p in (("p50_ms", 50), ("p99_ms", 99)):
        v = percentile(vals, p)
        out[key] = None if v is None else round(v / NS_PER_MS, 3)
    out["max_ms"] = round(vals[-1] / NS_PER_MS, 3) if vals else None
    return out


def _leg_totals() -> dict:
    return {
        "checked": 0,
        "received": 0,
        "lost": 0,
        "pre_session": 0,
        "pre_session_lost": 0,
        "near_hangup": 0,
        "duplicated": 0,
        "reordered": 0,
        "unknown": 0,
    }


class FrameBook:
    """Frames sent / received / lost per window (by send time), filled as calls end."""

    def __init__(self, t0_ns: int, window_ns: int) -> None:
        self.t0 = t0_ns
        self.window_ns = window_ns
        #: window index -> leg -> [sent, lost]
        self.buckets: dict[int, dict[str, list[int]]] = {}
        self.totals = {leg: _leg_totals() for leg in LEGS}

    def add(
        self,
        leg: str,
        send_times: Sequence[int],
        seen: bytearray,
        lo: int,
        hi: int,
        dups: int = 0,
        reorders: int = 0,
        bogus: int = 0,
    ) -> None:
        """Account one call's leg: frames sent in ``[lo, hi)`` are checked (``send_times``
        ascending, ``seen[i]`` nonzero once frame ``i`` arrived); earlier ones are
        ``pre_session``, later ones ``near_hangup``."""
        tot = self.totals[leg]
        n = min(len(send_times), len(seen))
        i = bisect.bisect_left(send_times, lo, 0, n)
        end = max(i, bisect.bisect_left(send_times, hi, 0, n))
        tot["pre_session"] += i
        tot["pre_session_lost"] += seen.count(0, 0, i)
        tot["near_hangup"] += n - end
        tot["duplicated"] += dups
        tot["reordered"] += reorders
        tot["unknown"] += bogus
        while i < end:
            w = max(0, (send_times[i] - self.t0) // self.window_ns)
            j = bisect.bisect_left(send_times, self.t0 + (w + 1) * self.window_ns, i, end)
            j = max(j, i + 1)
            lost = seen.count(0, i, j)
            bucket = self.buckets.setdefault(w, {name: [0, 0] for name in LEGS})[leg]
            bucket[0] += j - i
            bucket[1] += lost
            tot["checked"] += j - i
            tot["lost"] += lost
            tot["received"] += j - i - lost
            i = j

    def frames_of(self, w: int) -> dict:
        b = self.buckets.get(w, {name: [0, 0] for name in LEGS})
        return {
            leg: {"sent": b[leg][0], "received": b[leg][0] - b[leg][1], "lost": b[leg][1]}
            for leg in LEGS
        }


def attach_frames(windows: list[dict], book: FrameBook) -> None:
    """Put the per-window frame counts (known once the calls ended) into the windows."""
    for w in windows:
        w["frames"] = book.frames_of(w["i"])


def _mib(v: float | None) -> float | None:
    return None if v is None else round(v / MIB, 2)


def _p99s(windows: list[dict], leg: str) -> list[float]:
    return [w[leg]["p99_ms"] for w in windows if w[leg]["p99_ms"] is not None]


def summarize(
    windows: list[dict],
    baseline: dict,
    end: dict,
    totals: dict,
    calls: dict,
    steady_s: float,
    records_kept: int = 0,
) -> dict:
    """The soak's verdicts from its windows, the idle samples before and after, the frame
    totals (``FrameBook.totals``) and the call counts."""
    steady = [w for w in windows if w["phase"] == "steady"]
    loaded = steady or windows
    ref_at = min(60.0, steady_s / 2)
    minute = next((w for w in loaded if w["t_s"] >= ref_at), loaded[-1] if loaded else None)
    # the reference: once the relay's in-memory record cache is full (see the module doc)
    first = next(
        (
            w
            for w in loaded
            if w["t_s"] >= ref_at and w.get("calls_completed", records_kept) >= records_kept
        ),
        minute,
    )
    last = loaded[-1] if loaded else None
    rss_first = first["rss_mib"] if first else None
    rss_last = last["rss_mib"] if last else None
    growth = None if rss_first is None or rss_last is None else round(rss_last - rss_first, 2)
    rss_minute = minute["rss_mib"] if minute else None
    growth_minute = (
        None if rss_minute is None or rss_last is None else round(rss_last - rss_minute, 2)
    )
    lost = sum(totals[leg]["lost"] for leg in LEGS)
    back = {}
    for key in ("fds", "tasks", "active_calls", "threads"):
        b, e = baseline.get(key), end.get(key)
        back[key] = {
            "baseline": b,
            "end": e,
            "back": None if b is None or e is None else e <= b,
        }
    cpu = [w["cpu_pct"] for w in steady if w["cpu_pct"] is not None]
    latency = {}
    for leg in LEGS:
        p99 = _p99s(steady, leg)
        latency[leg] = {
            "p99_ms_median_window": round(statistics.median(p99), 3) if p99 else None,
            "p99_ms_worst_window": max(p99) if p99 else None,
            "max_ms": max((w[leg]["max_ms"] for w in steady if w[leg]["max_ms"]), default=None),
        }
    checks = {
        "zero_lost_frames": lost == 0 and all(totals[leg]["checked"] for leg in LEGS),
        "rss_growth_lt_5mib": None if growth is None else growth < RSS_GROWTH_LIMIT_MIB,
        "fds_back_to_baseline": back["fds"]["back"],
        "tasks_back_to_baseline": back["tasks"]["back"],
        "active_calls_back_to_baseline": back["active_calls"]["back"],
        "no_failed_or_dropped_calls": not calls.get("failed") and not calls.get("dropped"),
    }
    return {
        "calls": calls,
        "steady_s": round(steady_s, 1),
        "baseline": baseline,
        "end": end,
        "back_to_baseline": back,
        "rss_first_minute_mib": rss_first,
        "rss_first_minute_at_s": first["t_s"] if first else None,
        "rss_last_loaded_mib": rss_last,
        "rss_last_loaded_at_s": last["t_s"] if last else None,
        "rss_growth_mib": growth,
        "rss_reference_calls_completed": first.get("calls_completed") if first else None,
        "rss_records_kept": records_kept,
        "rss_growth_from_first_minute_mib": growth_minute,
        "rss_baseline_mib": baseline.get("rss_mib"),
        "rss_end_idle_mib": end.get("rss_mib"),
        "cpu_pct_mean_steady": round(statistics.fmean(cpu), 1) if cpu else None,
        "cpu_pct_max_steady": max(cpu) if cpu else None,
        "latency": latency,
        "frames": totals,
        "lost_frames_total": lost,
        "checks": checks,
        "passed": all(v is not False for v in checks.values()),
    }


# -- the run ---------------------------------------------------------------------------


class SoakGenerator(LoadGenerator):
    """The load generator, telling the soak when a call comes up and when it is gone."""

    def __init__(self, soak: Soak, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.soak = soak

    def claim_session(self, session: object) -> TwilioCall | None:
        call = super().claim_session(session)
        if call is not None:
            self.soak.on_established(call)
        return call

    def on_call_closed(self, call: TwilioCall) -> None:
        super().on_call_closed(call)
        self.soak.on_closed(call)


class Soak:
    def __init__(
        self,
        reactor: Reactor,
        agent,
        port: int,
        pid: int,
        *,
        calls: int,
        minutes: float,
        call_s: tuple[float, float],
        window_s: float,
        settle_s: float,
        seed: int,
        progress: Progress,
    ) -> None:
        self.reactor = reactor
        self.agent = agent
        self.port = port
        self.proc = ProcTree(pid)
        self.n = calls
        self.duration_ns = int(minutes * 60e9)
        self.call_s = call_s
        self.window_ns = int(window_s * 1e9)
        self.settle_s = settle_s
        self.rng = random.Random(seed)
        self.progress = progress
        self.gen = SoakGenerator(
            self, reactor, f"http://127.0.0.1:{port}", AUTH_TOKEN, passthrough=True
        )
        agent.claim_fn = self.gen.claim_session
        agent.calls = self.gen.calls
        self.stopping = False
        self.completed = 0
        self.twilio = {"protocol_errors": 0, "misrouted_frames": 0, "clears": 0}
        self.agent_side = {"misrouted_frames": 0, "unknown_frames": 0}
        self.call_lengths: list[float] = []
        self.windows: list[dict] = []
        self.book: FrameBook | None = None

    # -- call lifecycle ------------------------------------------------------------------
    def on_established(self, call: TwilioCall) -> None:
        call.t_established = monotonic_ns()  # type: ignore[attr-defined]
        self.reactor.call_later(self.rng.uniform(*self.call_s), self._hang_up, call)

    def _hang_up(self, call: TwilioCall) -> None:
        if not call.closed:
            call.stop()

    def on_closed(self, call: TwilioCall) -> None:
        call.t_closed = monotonic_ns()  # type: ignore[attr-defined]
        self.reactor.call_later(ACCOUNT_DELAY_S, self._account, call)
        self._top_up()

    def _account(self, call: TwilioCall) -> None:
        """Count one ended call's frames, then let its bookkeeping go (a long soak would
        otherwise keep every frame's send time of every call)."""
        book = self.book
        t_est = getattr(call, "t_established", 0)
        if call.agent is not None and book is not None and t_est:
            end = call.t_stop or call.t_closed  # type: ignore[attr-defined]
            hi = end - int(LOSS_GRACE_S * 1e9)
            up, down = call.up, call.down
            book.add("uplink", up.send_times, up.seen, t_est, hi, up.dups, up.reorders, up.bogus)
            book.add(
                "downlink", down.send_times, down.seen, 0, hi, down.dups, down.reorders, down.bogus
            )
            if call.t_stop and call.failed is None:
                self.completed += 1
                self.call_lengths.append((call.t_stop - t_est) / 1e9)
            self.twilio["protocol_errors"] += call.proto_errors
            self.twilio["misrouted_frames"] += call.misrouted + call.down_markers.misrouted
            self.twilio["clears"] += call.clears
        if 0 <= call.idx < len(self.gen.calls) and self.gen.calls[call.idx] is call:
            self.gen.calls[call.idx] = None

    def _prune_sessions(self) -> None:
        sessions = getattr(self.agent, "sessions", None)
        if not sessions:
            return
        keep = []
        for s in sessions:
            markers = getattr(s, "up_markers", None)
            if getattr(s, "closed", False) and markers is not None:
                self.agent_side["misrouted_frames"] += markers.misrouted
                self.agent_side["unknown_frames"] += markers.unknown
            else:
                keep.append(s)
        sessions[:] = keep

    def _pending(self) -> int:
        gen = self.gen
        return len(gen.calls) - gen.established - gen.failed

    def _top_up(self) -> None:
        if self.stopping:
            return
        gen = self.gen
        want = self.n - (gen.open_calls + self._pending())
        room = MAX_CALL_IDS - len(gen.calls)
        if want > 0 and room > 0:
            gen.add_calls(min(want, room))

    # -- sampling --------------------------------------------------------------------------
    def _idle_sample(self) -> dict:
        s = self.proc.sample()
        m = relay_metrics(self.port)
        return {
            "rss_mib": _mib(s["rss"]),
            "fds": s["fds"],
            "threads": s["threads"],
            "tasks": _int(m.get("relay_trio_tasks")),
            "active_calls": _int(m.get("relay_active_calls")),
            "agent_sessions_open": self.agent.sessions_open,
        }

    def _fetch_metrics(self, record: dict) -> None:
        def done(status, _headers, body) -> None:
            if status == 200:
                m = parse_metrics(body.decode(errors="replace"))
                record["active_calls"] = _int(m.get("relay_active_calls"))
                record["tasks"] = _int(m.get("relay_trio_tasks"))

        HttpRequest(
            self.reactor,
            "127.0.0.1",
            self.port,
            "GET",
            "/metrics",
            {"Authorization": f"Bearer {ADMIN_KEY}"},
            b"",
            done,
        )

    def _close_window(self, phase: str) -> dict:
        gen, agent = self.gen, self.agent
        now = monotonic_ns()
        s = self.proc.sample()
        cpu_now = time.process_time_ns()
        dt = (now - self._w_start) / 1e9
        up, down = gen.up_lat[:], gen.down_lat[:]
        del gen.up_lat[:], gen.down_lat[:]  # in place: every Leg holds these lists
        late = sorted(gen.media_ticker.lateness + agent.ticker.lateness)
        gen.media_ticker.lateness.clear()
        agent.ticker.lateness.clear()
        late_p99 = percentile(late, 99)
        record: dict = {
            "i": len(self.windows),
            "t_s": round((now - self.t0) / 1e9, 2),
            "dt_s": round(dt, 2),
            "phase": phase,
            "calls_open": gen.open_calls,
            "calls_started": gen.established,
            "calls_completed": self.completed,
            "rss_mib": _mib(s["rss"]),
            "cpu_pct": round(100 * (s["cpu_s"] - self._cpu_prev) / dt, 1) if dt > 0 else None,
            "fds": s["fds"],
            "threads": s["threads"],
            "active_calls": None,  # filled by the /metrics answer
            "tasks": None,
            "uplink": latency_stats(up),
            "downlink": latency_stats(down),
            "loadgen": {
                "cpu_pct": round((cpu_now - self._gen_cpu_prev) / 1e7 / dt, 1) if dt else None,
                "timer_late_p99_ms": None if late_p99 is None else round(late_p99 / NS_PER_MS, 2),
            },
        }
        self._fetch_metrics(record)
        self.windows.append(record)
        self._cpu_prev = s["cpu_s"]
        self._gen_cpu_prev = cpu_now
        # Cyclic garbage of ended calls: young generations every window, all every minute,
        # at the window edge where the pause is measured (gc_ms), not inside a frame.
        t = time.perf_counter()
        gc.collect(2 if len(self.windows) % 6 == 0 else 1)
        self._prune_sessions()
        record["loadgen"]["gc_ms"] = round((time.perf_counter() - t) * 1e3, 1)
        self._w_start = monotonic_ns()
        lost = sum(self.book.totals[leg]["lost"] for leg in LEGS) if self.book else 0
        self.progress.update(
            f"t={record['t_s']:.0f}s {phase}: {gen.open_calls} calls, "
            f"rss {record['rss_mib']} MiB, cpu {record['cpu_pct']}%, fds {s['fds']}, "
            f"p99 up {record['uplink']['p99_ms']} / down {record['downlink']['p99_ms']} ms, "
            f"lost so far {lost}",
            force=True,
        )
        return record

    # -- main loop -----------------------------------------------------------------------
    def run(self) -> dict:
        gen, reactor = self.gen, self.reactor
        baseline = self._idle_sample()
        self.t0 = t0 = monotonic_ns()
        self.book = FrameBook(t0, self.window_ns)
        gen.window.start, gen.window.end = t0, math.inf  # every frame is a latency sample
        _set_recording(gen, self.agent, True)
        self._w_start = t0
        self._cpu_prev = self.proc.sample()["cpu_s"]
        self._gen_cpu_prev = time.process_time_ns()
        gc.collect()
        gc.freeze()
        gc.disable()
        try:
            self._top_up()
            steady_end = t0 + self.duration_ns
            drain_deadline = steady_end + int((self.call_s[1] + 60) * 1e9)
            next_w = t0 + self.window_ns
            phase = "ramp"
            t_steady = None
            while True:
                now = monotonic_ns()
                reactor.run(until_ns=min(next_w, now + 250_000_000))
                now = monotonic_ns()
                if now >= next_w:  # the window is labelled with the phase it ran in
                    self._close_window(phase)
                    next_w += self.window_ns
                    if next_w < monotonic_ns():  # a stalled loop: do not sample back to back
                        next_w = monotonic_ns() + self.window_ns
                if phase == "ramp" and gen.open_calls >= self.n:
                    phase, t_steady = "steady", now
                if not self.stopping and now >= steady_end:
                    self.stopping, phase = True, "drain"
                self._top_up()
                if self.stopping and gen.open_calls == 0 and self._pending() == 0:
                    break
                if now >= drain_deadline:
                    gen.stop_all(spread_s=0.2)
                    reactor.run(until_ns=monotonic_ns() + 2_000_000_000, stop=gen.all_closed)
                    break
                if phase == "ramp" and not self.stopping:
                    self.progress.update(f"ramp {gen.open_calls}/{self.n} calls up")
            if monotonic_ns() - self._w_start > self.window_ns // 10:
                self._close_window("drain")  # the partial last window
            # Let the accounting timers fire and the relay release what the calls held.
            reactor.run(
                until_ns=monotonic_ns() + int(max(self.settle_s, 2 * ACCOUNT_DELAY_S) * 1e9)
            )
        finally:
            gc.enable()
            gc.unfreeze()
            _set_recording(gen, self.agent, False)
        end = self._idle_sample()
        for c in gen.calls:  # anything not yet accounted (a forced end)
            if c is not None:
                self._account(c)
        self._prune_sessions()
        attach_frames(self.windows, self.book)
        steady_s = ((steady_end if t_steady is not None else t0) - (t_steady or t0)) / 1e9
        calls = {
            "target": self.n,
            "started": gen.established,
            "completed": self.completed,
            "failed": gen.failed,
            "dropped": gen.dropped,
            "failures": gen.failures[:10],
            "ids_used": len(gen.calls),
            "length_s_mean": round(statistics.fmean(self.call_lengths), 1)
            if self.call_lengths
            else None,
            "ramp_s": None if t_steady is None else round((t_steady - t0) / 1e9, 1),
        }
        summary = summarize(
            self.windows, baseline, end, self.book.totals, calls, steady_s, RECORDS_KEPT
        )
        summary["twilio_side"] = self.twilio
        summary["agent_side"] = self.agent_side | {"sessions_open_after": self.agent.sessions_open}
        return {"windows": self.windows, "summary": summary}


def _int(v: float | None) -> int | None:
    return None if v is None else int(v)


def published_capacity(target: str, path: Path = PUBLISHED) -> int | None:
    """The μ-law capacity (p99 < 20 ms) of ``target`` in the published full bench."""
    try:
        cap = json.loads(path.read_text())["capacity"]
    except (OSError, ValueError, KeyError):
        return None
    for key in (f"{target}/pcmu", "relay/pcmu"):
        if key in cap and cap[key].get("calls"):
            return int(cap[key]["calls"])
    return None


def run_soak(
    target_name: str,
    calls: int,
    minutes: float,
    *,
    call_s: tuple[float, float] = (20.0, 120.0),
    window_s: float = 10.0,
    settle_s: float = 10.0,
    pin: bool = True,
    seed: int = 1,
    progress: Progress | None = None,
) -> dict:
    """One soak against a fresh ``target_name`` process; never raises for target errors."""
    target = TARGETS[target_name]
    progress = progress or Progress()
    result: dict = {
        "target": target.name,
        "label": target.label,
        "audio": "pcmu",
        "calls": calls,
        "minutes": minutes,
        "call_seconds": list(call_s),
        "window_s": window_s,
        "settle_s": settle_s,
        "seed": seed,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    why = target.available()
    if why:
        result["error"] = f"{target.name}: {why}"
        return result
    relay_cpu, load_cpu = cpu_plan() if pin else (None, None)
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})
    result["cores"] = {"relay": relay_cpu, "load": load_cpu, "online": os.cpu_count()}
    pg = contextlib.ExitStack()
    if target.base_name == "relay-pg":
        PG_URL[:] = [pg.enter_context(_pgserver().postgres_server())]
    t_start = time.monotonic()
    with pg:
        tmp = Path(tempfile.mkdtemp(prefix=f"bench-soak-{target.name}-"))
        engine, engine_desc = genfast.load()
        stamp_rx = os.environ.get("BENCH_RX_STAMPS", "1") != "0"
        reactor = Reactor(stamp_rx=stamp_rx, engine=engine)
        result["loadgen"] = {
            "engine": engine_desc,
            "rx_stamps": "kernel" if stamp_rx else "read time",
        }
        agent = make_agent(reactor, target.agent, "pcmu")
        port = free_port()
        log = tmp / "target.log"
        proc = None
        try:
            proc = spawn_target(target, port, agent.url, "pcmu", tmp, log, relay_cpu)
            _wait_ready(proc, port, target.health_path, 60.0, log)
            time.sleep(0.3)  # lazily started work settles before the baseline
            soak = Soak(
                reactor,
                agent,
                port,
                proc.pid,
                calls=calls,
                minutes=minutes,
                call_s=call_s,
                window_s=window_s,
                settle_s=settle_s,
                seed=seed,
                progress=progress,
            )
            result |= soak.run()
            if proc.poll() is not None:
                result["error"] = f"target exited during the soak ({proc.returncode})"
        except Exception as exc:  # a broken target is a result, not a crash
            result["error"] = f"{type(exc).__name__}: {exc}"
            result["traceback"] = traceback.format_exc()[-3000:]
        finally:
            if proc is not None:
                _stop(proc)
            if "error" in result:
                result["target_log_tail"] = _tail(log, 800)
            reactor.close()
            shutil.rmtree(tmp, ignore_errors=True)
    PG_URL.clear()
    progress.done()
    result["elapsed_s"] = round(time.monotonic() - t_start, 1)
    return result


# -- output ----------------------------------------------------------------------------


def _f(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def text_report(result: dict) -> str:
    lines = [
        f"soak: {result['target']} ({result.get('label', '')}), {result['calls']} calls, "
        f"{result['minutes']} min, calls {result['call_seconds'][0]:g}-"
        f"{result['call_seconds'][1]:g} s, {result['window_s']:g} s windows",
    ]
    if result.get("error"):
        lines.append(f"ERROR: {result['error']}")
        if result.get("target_log_tail"):
            lines.append(result["target_log_tail"])
    windows = result.get("windows") or []
    if windows:
        head = (
            f"{'t s':>7} {'phase':<6} {'calls':>5} {'active':>6} {'tasks':>5} {'RSS MiB':>8} "
            f"{'CPU%':>5} {'fds':>4} {'up p50':>6} {'up p99':>6} {'dn p50':>6} {'dn p99':>6} "
            f"{'up sent':>7} {'lost':>4} {'dn sent':>7} {'lost':>4} {'gen%':>5}"
        )
        lines += ["", head, "-" * len(head)]
        for w in windows:
            fr = w.get("frames") or {}
            up, dn = fr.get("uplink", {}), fr.get("downlink", {})
            lines.append(
                f"{w['t_s']:>7.1f} {w['phase']:<6} {w['calls_open']:>5} "
                f"{_f(w['active_calls']):>6} {_f(w['tasks']):>5} {_f(w['rss_mib']):>8} "
                f"{_f(w['cpu_pct']):>5} {w['fds']:>4} "
                f"{_f(w['uplink']['p50_ms'], 2):>6} {_f(w['uplink']['p99_ms'], 2):>6} "
                f"{_f(w['downlink']['p50_ms'], 2):>6} {_f(w['downlink']['p99_ms'], 2):>6} "
                f"{_f(up.get('sent')):>7} {_f(up.get('lost')):>4} "
                f"{_f(dn.get('sent')):>7} {_f(dn.get('lost')):>4} "
                f"{_f(w['loadgen']['cpu_pct']):>5}"
            )
    s = result.get("summary")
    if s:
        c = s["calls"]
        lines += [
            "",
            f"calls: {c['started']} started, {c['completed']} completed, {c['failed']} failed, "
            f"{c['dropped']} dropped (ramp {_f(c.get('ramp_s'))} s, mean length "
            f"{_f(c.get('length_s_mean'))} s)",
        ]
        for f in c.get("failures", [])[:5]:
            lines.append(f"  {f}")
        lines.append(f"{'':<14}{'baseline':>10}{'end':>10}")
        for key in ("fds", "tasks", "active_calls", "threads"):
            b = s["back_to_baseline"][key]
            mark = {True: "ok", False: "NOT BACK", None: "?"}[b["back"]]
            lines.append(f"{key:<14}{_f(b['baseline']):>10}{_f(b['end']):>10}  {mark}")
        lines.append(
            f"RSS: {_f(s['rss_first_minute_mib'], 2)} MiB at {_f(s['rss_first_minute_at_s'])} s -> "
            f"{_f(s['rss_last_loaded_mib'], 2)} MiB at {_f(s['rss_last_loaded_at_s'])} s "
            f"(growth {_f(s['rss_growth_mib'], 2)} MiB, limit {RSS_GROWTH_LIMIT_MIB:g}); "
            f"idle {_f(s['rss_baseline_mib'], 2)} -> {_f(s['rss_end_idle_mib'], 2)} MiB"
        )
        lines.append(
            f"     reference once {_f(s.get('rss_reference_calls_completed'))} calls had ended "
            f"(the relay keeps {_f(s.get('rss_records_kept'))} call records in memory); "
            f"growth from the first minute {_f(s.get('rss_growth_from_first_minute_mib'), 2)} MiB"
        )
        lines.append(
            f"CPU: {_f(s['cpu_pct_mean_steady'])}% of a core mean, "
            f"{_f(s['cpu_pct_max_steady'])}% max (steady windows)"
        )
        for leg in LEGS:
            fr, lat = s["frames"][leg], s["latency"][leg]
            lines.append(
                f"{leg}: {fr['checked']} frames checked, {fr['lost']} lost, "
                f"{fr['duplicated']} duplicated, {fr['reordered']} reordered; p99 median "
                f"window {_f(lat['p99_ms_median_window'], 2)} ms, worst "
                f"{_f(lat['p99_ms_worst_window'], 2)} ms, max {_f(lat['max_ms'], 2)} ms"
                + (
                    f" (pre-session: {fr['pre_session']} frames, {fr['pre_session_lost']} lost)"
                    if fr["pre_session"]
                    else ""
                )
            )
        lines.append(f"lost frames total: {s['lost_frames_total']}")
        lines.append(
            "checks: "
            + ", ".join(
                f"{k} {'-' if v is None else ('ok' if v else 'FAIL')}"
                for k, v in s["checks"].items()
            )
        )
        lines.append(f"verdict: {'PASS' if s['passed'] else 'FAIL'}")
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    save_json(path, result, indent=1)


def plot(result: dict, path: Path) -> Path | None:
    """RSS, CPU and p99 of both legs over time; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    windows = result.get("windows") or []
    if not windows:
        return None
    t = [w["t_s"] / 60 for w in windows]
    fig, (ax_rss, ax_cpu, ax_lat) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    ax_rss.plot(t, [w["rss_mib"] for w in windows], color="tab:blue")
    ax_rss.set_ylabel("relay RSS (MiB)")
    ax_cpu.plot(t, [w["cpu_pct"] for w in windows], color="tab:orange", label="CPU % of a core")
    ax_cpu.set_ylabel("relay CPU (% of a core)")
    ax_calls = ax_cpu.twinx()
    ax_calls.plot(t, [w["calls_open"] for w in windows], color="tab:gray", ls=":", label="calls")
    ax_calls.set_ylabel("calls up")
    for leg, color in (("uplink", "tab:green"), ("downlink", "tab:red")):
        ax_lat.plot(t, [w[leg]["p99_ms"] for w in windows], color=color, label=f"{leg} p99")
    ax_lat.set_ylabel("media latency p99 (ms)")
    ax_lat.set_xlabel("minutes")
    ax_lat.legend(loc="upper left")
    end = result.get("minutes")
    for ax in (ax_rss, ax_cpu, ax_lat):
        ax.grid(alpha=0.3)
        if end:
            ax.axvline(end, color="k", lw=0.8, ls="--")
    fig.suptitle(
        f"soak: {result['target']}, {result['calls']} calls, {result['minutes']} min "
        "(dashed: no new calls after this)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- command line ---------------------------------------------------------------------------


def _seconds_range(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(",")
    a, b = float(lo), float(hi or lo)
    if not 0 < a <= b:
        raise argparse.ArgumentTypeError("want LO,HI seconds with 0 < LO <= HI")
    return a, b


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench soak",
        description="Hold ~N calls up for a long time and watch for leaks.",
    )
    p.add_argument("--minutes", type=float, default=60.0, help="time calls are started (60)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--calls", type=int, help="concurrent calls to hold")
    size.add_argument(
        "--fraction", type=float, default=0.8, help="share of --capacity to hold (0.8)"
    )
    p.add_argument(
        "--capacity",
        type=int,
        help="the target's capacity in calls (default: bench/published/load-full.json)",
    )
    p.add_argument("--target", choices=SOAK_TARGETS, default="relay")
    p.add_argument("--window", type=float, default=10.0, help="seconds per sample (10)")
    p.add_argument("--settle", type=float, default=10.0, help="idle seconds before the end sample")
    p.add_argument("--seed", type=int, default=1, help="call lengths' random seed")
    p.add_argument("--no-pin", action="store_true", help="do not pin to CPUs")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument("--no-plot", action="store_true")
    # call length range, for quick checks and tests (issue 10's soak: 20-120 s)
    p.add_argument(
        "--call-seconds", type=_seconds_range, default=(20.0, 120.0), help=argparse.SUPPRESS
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.calls is not None:
        calls = args.calls
    else:
        capacity = args.capacity or published_capacity(args.target)
        if not capacity:
            parser.error("give --calls, or --capacity (no published capacity found)")
        calls = max(1, round(args.fraction * capacity))
    if calls < 1 or args.minutes <= 0 or args.window <= 0:
        parser.error("--calls, --minutes and --window must be positive")
    result = run_soak(
        args.target,
        calls,
        args.minutes,
        call_s=args.call_seconds,
        window_s=args.window,
        settle_s=args.settle,
        pin=not args.no_pin,
        seed=args.seed,
    )
    print(text_report(result))
    path = args.out / "soak.json"
    write_json(result, path)
    print(f"\nJSON: {path}")
    if not args.no_plot and result.get("windows"):
        png = plot(result, args.out / "soak.png")
        if png is None:
            print("plot: skipped (matplotlib is not installed: pip install -e '.[bench]')")
        else:
            print(f"plot: {png}")
    if result.get("error"):
        return 1
    return 0 if result["summary"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
