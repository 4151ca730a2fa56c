"""Configuration: ``relay.toml`` plus ``RELAY_*`` environment overrides.

Every key of every section can be overridden by ``RELAY_<SECTION>_<KEY>`` (agent options by
``RELAY_AGENTS_<NAME>_<KEY>``), so a deployment can keep secrets out of the file. Secrets are
never printed in full: :func:`mask` shows a short tail only.
"""

from __future__ import annotations

import os
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

SECRET_KEYS = ("auth_token", "api_key", "admin_key", "token_secret", "encryption_key")


def is_secret_key(key: str) -> bool:
    """Option names whose values are secrets (masked, write-only, encrypted at rest)."""
    return key in SECRET_KEYS or key.endswith(("_api_key", "_token", "_secret"))


def mask(value: str | None) -> str:
    """``sk-…abcd`` style: enough to recognise a key, useless to an attacker."""
    if not value:
        return "(unset)"
    if len(value) <= 8:
        return "…" + "*" * 4
    return f"{value[:3]}…{value[-4:]}"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = ""
    #: honour X-Forwarded-Proto/Host (first value) when computing the URL Twilio signed
    trust_forwarded: bool = False
    max_calls: int = 1000
    #: on SIGTERM: how long active calls may go on before relay ends them (relay/http/drain.py)
    drain_timeout_s: float = 30.0
    #: refuse calls at the webhook (reason overloaded) before quality degrades
    #: (relay/media/headroom.py): projected CPU of this worker with one more call, as a
    #: fraction of a core, and the event loop's lag
    admission: bool = True
    admission_max_cpu: float = 0.8
    admission_max_lag_ms: float = 10.0
    #: garbage collection on a clock, off the per-frame path (relay/gcpolicy.py): the young
    #: generations every gc_young_s, a full collection every gc_full_s; 0 = not on a clock.
    #: A young pause grows with the interval (it walks what was allocated since and still
    #: lives): 0.25 s keeps each one near a millisecond at a few hundred calls, 1 s ~3 ms;
    #: see relay/gcpolicy.py (an hour's soak at 0.25 s held memory flat).
    gc_young_s: float = 0.25
    gc_full_s: float = 600.0


@dataclass
class TwilioConfig:
    auth_token: str = ""
    account_sid: str = ""
    #: REST API base URL; empty = Twilio's, from region/edge (api.{edge}.{region}.twilio.com)
    api_base_url: str = ""
    region: str = ""
    edge: str = ""
    rest_timeout_s: float = 10.0


@dataclass
class SecurityConfig:
    admin_key: str = ""
    token_secret: str = ""
    token_ttl_s: float = 300.0
    #: Fernet key(s) for secrets at rest, comma-separated, newest first (see
    #: relay/control/secretbox.py); empty = a key file beside an SQLite store
    encryption_key: str = ""
    #: let every agent's prep_webhook / post_call_webhook reach private, loopback and
    #: link-local addresses (per agent: the allow_private_urls option)
    allow_private_urls: bool = False
    #: the post-call webhook signing secret of a relay without a store (store.url = memory);
    #: with a store each tenant has its own (GET /api/v1/settings/webhook-secret)
    webhook_secret: str = ""


@dataclass
class MediaConfig:
    downlink_frame_ms: int = 100
    max_lead_ms: int = 200
    send_timeout_s: float = 2.0
    max_message_bytes: int = 65536
    start_timeout_s: float = 10.0
    agent_connect_timeout_s: float = 10.0
    #: how long to wait for the last mark echo after the agent ends before hanging up anyway
    final_mark_timeout_s: float = 5.0
    uplink_reorder_ms: int = 0
    #: multiplex media sockets on one epoll set (see relay/reactor.py); off = one parked
    #: Trio task per socket (slower, same behaviour)
    reactor: bool = True
    #: under load, start a reactor pass at most this often, so media messages gather in
    #: between (see relay/media/reactor.py; paced by a kernel timer, relay/media/passtimer.py);
    #: 0 = wake up for every message
    reactor_coalesce_ms: float = 1.5
    #: serve that pass clock's ticks from Trio's idle point rather than a task wake-up
    #: (relay/media/runloop.py: 65 -> 37 µs of CPU per pass, `python -m bench.wakeup`);
    #: off = every tick waits through Trio
    reactor_idle_clock: bool = True
    #: to an agent that splices Twilio's base64 (μ-law passthrough) or the resampled audio
    #: (PCM) into its own messages, each read from Twilio goes in one compiled call (recv,
    #: parse, build, send: relay/media/_codec.pyx UplinkPump); off = through the Python
    #: layers (same messages, same behaviour)
    uplink_pump: bool = True
    #: the other direction: a read from an OpenAI Realtime agent holding only audio deltas
    #: goes to Twilio in one compiled call (recv, parse, book, pace, build, send:
    #: relay/media/_codec.pyx DownlinkHandler); off = through the Python layers (same
    #: messages, same behaviour)
    agent_direct: bool = True


@dataclass
class CallsConfig:
    default_agent: str = "parrot"
    max_duration_s: float = 3600.0
    records_kept: int = 1000
    #: a warm agent session (opened at the voice webhook) whose stream has not started
    #: within this many seconds is closed (relay/control/warm.py)
    warm_start_ttl_s: float = 15.0
    #: call recordings (record = true); empty: "recordings" next to the SQLite database,
    #: or ./relay-data/recordings
    recordings_dir: str = ""
    #: post-call webhook: attempts per call (1 + retries) and the first retry's delay
    #: (doubled for each later one)
    post_call_attempts: int = 5
    post_call_backoff_s: float = 2.0


