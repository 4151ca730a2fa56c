"""Fake AssemblyAI, Deepgram, ElevenLabs and Gemini Live agents for the load bench.

Each plays its vendor's side of the WebSocket just far enough for relay's adapter to
connect and stream, with the same load shape as the OpenAI fake (``bench.fake_agent``):
the agent answers *instantly* after the session setup and then sends 100 ms of audio every
100 ms for as long as the call lasts, in replies of ``response_deltas`` chunks, so both
legs carry load. They live in the load generator's epoll reactor like the OpenAI fake,
share its listener, ticker and bookkeeping (:class:`VendorAgent` is a
:class:`~bench.fake_agent.FakeAgent`) and identify their call the same way (the session's
setup message is the moment it is claimed, see ``bench.loadgen``).

Wire protocol per vendor (what relay/agents/*_protocol.py expect):

============  =====================================  ====================================
vendor        setup (client -> fake -> client)       audio up / audio down
============  =====================================  ====================================
assemblyai    ``session.update`` -> ``session.ready``  ``input.audio`` JSON, base64 μ-law /
                                                     ``reply.audio`` JSON (``reply.started``
                                                     and ``reply.done`` around a reply)
deepgram      ``Welcome`` on connect; ``Settings``   binary frames of raw μ-law both ways
              -> ``SettingsApplied``                 (``AgentStartedSpeaking`` /
                                                     ``AgentAudioDone`` around a reply)
elevenlabs    ``conversation_initiation_client_      ``{"user_audio_chunk"}`` base64 μ-law
              data`` -> ``conversation_initiation_   / ``audio`` events, one ``event_id``
              metadata`` (``ulaw_8000`` both ways)   per reply
gemini        ``setup`` -> ``setupComplete``         ``realtimeInput.audio`` PCM16 16 kHz /
                                                     ``serverContent.modelTurn`` inlineData
                                                     PCM16 24 kHz, ``turnComplete`` (and a
                                                     ``sessionResumptionUpdate``) per reply;
                                                     server messages are JSON in *binary*
                                                     frames, as the Live API sends them
============  =====================================  ====================================

Barge-in (``barge_in``, driven by the harness): AssemblyAI ``input.speech.started`` +
``reply.done`` status ``interrupted``; Deepgram ``UserStartedSpeaking``; ElevenLabs
``interruption`` naming the reply being played; Gemini ``serverContent.interrupted`` +
``turnComplete``. The fake then stops sending audio, as the OpenAI fake does.

Reconnects: a Gemini ``setup`` carrying one of the fake's resumption handles, or an
AssemblyAI ``session.resume``, continues the same call on the new connection (audio numbered
on, the old connection falls silent) and is counted (``resumed_sessions``) instead of being
paired with the next call being set up. Deepgram and ElevenLabs cannot resume: a new
connection is a new session.

Latency measurement is the OpenAI fake's, per leg:

- μ-law vendors (AssemblyAI, Deepgram, ElevenLabs: relay passes μ-law through untouched):
  the 9-byte marker (call id, frame number) of every uplink frame is read back from the
  vendor's audio framing (base64 in JSON, or raw bytes in binary frames, where relay may
  put several 20 ms frames in one message: the marker scan handles any chunking), and each
  100 ms downlink chunk carries one marker that the generator reads from Twilio ``media``.
- Gemini (relay resamples μ-law 8 kHz -> PCM16 16 kHz up, PCM16 24 kHz -> μ-law 8 kHz
  down): no byte survives, so both legs use the level codes of ``bench.stats`` (every
  uplink frame and every downlink chunk is one constant level encoding its number modulo
  64), as in the bench's ``pcm24k`` mode. Uplink frames are 320 samples at 16 kHz and count
  as delivered with all but their last 10 ms (160 samples) in.

Reads go through the pure-Python WebSocket path of ``bench.netio.HttpConn``: the compiled
fast path of ``bench._genfast`` (``AgentReader``) parses only OpenAI's
``input_audio_buffer.append``. That costs the generator more CPU per call than an OpenAI
run (reported per run as ``gen %core``), not the relay under test.
"""

from __future__ import annotations

import binascii
import os
from collections.abc import Callable

import orjson

