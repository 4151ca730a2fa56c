"""Process metrics in Prometheus text format (exposition format 0.0.4).

A dependency-free registry: a counter increment on the per-frame path must cost tens of
nanoseconds, so counters are plain attributes/dicts and the text is rendered only when
``/metrics`` is scraped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from .media import codec

# Per-frame relay latency buckets in seconds: the relay's budget is far below one 20 ms frame.
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
)


class Histogram(codec.Histogram):
    """Prometheus histogram plus a bounded window of recent raw samples
    (``relay.media.codec.Histogram``, compiled: the media handlers observe into it without
    a Python frame; ``codec_ref.Histogram`` is its specification).

    The window gives exact p50/p99 for reports (the demos) where bucket bounds would be
    too coarse; Prometheus scrapes use the buckets. It is a ring of C doubles: 8 bytes a
    sample. The default of 8,192 samples (64 KiB) is a few seconds of one busy process: at
    50,000 the two per-frame latency windows filled to 0.8 MB within seconds at 100 calls,
    ~8 KiB of the process's growth per call at that load (measured,
    bench/published/rss-tasks/).
    """

    __slots__ = ()

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS, window: int = 8_192) -> None:
        super().__init__(bounds, window)


class Metrics:
    def __init__(self) -> None:
        self.active_calls = 0
        self.calls_total = 0
        self.calls_rejected: dict[str, int] = defaultdict(int)
        self.frames_in = 0  # Twilio -> agent, media messages received from Twilio
        self.frames_out = 0  # agent -> Twilio, media messages sent to Twilio
        #: Twilio reads forwarded to the agent whole by the uplink pump (codec.UplinkPump)
        self.uplink_pumped = 0
        #: agent reads taken from recv to send by the compiled handler (codec.DownlinkHandler)
        self.agent_direct = 0
        self.barge_ins = 0
        self.errors: dict[str, int] = defaultdict(int)
        self.webhooks: dict[str, int] = defaultdict(int)
        #: /api/v1 error answers by HTTP status
        self.api: dict[str, int] = defaultdict(int)
        #: call history writes waiting for the store (a callable set by the control plane)
        self.store_queue: Any = None
        self.latency_up = Histogram()
        self.latency_down = Histogram()
        self.barge_in_to_clear = Histogram()
        self.gaps_filled = 0
        self.late_drops = 0
        self.duplicates = 0
        #: warm agent sessions (relay/control/warm.py) by outcome
        self.warm_starts: dict[str, int] = defaultdict(int)
        #: agent connections recovered in place (reconnect = true), by adapter class
        self.agent_reconnects: dict[str, int] = defaultdict(int)
        #: relay serve --workers N: connections handed between workers, by outcome
        self.handoffs: dict[str, int] = defaultdict(int)
        #: set by the server: () -> (wake-ups, sockets served) of the media reactor
        self.reactor_stats: Callable[[], tuple[int, int, int]] | None = None
        #: more metric families rendered by their owners (the GC sweeper, relay/gcpolicy.py)
        self.sections: list[Callable[[], list[str]]] = []

    def error(self, kind: str) -> None:
        self.errors[kind] += 1

    def render(self) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)

        metric(
            "relay_active_calls",
            "gauge",
            "Calls with an open media stream.",
            [f"relay_active_calls {self.active_calls}"],
        )
        metric(
            "relay_calls_total",
            "counter",
            "Media streams accepted.",
            [f"relay_calls_total {self.calls_total}"],
        )
        metric(
            "relay_calls_rejected_total",
            "counter",
            "Calls refused, by reason.",
            [
                f'relay_calls_rejected_total{{reason="{k}"}} {v}'
                for k, v in sorted(self.calls_rejected.items())
            ],
        )
        metric(
            "relay_frames_total",
            "counter",
            "Media messages relayed, by direction.",
            [
                f'relay_frames_total{{direction="twilio_to_agent"}} {self.frames_in}',
                f'relay_frames_total{{direction="agent_to_twilio"}} {self.frames_out}',
            ],
        )
        metric(
            "relay_uplink_pumped_reads_total",
            "counter",
            "Reads from Twilio that reached the agent in one compiled call (the uplink pump).",
            [f"relay_uplink_pumped_reads_total {self.uplink_pumped}"],
        )
        metric(
            "relay_agent_direct_reads_total",
            "counter",
            "Reads from the agent that reached Twilio in one compiled call (audio deltas only).",
            [f"relay_agent_direct_reads_total {self.agent_direct}"],
        )
        metric(
            "relay_barge_ins_total",
            "counter",
            "Caller interruptions (clear sent).",
            [f"relay_barge_ins_total {self.barge_ins}"],
        )
        metric(
            "relay_uplink_gaps_filled_total",
            "counter",
            "Timestamp gaps filled with silence.",
            [f"relay_uplink_gaps_filled_total {self.gaps_filled}"],
        )
        metric(
            "relay_uplink_dropped_total",
            "counter",
            "Uplink frames dropped, by reason.",
            [
                f'relay_uplink_dropped_total{{reason="late"}} {self.late_drops}',
                f'relay_uplink_dropped_total{{reason="duplicate"}} {self.duplicates}',
            ],
        )
        metric(
            "relay_errors_total",
            "counter",
            "Errors by kind (one call or request each).",
            [f'relay_errors_total{{kind="{k}"}} {v}' for k, v in sorted(self.errors.items())],
        )
        metric(
            "relay_webhooks_total",
            "counter",
            "Webhook requests by route and outcome.",
            [
                f'relay_webhooks_total{{outcome="{k}"}} {v}'
                for k, v in sorted(self.webhooks.items())
            ],
        )
        metric(
            "relay_agent_reconnects_total",
            "counter",
            "Agent connections lost and recovered in place, by adapter.",
            [
                f'relay_agent_reconnects_total{{adapter="{k}"}} {v}'
                for k, v in sorted(self.agent_reconnects.items())
            ],
        )
        metric(
            "relay_handoffs_total",
            "counter",
            "Connections passed to the worker that answered their call, by outcome.",
            [
                f'relay_handoffs_total{{outcome="{k}"}} {v}'
                for k, v in sorted(self.handoffs.items())
            ],
        )
        metric(
            "relay_warm_starts_total",
            "counter",
            "Agent sessions opened at the voice webhook, by outcome.",
            [
                f'relay_warm_starts_total{{outcome="{k}"}} {v}'
                for k, v in sorted(self.warm_starts.items())
            ],
        )
        metric(
            "relay_api_errors_total",
            "counter",
            "Control-plane API requests answered with an error, by HTTP status.",
            [f'relay_api_errors_total{{status="{k}"}} {v}' for k, v in sorted(self.api.items())],
        )
        if self.store_queue is not None:
            metric(
                "relay_store_queue",
                "gauge",
                "Call history writes waiting for the store.",
                [f"relay_store_queue {self.store_queue()}"],
            )
        metric(
            "relay_frame_latency_seconds",
            "histogram",
            "Time from receiving a media batch to finishing its forward send.",
            self.latency_up.render("relay_frame_latency_seconds", 'direction="twilio_to_agent"')
            + self.latency_down.render(
                "relay_frame_latency_seconds", 'direction="agent_to_twilio"'
            ),
        )
        metric(
            "relay_barge_in_clear_seconds",
            "histogram",
            "Time from the agent's speech-started event to Twilio clear sent.",
            self.barge_in_to_clear.render("relay_barge_in_clear_seconds"),
        )
        if self.reactor_stats is not None:
            wakeups, served, timers = self.reactor_stats()
            metric(
                "relay_reactor_wakeups_total",
                "counter",
                "Media reactor passes (one wake-up serves every ready socket).",
                [f"relay_reactor_wakeups_total {wakeups}"],
            )
            metric(
                "relay_reactor_reads_total",
                "counter",
                "Socket reads served by the media reactor.",
                [f"relay_reactor_reads_total {served}"],
            )
            metric(
                "relay_reactor_timers_total",
                "counter",
                "Timers (agent connection checks and pings) run inline by reactor passes.",
                [f"relay_reactor_timers_total {timers}"],
            )
        for section in self.sections:
            out.extend(section())
        return "\n".join(out) + "\n"
