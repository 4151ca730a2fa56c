"""One ConversationRelay session: Twilio's text WebSocket <-> the chat model.

::

    ConversationRelaySession.run()
      ├─ (before the tree) wait for ``setup``, verify the per-call token, find the agent
      └─ nursery (deadline = the call's cap)
           ├─ reader    prompts, interrupts, DTMF, errors (handled synchronously)
           ├─ flusher   only bytes the kernel did not take at once
           └─ reply     one at a time: history -> model -> ``text`` tokens as they stream

A ``prompt`` (``last: true``) starts a reply; each text delta of the model goes to Twilio
as a ``text`` token the moment it is parsed (Twilio starts speaking on the first words);
``last: true`` closes the answer. An ``interrupt`` cancels the model stream (its cancel
scope: the HTTP response closes) and keeps in the history only what Twilio says was spoken
(``utteranceUntilInterrupt``). DTMF digits reach the model as a user turn. ``end_call`` /
``transfer_call`` end the session with ``end`` {``handoffData``}; Twilio then fetches the
``<Connect action>`` (``/twilio/speech/handoff``), which hangs up or dials.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from ...control.directory import Account
from ...errors import ConfigError, ConnectionClosed, RelayError
from ...media.websocket import CLOSE_NORMAL, CLOSE_POLICY, WebSocket
from ...protocol.conversation_relay import (
    ConversationRelay,
    ConversationRelayError,
    CrDtmf,
    CrError,
    CrInterrupt,
    CrPrompt,
    CrSetup,
    end_message,
    text_message,
)
from ..text.conversation import DEFAULT_CHARS_PER_MS, History
from ..text.llm import Brain, Conversation, LLMError
from .config import TwilioSpeechAgent
from .runtime import SpeechCall, TurnOutcome, agent_for

if TYPE_CHECKING:
    from ...state import RelayState

log = logging.getLogger("relay.agents.twilio_speech")

__all__ = ["ConversationRelaySession"]

#: how long relay lets Twilio speak a goodbye before ``end`` (Twilio does not say when
#: speech finished; inferred from the speaking rate, bounded)
MAX_GOODBYE_WAIT_S = 8.0


class _Refused(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class _Reply:
    t_prompt: float
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    indexes: list[int] = field(default_factory=list)  # its assistant messages in the history
    sent: list[str] = field(default_factory=list)  # text tokens sent to Twilio
    entry: dict[str, Any] | None = None  # its transcript entry
    done: bool = False
    interrupted: bool = False
    timing: dict[str, float | None] = field(default_factory=dict)


class ConversationRelaySession:
    def __init__(self, ws: WebSocket, state: RelayState, account: Account) -> None:
        self.ws = ws
        self.state = state
        self.account = account
        self.metrics = state.metrics
        self.proto = ConversationRelay()
        self.call_sid = "?"
        self.end_reason = ""
        self.speech: SpeechCall | None = None
        self.agent: TwilioSpeechAgent | None = None
        self.brain: Brain | None = None
        self.conversation: Conversation | None = None
        self._nursery: trio.Nursery | None = None
        self._reply: _Reply | None = None
        self._last: _Reply | None = None  # the newest reply (heard or still speaking)
        self._pending: list[str | bytes] = []
        self._partial = ""
        self._failures = 0
        self._ending = False
        self.replies: list[_Reply] = []

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            setup, route_options, agent_name = await self._await_setup()
        except _Refused as exc:
            self._error(exc.kind, exc.message)
            await self.ws.aclose(CLOSE_POLICY, exc.message[:100])
            return
        except ConnectionClosed:
            return
        state = self.state
        record = state.records.ensure(setup.call_sid)
        record.tenant_id = self.account.tenant_id
        record.account_sid = record.account_sid or setup.account_sid
        record.from_number = record.from_number or setup.from_number
        record.to_number = record.to_number or setup.to_number
        record.status = "active"
        record.stream_sid = setup.session_id[:64]
        record.agent = agent_name
        record.started_at = time.time()
        record.stats["mode"] = "conversation-relay"
        assert self.agent is not None
        history = History(self.agent.instructions)
        self.speech = SpeechCall(state, record, self.agent, history)
        self.metrics.active_calls += 1
        self.metrics.calls_total += 1
        store_history = state.control.history
        if store_history is not None:
            store_history.save(record, self.account.tenant_id)
        plan = state.policies.plan_for_stream(setup.call_sid, route_options)
        log.info("call %s: ConversationRelay session with agent %s", self.call_sid, agent_name)
        state.speech_sessions.add(self)
        try:
            await self._run_session(min(state.cfg.calls.max_duration_s, plan.max_call_seconds))
        finally:
            state.speech_sessions.discard(self)
            self.metrics.active_calls -= 1
            state.policies.release(setup.call_sid)
            record.status = "completed"
            record.end_reason = record.end_reason or self.end_reason or "completed"
            record.ended_at = time.time()
            record.stats["messages_from_twilio"] = self.ws.messages_in
            record.stats["messages_to_twilio"] = self.ws.messages_out
            if store_history is not None:
                store_history.save(record, self.account.tenant_id)
            state.postcall.submit(record, plan.policy.features)
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                if self.brain is not None:
                    await self.brain.aclose()
                await self.ws.aclose(CLOSE_NORMAL, (self.end_reason or "call ended")[:100])
            log.info("call %s ended: %s", self.call_sid, record.end_reason)

    async def _await_setup(self) -> tuple[CrSetup, dict[str, Any], str]:
        tokens = self.state.tokens
        with trio.move_on_after(self.state.cfg.media.start_timeout_s):
            batch = await self.ws.receive()
            first = batch[0]
            if type(first) is not str:
                raise _Refused("cr_binary", "binary frame from Twilio")
            try:
                event = self.proto.parse(first)
            except ConversationRelayError as exc:
                raise _Refused(exc.kind, str(exc)) from None
            if not isinstance(event, CrSetup):
                raise _Refused("cr_protocol", "first message is not setup")
            self.call_sid = event.call_sid
            params = event.custom_parameters
            token, agent, tenant = (
                params.get("token"),
                params.get("agent", ""),
                params.get("tenant", ""),
            )
            # The token names the tenant; it must be the one whose account signed the
            # upgrade, or one tenant could run another's agents (as for media streams).
            if tenant != self.account.tenant_id or not tokens.verify(
                f"{event.call_sid}|{tenant}|{agent}", token
            ):
                raise _Refused("cr_token", "missing or invalid session token")
            route = await self.state.control.directory.agent(tenant, agent)
            if route is None:
                raise _Refused("cr_agent", f"unknown agent {agent!r}")
            try:
                self.agent = agent_for(tenant, agent, route.options)
            except (ConfigError, TypeError) as exc:
                raise _Refused("cr_agent", f"agent {agent!r} unusable: {exc}") from None
            self._pending = batch[1:]
            return event, route.options, agent
        raise _Refused("start_timeout", "no setup message within the start timeout")

    async def _run_session(self, cap_s: float) -> None:
        agent, speech = self.agent, self.speech
        assert agent is not None and speech is not None
        self.brain = agent.brain_factory()
        greeting = agent.settings.greeting
        if greeting:  # Twilio speaks welcomeGreeting itself; the model must know it was said
            reply = _Reply(time.perf_counter(), done=True)
            reply.indexes.append(speech.history.add_assistant(greeting))
            reply.sent.append(greeting)
            reply.entry = speech.said("agent", greeting)
            self._last = reply
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.cancel_scope.deadline = trio.current_time() + cap_s
            nursery.start_soon(self._flusher)
            await self._reader()
            nursery.cancel_scope.cancel()
        if nursery.cancel_scope.cancelled_caught and not self.end_reason:
            self.end_reason = "max duration"
            self._send(end_message({"reason": "max duration"}))

    def end_now(self, reason: str) -> bool:
        """End the session from outside (a drain): ``end`` with ``{"reason": reason}`` as
        handoff data, so Twilio requests the ``<Connect action>`` (a goodbye and a hang-up)
        and closes the socket. False when it was ending already."""
        if self._ending or self.end_reason:
            return False
        self._ending = True
        self.end_reason = reason
        if self._reply is not None and not self._reply.done:
            self._reply.scope.cancel()  # no more tokens after ``end``
        self._send(end_message({"reason": reason}))
        log.info("call %s: session ended (%s)", self.call_sid, reason)
        return True

    def _stop(self, reason: str) -> None:
        if not self.end_reason:
            self.end_reason = reason
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _error(self, kind: str, message: str) -> None:
        self.metrics.error(kind)
        log.warning("call %s: ConversationRelay %s: %s", self.call_sid, kind, message)

    # -- Twilio -> relay --------------------------------------------------------------------
    async def _reader(self) -> None:
        batch, self._pending = self._pending, []
        while True:
            for message in batch:
                if type(message) is not str:
                    self._error("cr_binary", "binary frame from Twilio")
                    self.ws.close_nowait(CLOSE_POLICY, "binary frame")
                    self._stop("bad message from Twilio (cr_binary)")
                    return
                try:
                    event = self.proto.parse(message)
                except ConversationRelayError as exc:
                    self._error(exc.kind, str(exc))
                    self.ws.close_nowait(CLOSE_POLICY, exc.kind)
                    self._stop(f"bad message from Twilio ({exc.kind})")
                    return
                self._on_event(event)
            try:
                batch = await self.ws.receive()
            except ConnectionClosed as exc:
                # Twilio closes the socket when the call ends (caller hung up), or after
                # our ``end`` message.
                reason = "agent ended" if self._ending else "caller hung up"
                if exc.code not in (1000, 1001, 1005, 1006) and not self._ending:
                    self._error("twilio_closed", f"Twilio closed the session: {exc}")
                    reason = f"twilio closed ({exc.code})"
                self._stop(reason)
                return

    def _on_event(self, event: Any) -> None:
        speech = self.speech
        assert speech is not None
        if isinstance(event, CrPrompt):
            if not event.last:  # partial prompt: the final one carries the utterance
                self._partial = event.text
                return
            text = " ".join((event.text or self._partial).split())
            self._partial = ""
            if text:
                self._user_turn(text, time.perf_counter())
        elif isinstance(event, CrInterrupt):
            self._interrupted(event)
        elif isinstance(event, CrDtmf):
            speech.record.dtmf.append(event.digit)
            log.info("call %s: DTMF %s", self.call_sid, event.digit)
            self._user_turn(f"(The caller pressed the key {event.digit}.)", time.perf_counter())
        elif isinstance(event, CrError):
            # Twilio reports what it could not do (a bad message of ours, a TTS failure)
            self._error("cr_twilio_error", event.description)

    def _user_turn(self, text: str, t_prompt: float) -> None:
        speech = self.speech
        assert speech is not None and self._nursery is not None
        if self._ending:
            return
        current = self._reply
        if current is not None and not current.done:
            # A new prompt while still answering (interruptible="none" or a DTMF key):
            # the old answer stops here; what was sent counts as said.
            current.scope.cancel()
        speech.said("caller", text)
        speech.history.add_user(text)
        reply = _Reply(t_prompt)
        self._reply = self._last = reply
        self.replies.append(reply)
        self._nursery.start_soon(self._reply_task, reply)

    def _interrupted(self, event: CrInterrupt) -> None:
        speech = self.speech
        assert speech is not None
        reply = self._last
        self.metrics.barge_ins += 1
        speech.record.barge_ins.append(
            {"t": speech.elapsed(), "heard": event.utterance[:500], "heard_ms": event.duration_ms}
        )
        if reply is None:
            return
        reply.interrupted = True
        reply.scope.cancel()  # the model stream closes; nothing more is sent
        heard = _cut_to_spoken(speech.history, reply.indexes, event.utterance)
        if reply.entry is not None:
            reply.entry["text"] = heard + " …" if heard else ""
        elif heard:
            reply.entry = speech.said("agent", heard + " …")
        log.info("call %s: interrupted; the caller heard %r", self.call_sid, heard[:80])

    # -- relay -> Twilio --------------------------------------------------------------------
    def _send(self, message: str) -> bool:
        try:
            self.ws.send_text_nowait(message)
        except ConnectionClosed:
            self._stop(self.end_reason or "twilio disconnected")
            return False
        return True

    async def _flusher(self) -> None:
        try:
            await self.ws.run_flusher()
        except ConnectionClosed:
            self._stop(self.end_reason or "twilio disconnected")

    async def _reply_task(self, reply: _Reply) -> None:
        speech, agent, brain = self.speech, self.agent, self.brain
        assert speech is not None and agent is not None and brain is not None
        outcome = TurnOutcome()
        conversation = speech.conversation(brain, outcome)
        timing = reply.timing

        def on_text(delta: str) -> None:
            if reply.interrupted:
                return
            first = not reply.sent
            if first:
                timing["t_first_token"] = time.perf_counter()
            reply.sent.append(delta)
            self._send(text_message(delta, False))
            if first:
                timing["t_first_sent"] = time.perf_counter()

        try:
            with reply.scope:
                try:
                    result = await conversation.reply(on_text, reply.indexes.append)
                    self._failures = 0
                    if result.turns:
                        timing["t_request"] = result.turns[0].t_request
                except LLMError as exc:
                    self._model_failed(reply, exc, outcome)
                self._send(text_message("", True))
        finally:
            if conversation.partial_index is not None:
                reply.indexes.append(conversation.partial_index)
            reply.done = True
            if self._reply is reply:
                self._reply = None
            text = "".join(reply.sent).strip()
            if text and reply.entry is None and not reply.interrupted:
                reply.entry = speech.said("agent", text)
            self._record_timing(reply)
        if reply.interrupted:
            return
        if outcome.hangup or outcome.transfer_to:
            await self._end_after_speaking(reply, outcome)

    def _model_failed(self, reply: _Reply, exc: LLMError, outcome: TurnOutcome) -> None:
        speech, agent = self.speech, self.agent
        assert speech is not None and agent is not None
        self._failures += 1
        self._error("llm_error", str(exc)[:200])
        give_up = self._failures >= agent.settings.max_llm_failures
        text = agent.settings.goodbye_on_failure if give_up else agent.settings.apology
        piece = (" " if reply.sent else "") + text
        reply.sent.append(piece)
        self._send(text_message(piece, False))
        reply.indexes.append(speech.history.add_assistant(text))
        outcome.hangup = outcome.hangup or give_up

    async def _end_after_speaking(self, reply: _Reply, outcome: TurnOutcome) -> None:
        self._ending = True
        # Twilio speaks the tokens already sent; ``end`` right away could cut the goodbye.
        chars = len("".join(reply.sent))
        with trio.move_on_after(min(MAX_GOODBYE_WAIT_S, chars / (DEFAULT_CHARS_PER_MS * 1000))):
            while not reply.interrupted:
                await trio.sleep(0.05)
        if outcome.transfer_to:
            handoff: dict[str, Any] = {"reason": "transfer", "to": outcome.transfer_to}
            self.end_reason = "transferred"
        else:
            handoff = {"reason": "agent ended"}
            self.end_reason = "agent ended"
        self._send(end_message(handoff))
        log.info("call %s: session ended by the agent (%s)", self.call_sid, handoff["reason"])

    def _record_timing(self, reply: _Reply) -> None:
        """Per-reply stages (ms) in the record's stats: the bench reads relay's share."""
        t = reply.timing
        speech = self.speech
        if speech is None or t.get("t_request") is None or t.get("t_first_token") is None:
            return

        def ms(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round((b - a) * 1000, 3)

        turns = speech.record.stats.setdefault("turns", [])
        if len(turns) < 200:
            turns.append(
                {
                    "relay_prompt_to_request_ms": ms(reply.t_prompt, t["t_request"]),
                    "llm_first_token_ms": ms(t["t_request"], t["t_first_token"]),
                    "relay_token_to_wire_ms": ms(t["t_first_token"], t.get("t_first_sent")),
                    "prompt_to_first_text_ms": ms(reply.t_prompt, t.get("t_first_sent")),
                }
            )


def _cut_to_spoken(history: History, indexes: list[int], utterance: str) -> str:
    """Keep in the reply's assistant messages only the words Twilio says were spoken.

    ``utteranceUntilInterrupt`` is a prefix of the reply's text (Twilio's TTS may have
    normalised spacing): walk the messages in order, word by word."""
    spoken = utterance.split()
    kept: list[str] = []
    for index in sorted(set(indexes)):
        if index >= len(history.messages):
            continue
        words = history.assistant_text(index).split()
        take = 0
        while take < len(words) and take < len(spoken) and _same(words[take], spoken[take]):
            take += 1
        # a word cut in the middle by the interrupt counts as not said
        text = " ".join(words[:take])
        history.set_assistant_text(index, text)
        if text:
            kept.append(text)
        spoken = spoken[take:]
    return " ".join(kept)


def _same(a: str, b: str) -> bool:
    strip = ".,;:!?…\"'()"
    return a.strip(strip).lower() == b.strip(strip).lower()


async def serve(ws: WebSocket, state: RelayState, account: Account) -> None:
    """The lean WebSocket path's entry point (``relay/http/server.py``)."""
    session = ConversationRelaySession(ws, state, account)
    try:
        await session.run()
    except RelayError as exc:  # a bug of ours or a store failure: this session only
        state.metrics.error(exc.kind)
        log.warning("call %s: ConversationRelay session failed: %s", session.call_sid, exc)
