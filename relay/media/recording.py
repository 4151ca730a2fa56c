"""Call recording (``record = true``): one stereo WAV per call, caller left, agent right.

Both sides on one timeline, in 8 kHz samples from the stream's ``start``:

* left, the caller: each media frame at its Twilio ``timestamp`` (ms since Twilio started
  the stream), as released by the uplink jitter buffer (gaps are silence);
* right, the agent as the caller heard it: each frame relay sends Twilio starts playing
  when the previous one ends or when it is sent, whichever is later (the playout model of
  the downlink buffer, whose marks confirm it); a ``clear`` (barge-in, the end of hold
  audio) cuts what was scheduled after that instant, as Twilio discards it. Hold audio is
  on the right too: the caller heard it.

The two clocks differ by the network: the right side is placed by relay's clock, the left
by Twilio's, so they agree to within about one round trip between relay and Twilio.

Memory is bounded: the media path only appends (a frame costs about a microsecond, see
``python -m bench recording``), and every second of audio older than :data:`SLACK_MS`
is cut into a chunk and handed to the process's :class:`RecordingWriter`, whose one task
runs the writes in a worker thread: μ-law decoding, interleaving, ``write`` and the WAV
header update (so a file is valid while it grows and after a crash). A call holds at most
a few seconds of audio whatever its length; the writer's queue is bounded too (a chunk
that does not fit is dropped and counted: ``relay_errors_total{kind="recording_backlog"}``;
its samples stay silent in the file). Caller audio arriving later than :data:`SLACK_MS`
behind the timeline is dropped and counted in the record (``late_ms``).

Files: ``{calls.recordings_dir}/{tenant}/{CallSid}.wav`` (default directory:
``recordings`` next to the SQLite database, else ``./relay-data/recordings``), 16-bit PCM,
8 kHz, 2 channels. Files older than ``store.retention_days`` are deleted (checked hourly).
"""

from __future__ import annotations

import logging
import os
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from . import codec

if TYPE_CHECKING:
    from ..config import Config
    from ..metrics import Metrics
    from ..records import CallRecord

log = logging.getLogger("relay.media.recording")

__all__ = ["CallRecorder", "RecordingWriter", "default_directory", "recording_path"]

RATE = 8000
SAMPLES_PER_MS = 8
#: audio is committed once it is this far behind the newest position seen
SLACK_MS = 1000
#: ... in chunks of at least this much
CHUNK_MS = 1000
#: chunks waiting for the writer thread, all calls together (~20 KB each)
QUEUE_LIMIT = 4096
PRUNE_EVERY_S = 3600.0
HEADER_BYTES = 44
_SAFE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_b64decode = codec.b64decode
_SLACK = SLACK_MS * SAMPLES_PER_MS
_COMMIT_AT = (SLACK_MS + CHUNK_MS) * SAMPLES_PER_MS


def default_directory(cfg: Config) -> Path:
    """``calls.recordings_dir``, else ``recordings`` beside an SQLite database file."""
    if cfg.calls.recordings_dir:
        return Path(cfg.calls.recordings_dir).expanduser()
    url = cfg.store.url.strip()
    if url.startswith("sqlite:///") and url[len("sqlite:///") :] not in ("", ":memory:"):
        return Path(url[len("sqlite:///") :]).expanduser().parent / "recordings"
    return Path("relay-data") / "recordings"


def recording_path(directory: Path, tenant_id: str, call_sid: str) -> Path | None:
    """Where a call's recording lives; None for names that cannot be ours."""
    if not _SAFE.match(tenant_id) or not _SAFE.match(call_sid):
        return None
    return directory / tenant_id / f"{call_sid}.wav"


def wav_header(data_bytes: int) -> bytes:
    """A RIFF/WAVE header: PCM, 2 channels, 8 kHz, 16 bits."""
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + data_bytes,
        b"WAVE",
        b"fmt ",
        16,
        1,  # PCM
        2,  # channels
        RATE,
        RATE * 4,  # bytes per second
        4,  # block align
        16,  # bits per sample
        b"data",
        data_bytes,
    )


