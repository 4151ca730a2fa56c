# cython: language_level=3
# Declarations of relay._codec's extension types (so other Cython code can cimport them).
from libc.stdint cimport uint8_t


cdef class Resampler:
    cdef readonly int in_rate
    cdef readonly int out_rate
    cdef int _up            # interpolation factor L
    cdef int _down          # decimation factor M
    cdef int _k             # taps per polyphase branch
    cdef int _d             # group delay in samples at the filter rate
    cdef int _high          # rate the filter runs at (in_rate * L)
    cdef bint _pass         # equal rates: copy through
    cdef float* _g          # L branches of K float32 taps (scaled by L)
    cdef float* _hist       # the last K-1 input samples
    cdef long long _n_in    # input samples consumed since reset
    cdef long long _n_out   # output samples emitted since reset

    cdef long long _available(self, long long n_in)
    cdef long long _final_count(self, long long n_in)
    cdef Py_ssize_t _step(self, const uint8_t* src, Py_ssize_t n, int in_kind, bint final,
                          float* y) except -1
    cdef object _convert(self, const uint8_t* src, Py_ssize_t nsamp, int in_kind, int out_kind)
    cdef object _flush(self, int out_kind)


cdef class UlawToPcm:
    cdef readonly int out_rate
    cdef Resampler _rs


cdef class PcmToUlaw:
    cdef readonly int in_rate
    cdef Resampler _rs
    cdef int _carry         # pending odd byte, or -1
    cdef object _feed_ptr(self, const uint8_t* p, Py_ssize_t n)


cdef class UplinkJitterBuffer:
    cdef readonly int frame_ms
    cdef readonly int reorder_ms
    cdef readonly int max_fill_ms
    cdef readonly int max_held
    cdef readonly long long gaps_filled
    cdef readonly long long silence_ms
    cdef readonly long long skipped_ms
    cdef readonly long long duplicates
    cdef readonly long long late_drops
    cdef readonly long long overflow_drops
    cdef readonly long long frames_out
    cdef bint _started
    cdef long long _next
    cdef dict _held
    cdef list _order
    cdef long long _held_ms
    cdef object _recent

    cdef list _push(self, long long ts, object payload, long long dur)
    cdef void _insort(self, long long ext)
    cdef void _release(self, list out, long long ext, long long ts, object payload, long long dur)
    cdef void _fill(self, list out, long long ext)
    cdef void _drain(self, list out)


cdef class _Resp:
    cdef long long offset
    cdef double heard_base


cdef class DownlinkBuffer:
    cdef readonly int frame_ms
    cdef readonly int max_lead_ms
    cdef readonly long long max_buffer_ms
    cdef public int slack_ms
    cdef readonly long long frames_out
    cdef readonly long long overflow_bytes
    cdef readonly long long ignored_marks
    cdef long long _frame_bytes
    cdef long long _max_bytes
    cdef object _queue
    cdef long long _queued
    cdef bytearray _partial
    cdef object _partial_rid
    cdef bint _partial_timed
    cdef double _partial_since
    cdef dict _resp
    cdef dict _dropped
    cdef dict _marks
    cdef double _play_end
    cdef double _last_echo
    cdef long long _counter

    cdef _Resp _state(self, object rid)
    cdef void _close_partial(self)
    cdef tuple _head_heard(self, double now_ms)
    cdef double _heard(self, object rid, double now_ms)
    cdef object _echo(self, object name, double now_ms)


cdef class _FrameReader:
    cdef readonly long long max_message
    cdef object _control        # control(opcode, payload) -> item for a control frame
    cdef object _violation      # violation(message, close_code) -> exception to raise
    cdef bint _masked           # frames from a client (masked) or from a server
    cdef bytes _buf             # bytes of an incomplete frame from earlier feeds
    cdef bint _in_frag          # a fragmented data message is open
    cdef int _frag_op
    cdef long long _frag_len
    cdef uint8_t* _fbuf         # its unmasked fragments so far (_fn bytes, _fcap allocated)
    cdef Py_ssize_t _fn
    cdef Py_ssize_t _fcap
    cdef uint8_t* _tmp          # scratch for one unmasked text frame
    cdef Py_ssize_t _tcap

    cdef void _setup(self, bint masked, long long max_message, object control,
                     object violation)
    cdef int _fail(self, str message, int code) except -1
    cdef object _text(self, const uint8_t* p, Py_ssize_t n)


cdef class TwilioFrameParser(_FrameReader):
    cdef readonly str stream_sid
    cdef bytes _sid             # stream_sid in UTF-8, compared with the raw streamSid


cdef class ServerFrameParser(_FrameReader):
    cdef public bint openai_audio   # OpenAI Realtime audio deltas -> (item_id, audio)


cdef class Histogram:
    cdef readonly tuple bounds
    cdef readonly Py_ssize_t window
    cdef readonly long long count
    cdef readonly double sum
    cdef Py_ssize_t _nb         # len(bounds)
    cdef double* _bounds
    cdef long long* _counts     # _nb + 1 buckets (the last: above every bound)
    cdef double* _recent        # ring of the last `window` samples

    cdef void add(self, double value) noexcept
