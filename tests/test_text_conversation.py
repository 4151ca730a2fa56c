"""Sans-IO core of the text agents: SSE parsing, tool-call accumulation, clause splitting,
history truncation to what was heard (relay/agents/text/conversation.py)."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.agents.text.conversation import (
    ChatStream,
    ChatStreamError,
    ClauseSplitter,
    History,
    SpokenReply,
    SSEParser,
    heard_prefix,
)


def chunk(delta: dict, finish: str | None = None) -> str:
    return orjson.dumps(
        {
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
    ).decode()


# --- SSE ----------------------------------------------------------------------------------
def test_sse_events_comments_and_line_ends() -> None:
    p = SSEParser()
    body = b": keep-alive\r\n\r\ndata: one\r\n\r\ndata: a\ndata: b\n\nevent: x\rdata: three\r\r\n"
    events = p.feed(body)
    assert [e.data for e in events] == ["one", "a\nb", "three"]
    assert events[2].event == "x"
    assert p.comments == 1


@given(
    st.lists(
        st.text(
            alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
            max_size=30,
        ),
        min_size=1,
        max_size=8,
    ),
    st.data(),
)
def test_sse_any_chunking_gives_the_same_events(payloads: list[str], data: st.DataObject) -> None:
    body = b"".join(b"data: " + p.encode() + b"\r\n\r\n" for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=6)))
    parser = SSEParser()
    out = []
    last = 0
    for cut in [*cuts, len(body)]:
        out += parser.feed(body[last:cut])
        last = cut
    # a data line "data: " + text; one leading space is removed, so compare that way
    assert [e.data for e in out] == [p for p in payloads]


# --- Chat Completions stream ------------------------------------------------------------------
def test_text_and_done() -> None:
    s = ChatStream()
    assert s.feed(chunk({"role": "assistant", "content": ""})) == []
    assert s.feed(chunk({"content": "Hello"})) == ["Hello"]
    assert s.feed(chunk({"content": " there"}, "stop")) == [" there"]
    s.feed(orjson.dumps({"choices": [], "usage": {"prompt_tokens": 3}}).decode())
    s.feed("[DONE]")
    assert s.done and s.text == "Hello there" and s.finish_reason == "stop"
    assert s.usage == {"prompt_tokens": 3}


def test_tool_calls_accumulate_per_index_and_parallel() -> None:
    s = ChatStream()
    s.feed(chunk({"content": "Let me check."}))
    s.feed(
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": ""},
                    }
                ]
            }
        )
    )
    s.feed(
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "c2",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": '{"q"'},
                    }
                ]
            }
        )
    )
    s.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"timezone":'}}]}))
    s.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "UTC"}'}}]}))
    s.feed(chunk({"tool_calls": [{"index": 1, "function": {"arguments": ': "x"}'}}]}, "tool_calls"))
    calls = s.tool_calls()
    assert [(c.id, c.name, orjson.loads(c.arguments)) for c in calls] == [
        ("c1", "get_time", {"timezone": "UTC"}),
        ("c2", "lookup", {"q": "x"}),
    ]


def test_tool_calls_without_index_are_not_merged() -> None:
    # Gemini / Ollama omit the index and may end with finish_reason "stop"
    s = ChatStream()
    s.feed(
        chunk(
            {
                "tool_calls": [
                    {"id": "a", "function": {"name": "f", "arguments": "{}"}},
                    {"id": "b", "function": {"name": "g", "arguments": "{}"}},
                ]
            },
            "stop",
        )
    )
    assert [c.name for c in s.tool_calls()] == ["f", "g"]


def test_error_event_raises() -> None:
    with pytest.raises(ChatStreamError, match="overloaded"):
        ChatStream().feed('{"error": {"message": "overloaded"}}')
    with pytest.raises(ChatStreamError):
        ChatStream().feed("not json")


# --- clauses ---------------------------------------------------------------------------------
def split_all(text: str, step: int = 3) -> list[str]:
    sp = ClauseSplitter()
    out: list[str] = []
    for i in range(0, len(text), step):
        out += sp.feed(text[i : i + step])
    tail = sp.flush()
    return out + ([tail] if tail else [])


def test_first_clause_early_then_sentences() -> None:
    text = (
        "Sure, our shop on Main Street opens at 9:30 a.m. tomorrow. Dr. Smith sees patients "
        "from 10.5 hours on, e.g. Mondays. Write to info@example.com today!"
    )
    pieces = split_all(text)
    assert pieces[0] == "Sure, our shop on Main Street opens at 9:30 a.m. tomorrow." or pieces[
        0
    ].startswith("Sure,")
    joined = " ".join(pieces)
    assert joined.split() == text.split()
    for piece in pieces:  # never cut inside these
        for whole in ("9:30", "10.5", "info@example.com", "Dr. Smith", "e.g. Mondays"):
            if whole.split()[0] in piece.split():
                assert whole in " ".join(pieces)
    assert not any(p.endswith("Dr.") or p.endswith("e.g.") for p in pieces)


def test_short_first_sentence_goes_at_once() -> None:
    sp = ClauseSplitter()
    assert sp.feed("Hello! How") == ["Hello!"]


@given(st.text(alphabet="abc ,.!?'\"()0123456789:", max_size=300), st.integers(1, 20))
def test_splitting_keeps_every_word_in_order(text: str, step: int) -> None:
    assert " ".join(split_all(text, step)).split() == text.split()


# --- history and what was heard ----------------------------------------------------------
def test_heard_prefix_cuts_at_words() -> None:
    assert heard_prefix("one two three four", 0.0) == ""
    assert heard_prefix("one two three four", 0.5) == "one two"
    assert heard_prefix("one two three four", 1.0) == "one two three four"


def test_history_keeps_only_what_was_heard_per_clause() -> None:
    h = History("be brief")
    h.add_user("hours?")
    reply = SpokenReply("r1")
    c0 = reply.add_clause("We open at nine.")
    c1 = reply.add_clause("We close at five on weekdays.")
    reply.add_audio(1000, c0)
    reply.add_audio(2000, c1)
    reply.finish()
    index = h.add_assistant(reply.text)
    reply.assign_message(index)
    # heard the first clause and the first half of the second
    heard = reply.heard_by_message(2000)
    h.set_assistant_text(index, heard[index])
    assert h.messages[index]["content"] == "We open at nine. We close at five"
    assert h.request_messages()[0] == {"role": "system", "content": "be brief"}
    # nothing heard: the assistant turn disappears from what the model sees
    h.set_assistant_text(index, reply.heard_by_message(0)[index])
    assert [m["role"] for m in h.request_messages()] == ["system", "user"]


def test_heard_text_without_clause_timing_uses_the_speaking_rate() -> None:
    reply = SpokenReply("r")
    reply.add_clause("abcd efgh")
    reply.add_clause("ijkl mnop")
    reply.add_audio(1000)  # vendor audio not tied to clauses
    reply.add_audio(1000)
    reply.finish()
    assert reply.heard_text(2000) == "abcd efgh ijkl mnop"
    assert reply.heard_text(1000) == "abcd efgh"


def test_history_bound_never_starts_with_a_tool_result() -> None:
    from relay.agents.text.conversation import ToolCall

    h = History(max_messages=3)
    h.add_user("q")
    h.add_assistant("", [ToolCall("c", "get_time", "{}")])
    h.add_tool_result("c", "{}")
    h.add_assistant("It is noon.")
    h.add_user("thanks")
    roles = [m["role"] for m in h.request_messages()]
    assert roles[0] != "tool"
