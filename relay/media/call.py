"""One call = one nursery = one task tree.

::

    Call.run()
      ├─ (before the tree) wait for `start`, verify the per-call token, connect the agent
      └─ nursery
           ├─ twilio_reader   Twilio -> agent: media (jitter buffer, passthrough or
           │                  transcode), marks (what was played), DTMF, stop
           ├─ twilio_flusher  only while the kernel has not taken all we wrote (bounded)
           ├─ agent_reader    agent -> Twilio: audio into the downlink buffer, barge-in,
           │                  transcripts, tools, hang-up
           ├─ agent_runner    the adapter's background work (its socket's flusher, ...)
           ├─ playout         sends queued audio as the lead over real time allows;
           │                  hangs up once the last mark is echoed after the agent ended
           └─ tool calls      one short-lived task each

The maximum call duration is the nursery's own cancel-scope deadline (a watchdog that
costs no task: each idle task is ~3 KB of memory per call).

Either side ending cancels the nursery; ``finally`` closes the agent session and the Twilio
socket under a shield with a short bound, so nothing outlives its call. Every send is bounded
(``relay.media.websocket.WebSocket`` and the adapters time out), because half-dead sockets exist.
The tasks hand nothing to each other through channels: the reader that receives a message
does the forwarding send itself, which is what keeps per-frame latency in microseconds.
Message handling (``_on_twilio``, ``_on_agent``) is synchronous and sends are non-blocking
writes, so a barge-in (clear, flush, drop, truncate) happens atomically. With the
process-wide reactor (``relay/reactor.py``) the readers register their sockets there and the
handlers run straight from its wake-up; without it (TLS agents, in-process agents) the
readers await ``receive()`` and call the same handlers.
"""

from __future__ import annotations

import binascii
import logging
import math
import socket
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import trio

from .. import netguard
from ..agents.base import (
    Agent,
    AgentAudio,
    AgentErrorEvent,
    AgentEvent,
    AgentHangup,
    AgentResponseDone,
    AgentSpeechStarted,
    AgentToolCall,
    AgentTranscript,
    CallInfo,
)
from ..control import transfer, warm
from ..control.policies import CallPlan
from ..errors import AgentError, ConnectionClosed, RelayError
from ..protocol.twilio import (
    Dtmf,
    MarkEcho,
    Media,
    Start,
    Stop,
    TwilioProtocolError,
    TwilioStream,
)
from ..tools import ToolRegistry
from . import codec, hold, recording
from .codec import (
    PUMP_CLOSED,
    PUMP_PARSED,
    PUMP_UNSENT,
    TwilioFrameParser,
    twilio_uplink,
)
from .websocket import (
    CLOSE_NORMAL,
    CLOSE_POLICY,
    OP_TEXT,
    Control,
    FrameParser,
    ProtocolViolation,
    SendTimedOut,
    WebSocket,
    build_frame,
)

if TYPE_CHECKING:
    from ..state import RelayState

log = logging.getLogger("relay.media.call")

_perf = time.perf_counter


