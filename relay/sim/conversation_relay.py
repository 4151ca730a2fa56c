"""Twilio's side of a ConversationRelay call, for ``relay simulate --mode conversation-relay``
and the tests.

1. The voice webhook (signed POST, as :func:`relay.sim.simulator.http_post_form`); the
   TwiML must hold ``<Connect><ConversationRelay url>`` (its ``<Parameter>`` s become
   ``setup.customParameters``; ``welcomeGreeting`` is "spoken" first).
2. The WebSocket: upgrade signed with ``X-Twilio-Signature`` over the URL, then ``setup``,
   then the caller's script: each :class:`Turn` is a ``prompt`` (``last: true``, optionally
   preceded by partial prompts), a ``dtmf`` message, or an interruption: ``interrupt``
   {``utteranceUntilInterrupt``: the words spoken so far, ``durationUntilInterruptMs``} sent
   while the agent's answer is being spoken, then the caller's prompt.
3. Twilio's TTS: ``text`` tokens are "spoken" at ``chars_per_s`` from the first token on;
   ``last: true`` closes the answer; an ``end`` message ends the session, and Twilio then
   fetches the ``<Connect action>`` URL with ``HandoffData``.

Messages are checked as Twilio checks them (error 64107 on an invalid message): a ``text``
needs a string ``token``; ``end.handoffData`` must be a string.
"""

from __future__ import annotations

import hashlib
import secrets
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson
import trio

from ..errors import ConnectionClosed
from ..media import websocket as wsmod
from ..protocol.signature import compute_signature
from .simulator import http_post_form

__all__ = ["CrCallResult", "Turn", "format_dialogue", "place_call"]

#: Twilio's voices speak ~14-16 characters a second
CHARS_PER_S = 15.0


@dataclass
class Turn:
    """One caller turn: ``text`` said (a prompt), or a keypad ``dtmf`` digit.
    ``interrupt_after_s``: start speaking that long after the agent's answer began."""

    text: str = ""
    dtmf: str = ""
    interrupt_after_s: float | None = None
    partials: bool = False
    #: pause before speaking once the agent finished
    gap_s: float = 0.3


@dataclass
class CrCallResult:
    call_sid: str
    twiml: str = ""
    rejected: str | None = None
    refused: str | None = None
    error: str | None = None
    greeting: str = ""
    #: (t, who, text): the dialogue as the caller lived it
    dialogue: list[tuple[float, str, str]] = field(default_factory=list)
    #: prompt sent -> first text token received, per answer (seconds)
    first_token_s: list[float] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    interrupts: int = 0
    ended: bool = False
    handoff: dict[str, Any] | None = None
    after_twiml: str = ""
    invalid: list[str] = field(default_factory=list)


@dataclass
class _Answer:
    tokens: list[str] = field(default_factory=list)
    t_first: float | None = None
    last: bool = False

    @property
    def text(self) -> str:
        return "".join(self.tokens)


def _sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def _account_sid(auth_token: str) -> str:
    return "AC" + hashlib.sha256(auth_token.encode()).hexdigest()[:32]


def _parse(twiml: str) -> tuple[str, dict[str, str], dict[str, str], str]:
    """(url, attributes, parameters, connect action) of ``<Connect><ConversationRelay>``."""
    root = ET.fromstring(twiml)
    relay = root.find("Connect/ConversationRelay")
    if relay is None:
        raise ValueError(f"no <Connect><ConversationRelay> ({'+'.join(c.tag for c in root)})")
    url = relay.get("url", "")
    if not url:
        raise ValueError("<ConversationRelay> without url")
    params = {p.get("name", ""): p.get("value", "") for p in relay.findall("Parameter")}
    connect = root.find("Connect")
    assert connect is not None
    return url, dict(relay.attrib), params, connect.get("action", "")


