"""Ctrl-C for the command line's one-shot commands (demo, simulate, call, numbers sync).

Trio's default turns SIGINT into a KeyboardInterrupt raised inside whatever task code runs
at that moment. Library code between us and that point may catch it: a web framework
that turns an exception group from a request handler into a 500 response (quart-trio's
``handle_request`` does, for a group without ``Cancelled`` in it) swallows the
interrupt, and the command then runs to its end as if Ctrl-C had not been pressed. Seen
once in CI: ``relay demo`` interrupted while its first webhooks were being answered
finished all twenty calls and exited 0.

:func:`run` takes SIGINT as a cancellation of the whole run instead: the command's tasks
unwind through their ``finally`` blocks as on any cancellation, and KeyboardInterrupt is
raised once ``trio.run`` has returned, where only ``relay.cli.main`` sees it ("relay:
stopped", exit status 130). A second Ctrl-C while the run unwinds gets Trio's default
again, so a stuck cleanup can still be interrupted. ``relay serve`` has its own signal
handling (``relay/http/drain.py``).
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

T = TypeVar("T")

__all__ = ["run"]


def run(async_fn: Callable[..., Awaitable[T]], *args: object) -> T:
    """``trio.run(async_fn, *args)`` with Ctrl-C as a cancellation (see the module).

    ``async_fn``'s own exceptions come out as they would from ``trio.run``: it runs in a
    cancel scope, not in a nursery, so they are not wrapped in an exception group."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Started with Ctrl-C ignored (nohup, a background job of a script): keep it so.
        return trio.run(async_fn, *args)
    interrupted = False
    result: list[T] = []

    async def main() -> None:
        with trio.CancelScope() as scope:
            watching = trio.CancelScope()
            ready = trio.Event()

            async def watch() -> None:
                nonlocal interrupted
                with watching, trio.open_signal_receiver(signal.SIGINT) as signals:
                    ready.set()
                    async for _ in signals:
                        interrupted = True
                        scope.cancel()
                        return  # the receiver closes: a second Ctrl-C gets Trio's default

            # A system task, so that no nursery wraps async_fn's errors in a group.
            trio.lowlevel.spawn_system_task(watch)
            await ready.wait()
            try:
                result.append(await async_fn(*args))
            finally:
                watching.cancel()

    trio.run(main)
    if interrupted:
        raise KeyboardInterrupt
    return result[0]
