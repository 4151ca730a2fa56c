"""``relay serve | simulate | demo`` (and ``relay bench`` -> ``python -m bench``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from . import interrupt
from .errors import EXIT_INTERRUPTED, ConfigError, RelayError


def _setup_logging(level: str) -> None:
    # relay serve --workers N: each line says which worker wrote it
    worker = os.environ.get("RELAY_WORKER_INDEX")
    where = f"[w{worker}] " if worker and worker.isdigit() else ""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)-7s {where}%(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Hypercorn logs every client disconnect at INFO; keep our one-line-per-event logs legible
    logging.getLogger("relay.hypercorn").setLevel(logging.WARNING)
    # Alembic narrates every migration check at INFO; relay logs the schema revision itself
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _serve(args: argparse.Namespace) -> int:
    import trio

    from . import config as config_mod
    from .control.cluster import ENV_INDEX
    from .gcpolicy import tune_gc
    from .http.drain import serve_until_signalled
    from .http.server import run_server
    from .http.workers import follow_supervisor, resolve_workers, supervise
    from .media.headroom import fd_soft_limit, raise_fd_limit

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
    workers = resolve_workers(args.workers)
    if workers > 1 and cfg.store.url == "memory":
        log.warning(
            "store.url = memory keeps call records inside one process: running 1 worker, "
            "not %d (use SQLite or PostgreSQL to serve from every core)",
            workers,
        )
        workers = 1
    if workers > 1 and os.environ.get(ENV_INDEX) is None:
        # The parent: migrations once, then one relay process per core (relay/http/workers.py)
        cfg.validate()
        from .control.plane import open_store

        # migrations and the key file beside an SQLite store, once, before any worker
        open_store(cfg).close()
        level = args.log_level or "info"
        argv = [sys.executable, "-m", "relay", "--log-level", level, "serve"]
        argv += ["--workers", "1", "--host", cfg.server.host]
        if cfg.server.public_url:  # else each worker's is http://host:port of the shared port
            argv += ["--public-url", cfg.server.public_url]
        if args.config:
            argv += ["--config", args.config]
        return supervise(argv, cfg.server.host, cfg.server.port, workers)
    follow_supervisor()  # a worker (its supervisor's pid in the environment): stop with it
    calls = raise_fd_limit()
    log.info("configuration (secrets masked): %s", cfg.describe())
    log.info("descriptor limit %d: room for ~%d calls", fd_soft_limit(), calls)
    if not cfg.security.admin_key:
        log.warning(
            "security.admin_key is not set: /metrics, /calls and POST /api/v1/tenants are disabled"
        )
    if not cfg.twilio.auth_token:
        log.warning("no [twilio] auth_token: only tenants' Twilio accounts (from the store) answer")
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
            trio.run(serve_until_signalled, cfg)  # SIGTERM: drain, then exit 0
    except* KeyboardInterrupt:  # Ctrl-C: Trio raises it inside the server's task groups
        log.info("stopped")
    return 0


def _simulate(args: argparse.Namespace) -> int:

    from .sim import simulator

    token = args.auth_token or os.environ.get("RELAY_TWILIO_AUTH_TOKEN", "")
    if not token:
        raise ConfigError(
            "the simulator signs like Twilio: pass --auth-token or set RELAY_TWILIO_AUTH_TOKEN "
            "to the relay's twilio.auth_token"
        )
    if args.outbound:  # the callee side of calls relay places (relay/sim/rest.py)
        from .sim import rest

        account = args.account_sid or os.environ.get("RELAY_TWILIO_ACCOUNT_SID", "")
        if not account:
            raise ConfigError("--outbound: pass --account-sid (the relay's twilio.account_sid)")
        callee = tuple(o.strip() for o in args.callee.split(",") if o.strip())
        try:
            interrupt.run(
                lambda: rest.serve_callees(
                    account,
                    token,
                    port=args.rest_port,
                    callee=callee,
                    calls=args.calls,
                    callee_seconds=args.duration,
                    report=lambda line: print(line, flush=True),
                )
            )
        except ValueError as exc:
            raise ConfigError(f"--callee: {exc}") from None
        return 0
    if not args.url:
        raise ConfigError("relay simulate: --url (the relay to call), or --outbound")
    if getattr(args, "mode", "stream") != "stream":  # Twilio-native speech agents
        from .sim import twilio_speech_cli

        return twilio_speech_cli.run(args, token)
    audio = simulator.load_wav(args.audio) if args.audio else None
    results = interrupt.run(
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

    return demo_main(calls=args.calls, out_dir=Path(args.out), agent=args.agent)


def _load_config(args: argparse.Namespace) -> Any:
    from . import config as config_mod

    cfg = config_mod.load(getattr(args, "config", None))
    if getattr(args, "public_url", None):
        cfg.server.public_url = args.public_url
    return cfg


def _open_store(args: argparse.Namespace) -> Any:
    from .control.plane import MEMORY, open_store

    cfg = _load_config(args)
    if cfg.store.url.strip().lower() == MEMORY:
        raise ConfigError('store.url is "memory": there is no store to work with')
    return cfg, open_store(cfg)


def _print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _when(ms: int | None) -> str:
    import time as _time

    if ms is None:
        return ""
    return _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(ms / 1000))


def _db(args: argparse.Namespace) -> int:
    from .control.secretbox import SecretBox

    if args.db_command == "new-key":
        print(SecretBox.new_key())
        return 0
    _cfg, store = _open_store(args)  # opening runs the migrations
    try:
        if args.db_command == "upgrade":
            print(f"store {store.describe()}: schema at revision {store.upgrade()}")
        elif args.db_command == "rotate-key":
            count = store.rotate_secrets()
            print(f"re-encrypted {count} stored secret(s) with the first encryption key")
    finally:
        store.close()
    return 0


def _tenants(args: argparse.Namespace) -> int:
    _cfg, store = _open_store(args)
    try:
        if args.tenants_command == "create":
            name = args.name.strip()
            if not 0 < len(name) <= 200 or any(ord(c) < 0x20 for c in name):
                raise ConfigError("tenant name: 1 to 200 printable characters")
            tenant, _key, plain = store.create_tenant(name)
            print(f"tenant  {tenant.id}  {tenant.name}")
            print(f"api key {plain}")
            print("(the key is shown once; it is stored hashed)")
        else:
            _print_table(
                ["ID", "NAME", "CREATED"],
                [[t.id, t.name, _when(t.created_at)] for t in store.list_tenants()],
            )
    finally:
        store.close()
    return 0


def _keys(args: argparse.Namespace) -> int:
    _cfg, store = _open_store(args)
    try:
        if store.get_tenant(args.tenant) is None:
            raise ConfigError(f"no tenant {args.tenant!r}")
        if args.keys_command == "create":
            key, plain = store.create_key(args.tenant, args.name or "")
            print(f"key {key.id}: {plain}")
            print("(the key is shown once; it is stored hashed)")
        elif args.keys_command == "revoke":
            if not store.revoke_key(args.tenant, args.key_id):
                print(f"no active key {args.key_id} for tenant {args.tenant}", file=sys.stderr)
                return 1
            print(f"key {args.key_id} revoked")
        else:
            _print_table(
                ["ID", "PREFIX", "NAME", "CREATED", "REVOKED"],
                [
                    [k.id, k.prefix + "…", k.name, _when(k.created_at), _when(k.revoked_at)]
                    for k in store.list_keys(args.tenant)
                ],
            )
    finally:
        store.close()
    return 0


def _numbers(args: argparse.Namespace) -> int:

    from .control.tenancy import sync_tenant_numbers

    cfg, store = _open_store(args)
    try:
        if args.numbers_command == "sync":
            if not cfg.server.public_url:
                raise ConfigError(
                    "server.public_url (or --public-url) is needed: numbers are pointed at it"
                )
            report = interrupt.run(sync_tenant_numbers, cfg, store, args.tenant)
            if report.error:
                print(f"sync failed: {report.error}", file=sys.stderr)
                return 1
            _print_table(
                ["NUMBER", "OUTCOME", "DETAIL"],
                [
                    [
                        r.number,
                        r.outcome,
                        (f"{r.code}: " if r.code else "") + r.reason,
                    ]
                    for r in report.results
                ],
            )
            return 0 if all(r.outcome != "failed" for r in report.results) else 1
        rows = store.list_numbers(args.tenant)
        _print_table(
            ["NUMBER", "AGENT", "LAST SYNC"],
            [[n.number, n.agent_id or "(default)", n.sync_outcome] for n in rows],
        )
    finally:
        store.close()
    return 0


def _calls(args: argparse.Namespace) -> int:
    import orjson

    _cfg, store = _open_store(args)
    tenant = None if args.tenant == "all" else args.tenant
    try:
        if args.sid:
            call = store.get_call(tenant, args.sid)
            if call is None:
                print(f"no call {args.sid}", file=sys.stderr)
                return 1
            print(orjson.dumps(call, option=orjson.OPT_INDENT_2).decode())
            return 0
        try:
            page = store.list_calls(tenant, max(1, min(args.limit, 200)), args.cursor)
        except ValueError as exc:  # a cursor this store did not make
            raise ConfigError(f"--cursor: {exc}") from None
    finally:
        store.close()
    _print_table(
        ["CALL SID", "STARTED", "DIR", "FROM", "TO", "AGENT", "STATUS", "END", "SECONDS"],
        [
            [
                c["call_sid"],
                _when(c["created_at"]),
                c["direction"],
                c["from"],
                c["to"],
                c["agent"],
                c["status"],
                c["end_reason"] or c["reject_reason"],
                f"{c['duration_ms'] / 1000:.1f}" if c["duration_ms"] is not None else "",
            ]
            for c in page.calls
        ],
    )
    if page.next_cursor:
        print(f"more: relay calls --cursor {page.next_cursor}")
    return 0


def _call(args: argparse.Namespace) -> int:
    """``relay call TO --from NUMBER --agent NAME``: place an outbound call (see
    relay/control/outbound.py). The running relay answers its webhooks, so both must share
    ``security.token_secret`` (and the store, for the record)."""

    from .control.directory import Directory
    from .control.history import record_values
    from .control.outbound import OutboundError, place, prepare

    cfg, store = _open_store(args)
    try:
        if not cfg.security.token_secret:
            raise ConfigError(
                "security.token_secret must be set, the same as the running relay's: the call's "
                "webhook carries a context signed with it"
            )
        if not cfg.server.public_url:
            raise ConfigError("server.public_url (or --public-url): Twilio calls relay back there")
        body: dict[str, Any] = {"to": args.to, "from": args.from_, "agent": args.agent}
        if args.greeting is not None:
            body["greeting"] = args.greeting
        if args.max_call_seconds is not None:
            body["max_call_seconds"] = args.max_call_seconds
        if args.machine_detection:
            body["machine_detection"] = args.machine_detection

        async def run() -> Any:
            req = await prepare(cfg, store, Directory(cfg, store), args.tenant, body)
            return await place(cfg, req)

        try:
            record = interrupt.run(run)
        except OutboundError as exc:
            where = f" ({exc.field})" if exc.field else ""
            print(f"relay call: not placed{where}: {exc.message}", file=sys.stderr)
            return 1
        store.save_call(record_values(record, record.tenant_id))
    finally:
        store.close()
    print(f"call {record.call_sid} placed: {record.from_number} -> {record.to_number}, "
          f"agent {record.agent}")  # fmt: skip
    return 0


def _bench(rest: list[str]) -> int:
    try:
        from bench.__main__ import main as bench_main  # type: ignore[import-not-found]
    except ImportError:
        print("relay bench: run it from a source checkout (python -m bench ...)", file=sys.stderr)
        return 2
    return int(bench_main(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except* KeyboardInterrupt:
        # Ctrl-C outside the server's own handler (while starting, in a sub-command, or a
        # worker interrupted during start-up): one line, not a traceback.
        print("relay: stopped", file=sys.stderr)
    return EXIT_INTERRUPTED  # (a serving relay's Ctrl-C is its own stop: _serve returns 0)


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    parser = argparse.ArgumentParser(prog="relay", description=__doc__)
    parser.add_argument(
        "--log-level",
        default=os.environ.get("RELAY_LOG_LEVEL"),
        help="debug, info (default for serve, demo, simulate), warning (default otherwise)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the relay (webhooks + media streams on one port)")
    p.add_argument("--config", help="path to relay.toml (environment overrides apply)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--public-url", help="the https:// URL Twilio reaches this relay at")
    p.add_argument(
        "--workers",
        default=os.environ.get("RELAY_SERVE_WORKERS", "auto"),
        help="relay processes sharing the port (SO_REUSEPORT): a number, or auto = one per "
        "core (default)",
    )
    p.set_defaults(func=_serve)

    p = sub.add_parser("simulate", help="place calls against a relay like Twilio would")
    p.add_argument("--url", help="relay base URL, e.g. http://127.0.0.1:8080")
    p.add_argument(
        "--calls", type=int, default=1, help="calls to place; --outbound: to answer (0: forever)"
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per call")
    p.add_argument(
        "--outbound",
        action="store_true",
        help="be Twilio for calls the relay places: serve its REST API and answer them",
    )
    p.add_argument("--rest-port", type=int, default=0, help="--outbound: the REST API's port")
    p.add_argument("--account-sid", help="--outbound: the relay's twilio.account_sid (or env)")
    p.add_argument(
        "--callee",
        default="human",
        help="--outbound: how callees answer, in turn (the last repeats): human, machine, "
        "busy, no-answer, failed; e.g. human,machine,busy",
    )
    p.add_argument("--audio", help="caller audio WAV (default: synthetic speech)")
    p.add_argument("--auth-token", help="Twilio auth token the relay checks (or env)")
    p.add_argument("--out", default="out/simulate", help="where heard audio WAVs go")
    p.add_argument(
        "--mode",
        choices=("stream", "conversation-relay", "gather"),
        default="stream",
        help="what the agent answers with: a media stream (default), ConversationRelay, <Gather>",
    )
    p.add_argument(
        "--say", action="append", default=[], help="a caller turn (conversation-relay, gather)"
    )
    p.set_defaults(func=_simulate)

    p = sub.add_parser("demo", help="relay + a local agent + simulated callers, all offline")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument(
        "--agent",
        choices=("local", "parrot"),
        default="local",
        help="local: spoken conversations (PocketSphinx + eSpeak NG); parrot: media only",
    )
    p.add_argument("--out", default="out/demo")
    p.set_defaults(func=_demo)

    # Store commands take --config before or after their sub-command (``relay db --config
    # X upgrade`` and ``relay db upgrade --config X``). The sub-command's copy defaults to
    # SUPPRESS: argparse copies a sub-parser's defaults over the namespace, and a default of
    # None there would silently drop a --config given before the sub-command.
    def store_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("--config", help="path to relay.toml (environment overrides apply)")
        return sp

    p = store_command("db", "the store: migrations and encryption keys")
    dbs = p.add_subparsers(dest="db_command", required=True)
    for name, text in (
        ("upgrade", "run the schema migrations (relay serve also does at start)"),
        ("new-key", "print a new Fernet key for security.encryption_key"),
        ("rotate-key", "re-encrypt stored secrets with the first security.encryption_key"),
    ):
        q = dbs.add_parser(name, help=text)
        q.add_argument("--config", default=argparse.SUPPRESS, help="path to relay.toml")
    p.set_defaults(func=_db)

    p = store_command("tenants", "tenants of this relay")
    ts = p.add_subparsers(dest="tenants_command", required=True)
    q = ts.add_parser("create", help="create a tenant and print its first API key")
    q.add_argument("name")
    q.add_argument("--config", default=argparse.SUPPRESS, help="path to relay.toml")
    q = ts.add_parser("list", help="list tenants")
    q.add_argument("--config", default=argparse.SUPPRESS, help="path to relay.toml")
    p.set_defaults(func=_tenants)

    p = store_command("keys", "a tenant's API keys")
    ks = p.add_subparsers(dest="keys_command", required=True)
    for name in ("create", "list", "revoke"):
        q = ks.add_parser(name, help=f"{name} API keys")
        q.add_argument("--tenant", default="default", help="tenant id (default: default)")
        q.add_argument("--config", default=argparse.SUPPRESS, help="path to relay.toml")
        if name == "create":
            q.add_argument("--name", help="a label for the key")
        if name == "revoke":
            q.add_argument("key_id")
    p.set_defaults(func=_keys)

    p = store_command("numbers", "a tenant's phone numbers")
    ns = p.add_subparsers(dest="numbers_command", required=True)
    for name, text in (
        ("sync", "point every number's voice webhook at this relay (Twilio REST API)"),
        ("list", "list numbers and their agents"),
    ):
        q = ns.add_parser(name, help=text)
        q.add_argument("--tenant", default="default", help="tenant id (default: default)")
        q.add_argument("--config", default=argparse.SUPPRESS, help="path to relay.toml")
        q.add_argument("--public-url", help="the https:// URL Twilio reaches this relay at")
    p.set_defaults(func=_numbers)

    p = store_command("calls", "call history (newest first); `relay calls show SID`")
    p.add_argument("show", nargs="?", choices=["show"], help=argparse.SUPPRESS)
    p.add_argument("sid", nargs="?", help="a CallSid: show that call in full")
    p.add_argument("--tenant", default="all", help="tenant id, or all (default)")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--cursor", help="continue a listing")
    p.set_defaults(func=_calls)

    p = store_command("call", "place an outbound call answered by an agent (Twilio REST)")
    p.add_argument("to", help="the number to call, E.164 (+14155551234)")
    p.add_argument("--from", dest="from_", required=True, help="one of the tenant's numbers")
    p.add_argument("--agent", required=True, help="agent id (or relay.toml name)")
    p.add_argument("--tenant", default="default", help="tenant id (default: default)")
    p.add_argument("--greeting", help="what the agent says first (overrides its greeting)")
    p.add_argument("--max-call-seconds", type=float, help="this call's cap")
    p.add_argument("--machine-detection", choices=["Enable", "DetectMessageEnd"])
    p.add_argument("--public-url", help="the https:// URL Twilio reaches this relay at")
    p.set_defaults(func=_call)

    args = parser.parse_args(argv)
    _setup_logging(
        args.log_level or ("info" if args.command in ("serve", "demo", "simulate") else "warning")
    )
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"relay: configuration error: {exc}", file=sys.stderr)
        return 2
    except RelayError as exc:  # the store, a secret, Twilio: one line, not a traceback
        print(f"relay: {exc.kind}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