@dataclass
class StoreConfig:
    #: sqlite:///path.db (embedded default), postgresql://user:pass@host/db (several
    #: processes or machines), or "memory" (no persistence: records live in this process)
    url: str = "sqlite:///./relay-data/relay.db"
    #: call records older than this are pruned (0 = keep forever)
    retention_days: float = 90.0


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    twilio: TwilioConfig = field(default_factory=TwilioConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    calls: CallsConfig = field(default_factory=CallsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    numbers: dict[str, str] = field(default_factory=dict)
    agents: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"parrot": {"type": "parrot", "greeting": True}}
    )

    # -- derived -------------------------------------------------------------------------
    @property
    def public_url(self) -> str:
        url = self.server.public_url or f"http://{self.server.host}:{self.server.port}"
        return url.rstrip("/")

    @property
    def stream_url(self) -> str:
        """The Media Streams URL put in TwiML: wss:// for https, ws:// for local http."""
        parts = urlsplit(self.public_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}{parts.path}/twilio/stream"

    def agent_for(self, called_number: str) -> str:
        return self.numbers.get(called_number, self.calls.default_agent)

    def token_secret_bytes(self) -> bytes:
        if not self.security.token_secret:
            # Random per process: tokens then only verify in the process that issued them,
            # which is right for one process. Set token_secret for several processes.
            self.security.token_secret = secrets.token_urlsafe(32)
        return self.security.token_secret.encode()

    def validate(self, *, require_auth_token: bool = True) -> None:
        persistent = self.store.url.strip().lower() != "memory"
        if require_auth_token and not self.twilio.auth_token and not persistent:
            raise ConfigError(
                "twilio.auth_token is not set (set RELAY_TWILIO_AUTH_TOKEN or [twilio] "
                "auth_token): relay refuses to run without checking Twilio signatures"
            )
        parts = urlsplit(self.public_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"server.public_url must be http(s)://host, got {self.public_url!r}")
        if self.calls.default_agent not in self.agents:
            raise ConfigError(
                f"calls.default_agent {self.calls.default_agent!r} has no [agents."
                f"{self.calls.default_agent}] section"
            )
        for number, agent in self.numbers.items():
            if agent not in self.agents:
                raise ConfigError(f"numbers.{number} names unknown agent {agent!r}")
        from .agents.registry import validate_agent

        for name, options in self.agents.items():
            validate_agent(options, where=f"agents.{name}")
        if self.media.downlink_frame_ms < 10 or self.media.downlink_frame_ms % 10:
            raise ConfigError("media.downlink_frame_ms must be a multiple of 10, at least 10")

    def describe(self) -> dict[str, Any]:
        """The effective configuration with every secret masked (for logs and /healthz)."""
        out: dict[str, Any] = {}
        for section in ("server", "twilio", "security", "media", "calls", "store"):
            values = dict(vars(getattr(self, section)))
            for key in values:
                if is_secret_key(key):
                    values[key] = mask(values[key])
            out[section] = values
        out["numbers"] = dict(self.numbers)
        out["agents"] = {
            name: {k: (mask(v) if is_secret_key(k) else v) for k, v in opts.items()}
            for name, opts in self.agents.items()
        }
        return out


def _coerce(value: str, like: Any) -> Any:
    if isinstance(like, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"expected a boolean, got {value!r}")
    if isinstance(like, int):
        return int(value)
    if isinstance(like, float):
        return float(value)
    return value


def _apply_section(obj: Any, data: Mapping[str, Any], section: str) -> None:
    known = {f.name for f in fields(obj)}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"unknown key {section}.{key}")
        current = getattr(obj, key)
        if isinstance(value, str) and not isinstance(current, str):
            value = _coerce(value, current)
        setattr(obj, key, value)


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (optional) then apply environment overrides."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    cfg = Config()
    for section in ("server", "twilio", "security", "media", "calls", "store"):
        if section in data:
            _apply_section(getattr(cfg, section), data.pop(section), section)
    if "numbers" in data:
        cfg.numbers = {str(k): str(v) for k, v in data.pop("numbers").items()}
    if "agents" in data:
        cfg.agents = {str(k): dict(v) for k, v in data.pop("agents").items()}
    if data:
        raise ConfigError(f"unknown config section(s): {', '.join(sorted(data))}")
    _apply_env(cfg, env)
    return cfg


def _apply_env(cfg: Config, env: Mapping[str, str]) -> None:
    for section in ("server", "twilio", "security", "media", "calls", "store"):
        obj = getattr(cfg, section)
        for f in fields(obj):
            name = f"RELAY_{section.upper()}_{f.name.upper()}"
            if name in env:
                setattr(obj, f.name, _coerce(env[name], getattr(obj, f.name)))
    prefix = "RELAY_AGENTS_"
    for name, value in env.items():
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :].lower()
        # agent names may contain underscores: match the longest configured agent name
        for agent in sorted(cfg.agents, key=len, reverse=True):
            if rest.startswith(agent.lower() + "_"):
                key = rest[len(agent) + 1 :]
                current = cfg.agents[agent].get(key)
                cfg.agents[agent][key] = (
                    _coerce(value, current)
                    if current is not None and not isinstance(current, str)
                    else value
                )
                break
