"""A minimal Twilio REST API for ``relay demo``: creates calls and places them back at relay.

Only what an outbound call needs, offline: ``POST /2010-04-01/Accounts/{AC}/Calls.json``
with HTTP Basic auth (the account's SID and token), answered ``201`` with a ``queued``
Call; then, like Twilio, signed status callbacks (``initiated``, ``ringing``,
``in-progress``, ``completed``, with ``SequenceNumber``) and, once "answered", the signed
voice webhook at the call's ``Url`` and its media stream, played by relay's own Twilio
simulator (``relay.sim.simulator.place_call``, the callee side). How the callee answers is
scripted (:data:`OUTCOMES`, taken in turn, the last one repeating): ``human`` and
``machine`` answer (``AnsweredBy`` ``human`` / ``machine_start`` in the ``in-progress``
callback and the voice webhook when the call asked for ``MachineDetection``; the machine
then plays its greeting), ``busy``, ``no-answer`` and ``failed`` never answer: no webhook,
one terminal callback with that status. ``relay simulate --outbound`` serves this for a
running relay (``[twilio] api_base_url`` pointed at it). Anything else is answered 404 in
Twilio's error shape. The test suite has a complete fake (tests/fake_twilio_rest.py:
validation, errors, hang-ups, redirects); this one exists so the demo runs from an
installed package.
"""

from __future__ import annotations

import base64
import math
import re
import secrets
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import orjson
import trio

from . import simulator

#: how the callee of a placed call behaves (RestSim.callee)
OUTCOMES = ("human", "machine", "busy", "no-answer", "failed")
#: AnsweredBy per answering outcome (Twilio's values with MachineDetection=Enable)
ANSWERED_BY = {"human": "human", "machine": "machine_start"}

_CALLS = re.compile(r"^/2010-04-01/Accounts/(?P<account>AC[0-9a-f]{32})/Calls\.json$")


@dataclass
class PlacedCall:
    sid: str
    to: str
    from_: str
    params: dict[str, list[str]]
    outcome: str = "human"
    result: Any = None
    statuses: list[str] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)


