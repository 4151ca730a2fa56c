"""Agent connections that notice when they die.

A half-dead agent socket (the peer stops reading, or vanishes without FIN or RST) is the
normal way a cloud connection fails; TCP alone would leave the caller in dead air until the
maximum call duration. :func:`watch` is the per-connection watchdog every adapter runs next
to its socket's flusher (:func:`run_connection` runs both):

* every ``ping_interval_s`` a WebSocket ping goes out, so an idle but healthy peer still
  sends something (its pong) at least that often;
* nothing at all received (data or pong) for ``dead_after_s`` -> dead;
* bytes written but not taken by the kernel for ``dead_after_s`` (the peer stopped reading
  and the TCP window closed) -> dead;
* a peer that answered pings before but has not read one for ``dead_after_s`` (it still
  sends, but no longer reads: counted from the newest ping it is known to have read) ->
  dead;
* ``idle_keepalive_s`` + ``on_idle``: the adapter's keepalive message (Deepgram
  ``KeepAlive``) when nothing was sent for that long.

Death is :class:`relay.errors.AgentError` with kind ``agent_disconnected``; the call engine
ends the call with end reason "agent disconnected" (``relay/media/call.py``), or an adapter
that can recover replaces the connection (:class:`relay.agents.session.SessionSocketAgent`,
Gemini's session resumption) within ``reconnect_timeout_s``.

Where the checks run: with a media reactor running, inline at the end of its passes
(``relay.media.sweep``), at most one pass (~1.5 ms under load) after their due time,
while the watchdog's task stays parked; when no pass comes (no media flowing) the task
runs a check itself ``BACKSTOP_S`` (25 ms) after its due time; with no reactor at all it
sleeps to each due time exactly.

Defaults: the issue's budget is 5 s from the moment an agent stalls or vanishes until its
call has ended or recovered. The checks run at their deadlines (late by the above at
most), so detection takes ``dead_after_s`` (3 s), measured from the last sign of life;
recovery then has
``reconnect_timeout_s`` (2 s) to bring a session up again, or the call ends:
3 s + 2 s = 5 s. A healthy peer is not declared dead by mistake: WebSocket pings are
answered by the vendor's connection layer, not by the model, so a vendor busy generating
(or silent, waiting for the caller) still answers each 1 s ping within one network round
trip; a pong may come up to 2 s late (several TCP retransmissions in a row) before the
3 s deadline passes, and a peer that fails that is past the point where the caller would
notice anyway. A ping a second is a few dozen bytes per call and second, next to fifty
media messages.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import trio

from ..errors import AgentError, ConfigError, ConnectionClosed
from ..media import websocket
from ..media.sweep import BACKSTOP_S, Sweep

# Re-exported: relay.agents.text (cascaded and local agents) imports these from here.
from .options import (  # noqa: F401
    as_bool,
    as_seconds,
    option_bool,
    option_int,
    option_seconds,
    option_str,
    option_table,
)

__all__ = [
    "DEFAULT_DEAD_AFTER_S",
    "DEFAULT_PING_INTERVAL_S",
    "DEFAULT_RECONNECT_TIMEOUT_S",
    "LIVENESS_KEYS",
    "RECONNECT_KEYS",
    "LivenessOptions",
    "conversation_context",
    "is_recoverable",
    "reconnect_options",
    "run_connection",
    "seeded_instructions",
    "watch",
]

log = logging.getLogger("relay.agents.liveness")

#: Agent option names read by :meth:`LivenessOptions.from_config`.
LIVENESS_KEYS = frozenset({"ping_interval_s", "dead_after_s"})
#: Agent option names read by :func:`reconnect_options`.
RECONNECT_KEYS = frozenset({"reconnect", "reconnect_timeout_s"})

#: Defaults (see the module docstring): dead within 3 s, recovered or ended within 5 s.
DEFAULT_PING_INTERVAL_S = 1.0
DEFAULT_DEAD_AFTER_S = 3.0
DEFAULT_RECONNECT_TIMEOUT_S = 2.0

#: Close codes after which a new connection may well work (going away, abnormal loss,
#: server error, service restart, try again later, bad gateway). A normal close (1000), a
#: policy or protocol violation or an application code (4xxx: auth, quota) is final.
RECOVERABLE_CLOSE_CODES = frozenset({1001, 1006, 1011, 1012, 1013, 1014})


@dataclass(frozen=True, slots=True)
class LivenessOptions:
    """How an agent connection is watched (see the module docstring)."""

    ping_interval_s: float = DEFAULT_PING_INTERVAL_S
    dead_after_s: float = DEFAULT_DEAD_AFTER_S
    #: Call ``on_idle`` (see :func:`watch`) after this long without sending; None: never.
    idle_keepalive_s: float | None = None

    def __post_init__(self) -> None:
        as_seconds("ping_interval_s", self.ping_interval_s)
        as_seconds("dead_after_s", self.dead_after_s)
        if self.idle_keepalive_s is not None:
            as_seconds("idle_keepalive_s", self.idle_keepalive_s)
        if self.dead_after_s <= self.ping_interval_s:
            # an idle, healthy peer sends nothing but pongs: it would be declared dead
            raise ConfigError(
                f"agents.*.dead_after_s: must be longer than ping_interval_s "
                f"({self.dead_after_s:g} s <= {self.ping_interval_s:g} s)"
            )

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> LivenessOptions:
        """``ping_interval_s`` and ``dead_after_s`` from an ``[agents.NAME]`` table (other
        keys are ignored); ConfigError names the key when a value is not a positive number."""
        kwargs: dict[str, float] = {}
        for key in ("ping_interval_s", "dead_after_s"):
            value = options.get(key)
            if value is not None and value != "":
                kwargs[key] = as_seconds(key, value)
        return cls(**kwargs)

    def with_keepalive(self, idle_keepalive_s: float | None) -> LivenessOptions:
        return LivenessOptions(self.ping_interval_s, self.dead_after_s, idle_keepalive_s)


def reconnect_options(options: Mapping[str, Any]) -> tuple[bool, float]:
    """(``reconnect``, ``reconnect_timeout_s``) from an agent table, validated."""
    reconnect = as_bool("reconnect", options.get("reconnect", False))
    timeout = options.get("reconnect_timeout_s")
    seconds = (
        DEFAULT_RECONNECT_TIMEOUT_S
        if timeout is None or timeout == ""
        else as_seconds("reconnect_timeout_s", timeout)
    )
    return reconnect, seconds


def _dead(what: str) -> AgentError:
    return AgentError(f"agent connection dead: {what}", kind="agent_disconnected")


class _Watchdog:
    """The checks of one connection, run at each wake: :meth:`check` raises when the
    connection is dead and otherwise returns when it must run next."""

    __slots__ = (
        "dead_after",
        "interval",
        "keepalive",
        "next_ping",
        "on_idle",
        "ping_out",
        "read_at",
        "sent_at",
        "sent_count",
        "ws",
    )

    def __init__(
        self,
        ws: websocket.WebSocket,
        opts: LivenessOptions,
        on_idle: Callable[[], None] | None,
        now: float,
    ) -> None:
        self.ws = ws
        self.dead_after = opts.dead_after_s
        self.interval = opts.ping_interval_s
        self.keepalive = opts.idle_keepalive_s if on_idle is not None else None
        self.on_idle = on_idle
        self.next_ping = now + self.interval
        self.ping_out: float | None = None  # oldest ping not answered yet
        self.read_at: float | None = None  # the newest ping the peer is known to have read
        self.sent_count = ws.messages_out
        self.sent_at = now

    def check(self, now: float) -> float:
        ws = self.ws
        dead_after = self.dead_after
        if ws.closed is not None:
            raise ws.closed
        silent = now - ws.last_received
        if silent >= dead_after:
            raise _dead(f"nothing received for {silent:.1f} s")
        backlog = ws.send_backlog_since
        if backlog is not None and now - backlog >= dead_after:
            raise _dead(f"sent data not taken for {now - backlog:.1f} s (peer not reading)")
        ping_out, read_at = self.ping_out, self.read_at
        if ping_out is not None and ws.last_pong >= ping_out:
            read_at = self.read_at = ping_out
            ping_out = self.ping_out = None
        if ping_out is not None and read_at is not None and now - read_at >= dead_after:
            raise _dead(
                f"ping unanswered for {now - ping_out:.1f} s, nothing read for "
                f"{now - read_at:.1f} s (peer not reading)"
            )
        if now >= self.next_ping:
            ws.send_ping_nowait()
            if ping_out is None:
                ping_out = self.ping_out = now
            self.next_ping = now + self.interval
        # (the wake is planned after the ping: planned before it, the ping's own due time
        # came out as the next wake, one extra task step per ping)
        wake = min(self.next_ping, ws.last_received + dead_after)
        if backlog is not None:
            wake = min(wake, backlog + dead_after)
        keepalive = self.keepalive
        if keepalive is not None:
            assert self.on_idle is not None
            if ws.messages_out != self.sent_count:
                self.sent_count = ws.messages_out
                self.sent_at = now
            elif now - self.sent_at >= keepalive:
                self.on_idle()
                self.sent_count = ws.messages_out
                self.sent_at = now
            wake = min(wake, self.sent_at + keepalive)
        if ping_out is not None and read_at is not None:
            wake = min(wake, read_at + dead_after)
        return max(wake, now)


async def watch(
    ws: websocket.WebSocket,
    opts: LivenessOptions,
    *,
    on_idle: Callable[[], None] | None = None,
) -> NoReturn:
    """Watch ``ws`` until it is dead; then raise (never returns).

    Raises :class:`AgentError` (kind ``agent_disconnected``) when the peer is dead, or the
    socket's own :class:`ConnectionClosed` once it is closed. Someone else must be reading
    ``ws`` (the engine's agent reader): reads are what stamp ``ws.last_received``.

    With a media reactor running (``Sweep.current()``), the checks run inline at the end
    of its passes and this task stays parked (``relay.media.sweep``); it runs a check
    itself only when no pass came within ``BACKSTOP_S`` of one's due time.
    """
    dog = _Watchdog(ws, opts, on_idle, trio.current_time())
    sweep = Sweep.current()
    if sweep is None:
        while True:
            await trio.sleep_until(dog.check(trio.current_time()))
    await _watch_swept(dog, sweep)


async def _watch_swept(dog: _Watchdog, sweep: Sweep) -> NoReturn:
    failure: list[Exception] = []
    dead = trio.Event()
    backstop = trio.CancelScope()

    def swept(now: float) -> None:
        try:
            wake = dog.check(now)
        except Exception as exc:  # raised in the watching task, as without a sweep
            failure.append(exc)
            dead.set()
            return
        timer.set(wake)
        backstop.deadline = wake + BACKSTOP_S

    timer = sweep.timer(swept)
    try:
        while True:
            wake = dog.check(trio.current_time())  # the first check, or no pass came
            timer.set(wake)
            with trio.CancelScope(deadline=wake + BACKSTOP_S) as backstop:
                await dead.wait()
            if failure:
                raise failure[0]
    finally:
        timer.cancel()


async def run_connection(
    ws: websocket.WebSocket,
    opts: LivenessOptions,
    *,
    on_idle: Callable[[], None] | None = None,
) -> NoReturn:
    """The background work of one agent connection: the socket's flusher (bounded sends)
    and :func:`watch`. Raises the first failure of either as is (ConnectionClosed, e.g.
    ``SendTimedOut``, or AgentError ``agent_disconnected``), never an ExceptionGroup."""
    failure: ConnectionClosed | AgentError | None = None

    async def guard(fn: Callable[[], Any]) -> None:
        nonlocal failure
        try:
            await fn()
        except (ConnectionClosed, AgentError) as exc:
            if failure is None:
                failure = exc
            nursery.cancel_scope.cancel()

    async def watcher() -> None:
        await watch(ws, opts, on_idle=on_idle)

    # The watcher runs in this task, the nursery's body: one task fewer per call than a
    # child for each (a flusher failure cancels the body through the nursery's scope).
    async with trio.open_nursery() as nursery:
        nursery.start_soon(guard, ws.run_flusher)
        await guard(watcher)
    if failure is None:  # pragma: no cover - both tasks only end by raising
        failure = _dead("connection tasks ended")
    raise failure


def is_recoverable(exc: BaseException) -> bool:
    """Whether a new connection may help: a dead or lost connection, a send timeout, or a
    close code that means "come back later"; not a normal close or an auth/policy refusal."""
    if isinstance(exc, AgentError):
        return exc.kind == "agent_disconnected"
    if isinstance(exc, websocket.SendTimedOut):
        return True
    if isinstance(exc, ConnectionClosed):
        return exc.code in RECOVERABLE_CLOSE_CODES
    return False


# --- seeding a new session with the conversation so far -----------------------------------
_ROLE_NAMES = {"caller": "Caller", "agent": "Agent"}

CONTEXT_HEADER = (
    "This phone call was briefly interrupted by a technical problem and continues now on "
    "a new connection. Do not greet the caller again and do not mention the interruption "
    "unless asked; continue the conversation where it stopped. The conversation so far:"
)


def conversation_context(history: Iterable[tuple[str, str]], max_chars: int = 6000) -> str:
    """The conversation so far as text for an agent's instructions ("" without history).
    ``history`` holds (role, text) pairs, role "caller" or "agent"; the newest turns are
    kept when it is longer than ``max_chars``."""
    lines: list[str] = []
    total = 0
    for role, text in reversed(list(history)):
        text = " ".join(str(text).split())
        if not text:
            continue
        line = f"{_ROLE_NAMES.get(role, role.capitalize())}: {text}"
        if total + len(line) > max_chars and lines:
            break
        lines.append(line[:max_chars])
        total += len(line) + 1
    if not lines:
        return ""
    return CONTEXT_HEADER + "\n" + "\n".join(reversed(lines))


def seeded_instructions(instructions: str, history: Iterable[tuple[str, str]]) -> str:
    """``instructions`` followed by :func:`conversation_context` (unchanged without history)."""
    context = conversation_context(history)
    if not context:
        return instructions
    return f"{instructions}\n\n{context}" if instructions else context