from bench.fake_agent import (
    _ONE_FRAME_B64,
    DELTA_BYTES,
    UP_ALLOWANCE_BYTES,
    UP_FRAME_BYTES,
    FakeAgent,
)
from bench.loadgen import FILLER
from bench.netio import OP_BINARY, OP_TEXT, HttpConn, Reactor, frame, monotonic_ns
from bench.stats import HEADER, HEADER_LEN, MAGIC, LevelTracker, MarkerTracker, scan_headers

#: Every agent protocol the bench can put behind relay ("openai" is ``bench.fake_agent``).
PROTOCOLS = ("openai", "assemblyai", "deepgram", "elevenlabs", "gemini")
#: The audio mode each vendor runs in when it cannot follow ``--audio``: Gemini Live hears
#: PCM16 16 kHz and speaks PCM16 24 kHz, always (relay resamples both ways).
FIXED_AUDIO = {"gemini": "pcm16k"}
#: Modes each protocol supports in the bench.
AUDIOS = {
    "openai": ("pcmu", "pcm24k"),
    "assemblyai": ("pcmu",),
    "deepgram": ("pcmu",),
    "elevenlabs": ("pcmu",),
    "gemini": ("pcm16k",),
}

GEMINI_IN_RATE = 16000
GEMINI_UP_FRAME = GEMINI_IN_RATE * 20 // 1000  # 320 samples = one 20 ms Twilio frame
GEMINI_UP_ALLOWANCE = GEMINI_IN_RATE * 10 // 1000  # 10 ms, as on every leg

_b2a = binascii.b2a_base64
_a2b = binascii.a2b_base64
_HDR_PACK = HEADER.pack
_HDR_UNPACK = HEADER.unpack
_HDR_UNPACK_FROM = HEADER.unpack_from
_DELTA_FILLER = FILLER[: DELTA_BYTES - HEADER_LEN]


def _marker(idx: int, seq: int) -> bytes:
    return _HDR_PACK(MAGIC, idx, seq, (idx * 31 + seq * 7 + 0x5A) & 0xFF)


class RawMarkerTracker(MarkerTracker):
    """``MarkerTracker`` for raw μ-law bytes (Deepgram's binary frames): same delivery rule
    (a frame counts once all but ``allowance`` bytes arrived), any chunking."""

    __slots__ = ()

    def feed_raw(self, data: bytes, now: int) -> int:
        n = len(data)
        start = self.pos
        end = self.pos = start + n
        fb = self.frame_bytes
        if (
            not self.carry
            and not self.pending
            and fb - self.allowance <= n <= fb
            and data[:2] == MAGIC
            and n >= HEADER_LEN
        ):
            _, call, seq, chk = _HDR_UNPACK_FROM(data)
            if chk == (call * 31 + seq * 7 + 0x5A) & 0xFF and call == self.expected:
                leg = self.resolve(call)
                if leg is not None:  # one whole frame, marker first: the common case
                    leg.received(seq, now)
                    return n
        if self.carry:
            data = self.carry + data
        base = end - len(data)
        found, self.carry = scan_headers(data)
        for off, call, seq in found:
            self._found(call, seq, base + off)
        self._deliver(end, now)
        return n


