"""A small rule-based receptionist: the offline agent's brain, behind the same
:class:`~relay.agents.text.llm.Brain` interface as a chat model.

It answers from the last message of the history, like a model would: a caller's question
gets an intent (opening hours, the time, a person, goodbye, or not understood), a tool
result gets turned into words. It uses tools the way a model does, through the
conversation core: ``get_time`` for the time, ``transfer_call`` for a person (when the
agent has it and a ``transfer_number``), ``end_call`` after saying goodbye.

:data:`CORPUS` is what callers are expected to say; the recogniser's language model is
built from it (``relay/agents/text/sphinx_worker.py``).
"""

from __future__ import annotations

import datetime as _dt
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from .conversation import ToolCall
from .llm import BrainTurn, TextSink

__all__ = ["CORPUS", "Hours", "ReceptionistBrain", "classify"]

DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")

CORPUS = """
hello
hi there
hello what are your opening hours
what are your opening hours
what are your hours
when are you open
when are you open today
are you open today
are you open tomorrow
are you open on saturday
are you open on sunday
are you open on monday
are you open on the weekend
when do you close today
when do you open tomorrow
what time do you close
what time do you open
what time do you open on saturday
what time is it
what time is it now
could you tell me the time
can you tell me the time please
do you have the time
what is the time
can i talk to a person please
can i speak to a person
could i speak to someone
i would like to speak to someone
i want to talk to a human
let me talk to a person
put me through to someone please
transfer me to an agent
i need an operator
thank you goodbye
thanks bye
goodbye
bye bye
that is all thank you
no thank you that is all
no thanks
yes please
okay thank you
"""


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def classify(text: str) -> str:
    """Intent of a caller's utterance: hours, time, person, goodbye, greeting or unknown.

    Robust to recognition slips: "talk/speak to" alone means a person, "open"/"close"
    alone means the hours, and "time" with no opening word means the clock."""
    words = _words(text)
    ws = set(words)
    joined = " ".join(words)
    if ws & {
        "person",
        "someone",
        "somebody",
        "human",
        "agent",
        "operator",
        "transfer",
    } or re.search(r"\b(talk|speak) to\b|\bput me through\b", joined):
        return "person"
    if ws & {"open", "opening", "close", "closing", "closed", "hours"}:
        return "hours"
    if "time" in ws or "clock" in ws or re.search(r"\btell me the\b", joined):
        return "time"
    if ws & {"goodbye", "bye"} or re.search(
        r"\bthat is all\b|\bthat's all\b|\bno thanks?\b", joined
    ):
        return "goodbye"
    if ws & {"hello", "hi", "hey"}:
        return "greeting"
    return "unknown"


@dataclass(frozen=True)
class Hours:
    """Opening hours: weekday name -> (open, close) in 24 h ``"HH:MM"``; absent = closed."""

    days: Mapping[str, tuple[str, str]] = field(
        default_factory=lambda: {
            **{d: ("09:00", "17:00") for d in DAYS[:5]},
            "saturday": ("10:00", "14:00"),
        }
    )

    @staticmethod
    def spoken(hhmm: str) -> str:
        hour, minute = (int(x) for x in hhmm.split(":"))
        suffix = "a.m." if hour < 12 else "p.m."
        h12 = hour % 12 or 12
        return f"{h12} {suffix}" if minute == 0 else f"{h12}:{minute:02d} {suffix}"

    def day_sentence(self, day: str) -> str:
        span = self.days.get(day)
        if span is None:
            return f"On {day.capitalize()} we are closed."
        opens, closes = self.spoken(span[0]), self.spoken(span[1])
        return f"On {day.capitalize()} we are open from {opens} to {closes}."

    def summary(self) -> str:
        groups: list[tuple[list[str], tuple[str, str] | None]] = []
        for day in DAYS:
            span = self.days.get(day)
            if groups and groups[-1][1] == span:
                groups[-1][0].append(day)
            else:
                groups.append(([day], span))
        open_parts: list[str] = []
        closed: list[str] = []
        for days, span in groups:
            name = days[0].capitalize()
            if len(days) > 1:
                name += f" to {days[-1].capitalize()}"
            if span is None:
                closed.append(name)
            else:
                open_parts.append(f"{name} from {self.spoken(span[0])} to {self.spoken(span[1])}")
        if not open_parts:
            return "We are closed all week."
        text = "We are open " + ", and ".join(open_parts)
        text = text.rstrip(".") + "."
        if closed:
            text += " We are closed on " + " and ".join(closed) + "."
        return text


