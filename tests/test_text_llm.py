"""The conversation core against a local OpenAI-compatible endpoint (tests/fake_llm.py),
and the STT vendors' message handling (relay/agents/text/llm.py, vendors.py)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
from fake_llm import Reply, fake_llm

from relay.agents.text.conversation import History, ToolCall
from relay.agents.text.llm import ChatCompletionsBrain, Conversation, LLMError, LLMOptions
from relay.agents.text.speech import SttEndOfTurn, SttPartial, SttSpeechStarted
from relay.agents.text.vendors import AssemblyAISTT, DeepgramSTT


def brain(llm: Any, **kw: Any) -> ChatCompletionsBrain:
    return ChatCompletionsBrain(LLMOptions(url=llm.url, model="m", api_key=llm.api_key, **kw))


@pytest.mark.parametrize("no_index", [False, True])
async def test_tool_round_trip_through_the_core(no_index: bool) -> None:
    def respond(body: dict[str, Any]) -> Reply:
        if body["messages"][-1]["role"] == "tool":
            return Reply(text="Done, both looked up.")
        return Reply(
            text="One moment.",
            tool_calls=[("lookup", '{"q": "a"}'), ("lookup", '{"q": "b"}')],
            no_index=no_index,
        )

    ran: list[ToolCall] = []

    async def run_tool(call: ToolCall) -> str:
        ran.append(call)
        return orjson.dumps({"found": orjson.loads(call.arguments)["q"]}).decode()

    async with fake_llm(respond) as llm:
        b = brain(llm)
        history = History("sys")
        history.add_user("look up a and b")
        tools = [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]
        conv = Conversation(b, history, tools=tools, run_tool=run_tool)
        text: list[str] = []
        rounds: list[int] = []
        result = await conv.reply(text.append, rounds.append)
        await b.aclose()
    assert [orjson.loads(c.arguments) for c in ran] == [{"q": "a"}, {"q": "b"}]
    assert "".join(text) == "One moment.Done, both looked up."
    assert len(rounds) == 2 and result.rounds == 2
    assert not llm.refusals  # the tool messages answered the calls as the API requires
    assert [m["role"] for m in llm.requests[-1]["messages"]] == [
        "system",
        "user",
        "assistant",
        "tool",
        "tool",
    ]


async def test_cancel_mid_stream_closes_the_connection() -> None:
    async with fake_llm(lambda body: Reply(text="word " * 200, chunk_delay_s=0.01)) as llm:
        b = brain(llm)
        history = History()
        history.add_user("talk")
        conv = Conversation(b, history)
        got: list[str] = []
        with trio.move_on_after(0.3):
            await conv.reply(got.append)
        await llm.wait_for(lambda: llm.disconnects == 1, timeout=2.0)
        await b.aclose()
    assert 0 < len(got) < 200 and llm.completed == 0
    # the partial text is kept, for the agent to cut to what was heard
    assert conv.partial_index is not None
    assert history.messages[conv.partial_index]["content"] == "".join(got)


@pytest.mark.parametrize(
    "reply,match",
    [
        (Reply(status=500), "HTTP 500"),
        (Reply(hang=True), "timed out"),
        (Reply(text="a b c", stall_after=1), "timed out"),
    ],
)
async def test_model_failures_are_llm_errors(reply: Reply, match: str) -> None:
    async with fake_llm(lambda body: reply) as llm:
        b = brain(llm, idle_timeout_s=0.5)
        history = History()
        history.add_user("x")
        with trio.fail_after(3), pytest.raises(LLMError, match=match):
            await Conversation(b, history).reply(lambda d: None)
        await b.aclose()


async def test_wrong_key_is_refused() -> None:
    async with fake_llm(lambda body: Reply(text="hi")) as llm:
        b = ChatCompletionsBrain(LLMOptions(url=llm.url, model="m", api_key="wrong"))
        history = History()
        history.add_user("x")
        with pytest.raises(LLMError, match="401"):
            await Conversation(b, history).reply(lambda d: None)
        await b.aclose()


def dg(text: str, is_final: bool, speech_final: bool) -> str:
    return orjson.dumps(
        {
            "type": "Results",
            "is_final": is_final,
            "speech_final": speech_final,
            "channel": {"alternatives": [{"transcript": text}]},
        }
    ).decode()


def test_deepgram_assembles_finals_until_speech_final_or_utterance_end() -> None:
    stt = DeepgramSTT({"stt_api_key": "k"})
    assert stt.parse('{"type":"SpeechStarted"}') == [SttSpeechStarted()]
    assert stt.parse(dg("when do", False, False)) == [SttPartial("when do")]
    assert stt.parse(dg("when do you", True, False)) == []
    assert stt.parse(dg("", True, False)) == []  # empty finals are skipped
    events = stt.parse(dg("open", True, True))
    assert isinstance(events[0], SttEndOfTurn) and events[0].text == "when do you open"
    assert stt.parse('{"type":"UtteranceEnd"}') == []  # already ended: deduplicated
    stt.parse(dg("hello", True, False))
    events = stt.parse('{"type":"UtteranceEnd","last_word_end":1.2}')
    assert isinstance(events[0], SttEndOfTurn) and events[0].text == "hello"


def test_assemblyai_ends_each_turn_once() -> None:
    stt = AssemblyAISTT({"stt_api_key": "k"})
    turn = {"type": "Turn", "turn_order": 0, "transcript": "hi there", "end_of_turn": True}
    assert stt.parse(orjson.dumps({**turn, "end_of_turn": False, "transcript": "hi"}).decode()) == [
        SttPartial("hi")
    ]
    first = stt.parse(orjson.dumps(turn).decode())
    assert isinstance(first[0], SttEndOfTurn) and first[0].text == "hi there"
    # format_turns repeats the turn formatted: not a second turn
    assert stt.parse(orjson.dumps({**turn, "transcript": "Hi there."}).decode()) == []


def test_vendor_config_errors_name_the_key() -> None:
    from relay.errors import ConfigError

    with pytest.raises(ConfigError, match="stt_url"):
        DeepgramSTT({"stt_api_key": "k", "stt_url": "http://not-a-websocket"})
