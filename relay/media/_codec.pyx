# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""relay's audio hot path: G.711, streaming resampler, fused Twilio paths, jitter buffers,
and the Twilio -> relay WebSocket reader (RFC 6455 frames + media/mark scanner).

relay.media.codec_ref is the executable specification: every name here has a pure-Python twin
there with bit-identical output (tests/test_codec_*.py check it differentially), and its
docstrings describe the behaviour in detail.  This module is the fast version:

* every per-sample loop is a C loop over lookup tables or float32 SIMD lanes;
* bytes / bytearray / memoryview inputs are read in place through the buffer protocol;
* one Python-level call per frame for the fused paths (base64 is decoded here, in C).

Float32 arithmetic must round exactly like the reference: setup.py compiles with
-ffp-contract=off (no fused multiply-add) and every output is a sum over taps in the same
order (tap 0 first, from 0.0), whether computed in a SIMD lane or in the scalar tail.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.math cimport INFINITY
from libc.stdint cimport int16_t, uint8_t, uint16_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset

from collections import deque
from types import GenericAlias

cdef extern from "Python.h":
    bint PyBytes_CheckExact(object)
    bint PyUnicode_Check(object)
    bint PyUnicode_IS_COMPACT_ASCII(object)
    void* PyUnicode_DATA(object)
    Py_ssize_t PyUnicode_GET_LENGTH(object)
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    object PyUnicode_DecodeUTF8(const char *s, Py_ssize_t size, const char *errors)

cdef extern from *:
    """
    /* out[q] = sum_{m<K} g[m] * sp[m][q] for q < nq, accumulated in float32 from tap 0.
       SIMD lanes run across outputs (never across taps), so every output sees exactly the
       scalar operation sequence whatever the vector width: the reference reproduces it bit
       for bit.  8 independent accumulators hide the add latency. */
    #define RELAY_FIR_KERNEL(NAME, VS, ATTR)                                             \
    ATTR static void NAME(const float *g, int K, const float **sp, float *out,           \
                          Py_ssize_t nq)                                                 \
    {                                                                                    \
        typedef float vv __attribute__((vector_size(VS)));                               \
        typedef float vu __attribute__((vector_size(VS), aligned(4)));                   \
        enum { W = VS / 4 };                                                             \
        Py_ssize_t q = 0;                                                                \
        int m;                                                                           \
        for (; q + 8 * W <= nq; q += 8 * W) {                                            \
            vv a0 = {0}, a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;  \
            for (m = 0; m < K; m++) {                                                    \
                const vv gv = g[m] - (vv){0};                                            \
                const float *s = sp[m] + q;                                              \
                a0 += gv * *(const vu *)(s);                                             \
                a1 += gv * *(const vu *)(s + W);                                         \
                a2 += gv * *(const vu *)(s + 2 * W);                                     \
                a3 += gv * *(const vu *)(s + 3 * W);                                     \
                a4 += gv * *(const vu *)(s + 4 * W);                                     \
                a5 += gv * *(const vu *)(s + 5 * W);                                     \
                a6 += gv * *(const vu *)(s + 6 * W);                                     \
                a7 += gv * *(const vu *)(s + 7 * W);                                     \
            }                                                                            \
            *(vu *)(out + q) = a0;                                                       \
            *(vu *)(out + q + W) = a1;                                                   \
            *(vu *)(out + q + 2 * W) = a2;                                               \
            *(vu *)(out + q + 3 * W) = a3;                                               \
            *(vu *)(out + q + 4 * W) = a4;                                               \
            *(vu *)(out + q + 5 * W) = a5;                                               \
            *(vu *)(out + q + 6 * W) = a6;                                               \
            *(vu *)(out + q + 7 * W) = a7;                                               \
        }                                                                                \
        for (; q + 2 * W <= nq; q += 2 * W) {                                            \
            vv a0 = {0}, a1 = a0;                                                        \
            for (m = 0; m < K; m++) {                                                    \
                const vv gv = g[m] - (vv){0};                                            \
                a0 += gv * *(const vu *)(sp[m] + q);                                     \
                a1 += gv * *(const vu *)(sp[m] + q + W);                                 \
            }                                                                            \
            *(vu *)(out + q) = a0;                                                       \
            *(vu *)(out + q + W) = a1;                                                   \
        }                                                                                \
        for (; q + W <= nq; q += W) {                                                    \
            vv a0 = {0};                                                                 \
            for (m = 0; m < K; m++)                                                      \
                a0 += (g[m] - (vv){0}) * *(const vu *)(sp[m] + q);                       \
            *(vu *)(out + q) = a0;                                                       \
        }                                                                                \
        for (; q < nq; q++) {                                                            \
            float a = 0.0f;                                                              \
            for (m = 0; m < K; m++)                                                      \
                a += g[m] * sp[m][q];                                                    \
            out[q] = a;                                                                  \
        }                                                                                \
    }

    static void relay_fir_scalar(const float *g, int K, const float **sp, float *out,
                                 Py_ssize_t nq)
    {
        Py_ssize_t q;
        int m;
        for (q = 0; q < nq; q++) {
            float a = 0.0f;
            for (m = 0; m < K; m++)
                a += g[m] * sp[m][q];
            out[q] = a;
        }
    }

    #if defined(__GNUC__) || defined(__clang__)
    RELAY_FIR_KERNEL(relay_fir_v128, 16, )
    #if defined(__x86_64__) || defined(__i386__)
    /* AVX2 has 8 float lanes; chosen at import when the CPU has it (no FMA: AVX2 does not
       imply it, and -ffp-contract=off forbids contraction anyway). */
    RELAY_FIR_KERNEL(relay_fir_v256, 32, __attribute__((target("avx2"))))
    static int relay_cpu_avx2(void)
    {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2");
    }
    #else
    #define relay_fir_v256 relay_fir_v128
    static int relay_cpu_avx2(void) { return 0; }
    #endif
    #else
    #define relay_fir_v128 relay_fir_scalar
    #define relay_fir_v256 relay_fir_scalar
    static int relay_cpu_avx2(void) { return 0; }
    #endif

    typedef void (*relay_fir_fn)(const float *, int, const float **, float *, Py_ssize_t);
    static relay_fir_fn relay_fir = relay_fir_v128;

    /* float32 -> int16 LE: saturate, then round half to even (codec_ref: round(clamp(v))).
       SSE2: cvtps2dq rounds to nearest-even (default MXCSR) and packssdw saturates, which
       equals clamp-then-round for every |v| < 2**31 (our outputs are far below).
       Elsewhere: (v + 1.5*2**23) - 1.5*2**23 rounds |v| < 2**22 to nearest-even without a
       libm call. */
    #if (defined(__SSE2__) || defined(_M_X64)) && (PY_LITTLE_ENDIAN)
    #include <emmintrin.h>
    #define RELAY_SSE2 1
    #endif
    static inline int relay_round_i16(float v)
    {
        if (v > 32767.0f) v = 32767.0f;
        else if (v < -32768.0f) v = -32768.0f;
        return (int)((v + 12582912.0f) - 12582912.0f);
    }
    static void relay_f32_to_pcm16le(const float *y, Py_ssize_t n, unsigned char *out)
    {
        Py_ssize_t i = 0;
    #ifdef RELAY_SSE2
        for (; i + 8 <= n; i += 8) {
            __m128i a = _mm_cvtps_epi32(_mm_loadu_ps(y + i));
            __m128i b = _mm_cvtps_epi32(_mm_loadu_ps(y + i + 4));
            _mm_storeu_si128((__m128i *)(out + 2 * i), _mm_packs_epi32(a, b));
        }
    #endif
        for (; i < n; i++) {
            int v = relay_round_i16(y[i]);
            out[2 * i] = (unsigned char)(v & 0xFF);
            out[2 * i + 1] = (unsigned char)((v >> 8) & 0xFF);
        }
    }
    /* int16 LE -> float32 (exact) */
    static void relay_pcm16le_to_f32(const unsigned char *src, Py_ssize_t n, float *x)
    {
        Py_ssize_t i = 0;
    #ifdef RELAY_SSE2
        for (; i + 8 <= n; i += 8) {
            __m128i v = _mm_loadu_si128((const __m128i *)(src + 2 * i));
            __m128i lo = _mm_srai_epi32(_mm_unpacklo_epi16(v, v), 16);
            __m128i hi = _mm_srai_epi32(_mm_unpackhi_epi16(v, v), 16);
            _mm_storeu_ps(x + i, _mm_cvtepi32_ps(lo));
            _mm_storeu_ps(x + i + 4, _mm_cvtepi32_ps(hi));
        }
    #endif
        for (; i < n; i++)
            x[i] = (float)(int16_t)(src[2 * i] | (src[2 * i + 1] << 8));
    }

    /* table lookup 8-bit code -> 16-bit little-endian pair, unrolled by 4 (the -O2 build
       does not unroll, and this loop is all loads and stores) */
    static void relay_expand(const unsigned char *src, Py_ssize_t n, const uint16_t *table,
                             unsigned char *dst)
    {
        Py_ssize_t i = 0;
        for (; i + 4 <= n; i += 4) {
            uint16_t v[4];
            v[0] = table[src[i]];
            v[1] = table[src[i + 1]];
            v[2] = table[src[i + 2]];
            v[3] = table[src[i + 3]];
            memcpy(dst + 2 * i, v, 8);
        }
        for (; i < n; i++)
            memcpy(dst + 2 * i, &table[src[i]], 2);
    }
    """
    void relay_expand(const uint8_t* src, Py_ssize_t n, const uint16_t* table, uint8_t* dst)
    void relay_f32_to_pcm16le(const float* y, Py_ssize_t n, uint8_t* out)
    void relay_pcm16le_to_f32(const uint8_t* src, Py_ssize_t n, float* x)
    int relay_round_i16(float v)
    ctypedef void (*relay_fir_fn)(const float*, int, const float**, float*, Py_ssize_t)
    relay_fir_fn relay_fir
    void relay_fir_scalar(const float* g, int K, const float** sp, float* out, Py_ssize_t nq)
    void relay_fir_v128(const float* g, int K, const float** sp, float* out, Py_ssize_t nq)
    void relay_fir_v256(const float* g, int K, const float** sp, float* out, Py_ssize_t nq)
    int relay_cpu_avx2()


# Which FIR kernel runs: all give bit-identical results (a test compares them).
def _set_kernel(name: str) -> None:
    """Select the FIR kernel ('scalar', 'sse', 'avx2'): for tests and benchmarks."""
    global relay_fir, _kernel
    if name == "avx2" and not relay_cpu_avx2():
        raise ValueError("this CPU has no AVX2")
    if name == "scalar":
        relay_fir = relay_fir_scalar
    elif name == "sse":
        relay_fir = relay_fir_v128
    elif name == "avx2":
        relay_fir = relay_fir_v256
    else:
        raise ValueError(f"unknown kernel {name!r}")
    _kernel = name


def _get_kernel() -> str:
    return _kernel


_kernel = "sse"
if relay_cpu_avx2():
    _set_kernel("avx2")


# ======================================================================================
# G.711 (ITU-T G.711; bit-exact with audioop, see codec_ref for the μ-law sign note)
# ======================================================================================

cdef uint8_t _ULAW_ENC[16384]   # index (x >> 2) + 8192
cdef uint8_t _ALAW_ENC[8192]    # index (x >> 3) + 4096
cdef int16_t _ULAW_DEC[256]
cdef int16_t _ALAW_DEC[256]
cdef uint16_t _ULAW_LE[256]     # decoded values as little-endian byte pairs
cdef uint16_t _ALAW_LE[256]
cdef float _ULAW_F[256]         # μ-law code -> float, for the fused uplink
cdef signed char _B64[256]      # base64 character -> 6-bit value, -1 if invalid

cdef int _SEG_UEND[8]
cdef int _SEG_AEND[8]
_SEG_UEND[:] = [0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF]
_SEG_AEND[:] = [0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF]


cdef inline int _segment(int v, const int* ends) noexcept nogil:
    cdef int i
    for i in range(8):
        if v <= ends[i]:
            return i
    return 8


cdef int _ulaw_encode_sample(int sample) noexcept nogil:
    cdef int v = sample >> 2, mask, seg
    if v < 0:
        v = -v
        mask = 0x7F
    else:
        mask = 0xFF
    if v > 8159:  # G.711 μ-law clip level on the 14-bit scale
        v = 8159
    v += 33  # bias 0x84 >> 2
    seg = _segment(v, _SEG_UEND)
    if seg >= 8:
        return 0x7F ^ mask
    return ((seg << 4) | ((v >> (seg + 1)) & 0xF)) ^ mask


cdef int _ulaw_decode_sample(int code) noexcept nogil:
    cdef int u = ~code & 0xFF, t
    t = ((u & 0x0F) << 3) + 0x84
    t <<= (u & 0x70) >> 4
    return 0x84 - t if u & 0x80 else t - 0x84


cdef int _alaw_encode_sample(int sample) noexcept nogil:
    cdef int v = sample >> 3, mask, seg, aval
    if v >= 0:
        mask = 0xD5
    else:
        mask = 0x55
        v = -v - 1
    seg = _segment(v, _SEG_AEND)
    if seg >= 8:
        return 0x7F ^ mask
    aval = seg << 4
    if seg < 2:
        aval |= (v >> 1) & 0xF
    else:
        aval |= (v >> seg) & 0xF
    return aval ^ mask


cdef int _alaw_decode_sample(int code) noexcept nogil:
    cdef int a = code ^ 0x55, t, seg
    t = (a & 0xF) << 4
    seg = (a & 0x70) >> 4
    if seg == 0:
        t += 8
    elif seg == 1:
        t += 0x108
    else:
        t = (t + 0x108) << (seg - 1)
    return t if a & 0x80 else -t


cdef void _init_tables() noexcept:
    cdef int i
    for i in range(16384):
        _ULAW_ENC[i] = <uint8_t>_ulaw_encode_sample((i - 8192) << 2)
    for i in range(8192):
        _ALAW_ENC[i] = <uint8_t>_alaw_encode_sample((i - 4096) << 3)
    for i in range(256):
        _ULAW_DEC[i] = <int16_t>_ulaw_decode_sample(i)
        _ALAW_DEC[i] = <int16_t>_alaw_decode_sample(i)
        _ULAW_F[i] = <float>_ULAW_DEC[i]
        _wr16(<uint8_t*>&_ULAW_LE[i], _ULAW_DEC[i])
        _wr16(<uint8_t*>&_ALAW_LE[i], _ALAW_DEC[i])
        _B64[i] = -1
    cdef const char* alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    for i in range(64):
        _B64[<uint8_t>alphabet[i]] = <signed char>i


