"""Per-call records: lifecycle, end reason, transcript, barge-ins, DTMF, status callbacks.

Kept in memory, newest last, bounded (``calls.records_kept``). A persistent store is on the
roadmap; this is the shape it will persist.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class CallRecord:
    call_sid: str
    from_number: str = ""
    to_number: str = ""
    direction: str = "inbound"
    agent: str = ""
    #: incoming -> active -> completed, or rejected
    status: str = "incoming"
    end_reason: str = ""
    stream_sid: str = ""
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    first_agent_audio_ms: float | None = None
    transcript: list[dict[str, Any]] = field(default_factory=list)
    barge_ins: list[dict[str, Any]] = field(default_factory=list)
    dtmf: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    status_callbacks: list[dict[str, str]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.started_at

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["duration_s"] = self.duration_s
        return data


class CallRegistry:
    def __init__(self, keep: int = 1000) -> None:
        self.keep = keep
        self._records: OrderedDict[str, CallRecord] = OrderedDict()

    def get(self, call_sid: str) -> CallRecord | None:
        return self._records.get(call_sid)

    def create(self, call_sid: str, **fields: Any) -> CallRecord:
        record = self._records.get(call_sid)
        if record is None:
            record = CallRecord(call_sid=call_sid, **fields)
            self._records[call_sid] = record
            while len(self._records) > self.keep:
                self._records.popitem(last=False)
        return record

    def ensure(self, call_sid: str) -> CallRecord:
        return self.get(call_sid) or self.create(call_sid)

    def newest(self, limit: int = 50, offset: int = 0) -> list[CallRecord]:
        items = list(reversed(self._records.values()))
        return items[offset : offset + limit]

    def __len__(self) -> int:
        return len(self._records)
