"""A fake voice agent speaking the OpenAI Realtime WebSocket protocol.

It plays the agent side of every benchmark target (the relay, the FastAPI-style peer,
the Pipecat peer) so all of them face the same load:

- accepts any path, records whether ``Authorization`` was sent, answers ``session.created``;
- on the first ``session.update`` it answers ``session.updated`` and *instantly* starts a
  response: one 100 ms ``response.output_audio.delta`` every 100 ms, for as long as the
  call lasts (responses of ``response_deltas`` deltas, each framed by
  ``response.created`` / ``response.output_item.added`` and
  ``response.output_audio.done`` / ``response.done``), so the downlink carries load too;
- reads every ``input_audio_buffer.append`` and reports arrival per uplink frame;
- on request (``barge_in``) sends ``input_audio_buffer.speech_started`` and cancels the
  response (``response.done`` with status ``cancelled``), as server VAD does.

Audio format follows the session.update: GA ``audio.{input,output}.format.type``
(``audio/pcmu`` passthrough or ``audio/pcm`` at 24 kHz), or beta ``input_audio_format`` /
``output_audio_format`` (``g711_ulaw`` / ``pcm16``, answered with beta event names).
Without a format the agent's default (``audio=``) applies.

Frame matching:
- μ-law (passthrough): both directions carry a 9-byte marker (call id, frame number) in
  the audio bytes; the relay forwards μ-law untouched, so each 20 ms block is identified
  exactly: loss, duplication, reordering and cross-talk are all detectable.
- PCM 24 kHz (transcoded by the relay's resampler): no byte survives, so each uplink
  frame and each downlink delta is a constant signal level that encodes its number modulo
  64; a resampler keeps the middle of each frame flat at that level, and frames are
  identified there (``bench.stats.LevelTracker``). A frame counts as delivered once all
  but its last 10 ms have arrived (uplink: 240 of 480 samples at 24 kHz; downlink: 720 of
  800 μ-law bytes); the allowance absorbs resampler hold-back. Loss, duplication and
  reordering stay detectable; audio a target drops before its session is up does not
  shift later frames.
"""

from __future__ import annotations

import binascii
import os
import struct
from collections.abc import Callable

import orjson

from bench.loadgen import FILLER
from bench.netio import HttpConn, Listener, Reactor, Ticker, frame, frame_header, monotonic_ns
from bench.stats import (
    HEADER,
    HEADER_LEN,
    LEVEL_COUNT,
    LEVEL_VALUES,
    MAGIC,
    Leg,
    LevelTracker,
    MarkerTracker,
)

DELTA_MS = 100
PCM_RATE = 24000
UP_FRAME_SAMPLES = PCM_RATE * 20 // 1000  # 480 samples = one 20 ms Twilio frame
UP_ALLOWANCE_SAMPLES = 240  # 10 ms at 24 kHz, see module doc
DELTA_BYTES = 8000 * DELTA_MS // 1000  # μ-law bytes per delta (one marker each)
UP_FRAME_BYTES = 160
UP_ALLOWANCE_BYTES = 80  # 10 ms, as on every leg
_b2a = binascii.b2a_base64
_frame_header = frame_header
_a2b = binascii.a2b_base64
_HDR_PACK = HEADER.pack
_HDR_UNPACK = HEADER.unpack
_ONE_FRAME_B64 = 216  # base64 length of one 160-byte μ-law frame
_APPEND = b'"input_audio_buffer.append"'
_AUDIO_KEY = b'"audio":'


