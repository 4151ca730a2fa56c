"""Call history: records reach the store through a queue, never from the media path.

The call engine and the webhooks mutate an in-memory :class:`relay.records.CallRecord`
(cheap, synchronous) and hand a *snapshot* to :meth:`HistoryWriter.submit`, which is a
non-blocking put on a bounded channel. One writer task drains the channel and runs the
writes in a worker thread, several per thread hop. The Trio loop thus never waits on the
database, and a slow or dead database costs queued writes (counted, logged once per
episode), never a frame.

Writes happen at: the voice webhook (row created: incoming or rejected), the stream's
``start`` (active), the call's end (completed, with transcript, barge-ins, DTMF, tool calls
and media stats), and each status callback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from ..metrics import Metrics
from ..records import CallRecord
from .store import Store, StoreError

log = logging.getLogger("relay.control.history")

#: writes queued before new ones are dropped (and counted): ~minutes of a busy relay
QUEUE_LIMIT = 50_000
BATCH = 200
PRUNE_EVERY_S = 3600.0


def record_values(record: CallRecord, tenant_id: str) -> dict[str, Any]:
    """The columns of a call row, from the in-memory record (times in epoch ms)."""

    def ms(value: float | None) -> int | None:
        return None if value is None else int(value * 1000)

    started, ended = ms(record.started_at), ms(record.ended_at)
    return {
        "call_sid": record.call_sid,
        "tenant_id": tenant_id,
        "account_sid": record.account_sid,
        "direction": record.direction,
        "from_number": record.from_number,
        "to_number": record.to_number,
        "from_country": record.from_country,
        "agent": record.agent,
        "status": record.status,
        "reject_reason": record.reject_reason,
        "end_reason": record.end_reason,
        "stream_sid": record.stream_sid,
        "created_at": ms(record.created_at),
        "started_at": started,
        "ended_at": ended,
        "duration_ms": (ended - started) if started is not None and ended is not None else None,
        "first_agent_audio_ms": record.first_agent_audio_ms,
        "details": {
            "transcript": list(record.transcript),
            "barge_ins": list(record.barge_ins),
            "dtmf": list(record.dtmf),
            "tool_calls": list(record.tool_calls),
            "stats": dict(record.stats),
            "answered_by": record.answered_by,
            "fallback_message_played": record.fallback_message_played,
            "events": list(record.events),
            "warm_start": record.warm_start,
            "caller_profile": record.caller_profile,
            "prep": dict(record.prep),
            "recording": dict(record.recording),
            "post_call_webhook": dict(record.post_call_webhook),
        },
    }


class _Save:
    """A queued snapshot of one call row (callable, so a batch can run it alone)."""

    __slots__ = ("store", "values")

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        self.store: Store | None = None

    def __call__(self) -> None:
        assert self.store is not None
        self.store.save_call(self.values)


class HistoryWriter:
    def __init__(self, store: Store, metrics: Metrics, *, retention_days: float = 0.0) -> None:
        self.store = store
        self.metrics = metrics
        self.retention_days = retention_days
        self._send, self._receive = trio.open_memory_channel[Callable[[], None]](QUEUE_LIMIT)
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()
        self._dropping = False
        self.written = 0
        self.failed = 0
        #: snapshots replaced by a newer one of the same call within a batch (never written)
        self.superseded = 0
        metrics.store_queue = lambda: self._pending

    # -- producers (synchronous, never block) -----------------------------------------------
    def submit(self, op: Callable[[], None]) -> None:
        try:
            self._send.send_nowait(op)
        except trio.WouldBlock:
            self.metrics.error("store_backlog")
            if not self._dropping:
                self._dropping = True
                log.error("call history queue full (%d writes): dropping writes", QUEUE_LIMIT)
            return
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return
        self._pending += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle

    def save(self, record: CallRecord, tenant_id: str) -> None:
        """Queue an upsert of ``record`` as it is now (a snapshot: later edits don't leak)."""
        op = _Save(record_values(record, tenant_id))
        op.store = self.store
        self.submit(op)

    def status_callback(
        self, call_sid: str, tenant_id: str, entry: dict[str, str], terminal: str | None
    ) -> None:
        self.submit(lambda: self.store.add_status_callback(call_sid, tenant_id, entry, terminal))

    # -- consumer -------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with trio.open_nursery() as nursery:
            if self.retention_days > 0:
                nursery.start_soon(self._prune_loop)
            try:
                await self._drain_forever()
            finally:
                nursery.cancel_scope.cancel()

    async def _drain_forever(self) -> None:
        while True:
            batch = [await self._receive.receive()]
            while len(batch) < BATCH:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            # The last writes of a shutting-down relay must land: shield the hop.
            with trio.CancelScope(shield=True):
                await self.store.run(self._apply, batch)
            self._pending -= len(batch)
            if self._pending == 0:
                self._idle.set()

    def _apply(self, batch: list[Callable[[], None]]) -> None:
        # Snapshots of one call supersede each other (each carries every column): keep the
        # newest per call and write them all in one transaction; other writes (status
        # callbacks: read-modify-write) go one by one, in order, after them.
        latest: dict[str, _Save] = {}
        others: list[Callable[[], None]] = []
        for op in batch:
            if isinstance(op, _Save):
                if latest.pop(op.values["call_sid"], None) is not None:
                    self.superseded += 1
                latest[op.values["call_sid"]] = op
            else:
                others.append(op)
        saves = list(latest.values())
        if saves:
            try:
                self.store.save_calls([s.values for s in saves])
                self.written += len(saves)
                self._dropping = False
            except Exception:  # isolate the bad row: the others must still land
                others[:0] = saves
        for op in others:
            try:
                op()
                self.written += 1
                self._dropping = False
            except Exception as exc:  # one bad write must not stop the others
                self.failed += 1
                self.metrics.error("store")
                log.error("call history write failed: %s: %s", exc.__class__.__name__, exc)

    async def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything submitted so far is written; False on timeout."""
        with trio.move_on_after(timeout_s):
            while self._pending:
                await self._idle.wait()
            return True
        return False

    async def _prune_loop(self) -> None:
        while True:
            cutoff = int((time.time() - self.retention_days * 86400) * 1000)
            try:
                removed = await self.store.run(self.store.prune_calls, cutoff)
            except (StoreError, Exception) as exc:
                self.metrics.error("store")
                log.error("pruning old call records failed: %s", exc)
            else:
                if removed:
                    log.info(
                        "pruned %d call records older than %g days", removed, self.retention_days
                    )
            await trio.sleep(PRUNE_EVERY_S)
