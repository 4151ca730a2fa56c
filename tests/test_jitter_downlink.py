"""DownlinkBuffer: one test per scenario (both implementations), properties, and a
differential test (compiled == reference for random operation sequences)."""

from __future__ import annotations

from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.media import _codec, codec_ref
from relay.media.call import downlink_slack_ms

IMPLS = [pytest.param(_codec, id="compiled"), pytest.param(codec_ref, id="ref")]
MS = 8  # μ-law 8 kHz: bytes per ms


def audio(ms: int, fill: int = 0x55) -> bytes:
    return bytes([fill]) * (ms * MS)


@pytest.mark.parametrize("impl", IMPLS)
def test_burst_is_rechunked_into_frames(impl: ModuleType) -> None:
    db = impl.DownlinkBuffer()  # 100 ms frames
    data = bytes(range(256)) * 10  # 2560 bytes = 320 ms
    db.push(data[:1000], "r1")
    db.push(data[1000:], "r1")
    assert db.buffered_ms == 320
    db.end_response("r1")  # releases the final partial frame
    frames = db.pull(0.0) + db.pull(1000.0) + db.pull(2000.0)
    assert [len(f) for f, _, _ in frames] == [800, 800, 800, 160]
    assert b"".join(f for f, _, _ in frames) == data
    assert {rid for _, _, rid in frames} == {"r1"}
    assert len({name for _, name, _ in frames}) == 4  # unique marks


@pytest.mark.parametrize("impl", IMPLS)
def test_partial_frame_waits_briefly_or_for_end_response(impl: ModuleType) -> None:
    db = impl.DownlinkBuffer()
    db.push(audio(150), "r1")
    assert [len(f) for f, _, _ in db.pull(0.0)] == [800]  # Twilio now holds 100 ms
    assert db.pull(5.0) == [] and db.buffered_ms == 50  # the rest of the frame may come
    db.end_response("other")  # not the partial's response: no effect
    assert db.buffered_ms == 50 and db.pull(5.0) == []
    db.end_response("r1")  # the answer is complete: nothing more will come
    assert [len(f) for f, _, _ in db.pull(5.0)] == [400]


@pytest.mark.parametrize("impl", IMPLS)
def test_partial_frame_is_held_at_most_partial_hold_ms(impl: ModuleType) -> None:
    """frame_ms is the largest frame, not a wait: e.g. a resampler holding back ~3 ms of
    each 100 ms chunk must not delay the first frame of an answer by a whole chunk."""
    db = impl.DownlinkBuffer()
    db.push(audio(150), "r1")
    assert [len(f) for f, _, _ in db.pull(0.0)] == [800]
    assert db.next_due(0.0) == pytest.approx(10.0)
    assert db.pull(9.9) == []
    assert [len(f) for f, _, _ in db.pull(10.0)] == [400]
    assert db.next_due(10.0) is None


@pytest.mark.parametrize("impl", IMPLS)
def test_partial_frame_goes_at_once_when_twilio_is_dry(impl: ModuleType) -> None:
    db = impl.DownlinkBuffer()
    db.push(audio(90), "r1")
    assert [len(f) for f, _, _ in db.pull(0.0)] == [720]  # nothing playing: no waiting
    db.push(audio(25), "r1")
    assert [len(f) for f, _, _ in db.pull(75.0)] == [200]  # 15 ms left: under the margin


@pytest.mark.parametrize("impl", IMPLS)
def test_partial_within_slack_goes_like_a_full_frame(impl: ModuleType) -> None:
    db = impl.DownlinkBuffer(max_lead_ms=1000, slack_ms=4)
    db.push(audio(100)[:779], "r1")  # a resampled 100 ms chunk: 21 bytes held back
    db.push(audio(100), "r2")
    assert [len(f) for f, _, _ in db.pull(0.0)] == [779, 800]  # no PARTIAL_HOLD_MS wait
    db.push(audio(100)[:767], "r2")  # 33 bytes short: more than the slack
    assert db.pull(0.0) == [] and db.buffered_ms == 95
    assert db.next_due(0.0) == pytest.approx(10.0)
    db.push(audio(10), "r2")  # carries on: a full frame and a 47-byte partial
    assert [len(f) for f, _, _ in db.pull(1.0)] == [800]
    assert db.buffered_ms == 5


