"""bench.watchwake: the watchdog-wake microbenchmark runs both ways and reports them
(counts and shapes only; the figures themselves are never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import watchwake
from relay.agents import liveness


def test_reports_own_wakes_and_grid_wakes(tmp_path: Path) -> None:
    out = tmp_path / "watchwake.json"
    grid = liveness.PING_GRID_S
    argv = ["--watchers", "3,5", "--seconds", "2.2", "--rounds", "1", "--warmup", "0.1"]
    assert watchwake.main([*argv, "--json", str(out)]) == 0
    assert liveness.PING_GRID_S == grid  # restored
    result = json.loads(out.read_text())["result"]
    assert set(result) == {"3", "5"}
    for n, by_grid in result.items():
        assert by_grid["own"]["grid_s"] == 0.0 and by_grid["grid"]["grid_s"] == grid
        for row in by_grid.values():
            (one,) = row["rounds"]
            assert one["wakes"] >= int(n)  # every watcher pinged at least once