_init_tables()


cdef inline int16_t _rd16(const uint8_t* p) noexcept nogil:
    # PCM16 little-endian, independent of the host's byte order
    return <int16_t>(p[0] | (p[1] << 8))


cdef inline void _wr16(uint8_t* p, int v) noexcept nogil:
    p[0] = <uint8_t>(v & 0xFF)
    p[1] = <uint8_t>((v >> 8) & 0xFF)


# -- zero-copy input ---------------------------------------------------------------------

cdef struct _In:
    const uint8_t* p
    Py_ssize_t n
    bint owned
    Py_buffer view


cdef inline int _in_get(object o, _In* s) except -1:
    if PyBytes_CheckExact(o):  # fast path: no buffer export needed for immutable bytes
        s.p = <const uint8_t*>PyBytes_AS_STRING(o)
        s.n = PyBytes_GET_SIZE(o)
        s.owned = False
    else:
        PyObject_GetBuffer(o, &s.view, PyBUF_SIMPLE)
        s.p = <const uint8_t*>s.view.buf
        s.n = s.view.len
        s.owned = True
    return 0


cdef inline void _in_release(_In* s) noexcept:
    if s.owned:
        PyBuffer_Release(&s.view)
        s.owned = False


cdef inline bytes _new_bytes(Py_ssize_t n):
    return PyBytes_FromStringAndSize(NULL, n)


cdef bytes _encode_table(object pcm, const uint8_t* table, int shift, int offset):
    # Both laws index a table by the top bits of each sample: μ-law by 14 bits
    # (>> 2, offset 8192), A-law by 13 bits (>> 3, offset 4096), as in G.711's tables.
    cdef _In s
    cdef Py_ssize_t i, n
    cdef bytes out
    cdef uint8_t* o
    _in_get(pcm, &s)
    try:
        if s.n & 1:
            raise ValueError("PCM16 data must have an even number of bytes")
        n = s.n >> 1
        out = _new_bytes(n)
        o = <uint8_t*>PyBytes_AS_STRING(out)
        for i in range(n):
            o[i] = table[(_rd16(s.p + 2 * i) >> shift) + offset]
    finally:
        _in_release(&s)
    return out


def ulaw_encode(pcm) -> bytes:
    """PCM16 LE (bytes-like, even length) -> G.711 μ-law, one byte per sample."""
    return _encode_table(pcm, _ULAW_ENC, 2, 8192)


def alaw_encode(pcm) -> bytes:
    """PCM16 LE (bytes-like, even length) -> G.711 A-law, one byte per sample."""
    return _encode_table(pcm, _ALAW_ENC, 3, 4096)


cdef bytes _decode_table(object data, const uint16_t* table):
    cdef _In s
    cdef Py_ssize_t i
    cdef bytes out
    cdef uint8_t* o
    _in_get(data, &s)
    try:
        out = _new_bytes(2 * s.n)
        o = <uint8_t*>PyBytes_AS_STRING(out)
        relay_expand(s.p, s.n, table, o)
    finally:
        _in_release(&s)
    return out


def ulaw_decode(ulaw) -> bytes:
    """G.711 μ-law (bytes-like) -> PCM16 LE."""
    return _decode_table(ulaw, _ULAW_LE)


def alaw_decode(alaw) -> bytes:
    """G.711 A-law (bytes-like) -> PCM16 LE."""
    return _decode_table(alaw, _ALAW_LE)


# ======================================================================================
# base64 (RFC 4648 §4; strict, see codec_ref.b64decode)
# ======================================================================================