# --- the call's side (Trio loop) ----------------------------------------------------------------
class _Track:
    """One channel's audio not yet handed to the writer: contiguous μ-law from ``start``
    (gaps are filled with silence), so a frame costs an append and no allocation the
    garbage collector has to track."""

    __slots__ = ("buf", "start")

    def __init__(self) -> None:
        self.start = 0  # timeline sample of buf[0]
        self.buf = bytearray()

    @property
    def end(self) -> int:
        return self.start + len(self.buf)

    def put(self, pos: int, ulaw: bytes) -> None:
        """``ulaw`` at ``pos`` (>= end: the gap before it is silence)."""
        gap = pos - self.start - len(self.buf)
        if gap > 0:
            if not self.buf:
                self.start = pos
            else:
                self.buf += b"\xff" * gap  # μ-law silence
        self.buf += ulaw

    def take(self, upto: int) -> tuple[int, bytes] | None:
        """Everything before ``upto`` (and forget it)."""
        n = upto - self.start
        if n <= 0:
            return None
        piece = bytes(self.buf[:n])
        del self.buf[:n]
        start = self.start
        self.start = upto if len(piece) == n else start + len(piece)
        if not self.buf:
            self.start = max(self.start, upto)
        return (start, piece) if piece else None


class CallRecorder:
    """Collects one call's audio; every method is synchronous and cheap."""

    def __init__(self, writer: RecordingWriter, record: CallRecord, path: Path) -> None:
        self.writer = writer
        self.record = record
        self.path = path
        self._left = _Track()
        self._right = _Track()
        self._play_end = 0  # sample at which the agent audio sent so far ends playing
        self._newest = 0  # newest timeline position seen (samples)
        self._written = 0  # everything before this sample has been handed to the writer
        self._closed = False
        self.late_samples = 0
        self.dropped_samples = 0
        #: the most audio held at once (samples, both channels): the memory bound, observable
        self.peak_pending = 0
        record.recording = {
            "status": "recording",
            "url": f"/api/v1/calls/{record.call_sid}/recording",
            "format": "wav, 16-bit PCM, 8 kHz, stereo (left caller, right agent)",
        }
        writer.submit(("open", self))

    # -- media path hooks ------------------------------------------------------------------
    def caller(self, timestamp_ms: int, payload_b64: str) -> None:
        """One caller frame (base64 μ-law, as Twilio sent it) at its Twilio timestamp."""
        pos = timestamp_ms * SAMPLES_PER_MS
        left = self._left
        if pos == left.start + len(left.buf) and not self._closed:
            # the common case (the jitter buffer releases contiguous audio): an append
            ulaw = _b64decode(payload_b64)
            left.buf += ulaw
            end = pos + len(ulaw)
            if end > self._newest:
                self._newest = end
                if end - self._written >= _COMMIT_AT:
                    self._commit(end - _SLACK)
            return
        self._caller_other(pos, payload_b64)

    def _caller_other(self, pos: int, payload_b64: str) -> None:
        if self._closed:
            return
        ulaw = _b64decode(payload_b64)
        left = self._left
        if pos < self._written or pos < left.end:  # behind the timeline: too late
            self.late_samples += len(ulaw)
            return
        if pos - left.end > (SLACK_MS + CHUNK_MS) * SAMPLES_PER_MS and left.buf:
            self._commit(left.end)  # a long jump (Twilio skipped a gap): no silence kept
        left.put(pos, ulaw)
        end = pos + len(ulaw)
        if end > self._newest:
            self._newest = end
            if end - self._written >= (SLACK_MS + CHUNK_MS) * SAMPLES_PER_MS:
                self._commit(end - SLACK_MS * SAMPLES_PER_MS)

    def agent(self, frames: list[tuple[bytes, str, str]], now_ms: float) -> None:
        """Frames just sent to Twilio (downlink ``pull``), ``now_ms`` since ``start``."""
        if self._closed or not frames:
            return
        now = int(now_ms * SAMPLES_PER_MS)
        start = self._play_end if self._play_end > now else now
        right = self._right
        if start < right.end:  # never overlap what is already scheduled
            start = right.end
        for ulaw, _mark, _rid in frames:
            right.put(start, ulaw)
            start += len(ulaw)
        self._play_end = start
        if now > self._newest:
            self._newest = now
        if self._newest - self._written >= (SLACK_MS + CHUNK_MS) * SAMPLES_PER_MS:
            self._commit(self._newest - SLACK_MS * SAMPLES_PER_MS)

    def cut(self, now_ms: float) -> None:
        """Twilio was sent ``clear``: agent audio scheduled from now on was never heard."""
        now = int(now_ms * SAMPLES_PER_MS)
        if self._play_end <= now:
            return
        right = self._right
        keep = max(0, now - right.start)
        if keep < len(right.buf):
            del right.buf[keep:]
        self._play_end = max(now, right.end)

    # -- chunks ----------------------------------------------------------------------------
    def _commit(self, upto: int) -> None:
        pending = len(self._left.buf) + len(self._right.buf)
        if pending > self.peak_pending:
            self.peak_pending = pending
        if upto <= self._written:
            return
        left = self._left.take(upto)
        right = self._right.take(upto)
        start, self._written = self._written, upto
        if not self.writer.submit(("chunk", self, start, upto - start, left, right)):
            self.dropped_samples += upto - start

    def close(self) -> None:
        """The call ended: hand everything to the writer and finish the file."""
        if self._closed:
            return
        self._commit(max(self._newest, self._left.end, self._right.end))
        self._closed = True
        self.record.recording["late_ms"] = self.late_samples // SAMPLES_PER_MS
        self.record.recording["dropped_ms"] = self.dropped_samples // SAMPLES_PER_MS
        self.writer.submit(("close", self), force=True)


