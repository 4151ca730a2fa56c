"""Per-agent call counts shared by the workers of one machine (``relay serve --workers N``).

``max_concurrent_calls`` is a promise about the agent, not about one process: a deployer
who allows an agent five calls (their vendor plan's concurrency) must not get ten because
two workers each let five in. Each worker writes its own counts to a small file in the
workers' run directory (tmpfs); admitting a call takes an exclusive ``flock`` on the
directory's lock file, sums every worker's counts and, if there is room, writes its own
file before letting go, so two webhooks racing for the last slot on two workers cannot both
win. The lock is held for a few file reads (microseconds), only on the webhook path of an
agent that has a limit.

A worker that dies loses its calls; the parent deletes its file when it restarts it
(relay/http/workers.py). Across machines the limit is per machine.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

import orjson

log = logging.getLogger("relay.control.shared_slots")

__all__ = ["SharedSlots"]

Key = tuple[str, str]  # (tenant, agent)


def _encode(key: Key) -> str:
    return f"{key[0]}\x1f{key[1]}"


class SharedSlots:
    def __init__(self, run_dir: str, index: int) -> None:
        self.dir = Path(run_dir)
        self.index = index
        self.own: dict[str, int] = {}
        self._lock_path = self.dir / "slots.lock"
        self._own_path = self.dir / f"w{index}.slots"

    def _others(self, key: str) -> int:
        total = 0
        for path in self.dir.glob("w*.slots"):
            if path == self._own_path:
                continue
            try:
                counts = orjson.loads(path.read_bytes())
            except (FileNotFoundError, orjson.JSONDecodeError):
                continue  # a worker that never admitted, or is being restarted
            value = counts.get(key, 0) if isinstance(counts, dict) else 0
            total += value if isinstance(value, int) else 0
        return total

    def _write(self) -> None:
        tmp = self._own_path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps({k: v for k, v in self.own.items() if v > 0}))
        os.replace(tmp, self._own_path)  # readers see the old file or the new, never half

    def admit(self, key: Key, limit: int) -> bool:
        """Take one of ``limit`` slots of ``key`` across all workers."""
        name = _encode(key)
        with open(self._lock_path, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.own.get(name, 0) + self._others(name) >= limit:
                    return False
                self.own[name] = self.own.get(name, 0) + 1
                self._write()
                return True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def release(self, key: Key) -> None:
        name = _encode(key)
        if self.own.get(name, 0) <= 0:
            return
        with open(self._lock_path, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.own[name] -= 1
                if self.own[name] <= 0:
                    del self.own[name]
                self._write()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def total(self, key: Key) -> int:
        name = _encode(key)
        return self.own.get(name, 0) + self._others(name)