@dataclass
class RestSim:
    account_sid: str
    auth_token: str
    callee_seconds: float = 4.0
    port: int = 0
    calls: list[PlacedCall] = field(default_factory=list)
    #: the callees' outcomes, one per placed call in turn (the last repeats), see OUTCOMES
    callee: tuple[str, ...] = ("human",)
    #: what a ``machine`` callee plays once answered (μ-law 8 kHz; None: the default audio)
    machine_audio: bytes | None = None
    _nursery: trio.Nursery | None = None

    def __post_init__(self) -> None:
        unknown = [o for o in self.callee if o not in OUTCOMES]
        if unknown or not self.callee:
            raise ValueError(f"callee outcomes: one or more of {', '.join(OUTCOMES)}")

    def next_outcome(self) -> str:
        return self.callee[min(len(self.calls), len(self.callee)) - 1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            listeners = await nursery.start(
                partial(trio.serve_tcp, self._handle, self.port, host="127.0.0.1")
            )
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started()

    def _authorised(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return False
        return scheme.lower() == "basic" and (user, password) == (
            self.account_sid,
            self.auth_token,
        )

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            request: h11.Request | None = None
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            assert request is not None
            headers = {k.decode().lower(): v.decode("latin-1") for k, v in request.headers}
            status, payload = self._answer(
                request.method.decode(), request.target.decode(), headers, bytes(body)
            )
            out = conn.send(
                h11.Response(
                    status_code=status,
                    headers=[
                        ("Content-Type", "application/json"),
                        ("Content-Length", str(len(payload))),
                        ("Connection", "close"),
                    ],
                )
            )
            out += conn.send(h11.Data(data=payload)) or b""
            out += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    def _answer(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        match = _CALLS.match(target.split("?", 1)[0])
        if method != "POST" or match is None:
            return 404, orjson.dumps({"code": 20404, "message": "not found", "status": 404})
        if match["account"] != self.account_sid or not self._authorised(
            headers.get("authorization", "")
        ):
            return 401, orjson.dumps({"code": 20003, "message": "Authenticate", "status": 401})
        params = parse_qs(body.decode(), keep_blank_values=True)
        first = {k: v[0] for k, v in params.items()}
        if not first.get("To") or not first.get("From") or not first.get("Url"):
            return 400, orjson.dumps({"code": 21205, "message": "To/From/Url", "status": 400})
        call = PlacedCall("CA" + secrets.token_hex(16), first["To"], first["From"], params)
        self.calls.append(call)
        call.outcome = self.next_outcome()
        assert self._nursery is not None
        self._nursery.start_soon(self._place_back, call)
        return 201, orjson.dumps(
            {
                "sid": call.sid,
                "account_sid": self.account_sid,
                "to": call.to,
                "from": call.from_,
                "status": "queued",
                "direction": "outbound-api",
            }
        )

    async def _place_back(self, call: PlacedCall) -> None:
        first = {k: v[0] for k, v in call.params.items()}
        callback = first.get("StatusCallback")
        seq = 0

        async def status(value: str, **extra: str) -> None:
            nonlocal seq
            call.statuses.append(value)
            if callback:
                params = {
                    "CallSid": call.sid,
                    "AccountSid": self.account_sid,
                    "From": call.from_,
                    "To": call.to,
                    "Direction": "outbound-api",
                    "CallStatus": value,
                    "SequenceNumber": str(seq),
                    **extra,
                }
                seq += 1
                try:
                    await simulator.http_post_form(
                        callback, params, auth_token=self.auth_token, timeout=5.0
                    )
                except (OSError, trio.TooSlowError, h11.ProtocolError):
                    pass

        try:
            await status("initiated")
            await status("ringing")
            await trio.sleep(0.3)
            if call.outcome not in ANSWERED_BY:  # busy, no-answer, failed: never answered
                await status(call.outcome, CallDuration="0")
                return
            extra: dict[str, str] = {}
            if first.get("MachineDetection"):
                extra["AnsweredBy"] = ANSWERED_BY[call.outcome]
            await status("in-progress", **extra)
            url = first["Url"]
            parts = urlsplit(url)
            call.result = await simulator.place_call(
                f"{parts.scheme}://{parts.netloc}",
                self.auth_token,
                to=call.to,
                from_=call.from_,
                call_sid=call.sid,
                account_sid=self.account_sid,
                duration_s=self.callee_seconds,
                status_callback=None,
                webhook_url=url,
                direction="outbound-api",
                extra_params=extra,
                audio=self.machine_audio if call.outcome == "machine" else None,
            )
            await status("completed", CallDuration=str(math.ceil(call.result.duration_s)))
        finally:
            call.done.set()


def describe(call: PlacedCall) -> str:
    """One line per placed call (``relay simulate --outbound``)."""
    line = f"{call.sid}  {call.from_} -> {call.to}  {call.outcome}: {' -> '.join(call.statuses)}"
    result = call.result
    if result is not None:
        first = result.first_agent_audio_s
        heard = (
            f"agent first heard {first * 1000:.0f} ms after the stream started"
            if first
            else ("agent not heard")
        )
        line += f"; {heard}, {result.heard_ms:.0f} ms heard, hung up by {result.hung_up_by}"
    return line


async def serve_callees(
    account_sid: str,
    auth_token: str,
    *,
    port: int = 0,
    callee: tuple[str, ...] = ("human",),
    calls: int = 0,
    callee_seconds: float = 4.0,
    report: Any = print,
) -> list[PlacedCall]:
    """``relay simulate --outbound``: the Twilio REST API on 127.0.0.1:``port`` placing the
    calls a relay creates back at it, callees answering as scripted; returns once ``calls``
    calls (0: never) have ended, ``report`` getting a line for each."""
    sim = RestSim(account_sid, auth_token, callee_seconds, port=port, callee=callee)
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve)
        report(
            f"Twilio REST simulator at {sim.url} (account {account_sid}): set the relay's "
            f"[twilio] api_base_url to it; callees answer: {', '.join(callee)}"
        )
        done = 0
        while not calls or done < calls:
            while len(sim.calls) <= done:
                await trio.sleep(0.05)
            await sim.calls[done].done.wait()
            report(describe(sim.calls[done]))
            done += 1
        nursery.cancel_scope.cancel()
    return sim.calls
