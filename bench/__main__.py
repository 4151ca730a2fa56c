"""``python -m bench ...``: benchmark entry point.

    python -m bench load --quick      # ≤ ~2 min: relay + peers at N in {50, 200}
    python -m bench load --full       # capacity search per target, 15 s steady state
    python -m bench load --targets relay,fastapi --audio pcmu --n 100,300
    python -m bench load --quick --targets relay-memory --agents openai,assemblyai,deepgram,\
        elevenlabs,gemini --audio pcmu --n 100 --repeat 3   # CPU and p99 per agent adapter
    python -m bench codec ...         # per-frame DSP benchmark (bench/codec.py)
    python -m bench wsstack [--quick] # CPU per WebSocket message, stack by stack
    python -m bench warmstart         # stream start -> first greeting audio, warm vs cold
    python -m bench recording         # what recording a call costs per media frame
    python -m bench cascade           # text agents: relay share of reply latency, local CPU
    python -m bench twilio-speech     # ConversationRelay first token, Gather early answers
    python -m bench soak --minutes 60 # ~80% of capacity for an hour: leaks, loss, p99 drift

Results: a table on stdout, ``bench/results/load-<mode>.json`` and PNG plots next to it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in _csv(text))


def _load_parser(sub) -> None:
    p = sub.add_parser("load", help="load / latency / capacity against the relay and peers")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="short runs at a few N (default)")
    mode.add_argument("--full", action="store_true", help="capacity search, 15 s windows")
    p.add_argument(
        "--targets",
        type=_csv,
        default=("relay", "fastapi", "pipecat"),
        help="comma list of relay,relay-memory,relay-pg,relay-admission,fastapi,pipecat,null "
        "(default: relay,fastapi,pipecat)",
    )
    p.add_argument(
        "--audio",
        type=_csv,
        default=("pcmu", "pcm24k"),
        help="agent audio modes: pcmu (μ-law passthrough), pcm24k (resampled)",
    )
    p.add_argument(
        "--agents",
        type=_csv,
        default=("openai",),
        help="agent adapters behind the relay targets, each its own target variant "
        "(relay[gemini] ...): openai,assemblyai,deepgram,elevenlabs,gemini (default: openai). "
        "Gemini always runs PCM16 16/24 kHz (audio pcm16k), the others μ-law",
    )
    p.add_argument("--n", type=_ints, help="call counts (quick) or capacity ladder (full)")
    p.add_argument("--window", type=float, help="steady-state seconds per run")
    p.add_argument("--limit-ms", type=float, default=20.0, help="p99 limit for capacity")
    p.add_argument(
        "--arrival-rate",
        type=float,
        default=0.0,
        help="callers per second during the ramp (default: as fast as setup allows)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin to CPUs")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="max seconds to wait for idle cores before each run",
    )
    p.add_argument(
        "--retry",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="re-run runs disturbed by other processes (default: on in --full)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="quick mode: rounds of every target and N, interleaved; medians are reported",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument("--no-plots", action="store_true")


def _run_load(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from bench import report
    from bench.harness import FULL, QUICK, Progress, SuiteOptions, run_suite

    mode = "full" if args.full else "quick"
    timings = FULL if mode == "full" else QUICK
    if args.window:
        timings = replace(timings, window_s=args.window)
    if args.arrival_rate:
        timings = replace(timings, arrival_rate=args.arrival_rate)
    opts = SuiteOptions(
        mode=mode,
        targets=args.targets,
        audios=args.audio,
        ns=args.n,
        timings=timings,
        pin=not args.no_pin,
        quiet_wait_s=args.quiet_wait
        if args.quiet_wait is not None
        else (10.0 if mode == "full" else 2.0),
        limit_ms=args.limit_ms,
        retry_noisy=mode == "full" if args.retry is None else args.retry,
        repeat=max(1, args.repeat),
        agents=args.agents,
    )
    suite = run_suite(opts, Progress())
    print(report.text_report(suite))
    path = args.out / f"load-{mode}.json"
    report.write_json(suite, path)
    print(f"\nJSON: {path}")
    if not args.no_plots:
        for png in report.plot(suite, args.out, f"load-{mode}"):
            print(f"plot: {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "codec":
        # bench/codec.py belongs to the codec benchmark; hand it the rest of the line.
        try:
            codec = importlib.import_module("bench.codec")
        except ImportError as exc:
            print(f"bench codec: not available ({exc})", file=sys.stderr)
            return 2
        return int(codec.main(argv[1:]) or 0)
    if argv and argv[0] == "wsstack":
        from bench import wsstack  # owns its options, like bench/codec.py

        return wsstack.main(argv[1:])
    if argv and argv[0] == "warmstart":
        from bench import warmstart  # owns its options too

        return warmstart.main(argv[1:])
    if argv and argv[0] == "recording":
        from bench import recording

        return recording.main(argv[1:])
    if argv and argv[0] == "cascade":
        from bench import cascade  # cascaded/local text agents (bench/cascade.py)

        return cascade.main(argv[1:])
    if argv and argv[0] == "twilio-speech":
        from bench import twilio_speech  # ConversationRelay / Gather (bench/twilio_speech.py)

        return twilio_speech.main(argv[1:])
    if argv and argv[0] == "soak":
        from bench import soak  # long run at steady load (bench/soak.py)

        return soak.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _load_parser(sub)
    sub.add_parser("codec", help="per-frame DSP benchmark (bench/codec.py)")
    sub.add_parser("wsstack", help="server CPU per WebSocket message pair (bench/wsstack.py)")
    sub.add_parser("warmstart", help="start -> first greeting audio, warm vs cold start")
    sub.add_parser("recording", help="per-frame cost of recording a call")
    sub.add_parser("cascade", help="text agents: reply latency by stage, local agent CPU")
    sub.add_parser("twilio-speech", help="ConversationRelay first token, Gather early answers")
    sub.add_parser("soak", help="calls starting and ending for an hour: leaks, loss, drift")
    args = parser.parse_args(argv)
    if args.command == "load":
        from bench.fake_vendors import PROTOCOLS

        unknown = [a for a in args.agents if a not in PROTOCOLS]
        if unknown:
            parser.error(f"--agents: unknown {', '.join(unknown)} (known: {', '.join(PROTOCOLS)})")
        return _run_load(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
