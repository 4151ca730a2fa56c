"""Where relay may connect: the one policy for connections to addresses somebody chose.

A tenant's stored agent names hosts of its choosing (``url``, ``llm_url``, ``stt_url``,
``tts_url``, webhooks, HTTP tools). They are checked when saved (relay/http/api.py), but a
name can resolve to a public address then and to the relay's own network later (DNS
rebinding). So the check is made again at every connection: the host is resolved once
(:func:`resolve`), every address must be public (:func:`is_public_address`: private,
loopback, link-local, CGNAT, reserved, multicast, unspecified and their IPv6 embeddings are
not), and the connection goes to the address just checked, the name staying in ``Host``
and TLS SNI/verification: the check and the connect use the same resolution.

Who is checked:

* an agent's connections (WebSocket, chat model, speech over HTTP): when the call runs
  under :func:`guarding` with ``refuse_private`` True, i.e. a tenant's stored agent while
  ``[security] allow_private_urls`` is off (relay/control/warm.py decides; the deployer's
  relay.toml agents may point at localhost deliberately);
* HTTP tools (unless the tool sets ``allow_private``, which only relay.toml can),
  ``prep_webhook`` / ``post_call_webhook`` (relay/control/outgoing.py), hold files: those
  callers pass ``refuse_private`` explicitly.

A refusal raises :class:`AddressRefused` (an :class:`~relay.errors.AgentError`, kind
``private_address``), is logged once and counted as ``relay_errors_total{kind=
"private_address"}`` in the metrics of the guard in force.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio

from .errors import AgentError

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = [
    "AddressRefused",
    "Guard",
    "current",
    "guarding",
    "http_target",
    "is_public_address",
    "open_stream",
    "resolve",
    "vet",
]

log = logging.getLogger("relay.netguard")

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}
_TLS = ("https", "wss")


class AddressRefused(AgentError):
    """A host resolved to a non-public address where only public ones are allowed."""

    kind = "private_address"


@dataclass(frozen=True)
class Guard:
    """The policy of the task (a call) and its children: ``refuse_private`` for a tenant's
    agent; ``metrics`` count refusals; ``who`` names the agent in the log line."""

    refuse_private: bool
    metrics: Metrics | None = None
    who: str = ""


_GUARD: ContextVar[Guard | None] = ContextVar("relay_netguard", default=None)


@contextmanager
def guarding(guard: Guard) -> Iterator[None]:
    """Within the block (and in every task started from it), connections follow ``guard``.
    Trio copies the context into child tasks, so an agent's reconnects and per-turn
    requests inherit it; the previous value is restored on exit."""
    token = _GUARD.set(guard)
    try:
        yield
    finally:
        _GUARD.reset(token)


def current() -> Guard | None:
    return _GUARD.get()


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast address. Private, loopback, link-local,
    shared (CGNAT), reserved, multicast and unspecified addresses are not; nor are IPv6
    forms that embed one of those (IPv4-mapped, 6to4, NAT64)."""
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(
            address.split("%", 1)[0]
        )
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not is_public_address(str(embedded)):
            return False
    return ip.is_global and not ip.is_multicast


async def resolve(host: str, port: int) -> list[str]:
    """The addresses of ``host`` (in the resolver's order, without repeats); OSError when it
    does not resolve. The one resolver of every check (tests replace it)."""
    infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _refuse(what: str, host: str, address: str, guard: Guard | None) -> AddressRefused:
    who = f" ({guard.who})" if guard is not None and guard.who else ""
    log.warning("%s refused%s: %s resolves to the non-public address %s", what, who, host, address)
    if guard is not None and guard.metrics is not None:
        guard.metrics.error(AddressRefused.kind)
    return AddressRefused(
        f"{what}: {host} resolves to a private, loopback or link-local address; refused "
        "(allow_private_urls)"
    )


async def vet(host: str, port: int, *, what: str, refuse_private: bool | None = None) -> str | None:
    """The address to connect to for ``host``: None when no check applies (connect by name
    as usual), else its first address once every address proved public. ``refuse_private``
    None: the guard in force decides. Raises :class:`AddressRefused`, or AgentError (kind
    ``agent_connect``) when the name does not resolve."""
    guard = _GUARD.get()
    if refuse_private is None:
        refuse_private = guard is not None and guard.refuse_private
    refuse = refuse_private
    if not refuse:
        return None
    try:
        addresses = await resolve(host, port)
    except OSError as exc:
        raise AgentError(f"{what}: cannot resolve {host}: {exc}", kind="agent_connect") from None
    bad = [a for a in addresses if not is_public_address(a)]
    if bad or not addresses:
        raise _refuse(what, host, bad[0] if bad else "(none)", guard)
    return addresses[0]


def _port(scheme: str, port: int | None) -> int:
    return port or _DEFAULT_PORTS.get(scheme, 80)


async def open_stream(
    host: str, port: int, *, tls: bool, what: str, refuse_private: bool | None = None
) -> trio.abc.Stream:
    """A TCP (``tls``: TLS, verified for ``host``) stream to ``host``, through :func:`vet`."""
    address = await vet(host, port, what=what, refuse_private=refuse_private)
    if address is None:
        if tls:
            return await trio.open_ssl_over_tcp_stream(host, port, https_compatible=True)
        return await trio.open_tcp_stream(host, port)
    tcp = await trio.open_tcp_stream(address, port)
    if not tls:
        return tcp
    # SNI and certificate verification keep the name; the TCP connection is to the address.
    return trio.SSLStream(
        tcp, ssl.create_default_context(), server_hostname=host, https_compatible=True
    )


async def http_target(
    url: str, headers: Mapping[str, str], *, what: str, refuse_private: bool | None = None
) -> tuple[Any, dict[str, str], dict[str, Any]]:
    """(URL, headers, httpx extensions) for one httpx request to ``url`` through
    :func:`vet`: unchecked, the URL as is; checked, the URL with the vetted address as its
    host, ``Host`` keeping the name and ``sni_hostname`` (TLS SNI and verification)."""
    import httpx

    parts = urlsplit(url)
    host = parts.hostname or ""
    out = dict(headers)
    address = await vet(
        host, _port(parts.scheme, parts.port), what=what, refuse_private=refuse_private
    )
    if address is None or address == host:
        return url, out, {}
    if not any(k.lower() == "host" for k in out):
        out["Host"] = parts.netloc.rpartition("@")[2]
    extensions: dict[str, Any] = {}
    if parts.scheme in _TLS:
        extensions["sni_hostname"] = host
    return httpx.URL(url).copy_with(host=address), out, extensions
