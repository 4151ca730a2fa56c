# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled hot paths of the load generator and the fake agent.

Why: at 600 calls the generator handles ~70,000 WebSocket messages a second on one core.
Interpreted, the per-message Python work was about half of its CPU (the other half is the
kernel's loopback TCP, which no user-space code can avoid). These three pieces carry
almost every message; everything else stays in Python:

- ``run_reactor``: ``bench.netio.Reactor.run`` with ``epoll_pwait2`` (nanosecond timeouts:
  ``epoll.poll`` rounds up to whole milliseconds, which made 20 ms media timers late);
- ``Uplink``: ``bench.loadgen.Uplink.tick``, one 20 ms ``media`` frame built in a C buffer
  and written with one ``send(2)``;
- ``AgentReader``: ``bench.netio.HttpConn._ws_event`` plus the fake agent's
  ``input_audio_buffer.append`` fast path, on a raw ``recvmsg(2)`` with the kernel's arrival
  stamp.

Each one is a drop-in for the pure-Python code named above, which stays the reference:
``tests/test_bench_genfast.py`` runs both on the same input and compares bytes, latencies
and counters. Anything unusual (split frames, control frames, a marker that does not
check out) takes the Python path, so the compiled code only ever handles the common case.
``bench.genfast`` builds this module on first use.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.errno cimport EAGAIN, EINTR, ENOSYS, errno
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memchr, memcpy

import heapq
import os
from binascii import a2b_base64 as _a2b_base64

from bench.stats import LEVEL_COUNT, level_of_value

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec* ts)
    int clock_nanosleep(int clk, int flags, const timespec* req, timespec* rem)
    int CLOCK_MONOTONIC
    int CLOCK_REALTIME

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    cmsghdr* CMSG_FIRSTHDR(msghdr* m)
    cmsghdr* CMSG_NXTHDR(msghdr* m, cmsghdr* c)
    unsigned char* CMSG_DATA(cmsghdr* c)
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    ssize_t recvmsg(int fd, msghdr* m, int flags)
    int MSG_DONTWAIT
    int MSG_NOSIGNAL
    int SOL_SOCKET

cdef extern from *:
    """
    #include <sys/socket.h>
    #ifndef SO_TIMESTAMPNS
    #define SO_TIMESTAMPNS 35
    #endif
    #ifndef SCM_TIMESTAMPNS
    #define SCM_TIMESTAMPNS SO_TIMESTAMPNS
    #endif
    """
    int SCM_TIMESTAMPNS

cdef extern from "<string.h>" nogil:
    void* memmem(const void* hay, size_t hlen, const void* needle, size_t nlen)

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)
    int epoll_pwait2(int epfd, epoll_event* events, int maxevents,
                     const timespec* timeout, const void* sigmask)
    int EPOLLIN
    int EPOLLOUT


# -- clocks and stamped reads ---------------------------------------------------------

cdef inline int64_t mono_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline int64_t real_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


DEF RECV_SIZE = 262144
cdef unsigned char RBUF[RECV_SIZE]  # one receive buffer: the generator is single-threaded
cdef uint64_t CBUF[16]  # control messages (8-byte aligned)


cdef ssize_t recv_stamped(int fd, int64_t* now) noexcept nogil:
    """``bench.netio.recv_stamped`` on a raw fd: bytes read into RBUF (-errno on error),
    and the kernel's arrival stamp as monotonic ns in ``now``."""
    cdef iovec iov
    cdef msghdr msg
    cdef cmsghdr* c
    cdef timespec ts
    cdef int64_t mono, t
    iov.iov_base = RBUF
    iov.iov_len = RECV_SIZE
    msg.msg_name = NULL
    msg.msg_namelen = 0
    msg.msg_iov = &iov
    msg.msg_iovlen = 1
    msg.msg_control = CBUF
    msg.msg_controllen = sizeof(CBUF)
    msg.msg_flags = 0
    cdef ssize_t n = recvmsg(fd, &msg, MSG_DONTWAIT)
    if n < 0:
        return -errno
    mono = mono_ns()
    now[0] = mono
    c = CMSG_FIRSTHDR(&msg)
    while c != NULL:
        if c.cmsg_level == SOL_SOCKET and c.cmsg_type == SCM_TIMESTAMPNS:
            memcpy(&ts, CMSG_DATA(c), sizeof(timespec))
            t = <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec - (real_ns() - mono)
            if t < mono:
                now[0] = t
            break
        c = CMSG_NXTHDR(&msg, c)
    return n


def monotonic_ns():
    return mono_ns()


