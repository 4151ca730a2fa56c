"""What both Twilio-speech modes share: the agent of a call (built once per process and
options), its tools as a call runs them, and the call record's transcript.

Tools: ``end_call`` and ``transfer_call`` are relay's (the answer becomes ``end`` /
``<Hangup/>`` or a ``<Dial>``); every other tool runs through the agent's own registry,
then the process-wide one, exactly as for a Media Streams call (``relay.media.call``).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from ...control import transfer
from ...control.phone import normalize_e164
from ...control.policies import CallPolicy
from ...records import CallRecord
from ...tools import ToolRegistry
from ..registry import create_agent
from ..text.conversation import History, ToolCall
from ..text.llm import Brain, Conversation
from .config import TwilioSpeechAgent

if TYPE_CHECKING:
    from ...state import RelayState

log = logging.getLogger("relay.agents.twilio_speech")

__all__ = ["SpeechCall", "TurnOutcome", "agent_for", "brain_for", "normalize_utterance"]

_AGENTS: OrderedDict[str, tuple[TwilioSpeechAgent, Brain | None]] = OrderedDict()
_CACHE_SIZE = 256


def _key(tenant_id: str, agent: str, options: Mapping[str, Any]) -> str:
    body = orjson.dumps(dict(options), option=orjson.OPT_SORT_KEYS, default=repr)
    return f"{tenant_id}|{agent}|{body.decode()}"


def agent_for(tenant_id: str, agent: str, options: Mapping[str, Any]) -> TwilioSpeechAgent:
    """The configured agent (cached per options: validating and building it per turn would
    cost more than the turn's own work). Stored agents keep ``env_fallback = false``."""
    key = _key(tenant_id, agent, options)
    hit = _AGENTS.get(key)
    if hit is not None:
        _AGENTS.move_to_end(key)
        return hit[0]
    built = create_agent(options)
    if not isinstance(built, TwilioSpeechAgent):
        raise TypeError(f"agent {agent!r} is not a twilio-speech agent")
    _AGENTS[key] = (built, None)
    while len(_AGENTS) > _CACHE_SIZE:
        _AGENTS.popitem(last=False)
    return built


def brain_for(agent: TwilioSpeechAgent) -> Brain:
    """One chat client per agent and process (Gather turns are short HTTP requests; its
    connection pool then stays warm between a call's turns)."""
    for key, (known, brain) in _AGENTS.items():
        if known is agent:
            if brain is None:
                brain = agent.brain_factory()
                _AGENTS[key] = (agent, brain)
            return brain
    return agent.brain_factory()


def normalize_utterance(text: str) -> str:
    """What two recognitions of the same words share: lower case, no punctuation."""
    kept = "".join(ch if ch.isalnum() or ch.isspace() or ch == "'" else " " for ch in text.lower())
    return " ".join(kept.split())


@dataclass
class TurnOutcome:
    """What the agent decided during a turn, besides its words."""

    hangup: bool = False
    transfer_to: str = ""


@dataclass
class SpeechCall:
    """One call's conversation: the record, the agent and the core's history."""

    state: RelayState
    record: CallRecord
    agent: TwilioSpeechAgent
    history: History
    started: float = field(default_factory=time.monotonic)

    def conversation(self, brain: Brain, outcome: TurnOutcome) -> Conversation:
        async def run(call: ToolCall) -> str:
            return await self.run_tool(call, outcome)

        return Conversation(
            brain,
            self.history,
            tools=self.agent.tool_schemas,
            run_tool=run,
            max_tool_rounds=self.agent.max_tool_rounds,
            final_tools=frozenset({"end_call", transfer.TOOL_NAME}),
        )

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def said(self, role: str, text: str) -> dict[str, Any]:
        entry = {"role": role, "text": text, "t": self.elapsed()}
        if text:
            self.record.transcript.append(entry)
        return entry

    async def run_tool(self, call: ToolCall, outcome: TurnOutcome) -> str:
        started = time.perf_counter()
        if call.name == "end_call":
            outcome.hangup = True
            output = '{"ok": true}'
        elif call.name == transfer.TOOL_NAME:
            output = await self._transfer(call, outcome)
        else:
            tools = self.agent.tools
            if not isinstance(tools, ToolRegistry) or call.name not in tools:
                tools = self.state.tools
            output = await tools.call(call.name, call.arguments, self.agent.tool_timeout_s)
        self.record.tool_calls.append(
            {
                "name": call.name,
                "call_id": call.id,
                "ms": round((time.perf_counter() - started) * 1000, 1),
            }
        )
        return output

    async def _transfer(self, call: ToolCall, outcome: TurnOutcome) -> str:
        try:
            args = orjson.loads(call.arguments or "{}")
        except orjson.JSONDecodeError:
            args = None
        to = args.get("to") if isinstance(args, dict) else None
        target = normalize_e164(to) if isinstance(to, str) else None
        policy = await self.policy()
        if target is None or target not in policy.transfer_to:
            allowed = ", ".join(policy.transfer_to) or "none"
            return orjson.dumps(
                {"error": f"to: not one of the allowed numbers ({allowed})"}
            ).decode()
        outcome.transfer_to = target
        return orjson.dumps({"transferring": True, "to": target}).decode()

    async def policy(self) -> CallPolicy:
        route = await self.state.control.directory.agent(self.record.tenant_id, self.record.agent)
        return CallPolicy.lenient(route.options) if route is not None else CallPolicy()


async def allowed_transfer(state: RelayState, record: CallRecord, target: str) -> str:
    """``target`` when the call's agent may transfer there, else ""."""
    number = normalize_e164(target) if target else None
    if number is None:
        return ""
    route = await state.control.directory.agent(record.tenant_id, record.agent)
    policy = CallPolicy.lenient(route.options) if route is not None else CallPolicy()
    return number if number in policy.transfer_to else ""