class VendorSession:
    """One fake vendor session (server side). Subclasses speak one vendor's protocol."""

    protocol = ""
    #: ws frame opcode of the server's JSON messages
    json_opcode = OP_TEXT

    def __init__(self, agent: VendorAgent, conn: HttpConn, path: str, headers: dict) -> None:
        self.agent = agent
        self.conn = conn
        self.path = path
        self.sid = "sess_" + os.urandom(6).hex()
        self.authorized = self._authorized(path, headers)
        self.call = None
        self.updated = False
        self.paused = False
        self.closed = False
        self.delta_seq = 0
        self.resp_seq = 0
        self.up_samples = 0
        self.up_levels: LevelTracker | None = None
        self.up_markers = RawMarkerTracker(UP_FRAME_BYTES, UP_ALLOWANCE_BYTES, agent.uplink_leg)
        self.t_opened = monotonic_ns()
        conn.on_ws_message = self.on_message
        conn.on_ws_closed = self.on_closed
        conn.accept_websocket(headers, self._on_connect())

    # -- per vendor ---------------------------------------------------------------------
    def _authorized(self, path: str, headers: dict) -> bool:
        return bool(headers.get("authorization"))

    def _on_connect(self) -> bytes:
        """What the server sends right after the upgrade (nothing by default)."""
        return b""

    def _audio(self, j: int) -> bytes:  # pragma: no cover - overridden
        raise NotImplementedError

    def _reply_start(self) -> bytes:
        return b""

    def _reply_end(self) -> bytes:
        return b""

    def _barge_in_events(self) -> bytes:  # pragma: no cover - overridden
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------
    def _json(self, obj: dict) -> bytes:
        return frame(orjson.dumps(obj), self.json_opcode)

    def _count(self, kind: str) -> None:
        counts = self.agent.client_events
        counts[kind] = counts.get(kind, 0) + 1

    def _bad(self) -> None:
        self.agent.bad_messages += 1

    def _marked_b64(self, j: int) -> bytes:
        """100 ms of μ-law, base64: one marker (9 bytes, a multiple of 3) + filler."""
        return _b2a(_marker(self.call.idx, j), newline=False) + self.agent.delta_filler_b64

    def _feed_b64(self, audio: bytes, now: int) -> None:
        """Uplink μ-law in base64 (the marker fast path of ``fake_agent``, else the
        general ``MarkerTracker``)."""
        agent = self.agent
        agent.appends += 1
        mt = self.up_markers
        if self.call is None:
            agent.unknown_frames += 1
            return
        if not mt.carry and not mt.pending and 12 <= len(audio) <= _ONE_FRAME_B64:
            head = _a2b(audio[:12])
            if head[:2] == MAGIC:
                _, cid, seq, chk = _HDR_UNPACK(head)
                if cid == mt.expected and chk == (cid * 31 + seq * 7 + 0x5A) & 0xFF:
                    self.call.up.received(seq, now)
                    return
        mt.feed(audio, now)

    def _claim(self) -> bool:
        """The session's setup message arrived: it belongs to the call being set up."""
        if self.updated:
            return False
        self.updated = True
        self.call = self.agent.claim(self)
        if self.call is None:
            self.agent.unclaimed += 1
            return False
        self.up_markers.expected = self.call.idx
        self.up_levels = LevelTracker(self.call.up, GEMINI_UP_FRAME, GEMINI_UP_ALLOWANCE)
        self.agent.by_sid[self.sid] = self
        return True

    def _answer(self, setup_reply: bytes, now: int) -> None:
        """Reply to the setup message, and answer instantly: the first audio goes out with
        it, then one chunk every 100 ms (the ticker)."""
        if not self._claim():
            self.conn.send(setup_reply)
            return
        self.conn.send(setup_reply + self._next_audio(monotonic_ns()))
        self.agent.ticker.join(self, now + self.agent.period_ns)

    def _resume(self, sid: str, setup_reply: bytes, now: int) -> None:
        """The adapter resumed session ``sid`` on this new connection (a reconnect after a
        lost or stalled connection): this connection takes over that session's call and
        its audio where the old one stopped. Not claimed: the generator pairs *new*
        sessions with calls, and this call is already paired. An unknown id is taken as
        a new session."""
        old = self.agent.by_sid.get(sid)
        if old is None or old is self or old.call is None or self.updated:
            self._answer(setup_reply, now)
            return
        self.updated = True
        self.sid = sid
        old.paused = True  # the old connection speaks no more
        self.agent.ticker.leave(old)
        self.agent.resumed += 1
        call = self.call = old.call
        call.agent = self  # barge-in goes here now
        self.delta_seq, self.resp_seq = old.delta_seq, old.resp_seq
        self.up_markers.expected = call.idx
        # Uplink frames continue mid-call: anchor level codes on the newest frames.
        self.up_levels = LevelTracker(call.up, GEMINI_UP_FRAME, GEMINI_UP_ALLOWANCE)
        self.up_levels.anchored = True
        self.agent.by_sid[sid] = self
        self.conn.send(setup_reply + self._next_audio(monotonic_ns()))
        self.agent.ticker.join(self, now + self.agent.period_ns)

    # -- outbound ------------------------------------------------------------------------
    def tick(self, now: int) -> None:
        if self.paused or self.closed:
            return
        self.conn.send(self._next_audio(now))

    def _next_audio(self, now: int) -> bytes:
        """The next 100 ms chunk, with the reply's start/end events when due (one send)."""
        n = self.agent.response_deltas
        j = self.delta_seq
        self.delta_seq = j + 1
        pos = j % n
        head = b""
        if pos == 0:
            self.resp_seq += 1
            head = self._reply_start()
        out = head + self._audio(j)
        if pos == n - 1:
            out += self._reply_end()
        self.call.down.sent(monotonic_ns())
        return out

    def barge_in(self) -> None:
        """The vendor's VAD heard the caller: its barge-in events, then no more audio."""
        if self.closed or self.call is None:
            return
        self.paused = True
        msg = self._barge_in_events()
        self.call.t_barge = monotonic_ns()
        self.conn.send(msg)

    def on_closed(self) -> None:
        if not self.closed:
            self.closed = True
            self.agent.ticker.leave(self)
            self.agent.on_session_closed(self)

    def on_message(self, opcode: int, payload: bytes, now: int) -> None:  # pragma: no cover
        raise NotImplementedError