# -- base64 of the 9-byte frame marker ---------------------------------------------------

cdef const char* B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
cdef signed char B64DEC[256]


cdef void _init_b64dec():
    cdef int i
    for i in range(256):
        B64DEC[i] = -1
    for i in range(64):
        B64DEC[<unsigned char>B64[i]] = i


_init_b64dec()


cdef inline void b64_9(const uint8_t* src, char* dst) noexcept nogil:
    """9 bytes -> 12 base64 characters (no padding: 9 is a multiple of 3)."""
    cdef int i, j = 0
    cdef uint32_t v
    for i in range(0, 9, 3):
        v = (<uint32_t>src[i] << 16) | (<uint32_t>src[i + 1] << 8) | src[i + 2]
        dst[j] = B64[(v >> 18) & 63]
        dst[j + 1] = B64[(v >> 12) & 63]
        dst[j + 2] = B64[(v >> 6) & 63]
        dst[j + 3] = B64[v & 63]
        j += 4


cdef inline bint unb64_12(const uint8_t* src, uint8_t* dst) noexcept nogil:
    """12 base64 characters -> 9 bytes; false on any character outside the alphabet."""
    cdef int i, j = 0, k
    cdef int a, b, c, d
    for i in range(0, 12, 4):
        a = B64DEC[src[i]]
        b = B64DEC[src[i + 1]]
        c = B64DEC[src[i + 2]]
        d = B64DEC[src[i + 3]]
        if (a | b | c | d) < 0:
            return False
        k = (a << 18) | (b << 12) | (c << 6) | d
        dst[j] = (k >> 16) & 255
        dst[j + 1] = (k >> 8) & 255
        dst[j + 2] = k & 255
        j += 3
    return True


cdef inline char* put_int(char* p, int64_t v) noexcept nogil:
    """Decimal digits of ``v`` (>= 0) at ``p``; returns the end."""
    cdef char tmp[24]
    cdef int n = 0
    if v == 0:
        p[0] = 48
        return p + 1
    while v > 0:
        tmp[n] = 48 + <char>(v % 10)
        v //= 10
        n += 1
    while n > 0:
        n -= 1
        p[0] = tmp[n]
        p += 1
    return p


cdef inline char* put_bytes(char* p, bytes b) noexcept:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    memcpy(p, PyBytes_AS_STRING(b), n)
    return p + n

cdef inline void put_masked_header(char* out, Py_ssize_t mlen) noexcept nogil:
    """Header of one final text frame of 126..65535 bytes, masked with the zero key
    (legal RFC 6455, see bench.netio): the 8 bytes in front of a message built at out+8."""
    out[0] = <char>0x81
    out[1] = <char>0xFE
    out[2] = (mlen >> 8) & 255
    out[3] = mlen & 255
    out[4] = 0
    out[5] = 0
    out[6] = 0
    out[7] = 0


cdef inline Py_ssize_t next_text_frame(Py_ssize_t pos, Py_ssize_t n, bint masked,
                                       Py_ssize_t* ln) noexcept nogil:
    """Header length (mask key included) of the whole, final text frame at RBUF[pos:n],
    its payload length in ``ln``; -1 when that frame is partial, of another kind, or
    masked when it should not be (or the reverse)."""
    cdef uint8_t b1
    cdef Py_ssize_t h = 2
    if n - pos < 2 or RBUF[pos] != 0x81:
        return -1
    b1 = RBUF[pos + 1]
    if (b1 & 0x80) != (0x80 if masked else 0):
        return -1
    ln[0] = b1 & 0x7F
    if ln[0] == 126:
        if n - pos < 4:
            return -1
        ln[0] = (<Py_ssize_t>RBUF[pos + 2] << 8) | RBUF[pos + 3]
        h = 4
    elif ln[0] == 127:
        return -1
    if masked:
        h += 4
    if pos + h + ln[0] > n:
        return -1
    return h


# -- the uplink sender -------------------------------------------------------------------

DEF OUT_SIZE = 4096
cdef bytes P_SEQ = b'{"event":"media","sequenceNumber":"'
cdef bytes P_TS = b'","timestamp":"'
cdef bytes P_PAYLOAD = b'","payload":"'
cdef bytes P_END = b'"}}'