# --- the writer (one task, one worker thread, every call) --------------------------------------
@dataclass(eq=False)
class _File:
    fh: Any = None
    data_end: int = 0  # samples written (the file's data length / 4)
    failed: str = ""


@dataclass
class RecordingWriter:
    """The process's recording writer (``RelayState.recordings``)."""

    directory: Path
    metrics: Metrics
    retention_days: float = 0.0
    #: called on the loop with the record once its file is finished (history save)
    on_complete: Callable[[CallRecord], None] | None = None
    written_chunks: int = 0
    _files: dict[int, _File] = field(default_factory=dict)
    _pending: int = 0
    _idle: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[tuple](QUEUE_LIMIT)
        self._idle.set()
        self.running = False

    def path_for(self, tenant_id: str, call_sid: str) -> Path | None:
        return recording_path(self.directory, tenant_id, call_sid)

    def start(self, record: CallRecord) -> CallRecorder | None:
        """A recorder for the call of ``record`` (None: relay cannot record it)."""
        path = self.path_for(record.tenant_id, record.call_sid)
        if path is None or not self.running:
            return None
        return CallRecorder(self, record, path)

    def submit(self, op: tuple, *, force: bool = False) -> bool:
        """Queue ``op``; False when the queue is full (the chunk is dropped, counted).
        ``force``: a close always gets in (a few slots are kept for them)."""
        if not force and self._pending >= QUEUE_LIMIT - 64:
            self.metrics.error("recording_backlog")
            return False
        try:
            self._send.send_nowait(op)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self.metrics.error("recording_backlog")
            return False
        self._pending += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.running = True
        limiter = trio.CapacityLimiter(1)
        try:
            async with trio.open_nursery() as nursery:
                if self.retention_days > 0:
                    nursery.start_soon(self._prune_loop)
                task_status.started()
                while True:
                    batch = [await self._receive.receive()]
                    while len(batch) < 64:
                        try:
                            batch.append(self._receive.receive_nowait())
                        except trio.WouldBlock:
                            break
                    # Files must be finished even while relay shuts down: shield the hop.
                    with trio.CancelScope(shield=True):
                        done = await trio.to_thread.run_sync(self._apply, batch, limiter=limiter)
                    for rec, info in done:
                        rec.record.recording.update(info)
                        if self.on_complete is not None:
                            self.on_complete(rec.record)
                    self._pending -= len(batch)
                    if self._pending == 0:
                        self._idle.set()
        finally:
            self.running = False

    async def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued write is done; False on timeout."""
        with trio.move_on_after(timeout_s):
            while self._pending:
                await self._idle.wait()
            return True
        return False

    # -- in the worker thread ----------------------------------------------------------------
    def _apply(self, batch: list[tuple]) -> list[tuple[CallRecorder, dict[str, Any]]]:
        done: list[tuple[CallRecorder, dict[str, Any]]] = []
        for op in batch:
            rec: CallRecorder = op[1]
            state = self._files.setdefault(id(rec), _File())
            try:
                if op[0] == "open":
                    rec.path.parent.mkdir(parents=True, exist_ok=True)
                    state.fh = open(rec.path, "w+b")
                    state.fh.write(wav_header(0))
                elif op[0] == "chunk" and state.fh is not None:
                    self._write(state, op[2], op[3], op[4], op[5])
                    self.written_chunks += 1
                elif op[0] == "close":
                    del self._files[id(rec)]
                    done.append((rec, self._finish(state)))
            except OSError as exc:
                if not state.failed:
                    state.failed = f"{type(exc).__name__}: {exc}"[:200]
                    log.error("recording %s failed: %s", rec.path, state.failed)
                    self.metrics.error("recording_io")
                if state.fh is not None:
                    state.fh.close()
                    state.fh = None
                if op[0] == "close":
                    done.append((rec, {"status": "failed", "error": state.failed}))
        return done

    def _write(
        self,
        state: _File,
        start: int,
        count: int,
        left: tuple[int, bytes] | None,
        right: tuple[int, bytes] | None,
    ) -> None:
        pcm = np.zeros((count, 2), dtype="<i2")
        for channel, piece in ((0, left), (1, right)):
            if piece is not None:
                a = piece[0] - start
                samples = np.frombuffer(codec.ulaw_decode(piece[1]), dtype="<i2")
                pcm[a : a + len(samples), channel] = samples
        fh = state.fh
        fh.seek(HEADER_BYTES + start * 4)
        fh.write(pcm.tobytes())
        state.data_end = max(state.data_end, start + count)
        fh.seek(0)
        fh.write(wav_header(state.data_end * 4))  # valid while it grows

    def _finish(self, state: _File) -> dict[str, Any]:
        if state.fh is None:
            return {"status": "failed", "error": state.failed or "never opened"}
        state.fh.seek(0)
        state.fh.write(wav_header(state.data_end * 4))
        state.fh.close()
        state.fh = None
        return {
            "status": "complete",
            "seconds": round(state.data_end / RATE, 3),
            "bytes": HEADER_BYTES + state.data_end * 4,
        }

    # -- retention ---------------------------------------------------------------------------
    def prune(self, now: float | None = None) -> int:
        """Delete recordings older than ``retention_days`` (by mtime); how many."""
        if self.retention_days <= 0 or not self.directory.is_dir():
            return 0
        cutoff = (time.time() if now is None else now) - self.retention_days * 86400
        removed = 0
        for path in self.directory.glob("*/*.wav"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except OSError:
                continue
        return removed

    async def _prune_loop(self) -> None:
        while True:
            removed = await trio.to_thread.run_sync(self.prune)
            if removed:
                log.info("pruned %d recordings older than %g days", removed, self.retention_days)
            await trio.sleep(PRUNE_EVERY_S)


def start_for_call(call: Any) -> CallRecorder | None:
    """The call's recorder when its agent records (``record = true``), else None."""
    plan = call.plan
    if plan is None or not plan.policy.features.record:
        return None
    recorder = call.state.recordings.start(call.record)
    if recorder is None:
        call.metrics.error("recording_unavailable")
        log.warning("call %s: cannot record (writer not running)", call.call_sid)
    return recorder


def size_of(path: Path) -> int:
    return os.stat(path).st_size