@pytest.mark.parametrize("impl", IMPLS)
def test_slack_is_checked(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.DownlinkBuffer(frame_ms=20, slack_ms=20)
    with pytest.raises(ValueError):
        impl.DownlinkBuffer(slack_ms=-1)
    assert impl.DownlinkBuffer(frame_ms=20, slack_ms=19).slack_ms == 19


@pytest.mark.parametrize("rate", [16000, 24000])
def test_resampled_chunks_leave_without_waiting(rate: int) -> None:
    """What a call with a PCM agent does (Call._setup_transcoding): every 100 ms chunk of
    the agent's answer leaves as one frame the moment it arrives, the first one too."""
    to_ulaw = _codec.PcmToUlaw(rate)
    db = _codec.DownlinkBuffer(max_lead_ms=10_000)
    db.slack_ms = downlink_slack_ms(to_ulaw, db.frame_ms)
    sizes = []
    for i in range(6):
        chunk = bytes([i * 16, 16]) * (rate // 10)  # 100 ms of PCM16 at a steady level
        db.push(to_ulaw.feed(chunk), "r")
        sizes += [len(f) for f, _, _ in db.pull(float(i))]
        assert db.buffered_ms == 0
    db.push(to_ulaw.flush(), "r")
    db.end_response("r")
    sizes += [len(f) for f, _, _ in db.pull(6.0)]
    assert sizes[1:6] == [800] * 5 and 770 < sizes[0] < 800
    assert sum(sizes) == 4800  # 600 ms in, 600 ms out


@pytest.mark.parametrize("impl", IMPLS)
def test_new_response_closes_previous_partial(impl: ModuleType) -> None:
    db = impl.DownlinkBuffer()
    db.push(audio(130, 1), "a")
    db.push(audio(100, 2), "b")
    out = db.pull(0.0)
    assert [(len(f), rid) for f, _, rid in out] == [(800, "a"), (240, "a"), (800, "b")]


@pytest.mark.parametrize("impl", IMPLS)
def test_lead_over_real_time_is_bounded(impl: ModuleType) -> None:
    db = impl.DownlinkBuffer(frame_ms=100, max_lead_ms=200)
    db.push(audio(1000), "r")
    first = db.pull(0.0)
    # frames go out while play_end - now <= 200 ms: at 0, 100 and 200 ms of lead
    assert len(first) == 3
    assert db.pull(50.0) == []
    assert db.next_due(50.0) == 100.0  # play_end 300 - 200
    assert len(db.pull(100.0)) == 1
    assert db.next_due(100.0) == 200.0
    assert len(db.pull(450.0)) == 3  # late wake-up: lead restarts from now
    assert db.next_due(450.0) == 550.0
    sent = 7
    now = 450.0
    while (due := db.next_due(now)) is not None:
        now = due
        sent += len(db.pull(now))
    assert sent == 10 and db.buffered_ms == 0
    assert db.next_due(now) is None


@pytest.mark.parametrize("impl", IMPLS)
def test_mark_echo_gives_heard_position(impl: ModuleType) -> None:
    db = impl.DownlinkBuffer()
    db.push(audio(300), "r")
    names = [name for _, name, _ in db.pull(0.0)]
    assert db.pending_marks == 3
    assert db.heard_ms("r", 40.0) == 40  # first frame playing since it was sent at 0
    assert db.on_mark(names[0], 105.0) == ("r", 100)
    assert db.pending_marks == 2
    assert db.heard_ms("r", 155.0) == 150  # 100 + 50 ms since the echo
    assert db.heard_ms("r", 900.0) == 200  # never beyond the end of the next frame
    # echoes arrive in order; a later echo confirms the earlier pending ones
    assert db.on_mark(names[2], 330.0) == ("r", 300)
    assert db.pending_marks == 0 and db.idle
    assert db.heard_ms("r", 5000.0) == 300
    assert db.heard_ms("unknown", 5000.0) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_echoes_of_one_read_are_each_echo_in_turn(impl: ModuleType) -> None:
    one, many = impl.DownlinkBuffer(), impl.DownlinkBuffer()
    for db in (one, many):
        db.push(audio(300), "r")
    names = [name for _, name, _ in one.pull(0.0)]
    assert names == [name for _, name, _ in many.pull(0.0)]
    one.on_mark(names[0], 120.0)
    one.on_mark("unknown", 120.0)
    one.on_mark(names[1], 120.0)
    assert many.echoes([names[0], "unknown", names[1]], 120.0) is None
    for db in (one, many):
        assert db.pending_marks == 1 and db.ignored_marks == 1
        assert db.heard_ms("r", 150.0) == 230  # 200 + 30 ms since the echoes


@pytest.mark.parametrize("impl", IMPLS)
def test_heard_waits_for_the_previous_response(impl: ModuleType) -> None:
    db = impl.DownlinkBuffer(max_lead_ms=1000)
    db.push(audio(100), "a")
    db.end_response("a")
    db.push(audio(100), "b")
    (_, m1, _), (_, m2, _) = db.pull(0.0)
    assert db.heard_ms("b", 50.0) == 0  # a is still playing
    assert db.on_mark(m1, 100.0) == ("a", 100)
    assert db.heard_ms("b", 130.0) == 30
    assert db.on_mark(m2, 200.0) == ("b", 100)


@pytest.mark.parametrize("impl", IMPLS)
def test_clear_ignores_late_echoes(impl: ModuleType) -> None:
    db = impl.DownlinkBuffer()
    db.push(audio(500), "r")
    names = [name for _, name, _ in db.pull(0.0)]  # 3 frames sent, 2 queued
    db.on_mark(names[0], 100.0)
    rid, heard, dropped = db.clear(150.0)
    assert (rid, heard) == ("r", 150)
    assert dropped == 200 + 50 + 100  # queued + rest of frame 2 + frame 3
    assert db.idle and db.pending_marks == 0 and db.buffered_ms == 0
    # Twilio echoes the pending marks after a clear: discarded audio, not played
    assert db.on_mark(names[1], 151.0) is None
    assert db.on_mark(names[2], 151.0) is None
    assert db.ignored_marks == 2
    assert db.heard_ms("r", 10_000.0) == 150
    assert db.clear(200.0) == (None, 0, 0)
    # play_end was reset: new audio goes out at once
    db.push(audio(100), "s")
    assert len(db.pull(200.0)) == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_clear_reports_unsent_response(impl: ModuleType) -> None:
    db = impl.DownlinkBuffer()
    db.push(audio(50), "r")
    assert db.clear(0.0) == ("r", 0, 50)


@pytest.mark.parametrize("impl", IMPLS)
def test_drop_response_ignores_stale_audio(impl: ModuleType) -> None:
    db = impl.DownlinkBuffer()
    db.push(audio(250), "old")
    db.drop_response("old")
    assert db.buffered_ms == 0
    db.push(audio(100), "old")  # still in flight from the agent: ignored
    assert db.buffered_ms == 0 and db.pull(0.0) == []
    db.push(audio(100), "new")
    assert [rid for _, _, rid in db.pull(0.0)] == ["new"]


@pytest.mark.parametrize("impl", IMPLS)
def test_drop_response_keeps_other_responses(impl: ModuleType) -> None:
    db = impl.DownlinkBuffer(max_lead_ms=0)
    db.push(audio(200, 1), "a")
    db.push(audio(100, 2), "b")
    db.push(audio(30, 3), "c")
    db.drop_response("b")
    assert db.buffered_ms == 230
    db.end_response("c")
    got = []
    now = 0.0
    while (due := db.next_due(now)) is not None:
        now = due
        got += [rid for _, _, rid in db.pull(now)]
    assert got == ["a", "a", "c"]


@pytest.mark.parametrize("impl", IMPLS)
def test_overflow_refuses_the_excess(impl: ModuleType) -> None:
    db = impl.DownlinkBuffer(frame_ms=20, max_buffer_ms=100)
    db.push(audio(80), "r")
    db.push(audio(50), "r")
    assert db.buffered_ms == 100 and db.overflow_ms == 30
    db.push(audio(10), "r")
    assert db.overflow_ms == 40
    assert len(db.pull(0.0)) > 0  # room again once frames go out
    db.push(audio(10), "r")
    assert db.overflow_ms == 40


@pytest.mark.parametrize("impl", IMPLS)
def test_properties_and_bytes_like(impl: ModuleType) -> None:
    db = impl.DownlinkBuffer()
    assert db.idle and db.pending_marks == 0 and db.buffered_ms == 0
    db.push(bytearray(audio(10)), "r")
    db.push(memoryview(audio(10)), "r")
    db.push(b"", "r")
    assert not db.idle and db.buffered_ms == 20
    with pytest.raises(ValueError):
        impl.DownlinkBuffer(frame_ms=0)


# -- properties ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    bursts=st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 2500), st.integers(0, 150)),
        min_size=1,
        max_size=25,
    ),
    frame_ms=st.sampled_from([20, 100]),
    lead=st.sampled_from([0, 60, 200]),
    slack=st.sampled_from([0, 4]),
)
def test_frames_reassemble_the_input_and_lead_stays_bounded(
    bursts: list[tuple[int, int, int]], frame_ms: int, lead: int, slack: int
) -> None:
    dbs = [
        m.DownlinkBuffer(frame_ms=frame_ms, max_lead_ms=lead, slack_ms=slack)
        for m in (_codec, codec_ref)
    ]
    sent: dict[str, bytearray] = {}
    pushed: dict[str, bytearray] = {}
    now = 0.0
    play_end = float("-inf")
    order: list[str] = []
    for i, (resp, size, dt) in enumerate(bursts):
        rid = f"r{resp}"
        data = bytes((i * 7 + j) & 0xFF for j in range(size))
        for db in dbs:
            db.push(data, rid)
        pushed.setdefault(rid, bytearray()).extend(data)
        if not order or order[-1] != rid:
            order.append(rid)
        now += dt
        outs = [db.pull(now) for db in dbs]
        assert outs[0] == outs[1]
        for frame, _name, frid in outs[0]:
            assert len(frame) <= frame_ms * MS
            sent.setdefault(frid, bytearray()).extend(frame)
            play_end = max(play_end, now) + len(frame) / MS
        if outs[0]:
            assert play_end - now <= lead + frame_ms  # bounded lead
    for rid in {r for r, *_ in [(f"r{b[0]}",) for b in bursts]}:
        for db in dbs:
            db.end_response(rid)
    while (due := dbs[0].next_due(now)) is not None:
        assert dbs[1].next_due(now) == due
        now = due
        outs = [db.pull(now) for db in dbs]
        assert outs[0] == outs[1] and outs[0]
        for frame, _name, frid in outs[0]:
            sent.setdefault(frid, bytearray()).extend(frame)
    assert sent == pushed  # per response, the frames concatenate to exactly the input


ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 2), st.integers(0, 1500)),
        st.tuples(st.just("end"), st.integers(0, 2), st.just(0)),
        st.tuples(st.just("pull"), st.just(0), st.integers(0, 300)),
        st.tuples(st.just("mark"), st.integers(0, 6), st.integers(0, 300)),
        st.tuples(st.just("echoes"), st.integers(0, 6), st.integers(0, 300)),
        st.tuples(st.just("heard"), st.integers(0, 2), st.integers(0, 300)),
        st.tuples(st.just("clear"), st.just(0), st.integers(0, 300)),
        st.tuples(st.just("drop"), st.integers(0, 2), st.just(0)),
    ),
    max_size=50,
)


