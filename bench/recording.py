"""``python -m bench recording``: what recording a call costs the media path, per frame.

The recorder's hooks run on the Trio loop inside the call's message handling
(relay/media/recording.py): ``caller`` per 20 ms Twilio frame, ``agent`` per downlink pull
(here one 100 ms frame, relay's default), and once a second a commit that cuts a chunk
for the writer. This feeds ``--seconds`` of a call through them as fast as possible and
reports the mean and the worst single hook call (a commit included), then times the
writer thread (μ-law decoding, interleaving, ``write``, header update) per second of
audio. Results: a table and JSON (``bench/results/recording.json``).
"""

from __future__ import annotations

import argparse
import base64
import platform
import sys
import tempfile
import time
from pathlib import Path

import trio

from bench.report import save_json

RESULTS = Path(__file__).resolve().parent / "results"


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "mean_us": round(sum(ordered) / len(ordered) * 1e6, 2),
        "p50_us": round(ordered[len(ordered) // 2] * 1e6, 2),
        "p99_us": round(ordered[int(0.99 * len(ordered))] * 1e6, 2),
        "max_us": round(ordered[-1] * 1e6, 1),
    }


async def measure(seconds: int) -> dict:
    from relay.gcpolicy import tune_gc
    from relay.media import recording
    from relay.metrics import Metrics
    from relay.records import CallRecord

    tune_gc()  # as `relay serve` runs
    perf = time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        writer = recording.RecordingWriter(Path(tmp), Metrics())
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            rec = writer.start(CallRecord("CA" + "0" * 32))
            assert rec is not None
            caller_b64 = base64.b64encode(bytes(range(32, 192))).decode()
            agent_frame = [(bytes(range(16, 216)) * 4, "1", "resp")]
            caller: list[float] = []
            commits: list[float] = []
            agent: list[float] = []
            for k in range(seconds):
                for i in range(50):
                    t0 = perf()
                    rec.caller(k * 1000 + i * 20, caller_b64)
                    dt = perf() - t0
                    # the frame that crosses a second boundary cuts the chunk (a commit)
                    (commits if i == 49 else caller).append(dt)
                    if i % 5 == 0:
                        t0 = perf()
                        rec.agent(agent_frame, k * 1000.0 + i * 20)
                        agent.append(perf() - t0)
                if k % 5 == 0:
                    await trio.sleep(0)  # the writer thread works meanwhile, as in a call
            t0 = perf()
            rec.close()
            await writer.flush(120)
            tail_s = perf() - t0
            nursery.cancel_scope.cancel()
    return {
        "seconds_of_call": seconds,
        "caller_frame": _stats(caller),
        "commit": _stats(commits),
        "agent_frame": _stats(agent),
        "writer_chunks": writer.written_chunks,
        "close_and_flush_ms": round(tail_s * 1000, 1),
        "peak_pending_ms_per_channel": rec.peak_pending // 16,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench recording", description=__doc__)
    parser.add_argument("--seconds", type=int, default=600, help="length of the fed call")
    parser.add_argument("--out", type=Path, default=RESULTS / "recording.json")
    args = parser.parse_args(argv)
    result = trio.run(measure, args.seconds)
    print(f"recording a {result['seconds_of_call']} s call, per hook call on the Trio loop:")
    for name, label in (
        ("caller_frame", "caller frame (20 ms)"),
        ("agent_frame", "agent frame (100 ms)"),
        ("commit", "once a second: commit"),
    ):
        st = result[name]
        print(
            f"  {label:<24} mean {st['mean_us']:6.2f} µs  p50 {st['p50_us']:6.2f} µs  "
            f"p99 {st['p99_us']:6.2f} µs  max {st['max_us']:7.1f} µs"
        )
    print(f"  audio held per call at most {result['peak_pending_ms_per_channel']} ms per channel")
    save_json(args.out, result)
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
