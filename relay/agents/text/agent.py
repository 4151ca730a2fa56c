"""Text agents on the phone: the cascaded agent (streaming STT -> chat model -> streaming
TTS) and the offline voice agent, one Trio layer for both.

``type = "cascaded"``: ``stt`` deepgram | assemblyai | sarvam | local, ``tts`` deepgram |
elevenlabs | openai | sarvam | local, the model at ``llm_url`` (any OpenAI-compatible Chat
Completions endpoint). ``type = "local"``: PocketSphinx + eSpeak NG + the rule-based
receptionist (or a chat model when ``llm_url`` is set): no key, no network.

How a turn goes (all in this call's task tree, nothing blocks the loop):

1. caller audio goes to the STT (``send_audio``, non-blocking); its end of turn starts a
   reply task; the TTS gets ``begin`` at once (vendors that connect per reply do it while
   the model thinks);
2. the model's text streams through :class:`~relay.agents.text.conversation.ClauseSplitter`
   into the TTS clause by clause; its audio becomes ``AgentAudio`` events, so the caller
   hears the first clause while the model is still writing the rest;
3. tools: a model's tool call becomes ``AgentToolCall`` (the engine runs it, including the
   built-in ``transfer_call``) and the reply waits for ``send_tool_result``; ``end_call``
   is the agent's own (hang up once the goodbye has played);
4. barge-in: caller speech (the STT's speech start, or its first interim words) while a
   reply is generating or still playing cancels, in one synchronous step, the model stream
   (its cancel scope: the HTTP response closes), the TTS context and its queued audio, and
   emits ``AgentSpeechStarted``, on which the engine sends Twilio ``clear`` right away and
   calls :meth:`truncate` with what was heard (from marks). The history then keeps only
   those words;
5. the model failing (HTTP error, no data for ``llm_timeout_s``, a broken stream): the
   caller hears ``apology`` and the call goes on; after ``max_llm_failures`` failures in a
   row the agent says ``goodbye_on_failure`` and hangs up.

Per-reply timings (:attr:`CascadedAgent.timings`) feed ``bench/cascade.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
import trio

from ...errors import AgentError, ConfigError, ConnectionClosed
from ...tools import ToolRegistry, resolve_tools
from ..base import (
    TWILIO_FORMAT,
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
from ..echo import LocalEvents
from .conversation import ClauseSplitter, History, SpokenReply, ToolCall
from .llm import Brain, Conversation, LLMError
from .speech import (
    SpeechToText,
    SttEndOfTurn,
    SttPartial,
    SttSpeechStarted,
    TextToSpeech,
    TtsAudio,
    TtsDone,
)

__all__ = ["END_CALL_SCHEMA", "CascadedAgent", "TurnTiming"]

log = logging.getLogger("relay.agents.text")

END_CALL_SCHEMA: dict[str, Any] = {
    "type": "function",
    "name": "end_call",
    "description": "Hang up the call. Say goodbye first; the call ends once it has played.",
    "parameters": {"type": "object", "properties": {}},
}
#: caller-clock slack after the last audio before a reply counts as no longer playing
PLAY_TAIL_BYTES = 2400  # 300 ms


@dataclass
class TurnTiming:
    """time.perf_counter() stamps of one reply (None: did not happen)."""

    response_id: str
    t_end_of_turn: float | None = None  # the STT's end of turn parsed here
    t_llm_request: float | None = None  # request written to the model
    t_first_token: float | None = None  # first text delta parsed
    t_clause_delta: float | None = None  # the delta completing the first clause parsed
    t_first_clause: float | None = None  # first clause handed to the TTS
    t_first_audio: float | None = None  # first TTS audio parsed here
    t_first_event: float | None = None  # first AgentAudio queued for the engine
    first_clause: str = ""

    def stages_ms(self) -> dict[str, float | None]:
        def d(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round((b - a) * 1000, 3)

        return {
            "relay_eot_to_llm_request": d(self.t_end_of_turn, self.t_llm_request),
            "llm_first_token": d(self.t_llm_request, self.t_first_token),
            "llm_stream_to_first_clause": d(self.t_first_token, self.t_clause_delta),
            "relay_delta_to_clause": d(self.t_clause_delta, self.t_first_clause),
            "tts_first_audio": d(self.t_first_clause, self.t_first_audio),
            "relay_audio_to_event": d(self.t_first_audio, self.t_first_event),
            "eot_to_first_event": d(self.t_end_of_turn, self.t_first_event),
        }


@dataclass
class _Reply:
    spoken: SpokenReply
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    timing: TurnTiming | None = None
    interrupted: bool = False
    task_done: bool = False
    heard_ms: float | None = None  # from the engine's truncate
    applied: bool = False  # history cut to what was heard
    hangup: bool = False
    done_event: AgentEvent | None = None
    audio_event: trio.Event = field(default_factory=trio.Event)

    @property
    def rid(self) -> str:
        return self.spoken.response_id


class CascadedAgent(Agent):
    name: ClassVar[str] = "cascaded"
    supports_truncate: ClassVar[bool] = True
    input_format = TWILIO_FORMAT
    output_format = TWILIO_FORMAT

    def __init__(
        self,
        *,
        stt: Callable[[], SpeechToText],
        tts: Callable[[], TextToSpeech],
        brain: Callable[[], Brain],
        instructions: str = "",
        greeting: str = "",
        tools: list[dict[str, Any]] | None = None,
        tool_registry: ToolRegistry | None = None,
        end_call: bool = True,
        apology: str = "Sorry, I am having trouble answering right now. Please say that again.",
        goodbye_on_failure: str = (
            "Sorry, I cannot help you right now. Please call again later. Goodbye."
        ),
        max_llm_failures: int = 2,
        tool_timeout_s: float = 15.0,
        connect_timeout_s: float = 10.0,
        barge_in_on: str = "speech",
        max_tool_rounds: int = 4,
    ) -> None:
        self._stt_factory = stt
        self._tts_factory = tts
        self._brain_factory = brain
        self.instructions = instructions
        self.greeting = greeting
        schemas = list(tools or [])
        if end_call:
            schemas.append(dict(END_CALL_SCHEMA))
        self.tool_schemas = schemas
        #: the engine runs these (relay.media.call looks for ``agent.tools``)
        self.tools = tool_registry
        self.apology = apology
        self.goodbye_on_failure = goodbye_on_failure
        self.max_llm_failures = max_llm_failures
        self.tool_timeout_s = tool_timeout_s
        self.connect_timeout_s = connect_timeout_s
        if barge_in_on not in ("speech", "words"):
            raise ConfigError("agents.*.barge_in_on: must be speech or words")
        self.barge_in_on = barge_in_on
        self.max_tool_rounds = max_tool_rounds
        self.stt: SpeechToText | None = None
        self.tts: TextToSpeech | None = None
        self.brain: Brain | None = None
        self.history = History(instructions)
        self.conversation: Conversation | None = None
        self.call: CallInfo | None = None
        self._events = LocalEvents()
        self._nursery: trio.Nursery | None = None
        self._replies: dict[str, _Reply] = {}
        self._reply: _Reply | None = None
        self._count = 0
        self._clock = 0  # caller audio bytes received: the call's real-time clock
        self._play_end = 0  # caller-clock byte at which the audio sent so far has played
        self._tool_results: dict[str, str] = {}
        self._tool_waits: dict[str, trio.Event] = {}
        self._failures = 0
        self._closed = False
        self._pending_greeting = False
        self._unheard: list[_Reply] = []
        # observable, for tests, the demo and the bench
        self.timings: list[TurnTiming] = []
        self.caller_turns: list[str] = []
        self.agent_turns: list[str] = []  # what was heard of each reply
        self.barge_ins = 0
        self.llm_failures = 0

    # -- lifecycle ---------------------------------------------------------------------------
    async def connect(self, call: CallInfo) -> None:
        self.call = call
        self.stt = self._stt_factory()
        self.tts = self._tts_factory()
        self.brain = self._brain_factory()
        self.conversation = Conversation(
            self.brain,
            self.history,
            tools=self.tool_schemas,
            run_tool=self._run_tool,
            max_tool_rounds=self.max_tool_rounds,
            final_tools=frozenset({"end_call", "transfer_call"}),
        )
        stt, tts = self.stt, self.tts
        try:
            with trio.fail_after(self.connect_timeout_s):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_plain, stt.connect)
                    nursery.start_soon(_plain, tts.connect)
        except trio.TooSlowError:
            await self.aclose()
            raise AgentError(
                f"speech services did not connect within {self.connect_timeout_s:g} s",
                kind="agent_connect_timeout",
            ) from None
        except BaseExceptionGroup as group:
            await self.aclose()
            first = _first_error(group)
            raise AgentError(
                f"speech service connect failed: {first}", kind="agent_connect"
            ) from first
        except (AgentError, ConnectionClosed, OSError) as exc:
            await self.aclose()
            raise AgentError(f"speech service connect failed: {exc}", kind="agent_connect") from exc
        self._pending_greeting = bool(self.greeting)
        log.info(
            "%s agent connected (stt=%s tts=%s brain=%s call=%s)",
            self.name,
            stt.name,
            tts.name,
            self.brain.name,
            call.call_sid,
        )

    async def run(self) -> None:
        assert self.stt is not None and self.tts is not None
        failure: BaseException | None = None

        async def guard(fn: Callable[[], Any]) -> None:
            nonlocal failure
            try:
                await fn()
            except (ConnectionClosed, AgentError) as exc:
                if failure is None:
                    failure = exc
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(guard, self.stt.run)
            nursery.start_soon(guard, self.tts.run)
            nursery.start_soon(guard, self._stt_loop)
            nursery.start_soon(guard, self._tts_loop)
            if self._pending_greeting:
                self._pending_greeting = False
                self._start_reply(greeting=self.greeting)
        if failure is not None:
            if isinstance(failure, AgentError):
                raise failure
            raise AgentError(f"speech service lost: {failure}", kind="agent_disconnected")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._events.close()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True), trio.move_on_after(2.0):
            for part in (self.stt, self.tts, self.brain):
                if part is not None:
                    try:
                        await part.aclose()
                    except Exception:
                        log.debug("error closing %r", part, exc_info=True)

    # -- the engine's side -----------------------------------------------------------------------
    def send_audio(self, audio: bytes) -> None:
        if self._closed or self.stt is None:
            return
        self._clock += len(audio)
        self.stt.send_audio(audio)
        if self._unheard and self._clock >= self._play_end:
            self._heard_in_full()

    def _heard_in_full(self) -> None:
        """Replies whose audio has all played by the caller's clock go to the record."""
        for reply in self._unheard:
            if not reply.interrupted:
                self.agent_turns.append(reply.spoken.text)
                self._events.put(AgentTranscript("agent", reply.spoken.text))
        self._unheard.clear()

    async def receive(self) -> list[AgentEvent]:
        return await self._events.get_batch()

    def truncate(self, response_id: str, audio_end_ms: int) -> None:
        reply = self._replies.get(response_id)
        if reply is None or reply.applied:
            return
        reply.heard_ms = float(audio_end_ms)
        if reply.task_done:
            self._apply_heard(reply)

    def send_tool_result(self, call_id: str, output: str) -> None:
        waiter = self._tool_waits.pop(call_id, None)
        if waiter is not None:  # else the reply that asked was cancelled (barge-in)
            self._tool_results[call_id] = output
            waiter.set()

    # -- the caller's side ----------------------------------------------------------------------
    async def _stt_loop(self) -> None:
        assert self.stt is not None
        while True:
            for event in await self.stt.receive():
                if isinstance(event, SttSpeechStarted):
                    if self.barge_in_on == "speech":
                        self._caller_speaks()
                elif isinstance(event, SttPartial):
                    if event.text.strip():
                        self._caller_speaks()
                elif isinstance(event, SttEndOfTurn):
                    self._end_of_turn(event)

    def _playing(self) -> bool:
        reply = self._reply
        if reply is None or reply.interrupted:
            return False
        return (
            not reply.task_done
            or not reply.spoken.finished
            or (self._clock < self._play_end + PLAY_TAIL_BYTES)
        )

    def _caller_speaks(self) -> None:
        if self._playing():
            self._barge_in()

    def _barge_in(self) -> None:
        """One synchronous step: cancel the model stream, the TTS context and its queued
        audio; the engine clears Twilio on the event and truncates what was not heard."""
        reply = self._reply
        assert reply is not None and self.tts is not None
        reply.interrupted = True
        reply.scope.cancel()
        self.tts.cancel(reply.rid)
        self._play_end = self._clock
        self.barge_ins += 1
        self._events.put(AgentSpeechStarted())
        log.info("barge-in during %s", reply.rid)

    def _end_of_turn(self, event: SttEndOfTurn) -> None:
        text = " ".join(event.text.split())
        if not text:
            return  # noise, a cough: nothing recognised
        if self._playing():
            self._barge_in()
        for reply in self._replies.values():  # interrupted with nothing playing: all heard
            if reply.interrupted and reply.task_done and not reply.applied:
                reply.heard_ms = reply.spoken.audio_ms
                self._apply_heard(reply)
        self.caller_turns.append(text)
        self._events.put(AgentTranscript("caller", text))
        self._start_reply(user_text=text, t_eot=event.t or time.perf_counter())

    # -- replies ---------------------------------------------------------------------------
    def _start_reply(
        self,
        *,
        user_text: str | None = None,
        greeting: str | None = None,
        t_eot: float | None = None,
    ) -> None:
        assert self.tts is not None and self._nursery is not None
        self._count += 1
        rid = f"reply-{self._count}" + ("-greeting" if greeting is not None else "")
        reply = _Reply(SpokenReply(rid))
        if user_text is not None:
            reply.timing = TurnTiming(rid, t_end_of_turn=t_eot)
            self.timings.append(reply.timing)
        self._replies[rid] = reply
        self._reply = reply
        # forget old replies (their truncate can no longer come)
        for old in list(self._replies)[:-4]:
            del self._replies[old]
        self.tts.begin(rid)
        self._nursery.start_soon(self._reply_task, reply, user_text, greeting)

    def _speak(self, reply: _Reply, text: str) -> None:
        assert self.tts is not None
        if reply.interrupted or not text:
            return
        clause = reply.spoken.add_clause(text)
        if reply.timing is not None and reply.timing.t_first_clause is None:
            reply.timing.t_first_clause = time.perf_counter()
            reply.timing.first_clause = text
        self.tts.speak(reply.rid, clause, text)

    async def _reply_task(self, reply: _Reply, user_text: str | None, greeting: str | None) -> None:
        assert self.tts is not None and self.conversation is not None
        splitter = ClauseSplitter()

        def on_text(delta: str) -> None:
            t = time.perf_counter()
            timing = reply.timing
            if timing is not None and timing.t_first_token is None:
                timing.t_first_token = t
            for clause in splitter.feed(delta):
                if timing is not None and timing.t_clause_delta is None:
                    timing.t_clause_delta = t  # the delta that completed the first clause
                self._speak(reply, clause)

        def on_round(index: int) -> None:
            tail = splitter.flush()
            if tail:
                self._speak(reply, tail)
            reply.spoken.assign_message(index)

        try:
            with reply.scope:
                if greeting is not None:
                    for clause in splitter.feed(greeting):
                        self._speak(reply, clause)
                    self._speak(reply, splitter.flush())
                    reply.spoken.assign_message(self.history.add_assistant(greeting))
                else:
                    assert user_text is not None
                    self.history.add_user(user_text)
                    try:
                        result = await self.conversation.reply(on_text, on_round)
                        if reply.timing is not None and result.turns:
                            reply.timing.t_llm_request = result.turns[0].t_request
                        self._failures = 0
                    except LLMError as exc:
                        self._model_failed(reply, splitter, exc)
                self.tts.end(reply.rid)
        finally:
            if self.conversation.partial_index is not None:
                reply.spoken.assign_message(self.conversation.partial_index)
                self.conversation.partial_index = None
            reply.task_done = True
            if reply.interrupted and reply.heard_ms is not None:
                self._apply_heard(reply)

    def _model_failed(self, reply: _Reply, splitter: ClauseSplitter, exc: LLMError) -> None:
        self._failures += 1
        self.llm_failures += 1
        log.warning("model failed (%d in a row): %s", self._failures, exc)
        self._events.put(AgentErrorEvent("llm_error", str(exc)[:200], fatal=False))
        tail = splitter.flush()
        if tail:
            self._speak(reply, tail)
        give_up = self._failures >= self.max_llm_failures
        text = self.goodbye_on_failure if give_up else self.apology
        self._speak(reply, text)
        reply.spoken.assign_message(self.history.add_assistant(text))
        reply.hangup = reply.hangup or give_up

    async def _run_tool(self, call: ToolCall) -> str:
        reply = self._reply
        if call.name == "end_call":
            if reply is not None:
                reply.hangup = True
            return '{"ok": true}'
        if call.name == "transfer_call" and reply is not None and reply.spoken.clauses:
            # let the announcement reach the engine first: it plays it before redirecting
            with trio.move_on_after(3.0):
                while reply.spoken.audio_ms == 0 and not reply.interrupted:
                    reply.audio_event = trio.Event()
                    await reply.audio_event.wait()
        waiter = trio.Event()
        self._tool_waits[call.id] = waiter
        self._events.put(AgentToolCall(call.id, call.name, call.arguments))
        with trio.move_on_after(self.tool_timeout_s):
            await waiter.wait()
        self._tool_waits.pop(call.id, None)
        output = self._tool_results.pop(call.id, None)
        if output is None:
            return orjson.dumps({"error": f"tool {call.name} timed out"}).decode()
        return output

    def _apply_heard(self, reply: _Reply) -> None:
        """Keep in the history only what the caller heard of an interrupted reply."""
        if reply.applied:
            return
        reply.applied = True
        heard_ms = reply.heard_ms if reply.heard_ms is not None else reply.spoken.audio_ms
        for index, text in reply.spoken.heard_by_message(heard_ms).items():
            if index < len(self.history.messages):
                self.history.set_assistant_text(index, text)
        heard = reply.spoken.heard_text(heard_ms)
        self.agent_turns.append(heard)
        if heard:
            self._events.put(AgentTranscript("agent", heard + " …"))

    # -- the agent's audio -----------------------------------------------------------------
    async def _tts_loop(self) -> None:
        assert self.tts is not None
        while True:
            for event in await self.tts.receive():
                reply = self._replies.get(event.response_id)
                if reply is None or reply.interrupted:
                    continue  # late audio of a cancelled reply
                if isinstance(event, TtsAudio):
                    if not event.ulaw:
                        continue
                    timing = reply.timing
                    if timing is not None and timing.t_first_audio is None:
                        timing.t_first_audio = event.t or time.perf_counter()
                    reply.spoken.add_audio(len(event.ulaw) / 8.0, event.clause)
                    reply.audio_event.set()
                    self._play_end = max(self._play_end, self._clock) + len(event.ulaw)
                    self._events.put(AgentAudio(event.ulaw, reply.rid))
                    if timing is not None and timing.t_first_event is None:
                        timing.t_first_event = time.perf_counter()
                elif isinstance(event, TtsDone):
                    reply.spoken.finish()
                    reply.audio_event.set()
                    self._events.put(AgentResponseDone(reply.rid))
                    if reply.spoken.text:  # recorded once it has played (or been cut)
                        self._unheard.append(reply)
                    if reply.hangup:
                        self._events.put(AgentHangup("agent ended the call"))


async def _plain(fn: Callable[[], Any]) -> None:
    await fn()


def _first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def tool_options(options: Mapping[str, Any]) -> tuple[list[dict[str, Any]], ToolRegistry | None]:
    """``tools`` (names, HTTP tool tables, schemas; :func:`relay.tools.resolve_tools`)."""
    registry = options.get("tool_registry")
    if registry is not None and not isinstance(registry, ToolRegistry):
        raise ConfigError("agents.*.tool_registry: must be a relay.tools.ToolRegistry")
    schemas, registry = resolve_tools(options.get("tools"), registry)
    return [dict(s) for s in schemas], registry