cdef class Uplink:
    """Compiled ``bench.loadgen.Uplink``: same constructor, same bytes on the wire."""

    cdef public object call
    cdef public long long k
    cdef public long long seq
    cdef int idx
    cdef bint passthrough
    cdef bytes sid_part
    cdef bytes rest_b64
    cdef list level_b64
    cdef Py_ssize_t nlevels
    cdef list up_times
    cdef bytearray up_seen
    cdef object marks
    cdef char out[OUT_SIZE]

    def __init__(self, call, int idx, bytes sid, bint passthrough, bytes rest_b64,
                 list level_b64, list up_times, bytearray up_seen, marks):
        self.call = call
        self.idx = idx
        self.k = 0
        self.seq = 1
        self.passthrough = passthrough
        self.sid_part = b'","streamSid":"' + sid + b'","media":{"track":"inbound","chunk":"'
        self.rest_b64 = rest_b64
        self.level_b64 = level_b64
        self.nlevels = len(level_b64)
        self.up_times = up_times
        self.up_seen = up_seen
        self.marks = marks
        if len(self.sid_part) + len(rest_b64) + 256 > OUT_SIZE:
            raise ValueError("media frame does not fit the uplink buffer")

    cpdef tick(self, long long now):
        """One 20 ms uplink frame, plus any mark echoes that are due (one send)."""
        cdef long long k = self.k
        cdef long long seq
        cdef uint8_t head[9]
        cdef uint32_t chk
        cdef char* msg = self.out + 8  # room for the masked 16-bit-length frame header
        cdef char* p = msg
        cdef Py_ssize_t mlen, total
        cdef ssize_t n
        cdef bytes extra = None
        self.k = k + 1
        self.seq += 1
        seq = self.seq
        p = put_bytes(p, P_SEQ)
        p = put_int(p, seq)
        p = put_bytes(p, self.sid_part)
        p = put_int(p, k + 1)
        p = put_bytes(p, P_TS)
        p = put_int(p, k * 20)
        p = put_bytes(p, P_PAYLOAD)
        if self.passthrough:
            chk = (<uint32_t>self.idx * 31 + <uint32_t>k * 7 + 0x5A) & 0xFF
            head[0] = 0xA5
            head[1] = 0x5A
            head[2] = (self.idx >> 8) & 255
            head[3] = self.idx & 255
            head[4] = (k >> 24) & 255
            head[5] = (k >> 16) & 255
            head[6] = (k >> 8) & 255
            head[7] = k & 255
            head[8] = chk
            b64_9(head, p)
            p += 12
            p = put_bytes(p, self.rest_b64)
        else:
            p = put_bytes(p, <bytes>self.level_b64[k % self.nlevels])
        p = put_bytes(p, P_END)
        mlen = p - msg
        put_masked_header(self.out, mlen)
        total = mlen + 8
        marks = self.marks
        if marks and marks[0][0] <= now:
            extra = self.call._due_mark_echoes(now)
            if total + len(extra) <= OUT_SIZE:
                memcpy(self.out + total, PyBytes_AS_STRING(extra), len(extra))
                total += len(extra)
                extra = None
        self.up_times.append(mono_ns())
        self.up_seen.append(0)
        call = self.call
        if extra is not None:  # a pile of mark echoes (clear): rare, let Python send it
            call.send(PyBytes_FromStringAndSize(self.out, total) + extra)
            return
        if call._out is not None or call.closed:
            call.send(PyBytes_FromStringAndSize(self.out, total))
            return
        n = send(call.fd, self.out, total, MSG_DONTWAIT | MSG_NOSIGNAL)
        if n < 0:
            if errno == EAGAIN or errno == EINTR:
                n = 0
            else:
                call.close()
                return
        if n < total:
            call._out = bytearray(PyBytes_FromStringAndSize(self.out + n, total - n))
            call.reactor.modify(call.fd, EPOLLIN | EPOLLOUT)


# -- the fake agent's reader ---------------------------------------------------------------

cdef bytes APPEND = b'"input_audio_buffer.append"'
cdef bytes AUDIO_KEY = b'"audio":'


