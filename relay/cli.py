"""``relay serve | simulate | demo`` (and ``relay bench`` -> ``python -m bench``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .errors import ConfigError


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Hypercorn logs every client disconnect at INFO; keep our one-line-per-event logs legible
    logging.getLogger("relay.hypercorn").setLevel(logging.WARNING)


def _serve(args: argparse.Namespace) -> int:
    import trio

    from . import config as config_mod
    from .http.server import run_server, tune_gc

    cfg = config_mod.load(args.config)
    if args.host:
        cfg.server.host = args.host
    if args.port is not None:
        cfg.server.port = args.port
    if args.public_url:
        cfg.server.public_url = args.public_url
    if not cfg.server.public_url and cfg.server.port:
        cfg.server.public_url = f"http://{cfg.server.host}:{cfg.server.port}"
    cfg.validate()
    log = logging.getLogger("relay")
    log.info("configuration (secrets masked): %s", cfg.describe())
    if not cfg.security.admin_key:
        log.warning("security.admin_key is not set: /metrics and /calls are disabled")
    tune_gc()
    profile_path = os.environ.get("RELAY_PROFILE")
    try:
        if profile_path:
            # For performance work: a cProfile of the whole process, written on Ctrl-C.
            import cProfile

            profiler = cProfile.Profile()
            try:
                profiler.runcall(trio.run, run_server, cfg)  # type: ignore[arg-type]
            finally:
                profiler.dump_stats(profile_path)
        else:
            trio.run(run_server, cfg)
    except KeyboardInterrupt:
        log.info("stopped")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    import trio

    from .sim import simulator

    token = args.auth_token or os.environ.get("RELAY_TWILIO_AUTH_TOKEN", "")
    if not token:
        raise ConfigError(
            "the simulator signs like Twilio: pass --auth-token or set RELAY_TWILIO_AUTH_TOKEN "
            "to the relay's twilio.auth_token"
        )
    audio = simulator.load_wav(args.audio) if args.audio else None
    results = trio.run(
        lambda: simulator.simulate(
            args.url.rstrip("/"),
            token,
            calls=args.calls,
            duration_s=args.duration,
            audio=audio,
            out_dir=Path(args.out),
        )
    )
    print(simulator.format_report(results))
    return 0 if all(not r.refused for r in results) else 1


def _demo(args: argparse.Namespace) -> int:
    from .sim.demo import main as demo_main

    return demo_main(calls=args.calls, out_dir=Path(args.out))


def _bench(rest: list[str]) -> int:
    try:
        from bench.__main__ import main as bench_main  # type: ignore[import-not-found]
    except ImportError:
        print("relay bench: run it from a source checkout (python -m bench ...)", file=sys.stderr)
        return 2
    return int(bench_main(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    parser = argparse.ArgumentParser(prog="relay", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("RELAY_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the relay (webhooks + media streams on one port)")
    p.add_argument("--config", help="path to relay.toml (environment overrides apply)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--public-url", help="the https:// URL Twilio reaches this relay at")
    p.set_defaults(func=_serve)

    p = sub.add_parser("simulate", help="place calls against a relay like Twilio would")
    p.add_argument("--url", required=True, help="relay base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--calls", type=int, default=1)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per call")
    p.add_argument("--audio", help="caller audio WAV (default: synthetic speech)")
    p.add_argument("--auth-token", help="Twilio auth token the relay checks (or env)")
    p.add_argument("--out", default="out/simulate", help="where heard audio WAVs go")
    p.set_defaults(func=_simulate)

    p = sub.add_parser("demo", help="relay + parrot agent + simulated callers, all local")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--out", default="out/demo")
    p.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"relay: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
