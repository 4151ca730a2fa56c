"""A periodic kernel timer (Linux ``timerfd``) that the media reactor waits on between passes.

Why not ``trio.sleep``: a pass period is ~1 ms, so the reactor sleeps up to a thousand
times a second, and each Trio sleep costs ~120–130 µs of CPU on this machine kind
(a cancel scope and deadline per sleep, the run loop's timer bookkeeping, and
``epoll_wait`` with a timeout, which Python rounds *up* to whole milliseconds, so a
0.5 ms sleep lasts ~1.2 ms). Waiting for a periodic ``timerfd`` to become readable costs
~75–85 µs (``wait_readable`` plus one 8-byte ``read``), and its period is exact to the
microsecond (timerfd_create(2)). Python 3.11 has no ``os.timerfd_*`` (added in 3.13),
so the two calls go through ``ctypes``; where they are missing ``PassTimer.create``
returns ``None`` and the reactor sleeps with Trio instead.
"""

from __future__ import annotations

import ctypes
import os

import trio

from . import codec

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = getattr(os, "O_CLOEXEC", 0o2000000)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.timerfd_settime.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(_Itimerspec),
            ctypes.c_void_p,
        ]
    except (OSError, AttributeError):
        return None
    return libc


class PassTimer:
    """One periodic timer; ``wait()`` returns at the next tick (at once if one is due)."""

    def __init__(self, libc: ctypes.CDLL, fd: int) -> None:
        self._libc = libc
        self._fd = fd
        self.period_s = 0.0  # 0: disarmed
        self.ticks = 0  # expirations seen (several per wait when a pass overran)

    @classmethod
    def create(cls) -> PassTimer | None:
        libc = _libc()
        if libc is None:
            return None
        fd = libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            return None
        return cls(libc, fd)

    def _set(self, period_s: float) -> None:
        sec, nsec = divmod(round(period_s * 1e9), 1_000_000_000)
        every = _Timespec(sec, nsec)
        spec = _Itimerspec(every, every)  # first tick one period from now, then periodic
        if self._libc.timerfd_settime(self._fd, 0, ctypes.byref(spec), None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.period_s = period_s

    def arm(self, period_s: float) -> None:
        if period_s <= 0:
            raise ValueError("period must be positive")
        if period_s != self.period_s:
            self._set(period_s)

    def disarm(self) -> None:
        if self.period_s:
            self._set(0.0)
            self._drain()

    def _drain(self) -> int:
        return codec.timer_expirations(self._fd)  # one read(2), no bytes object

    def fileno(self) -> int:
        return self._fd

    def due(self) -> int:
        """Expirations since the last look (0: no tick due yet), without waiting."""
        n = self._drain()
        self.ticks += n
        return n

    async def wait(self) -> None:
        """The next tick. A tick that already passed returns at once, after a checkpoint."""
        await trio.lowlevel.wait_readable(self._fd)
        self.due()

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