cdef class AgentReader:
    """Compiled ``HttpConn._ws_event`` + ``AgentSession.on_message`` append fast path for
    one agent session. Registered as the connection's reactor callback."""

    cdef object conn
    cdef object session
    cdef object agent
    cdef object leg
    cdef object markers
    cdef object ws
    cdef int fd
    cdef int expected

    def __init__(self, conn, session):
        self.conn = conn
        self.session = session
        self.agent = session.agent
        self.markers = session.up_markers
        self.ws = conn.ws
        self.fd = conn.fd
        self.leg = None
        self.expected = -1

    def __call__(self, int ev):
        self.on_event(ev)

    cdef on_event(self, int ev):
        cdef int64_t now = 0
        cdef ssize_t n
        cdef Py_ssize_t ln
        conn = self.conn
        if ev != EPOLLIN:
            conn.on_event(ev)
            return
        n = recv_stamped(self.fd, &now)
        if n < 0:
            if n == -EAGAIN or n == -EINTR:
                return
            n = 0
        if n == 0:
            conn.close()
            return
        if (
            n > 8
            and RBUF[1] == 0xFE
            and RBUF[0] == 0x81
            and ((<Py_ssize_t>RBUF[2] << 8) | RBUF[3]) + 8 == n
            and not self.ws._buf
        ):
            if self._append(n, now):
                return
        conn._on_ws_data(PyBytes_FromStringAndSize(<char*>RBUF, n), now)

    cdef bint _append(self, ssize_t n, int64_t now) except -1:
        """One whole masked text frame in RBUF: account it if it is an append of one
        marked μ-law frame of this call. RBUF is left as it was received otherwise."""
        cdef uint8_t* payload = RBUF + 8
        cdef Py_ssize_t plen = n - 8
        cdef uint8_t* start = NULL
        cdef uint8_t* end
        cdef uint8_t head[9]
        cdef Py_ssize_t alen
        cdef int cid
        cdef long long seq
        cdef bint ok = False
        session = self.session
        if self.leg is None:
            call = session.call
            if call is None:
                return False
            self.leg = call.up
            self.expected = call.idx
        if not session.in_pcmu:
            return self._append_pcm(payload, plen, now)
        mt = self.markers
        if mt.carry or mt.pending:
            return False
        _xor(payload, plen, RBUF + 4)
        end = _append_audio(payload, plen, &start)
        if end != NULL:
            alen = end - start
            if 12 <= alen <= 216 and unb64_12(start, head):
                if head[0] == 0xA5 and head[1] == 0x5A:
                    cid = (head[2] << 8) | head[3]
                    seq = (
                        (<long long>head[4] << 24) | (head[5] << 16)
                        | (head[6] << 8) | head[7]
                    )
                    if cid == self.expected and head[8] == (
                        (cid * 31 + seq * 7 + 0x5A) & 0xFF
                    ):
                        ok = True
        if not ok:
            _xor(payload, plen, RBUF + 4)  # back to the bytes as received
            return False
        self.agent.appends += 1
        self.leg.received(seq, now)
        return True


    cdef bint _append_pcm(self, uint8_t* payload, Py_ssize_t plen, int64_t now) except -1:
        """One whole masked text frame in RBUF, to a session that takes PCM: when it is an
        append, what ``AgentSession._on_append`` does with it (count it, decode it, feed
        the level tracker), without the Python frame parse and JSON slicing before it.
        Why: with PCM agents the generator's core ran out first (at ~520 calls, where
        μ-law reached ~750), and every append took the Python path. RBUF is left as it
        was received when it is anything else."""
        cdef uint8_t* start = NULL
        cdef uint8_t* end
        session = self.session
        _xor(payload, plen, RBUF + 4)
        end = _append_audio(payload, plen, &start)
        # an escaped "/" ("\/") takes the Python path, which unescapes it
        if end != NULL and memchr(start, 92, end - start) != NULL:
            end = NULL
        if end == NULL:
            _xor(payload, plen, RBUF + 4)  # back to the bytes as received
            return False
        cdef Py_ssize_t nbytes = _b64_size(start, end - start)
        cdef bytes pcm
        levels = session.up_levels
        self.agent.appends += 1
        self.agent.compiled_pcm_appends += 1
        if nbytes >= 0 and levels is not None and _levels_feed(levels, start, nbytes, now):
            session.up_samples += nbytes >> 1
            return True
        pcm = _a2b_base64(PyBytes_FromStringAndSize(<char*>start, end - start))
        nbytes = PyBytes_GET_SIZE(pcm)
        session.up_samples += nbytes >> 1
        if levels is not None:
            if nbytes & 1:
                pcm = pcm[:nbytes - 1]
            levels.feed(memoryview(pcm).cast("h"), False, now)
        return True


# -- PCM appends: the level tracker's steady state without decoding the audio -----------
#
# Once a LevelTracker (bench/stats.py) is anchored, each append only needs one sample per
# frame (the frame's middle). Decoding the whole append (1,280 base64 characters per 20 ms
# at 24 kHz) and running the tracker's Python was ~30 % of the generator's busy time with
# PCM agents (py-spy at 300 calls), which ended the PCM capacity searches first. Here the
# middles are decoded from the base64 in place; when every one of them is the level the
# tracker expects, the tracker's state moves exactly as LevelTracker.feed would move it.
# Anything else (not anchored yet, a wrong or missing level, odd or malformed base64)
# returns False before touching anything, and the caller runs the reference code.