class ReceptionistBrain:
    """Rule-based replies; tools are asked for exactly as a chat model asks for them."""

    name = "receptionist"

    def __init__(
        self,
        *,
        business: str = "Relay Bakery",
        hours: Hours | None = None,
        timezone: str = "UTC",
        transfer_number: str = "",
    ) -> None:
        self.business = business
        self.hours = hours or Hours()
        self.timezone = timezone
        self.transfer_number = transfer_number
        self._ids = itertools.count(1)
        self.intents: list[str] = []  # per caller turn, for tests and the demo

    def greeting(self) -> str:
        return f"Hello, thanks for calling {self.business}. How can I help you?"

    async def aclose(self) -> None:
        return None

    async def stream(
        self, messages: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]], on_text: TextSink
    ) -> BrainTurn:
        names = {t.get("name") or (t.get("function") or {}).get("name") for t in tools}
        last = messages[-1] if messages else {"role": "user", "content": ""}
        text, calls = self._answer(last, messages, names)
        if text:
            on_text(text)
        return BrainTurn(text, calls, "tool_calls" if calls else "stop")

    def _call(self, name: str, args: dict[str, Any]) -> ToolCall:
        return ToolCall(f"local_{next(self._ids)}", name, orjson.dumps(args).decode())

    def _answer(
        self, last: Mapping[str, Any], messages: list[dict[str, Any]], tools: set[Any]
    ) -> tuple[str, list[ToolCall]]:
        if last.get("role") == "tool":
            return self._after_tool(last, messages), []
        utterance = str(last.get("content") or "")
        intent = classify(utterance)
        self.intents.append(intent)
        if intent == "hours":
            words = set(_words(utterance))
            day = next((d for d in DAYS if d in words), None)
            if day is None and ("today" in words or "tomorrow" in words):
                today = _dt.datetime.now(_dt.UTC).date()
                offset = 1 if "tomorrow" in words else 0
                day = DAYS[(today.weekday() + offset) % 7]
            if day is not None:
                return self.hours.day_sentence(day).rstrip(".") + ". Anything else?", []
            return self.hours.summary() + " Anything else?", []
        if intent == "time":
            if "get_time" in tools:
                return "", [self._call("get_time", {"timezone": self.timezone})]
            now = _dt.datetime.now(_dt.UTC)
            return f"It is {now:%H:%M} UTC.", []
        if intent == "person":
            if "transfer_call" in tools and self.transfer_number:
                return (
                    "Of course, I am putting you through to a colleague now.",
                    [self._call("transfer_call", {"to": self.transfer_number})],
                )
            return "I am sorry, nobody else can take your call right now. Can I help you?", []
        if intent == "goodbye":
            calls = [self._call("end_call", {})] if "end_call" in tools else []
            return "Thank you for calling. Goodbye!", calls
        if intent == "greeting":
            return "Hello! You can ask me about our opening hours or the time.", []
        return (
            "Sorry, I did not catch that. You can ask about our opening hours, the time, "
            "or to speak to a person.",
            [],
        )

    def _after_tool(self, last: Mapping[str, Any], messages: list[dict[str, Any]]) -> str:
        call_id = last.get("tool_call_id")
        name = ""
        for message in messages:
            for call in message.get("tool_calls") or ():
                if call.get("id") == call_id:
                    name = call["function"]["name"]
        try:
            result = orjson.loads(str(last.get("content") or "{}"))
        except orjson.JSONDecodeError:
            result = {"error": "unreadable"}
        if isinstance(result, dict) and result.get("error"):
            if name == "transfer_call":
                return "Sorry, I could not transfer you. Can I help you with something else?"
            if name == "end_call":
                return ""
            return "Sorry, I could not look that up just now."
        if name == "get_time" and isinstance(result, dict) and "iso" in result:
            now = _dt.datetime.fromisoformat(str(result["iso"]))
            h12 = now.hour % 12 or 12
            suffix = "a.m." if now.hour < 12 else "p.m."
            spoken = f"{h12} {suffix}" if now.minute == 0 else f"{h12}:{now.minute:02d} {suffix}"
            return f"It is {spoken} on {result.get('weekday', now.strftime('%A'))}. Anything else?"
        return ""
