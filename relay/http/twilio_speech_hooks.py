"""Webhooks of Twilio-native speech agents (``type = "twilio-speech"``).

* the voice webhook's answer for such an agent (:func:`answer_call`, called from
  ``twilio_hooks.voice``): ``<Connect><ConversationRelay>`` or the first speech
  ``<Gather>``;
* ``POST /twilio/speech/turn``: a ``<Gather>`` ``action`` (and its ``<Redirect>`` when
  nothing was said): the next answer as TwiML;
* ``POST /twilio/speech/partial``: ``partialResultCallback``: starts the early answer;
* ``POST /twilio/speech/handoff``: ConversationRelay's ``<Connect action>`` after our
  ``end``: hang up, or ``<Dial>`` a transfer target.

Every request is checked like the voice webhook (``X-Twilio-Signature`` with the token of
the account named by ``AccountSid``) *and* carries the signed per-call token of the call in
its query (``t``; ``a`` = agent, ``n`` = turn), the same defence as the stream token: a
leaked account token alone cannot drive another call's conversation, and the turn number
tells a process whose copy of the call is behind to read the store. Failures never become a
Twilio application error: the caller hears a short apology.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import orjson
import trio
from quart import Quart, Response, request

from ..agents.twilio_speech import gather
from ..agents.twilio_speech.config import SpeechSettings, TwilioSpeechAgent
from ..agents.twilio_speech.runtime import agent_for, allowed_transfer
from ..control.directory import Account, Route
from ..control.policies import CallPlan, CallPolicy
from ..control.transfer import twilio_number
from ..errors import ConfigError
from ..protocol.signature import validate_signature
from ..protocol.twiml_speech import conversation_relay_twiml, dial_twiml, hangup_twiml
from ..records import CallRecord

if TYPE_CHECKING:
    from ..state import RelayState

log = logging.getLogger("relay.http.twilio_speech")

__all__ = ["answer_call", "call_ended", "register"]

#: how long a callback waits for the store to show the turn another process answered
STORE_WAIT_S = 3.0
SORRY = "Sorry, something went wrong on our side. Please call again later. Goodbye."


def _xml(body: str) -> Response:
    return Response(body, status=200, content_type="text/xml; charset=utf-8")


def _query(agent: str, token: str, turn: int | None = None) -> str:
    fields: dict[str, str] = {"a": agent}
    if turn is not None:
        fields["n"] = str(turn)
    fields["t"] = token
    return urlencode(fields)


def turn_urls(state: RelayState, record: CallRecord, turn: int) -> gather.Urls:
    """Signed callback URLs for ``turn`` (a fresh token each turn: long calls outlive one)."""
    token = state.tokens.issue(f"{record.call_sid}|{record.tenant_id}|{record.agent}")
    query = _query(record.agent, token, turn)
    base = state.cfg.public_url
    return gather.Urls(
        f"{base}/twilio/speech/turn?{query}", f"{base}/twilio/speech/partial?{query}"
    )


def conversation_url(state: RelayState, account: Account) -> str:
    """``/twilio/conversation/{AccountSid}``: the upgrade carries no form fields, so the
    path names the account whose token signed it (like ``/twilio/stream/{AccountSid}``)."""
    base = state.cfg.stream_url.removesuffix("/twilio/stream")
    return f"{base}/twilio/conversation/{account.account_sid}"


def answer_call(
    state: RelayState,
    account: Account,
    record: CallRecord,
    route: Route,
    plan: CallPlan,
    token: str,
) -> Response:
    """The voice webhook's TwiML for a twilio-speech agent (no media stream)."""
    metrics = state.metrics
    try:
        agent = agent_for(account.tenant_id, route.agent, route.options)
    except (ConfigError, TypeError) as exc:
        metrics.error("agent_config")
        log.warning("call %s: agent %s unusable: %s", record.call_sid, route.agent, exc)
        return _xml(hangup_twiml(_fallback_settings(), SORRY))
    settings = agent.settings
    record.stats["mode"] = settings.mode
    if settings.mode == "conversation-relay":
        params = {"token": token, "agent": route.agent, "tenant": account.tenant_id}
        action = f"{state.cfg.public_url}/twilio/speech/handoff?{_query(route.agent, token)}"
        twiml = conversation_relay_twiml(
            settings, conversation_url(state, account), params, action=action
        )
        metrics.webhooks["voice_ok_conversation_relay"] += 1
    else:
        record.status = "active"
        record.started_at = time.time()
        metrics.calls_total += 1
        twiml = gather.greeting_twiml(agent, record, turn_urls(state, record, 0))
        metrics.webhooks["voice_ok_gather"] += 1
    history = state.control.history
    if history is not None:
        history.save(record, account.tenant_id)
    log.info(
        "call %s from %s -> agent %s (twilio-speech, %s)",
        record.call_sid,
        record.from_number,
        route.agent,
        settings.mode,
    )
    return _xml(twiml)