cdef signed char _B64[256]
cdef int _b64_i
for _b64_i in range(256):
    _B64[_b64_i] = -1
cdef bytes _B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
for _b64_i in range(64):
    _B64[<uint8_t>_B64_ALPHABET[_b64_i]] = _b64_i


cdef Py_ssize_t _b64_size(const uint8_t* s, Py_ssize_t n) noexcept:
    """The decoded size of canonical padded base64 (what a2b_base64 gives), or -1 when it
    is anything else (a length not a multiple of 4, a character outside the alphabet,
    padding before the end)."""
    cdef Py_ssize_t i, pad = 0
    if n <= 0 or n & 3:
        return -1
    if s[n - 1] == 61:
        pad = 2 if s[n - 2] == 61 else 1
    for i in range(n - pad):
        if _B64[s[i]] < 0:
            return -1
    return (n >> 2) * 3 - pad


cdef inline int _b64_byte(const uint8_t* s, Py_ssize_t p) noexcept:
    """Byte ``p`` of the decoded base64 ``s`` (validated by _b64_size)."""
    cdef const uint8_t* g = s + (p // 3) * 4
    cdef int r = p % 3
    if r == 0:
        return ((_B64[g[0]] << 2) | (_B64[g[1]] >> 4)) & 0xFF
    if r == 1:
        return ((_B64[g[1]] << 4) | (_B64[g[2]] >> 2)) & 0xFF
    return ((_B64[g[2]] << 6) | _B64[g[3]]) & 0xFF


cdef inline long long _floordiv(long long a, long long b) noexcept:
    cdef long long q = a // b  # C truncates (cdivision): floor for negatives
    if (a % b != 0) and ((a < 0) != (b < 0)):
        q -= 1
    return q


cdef bint _levels_feed(levels, const uint8_t* b64, Py_ssize_t nbytes, int64_t now) except -1:
    cdef long long start, end, anchor, L, half, j, mid, k, allowance, count
    cdef Py_ssize_t i, m = 0, idx
    cdef int v
    cdef long long mids[64]
    cdef long long ks[64]
    if nbytes & 1 or levels.anchor_pos is None:
        return False
    start = levels.pos
    end = start + (nbytes >> 1)
    anchor = levels.anchor_pos
    L = levels.frame_len
    allowance = levels.allowance
    count = LEVEL_COUNT
    half = L // 2
    j = -_floordiv(-(start - anchor - half), L)
    if j < 0:
        j = 0
    while True:
        mid = anchor + j * L + half
        if mid >= end:
            break
        if mid >= start:
            if m == 64:
                return False
            idx = <Py_ssize_t>(mid - start) * 2
            v = _b64_byte(b64, idx) | (_b64_byte(b64, idx + 1) << 8)
            if v >= 0x8000:
                v -= 0x10000
            level = level_of_value(v)
            k = levels.anchor_k + j
            if level is None or <long long>level != k % count:
                return False  # the reference re-anchors or resyncs: let it
            mids[m] = mid
            ks[m] = k
            m += 1
        j += 1
    levels.pos = end
    pending = levels.pending
    for i in range(m):
        pending.append((mids[i] - half + L - allowance, ks[i]))
    leg = levels.leg
    while pending and pending[0][0] <= end:
        leg.received(pending.pop(0)[1], now)
    return True


def levels_feed_b64(levels, bytes b64, int64_t now):
    """:func:`_levels_feed` for the tests: True when it took the append (the tracker moved
    as ``LevelTracker.feed`` would), False when the reference code must."""
    cdef Py_ssize_t nbytes = _b64_size(<const uint8_t*>PyBytes_AS_STRING(b64), len(b64))
    if nbytes < 0:
        return False
    return _levels_feed(levels, <const uint8_t*>PyBytes_AS_STRING(b64), nbytes, now)


cdef uint8_t* _append_audio(uint8_t* payload, Py_ssize_t plen, uint8_t** start) noexcept:
    """In an unmasked text payload, an ``input_audio_buffer.append``'s audio string:
    ``[*start, returned end)``, or NULL when the payload is not one."""
    cdef uint8_t* stop = payload + plen
    cdef uint8_t* a
    cdef uint8_t* s
    if memmem(payload, plen, PyBytes_AS_STRING(APPEND), len(APPEND)) == NULL:
        return NULL
    a = <uint8_t*>memmem(payload, plen, PyBytes_AS_STRING(AUDIO_KEY), len(AUDIO_KEY))
    if a == NULL:
        return NULL
    a += len(AUDIO_KEY)
    s = <uint8_t*>memchr(a, 34, stop - a)  # the opening quote
    if s == NULL:
        return NULL
    start[0] = s + 1
    return <uint8_t*>memchr(s + 1, 34, stop - s - 1)


cdef inline void _xor(uint8_t* p, Py_ssize_t n, const uint8_t* key) noexcept nogil:
    # 8 bytes at a time (the key repeats every 4, so twice in a word), then the tail
    cdef Py_ssize_t i = 0
    cdef uint64_t k64, w
    cdef uint8_t kb[8]
    if key[0] == 0 and key[1] == 0 and key[2] == 0 and key[3] == 0:
        return
    for i in range(8):
        kb[i] = key[i & 3]
    memcpy(&k64, kb, 8)
    i = 0
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        w ^= k64
        memcpy(p + i, &w, 8)
        i += 8
    while i < n:
        p[i] ^= key[i & 3]
        i += 1


# -- the generator's downlink reader ------------------------------------------------------

cdef bytes EV_MEDIA = b'"event":"media"'
cdef bytes EV_MARK = b'"event":"mark"'
cdef bytes PAYLOAD_KEY = b'"payload":"'
cdef bytes NAME_KEY = b'"name":'
DEF ULAW_BYTE_NS = 125000


cdef inline uint8_t* find(uint8_t* p, Py_ssize_t n, bytes needle) noexcept:
    return <uint8_t*>memmem(p, n, PyBytes_AS_STRING(needle), PyBytes_GET_SIZE(needle))


cdef class TwilioReader:
    """Compiled ``WsClient.on_data`` + ``TwilioCall.on_message`` for the two messages a
    relay sends all the time (``media``, ``mark``) in the compact JSON most relays write.
    Anything else, or any message it cannot take apart with certainty, goes to
    ``TwilioCall.on_message`` whole; a partial frame goes to ``WsClient.on_data``."""

    cdef object call
    cdef object reader
    cdef object markers
    cdef object leg
    cdef bytes sid_key
    cdef int fd
    cdef int expected
    cdef Py_ssize_t frame_bytes
    cdef Py_ssize_t allowance
    cdef bint passthrough

    def __init__(self, call):
        self.call = call
        self.reader = call.reader
        self.markers = call.down_markers
        self.leg = call.down
        self.sid_key = b'"streamSid":"' + call.sid_b + b'"'
        self.fd = call.fd
        self.expected = call.idx
        self.frame_bytes = call.down_markers.frame_bytes
        self.allowance = call.down_markers.allowance
        self.passthrough = call.passthrough

    def __call__(self, int ev):
        self.on_event(ev)

    cdef on_event(self, int ev):
        cdef int64_t now = 0
        cdef ssize_t n
        cdef Py_ssize_t pos = 0, hdr, ln = 0
        call = self.call
        if ev != EPOLLIN:
            call.on_event(ev)
            return
        n = recv_stamped(self.fd, &now)
        if n < 0:
            if n == -EAGAIN or n == -EINTR:
                return
            n = 0
        if n == 0:
            call.close()
            return
        reader = self.reader
        if reader._buf or reader._frag:
            call.on_data(PyBytes_FromStringAndSize(<char*>RBUF, n), now)
            return
        while True:  # whole, final, unmasked text frames; the rest goes to Python
            hdr = next_text_frame(pos, n, False, &ln)
            if hdr < 0:
                break
            self._message(RBUF + pos + hdr, ln, now)
            pos += hdr + ln
            if call.closed:
                return
        if pos < n:
            call.on_data(PyBytes_FromStringAndSize(<char*>RBUF + pos, n - pos), now)

    cdef _message(self, uint8_t* p, Py_ssize_t ln, int64_t now):
        cdef uint8_t* a
        cdef uint8_t* b
        cdef uint8_t* stop = p + ln
        if find(p, ln, self.sid_key) != NULL:
            if find(p, ln, EV_MEDIA) != NULL:
                if self.passthrough:
                    a = find(p, ln, PAYLOAD_KEY)
                    if a != NULL:
                        a += PyBytes_GET_SIZE(PAYLOAD_KEY)
                        b = <uint8_t*>memchr(a, 34, stop - a)
                        if b != NULL and memchr(a, 92, b - a) == NULL:
                            self._media(a, b - a, now)
                            return
            elif find(p, ln, EV_MARK) != NULL:
                a = find(p, ln, NAME_KEY)
                if a != NULL:
                    a += PyBytes_GET_SIZE(NAME_KEY)
                    while a < stop and (a[0] == 32):
                        a += 1
                    if a < stop and a[0] == 34:
                        b = <uint8_t*>memchr(a + 1, 34, stop - a - 1)
                        if b != NULL and memchr(a, 92, b - a) == NULL:
                            self.call.on_mark_json(
                                PyBytes_FromStringAndSize(<char*>a, b - a + 1), now
                            )
                            return
        self.call.on_message(1, PyBytes_FromStringAndSize(<char*>p, ln), now)

    cdef _media(self, uint8_t* b64, Py_ssize_t blen, int64_t now):
        """``TwilioCall._on_media`` for a passthrough payload (no JSON escapes in it)."""
        cdef Py_ssize_t nbytes = blen * 3 // 4
        cdef uint8_t head[9]
        cdef int cid
        cdef long long seq
        cdef bint done = False
        if blen > 0 and b64[blen - 1] == 61:
            nbytes -= 1
            if blen > 1 and b64[blen - 2] == 61:
                nbytes -= 1
        call = self.call
        mt = self.markers
        # MarkerTracker.feed's whole-frame fast path
        if (
            not mt.carry
            and not mt.pending
            and self.frame_bytes - self.allowance <= nbytes <= self.frame_bytes
            and blen >= 12
            and unb64_12(b64, head)
            and head[0] == 0xA5
            and head[1] == 0x5A
        ):
            cid = (head[2] << 8) | head[3]
            seq = (<long long>head[4] << 24) | (head[5] << 16) | (head[6] << 8) | head[7]
            if cid == self.expected and head[8] == ((cid * 31 + seq * 7 + 0x5A) & 0xFF):
                mt.pos += nbytes
                self.leg.received(seq, now)
                done = True
        if not done:
            nbytes = mt.feed(PyBytes_FromStringAndSize(<char*>b64, blen), now)
        call.media_msgs += 1
        if not call.t_first_audio:
            call.t_first_audio = now
        # Real-time playback model: audio queues behind what is still playing.
        play_end = call.play_end
        call.play_end = (play_end if play_end > now else now) + nbytes * ULAW_BYTE_NS


# -- the null relay's Twilio-side reader (calibration target) ----------------------------

cdef bytes APPEND_HEAD = b'{"type":"input_audio_buffer.append","audio":"'


cdef class NullTwilioReader:
    """Compiled uplink of ``bench.peers.null_relay`` (``HttpConn._ws_event`` +
    ``_RelayCall.from_twilio`` for ``media``): each media frame's payload is written to
    the agent as ``input_audio_buffer.append`` with one ``send(2)``, the same bytes the
    Python path writes. Used only with no injected delay, drop or transcoding; every other
    message, and anything while the agent link is not up or is backlogged, goes to Python.
    """

    cdef object conn
    cdef object call
    cdef object ws
    cdef int fd
    cdef char out[OUT_SIZE]

    def __init__(self, conn, call):
        self.conn = conn
        self.call = call
        self.ws = conn.ws
        self.fd = conn.fd

    def __call__(self, int ev):
        self.on_event(ev)

    cdef on_event(self, int ev):
        cdef int64_t now = 0
        cdef ssize_t n
        cdef Py_ssize_t pos = 0, hdr, ln = 0
        conn = self.conn
        if ev != EPOLLIN:
            conn.on_event(ev)
            return
        n = recv_stamped(self.fd, &now)
        if n < 0:
            if n == -EAGAIN or n == -EINTR:
                return
            n = 0
        if n == 0:
            conn.close()
            return
        ws = self.ws
        if ws._buf or ws._frag:
            conn._on_ws_data(PyBytes_FromStringAndSize(<char*>RBUF, n), now)
            return
        while True:  # whole, final, masked text frames; the rest goes to Python
            hdr = next_text_frame(pos, n, True, &ln)
            if hdr < 0:
                break
            _xor(RBUF + pos + hdr, ln, RBUF + pos + hdr - 4)
            self._message(RBUF + pos + hdr, ln, now)
            pos += hdr + ln
            if conn.closed:
                return
        if pos < n:
            conn._on_ws_data(PyBytes_FromStringAndSize(<char*>RBUF + pos, n - pos), now)

    cdef _message(self, uint8_t* p, Py_ssize_t ln, int64_t now):
        cdef uint8_t* a
        cdef uint8_t* b
        cdef Py_ssize_t blen, mlen, total
        cdef ssize_t sent
        cdef char* q
        call = self.call
        link = call.link
        if (
            link is not None
            and link.upgraded
            and link._out is None
            and not link.closed
            and find(p, ln, EV_MEDIA) != NULL
        ):
            a = find(p, ln, PAYLOAD_KEY)
            if a != NULL:
                a += PyBytes_GET_SIZE(PAYLOAD_KEY)
                b = <uint8_t*>memchr(a, 34, p + ln - a)
                blen = b - a if b != NULL else -1
                if 0 <= blen <= OUT_SIZE - 128 and memchr(a, 92, blen) == NULL:
                    call.media_seen += 1
                    q = self.out + 8
                    q = put_bytes(q, APPEND_HEAD)
                    memcpy(q, a, blen)
                    q += blen
                    q[0] = 34
                    q[1] = 125  # "}
                    q += 2
                    mlen = q - (self.out + 8)
                    put_masked_header(self.out, mlen)
                    total = mlen + 8
                    sent = send(link.fd, self.out, total, MSG_DONTWAIT | MSG_NOSIGNAL)
                    if sent < 0:
                        if errno == EAGAIN or errno == EINTR:
                            sent = 0
                        else:
                            link.close()
                            return
                    if sent < total:
                        link._out = bytearray(
                            PyBytes_FromStringAndSize(self.out + sent, total - sent)
                        )
                        link.reactor.modify(link.fd, EPOLLIN | EPOLLOUT)
                    return
        call.from_twilio(1, PyBytes_FromStringAndSize(<char*>p, ln), now)


# -- the loop --------------------------------------------------------------------------------

DEF MAX_EVENTS = 512
cdef bint HAVE_PWAIT2 = True


cdef inline int _wait(int epfd, epoll_event* events, int64_t timeout_ns,
                      bint timers_only) noexcept nogil:
    global HAVE_PWAIT2
    cdef timespec ts
    cdef int r
    if timers_only and timeout_ns > 0:
        # Reactor(wait_timers=True): sleep to the next timer, then take what arrived
        ts.tv_sec = timeout_ns // 1000000000
        ts.tv_nsec = timeout_ns % 1000000000
        clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL)
        timeout_ns = 0
    if HAVE_PWAIT2:
        ts.tv_sec = timeout_ns // 1000000000
        ts.tv_nsec = timeout_ns % 1000000000
        r = epoll_pwait2(epfd, events, MAX_EVENTS, &ts, NULL)
        if r >= 0 or errno != ENOSYS:
            return r
        HAVE_PWAIT2 = False
    # epoll_wait counts whole milliseconds: round up so a timer is never fired early
    return epoll_wait(epfd, events, MAX_EVENTS, <int>((timeout_ns + 999999) // 1000000))


cdef inline void _fire_due(list timers, int64_t now) except *:
    while timers and timers[0][0] <= now:
        entry = heapq.heappop(timers)
        fn = entry[2]
        if fn is not None:
            fn(*entry[3])
        if timers and timers[0][0] <= now:
            continue
        now = mono_ns()  # timers can take a while: pick up newly due ones


def run_reactor(reactor, until_ns, stop):
    """``bench.netio.Reactor.run``, compiled (same timer and batching rules)."""
    cdef epoll_event events[MAX_EVENTS]
    cdef int epfd = reactor._ep.fileno()
    cdef list timers = reactor._timers
    cdef dict callbacks = reactor._callbacks
    cdef int64_t now, wake, until
    cdef bint has_until = until_ns is not None
    cdef int i, nev, every = 32
    cdef bint timers_only = reactor.wait_timers
    until = until_ns if has_until else 0
    while True:
        now = mono_ns()
        _fire_due(timers, now)
        now = mono_ns()
        if (has_until and now >= until) or (stop is not None and stop()):
            return
        wake = timers[0][0] if timers else now + 50000000
        if has_until and until < wake:
            wake = until
        nev = _wait(epfd, events, wake - now if wake > now else 0, timers_only)
        if nev < 0:
            if errno == EINTR:
                continue
            raise OSError(errno, os.strerror(errno))
        for i in range(nev):
            cb = callbacks.get(events[i].data.fd)
            if cb is not None:
                if type(cb) is AgentReader:
                    (<AgentReader>cb).on_event(events[i].events)
                elif type(cb) is TwilioReader:
                    (<TwilioReader>cb).on_event(events[i].events)
                elif type(cb) is NullTwilioReader:
                    (<NullTwilioReader>cb).on_event(events[i].events)
                else:
                    cb(events[i].events)
            if (i + 1) % every == 0 and i + 1 < nev:
                _fire_due(timers, mono_ns())
