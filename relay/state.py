"""The relay's shared state: one instance per process, handed to every part that needs it.

It lives in a module of its own so the HTTP surfaces (``relay.http``) and the media path
(``relay.media.call``) both depend on it without depending on each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config import Config
from .control.plane import ControlPlane, open_control_plane
from .metrics import Metrics
from .protocol.signature import StreamTokens
from .records import CallRegistry
from .tools import ToolRegistry, default_registry

if TYPE_CHECKING:
    from .media.call import Call
    from .media.reactor import Reactor


@dataclass
class RelayState:
    cfg: Config
    metrics: Metrics = field(default_factory=Metrics)
    records: CallRegistry = field(default_factory=CallRegistry)
    tools: ToolRegistry = field(default_factory=default_registry)
    tokens: StreamTokens = field(init=False)
    calls: set[Call] = field(default_factory=set)
    #: process-wide media socket multiplexer; None where epoll is missing (then each
    #: call's readers await their sockets directly)
    reactor: Reactor | None = None
    #: store, directory (accounts, agents, numbers), call history writer
    control: ControlPlane = field(init=False)

    def __post_init__(self) -> None:
        self.control = open_control_plane(self.cfg, self.metrics)
        self.tokens = StreamTokens(self.cfg.token_secret_bytes(), self.cfg.security.token_ttl_s)
        self.records.keep = self.cfg.calls.records_kept