class _Session:
    def __init__(self, ws: wsmod.WebSocket, result: CrCallResult, chars_per_s: float) -> None:
        self.ws = ws
        self.r = result
        self.rate = chars_per_s
        self.t0 = trio.current_time()
        self.answer: _Answer | None = None
        self.changed = trio.Event()
        self.closed = False

    def now(self) -> float:
        return trio.current_time() - self.t0

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_text(orjson.dumps(message).decode())

    async def reader(self) -> None:
        try:
            while True:
                for message in await self.ws.receive():
                    self._on(message)
        except ConnectionClosed:
            self.closed = True
            self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _on(self, message: str | bytes) -> None:
        try:
            msg = orjson.loads(message)
        except orjson.JSONDecodeError:
            self.r.invalid.append("64107: not JSON")
            return
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "text":
            token, last = msg.get("token"), msg.get("last", False)
            if not isinstance(token, str) or not isinstance(last, bool):
                self.r.invalid.append("64107: text needs a string token and a boolean last")
                return
            answer = self.answer
            if answer is None or answer.last:
                answer = self.answer = _Answer()
            if answer.t_first is None and token:
                answer.t_first = trio.current_time()
            answer.tokens.append(token)
            answer.last = last
        elif kind == "end":
            data = msg.get("handoffData")
            if data is not None and not isinstance(data, str):
                self.r.invalid.append("64107: end.handoffData must be a string")
            self.r.ended = True
            try:
                self.r.handoff = orjson.loads(data) if data else {}
            except orjson.JSONDecodeError:
                self.r.handoff = {"raw": data}
        elif kind in ("play", "sendDigits", "language"):
            pass
        else:
            self.r.invalid.append(f"64107: unknown message type {kind!r}")
        self._notify()

    async def wait(self, predicate: Any, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while not predicate():
                await self.changed.wait()
            return True
        return False

    def spoken(self, answer: _Answer) -> str:
        """The words of ``answer`` Twilio's TTS has said by now."""
        if answer.t_first is None:
            return ""
        chars = int((trio.current_time() - answer.t_first) * self.rate)
        text = answer.text
        if chars >= len(text):
            return text.strip()
        cut = text.rfind(" ", 0, chars + 1)
        return text[:cut].strip() if cut > 0 else ""

    async def speak_answer(self, answer: _Answer, turn: Turn | None, timeout: float) -> None:
        """Wait until the answer is complete and said (or the caller cuts in)."""
        until_cut = turn.interrupt_after_s if turn is not None else None
        if until_cut is not None:
            await self.wait(lambda: answer.t_first is not None or self.closed, timeout)
            await trio.sleep(until_cut)
            return
        await self.wait(lambda: answer.last or self.closed or self.r.ended, timeout)
        if answer.t_first is not None:
            left = len(answer.text) / self.rate - (trio.current_time() - answer.t_first)
            if left > 0:
                await trio.sleep(left)


async def place_call(
    url_base: str,
    auth_token: str,
    script: list[Turn],
    *,
    to: str = "+15550100",
    from_: str = "+15550199",
    call_sid: str | None = None,
    account_sid: str | None = None,
    chars_per_s: float = CHARS_PER_S,
    answer_timeout: float = 15.0,
    setup_params: dict[str, str] | None = None,
    linger_s: float = 0.5,
) -> CrCallResult:
    """One ConversationRelay call following ``script``; the result holds the dialogue."""
    call_sid = call_sid or _sid("CA")
    account_sid = account_sid or _account_sid(auth_token)
    r = CrCallResult(call_sid)
    base_params = {
        "CallSid": call_sid,
        "AccountSid": account_sid,
        "From": from_,
        "To": to,
        "CallStatus": "ringing",
        "Direction": "inbound",
        "ApiVersion": "2010-04-01",
    }
    response = await http_post_form(url_base + "/twilio/voice", base_params, auth_token=auth_token)
    r.twiml = response.body.decode("utf-8", "replace")
    if response.status != 200:
        r.rejected = f"HTTP {response.status} from voice webhook"
        return r
    try:
        url, attrs, params, action = _parse(r.twiml)
    except (ValueError, ET.ParseError) as exc:
        r.rejected = str(exc)
        return r
    if urlsplit(url).query:
        r.invalid.append("ConversationRelay url with a query string: use <Parameter>")
    headers = [("X-Twilio-Signature", compute_signature(auth_token, url)), ("User-Agent", "Twilio")]
    try:
        ws = await wsmod.connect(url, headers, timeout=10.0, max_message=1 << 20)
    except (ConnectionClosed, OSError, trio.TooSlowError) as exc:
        r.refused = str(exc)
        return r
    session = _Session(ws, r, chars_per_s)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.reader)
            await session.send(
                {
                    "type": "setup",
                    "sessionId": _sid("VX"),
                    "callSid": call_sid,
                    "accountSid": account_sid,
                    "from": from_,
                    "to": to,
                    "direction": "inbound",
                    "callStatus": "RINGING",
                    "customParameters": {**params, **(setup_params or {})},
                }
            )
            await _converse(session, attrs, script, answer_timeout, linger_s)
            nursery.cancel_scope.cancel()
    except ConnectionClosed as exc:
        r.error = f"session closed: {exc}"
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await ws.aclose()
    if r.ended and action:
        after = await http_post_form(
            action,
            base_params
            | {"CallStatus": "in-progress", "HandoffData": orjson.dumps(r.handoff or {}).decode()},
            auth_token=auth_token,
        )
        r.after_twiml = after.body.decode("utf-8", "replace")
    return r


