"""The ``<Gather input="speech">`` + ``<Say>`` loop: one webhook per turn, state in the
call record.

Each turn's answer is TwiML: the reply said inside the next speech ``<Gather>`` (so the
caller can cut in), a ``<Redirect>`` back to the same turn URL for when nothing was said.
The conversation (Chat Completions messages, silence and failure counts, the turn number)
lives in the call record's ``stats["twilio_speech"]``, which the call history writes to
the store with the record: the next callback may reach any worker process. The turn
number is part of the signed action URL, so a process whose in-memory record is behind
reads the store instead.

**Answer early.** Twilio POSTs ``partialResultCallback`` while the caller speaks
(``StableSpeechResult`` + ``UnstableSpeechResult``, ordered by ``SequenceNumber``). Each new
hypothesis (re)starts the model's first round in the background (:class:`EarlyAnswers`);
when the final ``SpeechResult`` normalises to the same words, that prepared round is used
(awaited if still streaming), otherwise it is cancelled and the model asked again. The
saving is the model time that overlapped Twilio's end-of-speech wait and recognition.
Tools never run speculatively: only the model's first round is prepared. Per process: a
final callback reaching another process simply asks the model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from ...control import transfer
from ...protocol.twiml_speech import dial_twiml, gather_twiml, hangup_twiml
from ...records import CallRecord
from ..text.conversation import History
from ..text.llm import Brain, BrainTurn, LLMError
from .config import TwilioSpeechAgent
from .runtime import SpeechCall, TurnOutcome, brain_for, normalize_utterance

if TYPE_CHECKING:
    from ...state import RelayState

log = logging.getLogger("relay.agents.twilio_speech")

__all__ = ["STATE_KEY", "EarlyAnswers", "GatherTurn", "Urls", "answer_turn", "greeting_twiml"]

STATE_KEY = "twilio_speech"
#: the whole answer must be ready well within Twilio's 15 s webhook timeout
ANSWER_BUDGET_S = 10.0
#: partial hypotheses shorter than this are not worth a model request
MIN_EARLY_WORDS = 2


@dataclass(frozen=True)
class Urls:
    """The signed callback URLs of one turn (the query carries token, agent and turn)."""

    action: str
    partial: str


@dataclass
class GatherTurn:
    """What one ``action`` callback brought and how it was answered (for tests, the bench)."""

    speech: str
    twiml: str
    early: str = ""  # used | discarded | "" (none prepared)
    answer_ms: float = 0.0


def load_state(record: CallRecord) -> dict[str, Any]:
    value = record.stats.get(STATE_KEY)
    return value if isinstance(value, dict) else {}


def greeting_twiml(agent: TwilioSpeechAgent, record: CallRecord, urls: Urls) -> str:
    """The voice webhook's answer: the greeting inside the first ``<Gather>``."""
    settings = agent.settings
    history = History(agent.instructions)
    if settings.greeting:
        history.add_assistant(settings.greeting)
        record.transcript.append({"role": "agent", "text": settings.greeting, "t": 0.0})
    record.stats["mode"] = "gather"
    record.stats[STATE_KEY] = {
        "turn": 0,
        "messages": history.messages,
        "silences": 0,
        "failures": 0,
        "started": time.time(),
    }
    return gather_twiml(
        settings,
        settings.greeting,
        action=urls.action,
        partial=urls.partial if settings.early_answer else "",
        redirect=urls.action,
    )


# --- answer early ------------------------------------------------------------------------------
@dataclass
class _Early:
    call_sid: str
    turn: int
    text: str  # normalised hypothesis
    sequence: int
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    result: BrainTurn | None = None
    failed: bool = False
    started: float = field(default_factory=time.perf_counter)


class EarlyAnswers:
    """Prepared first model rounds, one per call (the newest hypothesis wins)."""

    def __init__(self, limit: int = 1000) -> None:
        self._by_call: dict[str, _Early] = {}
        self.limit = limit
        self.started = 0
        self.used = 0
        self.discarded = 0

    def offer(
        self,
        nursery: trio.Nursery,
        agent: TwilioSpeechAgent,
        record: CallRecord,
        turn: int,
        text: str,
        sequence: int,
    ) -> bool:
        """A partial result: (re)start the model on it unless it says nothing new."""
        norm = normalize_utterance(text)
        current = self._by_call.get(record.call_sid)
        if current is not None and current.turn == turn:
            if sequence <= current.sequence:  # partials can arrive out of order
                return False
            if current.text == norm:
                current.sequence = sequence
                return False
        if len(norm.split()) < MIN_EARLY_WORDS:
            return False
        self._drop(record.call_sid)
        if len(self._by_call) >= self.limit:
            self._drop(next(iter(self._by_call)))
        early = _Early(record.call_sid, turn, norm, sequence)
        self._by_call[record.call_sid] = early
        messages = [*_messages(agent, record), {"role": "user", "content": " ".join(text.split())}]
        nursery.start_soon(self._run, early, brain_for(agent), messages, agent.tool_schemas)
        self.started += 1
        return True

    async def _run(
        self, early: _Early, brain: Brain, messages: list[dict[str, Any]], tools: Sequence[Any]
    ) -> None:
        with early.scope:
            try:
                early.result = await brain.stream(messages, tools, lambda _delta: None)
            except LLMError as exc:
                early.failed = True
                log.info("call %s: early answer failed: %s", early.call_sid, exc)
        early.done.set()

    def _drop(self, call_sid: str) -> None:
        early = self._by_call.pop(call_sid, None)
        if early is not None:
            early.scope.cancel()
            early.done.set()

    def take(self, call_sid: str, turn: int, final_text: str) -> tuple[_Early | None, str]:
        """The prepared round for this final result, and what happened to it."""
        early = self._by_call.pop(call_sid, None)
        if early is None or early.turn != turn:
            if early is not None:
                early.scope.cancel()
            return None, ""
        if early.text != normalize_utterance(final_text) or early.failed:
            early.scope.cancel()
            self.discarded += 1
            return None, "discarded"
        return early, "used"

    def forget(self, call_sid: str) -> None:
        self._drop(call_sid)


