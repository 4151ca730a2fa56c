"""Handing a connection to the worker that answered its call (``relay serve --workers N``).

The voice webhook leaves per-call state in the worker that answered it: the plan the
policies made, the warm agent session opened while Twilio was still fetching TwiML, the
hold audio cue. Twilio then opens the media stream as a new connection, which
``SO_REUSEPORT`` may give to any worker. So the URLs relay writes into TwiML for the
call's later requests (the stream, its status callback, the ``<Connect action>``) end with
the answering worker's tag (``/w3``); a worker that accepts such a connection for another
worker passes the socket itself over a Unix datagram socket (``SCM_RIGHTS``, unix(7)),
together with the bytes it has already read, and forgets it. The peer then carries on as if
it had accepted the connection: no proxying, no extra hop per media frame.

If the tagged worker is gone (restarted, or its socket is full for a second), the worker
that has the connection serves it itself: the stream token, the store and the per-agent
slot counts are shared, so the call still works, only cold (no warm session).
"""

from __future__ import annotations

import array
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

log = logging.getLogger("relay.http.handoff")

__all__ = ["MAX_PREFIX", "Handoff"]

MAGIC = b"RLY1"
#: the request head (16 KiB at most, relay/media/websocket.py) plus what came with it
MAX_PREFIX = 64 * 1024
SEND_TIMEOUT_S = 1.0

Serve = Callable[[trio.SocketStream, bytes], Awaitable[None]]


class Handoff:
    """This worker's end: receives connections for it, sends others' to them."""

    def __init__(self, run_dir: str, index: int, counts: dict[str, int] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.index = index
        #: sent / received / failed (the worker's metrics, relay_handoffs_total)
        self.counts: dict[str, int] = {} if counts is None else counts
        self._rx: trio.socket.SocketType | None = None
        self._tx = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def path(self, index: int) -> str:
        return str(self.run_dir / f"w{index}.sock")

    async def run(self, serve: Serve, *, task_status: trio.TaskStatus[None]) -> None:
        """Receive connections handed to this worker and serve each in its own task."""
        path = self.path(self.index)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        rx = self._rx = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        await rx.bind(path)
        # the datagrams are small, but a burst of streams must not be refused
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        task_status.started()
        async with trio.open_nursery() as nursery:
            try:
                while True:
                    data, ancdata, flags, _addr = await rx.recvmsg(
                        MAX_PREFIX + len(MAGIC), socket.CMSG_SPACE(array.array("i").itemsize)
                    )
                    fds = _fds(ancdata)
                    if (
                        flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
                        or len(fds) != 1
                        or not data.startswith(MAGIC)
                    ):
                        for fd in fds:
                            os.close(fd)
                        self.counts["failed"] = self.counts.get("failed", 0) + 1
                        log.error(
                            "handoff: malformed datagram (%d fds, flags %#x)", len(fds), flags
                        )
                        continue
                    self.counts["received"] = self.counts.get("received", 0) + 1
                    sock = socket.socket(fileno=fds[0])
                    sock.setblocking(False)
                    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
                    nursery.start_soon(serve, stream, data[len(MAGIC) :])
            finally:
                rx.close()
                try:
                    os.unlink(path)
                except OSError:
                    pass

    async def send(self, index: int, stream: trio.SocketStream, prefix: bytes) -> bool:
        """Pass ``stream`` (and the bytes already read from it) to worker ``index``.
        True: it is theirs now (our descriptor is closed); False: serve it here."""
        if len(prefix) > MAX_PREFIX:
            return False
        fd = stream.socket.fileno()
        rights = array.array("i", [fd]).tobytes()
        try:
            with trio.move_on_after(SEND_TIMEOUT_S):
                await self._tx.sendmsg(
                    [MAGIC, prefix],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)],
                    0,
                    self.path(index),
                )
                self.counts["sent"] = self.counts.get("sent", 0) + 1
                # The peer holds its own reference now; closing ours sends nothing (the
                # socket stays open while any process holds it).
                stream.socket.close()
                return True
        except OSError as exc:  # no such worker (restarting), or its queue is full
            log.warning("handoff to worker %d failed (%s): serving here", index, exc)
        self.counts["failed"] = self.counts.get("failed", 0) + 1
        return False

    def close(self) -> None:
        self._tx.close()


def _fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return fds
