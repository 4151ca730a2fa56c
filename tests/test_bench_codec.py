"""bench.codec: candidates timed against each other must compute the same thing."""

from __future__ import annotations


def test_codec_bench_wire_candidates_build_the_same_messages() -> None:
    """bench.codec times the compiled agent frames against the Python path: both must put
    the same messages on the wire (keys differ, so compare what a server reads back)."""
    from bench.codec import wire_tasks
    from relay.media.websocket import FrameParser

    for cands in wire_tasks().values():
        texts = [FrameParser(expect_masked=True).feed(fn()) for fn in cands.values()]
        assert texts[0] and all(t == texts[0] for t in texts)


def test_codec_bench_reader_candidates_make_the_same_events() -> None:
    """bench.codec times the agent-side readers against each other: each candidate must
    turn the delta frame into the same AgentAudio event, every time it is called."""
    from bench.codec import reader_tasks
    from relay.agents.base import AgentAudio

    lengths = []
    for cands in reader_tasks().values():
        events = [fn() for fn in cands.values() for _ in range(2)]
        assert len(events[0]) == 1 and isinstance(events[0][0], AgentAudio)
        assert all(e == events[0] for e in events)
        lengths.append(len(events[0][0].audio))
    assert lengths == [160, 800]  # 20 and 100 ms of μ-law, each task its own message
