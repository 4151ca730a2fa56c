"""The relay's shared state: one instance per process, handed to every part that needs it.

It lives in a module of its own so the HTTP surfaces (``relay.http``) and the media path
(``relay.media.call``) both depend on it without depending on each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config import Config
from .control.cluster import WorkerIdentity
from .control.plane import ControlPlane, open_control_plane
from .control.policies import CallPolicies
from .control.postcall import PostCallSender
from .control.warm import WarmStarts
from .gcpolicy import GcSweeper
from .media.headroom import Headroom
from .media.hold import HoldLibrary
from .media.recording import RecordingWriter, default_directory
from .metrics import Metrics
from .protocol.signature import StreamTokens
from .records import CallRegistry
from .tools import ToolRegistry, default_registry

if TYPE_CHECKING:
    from .agents.twilio_speech.conversation_relay import ConversationRelaySession
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
    #: ConversationRelay sessions of this process (text only, no media call): a drain
    #: waits for them like for calls, then ends the rest
    speech_sessions: set[ConversationRelaySession] = field(default_factory=set)
    #: process-wide media socket multiplexer; None where epoll is missing (then each
    #: call's readers await their sockets directly)
    reactor: Reactor | None = None
    #: store, directory (accounts, agents, numbers), call history writer
    control: ControlPlane = field(init=False)
    #: per-agent call slots and the voice webhook's per-call plans (relay/control/policies.py)
    policies: CallPolicies = field(init=False)
    #: hold audio/music decoded once per file (relay/media/hold.py)
    hold_library: HoldLibrary = field(default_factory=HoldLibrary)
    #: agent sessions opened at the voice webhook, waiting for their stream (warm start)
    warm: WarmStarts = field(init=False)
    #: call recordings (record = true), written off the loop (relay/media/recording.py)
    recordings: RecordingWriter = field(init=False)
    #: post-call webhook deliveries (relay/control/postcall.py)
    postcall: PostCallSender = field(init=False)
    #: which worker of ``relay serve --workers N`` this process is (relay/http/workers.py)
    worker: WorkerIdentity = field(default_factory=WorkerIdentity.from_env)
    #: this worker's load, for admission control at the voice webhook
    headroom: Headroom = field(init=False)
    #: full garbage collections on a clock (relay/gcpolicy.py)
    gc: GcSweeper = field(init=False)
    #: SIGTERM: no new calls, the active ones finish (relay/http/drain.py)
    draining: bool = False

    def __post_init__(self) -> None:
        self.control = open_control_plane(self.cfg, self.metrics)
        self.tokens = StreamTokens(self.cfg.token_secret_bytes(), self.cfg.security.token_ttl_s)
        self.records.keep = self.cfg.calls.records_kept
        self.headroom = Headroom(self.cfg.server, lambda: self.metrics.active_calls)
        self.gc = GcSweeper(self.cfg.server.gc_young_s, self.cfg.server.gc_full_s)
        self.metrics.sections.append(self.gc.render)
        self.metrics.sections.append(self.headroom.render)
        self.policies = CallPolicies(self.cfg.security.token_ttl_s, self.worker.shared_slots())
        self.warm = WarmStarts(
            self.metrics, limit=self.cfg.server.max_calls, ttl_s=self.cfg.calls.warm_start_ttl_s
        )
        history = self.control.history
        self.recordings = RecordingWriter(
            default_directory(self.cfg),
            self.metrics,
            retention_days=self.cfg.store.retention_days,
            on_complete=None if history is None else lambda r: history.save(r, r.tenant_id),
        )
        self.postcall = PostCallSender(self)