class AgentSession:
    """One agent WebSocket session (server side)."""

    def __init__(self, agent: FakeAgent, conn: HttpConn, headers: dict[str, str]) -> None:
        self.agent = agent
        self.conn = conn
        self.sid = "sess_" + os.urandom(6).hex()
        self.authorized = headers.get("authorization", "").startswith("Bearer ")
        self.in_pcmu = agent.audio == "pcmu"
        self.out_pcmu = agent.audio == "pcmu"
        self.ga = True
        self.call = None
        self.updated = False
        self.paused = False
        self.closed = False
        self.delta_seq = 0
        self.resp_seq = 0
        self.evt = 0
        self._delta_prefix: bytes | None = None  # see _next_audio
        self._delta_mid = b""
        self.up_samples = 0
        self.up_levels: LevelTracker | None = None
        self.up_markers = MarkerTracker(UP_FRAME_BYTES, UP_ALLOWANCE_BYTES, agent.uplink_leg)
        self.t_opened = monotonic_ns()
        conn.on_ws_message = self.on_message
        conn.on_ws_closed = self.on_closed
        conn.accept_websocket(headers, self._event(self._session_event("session.created")))
        engine = getattr(conn.reactor, "engine", None)
        if engine is not None and not conn.closed:
            # Compiled reads: the append fast path below, in C (see bench._genfast).
            conn.reactor.set_callback(conn.fd, engine.AgentReader(conn, self))

    # -- helpers -----------------------------------------------------------------------
    def _eid(self) -> str:
        self.evt += 1
        return f"evt_{self.sid}_{self.evt}"

    def _event(self, obj: dict) -> bytes:
        obj["event_id"] = self._eid()
        return frame(orjson.dumps(obj))

    def _session_event(self, kind: str) -> dict:
        fmt_in = {"type": "audio/pcmu"} if self.in_pcmu else {"type": "audio/pcm", "rate": PCM_RATE}
        fmt_out = (
            {"type": "audio/pcmu"} if self.out_pcmu else {"type": "audio/pcm", "rate": PCM_RATE}
        )
        return {
            "type": kind,
            "event_id": self._eid(),
            "session": {
                "type": "realtime",
                "object": "realtime.session",
                "id": self.sid,
                "model": "gpt-realtime",
                "output_modalities": ["audio"],
                "audio": {"input": {"format": fmt_in}, "output": {"format": fmt_out}},
            },
        }

    @property
    def _delta_type(self) -> str:
        return "response.output_audio.delta" if self.ga else "response.audio.delta"

    # -- inbound -----------------------------------------------------------------------
    def on_message(self, opcode: int, payload: bytes, now: int) -> None:
        # Fast path for the one message that arrives 50 times a second per call: slice
        # the base64 out of the raw JSON instead of building a dict (base64 has no '"').
        if _APPEND in payload:
            a = payload.find(_AUDIO_KEY)
            if a >= 0:
                start = payload.find(b'"', a + len(_AUDIO_KEY)) + 1
                end = payload.find(b'"', start)
                if start > 0 and end > 0:
                    audio = payload[start:end]
                    if b"\\" in audio:  # a JSON encoder that escapes "/" as "\/"
                        audio = audio.replace(b"\\/", b"/")
                    if self.in_pcmu:
                        # Inlined ``_one_frame`` (the hottest path of the benchmark).
                        mt = self.up_markers
                        if not mt.carry and not mt.pending and 12 <= len(audio) <= _ONE_FRAME_B64:
                            head = _a2b(audio[:12])
                            if head[:2] == MAGIC:
                                _, cid, seq, chk = _HDR_UNPACK(head)
                                if cid == mt.expected and chk == (cid * 31 + seq * 7 + 0x5A) & 255:
                                    self.agent.appends += 1
                                    self.call.up.received(seq, now)
                                    return
                    self._on_append(audio, now)
                    return
        try:
            msg = orjson.loads(payload)
            kind = msg["type"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.agent.bad_messages += 1
            return
        if kind == "input_audio_buffer.append":
            self._on_append((msg.get("audio") or "").encode(), now)
        elif kind == "session.update":
            self._on_session_update(msg.get("session") or {}, now)
        else:
            counts = self.agent.client_events
            counts[kind] = counts.get(kind, 0) + 1

    def _one_frame(self, audio: bytes, now: int) -> bool:
        """Inlined MarkerTracker fast path: one whole μ-law frame, marker first.

        The hottest path of the whole benchmark (50 times a second per call); anything
        unusual (split or merged frames, pending deliveries, foreign markers) returns
        False and goes through ``MarkerTracker.feed``.
        """
        mt = self.up_markers
        if mt.carry or mt.pending or not 12 <= len(audio) <= _ONE_FRAME_B64:
            return False
        head = _a2b(audio[:12])
        if head[:2] != MAGIC:
            return False
        _, call, seq, chk = _HDR_UNPACK(head)
        if chk != (call * 31 + seq * 7 + 0x5A) & 0xFF or call != mt.expected:
            return False
        self.agent.appends += 1
        self.call.up.received(seq, now)
        return True

    def _on_append(self, audio: bytes, now: int) -> None:
        agent = self.agent
        agent.appends += 1
        if not self.in_pcmu:
            pcm = binascii.a2b_base64(audio)
            self.up_samples += len(pcm) >> 1
            if self.up_levels is not None:
                if len(pcm) & 1:
                    pcm = pcm[:-1]
                self.up_levels.feed(memoryview(pcm).cast("h"), False, now)
            return
        self.up_markers.feed(audio, now)

    def _on_session_update(self, session: dict, now: int) -> None:
        self._apply_formats(session)
        out = self._event(self._session_event("session.updated"))
        if self.updated:
            self.conn.send(out)
            return
        self.updated = True
        self.call = self.agent.claim(self)
        if self.call is not None:
            self.up_levels = LevelTracker(self.call.up, UP_FRAME_SAMPLES, UP_ALLOWANCE_SAMPLES)
            self.up_markers.expected = self.call.idx
        if self.call is None:
            self.agent.unclaimed += 1
            self.conn.send(out)
            return
        # Answer instantly: the first audio goes out with session.updated.
        self.conn.send(out + self._next_audio(monotonic_ns()))
        self.agent.ticker.join(self, now + self.agent.period_ns)

    def _apply_formats(self, session: dict) -> None:
        self._delta_prefix = None  # the event names may change (GA vs beta)
        audio = session.get("audio")
        if isinstance(audio, dict):
            fin = ((audio.get("input") or {}).get("format") or {}).get("type")
            fout = ((audio.get("output") or {}).get("format") or {}).get("type")
            if fin:
                self.in_pcmu = fin == "audio/pcmu"
            if fout:
                self.out_pcmu = fout == "audio/pcmu"
            return
        fin = session.get("input_audio_format")
        fout = session.get("output_audio_format")
        if fin or fout:  # beta session shape: answer with beta event names
            self.ga = False
            if fin:
                self.in_pcmu = fin == "g711_ulaw"
            if fout:
                self.out_pcmu = fout == "g711_ulaw"

    # -- outbound ----------------------------------------------------------------------
    def tick(self, now: int) -> None:
        if self.paused or self.closed:
            return
        self.conn.send(self._next_audio(now))

    def _ids(self) -> tuple[str, str]:
        return f"resp_{self.sid}_{self.resp_seq}", f"item_{self.sid}_{self.resp_seq}"

    def _next_audio(self, now: int) -> bytes:
        """The next delta, framed by response start/end events when due (one send)."""
        agent = self.agent
        j = self.delta_seq
        self.delta_seq = j + 1
        pos = j % agent.response_deltas
        head = b""
        if pos == 0:
            self.resp_seq += 1
            head = self._response_start(*self._ids())
        if pos == 0 or self._delta_prefix is None:
            # Per response, not per delta: the constant parts of the delta event as bytes.
            rid, iid = self._ids()
            self._delta_prefix = b'{"type":"%s","event_id":"evt_%s_' % (
                self._delta_type.encode(),
                self.sid.encode(),
            )
            self._delta_mid = b'","response_id":"%s","item_id":"%s",' % (rid.encode(), iid.encode())
        call = self.call
        if self.out_pcmu:
            # One marker per delta: 9 bytes (a multiple of 3) + precomputed filler base64.
            idx = call.idx
            b64 = _b2a(_HDR_PACK(MAGIC, idx, j, (idx * 31 + j * 7 + 0x5A) & 0xFF), newline=False)
            b64 += agent.delta_filler_b64
        else:
            b64 = agent.pcm_level_b64[j % LEVEL_COUNT]
        self.evt = evt = self.evt + 1
        msg = b'%s%d%s"output_index":0,"content_index":0,"delta":"%s"}' % (
            self._delta_prefix,
            evt,
            self._delta_mid,
            b64,
        )
        out = head + _frame_header(len(msg)) + msg
        if pos == agent.response_deltas - 1:
            rid, iid = self._ids()
            out += self._response_end(rid, iid, "completed")
        call.down.sent(monotonic_ns())
        return out

    def _response_start(self, rid: str, iid: str) -> bytes:
        item = {
            "id": iid,
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        return self._event(
            {
                "type": "response.created",
                "response": {
                    "id": rid,
                    "object": "realtime.response",
                    "status": "in_progress",
                    "output": [],
                },
            }
        ) + self._event(
            {
                "type": "response.output_item.added",
                "response_id": rid,
                "output_index": 0,
                "item": item,
            }
        )

    def _response_end(self, rid: str, iid: str, status: str) -> bytes:
        done = "response.output_audio.done" if self.ga else "response.audio.done"
        return self._event(
            {
                "type": done,
                "response_id": rid,
                "item_id": iid,
                "output_index": 0,
                "content_index": 0,
            }
        ) + self._event(
            {
                "type": "response.done",
                "response": {
                    "id": rid,
                    "object": "realtime.response",
                    "status": status,
                    "output": [
                        {
                            "id": iid,
                            "object": "realtime.item",
                            "type": "message",
                            "role": "assistant",
                            "status": "incomplete" if status == "cancelled" else "completed",
                        }
                    ],
                },
            }
        )

    def barge_in(self) -> None:
        """Server VAD heard the caller: speech_started, then cancel the response."""
        if self.closed or self.call is None:
            return
        rid, iid = self._ids()
        self.paused = True
        msg = self._event(
            {
                "type": "input_audio_buffer.speech_started",
                "audio_start_ms": self.up_samples * 1000 // PCM_RATE
                if not self.in_pcmu
                else self.call.k * 20,
                "item_id": f"item_user_{self.sid}",
            }
        ) + self._response_end(rid, iid, "cancelled")
        self.call.t_barge = monotonic_ns()
        self.conn.send(msg)

    def on_closed(self) -> None:
        if not self.closed:
            self.closed = True
            self.agent.ticker.leave(self)
            self.agent.on_session_closed(self)


class FakeAgent:
    """Listens on loopback and serves OpenAI-Realtime-style sessions."""

    def __init__(
        self,
        reactor: Reactor,
        *,
        audio: str = "pcmu",
        claim: Callable[[AgentSession], object] | None = None,
        calls: list | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        response_deltas: int = 20,
    ) -> None:
        if audio not in ("pcmu", "pcm24k"):
            raise ValueError("audio must be 'pcmu' or 'pcm24k'")
        self.reactor = reactor
        self.audio = audio
        self.claim_fn = claim
        self.calls: list = calls if calls is not None else []
        self.response_deltas = response_deltas
        self.period_ns = DELTA_MS * 1_000_000
        self.delta_filler_b64 = _b2a(FILLER[: DELTA_BYTES - HEADER_LEN], newline=False)
        # Transcoded mode: each 100 ms delta is one constant level (see bench.stats).
        n = PCM_RATE * DELTA_MS // 1000
        self.pcm_level_b64 = [
            binascii.b2a_base64(struct.pack("<h", v) * n, newline=False) for v in LEVEL_VALUES
        ]
        self.ticker = Ticker(reactor, self.period_ns, 20)
        self.listener = Listener(reactor, self._accept, host, port)
        self.sessions: list[AgentSession] = []
        self.sessions_open = 0
        self.appends = 0
        #: PCM appends taken by the compiled reader (bench/_genfast.pyx AgentReader), of
        #: ``appends``: shows the fast path ran
        self.compiled_pcm_appends = 0
        self.bad_messages = 0
        self.unknown_frames = 0
        self.unclaimed = 0
        self.client_events: dict[str, int] = {}

    @property
    def url(self) -> str:
        return f"ws://{self.listener.host}:{self.listener.port}/v1/realtime"

    def _accept(self, reactor: Reactor, sock) -> None:
        HttpConn(reactor, sock, self)

    def on_request(self, conn: HttpConn, method: str, path: str, headers: dict, body) -> None:
        if headers.get("upgrade", "").lower() != "websocket":
            conn.respond(404, b"fake agent: websocket only\n")
            return
        self.sessions.append(AgentSession(self, conn, headers))
        self.sessions_open += 1

    def claim(self, session: AgentSession):
        return self.claim_fn(session) if self.claim_fn is not None else None

    def on_session_closed(self, session: AgentSession) -> None:
        self.sessions_open -= 1

    def uplink_leg(self, call_idx: int) -> Leg | None:
        calls = self.calls
        if call_idx < len(calls) and calls[call_idx] is not None:
            return calls[call_idx].up
        return None

    def stats(self) -> dict:
        return {
            "sessions": len(self.sessions),
            "sessions_open": self.sessions_open,
            "unauthorized_sessions": sum(1 for s in self.sessions if not s.authorized),
            "unclaimed_sessions": self.unclaimed,
            "appends": self.appends,
            "bad_messages": self.bad_messages,
            "unknown_frames": self.unknown_frames
            + sum(s.up_markers.unknown for s in self.sessions),
            "misrouted_frames": sum(s.up_markers.misrouted for s in self.sessions),
            "client_events": dict(sorted(self.client_events.items())),
        }

    def close(self) -> None:
        self.ticker.stop()
        self.listener.close()
        for s in self.sessions:
            s.conn.close()
