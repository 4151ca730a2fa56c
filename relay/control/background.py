"""The call features' process-wide tasks, started once by the server (its lifespan nursery):
warm agent sessions (warm.py), the recordings writer (relay/media/recording.py) and the
post-call webhook sender (postcall.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from ..state import RelayState


async def run(
    state: RelayState, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(state.warm.run)
        await nursery.start(state.recordings.run)
        await nursery.start(state.postcall.run)
        task_status.started()