@settings(max_examples=120, deadline=None)
@given(
    ops=ops,
    frame_ms=st.sampled_from([20, 100]),
    cap=st.sampled_from([300, 600_000]),
    slack=st.sampled_from([0, 3, 15]),
)
def test_compiled_equals_reference(
    ops: list[tuple[str, int, int]], frame_ms: int, cap: int, slack: int
) -> None:
    a = _codec.DownlinkBuffer(frame_ms=frame_ms, max_buffer_ms=cap, slack_ms=slack)
    b = codec_ref.DownlinkBuffer(frame_ms=frame_ms, max_buffer_ms=cap, slack_ms=slack)
    now = 0.0
    names: list[str] = []
    for op, x, y in ops:
        rid = f"r{x}"
        if op == "push":
            data = bytes((x + j) & 0xFF for j in range(y))
            assert a.push(data, rid) == b.push(data, rid)
        elif op == "end":
            a.end_response(rid)
            b.end_response(rid)
        elif op == "pull":
            now += y
            ra, rb = a.pull(now), b.pull(now)
            assert ra == rb
            names += [n for _, n, _ in ra]
        elif op == "mark":
            now += y / 3
            name = names[x % len(names)] if names else "nope"
            assert a.on_mark(name, now) == b.on_mark(name, now)
        elif op == "echoes":  # one read's echoes: two names (one may be stale or unknown)
            now += y / 3
            pick = [names[(x + k) % len(names)] for k in (0, 2)] if names else ["nope"]
            a.echoes([*pick, "nope"], now)
            b.echoes([*pick, "nope"], now)
        elif op == "heard":
            assert a.heard_ms(rid, now + y) == b.heard_ms(rid, now + y)
        elif op == "clear":
            now += y / 7
            assert a.clear(now) == b.clear(now)
        else:
            a.drop_response(rid)
            b.drop_response(rid)
        state = ("pending_marks", "buffered_ms", "idle", "overflow_ms", "ignored_marks")
        assert [getattr(a, s) for s in state] == [getattr(b, s) for s in state]
        assert a.next_due(now) == b.next_due(now)