# -- AssemblyAI Voice Agent API -------------------------------------------------------------

_AAI_AUDIO = b'"input.audio"'
_AUDIO_KEY = b'"audio":"'


class AssemblyAISession(VendorSession):
    protocol = "assemblyai"

    def _authorized(self, path: str, headers: dict) -> bool:
        return headers.get("authorization", "").startswith("Bearer ")

    def on_message(self, opcode: int, payload: bytes, now: int) -> None:
        if _AAI_AUDIO in payload:  # hot path: slice the base64 out, no JSON parse
            a = payload.find(_AUDIO_KEY)
            if a >= 0:
                start = a + len(_AUDIO_KEY)
                end = payload.find(b'"', start)
                if end > 0:
                    self._feed_b64(payload[start:end].replace(b"\\/", b"/"), now)
                    return
        try:
            msg = orjson.loads(payload)
            kind = msg["type"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self._bad()
            return
        if kind == "session.update":
            session = msg.get("session") or {}
            fmt_in = ((session.get("input") or {}).get("format") or {}).get("encoding")
            fmt_out = ((session.get("output") or {}).get("format") or {}).get("encoding")
            if fmt_in != "audio/pcmu" or fmt_out != "audio/pcmu":
                self._bad()  # the bench measures the μ-law passthrough
            ready = {"type": "session.ready", "session_id": self.sid}
            self._answer(self._json(ready), now)
        elif kind == "session.resume":
            sid = str(msg.get("session_id") or "")
            self._resume(sid, self._json({"type": "session.ready", "session_id": sid}), now)
        else:
            self._count(kind)

    def _reply_id(self) -> str:
        return f"reply_{self.sid}_{self.resp_seq}"

    def _reply_start(self) -> bytes:
        return self._json({"type": "reply.started", "reply_id": self._reply_id()})

    def _audio(self, j: int) -> bytes:
        return frame(b'{"type":"reply.audio","data":"%s"}' % self._marked_b64(j))

    def _reply_end(self) -> bytes:
        return self._json({"type": "reply.done", "status": "completed"})

    def _barge_in_events(self) -> bytes:
        return self._json({"type": "input.speech.started"}) + self._json(
            {"type": "reply.done", "status": "interrupted"}
        )


# -- Deepgram Voice Agent (V1) ------------------------------------------------------------


class DeepgramSession(VendorSession):
    protocol = "deepgram"

    def _authorized(self, path: str, headers: dict) -> bool:
        return headers.get("authorization", "").startswith("Token ")

    def _on_connect(self) -> bytes:
        return self._json({"type": "Welcome", "request_id": self.sid})

    def on_message(self, opcode: int, payload: bytes, now: int) -> None:
        if opcode == OP_BINARY:  # hot path: raw μ-law, possibly several 20 ms frames
            self.agent.appends += 1
            if self.call is None:
                self.agent.unknown_frames += 1
                return
            self.up_markers.feed_raw(payload, now)
            return
        try:
            msg = orjson.loads(payload)
            kind = msg["type"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self._bad()
            return
        if kind == "Settings":
            audio = msg.get("audio") or {}
            enc_in = (audio.get("input") or {}).get("encoding")
            enc_out = (audio.get("output") or {}).get("encoding")
            if enc_in != "mulaw" or enc_out != "mulaw":
                self._bad()
            self._answer(self._json({"type": "SettingsApplied"}), now)
        else:
            self._count(kind)  # KeepAlive, FunctionCallResponse, ...

    def _reply_start(self) -> bytes:
        return self._json({"type": "AgentStartedSpeaking", "total_latency": 0.0})

    def _audio(self, j: int) -> bytes:
        return frame(_marker(self.call.idx, j) + _DELTA_FILLER, OP_BINARY)

    def _reply_end(self) -> bytes:
        return self._json({"type": "AgentAudioDone"})

    def _barge_in_events(self) -> bytes:
        return self._json({"type": "UserStartedSpeaking"})


# -- ElevenLabs Agents --------------------------------------------------------------------

_EL_CHUNK = b'{"user_audio_chunk":"'


class ElevenLabsSession(VendorSession):
    protocol = "elevenlabs"

    def _authorized(self, path: str, headers: dict) -> bool:
        return bool(headers.get("xi-api-key")) and "agent_id=" in path

    def on_message(self, opcode: int, payload: bytes, now: int) -> None:
        if payload.startswith(_EL_CHUNK):  # hot path (the API's own chunk has no "type")
            end = payload.find(b'"', len(_EL_CHUNK))
            if end > 0:
                self._feed_b64(payload[len(_EL_CHUNK) : end].replace(b"\\/", b"/"), now)
                return
        try:
            msg = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self._bad()
            return
        if not isinstance(msg, dict):
            self._bad()
            return
        if "user_audio_chunk" in msg:  # another key order or spacing
            self._feed_b64(str(msg["user_audio_chunk"]).encode(), now)
            return
        kind = msg.get("type")
        if kind == "conversation_initiation_client_data":
            meta = {
                "type": "conversation_initiation_metadata",
                "conversation_initiation_metadata_event": {
                    "conversation_id": "conv_" + self.sid,
                    "agent_output_audio_format": "ulaw_8000",
                    "user_input_audio_format": "ulaw_8000",
                },
            }
            self._answer(self._json(meta), now)
        else:
            self._count(str(kind))  # pong, client_tool_result, ...

    def _audio(self, j: int) -> bytes:
        return frame(
            b'{"type":"audio","audio_event":{"audio_base_64":"%s","event_id":%d}}'
            % (self._marked_b64(j), self.resp_seq)
        )

    def _barge_in_events(self) -> bytes:
        # names the reply being played: relay drops what is still in flight of it
        return self._json(
            {"type": "interruption", "interruption_event": {"event_id": self.resp_seq}}
        )


# -- Gemini Live ------------------------------------------------------------------------------

_GEM_AUDIO = b'"realtimeInput"'
_DATA_KEY = b'"data":"'
_GEM_RATE = b"rate=16000"
_GEM_OUT_MIME = b"audio/pcm;rate=24000"


class GeminiSession(VendorSession):
    protocol = "gemini"
    json_opcode = OP_BINARY  # the Live API sends its JSON in binary frames

    def _authorized(self, path: str, headers: dict) -> bool:
        return "key=" in path

    def on_message(self, opcode: int, payload: bytes, now: int) -> None:
        if _GEM_AUDIO in payload:  # hot path: PCM16 16 kHz, level codes
            a = payload.find(_DATA_KEY)
            if a >= 0:
                start = a + len(_DATA_KEY)
                end = payload.find(b'"', start)
                if end > 0:
                    if _GEM_RATE not in payload:
                        self.agent.bad_rate += 1  # the real API refuses other rates
                    self._on_pcm(payload[start:end].replace(b"\\/", b"/"), now)
                    return
        try:
            msg = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self._bad()
            return
        if not isinstance(msg, dict) or not msg:
            self._bad()
            return
        if "setup" in msg:
            setup = msg["setup"] if isinstance(msg["setup"], dict) else {}
            handle = (setup.get("sessionResumption") or {}).get("handle")
            if isinstance(handle, str) and handle.startswith("h_"):
                # our handles are h_<session id>_<n>: resume that session's call
                self._resume(handle[2:].rpartition("_")[0], self._json({"setupComplete": {}}), now)
            else:
                self._answer(self._json({"setupComplete": {}}), now)
        else:
            self._count(next(iter(msg)))  # clientContent, toolResponse, ...

    def _on_pcm(self, b64: bytes, now: int) -> None:
        self.agent.appends += 1
        pcm = _a2b(b64)
        if len(pcm) & 1:
            self._bad()
            pcm = pcm[:-1]
        self.up_samples += len(pcm) >> 1
        if self.up_levels is None:
            self.agent.unknown_frames += 1
            return
        self.up_levels.feed(memoryview(pcm).cast("h"), False, now)

    def _audio(self, j: int) -> bytes:
        return frame(
            b'{"serverContent":{"modelTurn":{"parts":[{"inlineData":{"mimeType":"%s",'
            b'"data":"%s"}}]}}}' % (_GEM_OUT_MIME, self.agent.pcm_level_b64[j % 64]),
            OP_BINARY,
        )

    def _reply_end(self) -> bytes:
        return (
            self._json({"serverContent": {"generationComplete": True}})
            + self._json({"serverContent": {"turnComplete": True}})
            + self._json(
                {
                    "sessionResumptionUpdate": {
                        "newHandle": f"h_{self.sid}_{self.resp_seq}",
                        "resumable": True,
                    }
                }
            )
        )

    def _barge_in_events(self) -> bytes:
        return self._json({"serverContent": {"interrupted": True}}) + self._json(
            {"serverContent": {"turnComplete": True}}
        )


SESSIONS: dict[str, type[VendorSession]] = {
    "assemblyai": AssemblyAISession,
    "deepgram": DeepgramSession,
    "elevenlabs": ElevenLabsSession,
    "gemini": GeminiSession,
}
_PATHS = {
    "assemblyai": "/v1/ws",
    "deepgram": "/v1/agent/converse",
    "elevenlabs": "/v1/convai/conversation",
    "gemini": "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent",
}


class VendorAgent(FakeAgent):
    """Listens on loopback and serves one vendor's sessions (see the module doc)."""

    def __init__(
        self,
        reactor: Reactor,
        protocol: str,
        *,
        claim: Callable[[VendorSession], object] | None = None,
        calls: list | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        response_deltas: int = 20,
    ) -> None:
        if protocol not in SESSIONS:
            raise ValueError(f"unknown vendor protocol {protocol!r} (known: {', '.join(SESSIONS)})")
        # FakeAgent's "pcm24k" precomputes the 24 kHz level chunks Gemini answers with.
        super().__init__(
            reactor,
            audio="pcm24k" if protocol == "gemini" else "pcmu",
            claim=claim,
            calls=calls,
            host=host,
            port=port,
            response_deltas=response_deltas,
        )
        self.protocol = protocol
        self.audio = AUDIOS[protocol][0]
        self.session_cls = SESSIONS[protocol]
        self.bad_rate = 0
        #: session id -> the session (connection) currently serving it, for resumes
        self.by_sid: dict[str, VendorSession] = {}
        self.resumed = 0

    @property
    def url(self) -> str:
        return f"ws://{self.listener.host}:{self.listener.port}{_PATHS[self.protocol]}"

    def on_request(self, conn: HttpConn, method: str, path: str, headers: dict, body) -> None:
        if headers.get("upgrade", "").lower() != "websocket":
            conn.respond(404, b"fake agent: websocket only\n")
            return
        self.sessions.append(self.session_cls(self, conn, path, headers))
        self.sessions_open += 1

    def stats(self) -> dict:
        out = super().stats()
        out["protocol"] = self.protocol
        out["bad_rate_chunks"] = self.bad_rate
        out["resumed_sessions"] = self.resumed
        return out


def make_agent(reactor: Reactor, protocol: str, audio: str) -> FakeAgent:
    """The fake agent for one run: ``bench.fake_agent.FakeAgent`` for OpenAI, else the
    vendor's fake; ``audio`` must be a mode the protocol supports (``AUDIOS``)."""
    if protocol not in AUDIOS:
        raise ValueError(f"unknown agent protocol {protocol!r} (known: {', '.join(PROTOCOLS)})")
    if audio not in AUDIOS[protocol]:
        raise ValueError(f"{protocol} runs in {'/'.join(AUDIOS[protocol])}, not {audio!r}")
    if protocol == "openai":
        return FakeAgent(reactor, audio=audio)
    return VendorAgent(reactor, protocol)