class _Prepared:
    """A brain whose first round is already done (the early answer), then the real one."""

    name = "prepared"

    def __init__(self, turn: BrainTurn, brain: Brain) -> None:
        self._turn: BrainTurn | None = turn
        self._brain = brain

    async def stream(
        self, messages: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]], on_text: Any
    ) -> BrainTurn:
        if self._turn is not None:
            turn, self._turn = self._turn, None
            if turn.text:
                on_text(turn.text)
            return turn
        return await self._brain.stream(messages, tools, on_text)

    async def aclose(self) -> None:
        return None


def _messages(agent: TwilioSpeechAgent, record: CallRecord) -> list[dict[str, Any]]:
    history = History(agent.instructions)
    history.messages = [dict(m) for m in load_state(record).get("messages", [])]
    return history.request_messages()


# --- one turn ----------------------------------------------------------------------------------
async def answer_turn(
    state: RelayState,
    agent: TwilioSpeechAgent,
    record: CallRecord,
    speech_text: str,
    urls: Urls,
    early_answers: EarlyAnswers | None = None,
) -> GatherTurn:
    """The TwiML answering one ``action`` callback (``speech_text`` "" = no speech)."""
    t0 = time.perf_counter()
    settings = agent.settings
    saved = load_state(record)
    turn_no = int(saved.get("turn", 0))
    history = History(agent.instructions)
    history.messages = [dict(m) for m in saved.get("messages", [])]
    call = SpeechCall(state, record, agent, history)
    call.started = time.monotonic() - (time.time() - float(saved.get("started", time.time())))
    text = " ".join(speech_text.split())
    outcome = TurnOutcome()
    early_state = ""
    say = ""
    if not text:
        saved["silences"] = int(saved.get("silences", 0)) + 1
        if early_answers is not None:
            early_answers.forget(record.call_sid)
        if saved["silences"] >= 2:  # re-prompted once already: end politely
            say, outcome.hangup = settings.no_input_goodbye, True
            record.end_reason = record.end_reason or "no input"
        else:
            say = settings.no_input_prompt
        history.add_assistant(say)
        call.said("agent", say)
    else:
        saved["silences"] = 0
        call.said("caller", text)
        brain: Brain = brain_for(agent)
        early = None
        if early_answers is not None:
            early, early_state = early_answers.take(record.call_sid, turn_no, text)
        history.add_user(text)
        try:
            with trio.fail_after(ANSWER_BUDGET_S):
                if early is not None:
                    await early.done.wait()
                    if early.result is not None:
                        brain = _Prepared(early.result, brain)
                        early_answers.used += 1  # type: ignore[union-attr]
                    else:
                        early_state = "discarded"
                parts: list[str] = []
                result = await call.conversation(brain, outcome).reply(parts.append)
            say = "".join(parts).strip() or result.text.strip()
            saved["failures"] = 0
        except (LLMError, trio.TooSlowError) as exc:
            saved["failures"] = int(saved.get("failures", 0)) + 1
            state.metrics.error("llm_error")
            log.warning("call %s: model failed (%s): %s", record.call_sid, type(exc).__name__, exc)
            give_up = saved["failures"] >= settings.max_llm_failures
            say = settings.goodbye_on_failure if give_up else settings.apology
            outcome.hangup = outcome.hangup or give_up
            if give_up:
                record.end_reason = record.end_reason or "agent error"
            history.add_assistant(say)
        if say:
            call.said("agent", say)
    if outcome.transfer_to:
        twiml = dial_twiml(settings, say, outcome.transfer_to, transfer.twilio_number(record))
        record.end_reason = "transferred"
        saved["ended"] = True
    elif outcome.hangup:
        twiml = hangup_twiml(settings, say or settings.goodbye)
        record.end_reason = record.end_reason or "agent ended"
        saved["ended"] = True
    else:
        twiml = gather_twiml(
            settings,
            say,
            action=urls.action,
            partial=urls.partial if settings.early_answer else "",
            redirect=urls.action,
        )
    saved["turn"] = turn_no + 1
    saved["messages"] = history.messages
    record.stats[STATE_KEY] = saved
    answer_ms = round((time.perf_counter() - t0) * 1000, 3)
    turns = record.stats.setdefault("turns", [])
    if len(turns) < 200:
        turns.append({"answer_ms": answer_ms, "early": early_state, "speech": bool(text)})
    return GatherTurn(text, twiml, early_state, answer_ms)
