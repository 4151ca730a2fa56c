"""Offline speech: PocketSphinx recognition and eSpeak NG synthesis, behind the same
:class:`~relay.agents.text.speech.SpeechToText` / :class:`~relay.agents.text.speech.TextToSpeech`
interfaces as the cloud vendors. Both models ship inside PyPI wheels; nothing is fetched.

CPU-heavy work never runs on the Trio loop:

* recognition runs in recogniser *processes* (``relay/agents/text/sphinx_worker.py``;
  PocketSphinx holds the GIL while it decodes, so a thread would still stall the loop),
  shared by all calls of the process: :class:`SphinxPool`, at most ``processes`` of them
  (default: the CPU count), one decoder per call inside;
* synthesis runs in worker threads (``trio.to_thread.run_sync`` under
  :data:`TTS_LIMITER`): eSpeak NG releases the GIL while it computes.

Turn taking is the parrot's energy VAD (``relay/agents/parrot.py``): speech start is the
barge-in trigger, a pause of ``vad_end_ms`` ends the turn. Audio is streamed to the
recogniser while the caller speaks, so at the end of the turn only the last ~100 ms and the
final search remain (tens of ms).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import trio

from ...errors import AgentError
from ...media import codec
from ..parrot import EnergyVAD
from . import espeak
from .speech import (
    EventQueue,
    SpeechToText,
    SttEndOfTurn,
    SttEvent,
    SttSpeechStarted,
    TextToSpeech,
    TtsAudio,
    TtsDone,
    TtsEvent,
)
from .sphinx_worker import HEADER, OP_AUDIO, OP_CLOSE, OP_END, OP_INIT, OP_OPEN

__all__ = ["TTS_LIMITER", "EspeakTTS", "SphinxPool", "SphinxSTT"]

log = logging.getLogger("relay.agents.text.local")

FRAME = 160  # 20 ms of μ-law
#: μ-law byte -> squared linear sample / full scale²: a frame's level is one table lookup
_POWER = (
    (np.frombuffer(codec.ulaw_decode(bytes(range(256))), dtype="<i2").astype(np.float64) / 32768.0)
    ** 2
).tolist()
_power = _POWER.__getitem__


def frame_dbfs(ulaw: bytes) -> float:
    """Level of one μ-law frame in dBFS, as relay.sim.speech.frame_dbfs computes it, in
    ~15 µs instead of ~90 µs (a table lookup per byte, no numpy call per frame)."""
    return 10.0 * math.log10(sum(map(_power, ulaw)) / max(1, len(ulaw)) + 1e-12)


#: eSpeak NG syntheses in flight in this process (its state is global: one at a time)
TTS_LIMITER = trio.CapacityLimiter(1)


# --- the recogniser processes -----------------------------------------------------------------
class _Worker:
    def __init__(self, process: trio.Process, key: str, workdir: str) -> None:
        self.process = process
        self.key = key
        #: the model files the process reads for every decoder it makes; removed with it
        self.workdir = workdir
        self.sessions = 0
        self.lock = trio.Lock()
        self.dead = False
        self.stdin: trio.abc.SendStream = process.stdin  # type: ignore[assignment]
        self.stdout: trio.abc.ReceiveStream = process.stdout  # type: ignore[assignment]
        self._buf = bytearray()

    def close(self) -> None:
        """Kill the process (if it still runs) and remove its model files. The pool kills
        its processes at the end of the run, so they cannot clean up after themselves."""
        if self.process.returncode is None:
            self.process.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)

    async def send(self, op: int, session: int, payload: bytes = b"") -> None:
        async with self.lock:
            await self._send(op, session, payload)

    async def _send(self, op: int, session: int, payload: bytes) -> None:
        try:
            await self.stdin.send_all(HEADER.pack(op, session, len(payload)) + payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.dead = True
            raise AgentError("recogniser process is gone", kind="agent_disconnected") from exc

    async def request(self, op: int, session: int, payload: bytes = b"") -> Any:
        """Send and wait for the one reply (only INIT and END have replies; the lock keeps
        requests and replies paired)."""
        async with self.lock:
            await self._send(op, session, payload)
            while True:
                if len(self._buf) >= HEADER.size:
                    rop, rsession, length = HEADER.unpack_from(self._buf)
                    if len(self._buf) >= HEADER.size + length:
                        body = bytes(self._buf[HEADER.size : HEADER.size + length])
                        del self._buf[: HEADER.size + length]
                        if rop != op or rsession != session:
                            self.dead = True
                            raise AgentError("recogniser reply out of order", kind="agent_protocol")
                        return orjson.loads(body)
                try:
                    chunk = await self.stdout.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    chunk = b""
                if not chunk:
                    self.dead = True
                    raise AgentError("recogniser process exited", kind="agent_disconnected")
                self._buf += chunk


class SphinxPool:
    """The recogniser processes of this Trio run, per language model (corpus).

    A session goes to the least-loaded process; a new process starts while there are fewer
    than ``processes`` and each existing one already serves a call. The processes end with
    the run (a system task kills them) or, at the latest, when their stdin closes."""

    _runvar: trio.lowlevel.RunVar[SphinxPool] = trio.lowlevel.RunVar("relay_sphinx_pool")

    def __init__(self) -> None:
        self.workers: list[_Worker] = []
        self._next_session = 0
        self._starting = trio.Lock()
        self.cpu_ms = 0.0  # decoding CPU of END requests (the rest: process_raw while talking)

    @classmethod
    def get(cls) -> SphinxPool:
        try:
            return cls._runvar.get()
        except LookupError:
            pool = cls()
            cls._runvar.set(pool)
            trio.lowlevel.spawn_system_task(pool._reaper, name="relay sphinx pool")
            return pool

    async def _reaper(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            for worker in self.workers:
                worker.close()

    def session_id(self) -> int:
        self._next_session += 1
        return self._next_session

    async def worker(self, corpus: str, lw: float, processes: int) -> _Worker:
        key = hashlib.sha256(f"{lw}|{corpus}".encode()).hexdigest()[:16]
        async with self._starting:
            for gone in [w for w in self.workers if w.dead]:
                gone.close()
            self.workers = [w for w in self.workers if not w.dead]
            mine = [w for w in self.workers if w.key == key]
            idle = [w for w in mine if w.sessions == 0]
            if idle:
                return idle[0]
            if len(mine) < max(1, processes):
                worker = await self._start(key, corpus, lw)
                self.workers.append(worker)
                return worker
            return min(mine, key=lambda w: w.sessions)

    async def _start(self, key: str, corpus: str, lw: float) -> _Worker:
        env = dict(os.environ)
        workdir = tempfile.mkdtemp(prefix="relay-sphinx-")
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "relay.agents.text.sphinx_worker", workdir],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
            )
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        worker = _Worker(process, key, workdir)
        try:
            reply = await worker.request(OP_INIT, 0, orjson.dumps({"corpus": corpus, "lw": lw}))
        except BaseException:
            worker.close()
            raise
        if not isinstance(reply, dict) or reply.get("error"):
            worker.close()
            raise AgentError(f"recogniser failed to start: {reply}", kind="agent_connect")
        log.info("recogniser process %d started (model %s)", process.pid, key)
        return worker


# --- speech to text ---------------------------------------------------------------------------
@dataclass
class RecognitionStats:
    utterances: int = 0
    decode_ms: list[float] = field(default_factory=list)  # END request round trips
    cpu_ms: float = 0.0


class SphinxSTT(SpeechToText):
    """Energy VAD + streaming PocketSphinx decoding in a recogniser process."""

    name = "pocketsphinx"

    def __init__(
        self,
        corpus: str,
        *,
        lw: float = 10.0,
        processes: int = 0,
        vad_threshold_dbfs: float = -45.0,
        vad_start_ms: float = 100.0,
        vad_end_ms: float = 500.0,
        preroll_ms: float = 300.0,
        max_utterance_s: float = 12.0,
    ) -> None:
        self.corpus = corpus
        self.lw = lw
        self.processes = processes or (os.cpu_count() or 1)
        self.vad = EnergyVAD(
            threshold_dbfs=vad_threshold_dbfs, start_ms=vad_start_ms, end_ms=vad_end_ms
        )
        self._preroll: deque[bytes] = deque(
            maxlen=max(1, math.ceil((preroll_ms + vad_start_ms) / 20))
        )
        self._max_frames = int(max_utterance_s * 50)
        self._events: EventQueue[SttEvent] = EventQueue()
        self._pending = bytearray()
        self._outbox: list[tuple[str, bytes]] = []  # ("audio"|"end", payload) for the worker
        self._wake = trio.Event()
        self._speaking = False
        self._frames = 0
        self._worker: _Worker | None = None
        self._session = 0
        self.stats = RecognitionStats()

    async def connect(self) -> None:
        pool = SphinxPool.get()
        self._worker = await pool.worker(self.corpus, self.lw, self.processes)
        self._session = pool.session_id()
        self._worker.sessions += 1
        await self._worker.send(OP_OPEN, self._session)

    def send_audio(self, ulaw: bytes) -> None:
        if self._events.closed:
            return
        self._pending += ulaw
        whole = len(self._pending) - len(self._pending) % FRAME
        for start in range(0, whole, FRAME):
            self._frame(bytes(self._pending[start : start + FRAME]))
        del self._pending[:whole]

    def _frame(self, frame: bytes) -> None:
        level = frame_dbfs(frame)
        event = self.vad.update(level)
        if not self._speaking:
            self._preroll.append(frame)
            if event == "start":
                self._speaking = True
                self._frames = 0
                self._events.put(SttSpeechStarted())
                self._queue("audio", b"".join(self._preroll))
                self._preroll.clear()
            return
        self._queue("audio", frame)
        self._frames += 1
        if event == "end" or self._frames >= self._max_frames:
            self._speaking = False
            self._queue("end", b"")

    def _queue(self, kind: str, payload: bytes) -> None:
        if kind == "audio" and self._outbox and self._outbox[-1][0] == "audio":
            self._outbox[-1] = ("audio", self._outbox[-1][1] + payload)
        else:
            self._outbox.append((kind, payload))
        self._wake.set()

    async def run(self) -> None:
        worker = self._worker
        assert worker is not None
        while True:
            if not self._outbox:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            kind, payload = self._outbox.pop(0)
            if kind == "audio":
                await worker.send(OP_AUDIO, self._session, payload)
                continue
            t_end = time.perf_counter()
            reply = await worker.request(OP_END, self._session)
            self.stats.utterances += 1
            self.stats.decode_ms.append((time.perf_counter() - t_end) * 1000)
            self.stats.cpu_ms += float(reply.get("cpu_ms", 0.0))
            self._events.put(SttEndOfTurn(str(reply.get("text", "")), time.perf_counter()))

    async def receive(self) -> list[SttEvent]:
        return await self._events.get_batch()

    async def aclose(self) -> None:
        self._events.close()
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.sessions -= 1
            if not worker.dead:
                with trio.move_on_after(1.0):
                    try:
                        await worker.send(OP_CLOSE, self._session)
                    except AgentError:
                        pass


# --- text to speech ---------------------------------------------------------------------------
class EspeakTTS(TextToSpeech):
    """eSpeak NG in a worker thread, one clause at a time, in order."""

    name = "espeak"

    def __init__(self, voice: str = "en-us+f3", rate_wpm: int = 165, pitch: int = 50) -> None:
        self.voice = voice
        self.rate_wpm = rate_wpm
        self.pitch = pitch
        self._events: EventQueue[TtsEvent] = EventQueue()
        self._queue: deque[tuple[str, int | None, str]] = deque()  # (rid, clause|None=end, text)
        self._cancelled: set[str] = set()
        self._wake = trio.Event()
        self.synth_ms: list[float] = []
        self.cpu_ms = 0.0

    async def connect(self) -> None:
        await trio.to_thread.run_sync(espeak.Espeak.get, limiter=TTS_LIMITER)

    def speak(self, response_id: str, clause: int, text: str) -> None:
        self._queue.append((response_id, clause, text))
        self._wake.set()

    def end(self, response_id: str) -> None:
        self._queue.append((response_id, None, ""))
        self._wake.set()

    def cancel(self, response_id: str) -> None:
        self._cancelled.add(response_id)
        self._queue = deque(item for item in self._queue if item[0] != response_id)

    async def run(self) -> None:
        while True:
            if not self._queue:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            rid, clause, text = self._queue.popleft()
            if rid in self._cancelled:
                continue
            if clause is None:
                self._events.put(TtsDone(rid))
                continue
            t0, c0 = time.perf_counter(), time.thread_time()
            ulaw, cpu = await trio.to_thread.run_sync(self._synth, text, limiter=TTS_LIMITER)
            self.synth_ms.append((time.perf_counter() - t0) * 1000)
            self.cpu_ms += cpu * 1000
            del c0
            if rid in self._cancelled:
                continue
            self._events.put(TtsAudio(rid, ulaw, clause, time.perf_counter()))

    def _synth(self, text: str) -> tuple[bytes, float]:
        c0 = time.thread_time()
        ulaw = espeak.synthesize_ulaw(text, self.voice, self.rate_wpm, self.pitch)
        return ulaw, time.thread_time() - c0

    async def receive(self) -> list[TtsEvent]:
        return await self._events.get_batch()

    async def aclose(self) -> None:
        self._events.close()
        self._queue.clear()
