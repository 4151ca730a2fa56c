"""Per-call records: lifecycle, end reason, transcript, barge-ins, DTMF, status callbacks.

The in-memory record is what a live call mutates (synchronously, from the media path);
``relay.control.history`` persists snapshots of it to the store at the webhook, at the
stream's start, at the end and on status callbacks. The registry keeps the newest
``calls.records_kept`` records of this process for ``/calls`` and the tests.

End reasons (one vocabulary, also in the README): ``caller hung up``, ``agent ended``,
``max duration``, ``agent error``, ``agent disconnected``, ``agent connect failed``,
``agent connect timed out``, ``twilio disconnected``, ``internal error``, ``drained`` (a
graceful drain, relay/http/drain.py), a Twilio terminal call status (``completed``,
``busy``, ``no-answer``, ``failed``, ``canceled``) for calls that never got a stream, and
for rejected calls the reject reason (``concurrent limit``, ``not allowed``, ``no agent``,
``unknown agent``, ``draining``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class CallRecord:
    call_sid: str
    tenant_id: str = "default"
    account_sid: str = ""
    from_number: str = ""
    from_country: str = ""
    to_number: str = ""
    direction: str = "inbound"
    agent: str = ""
    #: incoming -> active -> completed, or rejected; an outbound call relay placed:
    #: initiated -> ringing -> in-progress -> active -> completed (relay/control/outbound.py)
    status: str = "incoming"
    #: why a call was rejected: concurrent_limit, no_agent, agent_connect_failed, ...
    reject_reason: str = ""
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
    #: call policies (relay/control/policies.py, outbound.py): machine detection's answer,
    #: whether the fallback message was said, and what was done to the call through the
    #: API (hang-up, transfer) with Twilio's answer
    answered_by: str = ""
    fallback_message_played: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)
    #: call features (relay/control/features.py): whether the agent session was opened at
    #: the webhook (warm start), the caller context the prep webhook answered and how that
    #: went, the recording, and the post-call webhook's delivery attempts
    warm_start: bool = False
    caller_profile: str = ""
    prep: dict[str, Any] = field(default_factory=dict)
    recording: dict[str, Any] = field(default_factory=dict)
    post_call_webhook: dict[str, Any] = field(default_factory=dict)

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