class Call:
    def __init__(self, ws: WebSocket, state: RelayState, tenant_id: str = "default") -> None:
        self.ws = ws
        self.state = state
        #: the tenant whose Twilio account signed the stream upgrade
        self.tenant_id = tenant_id
        self.cfg = state.cfg
        self.metrics = state.metrics
        self.proto = TwilioStream()
        self.agent: Agent | None = None
        self.call_sid = "?"
        self.end_reason = ""
        self._nursery: trio.Nursery | None = None
        self._pending: list[str | bytes] = []
        #: trio.current_time, read in C where the reactor can (Reactor.clock): the handlers
        #: the reactor runs read it once per read
        self._clock: Callable[[], float] = (
            state.reactor.clock if state.reactor is not None else trio.current_time
        )
        media = self.cfg.media
        self.uplink = codec.UplinkJitterBuffer(frame_ms=20, reorder_ms=media.uplink_reorder_ms)
        self.downlink = codec.DownlinkBuffer(
            frame_ms=media.downlink_frame_ms, max_lead_ms=media.max_lead_ms
        )
        self._to_pcm: Any = None  # codec.UlawToPcm when the agent wants PCM
        self._to_ulaw: Any = None  # codec.PcmToUlaw when the agent speaks PCM
        self._silence_b64: dict[int, str] = {}
        self._prefixes: tuple[bytes, bytes] = (b"", b"")  # set once the stream has started
        self._wake = trio.Event()
        self._playout_due = 0.0  # ms; when the playout task plans to wake (inf: not before woken)
        self._ending = False
        self._twilio_gone = False
        self._twilio_flushing = False
        self._agent_dead = False
        self._finished = False
        self._registrations: list[tuple[socket.socket, Callable[[], None]]] = []
        self._agent_registration: tuple[socket.socket, Callable[[], None]] | None = None
        #: the reactor's handler for Twilio's socket while the uplink pump serves it
        #: (see _make_pump)
        self._pump: codec.PumpHandler | None = None
        #: the reactor's handler for the agent's socket while it reads directly
        #: (see _make_direct)
        self._direct: codec.DownlinkHandler | None = None
        self._ending_since = 0.0
        self._current_rid: str | None = None
        self._started_at = 0.0
        self._first_audio_seen = False
        self.record: Any = None
        self.plan: CallPlan | None = None
        self._hold: hold.HoldPlayer | None = None
        #: record = true (relay/media/recording.py): the call's stereo WAV
        self._recorder: recording.CallRecorder | None = None

    # -- lifecycle --------------------------------------------------------------------
    async def run(self) -> None:
        try:
            start = await self._await_start()
        except _Reject as rej:
            self._count_error(rej.kind, rej.message)
            await self.ws.aclose(rej.code, rej.message[:100])
            return
        except ConnectionClosed:
            return
        self.call_sid = start.call_sid
        self._compiled_parser(start.stream_sid)
        # the start of every media / mark message relay sends this stream (per message,
        # the properties would check the stream state again)
        self._prefixes = (self.proto.media_prefix, self.proto.mark_prefix)
        agent_name = start.custom_parameters.get("agent", "")
        record = self.state.records.ensure(start.call_sid)
        self.record = record
        record.tenant_id = self.tenant_id
        record.status = "active"
        record.stream_sid = start.stream_sid
        record.agent = agent_name
        record.started_at = time.time()
        self._started_at = trio.current_time()
        self.metrics.active_calls += 1
        self.metrics.calls_total += 1
        history = self.state.control.history
        if history is not None:  # a queue put: the store never delays the call
            history.save(record, self.tenant_id)
        try:
            # where the agent may connect (relay/netguard.py): every task of the call
            with netguard.guarding(warm.net_guard(self.state, record)):
                await self._run_started(start, agent_name)
        finally:
            self.metrics.active_calls -= 1
            self.state.policies.release(self.call_sid)
            if self._recorder is not None:
                self._recorder.close()  # the writer finishes the file off the loop
            record.status = "completed"
            record.end_reason = record.end_reason or self.end_reason or "completed"
            record.ended_at = time.time()
            record.stats = self._stats()
            if history is not None:
                history.save(record, self.tenant_id)
            if self.plan is not None:  # post_call_webhook (relay/control/postcall.py)
                self.state.postcall.submit(record, self.plan.policy.features)
            log.info(
                "call %s ended: %s (%.1f s)",
                self.call_sid,
                record.end_reason,
                record.duration_s or 0.0,
            )

    def _compiled_parser(self, stream_sid: str) -> None:
        # From the start event on, frames are read by the compiled parser, which also
        # turns this stream's media and mark messages into tuples without a JSON parse
        # (the two are ~100 messages per call-second; anything else stays a str for
        # TwilioStream.parse). Same RFC 6455 rules and errors as FrameParser.
        old = self.ws.parser
        if type(old) is FrameParser and old.expect_masked:
            self.ws.replace_parser(
                codec.TwilioFrameParser(
                    stream_sid,
                    max_message=old.max_message,
                    control=Control,
                    violation=ProtocolViolation,
                )
            )

    async def _run_started(self, start: Start, agent_name: str) -> None:
        try:
            # Cached from the webhook in the common case; a lookup in the store when the
            # webhook was answered by another process.
            route = await self.state.control.directory.agent(self.tenant_id, agent_name)
            if route is None:
                raise AgentError(f"unknown agent {agent_name!r}")
            # The webhook's plan (relay/control/policies.py): cap, per-call option overrides.
            self.plan = self.state.policies.plan_for_stream(start.call_sid, route.options)
            self._recorder = recording.start_for_call(self)
            info = CallInfo(
                call_sid=start.call_sid,
                stream_sid=start.stream_sid,
                from_number=self.record.from_number,
                to_number=self.record.to_number,
                custom_parameters=start.custom_parameters,
            )
            with trio.fail_after(self.cfg.media.agent_connect_timeout_s):
                # hold audio (relay/media/hold.py) plays while the agent connects
                self._hold = await hold.player_for(self, self.plan.policy.hold)
                # the warm session the webhook opened (relay/control/warm.py), or a new one
                connect = partial(warm.open_agent, self, route.options, info)
                await hold.while_connecting(self._hold, self, connect)
                assert self.agent is not None
            self._setup_transcoding(self.agent)
        except (RelayError, OSError, trio.TooSlowError) as exc:
            # The adapter's own connect timeout (AgentError kind agent_connect_timeout) is a
            # timeout too, whichever of the two bounds fires first.
            timed_out = isinstance(exc, trio.TooSlowError) or (
                isinstance(exc, RelayError) and exc.kind == "agent_connect_timeout"
            )
            reason = "agent connect timed out" if timed_out else "agent connect failed"
            self.end_reason = reason
            self._count_error("agent_connect", f"{reason}: {exc}")
            await self._close_all(CLOSE_NORMAL, reason)
            return
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                cap = min(self.cfg.calls.max_duration_s, self.plan.max_call_seconds)
                nursery.cancel_scope.deadline = trio.current_time() + cap
                self.ws.on_backlog = self._twilio_backlog
                await nursery.start(self._agent_runner)
                # With the reactor a socket needs no task of its own: registering it is
                # all (two parked tasks fewer per call, ~KiB each; bench/published/rss-tasks/).
                if not self._attach_twilio():
                    await nursery.start(self._twilio_reader)
                if not self._attach_agent():
                    await nursery.start(self._agent_reader)
                await nursery.start(self._playout)
                if self._hold is not None:
                    nursery.start_soon(self._hold.pump, self)
            if nursery.cancel_scope.cancelled_caught and not self.end_reason:
                log.info("call %s: maximum duration reached", self.call_sid)
                self.end_reason = "max duration"
                self.state.policies.ended_at_cap(self.call_sid)  # -> fallback_message
        finally:
            self.ws.on_backlog = None
            self._unregister_all()
            await self._close_all(CLOSE_NORMAL, self.end_reason or "call ended")

    async def _close_all(self, code: int, reason: str) -> None:
        # The only shield in the call: the final close must happen even when we are being
        # cancelled, and each close is itself bounded.
        with trio.CancelScope(shield=True):
            if self.agent is not None:
                # recovered agent connections (reconnect = true), by adapter
                reconnects = getattr(self.agent, "reconnects", 0)
                if isinstance(reconnects, int) and reconnects > 0:
                    self.metrics.agent_reconnects[type(self.agent).__name__] += reconnects
                with trio.move_on_after(2.0):
                    try:
                        await self.agent.aclose()
                    except Exception as exc:  # adapters must not raise here; be safe anyway
                        log.warning("call %s: agent close raised %r", self.call_sid, exc)
            await self.ws.aclose(code, reason[:100])

    def _end(self, reason: str) -> None:
        if not self.end_reason:
            self.end_reason = reason
        self._finished = True
        self._unregister_all()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _internal_error(self, where: str, exc: BaseException | None = None) -> None:
        # Our bug, met from the reactor: end this call cleanly instead of leaving its
        # sockets unwatched; the other calls never see it.
        self.metrics.error("internal")
        log.error(
            "call %s: internal error in %s; ending the call",
            self.call_sid,
            where,
            exc_info=exc if exc is not None else True,
        )
        self._end("internal error")

    def _count_error(self, kind: str, message: str) -> None:
        self.metrics.error(kind)
        log.warning("call %s: %s: %s", self.call_sid, kind, message)

    async def _await_start(self) -> Start:
        tokens = self.state.tokens
        with trio.move_on_after(self.cfg.media.start_timeout_s):
            while True:
                batch = await self.ws.receive()
                for i, msg in enumerate(batch):
                    if type(msg) is not str:
                        raise _Reject("twilio_binary", "binary frame from Twilio", CLOSE_POLICY)
                    try:
                        event = self.proto.parse(msg)
                    except TwilioProtocolError as exc:
                        raise _Reject(exc.kind, str(exc), CLOSE_POLICY) from None
                    if isinstance(event, Start):
                        token = event.custom_parameters.get("token")
                        agent = event.custom_parameters.get("agent", "")
                        tenant = event.custom_parameters.get("tenant", "")
                        # The token names the tenant; it must be the one whose account
                        # signed this upgrade, or one tenant could run another's agents.
                        if tenant != self.tenant_id or not tokens.verify(
                            f"{event.call_sid}|{tenant}|{agent}", token
                        ):
                            self.call_sid = event.call_sid
                            raise _Reject(
                                "stream_token", "missing or invalid stream token", CLOSE_POLICY
                            )
                        self._pending = batch[i + 1 :]
                        return event
        raise _Reject("start_timeout", "no start event within the start timeout", CLOSE_POLICY)

    def _setup_transcoding(self, agent: Agent) -> None:
        # Audio passes through untouched (μ-law in, μ-law out) when the agent accepts it;
        # the Cython resampler and G.711 codec run only when the agent needs PCM.
        if not agent.input_format.is_twilio_native:
            self._to_pcm = codec.UlawToPcm(agent.input_format.rate)
        if not agent.output_format.is_twilio_native:
            self._to_ulaw = codec.PcmToUlaw(agent.output_format.rate)
            self.downlink.slack_ms = downlink_slack_ms(self._to_ulaw, self.downlink.frame_ms)

    # -- reactor registrations ------------------------------------------------------------
    def _register(self, sock: socket.socket, handler: Callable[[], None]) -> None:
        reactor = self.state.reactor
        assert reactor is not None
        reactor.register(sock, handler)
        self._registrations.append((sock, handler))

    def _unregister_all(self) -> None:
        reactor = self.state.reactor
        if reactor is None:
            return
        while self._registrations:
            sock, handler = self._registrations.pop()
            reactor.unregister(sock, handler)
        # the bound methods held here would keep the call in a reference cycle (the pump
        # holds _silence, its handler the call's hooks)
        self._agent_registration = None
        self._pump = None
        self._direct = None

    def _reregister(self, sock: socket.socket, handler: Callable[[], None]) -> bool:
        """Serve ``sock``, registered by :meth:`_register`, with ``handler`` from now on."""
        reactor = self.state.reactor
        for i, (registered, old) in enumerate(self._registrations):
            if registered is sock:
                if reactor is None or not reactor.replace(sock, old, handler):
                    return False
                self._registrations[i] = (sock, handler)
                return True
        return False

    # -- Twilio -> agent ----------------------------------------------------------------
    def _attach_twilio(self) -> bool:
        """Hand the Twilio socket to the reactor, which runs :meth:`_twilio_readable` from
        now on (the call's ``finally`` unregisters it). False when there is no reactor or
        no plain socket: then :meth:`_twilio_reader` reads in a task."""
        raw = self.ws.raw_socket
        if self.state.reactor is None or raw is None:
            return False
        batch, self._pending = self._pending, []
        if batch:
            self._on_twilio(batch)
        if not self._finished:
            self._register(raw, self._twilio_readable)
            self._twilio_readable()  # bytes that arrived with the upgrade
        return True

    async def _twilio_reader(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        batch, self._pending = self._pending, []
        if batch:
            self._on_twilio(batch)
        while not self._finished:  # no reactor: read here, same handler
            try:
                batch = await self.ws.receive()
            except ConnectionClosed as exc:
                self._twilio_closed(exc)
                return
            self._on_twilio(batch)

    def _twilio_readable(self) -> None:
        """The layered path for a read from Twilio: until the uplink pump serves the
        socket, and whenever its handler cannot (see :meth:`_make_pump`)."""
        if self._finished:
            return
        ws = self.ws
        parser = ws.parser
        # The hot path once the stream has started: parse, order and collect this read's
        # media in one compiled call. Not while recording: the recorder takes each frame's
        # timestamp, which the general path keeps.
        hot = type(parser) is TwilioFrameParser and self._recorder is None
        try:
            data = ws.recv_nowait()
            if data is None:
                return
            t0 = _perf()
            if not hot:
                batch = ws.parse(data)
            else:
                try:
                    payloads, marks, media, rest = twilio_uplink(
                        cast("TwilioFrameParser[Any]", parser), self.uplink, data, self._silence
                    )
                except ProtocolViolation as exc:
                    ws.violated(exc)
        except ConnectionClosed as exc:
            self._twilio_closed(exc)
            return
        try:
            if not hot:
                if batch:
                    self._on_twilio(batch, None, t0)
                return
            self._twilio_parsed(payloads, marks, media, rest, t0)
        except Exception:
            self._internal_error("Twilio message handling")

    def _twilio_parsed(
        self,
        payloads: list[str],
        marks: list[str] | None,
        media: int,
        rest: list[Any] | None,
        t0: float,
    ) -> None:
        """Carry on with what ``twilio_uplink`` made of a read (its four results)."""
        ws = self.ws
        taken = media
        self.metrics.frames_in += media
        if marks is not None:
            taken += len(marks)
            self._mark_echoes(marks)
        if rest is not None:
            # Anything else (DTMF, stop, a ping...) takes the general path, in order;
            # the payloads released so far go with it, as one forward.
            self._on_twilio(ws.accept(rest, taken), payloads, t0)
            return
        ws.messages_in += taken
        if payloads and not self._agent_dead:
            self._forward(payloads, t0)

    def _twilio_pump_result(self, code: int, t0: float) -> None:
        """A pumped read (``codec.PumpHandler``, which counted it) that did not end with
        every append written: queue the rest, carry on with what was parsed, or close."""
        handler = self._pump
        if handler is None:  # the call ended in a hook of this read
            return
        pump = handler.pump
        try:
            if code == PUMP_UNSENT:
                try:
                    handler.dest.write_nowait(cast(bytes, pump.unsent))
                except ConnectionClosed as exc:
                    self._agent_gone(f"agent send failed: {exc}")
                    return
                self.metrics.latency_up.observe(_perf() - t0)
            elif code == PUMP_PARSED:
                self._twilio_parsed(
                    cast("list[str]", pump.payloads), pump.marks, pump.media, pump.rest, t0
                )
            elif code == PUMP_CLOSED:
                self._twilio_closed(self.ws.lost(pump.error))
        except Exception as exc:
            self._internal_error("Twilio message handling", exc)

    def _twilio_pump_failed(self, exc: Exception) -> None:
        """A pumped read raised: Twilio broke the protocol, or a bug (ours)."""
        if isinstance(exc, ProtocolViolation):
            try:
                self.ws.violated(exc)
            except ConnectionClosed as closed:
                self._twilio_closed(closed)
            return
        self._internal_error("Twilio message handling", exc)

    def _on_twilio(
        self, batch: list[Any], payloads: list[str] | None = None, t0: float | None = None
    ) -> None:
        """The general path for Twilio's messages; ``payloads`` (taken at ``t0``) were
        released by the hot path from the same read, before ``batch``."""
        if t0 is None:
            t0 = _perf()
        if payloads is None:
            payloads = []
        parse = self.proto.parse
        uplink = self.uplink
        metrics = self.metrics
        recorder = self._recorder
        for msg in batch:
            kind = type(msg)
            if kind is tuple:
                # The compiled parser's hot shapes (codec.TwilioFrameParser): a media
                # message as (timestamp, payload), a mark echo as (name,).
                if len(msg) == 2:
                    timestamp, payload_in = msg
                else:
                    self._mark_echo(msg[0])
                    continue
            elif kind is not str:
                return self._fail_twilio("twilio_binary", "binary frame from Twilio")
            else:
                try:
                    event = parse(cast(str, msg))
                except TwilioProtocolError as exc:
                    return self._fail_twilio(exc.kind, str(exc))
                if type(event) is Media:
                    timestamp, payload_in = event.timestamp_ms, event.payload
                elif type(event) is MarkEcho:
                    self._mark_echo(event.name)
                    continue
                else:
                    if not self._on_twilio_event(event):
                        return None
                    continue
            metrics.frames_in += 1
            for _ts, payload, dur in uplink.push(timestamp, payload_in, 20):
                payloads.append(cast(str, payload) if payload is not None else self._silence(dur))
                if recorder is not None:
                    recorder.caller(_ts, payloads[-1])
        if payloads and not self._agent_dead:
            self._forward(payloads, t0)
        return None

    def _forward(self, payloads: list[str], t0: float) -> None:
        agent = self.agent
        assert agent is not None
        try:
            if self._to_pcm is None:
                agent.send_audio_b64_many(payloads)
            else:
                agent.send_audio(self._to_pcm.feed_b64_many(payloads))
        except (ConnectionClosed, AgentError) as exc:
            self._agent_gone(f"agent send failed: {exc}")
            return
        self.metrics.latency_up.observe(_perf() - t0)

    def _mark_echo(self, name: str) -> None:
        self._mark_echoes((name,))

    def _mark_echoes(self, names: Sequence[str]) -> None:
        # One clock read and one call for a read's echoes: they arrived together.
        self.downlink.echoes(names, self._clock() * 1000.0)
        if self._ending:
            self._wake.set()

    def _on_twilio_event(self, event: object) -> bool:
        """The rare events (DTMF, stop; others are ignored); False when the call is over."""
        if type(event) is Dtmf:
            self._dtmf(event.digit)
        elif type(event) is Stop:
            self._end("caller hung up")
            return False
        return True

    def _silence(self, duration_ms: int) -> str:
        # μ-law silence is 0xFF (G.711 table: code 0xFF decodes to 0). Cached per length.
        b64 = self._silence_b64.get(duration_ms)
        if b64 is None:
            b64 = binascii.b2a_base64(b"\xff" * (8 * duration_ms), newline=False).decode()
            self._silence_b64[duration_ms] = b64
        return b64

    def _dtmf(self, digit: str) -> None:
        self.record.dtmf.append(digit)
        log.info("call %s: DTMF %s", self.call_sid, digit)
        if self._agent_dead:
            return
        try:
            assert self.agent is not None
            self.agent.send_dtmf(digit)
        except (ConnectionClosed, AgentError) as exc:
            self._agent_gone(f"agent send failed: {exc}")

    def _twilio_closed(self, exc: ConnectionClosed) -> None:
        # Several paths may see the same closed socket (reader, flusher, a send): the
        # first one decides the end reason and counts the error, once.
        if self._twilio_gone:
            return
        self._twilio_gone = True
        if self._ending and self.downlink.idle:
            self._end(self.end_reason or "agent ended")
        elif isinstance(exc, SendTimedOut):
            # Twilio stopped reading (half-dead socket): not a caller hang-up.
            self._count_error("twilio_send_timeout", f"Twilio stream not reading: {exc}")
            self._end("twilio send timed out")
        elif exc.code in (1000, 1001, 1005, 1006):
            self._end("caller hung up")
        else:
            self._count_error("twilio_closed", f"Twilio closed the stream: {exc}")
            self._end(f"twilio closed ({exc.code})")

    def _fail_twilio(self, kind: str, message: str) -> None:
        self._count_error(kind, message)
        self.end_reason = f"bad message from Twilio ({kind})"
        self.ws.close_nowait(CLOSE_POLICY, kind)
        self._end(self.end_reason)

    def _twilio_backlog(self) -> None:
        # The kernel did not take everything we wrote to Twilio: drain it in a task of
        # this call, under the send timeout (a Twilio that stopped reading ends the call).
        if not self._twilio_flushing and self._nursery is not None and not self._finished:
            self._twilio_flushing = True
            self._nursery.start_soon(self._twilio_flusher)

    async def _twilio_flusher(self) -> None:
        try:
            await self.ws.drain()
        except ConnectionClosed as exc:
            self._twilio_closed(exc)
        finally:
            self._twilio_flushing = False

    # -- agent -> Twilio ----------------------------------------------------------------
    async def _agent_runner(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        assert self.agent is not None
        try:
            await self.agent.run()
        except (ConnectionClosed, AgentError) as exc:
            self._agent_gone(f"agent connection lost: {exc}", exc)

    def _attach_agent(self) -> bool:
        """Hand the agent's socket to the reactor (see :meth:`_attach_twilio`). False when
        the adapter has no plain socket for it (TLS, in-process, ``reconnect``): then
        :meth:`_agent_reader` reads in a task."""
        agent = self.agent
        assert agent is not None
        sock = agent.reactor_socket() if self.state.reactor is not None else None
        if sock is None:
            return False
        if not self._finished:
            self._agent_registration = (sock, self._agent_readable)
            self._register(sock, self._agent_readable)
            handler = self._make_pump(agent)
            raw = self.ws.raw_socket
            if handler is not None and raw is not None and self._reregister(raw, handler):
                self._pump = handler
            direct = self._make_direct(agent)
            if direct is not None and self._reregister(sock, direct):
                self._direct = direct
                self._agent_registration = (sock, direct)
            self._agent_readable()  # events that arrived while connecting
        return True

    def _make_pump(self, agent: Agent) -> codec.PumpHandler | None:
        """The uplink pump (codec.UplinkPump) when the adapter splices Twilio's payloads
        (μ-law passthrough) or their resampled audio (``_to_pcm``) into its messages: then
        each read from Twilio reaches the agent in one compiled call, served by a compiled
        handler (codec.PumpHandler) that counts a read sent whole itself and calls this
        call's hooks for anything else. Both sockets are plain TCP sockets in the reactor,
        so their descriptors stay open until the call's end. None while recording: the
        recorder takes each frame's timestamp, which the layered path keeps."""
        ws = self.ws
        parser = ws.parser
        raw = ws.raw_socket
        if not self.cfg.media.uplink_pump or raw is None or self._recorder is not None:
            return None
        if type(parser) is not TwilioFrameParser:
            return None
        splice = agent.audio_splice()
        if splice is None:
            return None
        agent_ws, head, tail = splice
        agent_raw = agent_ws.raw_socket
        if agent_raw is None:
            return None
        fds = (raw.fileno(), agent_raw.fileno())
        pump = codec.UplinkPump(
            parser, self.uplink, self._silence, *fds, head, tail, to_pcm=self._to_pcm
        )
        return codec.PumpHandler(
            pump,
            ws,
            agent_ws,
            self.metrics,
            self.metrics.latency_up,
            self._twilio_readable,
            self._mark_echoes,
            self._twilio_pump_result,
            self._twilio_pump_failed,
        )

    def _make_direct(self, agent: Agent) -> codec.DownlinkHandler | None:
        """The compiled handler for the agent's socket (codec.DownlinkHandler) when the
        adapter lets the engine read it (``audio_books``: OpenAI Realtime): a read holding
        only audio deltas of items the session knows then goes from the agent's socket to
        Twilio's in one call, and anything else comes back here parsed, in order
        (:meth:`_agent_direct_rest`). The call's own state decides per read
        (:meth:`_direct_ready`): hold music, the first audio (it is recorded), an ending
        call or anything waiting to be written take the layered path. None while
        recording: the recorder takes every frame sent."""
        if not self.cfg.media.agent_direct or self._recorder is not None:
            return None
        raw = self.ws.raw_socket
        books = agent.audio_books()
        if books is None or raw is None:
            return None
        agent_ws = books.ws
        agent_raw = agent_ws.raw_socket
        parser = agent_ws.parser
        if agent_raw is None or not isinstance(parser, codec.ServerFrameParser):
            return None
        media_prefix, mark_prefix = self._prefixes
        return codec.DownlinkHandler(
            agent_raw.fileno(),
            raw.fileno(),
            agent_ws,
            self.ws,
            parser,
            self.downlink,
            books.item_bytes,
            books.truncated,
            books.protocol,
            self._to_ulaw,
            media_prefix,
            mark_prefix,
            self,
            self.metrics,
            self.metrics.latency_down,
            self._clock,
            agent_ws.stamps_reads,
            self._direct_ready,
            self._agent_readable,
            self._agent_direct_closed,
            self._agent_direct_rest,
            self._twilio_unsent,
            self._wake_playout,
            self._agent_direct_failed,
        )

    def _direct_ready(self) -> bool:
        """Whether the agent's next read may take the compiled path (see _make_direct)."""
        agent = self.agent
        direct = self._direct
        return (
            self._first_audio_seen
            and self._hold is None
            and not (self._ending or self._twilio_gone or self._agent_dead or self._finished)
            and direct is not None
            and direct.source.relays_directly(self.ws)
            and agent is not None
            and not agent.events_waiting
        )

    def _agent_direct_closed(self, err: int) -> None:
        """The compiled handler's read found the agent gone (``err``: errno, 0 at EOF)."""
        direct = self._direct
        if direct is None:
            return
        exc = direct.source.lost(err)
        self._agent_gone(f"agent closed: {exc}", exc)

    def _agent_direct_rest(self, items: list[Any], k: int, t_event: float, pushed: bool) -> None:
        """A read the compiled handler took up to ``items[k]``: the rest as the layered path
        handles it (control frames answered, messages parsed by the adapter, events in
        order), then the send of what the handler pushed."""
        direct, agent = self._direct, self.agent
        if direct is None or agent is None:
            return
        source = direct.source
        self._agent_events(lambda: agent.events_from(source.accept(items[k:])), t_event, pushed)

    def _agent_direct_failed(self, exc: Exception) -> None:
        """The compiled handler raised: the agent broke RFC 6455, or a bug (ours)."""
        direct = self._direct
        if isinstance(exc, ProtocolViolation) and direct is not None:
            try:
                direct.source.violated(exc)
            except ConnectionClosed as closed:
                self._agent_gone(f"agent closed: {closed}", closed)
            return
        self._internal_error("agent message handling", exc)

    def _twilio_unsent(self, rest: bytes) -> bool:
        """Queue what the kernel did not take of a direct write to Twilio; False when
        Twilio's socket is gone."""
        try:
            self.ws.write_nowait(rest)
        except ConnectionClosed as exc:
            self._twilio_closed(exc)
            return False
        return True

    def _wake_playout(self) -> None:
        self._wake.set()

    async def _agent_reader(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        agent = self.agent
        assert agent is not None
        while not self._agent_dead and not self._finished:  # no reactor (TLS, in-process)
            try:
                events = await agent.receive()
            except (ConnectionClosed, AgentError) as exc:
                self._agent_gone(f"agent closed: {exc}", exc)
                return
            self._on_agent(events)

    def _agent_readable(self) -> None:
        if self._finished or self._agent_dead:
            return
        assert self.agent is not None
        self._agent_events(self.agent.read_events_nowait)

    def _agent_events(
        self,
        read: Callable[[], list[AgentEvent]],
        t_event: float | None = None,
        pushed: bool = False,
    ) -> None:
        """The events ``read()`` parses (one read of the agent's socket) through
        :meth:`_on_agent`: a closed or failing session ends the agent's part of the call,
        anything else raised is ours (counted, logged once, that call only)."""
        try:
            events = read()
        except (ConnectionClosed, AgentError) as exc:
            self._agent_gone(f"agent closed: {exc}", exc)
            return
        except Exception:
            self._internal_error("agent message parsing")
            return
        if events or pushed:
            try:
                self._on_agent(events, t_event, pushed)
            except Exception:
                self._internal_error("agent event handling")

    def _on_agent(
        self, events: list[AgentEvent], t_event: float | None = None, pushed: bool = False
    ) -> None:
        """The agent's events in order; ``pushed``: audio of the same read is in the
        downlink already (codec.DownlinkHandler took it, from ``t_event`` on)."""
        if t_event is None:
            t_event = _perf()
        downlink = self.downlink
        for ev in events:
            kind = type(ev)
            if kind is AgentAudio:
                if self._hold is not None:  # the agent's first audio ends the hold at once
                    self._hold.stop(self)
                    self._hold = None
                    if self._recorder is not None:  # what Twilio still held was not heard
                        self._recorder.cut(self._elapsed_ms())
                rid = ev.response_id  # type: ignore[union-attr]
                self._current_rid = rid
                audio = ev.audio  # type: ignore[union-attr]
                if self._to_ulaw is not None:
                    audio = self._to_ulaw.feed(audio)
                downlink.push(audio, rid)
                pushed = True
            elif kind is AgentResponseDone:
                rid = ev.response_id  # type: ignore[union-attr]
                if self._to_ulaw is not None:
                    # The resampler holds its last few ms back; they belong to this answer.
                    tail = self._to_ulaw.flush()
                    if tail:
                        downlink.push(tail, rid)
                downlink.end_response(rid)
                pushed = True
            elif kind is AgentSpeechStarted:
                self._barge_in(t_event)
            elif kind is AgentTranscript:
                if ev.final:  # type: ignore[union-attr]
                    self.record.transcript.append(
                        {"role": ev.role, "text": ev.text, "t": self._elapsed()}  # type: ignore[union-attr]
                    )
            elif kind is AgentToolCall:
                assert self._nursery is not None
                self._nursery.start_soon(self._run_tool, cast(AgentToolCall, ev))
            elif kind is AgentHangup:
                self._begin_ending(ev.reason)  # type: ignore[union-attr]
            elif kind is AgentErrorEvent:
                self._count_error("agent_error", f"{ev.code}: {ev.message}")  # type: ignore[union-attr]
                if ev.fatal:  # type: ignore[union-attr]
                    self._agent_gone(f"agent error {ev.code}")  # type: ignore[union-attr]
                    return
        if pushed:
            now_ms = self._clock() * 1000.0  # one clock read for the send and the plan
            if self._send_due(now_ms):
                self.metrics.latency_down.observe(_perf() - t_event)
            # Wake the playout task only if it now has to send earlier than it planned:
            # in steady state the agent's audio goes out right here and playout sleeps.
            due = downlink.next_due(now_ms)
            if due is not None and due < self._playout_due:
                self._wake.set()

    def _send_due(self, now_ms: float | None = None) -> int:
        """Send every frame the lead bound allows at ``now_ms`` (default: now); returns how
        many were sent."""
        if self._twilio_gone:
            return 0
        if now_ms is None:
            now_ms = self._clock() * 1000.0
        frames = self.downlink.pull(now_ms)
        if not frames:
            return 0
        if self._recorder is not None:
            self._recorder.agent(frames, self._elapsed_ms())
        # Each frame goes out as a media message and the mark that says when it played,
        # all of them built in one buffer (Cython; codec_ref.twilio_frames is the spec).
        media_prefix, mark_prefix = self._prefixes
        wire = codec.twilio_frames(media_prefix, mark_prefix, frames)
        if not self._first_audio_seen and frames[-1][2] != hold.HOLD_RID:
            self._first_audio_seen = True
            self.record.first_agent_audio_ms = (trio.current_time() - self._started_at) * 1000.0
        try:
            self.ws.send_wire_nowait(wire, 2 * len(frames))
        except ConnectionClosed as exc:
            self._twilio_closed(exc)
            return 0
        self.metrics.frames_out += len(frames)
        return len(frames)

    def _barge_in(self, t_event: float) -> None:
        # Synchronous from the agent's event to the clear on the wire: no other task can
        # send a frame of the interrupted answer in between.
        if self._hold is not None:  # hold audio is not the agent's: nothing to interrupt
            return
        if self.downlink.idle:
            # Nothing queued here and every frame sent was echoed as played: Twilio holds
            # nothing either, so the caller interrupts nothing. Not a barge-in: no clear,
            # not counted or recorded. Audio still arriving for the last response (the
            # agent cancels it on this event) is dropped all the same.
            if self._current_rid is not None:
                self.downlink.drop_response(self._current_rid)
            if self._to_ulaw is not None:
                self._to_ulaw.reset()
            log.debug("call %s: caller speech with nothing playing", self.call_sid)
            return
        now_ms = trio.current_time() * 1000.0
        rid, heard_ms, dropped_ms = self.downlink.clear(now_ms)
        if self._recorder is not None:
            self._recorder.cut(self._elapsed_ms())
        # Audio of the interrupted response may still be in flight from the agent.
        for stale in {rid, self._current_rid} - {None}:
            self.downlink.drop_response(stale)  # type: ignore[arg-type]
        if self._to_ulaw is not None:
            self._to_ulaw.reset()
        # Clear even with nothing queued locally: frames not yet echoed may still be in
        # Twilio's buffer (a common bug in sample relays is skipping this).
        try:
            self.ws.send_frames_nowait([build_frame(OP_TEXT, self.proto.clear_message())])
        except ConnectionClosed as exc:
            self._twilio_closed(exc)
            return
        self.metrics.barge_in_to_clear.observe(_perf() - t_event)
        self.metrics.barge_ins += 1
        self.record.barge_ins.append(
            {
                "t": self._elapsed(),
                "response_id": rid,
                "heard_ms": heard_ms,
                "dropped_ms": dropped_ms,
            }
        )
        log.info(
            "call %s: barge-in, caller heard %d ms of %s, dropped %d ms",
            self.call_sid,
            heard_ms,
            rid,
            dropped_ms,
        )
        agent = self.agent
        if rid is not None and agent is not None and agent.supports_truncate:
            try:
                agent.truncate(rid, heard_ms)
            except (ConnectionClosed, AgentError) as exc:
                self._agent_gone(f"agent send failed: {exc}")

    async def _run_tool(self, ev: AgentToolCall) -> None:
        started = _perf()
        # The agent's own tools (config: names, HTTP tools) first, then the process-wide ones.
        tools = getattr(self.agent, "tools", None)
        if not isinstance(tools, ToolRegistry) or ev.name not in tools:
            tools = self.state.tools
        if ev.name == transfer.TOOL_NAME:  # built-in: needs this call (control/transfer.py)
            output = await transfer.run_tool(self, ev.arguments)
        else:
            output = await tools.call(ev.name, ev.arguments)
        self.record.tool_calls.append(
            {"name": ev.name, "call_id": ev.call_id, "ms": round((_perf() - started) * 1000, 1)}
        )
        if self._agent_dead:
            return
        try:
            assert self.agent is not None
            self.agent.send_tool_result(ev.call_id, output)
        except (ConnectionClosed, AgentError) as exc:
            self._agent_gone(f"agent send failed: {exc}")

    def _begin_ending(self, reason: str) -> None:
        # The agent ended the conversation: hang up only after the caller heard the last
        # word, i.e. once the final mark is echoed (playout does the closing).
        if not self._ending:
            self._ending = True
            self._ending_since = trio.current_time()
            self.end_reason = self.end_reason or reason
            self.downlink.end_response(self._current_rid or "")
        self._wake.set()

    def _agent_gone(self, reason: str, exc: BaseException | None = None) -> None:
        # The agent's connection died (closed, dropped, or found dead by the adapter's
        # liveness watchdog: AgentError kind agent_disconnected): play what is buffered,
        # then hang up. Counted once, as agent_disconnected unless the adapter named a
        # more specific failure (e.g. agent_protocol).
        if self._agent_dead:
            return
        self._agent_dead = True
        if self._pump is not None:  # Twilio's reads take the layered path from now on
            self._pump.armed = False
        if self._agent_registration is not None and self.state.reactor is not None:
            # Its socket is at EOF (always readable): stop watching it right away.
            sock, handler = self._agent_registration
            self._agent_registration = None
            self.state.reactor.unregister(sock, handler)
        if self._ending:
            return
        kind = "agent_disconnected"
        if isinstance(exc, AgentError) and exc.kind not in ("agent", "agent_disconnected"):
            kind = exc.kind
        self._count_error(kind, reason)
        self._begin_ending("agent disconnected")

    async def _playout(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        downlink = self.downlink
        final_timeout = self.cfg.media.final_mark_timeout_s
        while True:
            self._send_due()
            now_ms = trio.current_time() * 1000.0
            due = downlink.next_due(now_ms)
            if self._ending and due is None:
                waited = trio.current_time() - self._ending_since
                if downlink.idle or waited > final_timeout + downlink.buffered_ms / 1000.0:
                    # Closing the WebSocket ends <Connect>; with no verb after it Twilio
                    # hangs up: a clean hang-up after the last mark.
                    self.ws.close_nowait(CLOSE_NORMAL, "agent ended")
                    self._end(self.end_reason or "agent ended")
                    return
                due = now_ms + 50.0  # poll for the final mark echo, bounded above
            self._wake = trio.Event()
            if due is None:
                self._playout_due = math.inf
                await self._wake.wait()
            else:
                self._playout_due = due
                with trio.move_on_at(due / 1000.0):
                    await self._wake.wait()

    # -- records ------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return round(trio.current_time() - self._started_at, 3)

    def _elapsed_ms(self) -> float:
        return (trio.current_time() - self._started_at) * 1000.0

    def _stats(self) -> dict[str, Any]:
        up = self.uplink
        self.metrics.gaps_filled += up.gaps_filled
        self.metrics.late_drops += up.late_drops
        self.metrics.duplicates += up.duplicates
        return {
            "messages_from_twilio": self.ws.messages_in,
            "messages_to_twilio": self.ws.messages_out,
            "uplink_frames_out": up.frames_out,
            "uplink_gaps_filled": up.gaps_filled,
            "uplink_silence_ms": up.silence_ms,
            "uplink_duplicates": up.duplicates,
            "uplink_late_drops": up.late_drops,
            "downlink_pending_marks": self.downlink.pending_marks,
        }


def downlink_slack_ms(to_ulaw: Any, frame_ms: int) -> int:
    """How far short of a whole frame a transcoded agent chunk may come out: the resampler
    holds back its filter's look-ahead (``delay_ms``, ~2.7 ms at 16 / 24 kHz), so a 100 ms
    chunk of PCM gives 100 ms less those samples. Within that slack the downlink buffer
    sends the frame at once instead of holding it ``PARTIAL_HOLD_MS`` for audio that would
    only start the next frame (codec_ref.DownlinkBuffer). One ms more for the rounding."""
    return max(0, min(math.ceil(to_ulaw.delay_ms) + 1, frame_ms - 1))


class _Reject(Exception):
    def __init__(self, kind: str, message: str, code: int) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.code = code
