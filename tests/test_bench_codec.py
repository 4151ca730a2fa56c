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
