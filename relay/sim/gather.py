"""Twilio executing ``<Gather input="speech">`` TwiML, for ``relay simulate --mode gather``
and the tests. Follows the verbs as Twilio does (``shared/reference/text-agents-and-twiml-
speech.md``, section 2):

* ``<Say>`` takes time proportional to its text (``chars_per_s``); only a ``<Say>`` nested in
  a ``<Gather bargeIn="true">`` can be cut short by the caller speaking;
* ``<Gather input="speech">``: the caller's next scripted :class:`Utterance` is spoken word by
  word (``words_per_s``); with a ``partialResultCallback`` each word POSTs
  ``StableSpeechResult``/``UnstableSpeechResult``/``SequenceNumber`` (without waiting for
  the answer, as Twilio ignores it); once the caller stops, Twilio waits the end-of-speech
  pause (``speechTimeout``: ``auto`` ~ ``auto_pause_s``) plus recognition, then POSTs
  ``action`` with ``SpeechResult`` and ``Confidence`` and runs the TwiML it answers. No
  speech: after ``timeout`` seconds the next verb runs (``action`` is skipped);
* ``<Redirect>`` fetches a new document; ``<Hangup>`` and ``<Dial>`` end the simulation;
  running out of verbs hangs up, as Twilio does.

Every request is signed like Twilio's. ``time_scale`` shrinks every simulated duration
(speech, ``<Say>``, timeouts) for tests; HTTP round trips are never scaled.
"""

from __future__ import annotations

import hashlib
import secrets
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import partial

import trio

from .simulator import http_post_form

__all__ = ["GatherCallResult", "Utterance", "format_dialogue", "place_call"]

CHARS_PER_S = 15.0
WORDS_PER_S = 2.5


@dataclass
class Utterance:
    """What the caller says at the next ``<Gather>`` ("" = stays silent).

    ``barge_in_after_s``: start speaking that long into the agent's nested ``<Say>``.
    ``partial_text``: what the partial results say (a misrecognition the final corrects)."""

    text: str = ""
    barge_in_after_s: float | None = None
    partial_text: str | None = None
    gap_s: float = 0.3


@dataclass
class GatherCallResult:
    call_sid: str
    documents: list[str] = field(default_factory=list)
    dialogue: list[tuple[float, str, str]] = field(default_factory=list)
    #: final result POSTed -> TwiML answer received, per action callback (seconds)
    answer_s: list[float] = field(default_factory=list)
    partials_posted: int = 0
    redirects: int = 0
    end: str = ""  # hangup | dial <number> | no more verbs | caller hung up
    error: str | None = None
    http_errors: list[str] = field(default_factory=list)

    @property
    def said(self) -> list[str]:
        return [text for _t, who, text in self.dialogue if who == "agent"]


def _account_sid(auth_token: str) -> str:
    return "AC" + hashlib.sha256(auth_token.encode()).hexdigest()[:32]


