"""bench.wakeup: the pass-clock microbenchmark runs and reports every candidate (counts
and shapes only; the figures themselves are never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import wakeup
from relay.media.passtimer import PassTimer

pytestmark = pytest.mark.skipif(PassTimer.create() is None, reason="timerfd is Linux-only")


def test_writes_a_row_per_period_and_candidate(tmp_path: Path) -> None:
    out = tmp_path / "wakeup.json"
    argv = ["--waits", "5", "--rounds", "2", "--periods-ms", "0.5,1", "--json", str(out)]
    assert wakeup.main(argv) == 0
    result = json.loads(out.read_text())
    assert list(result["periods"]) == ["0.5 ms", "1 ms"]
    for row in result["periods"].values():
        assert set(row) == set(wakeup.CANDIDATES)
        for v in row.values():
            assert len(v["cpu_rounds"]) == 2
            assert v["wall_us_per_wait"] > 0