async def _converse(
    s: _Session, attrs: dict[str, str], script: list[Turn], timeout: float, linger_s: float
) -> None:
    r = s.r
    greeting = attrs.get("welcomeGreeting", "")
    if greeting:
        r.greeting = greeting
        r.dialogue.append((s.now(), "agent", greeting))
        await trio.sleep(len(greeting) / s.rate)
    for i, turn in enumerate(script):
        if s.closed or r.ended:
            return
        await trio.sleep(turn.gap_s)
        if turn.dtmf:
            r.dialogue.append((s.now(), "caller", f"[DTMF {turn.dtmf}]"))
            await s.send({"type": "dtmf", "digit": turn.dtmf})
        else:
            if turn.partials:
                words = turn.text.split()
                for n in range(1, len(words)):
                    partial = " ".join(words[:n])
                    await s.send(
                        {"type": "prompt", "voicePrompt": partial, "lang": "en-US", "last": False}
                    )
            r.dialogue.append((s.now(), "caller", turn.text))
            await s.send(
                {"type": "prompt", "voicePrompt": turn.text, "lang": "en-US", "last": True}
            )
        sent = trio.current_time()
        answer = s.answer = _Answer()
        got = await s.wait(lambda a=answer: a.t_first is not None or s.closed or r.ended, timeout)
        if not got or answer.t_first is None:
            if not r.ended:
                r.error = "no answer to the prompt"
            return
        r.first_token_s.append(answer.t_first - sent)
        following = script[i + 1] if i + 1 < len(script) else None
        await s.speak_answer(answer, following, timeout)
        cutting = following is not None and following.interrupt_after_s is not None
        speaking = not answer.last or (
            answer.t_first is not None
            and len(answer.text) / s.rate > trio.current_time() - answer.t_first
        )
        if cutting and speaking and following is not None:
            heard = s.spoken(answer)
            r.interrupts += 1
            r.answers.append(heard)
            r.dialogue.append((s.now(), "agent", heard + " …"))
            await s.send(
                {
                    "type": "interrupt",
                    "utteranceUntilInterrupt": heard,
                    # a string in one part of Twilio's docs, a number in another
                    "durationUntilInterruptMs": str(
                        int((trio.current_time() - answer.t_first) * 1000)
                    ),
                }
            )
            following.gap_s = 0.0
        else:
            r.answers.append(answer.text.strip())
            r.dialogue.append((s.now(), "agent", answer.text.strip()))
    # the caller stays on the line a little (an agent ending the call sends ``end``)
    await s.wait(lambda: r.ended or s.closed, linger_s)


def format_dialogue(dialogue: list[tuple[float, str, str]]) -> str:
    return "\n".join(f"{t:7.2f}s  {who:>6}: {text}" for t, who, text in dialogue)