class _Twilio:
    def __init__(
        self,
        url_base: str,
        auth_token: str,
        params: dict[str, str],
        script: list[Utterance],
        result: GatherCallResult,
        *,
        scale: float,
        chars_per_s: float,
        words_per_s: float,
        auto_pause_s: float,
        recognition_s: float,
        nursery: trio.Nursery,
    ) -> None:
        self.url_base = url_base
        self.token = auth_token
        self.params = params
        self.script = list(script)
        self.r = result
        self.scale = scale
        self.chars_per_s = chars_per_s
        self.words_per_s = words_per_s
        self.auto_pause_s = auto_pause_s
        self.recognition_s = recognition_s
        self.nursery = nursery
        self.t0 = trio.current_time()
        self.sequence = 0

    def now(self) -> float:
        return round(trio.current_time() - self.t0, 3)

    async def post(self, url: str, extra: dict[str, str] | None = None) -> str | None:
        response = await http_post_form(url, self.params | (extra or {}), auth_token=self.token)
        if response.status != 200:
            # Twilio: an HTTP error is an application error (the caller hears the error
            # message, then the call ends)
            self.r.http_errors.append(f"HTTP {response.status} from {url.split('?')[0]}")
            return None
        text = response.body.decode("utf-8", "replace")
        self.r.documents.append(text)
        return text

    async def run(self, first: str) -> None:
        doc: str | None = first
        for _ in range(100):  # documents per call: a loop guard
            if doc is None:
                self.r.end = self.r.end or "application error"
                return
            try:
                root = ET.fromstring(doc)
            except ET.ParseError as exc:
                self.r.error = f"12100 document parse failure: {exc}"
                return
            doc = await self._document(root)
            if self.r.end:
                return
        self.r.error = "too many documents"

    async def _document(self, root: ET.Element) -> str | None:
        for verb in root:
            if verb.tag == "Say":
                await self._say(verb.text or "", None)
            elif verb.tag == "Pause":
                await trio.sleep(float(verb.get("length", "1")) * self.scale)
            elif verb.tag == "Gather":
                answer = await self._gather(verb)
                if answer is not None or self.r.end:
                    return answer
            elif verb.tag == "Redirect":
                self.r.redirects += 1
                return await self.post((verb.text or "").strip())
            elif verb.tag == "Hangup":
                self.r.end = "hangup"
                return None
            elif verb.tag == "Dial":
                number = (verb.findtext("Number") or verb.text or "").strip()
                self.r.end = f"dial {number}"
                return None
            elif verb.tag in ("Connect", "Reject"):
                self.r.end = verb.tag.lower()
                return None
        self.r.end = "no more verbs"
        return None

    async def _say(self, text: str, cut_after_s: float | None) -> bool:
        """Speak ``text``; True when the caller cut in (only nested in a barge-in Gather)."""
        text = " ".join(text.split())
        if not text:
            return False
        duration = len(text) / self.chars_per_s
        if cut_after_s is not None and cut_after_s < duration:
            await trio.sleep(cut_after_s * self.scale)
            chars = int(cut_after_s * self.chars_per_s)
            cut = text.rfind(" ", 0, chars + 1)
            heard = text[:cut] if cut > 0 else ""
            self.r.dialogue.append((self.now(), "agent", heard + " …"))
            return True
        self.r.dialogue.append((self.now(), "agent", text))
        await trio.sleep(duration * self.scale)
        return False

    async def _gather(self, gather: ET.Element) -> str | None:
        if "speech" not in (gather.get("input") or "dtmf"):
            self.r.error = "<Gather> without speech input"
            return None
        utterance = self.script.pop(0) if self.script else None
        barge = (gather.get("bargeIn") or "true") == "true"
        cut_after = utterance.barge_in_after_s if utterance is not None and barge else None
        cut = False
        for verb in gather:
            if verb.tag == "Say" and not cut:
                cut = await self._say(verb.text or "", cut_after)
                if cut_after is not None:
                    cut_after = max(
                        0.0, cut_after - len(" ".join((verb.text or "").split())) / self.chars_per_s
                    )
        if utterance is None:
            self.r.end = "caller hung up"
            return None
        if not utterance.text:  # silence: after `timeout` the next verb runs, action skipped
            await trio.sleep(float(gather.get("timeout", "5")) * self.scale)
            self.r.dialogue.append((self.now(), "caller", "(silence)"))
            return None
        if not cut:
            await trio.sleep(utterance.gap_s * self.scale)
        return await self._speak(gather, utterance)

    async def _speak(self, gather: ET.Element, utterance: Utterance) -> str | None:
        words = utterance.text.split()
        heard = (utterance.partial_text or utterance.text).split()
        partial_url = gather.get("partialResultCallback")
        started = self.now()
        for n in range(1, len(words) + 1):
            await trio.sleep(self.scale / self.words_per_s)
            if partial_url:
                upto = heard[: max(1, round(n * len(heard) / len(words)))]
                self.sequence += 1
                fields = {
                    "StableSpeechResult": " ".join(upto[:-1]),
                    "UnstableSpeechResult": upto[-1],
                    "SequenceNumber": str(self.sequence),
                }
                self.r.partials_posted += 1
                self.nursery.start_soon(partial(self.post_quietly, partial_url, fields))
        self.r.dialogue.append((started, "caller", utterance.text))
        timeout = gather.get("speechTimeout", "auto")
        pause = self.auto_pause_s if timeout == "auto" else float(timeout)
        await trio.sleep((pause + self.recognition_s) * self.scale)
        sent = trio.current_time()
        answer = await self.post(
            gather.get("action", ""), {"SpeechResult": utterance.text, "Confidence": "0.92"}
        )
        self.r.answer_s.append(trio.current_time() - sent)
        return answer

    async def post_quietly(self, url: str, fields: dict[str, str]) -> None:
        response = await http_post_form(url, self.params | fields, auth_token=self.token)
        if response.status >= 400:
            self.r.http_errors.append(f"HTTP {response.status} from partial callback")


async def place_call(
    url_base: str,
    auth_token: str,
    script: list[Utterance],
    *,
    to: str = "+15550100",
    from_: str = "+15550199",
    call_sid: str | None = None,
    account_sid: str | None = None,
    time_scale: float = 1.0,
    chars_per_s: float = CHARS_PER_S,
    words_per_s: float = WORDS_PER_S,
    auto_pause_s: float = 0.5,
    recognition_s: float = 0.2,
    status_callback: bool = True,
) -> GatherCallResult:
    """One call whose agent answers with ``<Gather input="speech">`` TwiML."""
    call_sid = call_sid or "CA" + secrets.token_hex(16)
    params = {
        "CallSid": call_sid,
        "AccountSid": account_sid or _account_sid(auth_token),
        "From": from_,
        "To": to,
        "Direction": "inbound",
        "ApiVersion": "2010-04-01",
    }
    result = GatherCallResult(call_sid)
    async with trio.open_nursery() as nursery:
        twilio = _Twilio(
            url_base,
            auth_token,
            params | {"CallStatus": "in-progress"},
            script,
            result,
            scale=time_scale,
            chars_per_s=chars_per_s,
            words_per_s=words_per_s,
            auto_pause_s=auto_pause_s,
            recognition_s=recognition_s,
            nursery=nursery,
        )
        first = await twilio.post(url_base + "/twilio/voice")
        if first is None:
            result.error = result.http_errors[-1] if result.http_errors else "voice webhook failed"
        else:
            await twilio.run(first)
    if status_callback:
        await http_post_form(
            url_base + "/twilio/status",
            params | {"CallStatus": "completed", "CallDuration": "1"},
            auth_token=auth_token,
        )
    return result


def format_dialogue(result: GatherCallResult) -> str:
    lines = [f"{t:7.2f}s  {who:>6}: {text}" for t, who, text in result.dialogue]
    if result.answer_s:
        ms = ", ".join(f"{s * 1000:.0f}" for s in result.answer_s)
        lines.append(f"answers (final result -> TwiML): {ms} ms")
    lines.append(f"end: {result.end or result.error}")
    return "\n".join(lines)