def _fallback_settings() -> SpeechSettings:
    """Voice settings for an apology when the call's agent cannot be had."""
    return SpeechSettings(
        mode="gather",
        greeting="",
        voice="Polly.Salli",
        tts_provider="",
        transcription_provider="",
        speech_model="",
        language="",
        hints="",
        interruptible="any",
        dtmf_detection=False,
        speech_timeout="auto",
        gather_timeout_s=5,
        profanity_filter=None,
        early_answer=False,
        no_input_prompt="",
        no_input_goodbye="",
        goodbye="",
        apology="",
        goodbye_on_failure="",
        max_llm_failures=1,
    )


def call_ended(state: RelayState, record: CallRecord, terminal: str) -> None:
    """A terminal status callback ends a Gather call (no socket of ours to see it end)."""
    if record.status == "completed":
        return
    record.status = "completed"
    record.end_reason = record.end_reason or "caller hung up"
    record.ended_at = time.time()
    state.policies.release(record.call_sid)
    _early(state).forget(record.call_sid)
    plan = state.policies.plan(record.call_sid)
    if plan is not None:
        state.postcall.submit(record, plan.policy.features)
    log.info("call %s ended: %s (%s)", record.call_sid, record.end_reason, terminal)


def _early(state: RelayState) -> gather.EarlyAnswers:
    early = getattr(state, "_early_answers", None)
    if early is None:
        early = gather.EarlyAnswers()
        state._early_answers = early  # type: ignore[attr-defined]
    return early


