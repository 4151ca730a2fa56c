"""A ``python -m relay ...`` process for the tests that run the command line itself: started,
read until it says it is ready, killed at the end if still running. Its stdout and stderr
share one pipe (the server logs to stderr, the demo prints to stdout)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio


@asynccontextmanager
async def relay_process(
    args: Sequence[str], cwd: Path, ready: bytes, count: int = 1
) -> AsyncIterator[tuple[trio.Process, bytearray]]:
    """``python -m relay *args`` from once ``ready`` is in its output ``count`` times; the
    output so far comes with it and grows as :func:`read_until` / :func:`read_to_end` read."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "relay", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=str(cwd),
    )
    output = bytearray()
    try:
        await read_until(process, output, lambda: output.count(ready) >= count)
        yield process, output
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def read_until(process: trio.Process, output: bytearray, done: Callable[[], bool]) -> None:
    assert process.stdout is not None
    while not done():
        chunk = await process.stdout.receive_some(4096)
        assert chunk, output.decode("utf-8", "replace")
        output += chunk


async def read_to_end(process: trio.Process, output: bytearray) -> str:
    """Everything until the process exits, as text."""
    assert process.stdout is not None
    while chunk := await process.stdout.receive_some(4096):
        output += chunk
    await process.wait()
    return output.decode("utf-8", "replace")