cdef Py_ssize_t _b64_size(Py_ssize_t n) noexcept nogil:
    return (n // 4) * 3 + 2


cdef Py_ssize_t _b64_decode(const uint8_t* s, Py_ssize_t n, uint8_t* out) except -1:
    """Decode into out (room for _b64_size(n) bytes); returns the decoded length."""
    cdef Py_ssize_t pad = 0, i = 0, o = 0, full
    cdef int a, b, c, d
    while n > 0 and pad < 2 and s[n - 1] == 61:  # '='
        n -= 1
        pad += 1
    if pad and (n + pad) & 3:
        raise ValueError("invalid base64 padding")
    if (n & 3) == 1:
        raise ValueError("invalid base64 length")
    full = n & ~(<Py_ssize_t>3)
    while i < full:
        a = _B64[s[i]]
        b = _B64[s[i + 1]]
        c = _B64[s[i + 2]]
        d = _B64[s[i + 3]]
        if (a | b | c | d) < 0:
            raise ValueError("invalid base64 character")
        out[o] = <uint8_t>((a << 2) | (b >> 4))
        out[o + 1] = <uint8_t>(((b << 4) | (c >> 2)) & 0xFF)
        out[o + 2] = <uint8_t>(((c << 6) | d) & 0xFF)
        i += 4
        o += 3
    if n - full >= 2:
        a = _B64[s[i]]
        b = _B64[s[i + 1]]
        c = _B64[s[i + 2]] if n - full == 3 else 0
        if (a | b | c) < 0:
            raise ValueError("invalid base64 character")
        out[o] = <uint8_t>((a << 2) | (b >> 4))
        o += 1
        if n - full == 3:
            out[o] = <uint8_t>(((b << 4) | (c >> 2)) & 0xFF)
            o += 1
    return o


cdef object _b64_source(object payload, _In* s):
    """Point s at the ASCII bytes of a str or bytes-like payload.  Returns the object that
    owns those bytes (the caller keeps it alive while s is in use)."""
    cdef object keep
    if PyUnicode_Check(payload):
        if PyUnicode_IS_COMPACT_ASCII(payload):
            s.p = <const uint8_t*>PyUnicode_DATA(payload)
            s.n = PyUnicode_GET_LENGTH(payload)
            s.owned = False
            return payload
        if not (<str>payload).isascii():
            raise ValueError("base64 payload must be ASCII")
        keep = (<str>payload).encode("ascii")
        _in_get(keep, s)
        return keep
    _in_get(payload, s)
    return payload


# Scratch for decoded base64 (and the PcmToUlaw odd-byte prefix).  Module-level buffers
# (this one and the resampler's below) are safe because the GIL is held throughout and,
# while one is live, the only Python API called is PyBytes allocation: bytes objects are
# not GC-tracked, so no collection and no finalizer can run and re-enter this module.
# (The module is not declared free-threading compatible, so 3.13t keeps the GIL on.)
cdef enum:
    _SCRATCH = 16384
cdef uint8_t _scratch[_SCRATCH]


def b64decode(data) -> bytes:
    """Strict RFC 4648 base64 decode (str or bytes-like) -> bytes; ValueError if invalid."""
    cdef _In s
    cdef object keep = None
    cdef bytes out
    cdef Py_ssize_t n
    keep = _b64_source(data, &s)
    try:
        out = _new_bytes(_b64_size(s.n))
        n = _b64_decode(s.p, s.n, <uint8_t*>PyBytes_AS_STRING(out))
    finally:
        _in_release(&s)
    return out[:n]


# ======================================================================================
# Resampler
# ======================================================================================

cdef enum:
    _PIECE = 1024          # input samples per internal step (bounds the scratch below)
    _KMAX = 160            # >= taps per branch of every filter
    _DMAX = 96             # >= group delay of every filter
    _BUFN = _KMAX + _PIECE + _DMAX + 16
    _YN = 3 * _PIECE + _DMAX + 64

cdef float _buf[_BUFN]     # history + new samples (+ flush silence)
cdef float _deint[_BUFN + 8]  # the buffer split into M phases (decimation)
cdef float _y[_YN]         # outputs of one step
cdef float _tmp[_YN]       # outputs of one branch before interleaving
cdef const float* _sp[_KMAX]  # per tap: where its inputs start

cdef enum:
    IN_PCM = 0
    IN_ULAW = 1
    OUT_PCM = 0
    OUT_ULAW = 1

# (in_rate, out_rate) -> (L, M, filter rate)
_PAIRS = {
    (8000, 16000): (2, 1, 16000),
    (16000, 8000): (1, 2, 16000),
    (8000, 24000): (3, 1, 24000),
    (24000, 8000): (1, 3, 24000),
    (16000, 24000): (3, 2, 48000),
    (24000, 16000): (2, 3, 48000),
}
_RATES = (8000, 16000, 24000)

# The filters (bench/filter_design.py; float32, unity DC gain) live in relay/_filters.py,
# one copy shared with relay.media.codec_ref; parsed once at import.
from relay.media._filters import FILTER_HEX as _FILTER_HEX
from relay.media._filters import filter_taps as _filter_taps_py

_TAPS = {rate: _filter_taps_py(rate) for rate in (16000, 24000, 48000)}


def _filter_taps(int rate):
    """The float32 taps of the filter running at `rate` (relay.media._filters)."""
    return _TAPS[rate]


cdef class Resampler:
    """Resampler(in_rate, out_rate): streaming polyphase FIR, delay-compensated.

    Supported: 8000<->16000, 8000<->24000, 16000<->24000 (rational 3/2), equal rates pass
    through.  process(pcm) -> bytes, flush() -> bytes (then reset), reset(), delay_ms.
    Output is identical however the input is chunked; see relay.media.codec_ref.Resampler.
    """

    def __cinit__(self, int in_rate, int out_rate):
        cdef int p, m, n
        self._g = NULL
        self._hist = NULL
        if in_rate == out_rate and in_rate > 0:
            self._pass = True
            self._up = self._down = self._k = 1
            self._d = 0
            self._high = in_rate
        elif (in_rate, out_rate) in _PAIRS:
            self._pass = False
            self._up, self._down, self._high = _PAIRS[(in_rate, out_rate)]
            taps = _filter_taps(self._high)
            n = len(taps)
            self._d = (n - 1) // 2
            self._k = (n + self._up - 1) // self._up
            self._g = <float*>malloc(self._up * self._k * sizeof(float))
            self._hist = <float*>malloc(self._k * sizeof(float))
            if self._g == NULL or self._hist == NULL:
                raise MemoryError()
            for p in range(self._up):
                for m in range(self._k):
                    if p + m * self._up < n:
                        # (float)(double tap * L): the same rounding as codec_ref's _f32
                        self._g[p * self._k + m] = <float>(<double>taps[p + m * self._up]
                                                           * self._up)
                    else:
                        self._g[p * self._k + m] = 0.0
        else:
            raise ValueError(
                f"unsupported resampling {in_rate} -> {out_rate} Hz; supported: 8000<->16000, "
                "8000<->24000, 16000<->24000, or equal rates"
            )
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.reset()

    def __dealloc__(self):
        free(self._g)
        free(self._hist)

    @property
    def delay_ms(self) -> float:
        """Algorithmic delay in ms: the FIR's constant group delay ((taps-1)/2 samples at
        the filter rate), which is exactly the audio held back until flush()."""
        return self._d * 1000.0 / self._high

    def reset(self):
        """Forget all history (barge-in / new stream)."""
        if self._hist != NULL:
            memset(self._hist, 0, self._k * sizeof(float))
        self._n_in = 0
        self._n_out = 0

    cdef long long _available(self, long long n_in):
        cdef long long num = self._up * n_in - self._d
        return (num + self._down - 1) // self._down if num > 0 else 0

    cdef long long _final_count(self, long long n_in):
        return (2 * n_in * self._up + self._down) // (2 * self._down)

    cdef Py_ssize_t _step(self, const uint8_t* src, Py_ssize_t n, int in_kind, bint final,
                          float* y) except -1:
        """Consume n (<= _PIECE) samples; write the outputs now complete to y."""
        cdef int up = self._up, down = self._down, K = self._k, d = self._d
        cdef int K1 = K - 1, j, m, r
        cdef Py_ssize_t i, q, nq, lenbuf, slen, e, e0, nout
        cdef long long n_old = self._n_in, n_in = n_old + n, base, k0, k1, kj, nj, last
        cdef float* s
        cdef const float* g
        memcpy(_buf, self._hist, K1 * sizeof(float))
        if in_kind == IN_PCM:
            relay_pcm16le_to_f32(src, n, _buf + K1)
        else:
            for i in range(n):
                _buf[K1 + i] = _ULAW_F[src[i]]
        lenbuf = K1 + n
        base = n_old - K1  # input sample number of _buf[0]
        k0 = self._n_out
        if final:
            k1 = self._final_count(n_in)
            if k1 > k0:
                last = ((k1 - 1) * down + d) // up
                while lenbuf < last - base + 1:
                    _buf[lenbuf] = 0.0
                    lenbuf += 1
        else:
            k1 = self._available(n_in)
        nout = <Py_ssize_t>(k1 - k0) if k1 > k0 else 0
        if nout > 0:
            if down > 1:
                # split into M phases so every tap reads a contiguous run
                slen = lenbuf // down + 1
                for r in range(down):
                    s = _deint + r * slen
                    i = r
                    while i < lenbuf:
                        s[0] = _buf[i]
                        s += 1
                        i += down
            else:
                slen = 0
            for j in range(up if nout >= up else nout):
                kj = k0 + j
                nq = <Py_ssize_t>((k1 - kj + up - 1) // up)
                nj = kj * down + d
                g = self._g + (nj % up) * K
                e0 = <Py_ssize_t>(nj // up - base)
                for m in range(K):
                    e = e0 - m
                    if down > 1:
                        _sp[m] = _deint + (e % down) * slen + e // down
                    else:
                        _sp[m] = _buf + e
                if up == 1:
                    relay_fir(g, K, _sp, y, nq)
                else:
                    relay_fir(g, K, _sp, _tmp, nq)
                    for q in range(nq):
                        y[j + up * q] = _tmp[q]
        memcpy(self._hist, _buf + (K1 + n) - K1, K1 * sizeof(float))
        self._n_in = n_in
        self._n_out = k1 if k1 > k0 else k0
        return nout

    cdef object _convert(self, const uint8_t* src, Py_ssize_t nsamp, int in_kind, int out_kind):
        """Resample nsamp input samples (PCM16 LE or μ-law) to PCM16 LE or μ-law bytes."""
        cdef Py_ssize_t i, total, done = 0, chunk, nout
        cdef int width = 2 if out_kind == OUT_PCM else 1
        cdef int inw = 2 if in_kind == IN_PCM else 1
        cdef bytes out
        cdef uint8_t* o
        cdef int v
        if self._pass:
            if in_kind == IN_PCM and out_kind == OUT_PCM:
                return PyBytes_FromStringAndSize(<const char*>src, 2 * nsamp)
            out = _new_bytes(width * nsamp)
            o = <uint8_t*>PyBytes_AS_STRING(out)
            if in_kind == IN_PCM:
                for i in range(nsamp):
                    o[i] = _ULAW_ENC[(_rd16(src + 2 * i) >> 2) + 8192]
            elif out_kind == OUT_PCM:
                relay_expand(src, nsamp, _ULAW_LE, o)
            else:
                memcpy(o, src, nsamp)
            return out
        total = <Py_ssize_t>(self._available(self._n_in + nsamp) - self._n_out)
        if total < 0:
            total = 0
        out = _new_bytes(width * total)
        o = <uint8_t*>PyBytes_AS_STRING(out)
        while True:
            chunk = nsamp if nsamp < _PIECE else _PIECE
            nout = self._step(src, chunk, in_kind, False, _y)
            if done + nout > total:  # cannot happen; guards the writes below
                raise AssertionError("resampler output count mismatch")
            if out_kind == OUT_PCM:
                relay_f32_to_pcm16le(_y, nout, o + 2 * done)
            else:
                for i in range(nout):
                    v = relay_round_i16(_y[i])
                    o[done + i] = _ULAW_ENC[(v >> 2) + 8192]
            done += nout
            src += chunk * inw
            nsamp -= chunk
            if nsamp <= 0:
                break
        return out

    cdef object _flush(self, int out_kind):
        cdef Py_ssize_t i, nout
        cdef bytes out
        cdef uint8_t* o
        cdef int v
        if self._pass:
            return b""
        nout = self._step(NULL, 0, IN_PCM, True, _y)
        self.reset()
        if out_kind == OUT_PCM:
            out = _new_bytes(2 * nout)
            o = <uint8_t*>PyBytes_AS_STRING(out)
            relay_f32_to_pcm16le(_y, nout, o)
        else:
            out = _new_bytes(nout)
            o = <uint8_t*>PyBytes_AS_STRING(out)
            for i in range(nout):
                v = relay_round_i16(_y[i])
                o[i] = _ULAW_ENC[(v >> 2) + 8192]
        return out

    def process(self, pcm) -> bytes:
        """Feed PCM16 LE at in_rate (even byte count); return the output now complete."""
        cdef _In s
        _in_get(pcm, &s)
        try:
            if s.n & 1:
                raise ValueError("PCM16 data must have an even number of bytes")
            return self._convert(s.p, s.n >> 1, IN_PCM, OUT_PCM)
        finally:
            _in_release(&s)

    def flush(self) -> bytes:
        """Emit what the filter still holds (future input taken as silence) and reset:
        total output == round_half_up(total_input * out_rate / in_rate)."""
        return self._flush(OUT_PCM)

    def __repr__(self):
        return f"Resampler({self.in_rate}, {self.out_rate})"


cdef int _check_rate(int rate) except -1:
    if rate not in _RATES:
        raise ValueError(f"unsupported rate {rate} Hz; supported: 8000, 16000, 24000")
    return 0


cdef class UlawToPcm:
    """Twilio uplink in one call: base64 μ-law 8 kHz -> PCM16 LE at out_rate."""

    def __cinit__(self, int out_rate):
        _check_rate(out_rate)
        self.out_rate = out_rate
        self._rs = Resampler(8000, out_rate)

    @property
    def delay_ms(self) -> float:
        return self._rs.delay_ms

    def feed(self, ulaw) -> bytes:
        """μ-law bytes-like -> PCM16 LE at out_rate."""
        cdef _In s
        _in_get(ulaw, &s)
        try:
            return self._rs._convert(s.p, s.n, IN_ULAW, OUT_PCM)
        finally:
            _in_release(&s)

    def feed_b64(self, payload) -> bytes:
        """Twilio media payload (base64 μ-law, str or bytes) -> PCM16 LE at out_rate."""
        cdef _In s
        cdef object keep = None
        cdef uint8_t* dst = _scratch
        cdef Py_ssize_t n
        keep = _b64_source(payload, &s)
        try:
            if _b64_size(s.n) > _SCRATCH:
                dst = <uint8_t*>malloc(_b64_size(s.n))
                if dst == NULL:
                    raise MemoryError()
            n = _b64_decode(s.p, s.n, dst)
            return self._rs._convert(dst, n, IN_ULAW, OUT_PCM)
        finally:
            _in_release(&s)
            if dst != _scratch:
                free(dst)

    def feed_b64_many(self, list payloads not None) -> bytes:
        """The payloads of one read -> their PCM16 in one piece, as ``b"".join(feed_b64(p)
        for p in payloads)``: all decoded first, then resampled in one pass.  A payload
        that is not valid base64 raises ValueError and nothing is fed."""
        # a tuple: what pass 1 sized is what pass 2 decodes
        cdef tuple items = tuple(payloads)
        cdef Py_ssize_t k, count = len(items), cap = 0, n = 0, size
        cdef _In s
        cdef object keep
        cdef uint8_t* dst = _scratch
        for k in range(count):
            keep = _b64_source(items[k], &s)
            cap += _b64_size(s.n)
            _in_release(&s)
        if cap > _SCRATCH:
            dst = <uint8_t*>malloc(cap)
            if dst == NULL:
                raise MemoryError()
        try:
            for k in range(count):
                keep = _b64_source(items[k], &s)
                try:
                    size = _b64_size(s.n)
                    if n + size > cap:  # a bytes-like that grew in between
                        raise ValueError("payload changed while it was decoded")
                    n += _b64_decode(s.p, s.n, dst + n)
                finally:
                    _in_release(&s)
            return self._rs._convert(dst, n, IN_ULAW, OUT_PCM)
        finally:
            if dst != _scratch:
                free(dst)

    def flush(self) -> bytes:
        return self._rs._flush(OUT_PCM)

    def reset(self):
        self._rs.reset()


cdef class PcmToUlaw:
    """Twilio downlink in one call: PCM16 LE at in_rate -> μ-law 8 kHz.

    An odd trailing byte is kept for the next call; flush() drops a pending odd byte."""

    def __cinit__(self, int in_rate):
        _check_rate(in_rate)
        self.in_rate = in_rate
        self._rs = Resampler(in_rate, 8000)
        self._carry = -1

    @property
    def delay_ms(self) -> float:
        return self._rs.delay_ms

    cdef object _feed_ptr(self, const uint8_t* p, Py_ssize_t n):
        # p must not point into _scratch[1:] unless it starts at _scratch + 1
        cdef uint8_t* tmp = NULL
        cdef object out
        if self._carry >= 0:
            if p != _scratch + 1:
                if n + 1 > _SCRATCH:
                    tmp = <uint8_t*>malloc(n + 1)
                    if tmp == NULL:
                        raise MemoryError()
                    memcpy(tmp + 1, p, n)
                    p = tmp
                else:
                    memcpy(_scratch + 1, p, n)
                    p = _scratch
            else:
                p = _scratch
            (<uint8_t*>p)[0] = <uint8_t>self._carry
            n += 1
        try:
            self._carry = p[n - 1] if n & 1 else -1
            out = self._rs._convert(p, n >> 1, IN_PCM, OUT_ULAW)
        finally:
            free(tmp)
        return out

    def feed(self, pcm) -> bytes:
        """PCM16 LE bytes-like at in_rate (any byte count) -> μ-law 8 kHz."""
        cdef _In s
        _in_get(pcm, &s)
        try:
            return self._feed_ptr(s.p, s.n)
        finally:
            _in_release(&s)

    def feed_b64(self, b64) -> bytes:
        """base64 PCM16 LE at in_rate (str or bytes) -> μ-law 8 kHz."""
        cdef _In s
        cdef object keep = None
        cdef uint8_t* dst = _scratch + 1  # room for the odd byte in front
        cdef uint8_t* block = NULL
        cdef Py_ssize_t n
        keep = _b64_source(b64, &s)
        try:
            if _b64_size(s.n) + 1 > _SCRATCH:
                block = <uint8_t*>malloc(_b64_size(s.n) + 1)
                if block == NULL:
                    raise MemoryError()
                dst = block + 1
            n = _b64_decode(s.p, s.n, dst)
            if block != NULL and self._carry >= 0:
                block[0] = <uint8_t>self._carry
                self._carry = -1
                return self._feed_ptr(block, n + 1)
            return self._feed_ptr(dst, n)
        finally:
            _in_release(&s)
            free(block)

    def flush(self) -> bytes:
        self._carry = -1
        return self._rs._flush(OUT_ULAW)

    def reset(self):
        self._carry = -1
        self._rs.reset()


# ======================================================================================
# Uplink jitter buffer (semantics: relay.media.codec_ref.UplinkJitterBuffer)
# ======================================================================================

cdef long long _MOD32 = 4294967296
cdef long long _HALF32 = 2147483648
cdef int _RECENT = 64


cdef class UplinkJitterBuffer:
    """Orders Twilio media frames by timestamp (RFC 1982 serial arithmetic, mod 2**32) and
    fills gaps with silence items (payload None).  See relay.media.codec_ref for the rules."""

    def __init__(self, int frame_ms=20, int reorder_ms=0, int max_fill_ms=2000,
                 int max_held=50):
        if frame_ms <= 0 or reorder_ms < 0 or max_fill_ms < 0 or max_held < 1:
            raise ValueError("frame_ms > 0, reorder_ms >= 0, max_fill_ms >= 0, max_held >= 1")
        self.frame_ms = frame_ms
        self.reorder_ms = reorder_ms
        self.max_fill_ms = max_fill_ms
        self.max_held = max_held
        self.gaps_filled = 0
        self.silence_ms = 0
        self.skipped_ms = 0
        self.duplicates = 0
        self.late_drops = 0
        self.overflow_drops = 0
        self.frames_out = 0
        self.reset()

    def reset(self):
        """Forget the stream (the next push sets a new base); counters are kept."""
        self._started = False
        self._next = 0
        self._held = {}
        self._order = []
        self._held_ms = 0
        self._recent = deque(maxlen=_RECENT)

    @property
    def held(self) -> int:
        return len(self._order)

    @property
    def held_ms(self) -> int:
        return self._held_ms

    def push(self, timestamp_ms, payload, duration_ms=None) -> list:
        cdef long long ts = int(timestamp_ms) % _MOD32
        cdef long long dur = self.frame_ms if duration_ms is None else int(duration_ms)
        if dur <= 0:
            raise ValueError("duration_ms must be > 0")
        return self._push(ts, payload, dur)

    cdef list _push(self, long long ts, object payload, long long dur):
        # ts already reduced mod 2**32, dur > 0 (push checks; twilio_uplink passes 20 ms)
        cdef long long ext
        cdef list out = []
        if not self._started:
            self._started = True
            self._next = ts
        # RFC 1982 serial distance, in [-2**31, 2**31); C % is not floor-mod, hence & mask
        ext = self._next + ((ts - self._next + _HALF32) & (_MOD32 - 1)) - _HALF32
        if ext < self._next:
            if ext in self._recent:
                self.duplicates += 1
            else:
                self.late_drops += 1
            return out
        if ext in self._held:
            self.duplicates += 1
            return out
        if ext == self._next:
            self._release(out, ext, ts, payload, dur)
            self._drain(out)
            return out
        if self.reorder_ms == 0:
            self._fill(out, ext)
            self._release(out, ext, ts, payload, dur)
            return out
        self._held[ext] = (ts, payload, dur)
        self._insort(ext)
        self._held_ms += dur
        while self._order and (self._held_ms > self.reorder_ms
                               or len(self._order) > self.max_held):
            if self._held_ms <= self.reorder_ms:
                self.overflow_drops += 1
            self._fill(out, self._order[0])
            self._drain(out)
        return out

    def flush(self) -> list:
        """Release everything held, filling the gaps between held frames."""
        cdef list out = []
        while self._order:
            self._fill(out, self._order[0])
            self._drain(out)
        return out

    cdef void _insort(self, long long ext):
        cdef Py_ssize_t i = len(self._order)
        while i and <long long>self._order[i - 1] > ext:
            i -= 1
        self._order.insert(i, ext)

    cdef void _release(self, list out, long long ext, long long ts, object payload,
                       long long dur):
        out.append((ts, payload, dur))
        self.frames_out += 1
        self._recent.append(ext)
        self._next = ext + dur

    cdef void _fill(self, list out, long long ext):
        cdef long long gap = ext - self._next, fill
        if gap <= 0:
            return
        fill = gap if gap < self.max_fill_ms else self.max_fill_ms
        if fill:
            out.append((self._next & (_MOD32 - 1), None, fill))
            self.gaps_filled += 1
            self.silence_ms += fill
        self.skipped_ms += gap - fill
        self._next = ext

    cdef void _drain(self, list out):
        cdef long long ext
        while self._order and <long long>self._order[0] <= self._next:
            ext = self._order.pop(0)
            ts, payload, dur = self._held.pop(ext)
            self._held_ms -= dur
            if ext == self._next:
                self._release(out, ext, ts, payload, dur)
            else:
                self.late_drops += 1


# ======================================================================================
# Downlink buffer (semantics: relay.media.codec_ref.DownlinkBuffer)
# ======================================================================================

cdef enum:
    _BYTES_PER_MS = 8
    _MAX_RESPONSES = 256


cdef class _Resp:
    pass


DEF UNDERRUN_MARGIN_MS = 20.0
DEF PARTIAL_HOLD_MS = 10.0


cdef class DownlinkBuffer:
    """Paces agent μ-law 8 kHz audio to Twilio under a bounded lead, tags frames with marks
    and tracks what the caller heard.  See relay.media.codec_ref.DownlinkBuffer for the rules."""

    def __init__(self, int frame_ms=100, int max_lead_ms=200, long long max_buffer_ms=600_000,
                 int slack_ms=0):
        if frame_ms <= 0 or max_lead_ms < 0 or max_buffer_ms <= 0:
            raise ValueError("frame_ms > 0, max_lead_ms >= 0, max_buffer_ms > 0")
        if not 0 <= slack_ms < frame_ms:
            raise ValueError("0 <= slack_ms < frame_ms")
        self.frame_ms = frame_ms
        self.slack_ms = slack_ms
        self.max_lead_ms = max_lead_ms
        self.max_buffer_ms = max_buffer_ms
        self._frame_bytes = frame_ms * _BYTES_PER_MS
        self._max_bytes = max_buffer_ms * _BYTES_PER_MS
        self._queue = deque()
        self._queued = 0
        self._partial = bytearray()
        self._partial_rid = None
        self._partial_timed = False
        self._resp = {}
        self._dropped = {}
        self._marks = {}
        self._play_end = -INFINITY
        self._last_echo = -INFINITY
        self._counter = 0
        self.frames_out = 0
        self.overflow_bytes = 0
        self.ignored_marks = 0

    @property
    def pending_marks(self) -> int:
        return len(self._marks)

    @property
    def buffered_ms(self) -> int:
        return (self._queued + len(self._partial)) // _BYTES_PER_MS

    @property
    def idle(self) -> bool:
        return not self._queue and not self._partial and not self._marks

    @property
    def overflow_ms(self) -> int:
        return self.overflow_bytes // _BYTES_PER_MS

    cdef _Resp _state(self, object rid):
        cdef _Resp r = self._resp.get(rid)
        if r is None:
            r = _Resp()
            r.offset = 0
            r.heard_base = 0.0
            self._resp[rid] = r
            if len(self._resp) > _MAX_RESPONSES:
                del self._resp[next(iter(self._resp))]
        return r

    def push(self, ulaw, response_id) -> None:
        cdef _In s
        cdef _Resp r
        cdef long long room, take, fb = self._frame_bytes
        cdef bytes frame
        if response_id in self._dropped:
            return
        _in_get(ulaw, &s)
        try:
            if s.n == 0:
                return
            if self._partial and self._partial_rid != response_id:
                self._close_partial()
            r = self._state(response_id)
            room = self._max_bytes - self._queued - len(self._partial)
            take = s.n if s.n < room else (room if room > 0 else 0)
            self.overflow_bytes += s.n - take
            if not take:
                return
            self._partial_rid = response_id
            self._partial.extend((<const char*>s.p)[:take])
        finally:
            _in_release(&s)
        while len(self._partial) >= fb:
            frame = bytes(self._partial[:fb])
            del self._partial[:fb]
            r.offset += fb
            self._queue.append((frame, response_id, r.offset))
            self._queued += fb
        if self._partial and len(self._partial) >= fb - self.slack_ms * _BYTES_PER_MS:
            self._close_partial()  # full but for a resampler's hold-back: see the reference
        if not self._partial:
            self._partial_rid = None
            self._partial_timed = False

    cdef void _close_partial(self):
        cdef _Resp r
        if self._partial and self._partial_rid is not None:
            r = self._state(self._partial_rid)
            r.offset += len(self._partial)
            self._queue.append((bytes(self._partial), self._partial_rid, r.offset))
            self._queued += len(self._partial)
        self._partial = bytearray()
        self._partial_rid = None
        self._partial_timed = False

    def end_response(self, response_id) -> None:
        if self._partial_rid == response_id:
            self._close_partial()

    def drop_response(self, response_id) -> None:
        cdef _Resp r
        self._dropped[response_id] = None
        if len(self._dropped) > _MAX_RESPONSES:
            del self._dropped[next(iter(self._dropped))]
        if self._partial_rid == response_id:
            r = self._state(response_id)
            r.offset += len(self._partial)
            self._partial = bytearray()
            self._partial_rid = None
            self._partial_timed = False
        if any(item[1] == response_id for item in self._queue):
            keep = [item for item in self._queue if item[1] != response_id]
            self._queue = deque(keep)
            self._queued = sum(len(item[0]) for item in keep)

    def pull(self, double now_ms) -> list:
        cdef list out = []
        cdef bytes frame
        cdef long long n, end
        cdef double start
        if not self._queue and self._partial:
            # see relay.media.codec_ref.DownlinkBuffer.pull: partial frames wait briefly at most
            if not self._partial_timed:
                self._partial_timed = True
                self._partial_since = now_ms
            if (self._play_end - now_ms <= UNDERRUN_MARGIN_MS
                    or now_ms - self._partial_since >= PARTIAL_HOLD_MS):
                self._close_partial()
        while self._queue and self._play_end - now_ms <= self.max_lead_ms:
            frame, rid, end = self._queue.popleft()
            n = len(frame)
            self._queued -= n
            start = self._play_end if self._play_end > now_ms else now_ms
            self._play_end = start + n / <double>_BYTES_PER_MS
            self._counter += 1
            name = str(self._counter)
            self._marks[name] = (rid, end - n, end, now_ms)
            self.frames_out += 1
            out.append((frame, name, rid))
        if not self._queue and self._partial and not self._partial_timed:
            self._partial_timed = True
            self._partial_since = now_ms
        return out

    def next_due(self, double now_ms):
        cdef double due
        if not self._queue:
            if not self._partial:
                return None
            due = self._play_end - UNDERRUN_MARGIN_MS
            since = self._partial_since if self._partial_timed else now_ms
            if since + PARTIAL_HOLD_MS < due:
                due = since + PARTIAL_HOLD_MS
            return due if due > now_ms else now_ms
        due = self._play_end - self.max_lead_ms
        return due if due > now_ms else now_ms

    cdef tuple _head_heard(self, double now_ms):
        cdef long long start, end
        cdef double sent, anchor, elapsed, pos, end_ms
        if not self._marks:
            return None
        rid, start, end, sent = next(iter(self._marks.values()))
        anchor = sent if sent > self._last_echo else self._last_echo
        elapsed = now_ms - anchor
        if elapsed < 0:
            elapsed = 0.0
        pos = start / <double>_BYTES_PER_MS + elapsed
        end_ms = end / <double>_BYTES_PER_MS
        return rid, (pos if pos < end_ms else end_ms)

    cdef double _heard(self, object rid, double now_ms):
        cdef _Resp r = self._resp.get(rid)
        cdef double heard = r.heard_base if r is not None else 0.0
        cdef tuple head = self._head_heard(now_ms)
        if head is not None and head[0] == rid and <double>head[1] > heard:
            heard = head[1]
        return heard

    def heard_ms(self, response_id, double now_ms) -> int:
        return <long long>self._heard(response_id, now_ms)

    cdef object _echo(self, object name, double now_ms):
        """One echo's bookkeeping; the response it ended in, or None (not ours)."""
        cdef _Resp r
        cdef long long end
        if name not in self._marks:
            self.ignored_marks += 1
            return None
        while True:
            key = next(iter(self._marks))
            rid, _start, end, _sent = self._marks.pop(key)
            r = self._state(rid)
            if end / <double>_BYTES_PER_MS > r.heard_base:
                r.heard_base = end / <double>_BYTES_PER_MS
            if key == name:
                break
        self._last_echo = now_ms
        return rid

    def on_mark(self, name, double now_ms):
        rid = self._echo(name, now_ms)
        if rid is None:
            return None
        return rid, <long long>self._heard(rid, now_ms)

    def echoes(self, names, double now_ms) -> None:
        for name in names:
            self._echo(name, now_ms)

    def clear(self, double now_ms):
        cdef double heard = 0.0, dropped
        cdef long long start, end
        cdef tuple head
        rid = None
        if self._marks:
            rid = next(iter(self._marks.values()))[0]
        elif self._queue:
            rid = self._queue[0][1]
        elif self._partial_rid is not None:
            rid = self._partial_rid
        if rid is not None:
            heard = self._heard(rid, now_ms)
        dropped = (self._queued + len(self._partial)) / <double>_BYTES_PER_MS
        if self._marks:
            for item in self._marks.values():
                start = item[1]
                end = item[2]
                dropped += (end - start) / <double>_BYTES_PER_MS
            head = self._head_heard(now_ms)
            if head is not None:
                start = next(iter(self._marks.values()))[1]
                dropped -= <double>head[1] - start / <double>_BYTES_PER_MS
        cdef _Resp r
        if rid is not None:
            r = self._state(rid)
            r.heard_base = heard
        if self._partial_rid is not None:
            r = self._state(self._partial_rid)
            r.offset += len(self._partial)
        self._queue.clear()
        self._queued = 0
        self._partial = bytearray()
        self._partial_rid = None
        self._partial_timed = False
        self._marks.clear()
        self._play_end = -INFINITY
        return rid, <long long>heard, <long long>dropped


# ---------------------------------------------------------------------------------------
# WebSocket masking (RFC 6455 §5.3): every client->server frame is XORed with a 4-byte key.
# Twilio's frames to us and ours to the agent are masked, ~100 per call-second; a C loop
# 8 bytes at a time instead of a big-integer XOR in Python.
def ws_mask(data, key) -> bytes:
    cdef Py_buffer dv, kv
    PyObject_GetBuffer(data, &dv, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(key, &kv, PyBUF_SIMPLE)
        try:
            if kv.len != 4:
                raise ValueError("WebSocket masking key must be 4 bytes")
            return _ws_mask(<const uint8_t *>dv.buf, dv.len, <const uint8_t *>kv.buf)
        finally:
            PyBuffer_Release(&kv)
    finally:
        PyBuffer_Release(&dv)


cdef bytes _ws_mask(const uint8_t *src, Py_ssize_t n, const uint8_t *key):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    _xor4(<uint8_t *>PyBytes_AS_STRING(out), src, n, key)
    return out


cdef void _xor4(uint8_t *dst, const uint8_t *src, Py_ssize_t n,
                const uint8_t *key) noexcept nogil:
    # dst[i] = src[i] ^ key[i % 4] for i < n (dst may be src)
    cdef uint8_t k8[8]
    cdef unsigned long long kw, w
    cdef Py_ssize_t i = 0
    cdef int j
    for j in range(8):
        k8[j] = key[j & 3]
    memcpy(&kw, k8, 8)
    while i + 8 <= n:
        memcpy(&w, src + i, 8)
        w ^= kw
        memcpy(dst + i, &w, 8)
        i += 8
    while i < n:
        dst[i] = src[i] ^ key[i & 3]
        i += 1


# ======================================================================================
# Twilio -> relay WebSocket fast path (semantics: relay.media.codec_ref.TwilioFrameParser)
# ======================================================================================
# RFC 6455 frames exactly as relay.media.websocket.FrameParser(expect_masked=True) reads
# them, plus a strict scanner that turns the two hot Twilio messages (media, mark for this
# stream) into tuples without building a str, a dict and a dataclass per message.  Anything
# the scanner does not fully understand stays a str for TwilioStream.parse to decide.

cdef enum:
    _MAX_MEMBERS = 16   # members per JSON object the scanner accepts (more: fall back)
    _MAX_DIGITS = 15    # media.timestamp / media.chunk: 1..15 ASCII digits


cdef struct _Scan:
    const uint8_t *s
    Py_ssize_t n
    # offset and length of each string value read; offset -1 while absent
    Py_ssize_t event, event_n, sid, sid_n
    Py_ssize_t payload, payload_n, ts, ts_n, chunk, chunk_n, name, name_n
    bint media_obj, mark_obj


cdef uint8_t _JSTR[256]  # byte in a scanned string: 0 plain, 1 closing quote, 2 outside
for _c in range(256):
    _JSTR[_c] = 1 if _c == 0x22 else 2 if _c < 0x20 or _c > 0x7E or _c == 0x5C else 0


cdef inline bint _is_ws(uint8_t c) noexcept nogil:
    return c == 0x20 or c == 0x09 or c == 0x0A or c == 0x0D


cdef inline Py_ssize_t _skip_ws(const uint8_t *s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    while i < n and _is_ws(s[i]):
        i += 1
    return i


cdef extern from *:
    """
    /* How many leading bytes of s[0:n], in whole 16-byte blocks, may stand unescaped in a
       JSON string the Twilio scanner reads: 0x20..0x7E except '"' and '\\'.  The payload
       (most of a media message) goes 16 bytes per step; the caller finishes bytewise. */
    static Py_ssize_t relay_json_plain16(const unsigned char *s, Py_ssize_t n)
    {
        Py_ssize_t i = 0;
    #if defined(__GNUC__) || defined(__clang__)
        typedef signed char v16 __attribute__((vector_size(16)));
        typedef signed char v16u __attribute__((vector_size(16), aligned(1)));
        typedef long long v2 __attribute__((vector_size(16)));
        for (; i + 16 <= n; i += 16) {
            v16 c = *(const v16u *)(s + i);
            /* signed: bytes 0x80..0xFF are negative, so "< 0x20" catches them too */
            v2 m = (v2)((c < 0x20) | (c == 0x7F) | (c == 0x22) | (c == 0x5C));
            if (m[0] | m[1])
                break;
        }
    #endif
        return i;
    }
    """
    Py_ssize_t relay_json_plain16(const uint8_t *s, Py_ssize_t n) noexcept nogil


cdef inline Py_ssize_t _str_end(const uint8_t *s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    # i is just after an opening quote: the index of the closing quote, or -1 when the
    # string holds anything but printable ASCII without backslashes (0x20..0x7E).
    cdef uint8_t c
    i += relay_json_plain16(s + i, n - i)
    while i < n:
        c = _JSTR[s[i]]
        if c:
            return i if c == 1 else -1
        i += 1
    return -1


cdef inline bint _key_is(const uint8_t *s, Py_ssize_t k, Py_ssize_t kn,
                         const char *name, Py_ssize_t nn) noexcept nogil:
    return kn == nn and s[k] == <uint8_t>name[0] and memcmp(s + k, name, nn) == 0


cdef Py_ssize_t _scan_obj(_Scan *st, Py_ssize_t i, int kind) noexcept nogil:
    # i is just after '{'.  kind 0: the message; 1: its "media" object; 2: its "mark"
    # object.  Returns the index after the matching '}', or -1 outside the subset.
    cdef const uint8_t *s = st.s
    cdef Py_ssize_t n = st.n
    cdef Py_ssize_t keys[_MAX_MEMBERS]
    cdef Py_ssize_t lens[_MAX_MEMBERS]
    cdef Py_ssize_t k, kn, v, vn
    cdef int m = 0, j
    i = _skip_ws(s, i, n)
    if i < n and s[i] == 0x7D:  # '}'
        return i + 1
    while True:
        if i >= n or s[i] != 0x22:
            return -1
        k = i + 1
        i = _str_end(s, k, n)
        if i < 0:
            return -1
        kn = i - k
        if m == _MAX_MEMBERS:
            return -1
        for j in range(m):
            if (lens[j] == kn and (kn == 0 or s[keys[j]] == s[k])
                    and memcmp(s + keys[j], s + k, kn) == 0):
                return -1  # duplicate key (orjson would keep the last one)
        keys[m] = k
        lens[m] = kn
        m += 1
        i = _skip_ws(s, i + 1, n)
        if i >= n or s[i] != 0x3A:  # ':'
            return -1
        i = _skip_ws(s, i + 1, n)
        if i >= n:
            return -1
        if s[i] == 0x22:
            v = i + 1
            i = _str_end(s, v, n)
            if i < 0:
                return -1
            vn = i - v
            i += 1
            if kind == 0:
                if _key_is(s, k, kn, "event", 5):
                    st.event = v
                    st.event_n = vn
                elif _key_is(s, k, kn, "streamSid", 9):
                    st.sid = v
                    st.sid_n = vn
            elif kind == 1:
                if _key_is(s, k, kn, "payload", 7):
                    st.payload = v
                    st.payload_n = vn
                elif _key_is(s, k, kn, "timestamp", 9):
                    st.ts = v
                    st.ts_n = vn
                elif _key_is(s, k, kn, "chunk", 5):
                    st.chunk = v
                    st.chunk_n = vn
            elif _key_is(s, k, kn, "name", 4):
                st.name = v
                st.name_n = vn
        elif s[i] == 0x7B and kind == 0 and _key_is(s, k, kn, "media", 5):
            st.media_obj = True
            i = _scan_obj(st, i + 1, 1)
            if i < 0:
                return -1
        elif s[i] == 0x7B and kind == 0 and _key_is(s, k, kn, "mark", 4):
            st.mark_obj = True
            i = _scan_obj(st, i + 1, 2)
            if i < 0:
                return -1
        else:
            return -1  # number, literal, array, or an object where none is read
        i = _skip_ws(s, i, n)
        if i >= n:
            return -1
        if s[i] == 0x2C:  # ','
            i = _skip_ws(s, i + 1, n)
        elif s[i] == 0x7D:
            return i + 1
        else:
            return -1


cdef inline long long _digits(const uint8_t *s, Py_ssize_t n) noexcept nogil:
    # 1..15 ASCII digits -> value; -1 otherwise
    cdef long long v = 0
    cdef Py_ssize_t i
    if n < 1 or n > _MAX_DIGITS:
        return -1
    for i in range(n):
        if s[i] < 0x30 or s[i] > 0x39:
            return -1
        v = v * 10 + (s[i] - 0x30)
    return v


cdef inline str _ascii(const uint8_t *s, Py_ssize_t n):
    cdef object out = PyUnicode_New(n, 127)
    memcpy(PyUnicode_DATA(out), s, n)
    return <str>out


cdef object _scan_twilio(const uint8_t *s, Py_ssize_t n, const uint8_t *sid, Py_ssize_t sid_n):
    # (timestamp, payload) for a media message of this stream, (name,) for a mark, None for
    # anything else (then TwilioStream.parse decides).
    cdef _Scan st
    cdef Py_ssize_t i
    cdef long long ts
    if sid_n == 0:
        return None
    st.s = s
    st.n = n
    st.event = st.sid = st.payload = st.ts = st.chunk = st.name = -1
    st.event_n = st.sid_n = st.payload_n = st.ts_n = st.chunk_n = st.name_n = 0
    st.media_obj = st.mark_obj = False
    i = _skip_ws(s, 0, n)
    if i >= n or s[i] != 0x7B:
        return None
    i = _scan_obj(&st, i + 1, 0)
    if i < 0 or _skip_ws(s, i, n) != n:
        return None
    if st.event < 0 or st.sid < 0 or st.sid_n != sid_n or memcmp(s + st.sid, sid, sid_n) != 0:
        return None
    if _key_is(s, st.event, st.event_n, "media", 5):
        if not st.media_obj or st.payload < 0 or st.ts < 0:
            return None
        ts = _digits(s + st.ts, st.ts_n)
        if ts < 0 or (st.chunk >= 0 and _digits(s + st.chunk, st.chunk_n) < 0):
            return None
        return (ts, _ascii(s + st.payload, st.payload_n))
    if _key_is(s, st.event, st.event_n, "mark", 4):
        if not st.mark_obj or st.name < 0:
            return None
        return (_ascii(s + st.name, st.name_n),)
    return None


cdef uint8_t *_reserve(uint8_t **buf, Py_ssize_t *cap, Py_ssize_t need) except NULL:
    # grow a heap buffer to at least `need` bytes (contents kept); returns it
    cdef Py_ssize_t size
    cdef uint8_t *p
    if need > cap[0] or buf[0] == NULL:
        size = max(need, 2 * cap[0], 512)
        p = <uint8_t *>realloc(buf[0], size)
        if p == NULL:
            raise MemoryError()
        buf[0] = p
        cap[0] = size
    return buf[0]


cdef class _FrameReader:
    """RFC 6455 frames -> messages, exactly as relay.media.websocket.FrameParser reads them
    (masked client frames when ``masked``, unmasked server frames otherwise), except that
    violations are ``violation(message, code)`` and control frames ``control(opcode,
    payload)``.  Subclasses turn hot text messages into tuples by overriding ``_text``."""

    @classmethod
    def __class_getitem__(cls, item):
        return GenericAlias(cls, item)  # generic in the stub (over control's return type)

    def __cinit__(self, *args, **kwargs):
        self._buf = b""
        self._fbuf = NULL
        self._tmp = NULL
        self._fcap = 0
        self._tcap = 0

    def __dealloc__(self):
        free(self._fbuf)
        free(self._tmp)

    cdef void _setup(self, bint masked, long long max_message, object control,
                     object violation):
        # what every __init__ sets: the frame rules and an empty state
        self._masked = masked
        self.max_message = max_message
        self._control = control
        self._violation = violation
        self._buf = b""
        self._in_frag = False
        self._frag_op = 0
        self._frag_len = 0
        self._fn = 0

    cdef int _fail(self, str message, int code) except -1:
        raise self._violation(message, code)

    cdef object _text(self, const uint8_t *p, Py_ssize_t n):
        try:
            return PyUnicode_DecodeUTF8(<const char *>p, n, NULL)
        except UnicodeDecodeError:
            raise self._violation("text frame is not valid UTF-8", 1007) from None

    def feed(self, data) -> list:
        cdef list out = []
        cdef object buf
        cdef bytes tail
        cdef _In src
        cdef const uint8_t *p
        cdef const uint8_t *key
        cdef const uint8_t *pay
        cdef uint8_t *dst
        cdef Py_ssize_t pos = 0, end, hdr, n, total
        cdef unsigned long long ln
        cdef long long max_message = self.max_message
        cdef int b0, b1, opcode, j
        cdef bint fin
        cdef bint masked = self._masked
        if PyBytes_GET_SIZE(self._buf):
            buf = self._buf + data
        else:
            buf = data
        _in_get(buf, &src)
        try:
            p = src.p
            end = src.n
            while end - pos >= 2:
                b0 = p[pos]
                b1 = p[pos + 1]
                if b0 & 0x70:
                    self._fail("RSV bits set without a negotiated extension", 1002)
                if masked and not (b1 & 0x80):
                    self._fail("unmasked client frame", 1002)
                if not masked and (b1 & 0x80):
                    self._fail("masked server frame", 1002)
                ln = b1 & 0x7F
                hdr = 2
                if ln == 126:
                    if end - pos < 4:
                        break
                    ln = (<unsigned long long>p[pos + 2] << 8) | p[pos + 3]
                    hdr = 4
                elif ln == 127:
                    if end - pos < 10:
                        break
                    ln = 0
                    for j in range(8):
                        ln = (ln << 8) | p[pos + 2 + j]
                    hdr = 10
                opcode = b0 & 0x0F
                if max_message < 0 or ln > <unsigned long long>max_message:
                    self._fail(f"frame of {ln} bytes exceeds {max_message}", 1009)
                n = <Py_ssize_t>ln
                if masked:
                    hdr += 4
                if end - pos - hdr < n:  # (no hdr + n: it could overflow for a huge limit)
                    break
                key = p + pos + hdr - 4 if masked else NULL
                pay = p + pos + hdr
                pos += hdr + n
                fin = (b0 & 0x80) != 0
                if opcode >= 0x8:
                    if opcode != 0x8 and opcode != 0x9 and opcode != 0xA:
                        self._fail(f"unknown control opcode {opcode:#x}", 1002)
                    if not fin or n > 125:
                        self._fail("fragmented or oversized control frame", 1002)
                    out.append(self._control(opcode, _payload(pay, n, key)))
                    continue
                if opcode == 0x0:
                    if not self._in_frag:
                        self._fail("continuation frame without a message to continue", 1002)
                    self._frag_len += n
                    if self._frag_len > max_message:
                        self._fail("fragmented message too big", 1009)
                    dst = _reserve(&self._fbuf, &self._fcap, self._fn + n)
                    _unmask_into(dst + self._fn, pay, n, key)
                    self._fn += n
                    if not fin:
                        continue
                    total = self._fn
                    opcode = self._frag_op
                    self._in_frag = False
                    self._frag_len = 0
                    self._fn = 0
                    if opcode == 0x1:
                        out.append(self._text(self._fbuf, total))
                    else:
                        out.append(PyBytes_FromStringAndSize(<char *>self._fbuf, total))
                    continue
                if opcode == 0x1 or opcode == 0x2:
                    if self._in_frag:
                        self._fail("new data frame inside a fragmented message", 1002)
                    if not fin:
                        dst = _reserve(&self._fbuf, &self._fcap, n)
                        _unmask_into(dst, pay, n, key)
                        self._in_frag = True
                        self._frag_op = opcode
                        self._frag_len = n
                        self._fn = n
                        continue
                else:
                    self._fail(f"unknown data opcode {opcode:#x}", 1002)
                if opcode == 0x1:
                    if key == NULL:  # unmasked: read in place
                        out.append(self._text(pay, n))
                    else:
                        dst = _reserve(&self._tmp, &self._tcap, n)
                        _xor4(dst, pay, n, key)
                        out.append(self._text(dst, n))
                else:
                    out.append(_payload(pay, n, key))
            if pos == 0 and PyBytes_CheckExact(buf):
                tail = <bytes>buf
            elif pos < end:
                tail = PyBytes_FromStringAndSize(<const char *>p + pos, end - pos)
            else:
                tail = b""
        finally:
            _in_release(&src)
        self._buf = tail
        if PyBytes_GET_SIZE(tail) - 14 > max_message:
            self._fail("frame header announces too much data", 1009)
        return out


cdef inline bytes _payload(const uint8_t *pay, Py_ssize_t n, const uint8_t *key):
    if key == NULL:
        return PyBytes_FromStringAndSize(<const char *>pay, n)
    return _ws_mask(pay, n, key)


cdef inline void _unmask_into(uint8_t *dst, const uint8_t *pay, Py_ssize_t n,
                              const uint8_t *key) noexcept nogil:
    if key == NULL:
        memcpy(dst, pay, n)
    else:
        _xor4(dst, pay, n, key)


cdef class TwilioFrameParser(_FrameReader):
    """Frames from Twilio (masked, RFC 6455) -> messages, media/mark already parsed.

    ``feed(data)`` behaves exactly like ``FrameParser(expect_masked=True,
    max_message=max_message).feed(data)`` (same buffering, limits, order of checks and
    messages), except that violations are ``violation(message, code)``, control frames are
    ``control(opcode, payload)``, and a text message that is certainly a ``media`` (``mark``)
    message of ``stream_sid`` comes out as ``(timestamp, payload)`` (``(name,)``) instead of
    its str.  See relay.media.codec_ref.TwilioFrameParser for the exact subset recognised."""

    def __cinit__(self, *args, **kwargs):
        self._sid = b""  # also when __init__ is skipped: no fast path, no NULL deref

    def __init__(self, str stream_sid not None, *, long long max_message=65536,
                 control, violation):
        self._setup(True, max_message, control, violation)
        self.stream_sid = stream_sid
        self._sid = stream_sid.encode("utf-8", "surrogatepass")

    cdef object _text(self, const uint8_t *p, Py_ssize_t n):
        cdef object msg = _scan_twilio(p, n, <const uint8_t *>PyBytes_AS_STRING(self._sid),
                                       PyBytes_GET_SIZE(self._sid))
        if msg is not None:
            return msg
        return _FrameReader._text(self, p, n)


cdef class ServerFrameParser(_FrameReader):
    """Frames from a server (unmasked, RFC 6455) -> messages: relay's agent connections.

    ``feed(data)`` behaves exactly like ``FrameParser(expect_masked=False,
    max_message=max_message).feed(data)``, except that violations are ``violation(message,
    code)`` and control frames ``control(opcode, payload)``.  With ``openai_audio`` set, a
    text message that is certainly an OpenAI Realtime audio delta comes out as ``(item_id,
    audio)`` (the delta's base64 decoded) instead of its str.  See
    relay.media.codec_ref.ServerFrameParser for the exact subset recognised."""

    def __init__(self, *, long long max_message=65536, control, violation,
                 bint openai_audio=False):
        self._setup(False, max_message, control, violation)
        self.openai_audio = openai_audio

    cdef object _text(self, const uint8_t *p, Py_ssize_t n):
        cdef object msg
        if self.openai_audio:
            msg = _scan_openai_audio(p, n)
            if msg is not None:
                return msg
        return _FrameReader._text(self, p, n)


# One read from Twilio, parsed and ordered in one call (semantics:
# relay.media.codec_ref.twilio_uplink): the uplink's hot path, ~50 reads per call-second.
# Done in Python it was a parse, a filter for control frames, then a loop over the messages
# calling the jitter buffer: ~9 Python frames and ~5 us per read on this machine kind, more
# than the compiled work itself (relay/media/call.py, Call._twilio_readable).

def twilio_uplink(TwilioFrameParser parser not None, UplinkJitterBuffer jitter not None,
                  data, silence):
    """``parser.feed(data)``, then each leading media message through ``jitter`` as a
    20 ms frame and each leading mark echo's name collected, up to the first message of
    any other kind.  Returns ``(payloads, marks, media, rest)``: the base64 payloads
    released in order (a gap's is ``silence(duration_ms)``), the mark names (None when
    there were none), how many media messages were taken, and the messages from the first
    other one on (None when every message was media or a mark)."""
    cdef list items = parser.feed(data)
    cdef list payloads = []
    cdef list marks = None
    cdef list out
    cdef Py_ssize_t i, j, n = len(items), media = 0
    cdef object item, frame, payload
    for i in range(n):
        item = items[i]
        if type(item) is not tuple:
            return payloads, marks, media, items[i:]
        if len(<tuple>item) == 2:
            media += 1
            out = jitter._push((<tuple>item)[0] % _MOD32, (<tuple>item)[1], 20)
            for j in range(len(out)):
                frame = out[j]
                payload = (<tuple>frame)[1]
                payloads.append(payload if payload is not None else silence((<tuple>frame)[2]))
        else:
            if marks is None:
                marks = []
            marks.append((<tuple>item)[0])
    return payloads, marks, media, None


# OpenAI Realtime audio deltas (semantics: relay.media.codec_ref.scan_openai_audio): the
# agent -> relay hot message, ~50 per call-second.  The slow path is orjson.loads, a dict,
# the protocol core's dispatch and binascii.a2b_base64; here one pass over the bytes.

cdef inline Py_ssize_t _int_end(const uint8_t *s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    # i at the first byte of a JSON number: the index after it when it is an integer
    # -?(0|[1-9][0-9]*) of at most 18 digits, else -1 (fractions and exponents included)
    cdef Py_ssize_t start
    if i < n and s[i] == 0x2D:  # '-'
        i += 1
    start = i
    if i >= n or s[i] < 0x30 or s[i] > 0x39:
        return -1
    if s[i] == 0x30:
        i += 1
    else:
        while i < n and 0x30 <= s[i] <= 0x39:
            i += 1
    if i - start > 18:
        return -1
    if i < n and (s[i] == 0x2E or s[i] == 0x65 or s[i] == 0x45 or 0x30 <= s[i] <= 0x39):
        return -1  # '.', 'e', 'E', or a digit after a leading 0
    return i


cdef object _scan_openai_audio(const uint8_t *s, Py_ssize_t n):
    cdef Py_ssize_t keys[_MAX_MEMBERS]
    cdef Py_ssize_t lens[_MAX_MEMBERS]
    cdef Py_ssize_t i, k, kn, v, vn, pad
    cdef Py_ssize_t typ = -1, typ_n = 0, item = -1, item_n = 0, dl = -1, dl_n = 0
    cdef int m = 0, j
    cdef bytes audio
    i = _skip_ws(s, 0, n)
    if i >= n or s[i] != 0x7B:
        return None
    i = _skip_ws(s, i + 1, n)
    while True:
        if i >= n or s[i] != 0x22:
            return None
        k = i + 1
        i = _str_end(s, k, n)
        if i < 0:
            return None
        kn = i - k
        if m == _MAX_MEMBERS:
            return None
        for j in range(m):
            if (lens[j] == kn and (kn == 0 or s[keys[j]] == s[k])
                    and memcmp(s + keys[j], s + k, kn) == 0):
                return None  # duplicate key (orjson would keep the last one)
        keys[m] = k
        lens[m] = kn
        m += 1
        i = _skip_ws(s, i + 1, n)
        if i >= n or s[i] != 0x3A:
            return None
        i = _skip_ws(s, i + 1, n)
        if i >= n:
            return None
        if s[i] == 0x22:
            v = i + 1
            i = _str_end(s, v, n)
            if i < 0:
                return None
            vn = i - v
            i += 1
            if _key_is(s, k, kn, "type", 4):
                typ = v
                typ_n = vn
            elif _key_is(s, k, kn, "item_id", 7):
                item = v
                item_n = vn
            elif _key_is(s, k, kn, "delta", 5):
                dl = v
                dl_n = vn
        elif s[i] == 0x2D or 0x30 <= s[i] <= 0x39:
            if (_key_is(s, k, kn, "type", 4) or _key_is(s, k, kn, "item_id", 7)
                    or _key_is(s, k, kn, "delta", 5)):
                return None
            i = _int_end(s, i, n)
            if i < 0:
                return None
        else:
            return None  # literal, array, object
        i = _skip_ws(s, i, n)
        if i >= n:
            return None
        if s[i] == 0x2C:
            i = _skip_ws(s, i + 1, n)
        elif s[i] == 0x7D:
            i += 1
            break
        else:
            return None
    if _skip_ws(s, i, n) != n or typ < 0 or item < 0 or dl < 0:
        return None
    if not (_key_is(s, typ, typ_n, "response.output_audio.delta", 27)
            or _key_is(s, typ, typ_n, "response.audio.delta", 20)):
        return None
    # strict base64 only (whole quanta, '=' only as padding): binascii.a2b_base64 decodes
    # it the same; anything it would treat leniently stays on the slow path
    if dl_n & 3:
        return None
    pad = 0
    while pad < 2 and pad < dl_n and s[dl + dl_n - 1 - pad] == 61:
        pad += 1
    for j in range(dl_n - pad):
        if _B64[s[dl + j]] < 0:
            return None
    audio = _new_bytes(dl_n // 4 * 3 - pad)  # exactly what the checked quanta decode to
    _b64_decode(s + dl, dl_n, <uint8_t *>PyBytes_AS_STRING(audio))
    return (_ascii(s + item, item_n), audio)


# ======================================================================================
# relay -> Twilio: the media + mark frames of a downlink pull, built in one buffer
# ======================================================================================
# Semantics: relay.media.codec_ref.twilio_frames.  Per frame sent to Twilio the pure-Python
# path made a media message (base64 + concatenation), a mark message and two WebSocket
# frames, then joined them; here the wire bytes of a whole pull are sized and written once.

cdef const char *_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


cdef Py_ssize_t _b64_encode(const uint8_t *s, Py_ssize_t n, uint8_t *o) noexcept nogil:
    # RFC 4648 base64 with padding, as binascii.b2a_base64(newline=False); returns the length
    cdef Py_ssize_t i = 0, j = 0
    cdef unsigned int v
    while i + 3 <= n:
        v = (<unsigned int>s[i] << 16) | (<unsigned int>s[i + 1] << 8) | s[i + 2]
        o[j] = _B64_ALPHABET[v >> 18]
        o[j + 1] = _B64_ALPHABET[(v >> 12) & 63]
        o[j + 2] = _B64_ALPHABET[(v >> 6) & 63]
        o[j + 3] = _B64_ALPHABET[v & 63]
        i += 3
        j += 4
    if n - i == 1:
        v = <unsigned int>s[i] << 16
        o[j] = _B64_ALPHABET[v >> 18]
        o[j + 1] = _B64_ALPHABET[(v >> 12) & 63]
        o[j + 2] = 61  # '='
        o[j + 3] = 61
        j += 4
    elif n - i == 2:
        v = (<unsigned int>s[i] << 16) | (<unsigned int>s[i + 1] << 8)
        o[j] = _B64_ALPHABET[v >> 18]
        o[j + 1] = _B64_ALPHABET[(v >> 12) & 63]
        o[j + 2] = _B64_ALPHABET[(v >> 6) & 63]
        o[j + 3] = 61
        j += 4
    return j


cdef inline Py_ssize_t _b64_encoded_size(Py_ssize_t n) noexcept nogil:
    return 4 * ((n + 2) // 3)


cdef inline Py_ssize_t _frame_head_size(Py_ssize_t n) noexcept nogil:
    return 2 if n < 126 else 4 if n < 65536 else 10


cdef inline Py_ssize_t _write_head(uint8_t *o, Py_ssize_t n) noexcept nogil:
    # FIN + text opcode, unmasked (RFC 6455 §5.2: a server never masks)
    cdef int j
    o[0] = 0x81
    if n < 126:
        o[1] = <uint8_t>n
        return 2
    if n < 65536:
        o[1] = 126
        o[2] = <uint8_t>(n >> 8)
        o[3] = <uint8_t>n
        return 4
    o[1] = 127
    for j in range(8):
        o[2 + j] = <uint8_t>((<unsigned long long>n) >> (56 - 8 * j))
    return 10


def twilio_frames(bytes media_prefix not None, bytes mark_prefix not None, list frames not None) -> bytes:
    """Wire bytes of the frames relay sends Twilio for one downlink pull: for each
    ``(ulaw, mark_name, response_id)`` of ``frames`` a text frame holding
    ``media_prefix + base64(ulaw) + '"}}'`` and one holding ``mark_prefix + mark_name +
    '"}}'`` (server frames: unmasked).  See relay.media.codec_ref.twilio_frames."""
    cdef Py_ssize_t mp = PyBytes_GET_SIZE(media_prefix), kp = PyBytes_GET_SIZE(mark_prefix)
    cdef Py_ssize_t total = 0, n, m, pos = 0, k
    cdef Py_ssize_t count = len(frames)
    cdef tuple item
    cdef bytes audio
    cdef object name
    cdef bytes out
    cdef uint8_t *o
    # pass 1: sizes, and the checks (audio is bytes, names are ASCII str)
    for k in range(count):
        item = <tuple?>frames[k]
        audio = <bytes?>item[0]
        name = item[1]
        if not (PyUnicode_Check(name) and PyUnicode_IS_COMPACT_ASCII(name)):
            raise ValueError("mark names must be ASCII strings")
        m = mp + _b64_encoded_size(PyBytes_GET_SIZE(audio)) + 3
        total += _frame_head_size(m) + m
        m = kp + PyUnicode_GET_LENGTH(name) + 3
        total += _frame_head_size(m) + m
    out = _new_bytes(total)
    o = <uint8_t *>PyBytes_AS_STRING(out)
    # pass 2 (nothing can change in between: bytes and str are immutable, the list is ours
    # for the duration): per audio frame its media frame, then its mark frame
    for k in range(count):
        item = <tuple>frames[k]
        audio = <bytes>item[0]
        name = item[1]
        n = PyBytes_GET_SIZE(audio)
        m = mp + _b64_encoded_size(n) + 3
        pos += _write_head(o + pos, m)
        memcpy(o + pos, PyBytes_AS_STRING(media_prefix), mp)
        pos += mp
        pos += _b64_encode(<const uint8_t *>PyBytes_AS_STRING(audio), n, o + pos)
        memcpy(o + pos, b'"}}', 3)
        pos += 3
        n = PyUnicode_GET_LENGTH(name)
        m = kp + n + 3
        pos += _write_head(o + pos, m)
        memcpy(o + pos, PyBytes_AS_STRING(mark_prefix), kp)
        pos += kp
        memcpy(o + pos, PyUnicode_DATA(name), n)
        pos += n
        memcpy(o + pos, b'"}}', 3)
        pos += 3
    return out


# ======================================================================================
# relay -> agent: caller audio spliced into the agent's JSON, as masked client frames
# ======================================================================================
# Semantics: relay.media.codec_ref.client_b64_frames.  Passthrough agents take Twilio's
# base64 payload inside a JSON message (OpenAI's input_audio_buffer.append, ElevenLabs'
# user_audio_chunk, AssemblyAI's input.audio).  Per media message the Python path built
# the message by concatenation, encoded it, framed it and masked it (four allocations and
# a dozen calls); here the frames of one read are sized, filled and masked in one buffer.

import os as _os

cdef bytes _mask_pool = b""
cdef Py_ssize_t _mask_pos = 0


cdef const uint8_t *_mask_keys(Py_ssize_t count) except NULL:
    """``count`` fresh 4-byte masking keys from the urandom pool (RFC 6455 §5.3), valid
    until the next call (the pool object is replaced only here)."""
    global _mask_pool, _mask_pos
    cdef const uint8_t *keys
    if _mask_pos + 4 * count > PyBytes_GET_SIZE(_mask_pool):
        _mask_pool = _os.urandom(max(4096, 4 * count))
        _mask_pos = 0
    keys = <const uint8_t *>PyBytes_AS_STRING(_mask_pool) + _mask_pos
    _mask_pos += 4 * count
    return keys


cdef inline bint _plain_b64(const uint8_t *s, Py_ssize_t n) noexcept nogil:
    # only A-Z a-z 0-9 + / = : characters JSON never escapes (RFC 8259 §7)
    cdef Py_ssize_t i
    for i in range(n):
        if _B64[s[i]] < 0 and s[i] != 61:
            return False
    return True


def client_b64_frames(bytes head not None, list payloads not None, bytes tail not None):
    """Wire bytes of one masked client text frame per payload, each holding ``head +
    payload + tail``, or ``None`` (nothing built) when a payload is not plain base64, which
    the caller must then serialise properly.  Masking keys come from ``os.urandom``
    (RFC 6455 §5.3: unpredictable, a fresh key per frame).  See
    relay.media.codec_ref.client_b64_frames."""
    cdef Py_ssize_t hp = PyBytes_GET_SIZE(head), tp = PyBytes_GET_SIZE(tail)
    # a tuple: what pass 1 checked is what pass 2 copies, whatever runs in between
    # (os.urandom, an allocation that triggers a collection and its finalizers)
    cdef tuple items = tuple(payloads)
    cdef Py_ssize_t count = len(items), total = 0, k, n, m, pos = 0, h
    cdef object p
    cdef bytes out
    cdef uint8_t *o
    cdef const uint8_t *key
    cdef const uint8_t *keys
    if count == 0:
        return b""
    for k in range(count):
        p = items[k]
        if not (PyUnicode_Check(p) and PyUnicode_IS_COMPACT_ASCII(p)):
            return None
        n = PyUnicode_GET_LENGTH(p)
        if not _plain_b64(<const uint8_t *>PyUnicode_DATA(p), n):
            return None
        m = hp + n + tp
        total += _frame_head_size(m) + 4 + m
    keys = _mask_keys(count)
    out = _new_bytes(total)
    o = <uint8_t *>PyBytes_AS_STRING(out)
    for k in range(count):
        p = items[k]
        n = PyUnicode_GET_LENGTH(p)
        m = hp + n + tp
        h = _write_head(o + pos, m)
        o[pos + 1] |= 0x80  # MASK bit: a client always masks (RFC 6455 §5.2)
        pos += h
        key = keys + 4 * k
        memcpy(o + pos, key, 4)
        pos += 4
        memcpy(o + pos, PyBytes_AS_STRING(head), hp)
        memcpy(o + pos + hp, PyUnicode_DATA(p), n)
        memcpy(o + pos + hp + n, PyBytes_AS_STRING(tail), tp)
        _xor4(o + pos, o + pos, m, key)
        pos += m
    return out


def client_audio_frame(bytes head not None, audio, bytes tail not None) -> bytes:
    """Wire bytes of one masked client text frame holding ``head + base64(audio) + tail``:
    a transcoded agent's caller audio (PCM) in its JSON message, encoded, framed and masked
    in one buffer (the Python path made the base64 string, the message, its UTF-8 bytes,
    the frame and the masked copy).  See relay.media.codec_ref.client_audio_frame."""
    cdef Py_ssize_t hp = PyBytes_GET_SIZE(head), tp = PyBytes_GET_SIZE(tail), m, h
    cdef _In s
    cdef bytes out
    cdef uint8_t *o
    cdef const uint8_t *key
    key = _mask_keys(1)
    _in_get(audio, &s)
    try:
        m = hp + _b64_encoded_size(s.n) + tp
        out = _new_bytes(_frame_head_size(m) + 4 + m)
        o = <uint8_t *>PyBytes_AS_STRING(out)
        h = _write_head(o, m)
        o[1] |= 0x80  # MASK bit: a client always masks (RFC 6455 §5.2)
        memcpy(o + h, key, 4)
        o += h + 4
        memcpy(o, PyBytes_AS_STRING(head), hp)
        _b64_encode(s.p, s.n, o + hp)
        memcpy(o + m - tp, PyBytes_AS_STRING(tail), tp)
        _xor4(o, o, m, key)
    finally:
        _in_release(&s)
    return out


# ======================================================================================
# The uplink pump (semantics: relay.media.codec_ref.UplinkPump): one Twilio read to the
# agent in one call
# ======================================================================================
# ~50 reads per call-second, each one recv(2), twilio_uplink, client_b64_frames and one
# send(2). Through the Python layers (WebSocket.recv_nowait, the call's forward, the
# adapter's send_audio_b64_many, WebSocket.write_nowait, the socket objects' methods) the
# glue cost 3-6 us per read in place at 100 calls, 9-18 % of the read; here it is C calls on
# the two descriptors. The caller keeps every decision: it runs pump() only while neither
# WebSocket holds bytes of its own (relay.media.websocket.WebSocket.pumpable), and does the
# bookkeeping and every failure from the result.

cdef extern from "<sys/socket.h>" nogil:
    ssize_t _c_recv "recv"(int fd, void *buf, size_t n, int flags)
    ssize_t _c_send "send"(int fd, const void *buf, size_t n, int flags)
    int MSG_DONTWAIT
    int MSG_NOSIGNAL

cdef extern from "<errno.h>":
    int errno
    int EAGAIN
    int EWOULDBLOCK
    int EINTR

PUMP_IDLE = 0      # nothing to read
PUMP_SENT = 1      # every append message written (``marks``: the echoes to handle)
PUMP_UNSENT = 2    # built, but the kernel took only part: ``unsent`` must be queued
PUMP_PARSED = 3    # parsed only (another kind of message, nothing to send...)
PUMP_CLOSED = 4    # the peer closed (``error`` 0) or the read failed (``error`` = errno)

DEF _PUMP_READ = 65536  # what one WebSocket.recv_nowait reads

cdef uint8_t _pump_buf[_PUMP_READ]  # the GIL is held throughout: one buffer serves all


cdef inline ssize_t _recv_pump_buf(int fd) noexcept:
    """One non-blocking ``recv(2)`` into ``_pump_buf``, retried on EINTR (errno as left)."""
    cdef ssize_t n
    while True:
        n = _c_recv(fd, _pump_buf, _PUMP_READ, MSG_DONTWAIT)
        if n >= 0 or errno != EINTR:
            return n


cdef inline ssize_t _send_bytes(int fd, bytes data) noexcept:
    """One non-blocking ``send(2)`` of ``data`` (no SIGPIPE), retried on EINTR."""
    cdef ssize_t w
    while True:
        w = _c_send(fd, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data),
                    MSG_DONTWAIT | MSG_NOSIGNAL)
        if w >= 0 or errno != EINTR:
            return w


cdef class UplinkPump:
    """One Twilio read to the agent: ``recv(2)`` on ``twilio_fd``; :func:`twilio_uplink`
    with ``parser``, ``jitter`` and ``silence``; when the read held media messages and mark
    echoes only, the released payloads as masked append messages (:func:`client_b64_frames`
    with ``head`` and ``tail``) in one ``send(2)`` on ``agent_fd``; with ``to_pcm`` (a
    :class:`UlawToPcm`), their audio resampled into one message
    (:func:`client_audio_frame`).

    :meth:`pump` returns a ``PUMP_*`` code; what it took is in :attr:`media`, :attr:`sent`,
    :attr:`marks` (the mark echoes' names, None when there were none: the caller handles
    them after any code), :attr:`payloads` / :attr:`rest` (``PUMP_PARSED``: with
    :attr:`marks`, twilio_uplink's results for the caller to carry on with),
    :attr:`unsent` and :attr:`error`. Both descriptors stay the caller's (never closed
    here)."""

    cdef readonly int twilio_fd
    cdef readonly int agent_fd
    cdef readonly TwilioFrameParser parser
    cdef UplinkJitterBuffer _jitter
    cdef object _silence
    cdef bytes _head
    cdef bytes _tail
    cdef UlawToPcm _to_pcm
    cdef readonly Py_ssize_t media
    cdef readonly Py_ssize_t sent
    cdef readonly object payloads
    cdef readonly object marks
    cdef readonly object rest
    cdef readonly bytes unsent
    cdef readonly int error

    def __init__(self, TwilioFrameParser parser not None, UplinkJitterBuffer jitter not None,
                 silence, int twilio_fd, int agent_fd, bytes head not None,
                 bytes tail not None, UlawToPcm to_pcm=None):
        if twilio_fd < 0 or agent_fd < 0:
            raise ValueError("descriptors must be open (>= 0)")
        self.parser = parser
        self._jitter = jitter
        self._silence = silence
        self.twilio_fd = twilio_fd
        self.agent_fd = agent_fd
        self._head = head
        self._tail = tail
        self._to_pcm = to_pcm
        self._clear()

    cdef inline void _clear(self):
        self.media = 0
        self.sent = 0
        self.payloads = None
        self.marks = None
        self.rest = None
        self.unsent = None
        self.error = 0

    def pump(self) -> int:
        """One read, forwarded when it held media and mark echoes only. A protocol
        violation in the read raises ``ProtocolViolation`` (the parser's), as
        :func:`twilio_uplink` does."""
        return self._pump()

    cdef int _pump(self) except -1:
        cdef ssize_t n, w
        cdef bytes data, wire
        cdef list payloads
        self._clear()
        n = _recv_pump_buf(self.twilio_fd)
        if n < 0:
            if errno == EAGAIN or errno == EWOULDBLOCK:
                return PUMP_IDLE
            self.error = errno
            return PUMP_CLOSED
        if n == 0:
            return PUMP_CLOSED
        data = PyBytes_FromStringAndSize(<char *>_pump_buf, n)
        payloads, marks, media, rest = twilio_uplink(self.parser, self._jitter, data,
                                                     self._silence)
        self.media = media
        self.marks = marks
        if rest is not None or not payloads:
            self.payloads, self.rest = payloads, rest
            return PUMP_PARSED
        if self._to_pcm is not None:  # one message of the read's audio, resampled
            wire = client_audio_frame(self._head, self._to_pcm.feed_b64_many(payloads),
                                      self._tail)
            self.sent = 1
        else:
            wire = client_b64_frames(self._head, payloads, self._tail)
            if wire is None:  # a payload that is not plain base64: the adapter serialises it
                self.payloads = payloads
                return PUMP_PARSED
            self.sent = len(payloads)
        w = _send_bytes(self.agent_fd, wire)
        if w == PyBytes_GET_SIZE(wire):
            return PUMP_SENT
        # EAGAIN, a short write or an error: the caller queues the rest with
        # WebSocket.write_nowait, which retries the send and turns an error into
        # ConnectionClosed exactly as for any other write
        self.unsent = wire[w:] if w > 0 else wire
        return PUMP_UNSENT


from array import array as _array

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec *tp)
    int CLOCK_MONOTONIC


cdef inline double _monotonic() noexcept nogil:
    """``time.perf_counter()``, without a Python call: CPython reads CLOCK_MONOTONIC for it
    on Linux, and turns the nanoseconds into seconds the same way."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>(ts.tv_sec * 1000000000LL + ts.tv_nsec) / 1e9


# ---------------------------------------------------------------------------------------
# The per-frame latency histogram. Why compiled: each media read's handler observes its
# latency once, ~60 times a call-second; in Python (bisect, a list item, a float sum, an
# array slot) that was ~4 % of the relay's active CPU at 50 calls (py-spy, bench/published/
# profile/). Here the handlers above call :meth:`Histogram.add` without a Python frame.

cdef class Histogram:
    """A Prometheus histogram plus a ring of the last ``window`` raw samples (exact
    percentiles for reports). Semantics: relay.media.codec_ref.Histogram."""

    def __cinit__(self):
        self._bounds = NULL
        self._counts = NULL
        self._recent = NULL

    def __init__(self, bounds, Py_ssize_t window=8192):
        cdef Py_ssize_t i, nb
        if window < 1:
            raise ValueError("window must be at least 1")
        if self._counts != NULL:
            raise RuntimeError("Histogram is initialised once")
        self.bounds = tuple(bounds)
        nb = len(self.bounds)
        self._nb = nb
        self.window = window
        self._bounds = <double*>malloc((nb if nb else 1) * sizeof(double))
        self._counts = <long long*>malloc((nb + 1) * sizeof(long long))
        self._recent = <double*>malloc(window * sizeof(double))
        if self._bounds == NULL or self._counts == NULL or self._recent == NULL:
            raise MemoryError()
        for i in range(nb):
            self._bounds[i] = self.bounds[i]
        memset(self._counts, 0, (nb + 1) * sizeof(long long))
        self.count = 0
        self.sum = 0.0

    def __dealloc__(self):
        free(self._bounds)
        free(self._counts)
        free(self._recent)

    cdef void add(self, double value) noexcept:
        # bisect_left: the first bound >= value (a NaN lands in the first bucket, as there)
        cdef Py_ssize_t lo = 0, hi = self._nb, mid
        cdef long long n = self.count
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._bounds[mid] < value:
                lo = mid + 1
            else:
                hi = mid
        self._counts[lo] += 1
        self.count = n + 1
        self.sum += value
        self._recent[n % self.window] = value

    def observe(self, double value):
        self.add(value)

    @property
    def counts(self):
        return [self._counts[i] for i in range(self._nb + 1)]

    @property
    def recent(self):
        """The kept samples (in ring order once full: order does not matter to
        percentiles), as a copy."""
        cdef Py_ssize_t i, n = self.count if self.count < self.window else self.window
        return _array("d", [self._recent[i] for i in range(n)])

    def percentile(self, double q):
        """Exact ``q`` (0..100) percentile of the recent window, 0.0 when empty."""
        if not self.count:
            return 0.0
        ordered = sorted(self.recent)
        idx = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
        return ordered[idx]

    def quantile(self, double q):
        """Upper bound of the bucket holding quantile ``q`` (coarse, for summaries)."""
        cdef Py_ssize_t i
        cdef long long seen = 0
        if not self.count:
            return 0.0
        target = q * self.count
        for i in range(self._nb + 1):
            seen += self._counts[i]
            if seen >= target:
                return self.bounds[i] if i < self._nb else float("inf")
        return float("inf")

    def render(self, str name, str labels=""):
        cdef Py_ssize_t i
        cdef long long cumulative = 0
        lines = []
        sep = "," if labels else ""
        for i in range(self._nb):
            cumulative += self._counts[i]
            lines.append(f'{name}_bucket{{{labels}{sep}le="{self.bounds[i]}"}} {cumulative}')
        lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        lab = f"{{{labels}}}" if labels else ""
        lines.append(f"{name}_sum{lab} {self.sum:.9f}")
        lines.append(f"{name}_count{lab} {self.count}")
        return lines


cdef inline void _observe(object hist, double value) except *:
    """``hist.observe(value)``: without a Python frame when it is a compiled Histogram."""
    if isinstance(hist, Histogram):
        (<Histogram>hist).add(value)
    else:
        hist.observe(value)


cdef class PumpHandler:
    """The reactor's handler for Twilio's socket while an :class:`UplinkPump` serves it.

    Why: the pump takes a read from ``recv`` to ``send`` in one compiled call, but the
    Python around it (the call's checks, counters, the latency histogram, the reactor's
    call into a bound method) was timed in place at ~11 µs of a ~38 µs read at 100 calls,
    50 reads a call-second. Here the usual outcome, every append written, is counted
    without a Python frame; only the rest reaches the call's hooks. Measured against the
    Python it replaces (bench/published/pump-handler/): -10 % CPU at 400 μ-law calls,
    -3 % at 50, nothing resolvable for PCM or in a warm loop.

    Calling it serves one readable event:

    * not :attr:`armed`, or ``source.pumpable(dest)`` false: ``fallback()`` (the layered
      path decides);
    * otherwise :meth:`UplinkPump.pump`; ``PUMP_IDLE``: nothing;
    * ``PUMP_SENT`` / ``PUMP_UNSENT``: ``source.messages_in`` += media and mark echoes,
      ``metrics.frames_in`` += media, ``metrics.uplink_pumped`` += 1, ``dest.messages_out``
      += appends built, then ``on_marks(marks)`` when the read held echoes; ``PUMP_SENT``
      ends with ``latency.observe`` of the read's time (``time.perf_counter``),
      ``PUMP_UNSENT`` goes on with ``on_result(code, t0)`` (the rest must be queued);
    * ``PUMP_PARSED`` / ``PUMP_CLOSED``: ``on_result(code, t0)``;
    * any exception (the parser's ``ProtocolViolation``, a failing hook): ``on_error(exc)``.

    Semantics: relay.media.codec_ref.PumpHandler."""

    cdef readonly UplinkPump pump
    cdef public bint armed
    cdef readonly object source
    cdef readonly object dest
    cdef object _metrics
    cdef object _latency
    cdef object _fallback
    cdef object _on_marks
    cdef object _on_result
    cdef object _on_error

    def __init__(self, UplinkPump pump not None, source, dest, metrics, latency,
                 fallback, on_marks, on_result, on_error):
        self.pump = pump
        self.armed = True
        self.source = source
        self.dest = dest
        self._metrics = metrics
        self._latency = latency
        self._fallback = fallback
        self._on_marks = on_marks
        self._on_result = on_result
        self._on_error = on_error

    def __call__(self):
        cdef UplinkPump pump = self.pump
        cdef double t0
        cdef object marks
        cdef int code
        cdef Py_ssize_t media, taken
        if not self.armed or not self.source.pumpable(self.dest):
            self._fallback()
            return
        t0 = _monotonic()
        try:
            code = pump._pump()
            if code == PUMP_IDLE:
                return
            if code == PUMP_SENT or code == PUMP_UNSENT:
                media = pump.media
                marks = pump.marks
                taken = media if marks is None else media + len(<list>marks)
                self.source.messages_in += taken
                self._metrics.frames_in += media
                self._metrics.uplink_pumped += 1
                self.dest.messages_out += pump.sent
                if marks is not None:  # what the caller has heard (the other direction)
                    self._on_marks(marks)
                if code == PUMP_SENT:
                    _observe(self._latency, _monotonic() - t0)
                    return
            self._on_result(code, t0)
        except Exception as exc:
            self._on_error(exc)


cdef class DownlinkHandler:
    """The reactor's handler for an OpenAI Realtime agent's socket, the agent -> caller
    direction's counterpart of :class:`PumpHandler`.

    Why: a read from the agent (about ten a call-second, each an audio delta or two) went
    through ~20 Python frames: the adapter's read and parse, an event object, the call's
    event loop, the downlink's pull, the send and the counters. Timed in place at 50 calls:
    ~52 µs a read, of which ~25 µs was the two syscalls. Here a read that holds nothing but
    audio deltas of items the session already knows goes from ``recv`` to ``send`` in one
    compiled call; everything else reaches the call's hooks, parsed, in order.

    Calling it serves one readable event:

    * not :attr:`armed`, or ``ready()`` false: ``fallback()`` (the layered path reads);
    * ``recv(2)`` on ``agent_fd``: nothing waiting: return; end of stream or an error:
      ``on_closed(errno)`` (0: end of stream);
    * ``source.last_received = clock()`` when ``stamp``; the bytes to ``parser.feed``
      (a ``ServerFrameParser`` with ``openai_audio``: deltas come out as ``(item_id,
      audio)``);
    * each leading ``(item_id, audio)`` (audio: bytes) whose item is in ``item_bytes`` and not in
      ``truncated``: ``item_bytes[item_id] += len(audio)``, ``protocol.events_in`` and
      ``source.messages_in`` += 1, the audio (through ``to_ulaw.feed`` when given) pushed
      to ``downlink`` under ``item_id``, and ``call._current_rid = item_id``;
    * at the first other item (any other message, a control frame, a new or truncated
      item): ``on_rest(items, k, t_event, pushed)``, which carries on from ``items[k]``
      (and sends what was pushed: a barge-in later in the read must still drop it);
    * otherwise ``metrics.agent_direct`` += 1 and, when audio was pushed:
      ``downlink.pull(now_ms)``; the frames as
      :func:`twilio_frames` with ``media_prefix`` / ``mark_prefix`` in one ``send(2)`` on
      ``twilio_fd``, ``dest.messages_out`` += 2 per frame; written whole, or
      ``on_unsent(rest)`` returned True (it queued the rest): ``metrics.frames_out`` +=
      frames and ``latency.observe`` of the time since the read; then ``wake()`` when
      ``downlink.next_due(now_ms)`` is earlier than ``call._playout_due``;
    * any exception (the parser's ``ProtocolViolation``, a failing hook): ``on_error(exc)``.

    ``now_ms`` is ``clock() * 1000`` taken once per read. Semantics:
    relay.media.codec_ref.DownlinkHandler."""

    cdef public bint armed
    cdef readonly int agent_fd
    cdef readonly int twilio_fd
    cdef readonly object source
    cdef readonly object dest
    cdef ServerFrameParser _parser
    cdef DownlinkBuffer _downlink
    cdef dict _items
    cdef object _truncated
    cdef object _protocol
    cdef object _to_ulaw
    cdef bytes _media_prefix
    cdef bytes _mark_prefix
    cdef object _call
    cdef object _metrics
    cdef object _latency
    cdef object _clock
    cdef bint _stamp
    cdef object _ready
    cdef object _fallback
    cdef object _on_closed
    cdef object _on_rest
    cdef object _on_unsent
    cdef object _wake
    cdef object _on_error

    def __init__(self, int agent_fd, int twilio_fd, source, dest,
                 ServerFrameParser parser not None, DownlinkBuffer downlink not None,
                 dict item_bytes not None, truncated, protocol, to_ulaw,
                 bytes media_prefix not None, bytes mark_prefix not None, call, metrics,
                 latency, clock, bint stamp, ready, fallback, on_closed, on_rest,
                 on_unsent, wake, on_error):
        if agent_fd < 0 or twilio_fd < 0:
            raise ValueError("descriptors must be open (>= 0)")
        if not parser.openai_audio:
            raise ValueError("the parser must turn audio deltas into tuples (openai_audio)")
        self.armed = True
        self.agent_fd = agent_fd
        self.twilio_fd = twilio_fd
        self.source = source
        self.dest = dest
        self._parser = parser
        self._downlink = downlink
        self._items = item_bytes
        self._truncated = truncated
        self._protocol = protocol
        self._to_ulaw = to_ulaw
        self._media_prefix = media_prefix
        self._mark_prefix = mark_prefix
        self._call = call
        self._metrics = metrics
        self._latency = latency
        self._clock = clock
        self._stamp = stamp
        self._ready = ready
        self._fallback = fallback
        self._on_closed = on_closed
        self._on_rest = on_rest
        self._on_unsent = on_unsent
        self._wake = wake
        self._on_error = on_error

    def __call__(self):
        cdef ssize_t n, w
        cdef Py_ssize_t k = 0, count, nframes
        cdef double t_event
        cdef object now_s, item, item_id, audio, known, due
        cdef list items, frames
        cdef bytes data, wire
        cdef bint pushed = False
        cdef double now_ms
        if not self.armed or not self._ready():
            self._fallback()
            return
        t_event = _monotonic()
        try:
            n = _recv_pump_buf(self.agent_fd)
            if n < 0:
                if errno == EAGAIN or errno == EWOULDBLOCK:
                    return
                self._on_closed(errno)
                return
            if n == 0:
                self._on_closed(0)
                return
            data = PyBytes_FromStringAndSize(<char *>_pump_buf, n)
            now_s = self._clock()
            now_ms = now_s * 1000.0
            if self._stamp:
                self.source.last_received = now_s
            items = self._parser.feed(data)
            count = len(items)
            while k < count:
                item = items[k]
                if type(item) is not tuple or len(<tuple>item) != 2:
                    break
                item_id = (<tuple>item)[0]
                audio = (<tuple>item)[1]
                if type(audio) is not bytes:
                    break
                known = self._items.get(item_id)
                if known is None or item_id in self._truncated:
                    break
                self._protocol.events_in += 1
                if PyBytes_GET_SIZE(audio):
                    self._items[item_id] = known + PyBytes_GET_SIZE(audio)
                    if self._to_ulaw is not None:
                        audio = self._to_ulaw.feed(audio)
                    self._downlink.push(audio, item_id)
                    self._call._current_rid = item_id
                    pushed = True
                k += 1
            self.source.messages_in += k
            if k < count:
                self._on_rest(items, k, t_event, pushed)
                return
            self._metrics.agent_direct += 1
            if not pushed:
                return
            frames = self._downlink.pull(now_ms)
            nframes = len(frames)
            if nframes:
                wire = twilio_frames(self._media_prefix, self._mark_prefix, frames)
                self.dest.messages_out += 2 * nframes
                w = _send_bytes(self.twilio_fd, wire)
                if w == PyBytes_GET_SIZE(wire) or self._on_unsent(wire[w:] if w > 0 else wire):
                    self._metrics.frames_out += nframes
                    _observe(self._latency, _monotonic() - t_event)
            due = self._downlink.next_due(now_ms)
            if due is not None and due < self._call._playout_due:
                self._wake()
        except Exception as exc:
            self._on_error(exc)


# ---------------------------------------------------------------------------------------
# The media reactor's pass (relay/media/reactor.py). Why compiled: under load the reactor
# passes ~666 times a second (its 1.5 ms clock) whatever the number of calls, and at 50
# calls the Python of each pass (epoll.poll's list of tuples, the handler lookups, the
# counters, Trio's clock, the sweep check, the rate) and the timer's read were ~12 % of
# the relay's active CPU (py-spy, bench/published/profile/): a fixed cost that weighs most
# where each pass serves only a few sockets.

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        int fd
    struct epoll_event:
        unsigned int events
        epoll_data_t data
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)

cdef extern from "<unistd.h>" nogil:
    ssize_t _c_read "read"(int fd, void *buf, size_t n)

from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.tuple cimport PyTuple_GET_ITEM



def timer_expirations(int fd):
    """Expirations of a non-blocking ``timerfd`` since its last read (0: none yet): one
    8-byte ``read(2)`` (timerfd_create(2)). Semantics: codec_ref.timer_expirations."""
    cdef unsigned long long n = 0
    cdef ssize_t r
    while True:
        r = _c_read(fd, &n, 8)
        if r == 8:
            return n
        if r < 0 and errno == EINTR:
            continue
        if r < 0 and (errno == EAGAIN or errno == EWOULDBLOCK):
            return 0
        if r < 0:
            raise OSError(errno, _os.strerror(errno))
        raise OSError("short read from a timerfd")


cdef class ReactorCore:
    """The handler table and one pass of the media reactor: :meth:`poll` takes the ready
    descriptors from ``epoll`` without waiting, :meth:`serve` calls their handlers, then
    runs the sweep's due timers and updates the arrival rate that decides whether passes
    coalesce. Semantics: relay.media.codec_ref.ReactorCore."""

    cdef object _epoll          # the select.epoll whose descriptor this polls (kept alive)
    cdef int _epfd
    cdef list _table            # fd -> handler, or None
    cdef Py_ssize_t _count
    cdef epoll_event *_events
    cdef int _cap
    cdef int _ready             # events polled and not yet served
    cdef object _clock
    cdef double _offset
    cdef bint _own_clock       # time read in C (use_clock_offset)
    cdef object _on_error
    cdef list _heap
    cdef object _run_due
    cdef public double rate
    cdef public double last
    cdef public long long wakeups
    cdef public long long dispatched
    cdef public long long handler_errors

    def __cinit__(self):
        self._events = NULL

    def __init__(self, epoll, clock, on_error, list heap not None, run_due):
        self._epoll = epoll
        self._epfd = epoll.fileno()
        self._table = []
        self._count = 0
        self._cap = 64
        self._events = <epoll_event *>malloc(self._cap * sizeof(epoll_event))
        if self._events == NULL:
            raise MemoryError()
        self._ready = 0
        self._clock = clock
        self._own_clock = False
        self._on_error = on_error
        self._heap = heap
        self._run_due = run_due
        self.rate = 0.0
        self.last = 0.0

    def __dealloc__(self):
        free(self._events)

    def use_clock_offset(self, double offset):
        """Read the time as ``offset + time.perf_counter()`` in C from now on: what
        ``clock()`` returns when it is Trio's system clock (``SystemClock.current_time``)."""
        self._offset = offset
        self._own_clock = True

    cdef inline double _now(self) except? -1.0:
        if self._own_clock:
            return self._offset + _monotonic()
        return self._clock()

    def now(self):
        """``clock()``: Trio's time, read in C after :meth:`use_clock_offset`."""
        return self._now()

    def __len__(self):
        return self._count

    def handler(self, int fd):
        if 0 <= fd < PyList_GET_SIZE(self._table):
            return self._table[fd]
        return None

    def set_handler(self, int fd, handler not None):
        if fd < 0:
            raise ValueError("descriptor must be open (>= 0)")
        while PyList_GET_SIZE(self._table) <= fd:
            self._table.append(None)
        if self._table[fd] is None:
            self._count += 1
        self._table[fd] = handler

    def drop(self, int fd):
        if 0 <= fd < PyList_GET_SIZE(self._table) and self._table[fd] is not None:
            self._table[fd] = None
            self._count -= 1

    def poll(self):
        """Take what is ready now (never waits); returns how many descriptors."""
        cdef int n, cap
        cdef epoll_event *grown
        if self._count > self._cap:  # room for every registered descriptor
            cap = <int>self._count * 2
            grown = <epoll_event *>realloc(self._events, cap * sizeof(epoll_event))
            if grown == NULL:
                raise MemoryError()
            self._events, self._cap = grown, cap
        while True:
            n = epoll_wait(self._epfd, self._events, self._cap, 0)
            if n >= 0:
                break
            if errno != EINTR:
                raise OSError(errno, _os.strerror(errno))
        self._ready = n
        return n

    def serve(self, double coalesce_s):
        """One pass over what :meth:`poll` took; True while arrivals come fast enough
        (about two per ``coalesce_s``) for passes to coalesce."""
        cdef int i, fd, n = self._ready
        cdef list table = self._table
        cdef object handler
        cdef double now, elapsed
        self._ready = 0
        self.wakeups += 1
        for i in range(n):
            fd = self._events[i].data.fd
            if fd < 0 or fd >= PyList_GET_SIZE(table):
                continue
            handler = <object>PyList_GET_ITEM(table, fd)
            if handler is None:
                continue
            self.dispatched += 1
            try:
                handler()
            except Exception:
                # A bug, not peer input (handlers turn that into call events): that
                # socket is dropped so a still-readable descriptor cannot spin the loop.
                self.handler_errors += 1
                if table[fd] is handler:
                    self.drop(fd)
                self._on_error(fd)
        now = self._now()
        heap = self._heap
        if PyList_GET_SIZE(heap) and <double>(<object>PyTuple_GET_ITEM(
                <object>PyList_GET_ITEM(heap, 0), 0)) <= now:
            self._run_due(now)
        elapsed = now - self.last
        if elapsed < 1e-4:
            elapsed = 1e-4
        self.last = now
        self.rate += 0.2 * (n / elapsed - self.rate)
        return coalesce_s > 0 and self.rate * coalesce_s >= 2.0
