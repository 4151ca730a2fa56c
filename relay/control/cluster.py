"""Which worker of ``relay serve --workers N`` this process is (relay/http/workers.py).

The parent passes it in the environment; a lone relay is worker 0 of 1 and behaves exactly
as before (no tags in URLs, no shared files).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .shared_slots import SharedSlots

__all__ = [
    "ENV_COUNT",
    "ENV_INDEX",
    "ENV_RUN_DIR",
    "ENV_SUPERVISOR",
    "WorkerIdentity",
    "parse_tag",
]

ENV_INDEX = "RELAY_WORKER_INDEX"
ENV_COUNT = "RELAY_WORKERS"
ENV_RUN_DIR = "RELAY_RUN_DIR"
ENV_SUPERVISOR = "RELAY_SUPERVISOR_PID"


@dataclass(frozen=True)
class WorkerIdentity:
    """Which worker this process is (``index`` of ``count``; a lone relay is 0 of 1)."""

    index: int = 0
    count: int = 1
    run_dir: str = ""

    @property
    def clustered(self) -> bool:
        return self.count > 1 and bool(self.run_dir)

    @property
    def tag(self) -> str:
        """The path segment that routes a call's later requests back here."""
        return f"w{self.index}" if self.clustered else ""

    @classmethod
    def from_env(cls) -> WorkerIdentity:
        try:
            index = int(os.environ.get(ENV_INDEX, "0"))
            count = int(os.environ.get(ENV_COUNT, "1"))
        except ValueError:
            return cls()
        run_dir = os.environ.get(ENV_RUN_DIR, "")
        if count < 1 or not 0 <= index < count:
            return cls()
        return cls(index, count, run_dir)

    def shared_slots(self) -> SharedSlots | None:
        return SharedSlots(self.run_dir, self.index) if self.clustered else None


def parse_tag(segment: str, count: int) -> int | None:
    """``w3`` -> 3 when such a worker exists."""
    if len(segment) < 2 or segment[0] != "w" or not segment[1:].isdigit():
        return None
    index = int(segment[1:])
    return index if index < count else None