def register(app: Quart, state: RelayState) -> None:
    cfg = state.cfg
    metrics = state.metrics
    directory = state.control.directory

    def signed_url() -> str:
        # the URL Twilio called (as twilio_hooks.signed_url: public URL or trusted proxy)
        base = cfg.public_url
        if cfg.server.trust_forwarded:
            proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip()
            host = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()
            if proto and host:
                base = f"{proto}://{host}"
        query = request.query_string.decode("latin-1")
        return base + request.path + (f"?{query}" if query else "")

    async def checked(route: str) -> tuple[dict[str, str], Account, str] | Response:
        """(form, account, agent) of a callback whose signature and call token verify."""
        try:
            form = await request.form
        except Exception as exc:
            metrics.webhooks[f"{route}_malformed"] += 1
            metrics.error("webhook_malformed")
            log.warning("%s callback: unreadable body (%s)", route, exc.__class__.__name__)
            return Response("malformed request\n", status=400)
        params = {k: form.get(k, "") for k in form}
        signature = request.headers.get("X-Twilio-Signature")
        account_sid = params.get("AccountSid", "")
        account = await directory.account(account_sid) if len(account_sid) <= 64 else None
        call_sid = params.get("CallSid", "")
        if account is None or not validate_signature(
            account.auth_token, signed_url(), params, signature
        ):
            metrics.webhooks[f"{route}_bad_signature"] += 1
            metrics.error("bad_signature" if account is not None else "unknown_account")
            log.warning(
                "%s callback refused: %s (CallSid %s)",
                route,
                "unknown AccountSid" if account is None else "bad X-Twilio-Signature",
                call_sid[:40],
            )
            return Response("invalid Twilio signature\n", status=403)
        agent = request.args.get("a", "")
        token = request.args.get("t")
        if not call_sid.startswith("CA") or not state.tokens.verify(
            f"{call_sid}|{account.tenant_id}|{agent}", token
        ):
            metrics.webhooks[f"{route}_bad_token"] += 1
            metrics.error("speech_token")
            log.warning(
                "%s callback refused: missing or invalid call token (%s)", route, call_sid[:40]
            )
            return Response("invalid call token\n", status=403)
        return params, account, agent

    async def record_at_turn(account: Account, call_sid: str, turn: int) -> CallRecord | None:
        record = state.records.get(call_sid)
        if record is not None and record.tenant_id != account.tenant_id:
            return None
        if record is not None and gather.load_state(record).get("turn") == turn:
            return record
        store = state.control.store
        if store is None:
            return None
        # Another process answered the last turn: its history write may still be queued.
        with trio.move_on_after(STORE_WAIT_S):
            while True:
                row = await store.run(store.get_call, account.tenant_id, call_sid)
                stats = (row or {}).get("stats") or {}
                if (stats.get(gather.STATE_KEY) or {}).get("turn") == turn:
                    assert row is not None
                    return _from_row(state, account, row)
                await trio.sleep(0.05)
        return None

    @app.post("/twilio/speech/turn")
    async def speech_turn() -> Any:
        got = await checked("speech_turn")
        if isinstance(got, Response):
            return got
        params, account, agent_name = got
        call_sid = params["CallSid"]
        try:
            turn = int(request.args.get("n", ""))
        except ValueError:
            metrics.webhooks["speech_turn_malformed"] += 1
            return Response("bad turn\n", status=400)
        record = await record_at_turn(account, call_sid, turn)
        route = await directory.agent(account.tenant_id, agent_name)
        agent = _agent(account, agent_name, route)
        if record is None or agent is None or record.status == "completed":
            metrics.webhooks["speech_turn_lost"] += 1
            metrics.error("speech_state")
            log.warning("call %s: no conversation state for turn %d", call_sid, turn)
            return _xml(hangup_twiml(_fallback_settings(), SORRY))
        if params.get("Digits"):
            record.dtmf.append(params["Digits"][:20])
        speech = params.get("SpeechResult", "")
        result = await gather.answer_turn(
            state, agent, record, speech, turn_urls(state, record, turn + 1), _early(state)
        )
        history = state.control.history
        if history is not None:
            history.save(record, account.tenant_id)
        metrics.webhooks["speech_turn_ok"] += 1
        return _xml(result.twiml)

    @app.post("/twilio/speech/partial")
    async def speech_partial() -> Any:
        got = await checked("speech_partial")
        if isinstance(got, Response):
            return got
        params, account, agent_name = got
        record = state.records.get(params["CallSid"])
        try:
            turn = int(request.args.get("n", ""))
            sequence = int(params.get("SequenceNumber", "0") or 0)
        except ValueError:
            metrics.webhooks["speech_partial_malformed"] += 1
            return Response("", status=204)
        if (
            record is None
            or record.tenant_id != account.tenant_id
            or gather.load_state(record).get("turn") != turn
        ):
            return Response("", status=204)  # answered elsewhere: that process asks the model
        route = await directory.agent(account.tenant_id, agent_name)
        agent = _agent(account, agent_name, route)
        if agent is not None and agent.settings.early_answer:
            text = " ".join(
                p
                for p in (
                    params.get("StableSpeechResult", ""),
                    params.get("UnstableSpeechResult", ""),
                )
                if p
            )
            _early(state).offer(app.nursery, agent, record, turn, text, sequence)  # type: ignore[attr-defined]
        metrics.webhooks["speech_partial_ok"] += 1
        return Response("", status=204)

    @app.post("/twilio/speech/handoff")
    async def speech_handoff() -> Any:
        # ConversationRelay's <Connect action>: Twilio posts HandoffData after our `end`
        got = await checked("speech_handoff")
        if isinstance(got, Response):
            return got
        params, account, agent_name = got
        record = state.records.get(params["CallSid"])
        route = await directory.agent(account.tenant_id, agent_name)
        agent = _agent(account, agent_name, route)
        settings = agent.settings if agent is not None else _fallback_settings()
        try:
            handoff = orjson.loads(params.get("HandoffData") or "{}")
        except orjson.JSONDecodeError:
            handoff = {}
        target = ""
        if isinstance(handoff, dict) and handoff.get("reason") == "transfer" and record is not None:
            target = await allowed_transfer(state, record, str(handoff.get("to", "")))
        metrics.webhooks["speech_handoff_ok"] += 1
        if target and record is not None:
            return _xml(dial_twiml(settings, "", target, twilio_number(record)))
        farewell = ""
        reason = handoff.get("reason") if isinstance(handoff, dict) else None
        if reason in ("max duration", "drained") and route is not None:
            # cut short by relay (the cap, a drain): the agent's fallback_message, as for
            # media calls, so nobody is hung up on without a word
            try:
                policy = CallPolicy.from_options(route.options, check_files=False)
                farewell = policy.fallback_message
            except ConfigError:
                farewell = ""
            if farewell and record is not None:
                record.fallback_message_played = True
        return _xml(hangup_twiml(settings, farewell))


def _agent(account: Account, name: str, route: Route | None) -> TwilioSpeechAgent | None:
    if route is None:
        return None
    try:
        return agent_for(account.tenant_id, name, route.options)
    except (ConfigError, TypeError):
        return None


def _from_row(state: RelayState, account: Account, row: dict[str, Any]) -> CallRecord:
    """This process's copy of a call another process answered last (from the store)."""
    record = state.records.create(row["call_sid"], tenant_id=account.tenant_id)
    record.tenant_id = account.tenant_id
    record.account_sid = account.account_sid
    record.agent = row.get("agent", record.agent)
    record.from_number = row.get("from", record.from_number)
    record.to_number = row.get("to", record.to_number)
    record.direction = row.get("direction", record.direction)
    record.status = row.get("status", record.status)
    record.end_reason = row.get("end_reason", "")
    started = row.get("started_at")
    record.started_at = started / 1000.0 if started else record.started_at
    record.transcript = list(row.get("transcript", []))
    record.tool_calls = list(row.get("tool_calls", []))
    record.dtmf = list(row.get("dtmf", []))
    record.stats = dict(row.get("stats", {}))
    return record
